"""Every command against bad input, one row per case: one line on stderr, exit code 2, no
traceback, and every file under the test's folder exactly as it was (nothing left behind, no
input damaged). Most rows run the CLI in-process; a few run the real `cmoe` in a subprocess."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from cmoe_carve.cli import app
from tiny_models import save_carved_tiny, save_dense

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 40


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Models and texts that each case copies and then breaks as its row says."""
    root = tmp_path_factory.mktemp("bad_input")
    save_dense(root / "dense")
    save_carved_tiny(root / "carved")
    # GPT-2: a plain (ungated) MLP, which carving refuses
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=256, n_positions=64)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    shutil.copy(root / "dense" / "tokenizer.json", root / "gpt2")
    shutil.copy(root / "dense" / "tokenizer_config.json", root / "gpt2")
    (root / "text.txt").write_text(TEXT)
    (root / "short.txt").write_text("too short")
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_safetensors(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 a zip file, or anything else that is not safetensors" * 50)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its content (directories as 'dir')."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# A break is (relative path, what to do): "rm", "truncate", "garbage", "badjson", "file", "ro".
W = "model.safetensors"
CARVE = ["carve", "{m}", "--out", "{root}/out", "--calib", "{root}/text.txt", "--calib-samples",
         "2", "--seqlen", "16", "--no-progress"]
EVAL = ["eval", "{m}", "--datasets", "{root}/text.txt", "--seqlen", "16", "--max-windows", "1",
        "--no-progress"]
FT = ["finetune", "{m}", "--out", "{root}/out", "--data", "{root}/text.txt", "--samples", "2",
      "--seqlen", "16", "--save-every", "0", "--no-progress"]
BENCH = ["bench", "{m}", "--tokens", "4", "--batch", "1", "--new-tokens", "2", "--repeats", "1",
         "--warmup", "0", "--no-loop-baseline", "--no-progress"]

# (id, argv, model, breaks, words the message must contain)
CASES = [
    # carve: the dense source
    ("carve-no-weights", CARVE, "dense", [("dense/" + W, "rm")], ["no *.safetensors"]),
    ("carve-truncated-weights", CARVE, "dense", [("dense/" + W, "truncate")], ["truncated"]),
    ("carve-not-safetensors", CARVE, "dense", [("dense/" + W, "garbage")], ["not a safetensors"]),
    ("carve-broken-config", CARVE, "dense", [("dense/config.json", "badjson")], ["not valid JSON"]),
    ("carve-no-config", CARVE, "dense", [("dense/config.json", "rm")], ["no config.json"]),
    ("carve-carved-input", CARVE, "carved", [], ["already carved", "dense source"]),
    ("carve-no-gated-mlp", CARVE, "gpt2", [], ["gated MLP"]),
    ("carve-bad-dtype", CARVE + ["--dtype", "int8"], "dense", [], ["--dtype", "float32"]),
    ("carve-bad-device", CARVE + ["--device", "tpu"], "dense", [], ["--device"]),
    ("carve-missing-data", [a.replace("text.txt", "nothing.txt") for a in CARVE], "dense", [],
     ["nothing.txt"]),
    ("carve-text-shorter-than-window",
     [a.replace("text.txt", "short.txt") for a in CARVE], "dense", [], ["--seqlen", "or less"]),
    ("carve-window-over-context", CARVE + ["--seqlen", "512"], "dense", [],
     ["context of 256", "--seqlen 256"]),
    ("carve-out-is-file", CARVE, "dense", [("out", "file")], ["is a file"]),
    ("carve-out-read-only", [a.replace("/out", "/ro/out") for a in CARVE], "dense",
     [("ro", "ro")], ["permission denied"]),
    ("carve-out-is-input", [a.replace("{root}/out", "{root}/dense") for a in CARVE] +
     ["--overwrite"], "dense", [], ["is the input"]),
    ("carve-out-holds-input", [a.replace("{root}/out", "{root}") for a in CARVE] +
     ["--overwrite"], "dense", [], ["is the input"]),
    ("carve-disk-full", CARVE, "dense", [("", "enospc")], ["no space left"]),
    ("carve-streamed-disk-full", CARVE + ["--stream", "on"], "dense", [("", "enospc")],
     ["no space left"]),
    ("carve-streamed-truncated-weights", CARVE + ["--stream", "on"], "dense",
     [("dense/" + W, "truncate")], ["truncated"]),
    ("carve-bad-stream", CARVE + ["--stream", "sometimes"], "dense", [], ["--stream", "auto"]),
    ("carve-stream-and-device-map", CARVE + ["--stream", "on", "--device-map", "auto"], "dense", [],
     ["--stream on", "--device-map"]),
    ("carve-bad-shard-size", CARVE + ["--stream", "on", "--shard-size", "0"], "dense", [],
     ["--shard-size"]),
    ("carve-bad-refit-ridge", CARVE + ["--refit-ridge", "strong"], "dense", [],
     ["--refit-ridge", "auto"]),
    ("carve-nan-refit-ridge", CARVE + ["--refit-ridge", "nan"], "dense", [],
     ["--refit-ridge must be positive"]),
    # eval: dense or carved
    ("eval-truncated-weights", EVAL, "carved", [("carved/" + W, "truncate")], ["truncated"]),
    ("eval-broken-config", EVAL, "dense", [("dense/config.json", "badjson")], ["not valid JSON"]),
    ("eval-missing-model", EVAL, "nowhere", [], ["does not exist"]),
    ("eval-missing-data", [a.replace("text.txt", "nothing.txt") for a in EVAL], "dense", [],
     ["nothing.txt"]),
    ("eval-text-shorter-than-window", [a.replace("text.txt", "short.txt") for a in EVAL],
     "carved", [], ["--seqlen", "or less"]),
    ("eval-window-over-context", EVAL + ["--seqlen", "300"], "carved", [], ["context of 256"]),
    ("eval-bad-dtype", EVAL + ["--dtype", "fp8"], "dense", [], ["--dtype"]),
    ("eval-bad-device", EVAL + ["--device", "cuda:7"], "dense", [], ["--device"]),
    ("eval-json-is-dir", EVAL + ["--json", "{root}/dense"], "dense", [], ["--json", "directory"]),
    # finetune: a carved checkpoint
    ("finetune-dense-input", FT, "dense", [], ["not a carved checkpoint", "cmoe carve"]),
    ("finetune-missing-input", FT, "nowhere", [], ["not a directory"]),
    ("finetune-truncated-weights", FT, "carved", [("carved/" + W, "truncate")], ["truncated"]),
    ("finetune-broken-config", FT, "carved", [("carved/config.json", "badjson")],
     ["not valid JSON"]),
    ("finetune-missing-data", [a.replace("text.txt", "nothing.txt") for a in FT], "carved", [],
     ["nothing.txt"]),
    ("finetune-text-shorter-than-window", [a.replace("text.txt", "short.txt") for a in FT],
     "carved", [], ["--seqlen", "or less"]),
    ("finetune-window-over-context", [a.replace("16", "300") for a in FT], "carved", [],
     ["context of 256"]),
    ("finetune-out-is-file", FT, "carved", [("out", "file")], ["is a file"]),
    ("finetune-out-is-input", [a.replace("{root}/out", "{root}/carved") for a in FT] +
     ["--overwrite"], "carved", [], ["is the input"]),
    ("finetune-disk-full", FT, "carved", [("", "enospc")], ["no space left"]),
    ("finetune-bad-teacher-dtype", FT + ["--distill", "--teacher-dtype", "fp8"], "carved", [],
     ["--teacher-dtype", "bf16"]),
    # bench
    ("bench-no-weights", BENCH, "carved", [("carved/" + W, "rm")], ["no *.safetensors"]),
    ("bench-broken-config", BENCH, "dense", [("dense/config.json", "badjson")], ["not valid JSON"]),
    ("bench-missing-compare", BENCH + ["--compare", "{root}/nowhere"], "dense", [],
     ["does not exist"]),
    ("bench-bad-device", BENCH + ["--device", "cuda"], "dense", [], ["--device"]),
    ("bench-profile-in-missing-dir", BENCH + ["--profile", "{root}/no/such/p.txt"], "dense", [],
     ["--profile", "not a directory"]),
    # neuron-keep: a carved checkpoint, changed in place
    ("neuron-keep-dense-input", ["neuron-keep", "{m}", "0.5"], "dense", [],
     ["not a carved checkpoint"]),
    ("neuron-keep-missing-input", ["neuron-keep", "{m}", "0.5"], "nowhere", [], ["not a directory"]),
    ("neuron-keep-broken-config", ["neuron-keep", "{m}", "0.5"], "carved",
     [("carved/config.json", "badjson")], ["not valid JSON"]),
    ("neuron-keep-bad-ratio", ["neuron-keep", "{m}", "1.5"], "carved", [], ["1.5"]),
]


def fake_enospc(filename_arg: int):
    """A save function that writes part of its file and then finds the disk full."""

    def save(*args, **kwargs):
        path = Path(args[filename_arg])
        path.write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return save


def apply_break(root: Path, rel: str, how: str, monkeypatch) -> None:
    path = root / rel
    if how == "rm":
        path.unlink()
    elif how == "truncate":
        truncate(path)
    elif how == "garbage":
        not_safetensors(path)
    elif how == "badjson":
        path.write_text(path.read_text()[:-40])  # cut off mid-object, as a broken copy would be
    elif how == "file":
        path.write_text("a file where a directory is wanted")
    elif how == "ro":
        path.mkdir()
        path.chmod(0o555)
        if os.geteuid() == 0:  # root writes anywhere: make mkdtemp answer as the kernel would
            import cmoe_carve.atomic as atomic

            real = atomic._make_temp_dir

            def refuse(parent, name):
                if Path(parent).resolve() == path.resolve():
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(parent))
                return real(parent, name)

            monkeypatch.setattr(atomic, "_make_temp_dir", refuse)
    elif how == "enospc":
        import transformers.modeling_utils as mu

        import cmoe_carve.shards as shards

        monkeypatch.setattr(mu, "safe_save_file", fake_enospc(1))
        monkeypatch.setattr(shards.ShardWriter, "_assemble", fake_enospc(3))  # streamed shards
    else:
        raise ValueError(how)


