"""Layer-adaptive expert budgets and the training-free load-balancing bias: pure functions."""

from __future__ import annotations

import torch


@torch.no_grad()
def error_by_active_experts(
    order_scores: torch.Tensor,
    routed_out: torch.Tensor,
    base_out: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """Squared error of the carved FFN for every number of active routed experts.

    order_scores [T, Nr] (the router's selection scores), routed_out [T, Nr, D] (each routed
    expert's output, gate 1), base_out [T, D] (shared experts), target [T, D] (dense FFN)
    -> [Nr + 1] fp64: entry k is sum_t ||base + top-k experts - target||^2.
    """
    order = torch.argsort(order_scores, dim=-1, descending=True)  # [T, Nr]
    ranked = routed_out.gather(1, order[..., None].expand_as(routed_out))  # [T, Nr, D]
    partial = torch.cat([torch.zeros_like(ranked[:, :1]), ranked.cumsum(1)], dim=1)
    residual = base_out[:, None, :] + partial - target[:, None, :]  # [T, Nr+1, D]
    return residual.double().pow(2).sum(dim=(0, 2))


def allocate_budgets(costs: list[torch.Tensor], mean_k: int, k_min: int = 1, k_max: int | None = None) -> list[int]:
    """Active experts per layer minimising the summed cost at an average of `mean_k`.

    costs[l][k] is layer l's cost with k active routed experts. Greedy on marginal gains: start
    every layer at k_min and give one more expert at a time to the layer whose cost falls most.
    """
    num_layers = len(costs)
    k_max = k_max or min(c.numel() - 1 for c in costs)
    budget = mean_k * num_layers
    ks = [k_min] * num_layers
    if k_min * num_layers > budget or k_max * num_layers < budget:
        raise ValueError(f"cannot average {mean_k} experts with per-layer range [{k_min}, {k_max}]")
    for _ in range(budget - k_min * num_layers):
        gains = [
            (costs[l][ks[l]] - costs[l][ks[l] + 1]).item() if ks[l] < k_max else float("-inf")
            for l in range(num_layers)
        ]
        best = max(range(num_layers), key=lambda l: gains[l])
        ks[best] += 1
    return ks


@torch.no_grad()
def balance_bias(scores: torch.Tensor, top_k: int, steps: int = 200, gamma: float = 2e-3) -> torch.Tensor:
    """A selection bias b [Nr] that evens expert loads on calibration scores [T, Nr].

    The aux-loss-free rule of DeepSeek-V3, run to convergence on fixed scores: after each pass,
    lower b for experts above the mean load and raise it for those below.
    """
    num_tokens, num_routed = scores.shape
    bias = torch.zeros(num_routed, dtype=scores.dtype)
    mean = num_tokens * top_k / num_routed
    for _ in range(steps):
        top = torch.topk(scores + bias, top_k, dim=-1).indices
        load = torch.bincount(top.reshape(-1), minlength=num_routed).to(scores.dtype)
        bias += gamma * torch.sign(mean - load)
    return bias
