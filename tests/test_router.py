import torch
import torch.nn.functional as F

from cmoe_carve.build import build_carved_mlp
from cmoe_carve.grouping import group_neurons
from cmoe_carve.modeling_cmoe import CarvedMLP, CarvedRouter
from cmoe_carve.profiling import profile_layer
from cmoe_carve.router_fit import (
    _gram,
    expert_output_norms,
    fit_linear_router,
    oracle_agreement,
    standardize_rows,
)


def test_the_blocked_gram_is_the_whole_product():
    # Widths that the blocks do not divide, and more blocks than columns.
    gen = torch.Generator().manual_seed(3)
    for dim, blocks in ((10, 4), (7, 3), (3, 8), (1, 4)):
        x = torch.randn(50, dim, generator=gen, dtype=torch.float64)
        gram = _gram(x, blocks)
        torch.testing.assert_close(gram, x.t() @ x, rtol=1e-12, atol=1e-12)


def test_ridge_fit_recovers_a_planted_linear_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen)
    w = torch.randn(3, 6, generator=gen)
    b = torch.tensor([0.5, -1.0, 2.0])
    weight, intercept = fit_linear_router(x, x @ w.t() + b, ridge=1e-9)
    torch.testing.assert_close(weight, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(intercept, b, atol=1e-4, rtol=1e-4)


def test_standardize_rows_and_oracle_agreement():
    v = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 5.0]])
    s = standardize_rows(v)
    torch.testing.assert_close(s.mean(-1), torch.zeros(2), atol=1e-6, rtol=0)
    assert oracle_agreement(v, v, 1) == 1.0
    assert oracle_agreement(-v, v, 1) == 0.0
    assert oracle_agreement(torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([[0.0, 1.0, 2.0]]), 2) == 1.0


def test_expert_output_norms_match_a_loop():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=gen)
    gate_up, down = torch.randn(3, 8, 5, generator=gen), torch.randn(3, 5, 4, generator=gen)
    norms = expert_output_norms(x, gate_up, down, F.silu)
    for e in range(3):
        y = (F.silu(x @ gate_up[e, :4].t()) * (x @ gate_up[e, 4:].t())) @ down[e].t()
        torch.testing.assert_close(norms[:, e], y.norm(dim=-1))


def test_router_gates_start_at_one_and_bias_steers_selection():
    router = CarvedRouter(hidden_size=4, num_routed=5, top_k=2, kind="linear", act_fn=F.silu)
    with torch.no_grad():
        router.gate_weight.copy_(torch.randn(5, 4, generator=torch.Generator().manual_seed(2)))
        router.up_weight.zero_()
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    scores, top, gates = router(x)
    torch.testing.assert_close(scores.sum(-1), torch.ones(10))
    assert torch.equal(gates, torch.ones(10, 2))  # u = 0: training-free gates are exactly 1
    router.bias[3] = 10.0  # a large selection bias forces expert 3 in, without changing scores
    scores2, top2, _ = router(x)
    assert (top2 == 3).any(-1).all()
    torch.testing.assert_close(scores2, scores)


def test_representative_router_uses_representative_rows():
    torch.manual_seed(0)
    mlp = torch.nn.Module()
    mlp.gate_proj = torch.nn.Linear(6, 16, bias=False)
    mlp.up_proj = torch.nn.Linear(6, 16, bias=False)
    mlp.down_proj = torch.nn.Linear(16, 6, bias=False)
    x = torch.randn(40, 6)
    prof = profile_layer(x, mlp.gate_proj.weight, mlp.up_proj.weight, F.silu, 3, True)
    layout = group_neurons(prof.markers, prof.rates, num_shared=1, num_experts=4)
    carved = build_carved_mlp(mlp, layout, 1, 2, "silu", cosine_router=True)
    assert isinstance(carved, CarvedMLP)
    reps = layout.representatives
    torch.testing.assert_close(carved.router.gate_weight, F.normalize(mlp.gate_proj.weight[reps], dim=-1))
    torch.testing.assert_close(carved.router.up_weight, F.normalize(mlp.up_proj.weight[reps], dim=-1))