def argv_for(argv, model, root):
    m = str(root / model)
    return [a.replace("{m}", m).replace("{root}", str(root)) for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(case, pristine, tmp_path, monkeypatch):
    name, argv, model, breaks, words = case
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is not a mistake here")
    root = tmp_path / "work"
    shutil.copytree(pristine, root)
    for rel, how in breaks:
        apply_break(root, rel, how, monkeypatch)
    before = snapshot(root)
    monkeypatch.setenv("CMOE_DATA_DIR", str(root / "no-data-dir"))  # never the shared data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, argv_for(argv, model, root))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    if os.path.isdir(root / "ro"):
        (root / "ro").chmod(0o755)
    assert snapshot(root) == before  # nothing left behind, nothing damaged


SUBPROCESS_CASES = ["carve-truncated-weights", "eval-broken-config", "finetune-dense-input",
                    "carve-window-over-context"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(name, pristine, tmp_path):
    """The installed `cmoe` itself: one stderr line, exit 2, no traceback, nothing changed."""
    _, argv, model, breaks, words = next(c for c in CASES if c[0] == name)
    root = tmp_path / "work"
    shutil.copytree(pristine, root)
    for rel, how in breaks:
        apply_break(root, rel, how, None)
    before = snapshot(root)
    env = {**os.environ, "CMOE_DATA_DIR": str(root / "no-data-dir"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "cmoe_carve.cli", *argv_for(argv, model, root)],
                         capture_output=True, text=True, env=env, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert snapshot(root) == before


def test_short_text_suggests_a_window_the_model_can_take():
    """The issue's case: 30,500 tokens of text, a 8192-token model, --seqlen 40000."""
    from cmoe_carve.data import TextSource, _require_one_window
    from cmoe_carve.errors import DataError

    source = TextSource(dataset="file", split=None, origin="t.txt", text="x")
    with pytest.raises(DataError, match=r"use --seqlen 8192 or less"):
        _require_one_window(source, 30500, 40000, context=8192)
    with pytest.raises(DataError, match=r"use --seqlen 300 or less"):
        _require_one_window(source, 300, 400, context=8192)
