"""Closed-form refit of a carved layer's down projections once its routing is fixed.

The experts are exact slices of the dense FFN, but a token that uses only a few of them loses the
rest of the sum. With the routing fixed, the carved output is linear in the down projections:

    y_t = W f_t + B l_t,   f_t = [g_te * h_te for every expert e]  (0 for experts t does not use)
                           l_t = [1 if t leaves routed expert e out]   (the compensation's switch)

so the W (and compensation B) that best reproduce a target on the calibration tokens solve one
ridge regression: a [P + Nr, P + Nr] system for P = E * m neurons (1,536 + 14 for SmolLM2), the
ridge pulling toward the carved weights, so experts few tokens use stay close to their slices.
Only weights change: every runtime (and every export) carries the refit exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .router_fit import expert_hidden


@dataclass
class RefitStats:
    """Running sums of a least-squares problem y ~ W f over token chunks (fp64).

    gram [F, F] = sum f f^T, cross [F, D] = sum f y^T, count tokens; F = features, D = outputs.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, num_features: int, out_dim: int, device=None) -> "RefitStats":
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(num_features, num_features, **z), torch.zeros(num_features, out_dim, **z))

    def add(self, features: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor | None = None,
            block: int = 0) -> None:
        """features [c, F], targets [c, D]: products in fp32 (the chunk's own error is far below
        the ridge), sums in fp64 (16k tokens of sums would lose digits in fp32).

        ids [c, K] with block m: the features are E blocks of m, and token t's are zero outside
        the blocks ids[t] names (the experts it uses; features not a whole number of blocks
        take the dense path). Each block's rows of the Gram then come from the tokens that use
        it alone: at S2A2E16 a token uses 4 of 16 experts, a quarter of the products of the
        dense f^T f. Only the blocks left of and on the diagonal are multiplied, the rest
        mirrored from them (the Gram is symmetric): the shared experts come first, so their
        all-token blocks are the narrow ones (SmolLM2 at S2A2E16: a third of the products again)."""
        f = features.float()
        y = targets.float()
        if ids is None or not block or f.shape[1] % block:
            self.gram += (f.t() @ f).double()
            self.cross += (f.t() @ y).double()
            self.count += features.shape[0]
            return
        num_blocks = f.shape[1] // block
        uses = torch.zeros(f.shape[0], num_blocks, dtype=torch.bool, device=f.device)
        uses.scatter_(1, ids, True)
        for e in range(num_blocks):
            start, end = e * block, (e + 1) * block
            rows = uses[:, e]
            if bool(rows.all()):
                fe, yr = f[:, :end], y
            else:
                where = rows.nonzero().squeeze(1)
                if where.numel() == 0:
                    continue
                fe, yr = f[:, :end].index_select(0, where), y.index_select(0, where)
            fr = fe[:, start:]
            part = (fr.t() @ fe).double()  # [block, end]: up to and with the diagonal block
            self.gram[start:end, :end] += part
            self.gram[:start, start:end] += part[:, :start].t()
            self.cross[start:end] += (fr.t() @ yr).double()
        self.count += features.shape[0]


def routed_features(hidden: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, num_shared: int,
                    with_switches: bool) -> torch.Tensor:
    """The refit's features for one chunk.

    hidden [c, E, m] (every expert's act(gate x) * up x), ids [c, S+k] (the experts each token
    uses, shared first), gates [c, S+k] -> [c, E*m] (+ [c, Nr] compensation switches: 1 where a
    routed expert is left out).
    """
    c, num_experts, m = hidden.shape
    weight = torch.zeros(c, num_experts, dtype=hidden.dtype, device=hidden.device)
    weight.scatter_(1, ids, gates.to(hidden.dtype))  # [c, E]: a token's gate for each expert used
    feats = (hidden * weight[..., None]).reshape(c, num_experts * m)
    if not with_switches:
        return feats
    left_out = (weight[:, num_shared:] == 0).to(hidden.dtype)  # [c, Nr]
    return torch.cat([feats, left_out], dim=1)


