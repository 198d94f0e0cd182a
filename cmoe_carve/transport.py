"""The balanced assignment as a transportation problem, solved exactly in O(n k) memory.

n items go to k clusters of exactly m = n / k items each, minimising the summed cost [n, k]. The
dual of this transportation problem has one price per cluster: with prices p, every item picks
its cheapest cluster under cost + p, and the prices are optimal when some tie-breaking of those
picks fills every cluster exactly. So the work is a search over k numbers, never over an n x n
matrix (the square assignment problem that repeats each column m times: 5 GB in float64 and
minutes of scipy at n = 25,088, the routed neurons of a Llama-3-70B FFN at S2A2E16).

Two stages:
1. Coordinate ascent on the dual (`fit_prices`): each cluster in turn takes the price at which
   exactly m items prefer it. A few sweeps bring every cluster's count close to m; alone it can
   stall short of the optimum (the dual is piecewise linear), which is why stage 2 exists.
2. Successive shortest paths (`repair`): items sit at their cheapest cluster under the prices,
   some clusters over-full, some under-full. A shortest path in the k-node exchange graph (edge
   a -> b: the cheapest move of one of a's items to b, in reduced cost) carries items from an
   over-full cluster to an under-full one, and moving the prices by the path lengths keeps
   every item at a cheapest cluster. When no cluster is over-full the assignment is balanced
   and every item is at a cheapest cluster under the final prices: optimal (complementary
   slackness). Tied items (identical neurons are common: all never-marked neurons have the
   same cost row) move together, so a path moves up to thousands at once.
"""

from __future__ import annotations

import numpy as np

# Coordinate ascent stops once the items left to move are this many per cluster pair, or a sweep
# no longer halves them: a sweep costs about as much as k^2 / 4 single-item paths.
_SWEEP_WORTH = 0.25
_MAX_SWEEPS = 20


