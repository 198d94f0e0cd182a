"""What every path of the carved FFN shares: the activations and the check of the inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Activation = Literal["silu", "gelu_tanh"]

# SiLU for Llama/Mistral/Qwen/SmolLM2, GELU with the tanh approximation for Gemma.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}


def torch_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The PyTorch function of an activation name; ValueError naming the choices otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation={name!r} is not supported; use one of {sorted(ACTIVATIONS)}"
        ) from None


def check_inputs(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """Validate the shapes of a carved FFN call and return (T, D, E, m, K).

    A handful of integer comparisons: cheap enough for the decode hot path (about 2 us).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    T, D = x.shape
    if gate_up.dim() != 3 or gate_up.shape[2] != D or gate_up.shape[1] % 2:
        raise ValueError(
            f"gate_up must be [E, 2*m, D] with D={D} (x's last dim), got {tuple(gate_up.shape)}"
        )
    E, m = gate_up.shape[0], gate_up.shape[1] // 2
    if tuple(down.shape) != (E, D, m):
        raise ValueError(
            f"down must be [E, D, m] = {(E, D, m)} to match gate_up {tuple(gate_up.shape)}, "
            f"got {tuple(down.shape)}"
        )
    if ids.dim() != 2 or ids.shape[0] != T or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"ids must be an integer [T, K] tensor with T={T}, got {ids.dtype} {tuple(ids.shape)}"
        )
    K = ids.shape[1]
    if tuple(gates.shape) != (T, K):
        raise ValueError(f"gates must be [T, K] = {(T, K)} like ids, got {tuple(gates.shape)}")
    if K > E:
        raise ValueError(f"ids has K={K} experts per token but the stack holds only E={E}")
    return T, D, E, m, K


def expert_keep(neuron_keep, E: int, m: int) -> list[int] | None:
    """Neurons kept per expert (MoNE) as a list of E counts, or None when every expert keeps all
    m (selection off). `neuron_keep` is None, one count for every expert, or E counts."""
    if neuron_keep is None:
        return None
    if isinstance(neuron_keep, int):
        counts = [neuron_keep] * E
    else:
        counts = [int(c) for c in neuron_keep]
        if len(counts) != E:
            raise ValueError(f"neuron_keep must hold one count per expert (E={E}), got {len(counts)}")
    if any(c < 1 or c > m for c in counts):
        raise ValueError(f"neuron_keep counts must be in [1, m={m}], got {sorted(set(counts))}")
    return None if all(c == m for c in counts) else counts


def keep_mask(a: torch.Tensor, count: int) -> torch.Tensor:
    """MoNE's selection: 1.0 for the `count` largest |a| of each row of a [n, m], else 0.0."""
    idx = torch.topk(a.detach().abs(), count, dim=-1).indices
    return torch.zeros_like(a).scatter_(-1, idx, 1.0)