def solve_refit(stats: RefitStats, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge solution W* [F, D] of min ||f W - y||^2 + sum_i lam_i ||W_i - prior_i||^2.

    The ridge of feature i is `ridge` times its own energy, gram[i, i], plus a floor of `ridge`
    times the mean energy, so the fit does not depend on how features are scaled (hidden
    activations and 0/1 switches differ by orders of magnitude) and a feature no token uses
    keeps its prior exactly.
    """
    return RidgeSystem.of(stats, prior).solve(ridge)


# The smallest ridge solved in fp32 (RIDGE_CHOICES start at 0.01).
FP32_RIDGE = 1e-3


@dataclass
class RidgeSystem:
    """The normal equations of `solve_refit` scaled by s_i = sqrt(gram[i, i] + mean energy),
    built once for all the ridges a layer tries: (G / s s^T + ridge I) z = c / s + ridge s prior,
    W = z / s. Scaled, the matrix has a unit-bounded diagonal and eigenvalues of at least the
    ridge (>= 0.01 relative), so its Cholesky factor in fp32 loses about 1e-3 of W at worst, far
    below the fit's own error, at twice the fp64 speed (4 ridges x 30 layers: 13 s of SmolLM2's
    carve in fp64)."""

    scaled: torch.Tensor  # [F, F] fp32: gram / s s^T
    cross: torch.Tensor  # [F, D] fp32: cross / s
    prior: torch.Tensor  # [F, D] fp32: prior * s
    scale: torch.Tensor  # [F] fp64: s

    @classmethod
    def of(cls, stats: RefitStats, prior: torch.Tensor) -> "RidgeSystem":
        diag = stats.gram.diagonal()
        scale = (diag + diag.mean().clamp_min(1e-30)).sqrt()
        scaled = (stats.gram / scale[:, None] / scale[None, :]).float()
        return cls(scaled, (stats.cross / scale[:, None]).float(),
                   (prior.double() * scale[:, None]).float(), scale)

    def solve(self, ridge: float) -> torch.Tensor:
        # Below FP32_RIDGE the conditioning bound no longer holds: fp64 there.
        dtype = torch.float32 if ridge >= FP32_RIDGE else torch.float64
        matrix = self.scaled.to(dtype, copy=True)
        matrix.diagonal().add_(ridge)
        rhs = self.cross.to(dtype) + ridge * self.prior.to(dtype)
        chol, info = torch.linalg.cholesky_ex(matrix)
        if info.item() == 0:
            z = torch.cholesky_solve(rhs, chol)
        else:  # semi-definite in floating point: rare
            z = torch.linalg.lstsq(matrix.double(), rhs.double()).solution
        return (z.double() / self.scale[:, None]).float()


def solve_refit_dual(features: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor,
                     ridge: float) -> torch.Tensor:
    """The same ridge solution as `solve_refit`, through the N x N system of the tokens: for
    fewer tokens N than features F (a Llama-3-8B layer has F = 14,336; a carve on 2 x 512 tokens
    fits on ~800), where the F x F Gram would take 1.6 GB in fp64 and an O(F^3) factorisation.

    With W = prior + Delta and residual R = Y - H prior, Delta = L^-1 H^T (H L^-1 H^T + I)^-1 R
    (the push-through identity), L = diag(lam_i) as in `solve_refit`.
    features [N, F], targets [N, D], prior [F, D] -> W* [F, D] (fp32).
    """
    h = features.float()
    energy = h.pow(2).sum(0, dtype=torch.float64)  # gram[i, i] without forming the gram
    lam = ridge * (energy + energy.mean().clamp_min(1e-30))
    scaled = h / lam.sqrt().float()
    kernel = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    for start in range(0, h.shape[1], CHUNK):  # fp32 products, fp64 sums, as RefitStats.add
        block = scaled[:, start : start + CHUNK]
        kernel += (block @ block.t()).double()
    residual = targets.double() - (h @ prior.float()).double()
    chol, info = torch.linalg.cholesky_ex(kernel)  # I + PSD: positive definite
    alpha = torch.cholesky_solve(residual, chol) if info.item() == 0 else torch.linalg.solve(kernel, residual)
    delta = (h.t() @ alpha.float()).div_(lam.float()[:, None])
    return delta.add_(prior.float())


# Tokens per chunk of the refit's features ([c, E*m] fp32: 2,048 x 1,536 x 4 B = 12.6 MB).
CHUNK = 2048


# The ridges `refit_down` tries when asked to choose one per layer (a held-out score decides):
# on SmolLM2 the best single ridge was 0.01 at S2A2E16 and 0.1 at S3A3E8, so one value cannot
# suit every sparsity; each extra ridge is one more [F, F] Cholesky and solve (0.06 s at
# F = 1,550). 1.0 was never chosen in any layer at S2A2E16 or S3A3E8.
RIDGE_CHOICES = (0.01, 0.03, 0.1, 0.3)


@torch.no_grad()
def refit_down(carved, x: torch.Tensor, target: torch.Tensor, ridge,
               prior: torch.Tensor | None = None, fit_compensation: bool = False,
               score=None, hidden=None, extra=None):
    """Least-squares down projections for the routing as it is now: x [T, D] FFN inputs,
    target [T, D] what the FFN should output for them. The ridge pulls toward `prior` [F, D]
    (default: the current weights). Returns (prior, ridge used). hidden: every expert's hidden
    activations on x in chunks of CHUNK rows, when the caller has them (else computed here).

    `ridge` is one value or several (several need `score`). With `score()` (lower is better,
    e.g. the error on held-out tokens), it is measured before any solve and after each, and the
    best of the solutions and the weights as they came stays (ridge None: those won), so one
    ridge with a score is a guarded refit.

    extra (x, target, hidden) of more rows (e.g. the held-out ones `score` measures): once a
    ridge has won, they join the sums for one last solve at that ridge, as if refitted with
    the fit rows at that ridge alone. Not used on the dual path or with fitted switches, nor when
    the weights as they came won.

    A carved FFN with compensation keeps its left-out biases as fixed offsets (subtracted from
    the targets), unless `fit_compensation` fits them jointly as the switches' weights. Joint
    fitting lowers the error on the calibration tokens but generalises badly: on SmolLM2 at
    S2A2E16 its held-out error at layer 11 rose from 0.02 to 0.90, and perplexity (8 WikiText-2
    windows) went from 116 to 32,984.
    """
    ridges = (ridge,) if isinstance(ridge, (int, float)) else tuple(sorted(ridge))
    if len(ridges) > 1 and score is None:
        raise ValueError("several ridges need a score to choose between them")
    num_experts, dim, m = carved.down_proj.shape
    switches = carved.compensate and fit_compensation
    num_features = num_experts * m + (carved.num_routed if switches else 0)
    # Fewer tokens than features: keep the features and solve in the tokens' space instead.
    dual = x.shape[0] < num_features
    stats = None if dual else RefitStats.empty(num_features, dim, device=x.device)
    kept_feats, kept_goals = [], []
    for i, start in enumerate(range(0, x.shape[0], CHUNK)):
        feats, goal, ids = _chunk_rows(carved, x, target, hidden, i, start, switches)
        if dual:
            kept_feats.append(feats.float())
            kept_goals.append(goal.float())
        else:
            stats.add(feats, goal, None if switches else ids, m)
    if prior is None:
        prior = down_rows(carved)
        if switches:
            prior = torch.cat([prior, carved.expert_bias.float()])
    if dual:
        feats_all, goals_all = torch.cat(kept_feats), torch.cat(kept_goals)
        del kept_feats, kept_goals
        solve = lambda lam: solve_refit_dual(feats_all, goals_all, prior, lam)  # noqa: E731
    else:
        solve = RidgeSystem.of(stats, prior).solve

    def install(solution):
        set_down_rows(carved, solution[: num_experts * m])
        if switches:
            carved.expert_bias.copy_(solution[num_experts * m :].to(carved.expert_bias))

    if score is None:  # one ridge, nothing to compare with
        install(solve(ridges[0]))
        return prior, ridges[0]
    entry = down_rows(carved)  # what `score()` first measures (the prior unless one was given)
    if switches:
        entry = torch.cat([entry, carved.expert_bias.float()])
    best, best_score = None, score()  # None: the weights as they came
    solution = entry

    def evaluate(index: int) -> float:
        nonlocal best, best_score, solution
        candidate = solve(ridges[index])
        install(candidate)
        value = score()
        if value < best_score:
            best, best_score, solution = ridges[index], value, candidate
        return value

    walk_ridges(len(ridges), evaluate)
    if best is not None and extra is not None and not dual and not switches:
        # The ridge chosen, the held-out tokens join the fit for the final solve.
        x_more, t_more, h_more = extra
        for i, start in enumerate(range(0, x_more.shape[0], CHUNK)):
            feats, goal, ids = _chunk_rows(carved, x_more, t_more, h_more, i, start, False)
            stats.add(feats, goal, ids, m)
        solution = RidgeSystem.of(stats, prior).solve(best)
    install(solution)
    return prior, best


def _chunk_rows(carved, x, target, hidden, i, start, switches):
    """The refit's features, targets and expert ids for chunk i (rows start..start+CHUNK)."""
    xs = x[start : start + CHUNK]
    ids, gates, _ = carved.route(xs)
    h = hidden[i] if hidden is not None else expert_hidden(xs, carved.gate_up_proj, carved.act_fn)
    feats = routed_features(h, ids, gates, carved.num_shared, switches)
    goal = target[start : start + CHUNK]
    if carved.compensate and not switches:
        top = ids[:, carved.num_shared :] - carved.num_shared  # [c, k] routed experts used
        bias = carved.expert_bias.float()
        goal = goal - (bias.sum(0) - bias[top].sum(1))  # the compensation it will add
    return feats, goal, ids


