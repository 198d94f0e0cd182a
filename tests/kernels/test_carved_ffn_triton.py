"""Runs the Triton kernel tests (triton_cases.py) in a child pytest process.

TRITON_INTERPRET=1 must be set before triton.jit decorates the kernels, and must not leak into
the rest of the session (it would switch `carved_ffn`'s auto dispatch to Triton in every other
test). So the Triton tests run in their own process: under the interpreter on CPU tensors where
there is no GPU (tiny shapes, a few seconds), on CUDA where there is one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES_FILE = Path(__file__).with_name("triton_cases.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels():
    env = {k: v for k, v in os.environ.items() if k not in ("CMOE_KERNEL", "TRITON_INTERPRET")}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES_FILE), "-q", "-p", "no:cacheprovider"],
        env=env,
        cwd=CASES_FILE.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    print(proc.stdout[-2000:])
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
