"""cmoe_kernels: the sparse-expert FFN of a carved model, in Triton and in PyTorch.

One operation, `carved_ffn`, dispatched to the Triton kernels (CUDA tensors, or anywhere under
TRITON_INTERPRET=1) or to the PyTorch path (everything else). CMOE_KERNEL=triton|torch|auto
forces the choice. On CPUs, a carved layer's whole decode step (routing included) also has a
fused C++ implementation, `cmoe_kernels.cpu_decode`, which the checkpoints' modeling code uses
for float32 inference of a few tokens. This package imports only torch, and triton lazily: `import cmoe_kernels`
works where triton is not installed. It is installed as `cmoe_kernels`, never as `kernels`, so
that it cannot shadow the PyPI package of that name which transformers imports.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

from ._common import ACTIVATIONS, Activation
from .reference import carved_ffn_reference, per_expert_loop
from .torch_path import carved_ffn_torch, neuron_rows

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "carved_ffn",
    "carved_ffn_reference",
    "carved_ffn_torch",
    "carved_ffn_triton",
    "kernel_backend",
    "neuron_rows",
    "per_expert_loop",
    "triton_available",
]

Backend = Literal["triton", "torch"]
_CHOICES = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_backend(x: torch.Tensor) -> Backend:
    """The implementation `carved_ffn` uses for activations `x`.

    CMOE_KERNEL=auto (default): Triton for CUDA tensors, or for any tensor under
    TRITON_INTERPRET=1, when triton is installed; PyTorch otherwise. CMOE_KERNEL=torch or =triton
    forces one; forcing triton where it cannot run raises a RuntimeError saying why.
    """
    choice = os.environ.get("CMOE_KERNEL", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"CMOE_KERNEL={choice!r} is not one of {', '.join(_CHOICES)}")
    if choice == "torch":
        return "torch"
    runnable = triton_available() and (x.is_cuda or _interpret_mode())
    if choice == "triton" and not runnable:
        why = (
            "triton is not installed"
            if not triton_available()
            else (
                f"the tensors are on {x.device.type}, not CUDA, and TRITON_INTERPRET=1 is not set"
            )
        )
        raise RuntimeError(f"CMOE_KERNEL=triton cannot run here: {why}; use CMOE_KERNEL=torch")
    return "triton" if runnable else "torch"


def carved_ffn_triton(*args, **kwargs) -> torch.Tensor:
    """The Triton implementation (imported on first use); see `triton_path.carved_ffn_triton`."""
    from .triton_path import carved_ffn_triton as impl

    return impl(*args, **kwargs)


def carved_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    activation: Activation = "silu",
    neuron_keep=None,
    rows_2d: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FFN of a carved MoE layer: every token through its chosen experts, gated and summed.

    Args:
        x: [T, D] token activations (FFN input), fp32, fp16 or bf16.
        gate_up: [E, 2*m, D] the stacked experts, transformers v5 MoE layout: rows 0..m-1 of
            expert e are its gate projection, rows m..2m-1 its up projection. Shared experts are
            part of the stack (by convention ids 0..S-1), routed experts follow.
        down: [E, D, m] the experts' down projections.
        ids: [T, K] int64 (or int32) expert ids per token, distinct within a row; the caller
            appends the shared experts' ids (with gate 1) to the routed top-k.
        gates: [T, K] gate weight of each chosen expert, fp32 or x.dtype.
        activation: "silu" (Llama, Mistral, Qwen, SmolLM2) or "gelu_tanh" (Gemma).
        neuron_keep: MoNE, neuron-granular sparsity inside the experts: None (off), one count
            for every expert, or E counts (e.g. shared experts keep more). Each token keeps, in
            each chosen expert, the neuron_keep[e] neurons of largest |act(W_gate[e] x_t)|; the
            others contribute nothing (and receive no gradient).
        rows_2d: optional [E, m, 2D] neuron-major copy of the up rows and down columns
            (`neuron_rows(gate_up, down)`), which the decode paths with neuron_keep read so that
            only the kept neurons' bytes are fetched; made per call when absent (slow).

    Returns:
        y: [T, D] in x.dtype, y[t] = sum_k gates[t, k] * down[e] @ (act(W_gate[e] x_t) *
        (W_up[e] x_t)) with e = ids[t, k], the sum over k accumulated in fp32.

    Differentiable in x, gate_up, down and gates. Backend: see `kernel_backend`.
    """
    if neuron_keep is None:
        if kernel_backend(x) == "triton":
            return carved_ffn_triton(x, gate_up, down, ids, gates, activation)
        return carved_ffn_torch(x, gate_up, down, ids, gates, activation)
    if kernel_backend(x) == "triton":
        return carved_ffn_triton(
            x, gate_up, down, ids, gates, activation, neuron_keep=neuron_keep, rows_2d=rows_2d
        )
    return carved_ffn_torch(
        x, gate_up, down, ids, gates, activation, neuron_keep=neuron_keep, rows_2d=rows_2d
    )
