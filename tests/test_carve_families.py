"""Carving tiny models of every supported family: exactness, checkpoint round trip, errors."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers

from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.checkpoint import load_carved, save_carved
from cmoe_carve.errors import ModelError
from cmoe_carve.modeling_cmoe import CarvedMLP
from tiny_models import FAMILIES, calib_ids, tiny_model


class NoTokenizer:
    def save_pretrained(self, path):
        pass


def all_experts_on(model):
    for module in model.modules():
        if isinstance(module, CarvedMLP):
            module.router.top_k = module.num_routed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_carved_with_all_experts_equals_dense(family):
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    # Without the refit the experts are exact slices, so all of them together are the dense FFN.
    config = CarveConfig(spec="S2A2E8", k_act=5, refit=False)
    result = carve_model(model, calib_ids(), config, progress=False)
    assert len(result.layers) == 2
    carved = [m for m in model.modules() if isinstance(m, CarvedMLP)]
    assert len(carved) == 2
    ids = calib_ids(1, 24, seed=5)
    with torch.no_grad():
        partial = model(ids).logits
        all_experts_on(model)
        full = model(ids).logits
        ref = dense(ids).logits
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)
    assert (partial - ref).abs().max() > 1e-3  # only 4 of 8 experts: not the dense model


@pytest.mark.parametrize("family,keep", [("llama", 1.0), ("gemma3", 1.0), ("llama", 0.5)])
def test_checkpoint_round_trip_with_remote_code(family, keep, tmp_path):
    # keep < 1: MoNE through the checkpoint's own modeling code (no cmoe_kernels there).
    model = tiny_model(family)
    config = CarveConfig(spec="S1A2E8", k_act=5, neuron_keep=keep)
    result = carve_model(model, calib_ids(), config, progress=False)
    ids = calib_ids(1, 16, seed=3)
    with torch.no_grad():
        ref = model(ids).logits
    out = tmp_path / "carved"
    report = {"layers": []}
    save_carved(model, NoTokenizer(), out, result.cmoe, report, {"source_model": family})
    config = json.loads((out / "config.json").read_text())
    assert config["cmoe"]["spec"] == "S1A2E8" and config["auto_map"]
    assert (out / "modeling_cmoe.py").is_file() and (out / "README.md").is_file()
    torch.testing.assert_close(load_carved(out)(ids).logits, ref)
    # A fresh process where the project cannot be imported: only torch and transformers.
    code = f"""
import sys, torch
sys.modules["cmoe_carve"] = None
sys.modules["cmoe_kernels"] = None
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
ids = torch.tensor({ids.tolist()})
torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})
print(m.generate(ids, max_new_tokens=4, do_sample=False).shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.Size([1, 20])" in proc.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ref, rtol=1e-5, atol=1e-5)


def test_model_without_gated_mlp_is_refused():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ModelError, match="gate_proj, up_proj, down_proj and act_fn"):
        carve_model(model, torch.zeros(1, 8, dtype=torch.long), CarveConfig(), progress=False)


def test_report_statistics_are_consistent():
    model = tiny_model("llama")
    result = carve_model(model, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5), progress=False)
    for layer in result.layers:
        assert sum(layer.expert_sizes) == 100  # every real neuron in exactly one expert
        assert abs(sum(layer.expert_load) - 2.0) < 1e-6  # each token picks 2 routed experts
        assert 0.0 <= layer.reconstruction_error < 1.0
        assert len(layer.representatives) == 6
