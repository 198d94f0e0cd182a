"""Writing a checkpoint's weights shard by shard, as they are made, in the layout transformers
loads: `model.safetensors`, or `model-0000i-of-0000n.safetensors` and an index.

A layer-streamed carve hands over one decoder layer at a time; holding the whole carved model
to call save_pretrained would need the memory streaming exists to avoid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The shard size most published checkpoints use (transformers' v4 default).
DEFAULT_SHARD_BYTES = 5 * 2**30


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# torch dtypes by their safetensors names (what the header's "dtype" says).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_COPY_BYTES = 64 * 2**20


class ShardWriter:
    """Writes tensors to disk as they come, in shards of at most `max_bytes` (a tensor larger
    than that gets a shard of its own).

    A safetensors file starts with a header listing every tensor, which is not known until the
    shard is complete: each shard's tensor bytes go to a provisional data file at once (nothing
    is held in memory), and `finish()` writes each final file as header + those bytes (a
    sequential copy), names the shards and writes the index. A writer that never finishes
    leaves only provisional files in a directory that the atomic output removes.
    """

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._shards: list[tuple[Path, dict]] = []  # (data file, header entries)
        self._data = None  # the open data file of the current shard
        self._offset = 0
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which safetensors does not store")
        size = tensor_bytes(tensor)
        if self._data is not None and self._offset and self._offset + size > self.max_bytes:
            self._close_shard()
        if self._data is None:
            path = self.directory / f".shard-{len(self._shards):05d}.partial"
            self._data = open(path, "wb")
            self._shards.append((path, {}))
            self._offset = 0
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if size:
            self._data.write(memoryview(flat.view(torch.uint8).numpy()))
        self._shards[-1][1][name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                     "data_offsets": [self._offset, self._offset + size]}
        self._names.add(name)
        self._offset += size
        self.total_bytes += size

    def _close_shard(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def _assemble(self, data: Path, entries: dict, final: Path) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format allows space padding; keeps data 8-aligned
        with open(final, "wb") as out, open(data, "rb") as src:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            while chunk := src.read(_COPY_BYTES):
                out.write(chunk)
        data.unlink()

    def finish(self) -> list[str]:
        """Give the shards their final form and names; returns the file names."""
        self._close_shard()
        if not self._shards:
            raise ValueError("no tensors were written")
        count = len(self._shards)
        if count == 1:
            self._assemble(*self._shards[0], self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for i, (data, entries) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            self._assemble(data, entries, self.directory / final)
            names.append(final)
            weight_map.update({t: final for t in entries})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
