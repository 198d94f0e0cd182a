"""The least-squares refit of down projections: the solver, the features, and the carve option."""

import copy

import pytest
import torch

from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.errors import ModelError, SpecError
from cmoe_carve.modeling_cmoe import CarvedMLP
from cmoe_carve.refit import (
    RIDGE_CHOICES, RefitStats, down_rows, refit_down, routed_features, solve_refit, solve_refit_dual,
    walk_ridges,
)
from tiny_models import FAMILIES, calib_ids, tiny_model


def _stats(features, targets, chunk=7):
    stats = RefitStats.empty(features.shape[1], targets.shape[1])
    for start in range(0, features.shape[0], chunk):  # chunk 7: sums over uneven chunks
        stats.add(features[start : start + chunk], targets[start : start + chunk])
    return stats


def test_solve_recovers_the_weights_that_made_the_targets():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(400, 12, generator=gen)
    true = torch.randn(12, 5, generator=gen)
    prior = torch.zeros(12, 5)
    solution = solve_refit(_stats(features, features @ true), prior, ridge=1e-9)
    torch.testing.assert_close(solution.float(), true, rtol=1e-4, atol=1e-4)


def test_solve_matches_the_normal_equations_of_the_ridge_problem():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(50, 6, generator=gen, dtype=torch.float64) * torch.arange(1, 7)
    targets = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    prior = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    ridge = 0.3
    gram = features.t() @ features
    lam = ridge * (gram.diagonal() + gram.diagonal().mean())
    expected = torch.linalg.solve(gram + torch.diag(lam), features.t() @ targets + lam[:, None] * prior)
    # Solved in fp32 at the carve's ridges (scaled, see RidgeSystem): fp32 agreement.
    torch.testing.assert_close(solve_refit(_stats(features, targets), prior, ridge).double(),
                               expected, rtol=1e-5, atol=1e-5)


def test_the_fp32_solve_keeps_fp64_accuracy_on_correlated_features_at_the_smallest_ridge():
    # Experts' activations are strongly correlated (a neuron's group fires together): a
    # near-collinear Gram at the grid's smallest ridge must still give fp64's W within 1e-3.
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4000, 8, generator=gen, dtype=torch.float64)
    mix = torch.randn(8, 200, generator=gen, dtype=torch.float64)
    features = (base @ mix + 1e-3 * torch.randn(4000, 200, generator=gen, dtype=torch.float64))
    features *= torch.logspace(-2, 2, 200, dtype=torch.float64)
    targets = features @ torch.randn(200, 5, generator=gen, dtype=torch.float64)
    prior = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    ridge = RIDGE_CHOICES[0]
    gram = features.t() @ features
    lam = ridge * (gram.diagonal() + gram.diagonal().mean())
    expected = torch.linalg.solve(gram + torch.diag(lam), features.t() @ targets + lam[:, None] * prior)
    got = solve_refit(_stats(features, targets), prior, ridge).double()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-3


@pytest.mark.parametrize("tokens", [5, 30, 59])
def test_the_dual_solve_equals_the_primal_one_when_tokens_are_fewer_than_features(tokens):
    # A Llama-3-8B layer refitted on ~800 tokens has 14,336 features: the carve then solves in
    # the tokens' space; it must be the same ridge solution (features of uneven scale, one unused).
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(tokens, 60, generator=gen) * torch.linspace(0.1, 10, 60)
    features[:, 7] = 0.0
    targets = torch.randn(tokens, 4, generator=gen)
    prior = torch.randn(60, 4, generator=gen)
    for ridge in (1e-2, 1.0):
        primal = solve_refit(_stats(features, targets), prior, ridge).float()
        dual = solve_refit_dual(features, targets, prior, ridge)
        torch.testing.assert_close(dual, primal, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dual[7], prior[7])


