"""Writing a checkpoint's weights shard by shard, as they are made, in the layout transformers
loads: `model.safetensors`, or `model-0000i-of-0000n.safetensors` and an index.

A layer-streamed carve hands over one decoder layer at a time; holding the whole carved model
to call save_pretrained would need the memory streaming exists to avoid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# transformers' own default shard size in save_pretrained.
DEFAULT_SHARD_BYTES = 50 * 2**30


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Accumulates tensors and writes a shard whenever `max_bytes` would be passed.

    Shards are written under provisional names (their count is not known until the end) and
    renamed by `finish()`, which also writes the index; a writer that never finishes leaves only
    provisional files in a directory that the atomic output removes.
    """

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        size = tensor_bytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._names.add(name)
        # A contiguous CPU copy: the caller frees its own tensor (often a meta-bound parameter).
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._files):05d}.partial"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is left, give the shards their final names; returns the file names."""
        self._flush()
        if not self._files:
            raise ValueError("no tensors were written")
        if len(self._files) == 1:
            os.replace(self._files[0][0], self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        count = len(self._files)
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self._files, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.directory / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
