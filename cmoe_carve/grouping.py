"""Grouping neurons into experts: shared by activation rate, routed by balanced clustering.

Pure tensor functions: no model, no I/O. Neuron features are columns of the marker matrix (one
value per calibration token), so distances between neurons count the tokens they disagree on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .transport import balanced_transport


def select_shared(rates: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` neurons with the highest rate (ties by index), sorted ascending."""
    order = torch.sort(rates, descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def row_norms(features: torch.Tensor) -> torch.Tensor:
    """||f_i||^2 of every row of features [n, F] (dense, or sparse COO) -> [n] fp32."""
    if features.is_sparse:
        rows, values = features.indices()[0], features.values().float()
        return torch.zeros(features.shape[0]).index_add_(0, rows, values * values)
    return features.float().pow(2).sum(1)


def squared_distances(
    features: torch.Tensor, centroids: torch.Tensor, feature_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """||f_i - c_j||^2 for features [n, F] (dense, or sparse COO) and centroids [k, F] -> [n, k],
    in fp32.

    `feature_norms` ([n], ||f_i||^2) may be passed in: k-means reuses it on every pass.
    """
    if feature_norms is None:
        feature_norms = row_norms(features)
    c = centroids.float()
    dist = feature_norms[:, None] - 2.0 * _products(features, c) + c.pow(2).sum(1)[None, :]
    return dist.clamp_min_(0.0)


# Centroid counts this close below a multiple of 16 are padded with zero rows up to it.
_PAD_ROWS = 4


def _products(features: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """features @ c^T [n, k]. A dense product with k a few rows short of a multiple of 16 takes
    the CPU matmul's slow narrow-matrix path: on a 2-core AVX2 EPYC (torch 2.13), [1,344 x 16,384]
    by 14 centroids (SmolLM2 at S2A2E16) took 22 ms against 14 ms for the same product padded to
    16, the 14 real columns identical to the bit (12-15 and 28-31 centroids alike; 5-10 went
    slower or changed bits, so they stay as they are)."""
    k = c.shape[0]
    pad = -k % 16
    if features.is_sparse or k < 12 or pad == 0 or pad > _PAD_ROWS:
        return features @ c.t()
    padded = torch.cat([c, c.new_zeros(pad, c.shape[1])])
    return (features @ padded.t())[:, :k]


def balanced_assign(cost: torch.Tensor) -> torch.Tensor:
    """Assign n items to k clusters of exactly n/k items each, minimising the total cost.

    cost [n, k] -> labels [n], exactly optimal and deterministic (`transport.balanced_transport`:
    O(n k) memory, where the square n x n assignment problem would need O(n^2)).
    """
    labels, _ = balanced_transport(cost.cpu().numpy().astype(np.float64))
    return torch.from_numpy(labels)


def _negative_cycle(weight: np.ndarray, tol: float) -> list[int] | None:
    """A cycle of total weight below -tol in the complete digraph weight [k, k], or None.

    Bellman-Ford from a virtual source joined to every node: a relaxation still happening after
    k rounds means a negative cycle, found by walking the predecessors back.
    """
    k = weight.shape[0]
    dist = np.zeros(k)
    pred = np.full(k, -1)
    last = None
    for _ in range(k):
        cand = dist[:, None] + weight  # cand[u, v]: reach v through u
        via = cand.argmin(0)
        best = cand[via, np.arange(k)]
        better = best < dist - tol
        if not better.any():
            return None
        dist = np.where(better, best, dist)
        pred = np.where(better, via, pred)
        last = int(np.flatnonzero(better)[0])
    node = last
    for _ in range(k):  # k steps back from a node still relaxing lands on the cycle
        node = int(pred[node])
        if node < 0:
            return None
    cycle, cur = [node], int(pred[node])
    while cur != node:
        if cur < 0 or len(cycle) > k:
            return None
        cycle.append(cur)
        cur = int(pred[cur])
    cycle.reverse()  # predecessors point backwards: reversed, the list follows the edges
    total = sum(weight[a, b] for a, b in zip(cycle, cycle[1:] + cycle[:1]))
    return cycle if total < -tol else None


def refine_assignment(
    cost: torch.Tensor, labels: torch.Tensor, max_rounds: int | None = None
) -> torch.Tensor:
    """The optimal balanced assignment for `cost` [n, k], reached from the balanced `labels`
    by cancelling negative cycles, or solved afresh (`balanced_assign`) when that takes more
    than `max_rounds` cancellations (default n).

    A balanced assignment is optimal exactly when no cyclic exchange of items between clusters
    (item from cluster a to b, another from b to c, ..., back to a) lowers the total cost: the
    optimality condition of the transportation problem, so this also certifies an assignment
    (it comes back unchanged). k-means no longer uses it: one cycle per round is slow to follow
    the labels from pass to pass (d_h 14,336, S2A2E16: 2.3 s for the 3,256 labels that change
    on pass 2, 55 ms for 90 on pass 6, against 63 and 39 ms for the warm-started transport).
    """
    c = cost.cpu().numpy().astype(np.float64)
    n, k = c.shape
    size = n // k
    lab = labels.cpu().numpy().copy()
    if np.bincount(lab, minlength=k).tolist() != [size] * k:
        raise ValueError("refine_assignment needs a balanced assignment to start from")
    tol = 1e-10 * max(float(np.abs(c).max()), 1.0)
    for _ in range(max_rounds if max_rounds is not None else n):
        order = np.argsort(lab, kind="stable")  # members of cluster a at [a*size, (a+1)*size)
        sc = c[order]
        moves = (sc - sc[np.arange(n), lab[order]][:, None]).reshape(k, size, k)
        pick = moves.argmin(1)  # [a, b]: the member of a that is cheapest to move to b
        cheapest = np.take_along_axis(moves, pick[:, None, :], 1)[:, 0, :]
        cycle = _negative_cycle(cheapest, tol)
        if cycle is None:
            return torch.from_numpy(lab)
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            lab[order[a * size + pick[a, b]]] = b  # one item per cluster: all distinct
    return balanced_assign(cost)


@dataclass
class Clustering:
    labels: torch.Tensor  # [n] cluster of each item, each cluster holding exactly n/k items
    centroids: torch.Tensor  # [k, F] cluster means
    iterations: int  # assignment passes run
    converged: bool  # the last pass changed no label


def cluster_means(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of each cluster's rows of features [n, F] (dense, or sparse COO) -> [k, F] fp32."""
    if features.is_sparse:  # one accumulate per nonzero: ~36k for 4k tokens x 10 markers
        rows, cols = features.indices()
        sums = torch.zeros(k, features.shape[1])
        sums.index_put_((labels[rows], cols), features.values().float(), accumulate=True)
    else:
        # index_add_ over the n rows: 2-4x faster on CPU (torch 2.13) than the one-hot [k, n] @
        # [n, F] matmul, whose k rows are too few for the matmul kernels (1,344 x 16,384: 7 vs 22 ms).
        sums = torch.zeros(k, features.shape[1], device=features.device)
        sums.index_add_(0, labels.to(features.device), features.float())
    return sums / torch.bincount(labels, minlength=k).clamp_min(1)[:, None].float()


def take_rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of features [n, F] (dense, or sparse COO) as a dense [len(index), F] fp32."""
    if features.is_sparse:
        return features.index_select(0, index).to_dense().float()
    return features[index].float()


def lloyd_centroids(
    features: torch.Tensor, centroids: torch.Tensor, norms: torch.Tensor, steps: int
) -> torch.Tensor:
    """A few passes of plain (unbalanced) k-means: cheap matmuls that move the centroids close
    to their final place, so that fewer exact balanced assignments are needed."""
    k = centroids.shape[0]
    for _ in range(steps):
        labels = squared_distances(features, centroids, norms).argmin(1)
        empty = torch.bincount(labels, minlength=k) == 0
        new = cluster_means(features, labels, k)
        centroids = torch.where(empty[:, None], centroids, new)  # an empty cluster keeps its seed
    return centroids


def balanced_kmeans(
    features: torch.Tensor,
    init: torch.Tensor,
    max_iter: int = 10,
    warm_steps: int = 0,
    tol: float = 0.0,
    norms: torch.Tensor | None = None,
) -> Clustering:
    """Balanced k-means from initial centroid items `init` [k] (indices into features [n, F],
    dense or sparse COO); norms: `row_norms(features)` when the caller has them.

    Optionally `warm_steps` unbalanced passes first; then iterates the exact balanced assignment
    and mean update until at most a `tol` fraction of labels change (0: none), or `max_iter`
    balanced passes. Each assignment starts from the previous pass's cluster prices (the
    centroids move little between passes, so the prices are already nearly right) and, among
    equally cheap assignments, keeps the previous labels.
    """
    k = init.numel()
    features = features.float()
    norms = row_norms(features) if norms is None else norms
    centroids = lloyd_centroids(features, take_rows(features, init), norms, warm_steps)
    labels, prices = None, None
    for iteration in range(1, max_iter + 1):
        cost = squared_distances(features, centroids, norms).cpu().numpy().astype(np.float64)
        new, prices = balanced_transport(cost, prices, previous=labels)
        new = torch.from_numpy(new)
        converged = labels is not None and (new != labels).float().mean().item() <= tol
        labels = new
        centroids = cluster_means(features, labels, k)
        if converged:
            return Clustering(labels, centroids, iteration, True)
    return Clustering(labels, centroids, max_iter, False)


def representatives(
    features: torch.Tensor, clustering: Clustering, eligible: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each cluster, the (eligible) member closest to its centroid -> [k] item indices."""
    dist = squared_distances(features, clustering.centroids, norms)  # [n, k]
    own = dist.gather(1, clustering.labels[:, None]).squeeze(1)  # [n]
    if eligible is not None:  # padding neurons have no weights to score with
        own = torch.where(eligible, own, torch.full_like(own, float("inf")))
    k = clustering.centroids.shape[0]
    reps = torch.empty(k, dtype=torch.long)
    for j in range(k):  # k is the expert count (<= a few dozen), not the token count
        members = torch.nonzero(clustering.labels == j).squeeze(1)
        reps[j] = members[torch.argmin(own[members])]
    return reps


@dataclass
class ExpertLayout:
    """Neuron indices (into the padded FFN) of every expert: shared first, then routed."""

    experts: torch.Tensor  # [E, m] neuron ids; ids >= d_h are zero padding neurons
    representatives: torch.Tensor  # [Nr] neuron id of each routed expert's representative
    iterations: int
    converged: bool


# Markers this sparse or sparser become a sparse COO feature matrix: k-means then costs
# O(nonzeros) per pass instead of O(n N). One distance matmul plus one mean update, n = 25,088
# routed neurons x 4,096 tokens, one thread of a 2-core Xeon VM: dense fp32 206 ms at any
# density; sparse 1.8 ms at 0.035% (10 of 28,672 neurons marked per token), 139 ms at 2%,
# 263 ms at 5%. COO also stores 20 bytes a nonzero against 4 an entry dense.
_SPARSE_DENSITY = 0.02


def sparse_marker_features(markers: torch.Tensor, routed: torch.Tensor, normalize: bool):
    """Sparse COO [n, N] fp32 features of the `routed` neurons [n] from boolean markers [N, d_h];
    ids >= d_h (padding) get no nonzeros. Never forms the dense [n, N] matrix (411 MB fp32 for
    the 25,088 routed neurons of d_h 28,672 at S2A2E16, 4k tokens)."""
    n_tokens, d_h = markers.shape
    position = torch.full((d_h,), -1, dtype=torch.long)
    real = routed < d_h
    position[routed[real]] = torch.nonzero(real).squeeze(1)
    tokens, neurons = torch.nonzero(markers, as_tuple=True)
    rows = position[neurons]
    keep = rows >= 0  # shared neurons are not clustered
    rows, cols = rows[keep], tokens[keep]
    values = torch.ones(rows.numel())
    if normalize:  # a binary row of c ones has norm sqrt(c)
        values = torch.bincount(rows, minlength=routed.numel()).float().rsqrt()[rows]
    size = (routed.numel(), n_tokens)
    indices = torch.stack([rows, cols])
    return torch.sparse_coo_tensor(indices, values, size, check_invariants=True).coalesce()


def dense_features(signals: torch.Tensor, routed: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Dense fp32 [n, N] features of the `routed` neurons from signals [N, d_h]; rows of ids
    >= d_h (padding) are zero."""
    d_h = signals.shape[1]
    # One contiguous transpose in the signals' dtype, then whole rows (k-means matmuls run faster
    # on rows): 1.5x faster than gathering the columns first and transposing while converting.
    by_neuron = signals.t().contiguous()  # [d_h, N]
    features = by_neuron.index_select(0, routed.clamp(max=d_h - 1).to(signals.device)).float()
    del by_neuron
    features[routed >= d_h] = 0.0
    if normalize:
        features = torch.nn.functional.normalize(features, dim=1)
    return features


def routed_features(signals: torch.Tensor, routed: torch.Tensor, normalize: bool):
    """One feature row per routed neuron: its signal over the N calibration tokens -> [n, N],
    sparse for sparse boolean markers, else dense. With `normalize`, rows have unit norm."""
    if signals.dtype == torch.bool:
        sample = signals[:: max(1, signals.shape[0] // 256)]  # counting all 117M took 0.1 s
        density = torch.count_nonzero(sample).item() / max(sample.numel(), 1)
        if density <= _SPARSE_DENSITY:
            return sparse_marker_features(signals, routed, normalize)
    return dense_features(signals, routed, normalize)


def group_neurons(
    signals: torch.Tensor,
    importance: torch.Tensor,
    num_shared: int,
    num_experts: int,
    max_iter: int = 10,
    normalize: bool = False,
    warm_steps: int = 0,
    tol: float = 0.0,
) -> ExpertLayout:
    """Group d_h neurons into E experts: the most important form the shared experts, the rest
    are clustered by their per-token signals (CMoE: binary markers [N, d_h] and activation
    rates [d_h]; or contributions and mean contributions). With `normalize`, each neuron's
    signal column is scaled to unit norm, so neurons cluster by when they fire, not how much.

    When d_h does not divide by E, zero neurons (ids d_h, d_h+1, ...) pad the FFN: they never
    fire, so they join routed experts without changing any output.
    """
    d_h = importance.numel()
    m = -(-d_h // num_experts)  # ceil
    pad = m * num_experts - d_h
    shared = select_shared(importance, num_shared * m)
    is_shared = torch.zeros(d_h + pad, dtype=torch.bool)
    is_shared[shared] = True
    routed = torch.nonzero(~is_shared).squeeze(1)  # [Nr*m] neuron ids, padding included
    real = routed < d_h
    features = routed_features(signals, routed, normalize)  # [Nr*m, N]
    num_routed = num_experts - num_shared
    padded = torch.cat([importance.float(), torch.full((pad,), -1.0)])
    # Initial centroids: the most important routed neurons, as in CMoE.
    init = torch.sort(padded[routed], descending=True, stable=True).indices[:num_routed]
    # Once for both: a pass over the [n, N] features (SmolLM2: 1,344 x 16,384, 70 ms a layer).
    norms = row_norms(features)
    clustering = balanced_kmeans(features, init, max_iter, warm_steps, tol, norms)
    reps = routed[representatives(features, clustering, eligible=real, norms=norms)]
    groups = [shared.view(num_shared, m)] if num_shared else []
    routed_groups = torch.stack(
        [torch.sort(routed[clustering.labels == j]).values for j in range(num_routed)]
    )
    experts = torch.cat(groups + [routed_groups]) if groups else routed_groups
    return ExpertLayout(experts, reps, clustering.iterations, clustering.converged)
