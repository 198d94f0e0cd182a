"""The project's kernels/ folder must not shadow PyPI's `kernels`, which transformers imports.

kernels/ is installed as `cmoe_kernels`. This builds and runs a tiny transformers Llama in a
fresh interpreter started in the repository root, where `python -c` puts the root on sys.path:
the worst case for shadowing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

CODE = """
import importlib.util, pathlib
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import is_kernels_available
import cmoe_kernels

config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(config).eval()
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
assert logits.shape == (1, 4, 64), logits.shape
# transformers asks for an installed distribution named `kernels`; our folder is none.
spec = importlib.util.find_spec("kernels")
ours = spec is not None and pathlib.Path(spec.origin).parent.name == "kernels" and \\
    (pathlib.Path(spec.origin).parent / "triton_path.py").exists()
assert not (ours and is_kernels_available()), "repository kernels/ is taken for PyPI's kernels"
print("ok", cmoe_kernels.__name__, is_kernels_available())
"""


def test_transformers_builds_a_model_with_the_project_installed():
    proc = subprocess.run(
        [sys.executable, "-c", CODE],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("ok cmoe_kernels")
