"""MoNE on carved models: keep ratios, exactness at 1.0, the checkpoint option, fine-tuning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from cmoe_carve import modeling_cmoe
from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.checkpoint import load_carved, save_carved
from cmoe_carve.cli import app
from cmoe_carve.errors import ModelError, SpecError
from cmoe_carve.modeling_cmoe import CarvedMLP, keep_count
from cmoe_carve.mone import ffn_active_fraction, ffn_read_fraction, set_neuron_keep
from tiny_models import calib_ids, tiny_model

PROBE = calib_ids(1, 20, seed=11)


class NoTokenizer:
    def save_pretrained(self, path):
        pass


@pytest.fixture(scope="module")
def carved():
    model = tiny_model("llama")
    result = carve_model(model, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5), progress=False)
    return model, result


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


def test_keep_count_is_the_ceiling():
    assert [keep_count(r, 96) for r in (1.0, 0.75, 0.5, 0.25, 0.01)] == [96, 72, 48, 24, 1]
    assert keep_count(0.3, 10) == 3 and keep_count(0.31, 10) == 4


def test_ratio_one_reproduces_the_model_exactly(carved):
    model, _ = carved
    model = copy.deepcopy(model)
    before = logits(model)
    set_neuron_keep(model, 0.5, 0.5)
    half = logits(model)
    assert (half - before).abs().max() > 1e-3  # selection does something
    set_neuron_keep(model, 1.0, 1.0)
    assert torch.equal(logits(model), before)
    # A ratio whose ceiling keeps every neuron is no selection either.
    set_neuron_keep(model, 0.99, 0.99)
    assert torch.equal(logits(model), before)


def test_decode_with_selection_matches_the_full_forward(carved):
    # Cached decode runs the one-token path (kept rows of the [E, m, D] down copy), the full
    # forward the grouped, masked path: both must give the same next-token logits.
    model, _ = carved
    model = copy.deepcopy(model)
    set_neuron_keep(model, 0.5, 0.75)
    with torch.no_grad():
        out = model(PROBE[:, :-1], use_cache=True)
        step = model(PROBE[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[0, -1], logits(model)[0, -1], rtol=1e-4, atol=1e-5)


def test_decode_cache_follows_in_place_weight_changes(carved):
    # A LoRA merge writes through .data (no version bump); drop_caches (called by the merge and
    # by set_neuron_keep) must make decode read the new weights.
    model, _ = carved
    model = copy.deepcopy(model)
    set_neuron_keep(model, 0.5, 0.5)

    def next_logits():
        with torch.no_grad():
            out = model(PROBE[:, :-1], use_cache=True)
            return model(PROBE[:, -1:], past_key_values=out.past_key_values).logits[0, -1]

    next_logits()  # builds the decode caches
    for mlp in model.modules():
        if isinstance(mlp, CarvedMLP):
            mlp.down_proj.data.mul_(1.5)
            mlp.drop_caches()
    torch.testing.assert_close(next_logits(), logits(model)[0, -1], rtol=1e-4, atol=1e-5)


def test_plain_pytorch_path_matches_the_kernels(carved, monkeypatch):
    # The checkpoint's own modeling code (no cmoe_kernels) must select the same neurons.
    model, _ = carved
    model = copy.deepcopy(model)
    set_neuron_keep(model, 0.5, 0.5)
    fast = logits(model)
    monkeypatch.setattr(modeling_cmoe, "_fast_carved_ffn", None)
    torch.testing.assert_close(logits(model), fast, rtol=1e-5, atol=1e-5)


def test_carve_option_is_saved_and_reloaded(tmp_path):
    model = tiny_model("qwen3")
    config = CarveConfig(spec="S2A2E8", k_act=5, neuron_keep=0.5, shared_neuron_keep=0.75)
    result = carve_model(model, calib_ids(), config, progress=False)
    assert result.cmoe["neuron_keep"] == 0.5 and result.cmoe["shared_neuron_keep"] == 0.75
    mlps = [m for m in model.modules() if isinstance(m, CarvedMLP)]
    for mlp in mlps:
        size = mlp.expert_size
        assert mlp.keep_counts() == [keep_count(0.75, size)] * 2 + [keep_count(0.5, size)] * 6
    save_carved(model, NoTokenizer(), tmp_path / "c", result.cmoe, {"layers": []}, {})
    torch.testing.assert_close(logits(load_carved(tmp_path / "c")), logits(model))
    with pytest.raises(SpecError, match="neuron-keep"):
        CarveConfig(neuron_keep=0.0)


def test_neuron_keep_command_rewrites_the_checkpoint(carved, tmp_path):
    model, result = carved
    out = tmp_path / "c"
    save_carved(copy.deepcopy(model), NoTokenizer(), out, result.cmoe, {"layers": []}, {})
    runner = CliRunner()
    res = runner.invoke(app, ["neuron-keep", str(out), "0.5", "--shared", "0.75"])
    assert res.exit_code == 0, res.output
    size = result.cmoe["expert_size"]
    assert f"{keep_count(0.5, size)} of {size}" in res.output
    cmoe = json.loads((out / "config.json").read_text())["cmoe"]
    assert cmoe["neuron_keep"] == 0.5 and cmoe["shared_neuron_keep"] == 0.75
    reloaded = load_carved(out)
    expected = copy.deepcopy(model)
    set_neuron_keep(expected, 0.5, 0.75)
    torch.testing.assert_close(logits(reloaded), logits(expected))
    assert "keep_counts" in (out / "modeling_cmoe.py").read_text()  # modeling code refreshed
    assert (out / "config.json").stat().st_mode & 0o044  # still readable by others
    bad = runner.invoke(app, ["neuron-keep", str(out), "1.5"])
    assert bad.exit_code == 2 and "(0, 1]" in bad.output
    assert json.loads((out / "config.json").read_text())["cmoe"]["neuron_keep"] == 0.5


def test_dense_models_refuse_neuron_keep():
    with pytest.raises(ModelError, match="carve"):
        set_neuron_keep(tiny_model("llama"), 0.5)


def test_weight_fractions():
    cmoe = {"expert_size": 96, "num_experts": 16, "num_shared": 2, "top_k": [2, 2]}
    assert ffn_read_fraction(cmoe) == pytest.approx(4 / 16)
    assert ffn_active_fraction(cmoe) == pytest.approx(4 / 16)
    half = {**cmoe, "neuron_keep": 0.5, "shared_neuron_keep": 0.5}
    # Every expert reads its 96 gate rows and 48 rows of up and of down: 192 of 288.
    assert ffn_read_fraction(half) == pytest.approx(4 / 16 * 192 / 288)
    assert ffn_active_fraction(half) == pytest.approx(2 / 16)
    routed_only = {**cmoe, "neuron_keep": 0.5, "top_k": [1, 3]}  # adaptive budgets average 2
    assert ffn_read_fraction(routed_only) == pytest.approx((2 + 2 * 192 / 288) / 16)


def test_perplexity_reports_expert_load(carved):
    from cmoe_carve.evaluate import perplexity

    model, _ = carved
    windows = calib_ids(2, 16, seed=3)
    result = perplexity(model, windows, progress=False)
    mlp = next(m for m in model.modules() if isinstance(m, CarvedMLP))
    assert 1.0 <= result.load_max_over_mean <= mlp.num_routed / mlp.top_k
    assert perplexity(tiny_model("llama"), windows, progress=False).load_max_over_mean is None
