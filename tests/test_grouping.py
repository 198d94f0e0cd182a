import itertools
import time
import tracemalloc

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cmoe_carve.grouping import (
    balanced_assign,
    balanced_kmeans,
    dense_features,
    group_neurons,
    refine_assignment,
    representatives,
    select_shared,
    sparse_marker_features,
    squared_distances,
)
from cmoe_carve.transport import balanced_transport, repair


def brute_force_balanced(cost):
    n, k = cost.shape
    size = n // k
    best = None
    for perm in itertools.permutations(range(n)):
        labels = torch.empty(n, dtype=torch.long)
        for slot, item in enumerate(perm):
            labels[item] = slot // size
        total = cost[torch.arange(n), labels].sum().item()
        if best is None or total < best - 1e-12:
            best = total
    return best


def lsa_cost(cost: np.ndarray) -> float:
    """The oracle: scipy's exact LSA on the square matrix repeating each column n/k times."""
    n, k = cost.shape
    rows, cols = linear_sum_assignment(np.repeat(cost, n // k, axis=1))
    return float(cost[rows, cols // (n // k)].sum())


def total(cost: np.ndarray, labels: np.ndarray) -> float:
    return float(cost[np.arange(cost.shape[0]), labels].sum())


def make_cost(kind: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return rng.random((n, k))
    if kind == "int3":  # ties everywhere: many optimal assignments
        return rng.integers(0, 3, (n, k)).astype(np.float64)
    if kind == "int1000":
        return rng.integers(0, 1000, (n, k)).astype(np.float64)
    if kind == "duplicates":  # identical rows, like never-marked neurons (all-zero features)
        base = rng.integers(0, 5, (max(1, n // 6), k)).astype(np.float64)
        return base[rng.integers(0, base.shape[0], n)]
    if kind == "skewed":  # one cluster is everyone's favourite: prices must move far
        return rng.random((n, k)) * np.linspace(1, 3, k) + np.linspace(0, 1, k)
    if kind == "large":  # magnitudes far from 1, negative values
        return rng.random((n, k)) * 1e6 - 5e5
    raise ValueError(kind)


KINDS = ["uniform", "int3", "int1000", "duplicates", "skewed", "large"]
SHAPES = [
    (1, 1),  # one item, one cluster
    (7, 1),  # k = 1: everything in the one cluster
    (5, 5),  # m = 1: a plain square assignment problem
    (12, 2),  # k = 2: one exchange graph edge each way
    (30, 3),
    (64, 8),
    (140, 14),  # m = 10, k = 14 as in S2A2E16
    (300, 30),  # m = 10, many clusters
    (400, 4),  # m = 100, few clusters
]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_transport_matches_scipy_lsa(n, k, kind):
    rng = np.random.default_rng(n * 31 + k + KINDS.index(kind))
    for trial in range(3):
        cost = make_cost(kind, n, k, rng)
        labels, prices = balanced_transport(cost)
        assert labels.dtype == np.int64 and prices.shape == (k,)
        assert np.bincount(labels, minlength=k).tolist() == [n // k] * k
        scale = max(1.0, float(np.abs(cost).max()))
        assert total(cost, labels) == pytest.approx(lsa_cost(cost), abs=1e-9 * scale), trial
        if kind.startswith("int") or kind == "duplicates":  # integers: exactly equal
            assert total(cost, labels) == lsa_cost(cost), trial


def test_transport_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        cost = torch.rand(6, 3, generator=gen, dtype=torch.float64)
        labels = balanced_assign(cost)
        assert torch.bincount(labels, minlength=3).tolist() == [2, 2, 2]
        got = cost[torch.arange(6), labels].sum().item()
        assert abs(got - brute_force_balanced(cost)) < 1e-9, trial


@pytest.mark.parametrize("kind", KINDS)
def test_warm_prices_and_previous_labels_keep_the_optimum(kind):
    rng = np.random.default_rng(5)
    n, k = 210, 7
    for trial in range(4):
        cost = make_cost(kind, n, k, rng)
        warm = rng.normal(size=k) * cost.std() * 3  # far off: only the time may change
        previous = rng.permutation(n) % k
        labels, _ = balanced_transport(cost, warm, previous)
        assert np.bincount(labels, minlength=k).tolist() == [n // k] * k
        scale = max(1.0, float(np.abs(cost).max()))
        assert total(cost, labels) == pytest.approx(lsa_cost(cost), abs=1e-9 * scale)
        # An optimal previous assignment is kept exactly: no label moves between equal optima.
        again, _ = balanced_transport(cost, warm, labels)
        assert np.array_equal(again, labels), trial


def test_previous_labels_kept_as_far_as_the_optimum_allows():
    # Integer costs: among all optimal assignments, the one keeping most previous labels, found
    # by scipy on costs where leaving the previous cluster adds 1 / (n + 1) of a unit.
    rng = np.random.default_rng(6)
    for trial in range(10):
        n, k = 24, 4
        cost = make_cost("int3", n, k, rng)
        previous = rng.permutation(n) % k
        labels, _ = balanced_transport(cost, None, previous)
        penalised = cost * (n + 1) + (np.arange(k)[None, :] != previous[:, None])
        rows, cols = linear_sum_assignment(np.repeat(penalised, n // k, axis=1))
        assert (labels == previous).sum() == (cols // (n // k) == previous[rows]).sum(), trial
        assert total(cost, labels) == lsa_cost(cost)


def test_transport_is_deterministic():
    rng = np.random.default_rng(7)
    for kind in ("uniform", "duplicates"):
        cost = make_cost(kind, 280, 14, rng)
        first, _ = balanced_transport(cost)
        assert np.array_equal(first, balanced_transport(cost.copy())[0])
    cost = torch.rand(40, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(balanced_assign(cost), balanced_assign(cost.clone()))


def test_transport_rejects_unequal_clusters_and_non_finite_costs():
    with pytest.raises(ValueError):
        balanced_transport(np.zeros((10, 3)))
    with pytest.raises(ValueError):
        balanced_transport(np.array([[0.0, np.inf], [1.0, 0.0]]))


def test_repair_from_cheapest_picks_reaches_the_optimum():
    # Zero prices, everyone at their cheapest cluster: the repair alone must do all the work.
    rng = np.random.default_rng(8)
    cost = make_cost("skewed", 120, 6, rng)
    labels, prices = repair(cost, cost.argmin(1), np.zeros(6), 20)
    assert np.bincount(labels, minlength=6).tolist() == [20] * 6
    assert total(cost, labels) == pytest.approx(lsa_cost(cost), abs=1e-9)
    reduced = cost + prices  # complementary slackness: every item at a cheapest cluster
    slack = reduced[np.arange(120), labels] - reduced.min(1)
    assert slack.max() <= 1e-9


def test_transport_never_forms_the_square_matrix():
    # n = 8,008 (k = 14, m = 572): the n x n float64 matrix LSA needs is 513 MB.
    n, k = 8008, 14
    rng = np.random.default_rng(9)
    cost = make_cost("skewed", n, k, rng)
    cost[: n // 3] = cost[0]  # a third identical, like never-marked neurons
    tracemalloc.start()
    start = time.perf_counter()
    labels, _ = balanced_transport(cost)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.bincount(labels, minlength=k).tolist() == [n // k] * k
    assert peak < n * n * 8 / 50, peak  # measured ~5 MB: a few [n, k] float64 copies
    assert seconds < 10.0  # ~0.1 s alone on a 2-core VM; generous for loaded CI machines
    # Optimal: no cyclic exchange of items lowers the cost (the transportation optimality test).
    assert torch.equal(refine_assignment(torch.from_numpy(cost), torch.from_numpy(labels)),
                       torch.from_numpy(labels))


def test_refine_assignment_reaches_the_optimum_from_any_balanced_start():
    gen = torch.Generator().manual_seed(2)
    for trial in range(6):
        cost = torch.rand(6, 3, generator=gen, dtype=torch.float64)
        start = torch.randperm(6, generator=gen) % 3  # balanced, arbitrary
        labels = refine_assignment(cost, start)
        assert torch.bincount(labels, minlength=3).tolist() == [2, 2, 2]
        got = cost[torch.arange(6), labels].sum().item()
        assert abs(got - brute_force_balanced(cost)) < 1e-9, trial
    # Larger problems, with ties (integer costs): the same total cost as scipy's exact solve.
    for trial in range(20):
        k, size = 2 + trial % 6, 1 + trial
        cost = torch.randint(0, 5 if trial % 2 else 1000, (k * size, k), generator=gen).double()
        start = torch.randperm(k * size, generator=gen) % k
        labels = refine_assignment(cost, start)
        assert torch.bincount(labels, minlength=k).tolist() == [size] * k
        rows = torch.arange(k * size)
        assert cost[rows, labels].sum().item() == lsa_cost(cost.numpy()), trial


def test_refine_assignment_keeps_an_optimal_start_and_solves_afresh_when_long():
    cost = torch.rand(40, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    optimal = balanced_assign(cost)
    assert torch.equal(refine_assignment(cost, optimal), optimal)  # no exchange improves it
    start = torch.arange(40) % 5
    fresh = refine_assignment(cost, start, max_rounds=0)  # gives up at once: the transport solve
    assert torch.equal(fresh, optimal)
    with pytest.raises(ValueError):
        refine_assignment(cost, torch.zeros(40, dtype=torch.long))


def test_kmeans_recovers_planted_balanced_clusters():
    # Three groups of 4 items, each firing on its own disjoint block of tokens.
    feats = torch.zeros(12, 30)
    for g in range(3):
        feats[g * 4 : (g + 1) * 4, g * 10 : (g + 1) * 10] = 1.0
    feats[0, 25] = 1.0  # a little noise
    for layout in (feats, feats.to_sparse()):  # dense and sparse features: the same clusters
        result = balanced_kmeans(layout, init=torch.tensor([0, 4, 8]), max_iter=10)
        assert result.converged
        for g in range(3):
            assert len(set(result.labels[g * 4 : (g + 1) * 4].tolist())) == 1
        reps = representatives(layout, result)
        for j, r in enumerate(reps.tolist()):
            assert result.labels[r] == j


def test_kmeans_over_identical_items_converges():
    # 60 of 90 items identical (never marked): swapping them between clusters costs nothing,
    # so convergence needs the assignment to keep the previous labels among equal optima.
    gen = torch.Generator().manual_seed(4)
    feats = (torch.rand(90, 50, generator=gen) > 0.8).float()
    feats[30:] = 0.0
    result = balanced_kmeans(feats.to_sparse(), torch.tensor([0, 1, 2]), max_iter=20)
    assert result.converged and result.iterations < 20
    assert torch.bincount(result.labels, minlength=3).tolist() == [30, 30, 30]


@pytest.mark.parametrize("normalize", [False, True])
def test_sparse_marker_features_equal_the_dense_ones(normalize):
    gen = torch.Generator().manual_seed(5)
    markers = torch.rand(40, 30, generator=gen) > 0.9
    markers[:, 3] = False  # a neuron never marked: a zero row, normalised or not
    routed = torch.tensor([0, 2, 3, 5, 7, 11, 13, 29, 30, 31])  # 30, 31: padding neurons
    sparse = sparse_marker_features(markers, routed, normalize)
    dense = dense_features(markers, routed, normalize)
    assert sparse.is_sparse and sparse.shape == dense.shape == (10, 40)
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=1e-6, atol=0)


def test_select_shared_takes_highest_rates():
    rates = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.0, 0.7])
    assert select_shared(rates, 3).tolist() == [1, 3, 5]


@pytest.mark.parametrize(
    "as_signals,normalize",
    [
        (lambda m: m, False),  # boolean markers: the sparse feature path
        (lambda m: m.half() * 3.0, True),  # contributions-like fp16 signals: the dense path
    ],
)
def test_every_neuron_in_exactly_one_expert_with_padding(as_signals, normalize):
    gen = torch.Generator().manual_seed(0)
    markers = torch.rand(64, 100, generator=gen) > 0.85  # 100 neurons, 8 experts -> 13 each
    rates = markers.float().mean(0)
    layout = group_neurons(as_signals(markers), rates, num_shared=2, num_experts=8,
                           normalize=normalize)
    assert layout.experts.shape == (8, 13)
    flat = layout.experts.reshape(-1).sort().values
    assert torch.equal(flat, torch.arange(104))  # 100 real neurons + 4 zero neurons, once each
    shared = layout.experts[:2].reshape(-1)
    assert (shared < 100).all()  # padding never becomes a shared neuron
    assert set(shared.tolist()) == set(select_shared(rates, 26).tolist())
    # Representatives are real members of their own routed expert.
    for j, rep in enumerate(layout.representatives.tolist()):
        assert rep < 100 and rep in layout.experts[2 + j].tolist()


def test_sparse_and_dense_marker_paths_group_alike():
    # Far below the sparse threshold (10 of 400 marked per token): the same markers as bool
    # (sparse features) and as fp16 (dense features) reach the same k-means objective.
    gen = torch.Generator().manual_seed(6)
    top = torch.rand(256, 400, generator=gen).topk(10, dim=1).indices
    markers = torch.zeros(256, 400, dtype=torch.bool).scatter_(1, top, True)
    rates = markers.float().mean(0)
    a = group_neurons(markers, rates, 2, 16, max_iter=10, warm_steps=5)
    b = group_neurons(markers.half(), rates, 2, 16, max_iter=10, warm_steps=5)
    assert torch.equal(a.experts[:2], b.experts[:2])

    def objective(layout):
        feats = markers.float().t()
        return sum(((feats[e] - feats[e].mean(0)) ** 2).sum().item() for e in layout.experts[2:])

    assert objective(a) == pytest.approx(objective(b), rel=1e-5)


@pytest.mark.parametrize("k", [5, 12, 14, 15, 16, 30])
def test_squared_distances_match_the_direct_differences_for_padded_and_plain_counts(k):
    # 12-15 and 28-31 centroids go through the zero-padded product; the others do not.
    gen = torch.Generator().manual_seed(k)
    features = torch.randn(200, 64, generator=gen)
    centroids = torch.randn(k, 64, generator=gen)
    direct = (features[:, None, :] - centroids[None, :, :]).pow(2).sum(-1)
    got = squared_distances(features, centroids)
    assert got.shape == (200, k)
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-4)
    assert got.argmin(1).tolist() == direct.argmin(1).tolist()