def top_two(reduced: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of reduced [r, k] (k >= 2): the smallest value, its column, the second smallest
    and its column (the earliest column among equal values, so ties break by cluster index)."""
    rows = np.arange(reduced.shape[0])
    first = reduced.argmin(1)
    best = reduced[rows, first]
    rest = reduced.copy()
    rest[rows, first] = np.inf
    second = rest.argmin(1)
    return best, first, rest[rows, second], second


def excess(labels: np.ndarray, k: int, m: int) -> int:
    """Items beyond capacity m, summed over the over-full clusters."""
    return int(np.maximum(np.bincount(labels, minlength=k) - m, 0).sum())


def _fit_price(cost_j: np.ndarray, other: np.ndarray, m: int) -> float:
    """The price for one cluster at which m items prefer it: midway between the m-th and
    (m+1)-th largest saving other - cost_j (an item prefers the cluster when its price is below
    the item's saving)."""
    saving = other - cost_j
    n = saving.size  # > m: there are at least two clusters
    part = np.partition(saving, [n - m - 1, n - m])
    return 0.5 * (float(part[n - m - 1]) + float(part[n - m]))


def price_sweep(cost: np.ndarray, prices: np.ndarray, m: int) -> np.ndarray:
    """One Gauss-Seidel sweep of dual coordinate ascent over the k cluster prices.

    The best and second-best reduced costs of every item are kept up to date as each price
    moves, so a sweep costs O(n k) rather than O(n k^2); only items that had the moved cluster
    among their two best are re-scanned.
    """
    n, k = cost.shape
    prices = prices.copy()
    reduced = cost + prices  # [n, k]
    b1, a1, b2, a2 = top_two(reduced)
    for j in range(k):
        other = np.where(a1 == j, b2, b1)  # each item's best reduced cost elsewhere
        prices[j] = _fit_price(cost[:, j], other, m)
        x = reduced[:, j] = cost[:, j] + prices[j]
        stale = np.flatnonzero((a1 == j) | (a2 == j))  # j's old value may sit in the top two
        beats1 = x < b1
        beats2 = ~beats1 & (x < b2)
        b2 = np.where(beats1, b1, np.where(beats2, x, b2))
        a2 = np.where(beats1, a1, np.where(beats2, j, a2))
        b1, a1 = np.where(beats1, x, b1), np.where(beats1, j, a1)
        if stale.size:
            b1[stale], a1[stale], b2[stale], a2[stale] = top_two(reduced[stale])
    return prices


def fit_prices(cost: np.ndarray, prices: np.ndarray, m: int) -> np.ndarray:
    """Sweeps of `price_sweep` from `prices` until few items are left over or progress stalls."""
    k = cost.shape[1]
    if k < 2:
        return prices
    enough = _SWEEP_WORTH * k * k
    left = excess((cost + prices).argmin(1), k, m)
    for _ in range(_MAX_SWEEPS):
        if left <= enough:
            break
        candidate = price_sweep(cost, prices, m)
        now = excess((cost + candidate).argmin(1), k, m)
        if now >= left:  # a stalled sweep: keep the prices that had fewer left over
            break
        prices, stalled, left = candidate, now > left / 2, now
        if stalled:
            break
    return prices


def _cheapest_moves(
    cost: np.ndarray, members: np.ndarray, a: int, columns: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For cluster a's `members` and each target cluster in `columns`: the cheapest change in
    cost of moving one member there, and that member (inf and -1 back to a, or from nothing)."""
    if members.size == 0:
        return np.full(columns.size, np.inf), np.full(columns.size, -1)
    delta = cost[np.ix_(members, columns)] - cost[members, a][:, None]  # [|members|, |columns|]
    delta[:, columns == a] = np.inf
    pick = delta.argmin(0)
    return delta[pick, np.arange(columns.size)], members[pick]


class _ExchangeGraph:
    """The members of every cluster and the cheapest move of one of them to each other cluster:
    edge a -> b of the exchange graph, its cost without prices (best[a, b]) and its item."""

    def __init__(self, cost: np.ndarray, labels: np.ndarray):
        self.cost, k = cost, cost.shape[1]
        order = np.argsort(labels, kind="stable")  # by cluster, then by index
        self.members = np.split(order, np.cumsum(np.bincount(labels, minlength=k))[:-1])
        self.best, self.item = np.empty((k, k)), np.empty((k, k), dtype=np.int64)
        every = np.arange(k)
        for a in range(k):
            self.best[a], self.item[a] = _cheapest_moves(cost, self.members[a], a, every)

    def tied(self, a: int, b: int) -> np.ndarray:
        """Members of a (in index order) whose move to b costs exactly the cheapest."""
        members = self.members[a]
        delta = self.cost[members, b] - self.cost[members, a]
        return members[delta == self.best[a, b]]

    def update(self, a: int, labels: np.ndarray, arrived: np.ndarray, left: np.ndarray) -> None:
        """Cluster a lost `left` and gained `arrived` (`labels` already updated). Only edges
        whose cheapest item left are recomputed over all members: one column of m, not m x k."""
        members = self.members[a]
        members = members[labels[members] == a]
        if arrived.size:
            members = np.sort(np.concatenate([members, arrived]))
            delta, item = _cheapest_moves(self.cost, arrived, a, np.arange(self.cost.shape[1]))
            better = delta < self.best[a]
            self.best[a, better], self.item[a, better] = delta[better], item[better]
        self.members[a] = members
        stale = np.flatnonzero(np.isin(self.item[a], left))
        if stale.size:
            self.best[a, stale], self.item[a, stale] = _cheapest_moves(
                self.cost, members, a, stale
            )


def _shortest_path(weight: np.ndarray, sources: np.ndarray, targets: np.ndarray):
    """Dijkstra on the dense k-node graph weight [k, k] >= 0 from every source at once, stopped
    at the first target settled -> (distances [k], predecessors [k], that target)."""
    k = weight.shape[0]
    dist = np.where(sources, 0.0, np.inf)
    pred = np.full(k, -1)
    settled = np.zeros(k, dtype=bool)
    while True:
        u = int(np.where(settled, np.inf, dist).argmin())
        if targets[u]:
            return dist, pred, u
        settled[u] = True
        through = dist[u] + weight[u]
        better = (through < dist) & ~settled
        dist = np.where(better, through, dist)
        pred = np.where(better, u, pred)


def _path_to(pred: np.ndarray, target: int) -> list[int]:
    path = [target]
    while pred[path[-1]] >= 0:
        path.append(int(pred[path[-1]]))
    return path[::-1]  # source first


def repair(
    cost: np.ndarray, labels: np.ndarray, prices: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Successive shortest paths from `labels` [n], where every item is at a cheapest cluster
    under cost + prices, to a balanced assignment with that same property -> (labels, prices).
    """
    k = cost.shape[1]
    labels, prices = labels.copy(), prices.astype(np.float64).copy()
    counts = np.bincount(labels, minlength=k)
    graph = _ExchangeGraph(cost, labels)
    nobody = np.empty(0, dtype=np.int64)
    while counts.max() > m:
        # Reduced costs are >= 0 in exact arithmetic; clip the rounding below zero.
        weight = np.maximum(graph.best + prices[None, :] - prices[:, None], 0.0)  # [a, b]
        dist, pred, target = _shortest_path(weight, counts > m, counts < m)
        prices -= np.minimum(dist, dist[target])  # path edges become ties, none turns negative
        path = _path_to(pred, target)
        tied = [graph.tied(a, b) for a, b in zip(path, path[1:])]
        amount = min(counts[path[0]] - m, m - counts[target], *(t.size for t in tied))
        moved = [t[:amount] for t in tied]  # one set per edge: distinct clusters, distinct items
        for movers, b in zip(moved, path[1:]):
            labels[movers] = b
        counts[path[0]] -= amount
        counts[target] += amount
        for i, a in enumerate(path):
            arrived = moved[i - 1] if i else nobody
            left = moved[i] if i < len(moved) else nobody
            graph.update(a, labels, arrived, left)
    return labels, prices


def keep_previous(
    cost: np.ndarray, labels: np.ndarray, prices: np.ndarray, previous: np.ndarray
) -> np.ndarray:
    """Among the assignments as cheap as the optimal `labels` (optimal for `prices`), one that
    keeps the most items at their `previous` labels.

    Every optimal assignment uses only pairs (item, cluster) of least reduced cost under optimal
    prices (complementary slackness), so this is a second balanced assignment over those pairs
    with cost 1 for leaving the previous cluster, and n + 1 (never worth it) off them. Without
    it, k-means over tied neurons could swap identical neurons on every pass and never report
    convergence.
    """
    n, k = cost.shape
    reduced = cost + prices
    slack = reduced - reduced.min(1, keepdims=True)
    # Prices carry the rounding of every path that moved them, far below 1e-10 of the largest
    # cost; float32 k-means costs are themselves only good to ~1e-7.
    tight = slack <= 1e-10 * max(float(np.abs(cost).max()), 1.0)
    tight[np.arange(n), labels] = True  # the optimum in hand stays allowed whatever the rounding
    leave = (np.arange(k)[None, :] != previous[:, None]).astype(np.float64)
    unit = np.where(tight, leave, float(n + 1))
    return repair(unit, unit.argmin(1), np.zeros(k), n // k)[0]


def solve(cost: np.ndarray, prices: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Prices by coordinate ascent, then the exact repair -> (labels, prices)."""
    prices = fit_prices(cost, prices, m)
    return repair(cost, (cost + prices).argmin(1), prices, m)


def balanced_transport(
    cost: np.ndarray, prices: np.ndarray | None = None, previous: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The optimal assignment of n items to k clusters of exactly n / k items each.

    cost [n, k] (float64; ||neuron - centroid||^2 in k-means) -> (labels [n] int64, prices [k]).
    `prices` from a similar problem (the previous k-means pass) is a warm start: it changes the
    time taken and, where several assignments are equally cheap, which one comes back, never
    the cost. With `previous` labels [n], the one returned keeps the most items at their
    previous labels. Deterministic (ties go to the lower cluster index, tied items move in
    index order).
    Memory O(n k); time O(n k) per price sweep and per shortest path.
    """
    n, k = cost.shape
    if k == 0 or n % k:
        raise ValueError(f"{n} items cannot form {k} equal clusters")
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if not np.isfinite(cost).all():
        raise ValueError("balanced_transport needs finite costs")
    start = np.zeros(k) if prices is None else np.asarray(prices, dtype=np.float64)
    if k == 1:
        return np.zeros(n, dtype=np.int64), start.copy()
    labels, prices = solve(cost, start, n // k)
    if previous is not None:
        labels = keep_previous(cost, labels, prices, np.asarray(previous))
    return labels, prices
