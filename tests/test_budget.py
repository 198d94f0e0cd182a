import copy

import torch

from cmoe_carve.budget import allocate_budgets, balance_bias, error_by_active_experts
from cmoe_carve.carve import CarveConfig, carve_model
from tiny_models import calib_ids, tiny_model


def test_error_by_active_experts_matches_direct_sums():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 4, generator=gen)
    routed = torch.randn(5, 4, 3, generator=gen)
    base, target = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    err = error_by_active_experts(scores, routed, base, target)
    for k in range(5):
        top = torch.topk(scores, k, dim=-1).indices if k else torch.zeros(5, 0, dtype=torch.long)
        pred = base + torch.stack([routed[t, top[t]].sum(0) for t in range(5)])
        assert abs(err[k].item() - (pred - target).pow(2).sum().item()) < 1e-4


def test_allocation_keeps_the_average_and_favours_costly_layers():
    flat = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6])  # little to gain from more experts
    steep = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])  # much to gain
    ks = allocate_budgets([flat, steep, flat], mean_k=2, k_min=1, k_max=4)
    assert sum(ks) == 6
    assert ks[1] > ks[0] and ks[1] > ks[2]


def test_balance_bias_evens_an_imbalanced_load():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(2000, 6, generator=gen)
    scores[:, 0] += 0.5  # expert 0 wins almost every token
    load_before = torch.bincount(torch.topk(scores, 2).indices.reshape(-1), minlength=6).float()
    bias = balance_bias(scores, 2, steps=400, gamma=5e-3)
    load_after = torch.bincount(torch.topk(scores + bias, 2).indices.reshape(-1), minlength=6).float()
    assert load_after.max() / load_after.mean() < 0.5 * load_before.max() / load_before.mean()
    assert load_after.max() / load_after.mean() < 1.2


def test_carve_with_balance_and_adaptive_budgets():
    model = tiny_model("qwen3")
    dense = copy.deepcopy(model)
    config = CarveConfig(spec="S2A2E8", k_act=5, balance=True, adaptive=True)
    result = carve_model(model, calib_ids(4, 32), config, progress=False)
    ks = result.cmoe["top_k"]
    assert sum(ks) == 2 * len(ks) and all(1 <= k <= 4 for k in ks)
    assert [r.top_k for r in result.layers] == ks
    assert any(m.router.bias.abs().sum() > 0 for m in model.modules() if hasattr(m, "router"))
    ids = calib_ids(1, 16, seed=9)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        assert (model(ids).logits - dense(ids).logits).abs().max() > 0


def test_compensation_lowers_held_out_error():
    errors = {}
    for compensate in (False, True):
        model = tiny_model("llama")
        config = CarveConfig(spec="S2A2E8", k_act=5, compensate=compensate, refit=False)
        result = carve_model(model, calib_ids(8, 32), config, progress=False)
        errors[compensate] = sum(r.reconstruction_error for r in result.layers)
    assert errors[True] < errors[False]


def test_compensation_is_the_mean_output_of_left_out_experts():
    # The fit works on hidden activations (linear in W_down); check it against full outputs.
    from cmoe_carve.layer_fit import fit_compensation
    from cmoe_carve.modeling_cmoe import CarvedMLP
    from cmoe_carve.router_fit import expert_outputs

    model = tiny_model("llama")
    config = CarveConfig(spec="S1A2E5", k_act=4, adaptive=False, refit=False)
    carve_model(model, calib_ids(2, 16), config, progress=False)
    carved = next(m for m in model.modules() if isinstance(m, CarvedMLP))
    x = torch.randn(50, carved.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(4))
    fit_compensation(carved, x)
    _, _, top = carved.route(x)
    s = carved.num_shared
    outs = expert_outputs(x, carved.gate_up_proj[s:], carved.down_proj[s:], carved.act_fn)
    for e in range(carved.num_routed):
        left_out = ~(top == e).any(-1)
        assert 0 < left_out.sum() < x.shape[0]
        expected = outs[left_out, e].mean(0)
        torch.testing.assert_close(carved.expert_bias[e].float(), expected, rtol=1e-4, atol=1e-5)
