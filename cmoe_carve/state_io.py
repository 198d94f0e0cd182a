"""Nested training state (tensors, numbers, strings, lists, tuples, dicts) in one safetensors file.

No pickle: loading a pickle runs whatever code the file names, so a state file (or any other
file cmoe reads back) must never be one. The tensors go into the safetensors body; the structure
around them is JSON in the file's metadata, with tensors replaced by their names. Dicts with
non-string keys (an optimizer's per-parameter state is keyed by int) and tuples are tagged so
that the state loads back exactly as saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

_KEY = "cmoe_state"  # the metadata entry that holds the JSON skeleton


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().clone().contiguous()  # no shared storage in the file
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state: {obj!r}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state(path: Path, state: Any) -> None:
    """Write `state` to `path` through a temporary file and a rename: a crash at any point
    leaves the previous file whole."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(state, tensors))
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    save_file(tensors, str(tmp), metadata={_KEY: skeleton})
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> Any:
    """The state saved by save_state; CheckpointError for a file that is not one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        skeleton = json.loads(metadata[_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable training state ({err}): delete it and run again without "
            "--resume"
        ) from None
    return _decode(skeleton, tensors)
