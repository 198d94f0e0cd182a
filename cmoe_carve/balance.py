"""Aux-loss-free load balancing (DeepSeek-V3, used by CMoE during fine-tuning), as pure functions.

Each routed expert has a bias `b` that is added to its router score for the top-k choice only
(the gates never see it). After every optimizer step, experts that took more than the mean load
get `b -= gamma`, experts below it get `b += gamma`, and experts exactly at the mean keep theirs.
No loss term, so the language-model gradient is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .modeling_cmoe import CarvedMLP


def routing_counts(top: torch.Tensor, num_routed: int) -> torch.Tensor:
    """Tokens routed to each expert: top [T, k] routed ids in 0..Nr-1 -> int64 counts [Nr]."""
    return torch.bincount(top.reshape(-1), minlength=num_routed)


def updated_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """The bias after one balancing step: b + gamma * sign(mean load - load).

    bias [..., Nr] (float), counts [..., Nr] (tokens per expert, any number type); the mean is
    taken over the last dimension, so a stack of layers [L, Nr] updates in one call.
    """
    load = counts.to(torch.float64)
    mean = load.mean(dim=-1, keepdim=True)
    return bias + gamma * torch.sign(mean - load).to(bias.dtype)


def max_over_mean(counts: torch.Tensor) -> torch.Tensor:
    """Load imbalance: the busiest expert's load over the mean load; 1.0 is perfectly even.

    counts [..., Nr] -> [...]; 0 where no token was routed at all.
    """
    load = counts.to(torch.float64)
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, load.amax(dim=-1) / mean.clamp_min(1e-30), torch.zeros_like(mean))


def carved_mlps(model: nn.Module) -> list[CarvedMLP]:
    """Every carved FFN of a model in model order (found through PEFT or DDP wrappers too)."""
    return [m for m in model.modules() if isinstance(m, CarvedMLP)]


class RoutingRecorder:
    """Counts the routed experts chosen by every carved layer over several forward passes.

    While active, each CarvedMLP keeps its last top-k choice (`record_routing`); `collect()` is
    called after each forward (before backward, whose recomputation under gradient checkpointing
    would only repeat the same choice) and adds it to the per-layer counts [L, Nr].
    """

    def __init__(self, mlps: Iterable[CarvedMLP]):
        self.mlps = list(mlps)
        if not self.mlps:
            raise ValueError("the model has no CarvedMLP: nothing to record")
        self.num_routed = self.mlps[0].num_routed
        self.counts = torch.zeros(len(self.mlps), self.num_routed, dtype=torch.int64)

    def __enter__(self) -> RoutingRecorder:
        for mlp in self.mlps:
            mlp.record_routing = True
            mlp.last_routing = None
        return self

    def __exit__(self, *exc) -> None:
        for mlp in self.mlps:
            mlp.record_routing = False
            mlp.last_routing = None

    def collect(self) -> None:
        for i, mlp in enumerate(self.mlps):
            if mlp.last_routing is not None:
                self.counts[i] += routing_counts(mlp.last_routing, self.num_routed).cpu()
                mlp.last_routing = None

    def reset(self) -> torch.Tensor:
        """The counts so far [L, Nr]; the recorder starts again from zero."""
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        return counts


@torch.no_grad()
def apply_bias_update(mlps: list[CarvedMLP], counts: torch.Tensor, gamma: float) -> None:
    """Move every layer's selection bias toward balance; counts [L, Nr] from RoutingRecorder."""
    for mlp, layer_counts in zip(mlps, counts):
        bias = mlp.router.bias
        bias.copy_(updated_bias(bias, layer_counts.to(bias.device), gamma))
