"""What a carve reads from the dense neurons' scores act(W_gate x) * (W_up x) of a layer's
calibration tokens, once they are kept: the dense FFN's outputs, the experts' hidden
activations and the carved FFN's outputs, each without running an FFN again."""

from __future__ import annotations

import torch
from torch import nn

from .modeling_cmoe import CarvedMLP
from .profiling import neuron_scores

# The most memory the per-token neuron scores of one layer may take to be kept ([N, d_h] fp32:
# 16,384 x 1,536 is 100 MB for SmolLM2, 16,384 x 14,336 is 940 MB for Llama-3-8B).
KEEP_SCORES_BYTES = 1 << 30


@torch.no_grad()
def all_scores(dense: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """`neuron_scores` of every row of x [N, D] (raw), or None above KEEP_SCORES_BYTES."""
    width = dense.gate_proj.weight.shape[0]
    if x.shape[0] * width * 4 > KEEP_SCORES_BYTES:
        return None
    return neuron_scores(x, dense.gate_proj.weight, dense.up_proj.weight, dense.act_fn, False)


@torch.no_grad()
def dense_output(dense: nn.Module, x: torch.Tensor, scores, rows: torch.Tensor) -> torch.Tensor:
    """The dense FFN's output [n, D] fp32 on x = the inputs' rows `rows`, from their scores
    when kept (one matmul with W_down) or by running the FFN."""
    if scores is None:
        return dense(x).float()
    return scores[rows] @ dense.down_proj.weight.float().t()


@torch.no_grad()
def expert_major(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The scores [N, d_h] with their columns in expert order -> [N, E*m] fp32: expert e's
    neurons are columns e*m .. (e+1)*m, the padding neurons (ids past d_h) zero columns.

    One column gather for the whole layer: every later read of an expert's activations is then
    a slice (on SmolLM2, gathering one expert's 96 columns for all 16k tokens took 12 ms, the
    slice 0.3 ms; the whole reorder 65 ms)."""
    width = scores.shape[1]
    flat = experts.reshape(-1).to(scores.device)
    ordered = scores.index_select(1, flat.clamp(max=width - 1))
    padded = flat >= width
    if padded.any():
        ordered[:, padded] = 0.0
    return ordered


def expert_scores(ordered: torch.Tensor, rows: torch.Tensor, num_experts: int, chunk: int):
    """The experts' hidden activations on the given rows from `expert_major` scores, in chunks
    of `chunk` rows, as `shared_hidden` makes them: [c, E, m] fp32 each."""
    m = ordered.shape[1] // num_experts
    return [ordered.index_select(0, rows[start : start + chunk]).view(-1, num_experts, m)
            for start in range(0, rows.numel(), chunk)]


@torch.no_grad()
def output_from_scores(carved: CarvedMLP, x: torch.Tensor, ordered: torch.Tensor) -> torch.Tensor:
    """The carved FFN's output [n, D] fp32 on x [n, D] (as `carved(x)` with MoNE off), from the
    `expert_major` scores of the same rows [n, E*m]: the experts' hidden activations are slices
    of them, so only the down projections run, on the chosen experts' rows (on SmolLM2 a third
    of a carved forward's matmuls: the gate and up ones are in the scores already)."""
    ids, gates, top = carved.route(x)
    n, k = ids.shape
    num_experts = carved.down_proj.shape[0]
    m = ordered.shape[1] // num_experts
    down = carved.down_proj.float()  # [E, D, m]
    y = torch.zeros(n, down.shape[1], dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs by expert, tokens in order within one
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token = order // k
    weight = gates.reshape(-1)[order].float()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        h = ordered[:, e * m : (e + 1) * m]
        w = weight[start : start + count, None]
        if count == n:  # every token's (a shared expert): no row gather and no scatter
            y.add_((h @ down[e].t()).mul_(w))
        else:
            rows = token[start : start + count]
            y.index_add_(0, rows, (h.index_select(0, rows) @ down[e].t()).mul_(w))
        start += count
    if carved.compensate:
        bias = carved.expert_bias.float()
        y += bias.sum(0) - bias[top].sum(1)
    return y
