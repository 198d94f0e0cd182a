"""carved_ffn picks Triton or PyTorch as CMOE_KERNEL and the device say, even without triton."""

from __future__ import annotations

import subprocess
import sys

import cmoe_kernels
import pytest
import torch
from cmoe_kernels import carved_ffn, kernel_backend

needs_triton = pytest.mark.skipif(not cmoe_kernels.triton_available(), reason="triton missing")
x_cpu = torch.zeros(2, 8)


def test_auto_on_cpu_is_torch(cmoe_env):
    assert kernel_backend(x_cpu) == "torch"


@needs_triton
def test_auto_under_the_interpreter_is_triton(cmoe_env):
    cmoe_env.setenv("TRITON_INTERPRET", "1")
    assert kernel_backend(x_cpu) == "triton"


def test_forced_torch_wins_over_the_interpreter(cmoe_env):
    cmoe_env.setenv("TRITON_INTERPRET", "1")
    cmoe_env.setenv("CMOE_KERNEL", "torch")
    assert kernel_backend(x_cpu) == "torch"


def test_forced_triton_on_cpu_without_the_interpreter_says_why(cmoe_env):
    cmoe_env.setenv("CMOE_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="CMOE_KERNEL=triton cannot run here"):
        kernel_backend(x_cpu)


def test_unknown_choice_is_rejected(cmoe_env):
    cmoe_env.setenv("CMOE_KERNEL", "cuda")
    with pytest.raises(ValueError, match="CMOE_KERNEL='cuda'"):
        kernel_backend(x_cpu)


@needs_triton
@pytest.mark.parametrize(
    "choice, expected", [("triton", "triton"), ("torch", "torch"), ("auto", "triton")]
)
def test_carved_ffn_calls_the_chosen_backend(ffn, cmoe_env, choice, expected):
    # Stubs record which implementation ran, so that no Triton kernel is compiled here.
    calls = []
    cmoe_env.setattr(cmoe_kernels, "carved_ffn_triton", lambda *a: calls.append("triton") or a[0])
    cmoe_env.setattr(cmoe_kernels, "carved_ffn_torch", lambda *a: calls.append("torch") or a[0])
    cmoe_env.setenv("TRITON_INTERPRET", "1")
    cmoe_env.setenv("CMOE_KERNEL", choice)
    carved_ffn(*ffn.make_inputs(ffn.CASES[0]))
    assert calls == [expected]


def test_import_and_run_without_triton():
    # `import cmoe_kernels` must work where triton is absent (macOS, Windows, CPU-only images).
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, cmoe_kernels\n"
        "assert not cmoe_kernels.triton_available()\n"
        "x, gu, dn = torch.randn(2, 8), torch.randn(3, 8, 8), torch.randn(3, 8, 4)\n"
        "ids, g = torch.tensor([[0, 2], [1, 2]]), torch.ones(2, 2)\n"
        "torch.testing.assert_close(cmoe_kernels.carved_ffn(x, gu, dn, ids, g),\n"
        "                           cmoe_kernels.carved_ffn_reference(x, gu, dn, ids, g))\n"
        "assert 'triton' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