def test_refit_down_takes_the_dual_path_on_few_tokens_and_lowers_the_error():
    model = tiny_model("llama")
    carve_model(model, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5, refit=False), progress=False)
    carved = next(m for m in model.modules() if isinstance(m, CarvedMLP))
    gen = torch.Generator().manual_seed(6)
    dim = carved.down_proj.shape[1]
    x = torch.randn(12, dim, generator=gen)  # 12 tokens < E * m features
    assert x.shape[0] < carved.down_proj.shape[0] * carved.down_proj.shape[2]
    target = torch.randn(12, dim, generator=gen)
    before = (carved(x) - target).pow(2).sum()
    refit_down(carved, x, target, ridge=1e-3)
    assert (carved(x) - target).pow(2).sum() < 0.5 * before


def test_a_feature_no_token_uses_keeps_its_prior():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(100, 4, generator=gen)
    features[:, 2] = 0.0  # e.g. a padding neuron, or an expert never chosen
    prior = torch.randn(4, 3, generator=gen)
    solution = solve_refit(_stats(features, torch.randn(100, 3, generator=gen)), prior, 1e-3)
    torch.testing.assert_close(solution[2].float(), prior[2])
    assert (solution[0].float() - prior[0]).abs().max() > 1e-2  # used features do move


def test_features_keep_only_the_experts_a_token_uses():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3) + 1  # [c=2, E=4, m=3]
    ids = torch.tensor([[0, 2], [0, 3]])  # shared expert 0, then one routed expert
    gates = torch.tensor([[1.0, 0.5], [1.0, 2.0]])
    feats = routed_features(hidden, ids, gates, num_shared=1, with_switches=True)
    assert feats.shape == (2, 4 * 3 + 3)
    h = feats[:, :12].reshape(2, 4, 3)
    torch.testing.assert_close(h[0, 0], hidden[0, 0])
    torch.testing.assert_close(h[0, 2], 0.5 * hidden[0, 2])
    assert h[0, 1].abs().sum() == 0 and h[0, 3].abs().sum() == 0
    torch.testing.assert_close(h[1, 3], 2.0 * hidden[1, 3])
    # switches: routed experts 1..3 -> columns 0..2, 1 where left out
    torch.testing.assert_close(feats[:, 12:], torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))


def test_the_gram_from_the_experts_tokens_use_equals_the_dense_one():
    # Blocks of the Gram built from only the tokens that use each expert (shared experts: all,
    # one expert: nobody) must equal f^T f of the zero-filled features.
    # Two shared experts (0, 1) and routed ones 2..5, of which 5 is never used; two chunks.
    gen = torch.Generator().manual_seed(4)
    c, num_experts, m, dim = 40, 6, 3, 6
    hidden = torch.randn(c, num_experts, m, generator=gen)
    routed = torch.stack([torch.randperm(3, generator=gen)[:2] + 2 for _ in range(c)])
    shared = torch.tensor([0, 1]).expand(c, 2)
    ids = torch.cat([shared, routed], dim=1)
    gates = torch.rand(c, 4, generator=gen) + 0.5
    feats = routed_features(hidden, ids, gates, num_shared=2, with_switches=False)
    goal = torch.randn(c, dim, generator=gen)
    dense, blocked = RefitStats.empty(num_experts * m, dim), RefitStats.empty(num_experts * m, dim)
    for rows in (slice(0, 24), slice(24, c)):
        dense.add(feats[rows], goal[rows])
        blocked.add(feats[rows], goal[rows], ids[rows], m)
    # Products in fp32 (summed in fp64): the two orders of summation agree to fp32's precision.
    torch.testing.assert_close(blocked.gram, dense.gram, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocked.cross, dense.cross, rtol=1e-5, atol=1e-5)
    assert blocked.count == dense.count == c


def _carved_layer(compensate: bool):
    """One carved FFN of a tiny Llama (S1A2E8: 1 shared + 2 of 7 routed) and FFN inputs for it."""
    model = tiny_model("llama")
    config = CarveConfig(spec="S1A2E8", k_act=5, adaptive=False, compensate=compensate)
    carve_model(model, calib_ids(), config, progress=False)
    carved = next(m for m in model.modules() if isinstance(m, CarvedMLP))
    x = torch.randn(300, carved.hidden_size, generator=torch.Generator().manual_seed(3))
    return carved, x


