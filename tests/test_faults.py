"""SIGKILL at random points of real carve and finetune processes (scripts/kill_faults.py, two
kills each here; `--trials 20` by hand): no half-written output, no damaged input, `--resume`
reaches the uninterrupted result, and of two carves to one --out one wins, one exits 2."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import kill_faults  # noqa: E402


def test_kills_leave_no_half_outputs_and_resume_matches(capsys):
    problems = kill_faults.run(trials=2, seed=0)
    assert problems == []
    summary = capsys.readouterr().out
    # The kills land inside the working phase: a run that finished first would test nothing.
    assert "carve: 0 of" not in summary and "finetune: 0 of" not in summary, summary
