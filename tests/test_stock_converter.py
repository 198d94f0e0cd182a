"""llama.cpp's stock convert_hf_to_gguf.py on a `--format hf` export.

Unmodified, it fails in its Glm4MoeModel.set_vocab, which is GLM's own tokenizer code (it needs
GLM's added tokens [gMASK], <|user|>, <|observation|>; see README, `cmoe export`). With only
that method replaced (no vocabulary: token ids in, logits out), everything else it writes (the
tensors, routing hparams) runs in llama.cpp as transformers runs the hf export, which is a
cross-check of this project's own GGUF writer against the stock mapping.

Needs CMOE_LLAMA_CPP_DIR: a llama.cpp source tree with convert_hf_to_gguf.py (for example the one
vendored in the llama-cpp-python sdist); skipped without it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.checkpoint import load_carved, save_carved
from cmoe_carve.export import export, fidelity
from tiny_models import bpe_tokenizer, calib_ids, tiny_model

LLAMA_CPP = Path(os.environ.get("CMOE_LLAMA_CPP_DIR", "/nonexistent"))
pytestmark = pytest.mark.skipif(
    not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file(),
    reason="set CMOE_LLAMA_CPP_DIR to a llama.cpp source tree with convert_hf_to_gguf.py",
)

# Runs the stock script, its Glm4MoeModel.set_vocab replaced by a vocabulary-less one.
NO_VOCAB = """
import runpy, sys
d = sys.argv[1]
sys.path[:0] = [d, d + "/gguf-py"]
sys.argv = [d + "/convert_hf_to_gguf.py", *sys.argv[2:]]
from conversion.glm import Glm4MoeModel
def set_vocab(self):
    self.gguf_writer.add_tokenizer_model("none")
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])
Glm4MoeModel.set_vocab = set_vocab
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(hf_dir, out, patched):
    script = ["-c", NO_VOCAB, str(LLAMA_CPP)] if patched else [str(LLAMA_CPP / "convert_hf_to_gguf.py")]
    return subprocess.run(
        [sys.executable, *script, str(hf_dir), "--outfile", str(out), "--outtype", "f32"],
        capture_output=True, text=True, timeout=600,
    )


def test_stock_converter_on_the_hf_export(tmp_path):
    pytest.importorskip("llama_cpp")
    model = tiny_model("llama", vocab_size=512)
    result = carve_model(model, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5, compensate=False, adaptive=False), progress=False)
    carved = tmp_path / "carved"
    save_carved(model, bpe_tokenizer("gpt2"), carved, result.cmoe, {"layers": []}, {"source_model": "tiny llama"})
    ids = calib_ids(1, 32, seed=3)[0]
    export(carved, "hf", tmp_path / "hf", ids=ids, echo=lambda *_: None)
    export(carved, "gguf", tmp_path / "ours.gguf", ids=ids, echo=lambda *_: None)

    stock = convert(tmp_path / "hf", tmp_path / "stock.gguf", patched=False)
    assert stock.returncode != 0 and "_set_vocab_glm" in stock.stderr, stock.stderr[-2000:]

    patched = convert(tmp_path / "hf", tmp_path / "stock.gguf", patched=True)
    assert patched.returncode == 0, patched.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()(ids[None]).logits[0]
        carved_logits = load_carved(carved)(ids[None]).logits[0]
    stock_logits = fidelity.llama_cpp_logits(tmp_path / "stock.gguf", ids)
    ours = fidelity.llama_cpp_logits(tmp_path / "ours.gguf", ids)
    # The stock file is llama.cpp's rendering of the hf export (sigmoid routing, router eps
    # 1e-3): float32 rounding apart (measured 9e-6 on 64 tokens).
    assert (stock_logits - hf).abs().max() < 1e-4
    # Ours is exact to the carve; the two differ by the hf export's own gate error.
    assert (ours - carved_logits).abs().max() < 1e-4
    gate_error = (hf - carved_logits).abs().max()
    assert (stock_logits - ours).abs().max() < gate_error + 1e-4