def _loss_and_grads(carved, x, target):
    """||carved(x) - target||^2 through the module's own forward, and its gradients with
    respect to the down projections and compensation."""
    carved.zero_grad()
    with torch.enable_grad():
        loss = (carved(x) - target).pow(2).sum()
        loss.backward()
    bias_grad = carved.expert_bias.grad  # None when compensation is off (the bias is unused)
    return loss.item(), carved.down_proj.grad.clone(), bias_grad



@pytest.mark.parametrize("compensate", [False, True])
def test_refit_reaches_the_least_squares_optimum_of_the_real_forward(compensate):
    # Built from the features, checked through CarvedMLP.forward: if the features, their
    # layout, the gates or the compensation switches were wrong, the gradient would not vanish.
    carved, x = _carved_layer(compensate)
    gen = torch.Generator().manual_seed(4)
    target = carved(x).detach() + 0.3 * torch.randn(x.shape[0], carved.hidden_size, generator=gen)
    before, grad_down, grad_bias = _loss_and_grads(carved, x, target)
    refit_down(carved, x, target, ridge=1e-9, fit_compensation=True)
    after, grad_down_after, grad_bias_after = _loss_and_grads(carved, x, target)
    assert after < 0.9 * before
    assert grad_down_after.abs().max() < 1e-3 * grad_down.abs().max()
    if compensate:
        assert grad_bias_after.abs().max() < 1e-3 * grad_bias.abs().max()
    else:
        assert carved.expert_bias.abs().max() == 0  # no compensation stays no compensation


def test_fixed_compensation_is_kept_and_allowed_for():
    # Without fit_compensation the left-out biases stay as they are and the down projections
    # are optimal given them: the gradient in the down projections vanishes, not in the biases.
    carved, x = _carved_layer(True)
    bias = carved.expert_bias.detach().clone()
    target = carved(x).detach() + 0.3 * torch.randn(x.shape[0], carved.hidden_size,
                                                    generator=torch.Generator().manual_seed(6))
    _, grad_down, _ = _loss_and_grads(carved, x, target)
    refit_down(carved, x, target, ridge=1e-9)
    _, grad_down_after, _ = _loss_and_grads(carved, x, target)
    assert torch.equal(carved.expert_bias.detach(), bias)
    assert bias.abs().max() > 0
    assert grad_down_after.abs().max() < 1e-3 * grad_down.abs().max()


def test_refit_ridge_pulls_toward_the_slices():
    carved, x = _carved_layer(False)
    original = carved.down_proj.detach().clone()
    target = torch.randn(x.shape[0], carved.hidden_size, generator=torch.Generator().manual_seed(5))
    moved = {}
    for ridge in (1e-4, 1e2):
        layer = copy.deepcopy(carved)
        refit_down(layer, x, target, ridge=ridge)
        moved[ridge] = (layer.down_proj - original).norm().item()
    assert moved[1e2] < 0.05 * moved[1e-4]


