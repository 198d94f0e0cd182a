"""Checks of a user's model directory and device before anything loads them.

transformers and safetensors report a broken file with a traceback from deep inside; these
checks read only a config and the weights' headers (milliseconds) and name the file and the fix.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .errors import ModelError

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def read_config(path: Path) -> dict:
    """config.json of a model directory as a dict; ModelError naming what is wrong."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ModelError(f"{path} has no config.json: pass a Hugging Face model directory")
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(
            f"{config} is not valid JSON ({err}): restore it from the original model"
        ) from None
    if not isinstance(values, dict):
        raise ModelError(f"{config} holds no JSON object: restore it from the original model")
    return values


_FIX = "restore or re-create the checkpoint (a download or copy may have been cut short)"


def safetensors_header(file: Path) -> tuple[dict, int]:
    """(the header of a safetensors file, its length in bytes); ModelError for anything that is
    not one."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelError(f"{file} is empty or truncated ({size} bytes): {_FIX}")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise ModelError(f"{file} is not a safetensors file (or is truncated): {_FIX}")
        try:
            header = json.loads(handle.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{file} is not a safetensors file (unreadable header): {_FIX}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file} is not a safetensors file (unreadable header): {_FIX}")
    return header, n


def check_safetensors(file: Path) -> None:
    """The file is a complete safetensors file: a sane header whose tensors all fit in it."""
    header, n = safetensors_header(file)
    size = file.stat().st_size
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    needed = 8 + n + max(ends, default=0)
    if size < needed:
        raise ModelError(f"{file} is truncated ({size} of {needed} bytes): {_FIX}")


def check_model_dir(path: str | Path) -> dict:
    """A local model directory whose config and weights can be loaded; returns its config."""
    path = Path(path)
    values = read_config(path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (
            f" (it has {', '.join(pickled)}: pickled weights, which cmoe does not load; save the "
            "model with save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise ModelError(f"{path} has no *.safetensors weights{hint}: pass a complete model directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index} is not a valid weight index: restore it") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelError(f"{path} lacks weight shards {missing[:3]}: copy the whole model directory")
    for file in weights:
        check_safetensors(file)
    return values


def check_device(device: str) -> torch.device:
    """A device torch can use here; ModelError otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown --device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise ModelError(f"--device {device} is not available here: use --device cpu")
