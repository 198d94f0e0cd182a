"""The grouping path before the transport solver (commit 264ea47), kept as the benchmark's
baseline: dense fp32 features, scipy's LSA on the n x n matrix that repeats each cluster's
column m times for the first balanced pass, then negative-cycle cancelling from the previous
labels (LSA again when that runs past n cancellations).

Only the parts that changed are restated here; the rest is imported from the library.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cmoe_carve.grouping import (
    Clustering,
    ExpertLayout,
    _negative_cycle,
    cluster_means,
    lloyd_centroids,
    representatives,
    select_shared,
    squared_distances,
)


def lsa_assign(cost: torch.Tensor) -> torch.Tensor:
    n, k = cost.shape
    size = n // k
    square = np.repeat(cost.cpu().numpy().astype(np.float64), size, axis=1)  # [n, n]
    rows, cols = linear_sum_assignment(square)
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = cols // size
    return torch.from_numpy(labels)


def refine_or_none(cost: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    c = cost.cpu().numpy().astype(np.float64)
    n, k = c.shape
    size = n // k
    lab = labels.cpu().numpy().copy()
    tol = 1e-10 * max(float(np.abs(c).max()), 1.0)
    for _ in range(n):
        order = np.argsort(lab, kind="stable")
        sc = c[order]
        moves = (sc - sc[np.arange(n), lab[order]][:, None]).reshape(k, size, k)
        pick = moves.argmin(1)
        cheapest = np.take_along_axis(moves, pick[:, None, :], 1)[:, 0, :]
        cycle = _negative_cycle(cheapest, tol)
        if cycle is None:
            return torch.from_numpy(lab)
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            lab[order[a * size + pick[a, b]]] = b
    return None


def balanced_kmeans_lsa(features, init, max_iter=10, warm_steps=0, tol=0.0, on_cost=None):
    """`on_cost(cost, labels)` sees the first pass's cost matrix and LSA labels (untimed use)."""
    k = init.numel()
    norms = features.pow(2).sum(1)
    centroids = lloyd_centroids(features, features[init], norms, warm_steps)
    labels = None
    for iteration in range(1, max_iter + 1):
        cost = squared_distances(features, centroids, norms)
        new = None if labels is None else refine_or_none(cost, labels)
        if new is None:
            new = lsa_assign(cost)
            if labels is None and on_cost is not None:
                on_cost(cost, new)
        converged = labels is not None and (new != labels).float().mean().item() <= tol
        labels = new
        centroids = cluster_means(features, labels, k)
        if converged:
            return Clustering(labels, centroids, iteration, True)
    return Clustering(labels, centroids, max_iter, False)


def group_neurons_lsa(signals, importance, num_shared, num_experts, max_iter=10, warm_steps=0,
                      on_cost=None) -> ExpertLayout:
    d_h = importance.numel()
    m = -(-d_h // num_experts)
    pad = m * num_experts - d_h
    shared = select_shared(importance, num_shared * m)
    is_shared = torch.zeros(d_h + pad, dtype=torch.bool)
    is_shared[shared] = True
    routed = torch.nonzero(~is_shared).squeeze(1)
    real = routed < d_h
    by_token = signals[:, routed.clamp(max=d_h - 1)].float()  # [N, n]
    if pad:
        by_token[:, ~real] = 0.0
    features = by_token.t().contiguous()  # [n, N]
    del by_token
    num_routed = num_experts - num_shared
    padded = torch.cat([importance.float(), torch.full((pad,), -1.0)])
    init = torch.sort(padded[routed], descending=True, stable=True).indices[:num_routed]
    clustering = balanced_kmeans_lsa(features, init, max_iter, warm_steps, on_cost=on_cost)
    reps = routed[representatives(features, clustering, eligible=real)]
    groups = [shared.view(num_shared, m)] if num_shared else []
    routed_groups = torch.stack(
        [torch.sort(routed[clustering.labels == j]).values for j in range(num_routed)]
    )
    experts = torch.cat(groups + [routed_groups]) if groups else routed_groups
    return ExpertLayout(experts, reps, clustering.iterations, clustering.converged)
