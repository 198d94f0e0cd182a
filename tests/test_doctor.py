"""`cmoe doctor` reports what is really there: versions, kernels, cache sizes, data found."""

from __future__ import annotations

import json
from importlib import metadata

from typer.testing import CliRunner

from cmoe_carve.cli import app


def test_doctor_reports_versions_caches_and_data(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "gguf" / "m").mkdir(parents=True)
    (cache / "gguf" / "m" / "model.safetensors").write_bytes(b"\0" * 1234)
    (cache / "note").write_bytes(b"\0" * 66)
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text("text")
    monkeypatch.setenv("CMOE_CACHE_DIR", str(cache))
    monkeypatch.setenv("CMOE_DATA_DIR", str(data))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CMOE_KERNEL", "torch")  # reported as off, and no build in this test
    result = CliRunner().invoke(app, ["doctor", "--json", "-"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["versions"]["torch"] == metadata.version("torch")
    assert record["versions"]["cmoe-carve"] == metadata.version("cmoe-carve")
    caches = record["caches"]
    assert caches["cmoe-carve (dequantized GGUF)"] == {"path": str(cache), "bytes": 1300}
    assert caches["Hugging Face hub"]["bytes"] is None  # absent, not zero
    mine = next(d for d in record["data_dirs"] if d["where"] == "$CMOE_DATA_DIR")
    assert mine["texts"] == ["wikitext-2-raw/wiki.test.raw"]
    assert record["fused_cpu_step"] == {"usable": False, "why": "turned off: CMOE_KERNEL=torch"}
    assert record["hub"].startswith("offline (HF_HUB_OFFLINE")
    text = CliRunner().invoke(app, ["doctor"])
    assert text.exit_code == 0 and "fused CPU step: not usable (turned off" in text.stdout
