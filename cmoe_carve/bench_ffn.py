"""The FFN modules `cmoe bench` times in a model (dense gated MLPs and carved ones), the
weight bytes a token reads in each, and the official CMoE per-expert loop swapped into a
carved model as a baseline."""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

import torch
from torch import nn

from .errors import BenchError
from .modeling_cmoe import find_gated_mlps


def is_carved_mlp(module: nn.Module) -> bool:
    """A CarvedMLP, whether from this package or from a checkpoint's remote code."""
    return all(hasattr(module, a) for a in ("route", "gate_up_proj", "down_proj", "router"))


def ffn_modules(model: nn.Module) -> list[nn.Module]:
    """Every FFN of the model in order: carved MLPs and dense gated MLPs."""
    dense = {id(m) for _, m in find_gated_mlps(model)}
    found = [m for m in model.modules() if is_carved_mlp(m) or id(m) in dense]
    if not found:
        raise BenchError(
            f"{type(model).__name__} has no gated or carved MLP to time: expected modules with "
            "gate_proj/up_proj/down_proj/act_fn (dense) or gate_up_proj/down_proj/route (carved)"
        )
    return found


def carved_ffn_backend(model: nn.Module) -> str | None:
    """Which implementation runs the carved model's experts; None for a dense model."""
    carved = [m for m in model.modules() if is_carved_mlp(m)]
    if not carved:
        return None
    module = sys.modules.get(type(carved[0]).__module__)
    if getattr(module, "_fast_carved_ffn", None) is None:
        return "plain PyTorch of modeling_cmoe (cmoe_kernels not importable)"
    import cmoe_kernels

    probe = carved[0].gate_up_proj.new_zeros(1, carved[0].hidden_size)
    try:
        backend = cmoe_kernels.kernel_backend(probe)
    except (RuntimeError, ValueError) as err:
        backend = f"unusable: {err}"
    fused = getattr(module, "_cpu_decode", None)
    if fused is not None and fused.applies(probe):
        limit = getattr(module, "_CPU_FUSED_TOKENS", "a few")
        return (
            f"fused CPU decode step up to {limit} tokens, cmoe_kernels.carved_ffn ({backend}) "
            "above"
        )
    return f"cmoe_kernels.carved_ffn ({backend})"


def _kernel_activation(module: nn.Module) -> str:
    from .modeling_cmoe import _KERNEL_ACTIVATIONS

    try:
        return _KERNEL_ACTIVATIONS[module.activation]
    except KeyError:
        raise BenchError(
            f"the per-expert loop baseline has no kernel for activation {module.activation!r}: "
            "run with --no-loop-baseline"
        ) from None


def _per_expert_loop_experts(
    self: nn.Module, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """CarvedMLP.experts with the official CMoE combine in place of our kernels."""
    from cmoe_kernels import per_expert_loop

    return per_expert_loop(x, self.gate_up_proj, self.down_proj, ids, gates, _kernel_activation(self))


@contextlib.contextmanager
def per_expert_loop_installed(model: nn.Module) -> Iterator[nn.Module]:
    """The carved model with every CarvedMLP running the official per-expert loop, restored
    after."""
    carved = [m for m in model.modules() if is_carved_mlp(m)]
    if not carved:
        raise BenchError("the per-expert loop baseline needs a carved model")
    for module in carved:
        _kernel_activation(module)  # fail before patching anything
    try:
        for module in carved:
            module.experts = types.MethodType(_per_expert_loop_experts, module)
        yield model
    finally:
        for module in carved:
            module.__dict__.pop("experts", None)  # the class's experts again

def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def ffn_bytes_per_token(module: nn.Module) -> float:
    """Weight bytes one token reads in this FFN: all of a dense MLP; the router plus the shared
    and the top-k routed experts of a carved one."""
    if is_carved_mlp(module):
        per_expert = (tensor_bytes(module.gate_up_proj) + tensor_bytes(module.down_proj)) / (
            module.num_experts
        )
        router = sum(tensor_bytes(p) for p in module.router.parameters())
        return (module.num_shared + module.top_k) * per_expert + router
    projections = ("gate_proj", "up_proj", "down_proj")
    return sum(tensor_bytes(getattr(module, p).weight) for p in projections)