def test_several_ridges_keep_the_solution_that_scores_best():
    carved, x = _carved_layer(False)
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(x.shape[0], carved.hidden_size, generator=gen)
    fit, held = slice(0, x.shape[0] // 2), slice(x.shape[0] // 2, None)

    def held_error(layer):
        return lambda: (layer(x[held]).float() - target[held]).pow(2).sum().item()

    scores, weights = {}, {}
    for ridge in (1e-3, 1e-1, 1e1):
        layer = copy.deepcopy(carved)
        refit_down(layer, x[fit], target[fit], ridge)
        scores[ridge], weights[ridge] = held_error(layer)(), layer.down_proj.detach().clone()
    layer = copy.deepcopy(carved)
    _, chosen = refit_down(layer, x[fit], target[fit], tuple(scores), score=held_error(layer))
    assert chosen == min(scores, key=scores.get)
    torch.testing.assert_close(layer.down_proj.detach(), weights[chosen])

    # A score no solution improves on: the prior (the slices) stays, exactly.
    layer = copy.deepcopy(carved)
    original = layer.down_proj.detach().clone()
    moved = lambda: (layer.down_proj - original).abs().sum().item()  # noqa: E731
    _, chosen = refit_down(layer, x[fit], target[fit], tuple(scores), score=moved)
    assert chosen is None
    assert torch.equal(layer.down_proj.detach(), original)
    with pytest.raises(ValueError, match="score"):
        refit_down(layer, x[fit], target[fit], (0.1, 1.0))


def test_held_out_tokens_join_the_final_solve_at_the_ridge_they_chose():
    # `extra`: the held-out rows choose the ridge, then the weights are the solve over fit and
    # held-out rows together at that ridge, as one refit of all rows at that ridge gives.
    carved, x = _carved_layer(False)
    gen = torch.Generator().manual_seed(7)
    target = torch.randn(x.shape[0], carved.hidden_size, generator=gen)
    fit, held = slice(0, 200), slice(200, None)
    layer = copy.deepcopy(carved)
    score = lambda: (layer(x[held]).float() - target[held]).pow(2).sum().item()  # noqa: E731
    _, chosen = refit_down(layer, x[fit], target[fit], (1e-2, 1e-1, 1.0), score=score)
    alone = layer.down_proj.detach().clone()
    layer = copy.deepcopy(carved)
    _, again = refit_down(layer, x[fit], target[fit], (1e-2, 1e-1, 1.0), score=score,
                          extra=(x[held], target[held], None))
    assert again == chosen is not None
    every = copy.deepcopy(carved)
    refit_down(every, x, target, chosen)
    torch.testing.assert_close(layer.down_proj.detach(), every.down_proj.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(layer.down_proj.detach(), alone, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family,target", [("llama", "stream"), ("qwen3", "stream"), ("gemma2", "ffn")])
def test_the_automatic_refit_target_is_stream_where_the_ffn_adds_to_the_stream(family, target):
    result = carve_model(tiny_model(family), calib_ids(), CarveConfig(spec="S2A2E8", k_act=5),
                         progress=False)
    assert result.config.refit_target == target
    assert result.cmoe["refit_target"] == target


def test_the_default_ridge_is_chosen_per_layer_from_the_choices():
    from cmoe_carve.refit import RIDGE_CHOICES

    result = carve_model(tiny_model("llama"), calib_ids(), CarveConfig(spec="S2A2E8", k_act=5),
                         progress=False)
    for layer in result.layers:
        assert layer.refit_kept == (layer.refit_ridge is not None)
        assert layer.refit_ridge is None or layer.refit_ridge in RIDGE_CHOICES


@pytest.mark.parametrize("target", ["ffn", "stream"])
def test_refit_lowers_the_held_out_error_of_a_carve(target):
    # Held-out calibration rows, as the carve report measures them: the refit must reproduce the
    # dense FFN better than the slices do (stream targets aim at the dense stream instead, so
    # they are only required not to be worse by much on this measure).
    errors = {}
    for refit in (False, True):
        model = tiny_model("llama")
        config = CarveConfig(spec="S1A1E8", k_act=5, adaptive=False, compensate=False,
                             refit=refit, refit_target=target, refit_ridge=1e-1)
        result = carve_model(model, calib_ids(32, 64), config, progress=False)
        errors[refit] = sum(r.reconstruction_error for r in result.layers)
    limit = 0.95 if target == "ffn" else 1.15
    assert errors[True] < limit * errors[False]


def test_refit_with_every_expert_active_keeps_the_dense_model():
    # With every expert on, the slices reproduce the dense FFN exactly: that is the least-squares
    # optimum, so the refit must leave the model (numerically) where it was.
    dense = tiny_model("qwen2")
    model = copy.deepcopy(dense)
    config = CarveConfig(spec="S2A6E8", k_act=5, adaptive=False, compensate=False, refit=True)
    carve_model(model, calib_ids(), config, progress=False)
    ids = calib_ids(1, 24, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if not f.startswith("gemma")))
def test_stream_targets_run_on_every_residual_family(family):
    model = tiny_model(family)
    config = CarveConfig(spec="S2A2E8", k_act=5, refit=True, refit_target="stream")
    carve_model(model, calib_ids(), config, progress=False)
    assert all(torch.isfinite(m.down_proj).all() for m in model.modules() if isinstance(m, CarvedMLP))


def test_stream_targets_refuse_gemma_clearly():
    model = tiny_model("gemma2")
    config = CarveConfig(spec="S2A2E8", k_act=5, refit=True, refit_target="stream")
    with pytest.raises(ModelError, match="--refit-target ffn"):
        carve_model(model, calib_ids(), config, progress=False)


def test_stream_mix_fits_the_blend_of_the_two_targets():
    # One layer carved on the same inputs whatever the mix, so grouping and routing are the
    # same (across layers, rounding-level differences in a layer's output can tip the next
    # layer's k-means); the refit is linear in its target, so its down projections at mix 0.5
    # are the mean of those at 0 and 1.
    from cmoe_carve.layer_carve import carve_mlp

    torch.manual_seed(0)
    mlp = tiny_model("llama").model.layers[1].mlp
    x = torch.randn(4096, 48)
    goal = torch.randn(4096, 48)  # a stream target unlike the FFN's own output
    downs, kept = {}, {}
    for mix in (0.0, 0.5, 1.0):
        config = CarveConfig(spec="S2A2E8", k_act=5, refit_target="stream", stream_mix=mix,
                             refit_ridge=0.1)
        facts = {}
        with torch.no_grad():  # as carve_model calls it
            carved = carve_mlp(mlp, x, config, "silu", "layer", facts, x,
                               stream_goal=lambda idx: goal[idx].clone())
        downs[mix], kept[mix] = carved.down_proj.detach().clone(), facts["refit_kept"]
    assert all(kept.values())
    torch.testing.assert_close(downs[0.5], (downs[0.0] + downs[1.0]) / 2, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(downs[0.0], downs[1.0], rtol=1e-2, atol=1e-4)


def test_stream_mix_0_is_the_ffn_target():
    downs = []
    for options in (dict(refit_target="ffn"), dict(refit_target="stream", stream_mix=0.0)):
        model = tiny_model("llama")
        carve_model(model, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5, **options),
                    progress=False)
        downs.append([m.down_proj.detach() for m in model.modules() if isinstance(m, CarvedMLP)])
    for ffn, mixed in zip(*downs):
        assert torch.equal(ffn, mixed)


def test_refit_options_are_validated():
    with pytest.raises(SpecError, match="--refit-target"):
        CarveConfig(refit_target="teacher")
    with pytest.raises(SpecError, match="--stream-mix"):
        CarveConfig(stream_mix=1.5)
    with pytest.raises(SpecError, match="--refit-ridge"):
        CarveConfig(refit_ridge=0.0)


def test_a_refit_that_raises_the_held_out_error_is_undone(monkeypatch):
    import cmoe_carve.refit as refit_module

    def harmful(*args):
        prior = args[-2]  # (stats or features, targets,) prior, ridge
        return prior.float() * 30.0  # what a refit that does not generalise looks like

    reference = tiny_model("llama")
    carve_model(reference, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5, refit=False), progress=False)
    monkeypatch.setattr(refit_module, "solve_refit", harmful)
    monkeypatch.setattr(refit_module, "solve_refit_dual", harmful)
    model = tiny_model("llama")
    config = CarveConfig(spec="S2A2E8", k_act=5, refit_ridge=0.1)  # one ridge: no choosing
    result = carve_model(model, calib_ids(), config, progress=False)
    assert [r.refit_kept for r in result.layers] == [False, False]
    assert [r.refit_ridge for r in result.layers] == [None, None]
    for ours, theirs in zip(
        (m for m in model.modules() if isinstance(m, CarvedMLP)),
        (m for m in reference.modules() if isinstance(m, CarvedMLP)),
    ):
        assert torch.equal(ours.down_proj, theirs.down_proj)


@pytest.mark.parametrize("compensate", [False, True])
def test_shared_hidden_activations_carve_what_recomputing_them_carves(monkeypatch, compensate):
    # The router fit, the compensation and the refit share one computation of the experts'
    # hidden activations when it is small enough; above the limit each recomputes its own.
    import cmoe_carve.layer_fit as layer_fit

    def carve(limit):
        monkeypatch.setattr(layer_fit, "_KEEP_HIDDEN_BYTES", limit)
        model = tiny_model("llama")
        config = CarveConfig(spec="S1A2E8", k_act=5, compensate=compensate)
        carve_model(model, calib_ids(), config, progress=False)
        return [m for m in model.modules() if isinstance(m, CarvedMLP)]

    shared, recomputed = carve(2**40), carve(0)
    for a, b in zip(shared, recomputed):
        for name in ("down_proj", "expert_bias"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.router.gate_weight, b.router.gate_weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("errors, best", [
    ([5.0, 4.0, 3.0, 2.0], 3),  # falling all along: walks up to the largest ridge
    ([1.0, 2.0, 3.0, 4.0], 0),  # rising: walks down to the smallest
    ([3.0, 2.0, 2.5, 4.0], 1),  # the start is the minimum
    ([4.0, 3.0, 2.0, 2.5], 2),  # one step up
    ([7.0], 0),
    ([2.0, 1.0], 1),
])
def test_walk_ridges_finds_the_minimum_of_a_unimodal_grid_scoring_fewer_ridges(errors, best):
    scored = []

    def evaluate(index):
        scored.append(index)
        return errors[index]

    walk_ridges(len(errors), evaluate)
    assert min(scored, key=errors.__getitem__) == best
    assert len(set(scored)) == len(scored)  # no ridge solved twice
    if len(errors) == 4:
        assert len(scored) <= 3  # never all four: the walk stops once the error rises again


@pytest.mark.parametrize("compensate", [False, True])
def test_the_output_from_kept_scores_is_the_carved_forward(compensate):
    # The carve answers its layer call and scores the held-out rows from the dense neurons'
    # scores instead of running the carved FFN: the two must agree, padding neurons included
    # (100 neurons in 8 experts of 13).
    from cmoe_carve.build import build_carved_mlp
    from cmoe_carve.grouping import group_neurons
    from cmoe_carve.kept_scores import expert_major, output_from_scores
    from cmoe_carve.profiling import neuron_scores

    torch.manual_seed(0)
    mlp = tiny_model("llama").model.layers[0].mlp
    x = torch.randn(300, 48)
    scores = neuron_scores(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.act_fn, False)
    groups = group_neurons(scores.abs() > 0.5, scores.abs().mean(0), 2, 8)
    carved = build_carved_mlp(mlp, groups, 2, 2, "silu", False)
    if compensate:
        with torch.no_grad():
            carved.expert_bias.normal_()
        carved.compensate = True
    with torch.no_grad():
        want = carved(x)
    got = output_from_scores(carved, x, expert_major(scores, groups.experts))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Not a trivial agreement: the carved FFN is far from the dense one.
    with torch.no_grad():
        assert (want - mlp(x)).norm() > 0.1 * mlp(x).norm()


@pytest.mark.parametrize("compensate", [False, True])
def test_a_carve_from_kept_scores_is_the_carve_that_recomputes_them(monkeypatch, compensate):
    # Above KEEP_SCORES_BYTES the carve runs the carved FFN for its layer output and held-out
    # errors; below, it makes them from the scores. The carved models must be the same.
    import cmoe_carve.kept_scores as kept_scores

    def carve(limit):
        monkeypatch.setattr(kept_scores, "KEEP_SCORES_BYTES", limit)
        model = tiny_model("llama")
        config = CarveConfig(spec="S1A2E8", k_act=5, compensate=compensate)
        result = carve_model(model, calib_ids(), config, progress=False)
        return result, [m for m in model.modules() if isinstance(m, CarvedMLP)]

    (kept, a_layers), (recomputed, b_layers) = carve(2**40), carve(0)
    assert [r.refit_ridge for r in kept.layers] == [r.refit_ridge for r in recomputed.layers]
    for ra, rb in zip(kept.layers, recomputed.layers):
        assert ra.reconstruction_error == pytest.approx(rb.reconstruction_error, rel=1e-4)
    for a, b in zip(a_layers, b_layers):
        for name in ("down_proj", "expert_bias"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5)
