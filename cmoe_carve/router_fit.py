"""A router fitted to the calibration data in closed form (ridge regression).

The oracle router picks, per token, the routed experts whose outputs have the largest norm. We
fit a linear map from the FFN input to those norms, standardised per token (only their order
within a token matters for top-k), by ridge regression: one [D, D] solve per layer, no
backpropagation through the model.
"""

from __future__ import annotations

import torch

# Tokens per chunk when computing experts' hidden activations: bounds the [chunk, E, m] fp32
# buffer (4096 x 14 x 96 x 4 B = 22 MB for SmolLM2, 4096 x 11008 x 4 B = 180 MB for Llama-2-7B).
_CHUNK = 4096


@torch.no_grad()
def expert_hidden(x: torch.Tensor, gate_up: torch.Tensor, act_fn) -> torch.Tensor:
    """Every expert's hidden activations act(gate x) * (up x): x [c, D], gate_up [E, 2m, D]
    -> [c, E, m] fp32, as one matmul over all experts' rows."""
    num, two_m, dim = gate_up.shape
    m = two_m // 2
    proj = (x.float() @ gate_up.float().reshape(num * two_m, dim).t()).view(-1, num, two_m)
    return act_fn(proj[..., :m]) * proj[..., m:]


@torch.no_grad()
def expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn) -> torch.Tensor:
    """Every expert's output E_e(x_t), gate 1: x [c, D], gate_up [E, 2m, D], down [E, D, m]
    -> [c, E, D] fp32."""
    h = expert_hidden(x, gate_up, act_fn)
    return torch.einsum("cem,edm->ced", h, down.float())


def down_grams(down: torch.Tensor) -> torch.Tensor:
    """W_e^T W_e for every expert's down projection: [E, D, m] -> [E, m, m] fp32."""
    d = down.float()
    return d.transpose(1, 2) @ d


@torch.no_grad()
def norms_from_hidden(h: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """||W_e h_e|| = sqrt(h_e^T (W_e^T W_e) h_e) for h [c, E, m] -> [c, E]: m x m work per
    expert and token instead of the D x m of computing the output (6x less for SmolLM2)."""
    by_expert = h.transpose(0, 1)  # [E, c, m]
    quad = (torch.bmm(by_expert, grams) * by_expert).sum(-1)  # [E, c]
    return quad.clamp_min_(0.0).sqrt_().t()


def hidden_chunks(x: torch.Tensor, gate_up: torch.Tensor, act_fn):
    """`expert_hidden` of x chunk by chunk (an even number of rows each): yields [c, E, m]."""
    for start in range(0, x.shape[0], _CHUNK):
        yield expert_hidden(x[start : start + _CHUNK], gate_up, act_fn)


@torch.no_grad()
def expert_output_norms(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn) -> torch.Tensor:
    """||E_e(x_t)|| for every token and expert -> [T, E] fp32, chunked over tokens."""
    grams = down_grams(down)
    return torch.cat([norms_from_hidden(h, grams) for h in hidden_chunks(x, gate_up, act_fn)])


def standardize_rows(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance within each row (token)."""
    centered = values - values.mean(-1, keepdim=True)
    return centered / (centered.pow(2).mean(-1, keepdim=True).sqrt() + eps)


@torch.no_grad()
def fit_linear_router(
    x: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of targets [T, E] on x [T, D]: returns W [E, D] and intercept [E] with
    targets ~ x W^T + intercept. `ridge` is relative to the mean diagonal of the Gram matrix."""
    x = x.double()
    t = targets.double()
    x_mean, t_mean = x.mean(0), t.mean(0)
    # Products in fp64, not fp32: fp32 accumulation made the router a chaotic function of 1-ulp
    # changes in its inputs (a batched and a one-call carve differed by 2e-5 in its weights, 20x
    # more than in fp64), for 2 s of a 130 s SmolLM2 carve.
    xc, tc = x - x_mean, t - t_mean
    gram = _gram(xc)  # [D, D]
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(lam)
    weight = torch.linalg.solve(gram, xc.t() @ tc).t()  # [E, D]
    intercept = t_mean - weight @ x_mean
    return weight.float(), intercept.float()


def _gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """x^T x [D, D], multiplying only the column blocks on and below the diagonal and mirroring
    the rest (a matmul cannot exploit the symmetry itself): 3/4 of the whole product's time for
    SmolLM2's fp64 [16k, 576], and the same numbers to the bit there."""
    dim = x.shape[1]
    step = -(-dim // blocks)
    gram = torch.empty(dim, dim, dtype=x.dtype, device=x.device)
    for start in range(0, dim, step):
        end = min(start + step, dim)
        part = x[:, start:end].t() @ x[:, :end]
        gram[start:end, :end] = part
        gram[:start, start:end] = part[:, :start].t()
    return gram


def oracle_agreement(predicted: torch.Tensor, norms: torch.Tensor, k: int) -> float:
    """Fraction of the oracle's top-k experts (by output norm) that the router also picks."""
    pick = torch.topk(predicted, k, dim=-1).indices
    best = torch.topk(norms, k, dim=-1).indices
    hits = (pick[:, :, None] == best[:, None, :]).any(-1).float()
    return hits.mean().item()
