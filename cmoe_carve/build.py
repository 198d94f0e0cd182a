"""From an expert layout to a CarvedMLP: exact weight slices plus the training-free router."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouping import ExpertLayout
from .modeling_cmoe import CarvedMLP


def padded_weights(mlp, num_neurons: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_gate, W_up [P, D] and W_down [D, P] with zero neurons appended up to P neurons."""
    w_gate, w_up, w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    pad = num_neurons - w_gate.shape[0]
    if pad:
        w_gate = torch.cat([w_gate, w_gate.new_zeros(pad, w_gate.shape[1])])
        w_up = torch.cat([w_up, w_up.new_zeros(pad, w_up.shape[1])])
        w_down = torch.cat([w_down, w_down.new_zeros(w_down.shape[0], pad)], dim=1)
    return w_gate, w_up, w_down


@torch.no_grad()
def build_carved_mlp(
    mlp,
    layout: ExpertLayout,
    num_shared: int,
    top_k: int,
    activation: str,
    cosine_router: bool = True,
) -> CarvedMLP:
    """A CarvedMLP whose experts are exact slices of `mlp`'s weights, in `mlp`'s dtype/device."""
    num_experts, m = layout.experts.shape
    w_gate, w_up, w_down = padded_weights(mlp, num_experts * m)
    carved = CarvedMLP(
        hidden_size=w_gate.shape[1],
        expert_size=m,
        num_shared=num_shared,
        num_experts=num_experts,
        top_k=top_k,
        activation=activation,
        router="representative",
    ).to(device=w_gate.device, dtype=w_gate.dtype)
    idx = layout.experts.to(w_gate.device)  # [E, m]
    with torch.no_grad():
        for e in range(num_experts):  # expert by expert: no whole-FFN temporaries beside the copy
            carved.gate_up_proj[e, :m].copy_(w_gate[idx[e]])  # [E, 2m, D]: gate rows, up rows
            carved.gate_up_proj[e, m:].copy_(w_up[idx[e]])
            carved.down_proj[e].copy_(w_down[:, idx[e]])  # [E, D, m]
    reps = layout.representatives.to(w_gate.device)
    rg, ru = w_gate[reps].float(), w_up[reps].float()
    if cosine_router:  # unit rows, as the official CMoE router
        rg, ru = F.normalize(rg, dim=-1), F.normalize(ru, dim=-1)
    carved.router.gate_weight.copy_(rg)
    carved.router.up_weight.copy_(ru)
    carved.router.scale.zero_()
    carved.router.bias.zero_()
    return carved
