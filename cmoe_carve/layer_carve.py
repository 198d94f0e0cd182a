"""Carving one gated MLP from its calibration inputs: profile, group neurons into experts, build
the carved FFN, fit its router (and compensation), refit its down projections under the
held-out guard, and gather what the carve report says about it."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .budget import balance_bias
from .build import build_carved_mlp
from .grouping import group_neurons
from .layer_fit import (
    BUDGET_TOKENS,
    ERROR_TOKENS,
    FIT_TOKENS,
    budget_cost,
    fit_compensation,
    fit_router,
    held_out_rows,
    routing_stats,
    selection_scores,
    shared_hidden,
)
from .kept_scores import (
    all_scores,
    dense_output,
    expert_major,
    expert_scores,
    output_from_scores,
)
from .modeling_cmoe import CarvedMLP
from .profiling import profile_layer
from .refit import CHUNK as REFIT_CHUNK, RIDGE_CHOICES, refit_down

log = logging.getLogger(__name__)

# Twice the default calibration (8 x 2,048): the default carve profiles every token.
PROFILE_TOKENS = 32768


def _blend(stream: torch.Tensor, ffn: torch.Tensor | None, mix: float) -> torch.Tensor:
    """The refit's target: `mix` of the stream goal, the rest the dense FFN's output."""
    return stream if mix >= 1 else stream.mul_(mix).add_(ffn, alpha=1 - mix)


def carve_mlp(dense: nn.Module, x: torch.Tensor, config, act_name: str, name: str, facts: dict,
              residual: torch.Tensor, stream_goal=None, free_dense: bool = False,
              outputs: list | None = None) -> CarvedMLP:
    """The carved FFN of `dense` for its inputs x [N, D] (all calibration tokens of the layer).

    residual [N, D]: the stream entering the layer (adaptive budgets weigh errors by it);
    stream_goal(idx): the refit's targets for rows idx when fitting to the dense model's own
    stream (None: the dense FFN's output). What the report needs goes into `facts`.
    free_dense: drop the dense weights once the carved copy exists (a streamed layer's own).
    outputs: where given, the carved FFN's output on x [N, D] fp32 is appended to it when the
    kept scores can make it (cheaper than running the FFN again; nothing appended otherwise).
    """
    by_contribution = config.grouping == "contribution"
    down_norms = dense.down_proj.weight.float().norm(dim=0) if by_contribution else None
    # Markers of at most PROFILE_TOKENS evenly spaced tokens: 128 windows of 2,048 would give a
    # [262k, d_h] marker matrix and k-means features 4x its size.
    every = -(-x.shape[0] // PROFILE_TOKENS)
    profiled = x[::every]
    # Every neuron's act(W_gate x) * (W_up x) on every token, once, where it fits: the profile,
    # the dense FFN's outputs on the fit and held-out rows and the experts' activations for the
    # fits all read it instead of recomputing it (a fifth of the carve time on SmolLM2).
    scores = all_scores(dense, x)
    raw_profile = by_contribution or not config.cosine_scores
    prof = profile_layer(
        profiled, dense.gate_proj.weight, dense.up_proj.weight, dense.act_fn,
        config.k_act, config.cosine_scores, down_norms,
        scores=scores[::every] if scores is not None and raw_profile else None,
    )
    if by_contribution:
        signals, importance = prof.contributions, prof.mean_abs
    else:
        signals, importance = prof.markers, prof.rates
    groups = group_neurons(
        signals, importance, config.layout.num_shared, config.layout.num_experts,
        config.max_iter, normalize=by_contribution, warm_steps=config.warm_steps,
        tol=config.kmeans_tol,
    )
    prof.contributions = None  # [N, d_h]: free it before the next layer
    rows = held_out_rows(x.shape[0], ERROR_TOKENS)
    fit = torch.ones(x.shape[0], dtype=torch.bool)
    fit[rows] = False  # measured on tokens the fits did not see
    fit_rows = torch.nonzero(fit).squeeze(1).to(x.device)
    fit_rows = fit_rows[:: max(1, fit_rows.numel() // FIT_TOKENS)]
    held = rows.to(x.device)
    x_fit, x_held = x[fit_rows], x[held]
    # The dense FFN's outputs that the fits and the report compare with, made before the dense
    # weights can go (streaming frees them once the carved copy exists).
    dense_held = dense_output(dense, x_held, scores, held)
    mix = config.stream_mix if stream_goal is not None else 0.0
    dense_fit = (dense_output(dense, x_fit, scores, fit_rows)
                 if config.refit and mix < 1 else None)
    if scores is not None:  # from here on read expert by expert
        scores = expert_major(scores, groups.experts)
    num_experts = groups.experts.shape[0]
    carved = build_carved_mlp(
        dense, groups, config.layout.num_shared, config.layout.top_k, act_name,
        config.cosine_scores,
    )
    if free_dense:
        dense.to("meta")
    # Every expert's hidden activations on the fit tokens, once for the fits below (None: too
    # large to keep; each fit then computes its own).
    needs = config.router == "fitted" or config.compensate or config.refit
    hidden = None
    if needs and scores is not None:
        hidden = expert_scores(scores, fit_rows, num_experts, REFIT_CHUNK)
    elif needs:
        hidden = shared_hidden(carved, x_fit, REFIT_CHUNK)
    # With held_out_fits, the held-out tokens fit the router and join the final refit too.
    hidden_held = None
    if needs and config.held_out_fits:
        hidden_held = (expert_scores(scores, held, num_experts, REFIT_CHUNK) if scores is not None
                       else shared_hidden(carved, x_held, REFIT_CHUNK))
    if config.router == "fitted":
        if hidden_held is not None:  # every calibration token: 30.45 -> 30.19 at S3A3E8
            fit_router(carved, torch.cat([x_fit, x_held]), config.ridge, hidden + hidden_held)
        else:
            fit_router(carved, x_fit, config.ridge, hidden)
    if config.balance:
        sample = x[:: max(1, x.shape[0] // 4096)]
        carved.router.bias.copy_(
            balance_bias(selection_scores(carved, sample), carved.top_k)
        )
    if config.compensate:
        # Every other fit row: half the tokens give the same means within noise.
        # Chunks hold an even number of rows, so slicing each keeps global order
        # without concatenating the kept activations into one more copy.
        s = carved.num_shared
        kept = [h[::2, s:] for h in hidden] if hidden is not None else None
        fit_compensation(carved, x_fit[::2], kept)
    if config.refit:
        if stream_goal is None:
            target, t_held = dense_fit, dense_held
        else:
            # Half each on SmolLM2: S2A2E16 80.85 -> 76.66, S3A3E8 30.31 -> 30.06 (the stream
            # alone asks the FFN to undo all of attention's drift too, which it can only partly).
            target = _blend(stream_goal(fit_rows), dense_fit, mix)
            t_held = _blend(stream_goal(held), dense_held, mix)
        # Each held-out token's error relative to the stream it joins: the next norm divides
        # by that stream's size, and the raw sum of squares would be ruled by the few tokens
        # with outsized activations (every window's first).
        weight = 1.0 / residual[held].float().pow(2).sum(1, keepdim=True).clamp_min(1e-30)

        held_scores = scores[held] if scores is not None else None

        def held_error() -> float:
            y = (carved(x_held).float() if held_scores is None
                 else output_from_scores(carved, x_held, held_scores))
            return ((y - t_held).pow(2) * weight).sum().item()

        # Held-out tokens decide (the guard): they include every window's first token (rows
        # 0 mod 8), whose outsized activations the fit rows never contain. On SmolLM2 at
        # S3A3E8 an unguarded refit took perplexity from 36 to 339. With the ridge on auto they
        # also choose it, among RIDGE_CHOICES, per layer.
        ridges = RIDGE_CHOICES if config.refit_ridge is None else (config.refit_ridge,)
        # Once they have chosen the ridge, the held-out tokens join the fit for one more solve:
        # on SmolLM2 (stream targets) 84.22 -> 81.28 at S2A2E16, 30.67 -> 30.45 at S3A3E8.
        extra = (x_held, t_held, hidden_held) if config.held_out_fits else None
        _, ridge = refit_down(carved, x_fit, target, ridges, score=held_error, hidden=hidden,
                              extra=extra)
        if ridge is None:
            log.info("%s: no refit lowered the held-out error: kept the slices", name)
        facts["refit_kept"] = ridge is not None
        facts["refit_ridge"] = ridge
    del hidden
    if config.adaptive:
        every = max(1, rows.numel() // BUDGET_TOKENS)  # a subset of the held-out rows
        few = rows[::every].to(x.device)
        facts["cost"] = budget_cost(carved, x[few], dense_held[::every], residual[few])
    held_out = (output_from_scores(carved, x_held, scores[held])
                if scores is not None else None)
    facts.update(prof=prof, groups=groups,
                 stats=routing_stats(carved, x, rows, dense_held, held_out, hidden_held))
    if outputs is not None and scores is not None:
        outputs.append(output_from_scores(carved, x, scores))
    return carved