def walk_ridges(count: int, evaluate) -> None:
    """Search a sorted grid of `count` ridges for the lowest `evaluate(index)`, assuming the
    held-out error falls then rises along it: start at RIDGE_START and its upper neighbour,
    then walk toward the better side while the error keeps falling. On SmolLM2 the error was
    unimodal in every layer, and this scores 3 of the 4 ridges (a solve and a held-out
    forward each) where trying all would score 4."""
    if count <= 2:
        for index in range(count):
            evaluate(index)
        return
    low = min(RIDGE_START, count - 2)
    here, above = evaluate(low), evaluate(low + 1)
    if above < here:
        index, step, last = low + 1, 1, above
    else:
        index, step, last = low, -1, here
    while 0 <= index + step < count:
        value = evaluate(index + step)
        if value >= last:
            return
        index, last = index + step, value


# Where `walk_ridges` starts: 0.03, the ridge most SmolLM2 layers chose (19 of 30 at S2A2E16).
RIDGE_START = 1


def down_rows(carved) -> torch.Tensor:
    """A copy of the down projections as the refit's rows: [E, D, m] -> [E*m, D] fp32."""
    num_experts, dim, m = carved.down_proj.shape
    rows = carved.down_proj.float().permute(1, 0, 2).reshape(dim, num_experts * m).t()
    if rows.data_ptr() == carved.down_proj.data_ptr():  # one expert: a view, not a copy
        rows = rows.clone()
    return rows


def set_down_rows(carved, rows: torch.Tensor) -> None:
    """The inverse of `down_rows`: [E*m, D] rows written back as the [E, D, m] down projections."""
    num_experts, dim, m = carved.down_proj.shape
    carved.down_proj.copy_(rows.t().reshape(dim, num_experts, m).permute(1, 0, 2).to(carved.down_proj))
    carved.drop_caches()

