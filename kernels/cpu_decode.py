"""The fused CPU decode step of a carved FFN layer (`cpu_decode.cpp`), built on first use.

At one token a carved layer reads about 2.7 MB of weights (S2A2E16, SmolLM2-135M, two routed
experts on average), some 100 us of memory traffic on this project's 2-core machine, while the
same work as PyTorch ops is some 30 op calls of 3-5 us each, plus the Python around them. One
C++ call that routes, runs the chosen experts' rows in place and adds the compensation removes
that overhead (the 30 layers' weights streamed from memory, one thread of the 2-core EPYC:
262 us a layer on the PyTorch path, 112 us fused).

It is compiled once per machine with `torch.utils.cpp_extension` (about 20 s on a 2-core
machine; needs a C++ compiler, which every Linux box with pip's build tools has) into torch's
extension cache, and used for float32 CPU inference only. Where it cannot be built, everything
runs on the PyTorch path as before, after one warning. A build that was killed leaves a lock in
`~/.cache/torch_extensions/*/cmoe_cpu_decode_*/`: delete that folder.

It runs under CMOE_KERNEL=auto (the default) for float32 CPU tensors that the Triton
interpreter is not asked to take; CMOE_KERNEL=torch turns it off (the plain PyTorch path, for
comparisons), as does CMOE_KERNEL=triton.

`moe_decode(x, ...)` is the one-off call; `prepare(...)` then `run(x, prepared)` is the same for
a caller that decodes token after token with the same layer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

from . import _interpret_mode, triton_available  # the package is initialised before this module

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_decode.cpp")

ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1}
ROUTER_CODES = {"linear": 0, "representative": 1}


def applies(x: torch.Tensor) -> bool:
    """Whether activations `x` go through the fused kernel: float32 on the CPU, CMOE_KERNEL=auto,
    no Triton interpreter taking CPU tensors (see `kernel_backend`), and the kernel built (on
    the first call). Called once per layer and token: a few dictionary lookups."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    choice = os.environ.get("CMOE_KERNEL")
    if choice is not None and choice.strip().lower() not in ("", "auto"):
        return False
    if _interpret_mode() and triton_available():
        return False
    return load()


def _cpu_signature() -> str:
    """What the build depends on besides the source: -march=native code may not run on another
    processor that shares the same home directory (a cluster), so the processor is in the name."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{torch.__version__}|{platform.machine()}|{flags}"


def hugepages_possible() -> bool:
    """Whether this system can be asked for huge pages: Linux, transparent huge pages not set
    to "never" (most distributions default to "madvise": memory that asks gets them)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of float32 CPU tensor `t` in 2 MiB-aligned memory that asks for huge
    pages (`cmoe_cpu::hugepage_empty`); a plain copy where that cannot be had. Same values either
    way, and a storage of exactly the tensor's bytes (so saving it writes nothing more).

    Why: decode reads each expert's rows once per token from all over a few hundred MB, and with
    4 KiB pages nearly every row costs a TLB miss, a page walk that is slow inside a virtual
    machine. Measured on this project's 2-core EPYC VM (SmolLM2-135M shapes, 30 layers, one
    thread): no selection 101 -> 96 us a layer, MoNE at keep 0.5 98 -> 89 us.
    """
    usable = (
        t.device.type == "cpu" and t.dtype == torch.float32
        and t.numel() * 4 >= 2 << 20 and hugepages_possible() and load()
    )
    if not usable:
        return t.detach().clone(memory_format=torch.contiguous_format)
    out = torch.ops.cmoe_cpu.hugepage_empty(list(t.shape))
    out.copy_(t.detach())
    return out


def _ninja_on_path() -> None:
    """torch builds with the `ninja` command; the PyPI package installs it next to Python, which
    is not on PATH when a virtual environment's python runs without being activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def load() -> bool:
    """Build (once per machine) and load the extension; False, after one warning, where that
    fails. Registers `torch.ops.cmoe_cpu.moe_decode`."""
    if platform.system() != "Linux":
        return False  # built and tested with GCC on Linux only
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        source = _SOURCE.read_bytes()
        digest = hashlib.sha256(source + _cpu_signature().encode()).hexdigest()[:12]
        log.info("loading the CPU decode kernel (compiled once per machine, about 20 s)")
        cpp_extension.load(
            name=f"cmoe_cpu_decode_{digest}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back
        log.warning(
            "the fused CPU decode kernel could not be built (%s); carved models run on the "
            "PyTorch path (slower at decode). Install a C++ compiler (g++) and ninja to enable it, "
            "or set CMOE_KERNEL=torch to silence this.",
            str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__,
        )
        return False
    return True


@functools.cache
def _op():
    """The registered operator, resolved once (the torch.ops lookup chain costs about 1 us)."""
    return torch.ops.cmoe_cpu.moe_decode.default


def moe_decode(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_up: torch.Tensor | None,
    router_b: torch.Tensor,
    sel_bias: torch.Tensor,
    scale: torch.Tensor,
    router_kind: str,
    top_k: int,
    num_shared: int,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    rows_2d: torch.Tensor | None = None,
    keep: list[int] | None = None,
    expert_bias: torch.Tensor | None = None,
    activation: str = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One carved FFN layer for a few tokens, routed and combined in one call (inference only).

    Args:
        x: [T, D] float32 CPU FFN input.
        router_w: [Nr, D] the router's linear weights ("linear"), or its representative
            neurons' gate rows ("representative"); router_up: [Nr, D] their up rows, else None.
        router_b: [Nr] logit intercept (zeros for a representative router).
        sel_bias: [Nr] selection-only bias; scale: [Nr] router scale u.
        router_kind: "linear" or "representative"; top_k: routed experts per token;
        num_shared: S, the shared experts (ids 0..S-1 of the stack, gate 1).
        gate_up: [E, 2m, D], down: [E, D, m]: the stacked experts (transformers' MoE layout).
        rows_2d: [E, m, 2D] neuron-major up rows | down columns (`neuron_rows`), needed when
            `keep` selects neurons: a kept neuron's up row and down column are then one
            contiguous 2D-float run (in `down` its column is strided, and reading it would touch
            every cache line of the expert).
        keep: E neuron counts (MoNE), or None for all m.
        expert_bias: [Nr, D] compensation: added for every routed expert a token leaves out.
        activation: "silu" or "gelu_tanh".

    Returns:
        y [T, D] float32 and top [T, top_k] int64 (the routed experts chosen, best first).
    """
    return run(x, prepare(
        router_w, router_up, router_b, sel_bias, scale, router_kind, top_k, num_shared, gate_up,
        down, rows_2d, keep, expert_bias, activation,
    ))


def prepare(
    router_w, router_up, router_b, sel_bias, scale, router_kind, top_k, num_shared, gate_up,
    down, rows_2d=None, keep=None, expert_bias=None, activation="silu",
) -> tuple:
    """`moe_decode`'s arguments after x, in the operator's order, for `run`: a caller that
    decodes token after token makes them once (a carved layer caches them) and saves the
    Python work of every call, which at one token costs as much as a tenth of the layer."""
    if not load():
        raise RuntimeError(
            "the fused CPU decode kernel is not available here (see the warning above); use the "
            "module's general path (CMOE_KERNEL=torch)"
        )
    return (
        router_w, router_up, router_b, sel_bias, scale, ROUTER_CODES[router_kind], top_k,
        num_shared, gate_up, down, rows_2d, keep, expert_bias, ACTIVATION_CODES[activation],
    )


def run(x: torch.Tensor, prepared: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_decode(x, ...)` with arguments from `prepare`."""
    return _op()(x, *prepared)
