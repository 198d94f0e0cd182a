import itertools

import pytest
import torch

from cmoe_carve.grouping import (
    balanced_assign,
    balanced_kmeans,
    refine_assignment,
    group_neurons,
    representatives,
    select_shared,
)


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


def test_balanced_assign_sizes_exact_and_optimal():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        cost = torch.rand(6, 3, generator=gen, dtype=torch.float64)
        labels = balanced_assign(cost)
        assert torch.bincount(labels, minlength=3).tolist() == [2, 2, 2]
        total = cost[torch.arange(6), labels].sum().item()
        assert abs(total - brute_force_balanced(cost)) < 1e-9, trial


def test_balanced_assign_is_deterministic():
    cost = torch.rand(40, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(balanced_assign(cost), balanced_assign(cost.clone()))


def test_refine_assignment_reaches_the_optimum_from_any_balanced_start():
    gen = torch.Generator().manual_seed(2)
    for trial in range(6):
        cost = torch.rand(6, 3, generator=gen, dtype=torch.float64)
        start = torch.randperm(6, generator=gen) % 3  # balanced, arbitrary
        labels = refine_assignment(cost, start)
        assert torch.bincount(labels, minlength=3).tolist() == [2, 2, 2]
        total = cost[torch.arange(6), labels].sum().item()
        assert abs(total - brute_force_balanced(cost)) < 1e-9, trial
    # Larger problems, with ties (integer costs): the same total cost as scipy's exact solve.
    for trial in range(20):
        k, size = 2 + trial % 6, 1 + trial
        cost = torch.randint(0, 5 if trial % 2 else 1000, (k * size, k), generator=gen).double()
        start = torch.randperm(k * size, generator=gen) % k
        labels = refine_assignment(cost, start)
        assert torch.bincount(labels, minlength=k).tolist() == [size] * k
        exact = balanced_assign(cost)
        rows = torch.arange(k * size)
        assert cost[rows, labels].sum().item() == cost[rows, exact].sum().item(), trial


def test_refine_assignment_keeps_an_optimal_start_and_reports_a_long_search():
    cost = torch.rand(40, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    optimal = balanced_assign(cost)
    assert torch.equal(refine_assignment(cost, optimal), optimal)  # no exchange improves it
    start = torch.arange(40) % 5
    assert refine_assignment(cost, start, max_rounds=0) is None
    with pytest.raises(ValueError):
        refine_assignment(cost, torch.zeros(40, dtype=torch.long))


def test_kmeans_recovers_planted_balanced_clusters():
    # Three groups of 4 items, each firing on its own disjoint block of tokens.
    feats = torch.zeros(12, 30)
    for g in range(3):
        feats[g * 4 : (g + 1) * 4, g * 10 : (g + 1) * 10] = 1.0
    feats[0, 25] = 1.0  # a little noise
    result = balanced_kmeans(feats, init=torch.tensor([0, 4, 8]), max_iter=10)
    assert result.converged
    for g in range(3):
        assert len(set(result.labels[g * 4 : (g + 1) * 4].tolist())) == 1
    reps = representatives(feats, result)
    for j, r in enumerate(reps.tolist()):
        assert result.labels[r] == j


def test_select_shared_takes_highest_rates():
    rates = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.0, 0.7])
    assert select_shared(rates, 3).tolist() == [1, 3, 5]


def test_every_neuron_in_exactly_one_expert_with_padding():
    gen = torch.Generator().manual_seed(0)
    markers = torch.rand(64, 100, generator=gen) > 0.85  # 100 neurons, 8 experts -> 13 each
    rates = markers.float().mean(0)
    layout = group_neurons(markers, rates, num_shared=2, num_experts=8)
    assert layout.experts.shape == (8, 13)
    flat = layout.experts.reshape(-1).sort().values
    assert torch.equal(flat, torch.arange(104))  # 100 real neurons + 4 zero neurons, once each
    shared = layout.experts[:2].reshape(-1)
    assert (shared < 100).all()  # padding never becomes a shared neuron
    assert set(shared.tolist()) == set(select_shared(rates, 26).tolist())
    # Representatives are real members of their own routed expert.
    for j, rep in enumerate(layout.representatives.tolist()):
        assert rep < 100 and rep in layout.experts[2 + j].tolist()
