"""The same inputs, seed and thread count give a byte-identical model.safetensors, also across
processes (nothing depends on hash order, time or memory addresses)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from cmoe_carve.pipeline import carve
from tiny_models import save_dense

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 40
ARGS = dict(calib_samples=3, seqlen=24, progress=False)


def test_carve_is_byte_identical_across_runs_and_processes(tmp_path):
    save_dense(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    common = dict(calib=str(tmp_path / "text.txt"), **ARGS)
    carve(str(tmp_path / "dense"), tmp_path / "a", seed=0, **common)
    carve(str(tmp_path / "dense"), tmp_path / "b", seed=0, **common)
    carve(str(tmp_path / "dense"), tmp_path / "c", seed=1, **common)  # other windows
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "c" / "model.safetensors").read_bytes()  # the seed does matter
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    subprocess.run(
        [sys.executable, "-m", "cmoe_carve.cli", "carve", str(tmp_path / "dense"), "--out",
         str(tmp_path / "d"), "--calib", str(tmp_path / "text.txt"), "--calib-samples", "3",
         "--seqlen", "24", "--seed", "0", "--no-progress"],
        check=True, capture_output=True, env=env, timeout=300,
    )
    assert a == (tmp_path / "d" / "model.safetensors").read_bytes()
