"""SIGKILL `cmoe carve` and `cmoe finetune` at random points, and check what is left.

For each trial a real `cmoe` process is started on a tiny model and killed at a random time
within its working phase (after its first log line, up to the length of an uninterrupted run).
After every kill:
- the output directory is absent, or complete and byte-identical to the uninterrupted run's;
- the inputs (model, text) are unchanged;
- for finetune, `--resume` reaches exactly the uninterrupted result (model.safetensors bytes).
Finally two carves to one --out start at once: one must win, the other fail with exit code 2.

    python scripts/kill_faults.py --trials 20        # 22 minutes on 2 busy cores: 0 problems
Exit code 0 when every check holds; each violation is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 60
CARVE_ARGS = ["--calib-samples", "4", "--seqlen", "32", "--spec", "S2A2E8", "--no-progress"]
FT_ARGS = ["--samples", "8", "--seqlen", "16", "--save-every", "1", "--no-progress"]


def cmoe(*args: str) -> list[str]:
    return [sys.executable, "-m", "cmoe_carve.cli", *args]


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def timed_run(argv: list[str]) -> float:
    """Seconds from the first log line to the "... written to" line of an uninterrupted run: the
    working phase (loading, carving or training, writing, renaming), not interpreter start-up
    or shutdown."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env(),
                            text=True)
    proc.stderr.readline()
    start = time.monotonic()
    for line in proc.stdout:  # the command's last words: "... checkpoint written to DIR"
        if "written to" in line:
            break
    window = time.monotonic() - start
    proc.stderr.read()
    if proc.wait() != 0:
        raise RuntimeError(f"reference run failed: {' '.join(argv)}")
    return window


def killed_run(argv: list[str], window: float, rng: random.Random) -> bool:
    """Start `argv`, SIGKILL it a random time into its working phase; True if it was killed
    (False: it had finished first)."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env())
    proc.stderr.readline()  # the first log line: imports and model loading are behind it
    drain = threading.Thread(target=proc.stderr.read, daemon=True)  # keep the pipe flowing
    drain.start()
    try:
        proc.wait(timeout=rng.uniform(0, window))
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def weights(path: Path) -> bytes:
    return (path / "model.safetensors").read_bytes()


def check_output(out: Path, reference: Path, problems: list[str], what: str) -> None:
    """Absent, or complete and identical to the reference: never half a checkpoint."""
    if not out.exists():
        return
    missing = sorted({p.name for p in reference.iterdir()} - {p.name for p in out.iterdir()})
    if missing:
        problems.append(f"{what}: {out} exists without {missing}")
    elif weights(out) != weights(reference):
        problems.append(f"{what}: {out} exists with different weights")


def carve_trials(work: Path, trials: int, rng: random.Random, problems: list[str]) -> int:
    dense, text = work / "dense", work / "text.txt"
    reference = work / "carve-ref"
    window = timed_run(cmoe("carve", str(dense), "--out", str(reference), "--calib", str(text),
                            *CARVE_ARGS))
    inputs = tree_digest(dense), text.read_bytes()
    kills = 0
    for trial in range(trials):
        out = work / f"carve-{trial}"
        kills += killed_run(cmoe("carve", str(dense), "--out", str(out), "--calib", str(text),
                                 *CARVE_ARGS), window, rng)
        check_output(out, reference, problems, f"carve trial {trial}")
        if (tree_digest(dense), text.read_bytes()) != inputs:
            problems.append(f"carve trial {trial}: the input changed")
        shutil.rmtree(out, ignore_errors=True)
    return kills


def finetune_trials(work: Path, trials: int, rng: random.Random, problems: list[str]) -> int:
    carved, text = work / "carve-ref", work / "text.txt"
    reference = work / "ft-ref"
    base = ["finetune", str(carved), "--data", str(text), *FT_ARGS]
    window = timed_run(cmoe(*base, "--out", str(reference)))
    inputs = tree_digest(carved)
    kills = 0
    for trial in range(trials):
        out = work / f"ft-{trial}"
        kills += killed_run(cmoe(*base, "--out", str(out)), window, rng)
        check_output(out, reference, problems, f"finetune trial {trial}")
        if not out.exists():  # resume to the end: the uninterrupted result, exactly
            done = subprocess.run(cmoe(*base, "--out", str(out), "--resume"), env=env(),
                                  capture_output=True, text=True)
            if done.returncode != 0:
                problems.append(f"finetune trial {trial}: --resume failed: {done.stderr[-300:]}")
            elif weights(out) != weights(reference):
                problems.append(f"finetune trial {trial}: --resume gave different weights")
        if tree_digest(carved) != inputs:
            problems.append(f"finetune trial {trial}: the input changed")
        shutil.rmtree(out, ignore_errors=True)
        for leftover in work.glob(f".ft-{trial}.finetune-state*"):
            leftover.unlink()
    return kills


def concurrent_carves(work: Path, problems: list[str]) -> None:
    """Two carves to one --out at once: one writes it, the other exits 2 saying why."""
    out = work / "race"
    argv = cmoe("carve", str(work / "dense"), "--out", str(out), "--calib",
                str(work / "text.txt"), *CARVE_ARGS)
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env(),
                              text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    loser = next((err for code, err in results if code == 2), "")
    if codes != [0, 2]:
        problems.append(f"concurrent carves: exit codes {codes}, expected one 0 and one 2")
    elif "another cmoe process is writing" not in loser and "already exists" not in loser:
        problems.append(f"concurrent carves: the loser said {loser.strip().splitlines()[-1:]}")
    check_output(out, work / "carve-ref", problems, "concurrent carves")


def prepare(work: Path) -> None:
    from tiny_models import save_dense

    save_dense(work / "dense")
    (work / "text.txt").write_text(TEXT)


def run(trials: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cmoe-kill-") as tmp:
        work = Path(tmp)
        prepare(work)
        carve_kills = carve_trials(work, trials, rng, problems)
        ft_kills = finetune_trials(work, trials, rng, problems)
        concurrent_carves(work, problems)
    print(f"carve: {carve_kills} of {trials} runs killed; finetune: {ft_kills} of {trials} "
          f"killed and resumed; concurrent carves checked; {len(problems)} problem(s)")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="kills per command")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = parser.parse_args()
    problems = run(args.trials, args.seed)
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
