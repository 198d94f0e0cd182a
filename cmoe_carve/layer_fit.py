"""What the carve fits and measures on one layer once its experts are cut: the fitted router, the
compensation of left-out experts, the per-layer error curves of adaptive budgets, and the routing
statistics of the carve report. Each takes a CarvedMLP and the layer's FFN inputs."""

from __future__ import annotations

import torch

from .budget import error_by_active_experts
from .modeling_cmoe import CarvedMLP
from .router_fit import (
    down_grams,
    expert_hidden,
    expert_outputs,
    fit_linear_router,
    hidden_chunks,
    norms_from_hidden,
    oracle_agreement,
    standardize_rows,
)


def held_out_rows(num_tokens: int, limit: int) -> torch.Tensor:
    """Evenly spaced token rows (at most `limit`, at most a quarter of all) held out from the
    router fit, for measuring reconstruction error and oracle agreement."""
    limit = max(1, min(limit, num_tokens // 4))
    step = max(1, num_tokens // limit)
    return torch.arange(0, num_tokens, step)[:limit]


@torch.no_grad()
def routing_stats(carved: CarvedMLP, x: torch.Tensor, rows: torch.Tensor, ref: torch.Tensor,
                  out: torch.Tensor | None = None, hidden=None):
    """Expert load (fraction of tokens per routed expert), relative reconstruction error and
    agreement with the norm-oracle on the held-out rows; ref [rows, D]: the dense FFN's output
    there, out: the carved one's when the caller has it, hidden: every expert's hidden
    activations there in chunks ([c, E, m] each), when the caller has them."""
    _, _, top = carved.route(x)
    counts = torch.bincount(top.reshape(-1).cpu(), minlength=carved.num_routed).double()
    xs = x[rows.to(x.device)]
    ref = ref.float()
    out = carved(xs).float() if out is None else out.float()
    err = (out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)
    norms = _routed_norms(carved, xs, hidden)
    agree = oracle_agreement(carved.router.logits(xs), norms, carved.top_k)
    return (counts / x.shape[0]).tolist(), err.item(), agree


def _routed_norms(carved: CarvedMLP, x: torch.Tensor, hidden=None) -> torch.Tensor:
    """Every routed expert's output norm on x [c, D] -> [c, Nr], through its down projection as
    it is now; hidden: every expert's hidden activations on x in chunks ([c, E, m] each), when
    the caller has them (else computed chunk by chunk)."""
    s = carved.num_shared
    grams = down_grams(carved.down_proj[s:])
    chunks = (h[:, s:] for h in hidden) if hidden is not None else _routed_hidden(carved, x)
    return torch.cat([norms_from_hidden(h, grams) for h in chunks])


def _routed_hidden(carved: CarvedMLP, x: torch.Tensor):
    """Every routed expert's hidden activations, chunk by chunk: yields [c, Nr, m] fp32."""
    return hidden_chunks(x, carved.gate_up_proj[carved.num_shared :], carved.act_fn)


# Expert hidden activations up to this size are computed once and shared by the router fit, the
# compensation and the refit, which all need them on the fit tokens (14,336 x 16 x 96 x 4 B =
# 88 MB for SmolLM2); larger ones are recomputed by each.
_KEEP_HIDDEN_BYTES = 512 * 2**20


@torch.no_grad()
def shared_hidden(carved: CarvedMLP, x: torch.Tensor, chunk: int):
    """Every expert's hidden activations on x in chunks of `chunk` rows ([c, E, m] fp32 each),
    or None when they would take more than _KEEP_HIDDEN_BYTES."""
    num_experts, two_m, _ = carved.gate_up_proj.shape
    if x.shape[0] * num_experts * (two_m // 2) * 4 > _KEEP_HIDDEN_BYTES:
        return None
    return [expert_hidden(x[i : i + chunk], carved.gate_up_proj, carved.act_fn)
            for i in range(0, x.shape[0], chunk)]


@torch.no_grad()
def fit_router(carved: CarvedMLP, x: torch.Tensor, ridge: float, hidden=None) -> None:
    """Replace the representative-neuron router by one regressed on expert output norms.
    hidden: `shared_hidden` of x, when there (else computed chunk by chunk)."""
    norms = _routed_norms(carved, x, hidden)
    weight, intercept = fit_linear_router(x, standardize_rows(norms), ridge)
    router = carved.router
    router.kind = "linear"
    router.gate_weight.copy_(weight)
    router.up_weight.zero_()  # unused by a linear router
    router.logit_bias.copy_(intercept)


@torch.no_grad()
def fit_compensation(carved: CarvedMLP, x: torch.Tensor, hidden=None) -> None:
    """expert_bias[e] = mean output of routed expert e over the tokens that do not select it.

    The output is linear in the hidden activations, so the mean of outputs is W_down applied to
    the mean hidden activation: no per-token [D] outputs are formed.
    """
    s = carved.num_shared
    _, _, top = carved.route(x)
    sums = torch.zeros(carved.num_routed, carved.down_proj.shape[-1], dtype=torch.float64)
    counts = torch.zeros(carved.num_routed, dtype=torch.float64)
    start = 0
    for h in hidden or _routed_hidden(carved, x):
        left_out = torch.ones(h.shape[:2])
        left_out.scatter_(1, top[start : start + h.shape[0]].cpu(), 0.0)  # [c, Nr]
        sums += torch.einsum("ce,cem->em", left_out, h.cpu()).double()
        counts += left_out.sum(0).double()
        start += h.shape[0]
    means = (sums / counts.clamp_min(1)[:, None]).float()  # [Nr, m]
    bias = torch.einsum("edm,em->ed", carved.down_proj[s:].float(), means.to(carved.down_proj.device))
    carved.expert_bias.copy_(bias.to(carved.expert_bias.dtype))
    carved.compensate = True


# Tokens the router is fitted on (evenly spaced): a D x D ridge problem (576 for SmolLM2) is
# well determined by 8,192 samples, and every routed expert's output must be computed for each.
FIT_TOKENS = 8192

# Held-out tokens for the per-layer error curves of adaptive budgets: every expert's output is
# kept for them ([512, E, D] fp32 = 19 MB for SmolLM2).
BUDGET_TOKENS = 512


@torch.no_grad()
def selection_scores(carved: CarvedMLP, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(carved.router.logits(x), dim=-1)  # [T, Nr]


@torch.no_grad()
def budget_cost(carved: CarvedMLP, x: torch.Tensor, ref: torch.Tensor, residual: torch.Tensor):
    """Error of this layer's carved FFN for k = 0..Nr active routed experts, relative to the
    energy of the residual stream it is added to -> [Nr + 1]; ref: the dense FFN's output on x."""
    outs = expert_outputs(x, carved.gate_up_proj, carved.down_proj, carved.act_fn)  # [T, E, D]
    s = carved.num_shared
    order = selection_scores(carved, x) + carved.router.bias.float()
    err = error_by_active_experts(order, outs[:, s:], outs[:, :s].sum(1), ref.float())
    return err / residual.double().pow(2).sum().clamp_min(1e-30)


# Tokens used to measure each layer's reconstruction error: enough for a stable ratio, and a
# dense FFN on 2,048 tokens costs SmolLM2 about 0.1 s per layer.
ERROR_TOKENS = 2048
