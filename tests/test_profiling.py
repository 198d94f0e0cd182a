import torch
import torch.nn.functional as F

from cmoe_carve.profiling import activation_markers, neuron_scores, profile_layer


def test_scores_and_markers_match_a_per_token_loop():
    gen = torch.Generator().manual_seed(0)
    x, wg, wu = (torch.randn(s, generator=gen) for s in ((9, 8), (20, 8), (20, 8)))
    h = neuron_scores(x, wg, wu, F.silu, cosine=False)
    marks = activation_markers(h, 3)
    for t in range(9):
        ht = F.silu(wg @ x[t]) * (wu @ x[t])
        torch.testing.assert_close(h[t], ht)
        assert set(torch.nonzero(marks[t]).squeeze(1).tolist()) == set(
            torch.topk(ht.abs(), 3).indices.tolist()
        )
    assert marks.sum(1).eq(3).all()


def test_cosine_scores_ignore_weight_scale():
    gen = torch.Generator().manual_seed(1)
    x, wg, wu = (torch.randn(s, generator=gen) for s in ((5, 8), (6, 8), (6, 8)))
    a = neuron_scores(x, wg, wu, F.silu, cosine=True)
    b = neuron_scores(3 * x, wg * 7, wu * 0.5, F.silu, cosine=True)
    torch.testing.assert_close(a, b)


def test_profile_rates_are_marker_frequencies():
    gen = torch.Generator().manual_seed(2)
    x, wg, wu = (torch.randn(s, generator=gen) for s in ((50, 8), (16, 8), (16, 8)))
    prof = profile_layer(x, wg, wu, F.silu, k_act=4, cosine=True)
    assert prof.markers.shape == (50, 16)
    torch.testing.assert_close(prof.rates, prof.markers.float().mean(0))
    assert abs(prof.rates.sum().item() - 4.0) < 1e-5  # each token marks exactly K_a neurons
