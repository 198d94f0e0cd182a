"""The malloc tuning of memory_reuse: freed large tensors are reused without new page faults."""

import os
import resource
import subprocess
import sys
import textwrap

import pytest

# A child process for each case: mallopt's settings are process-wide and cannot be undone.
_PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from cmoe_carve.memory_reuse import reuse_freed_memory
    applied = reuse_freed_memory() if sys.argv[1] == "tuned" else False
    def step():  # a carve's pattern: tensors of tens of MB made, used and freed in turn
        x = torch.ones(8 << 20)
        y = torch.ones(2048, 576) @ torch.ones(576, 1536)
        z = x * 2
        del x
        w = y.sum(0)
        del y, z, w
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


# The same in a thread of its own (the carve's dense stream, the fine-tune's teacher), with
# tensors past the 64 MiB that a thread's own malloc arena can hold: there glibc maps every one
# afresh unless all threads share the main heap.
_THREAD_PROBE = textwrap.dedent("""
    import resource, sys, threading
    import torch
    from cmoe_carve.memory_reuse import reuse_freed_memory
    applied = reuse_freed_memory() if sys.argv[1] == "tuned" else False
    def step():
        x = torch.ones(24 << 20)  # 96 MiB
        z = x * 2
        del x, z
    def run(out):
        for _ in range(3):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            step()
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    out = []
    t = threading.Thread(target=run, args=(out,))
    t.start()
    t.join()
    print(applied, out[0])
""")


def _faults(mode: str, env=None, probe: str = _PROBE) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_reuses_freed_tensors_without_page_faults():
    applied, tuned = _faults("tuned")
    if applied != "True":
        pytest.skip("this C library has no mallopt (not glibc)")
    _, plain = _faults("plain")
    pages = 10 * (64 << 20) // resource.getpagesize()  # what x and z take
    assert plain > pages // 2  # each fresh mapping faults its pages in again
    assert tuned < pages // 4  # the freed heap memory is reused (0-25k of 164k here)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_reuses_a_threads_freed_tensors_too():
    applied, tuned = _faults("tuned", probe=_THREAD_PROBE)
    if applied != "True":
        pytest.skip("this C library has no mallopt (not glibc)")
    _, plain = _faults("plain", probe=_THREAD_PROBE)
    pages = 10 * (192 << 20) // resource.getpagesize()  # what x and z take
    # Mapped afresh, every page faults again (491k of 492k here); on the shared heap 24-172k
    # over 20 runs (some runs still grow the heap in the measured steps), never half.
    assert plain > (pages * 3) // 4
    assert tuned < pages // 2


def test_env_switch_leaves_malloc_alone():
    env = {**os.environ, "CMOE_REUSE_MEMORY": "0"}
    applied, _ = _faults("tuned", env)
    assert applied == "False"
