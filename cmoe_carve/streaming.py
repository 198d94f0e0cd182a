"""Layer streaming: carve a model larger than memory, one decoder layer at a time.

The model is built without weights (parameters on the meta device, buffers such as rotary
tables real); the embeddings are read to embed the calibration windows and freed; then each
decoder layer is read from the safetensors files, carved, written to the output's shards and
freed. The calibration hidden states are the only state that lives from one layer to the next,
so the peak is about one dense layer, its carved copy and the activations.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .errors import ModelError
from .loading import LoadedModel, parse_dtype, resolve_model_path
from .shards import INDEX_FILE, SAFETENSORS_DTYPES, ShardWriter
from .validate import safetensors_header

log = logging.getLogger(__name__)

STREAM_MODES = ("auto", "on", "off")
# A whole-model carve holds the dense model, one carved layer beside it and the runtime: stream
# when the weights alone would take more than this share of the memory available.
_AUTO_SHARE = 0.7


class CheckpointTensors:
    """The tensors of a safetensors model directory (one file or an index of shards), read by
    name, converted to one dtype and device. Files are opened per read and closed after, so no
    mapping of a whole shard outlives the layer it was read for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            self.where = dict(json.loads(index.read_text())["weight_map"])
        else:
            self.where = {}
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    self.where.update({name: file.name for name in f.keys()})
        if not self.where:
            raise ModelError(f"{self.path} has no safetensors weights to stream: pass a model directory")

    def read(self, names: list[str], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise ModelError(f"{self.path} has no tensor {missing[0]}: cannot stream this checkpoint "
                             "(use --stream off)")
        out = {}
        for name in names:
            # get_tensor maps the whole file and its tensors keep the mapping alive: pages once
            # touched stay resident while any tensor of that file lives. A copy per tensor, with
            # the file closed after each, lets a freed layer really leave memory.
            with safe_open(str(self.path / self.where[name]), framework="pt") as f:
                mapped = f.get_tensor(name)
                out[name] = mapped.to(device=device, dtype=dtype, copy=True)
                del mapped
        return out

    def nbytes(self, dtype: torch.dtype) -> int:
        """What the weights take in memory at `dtype`, from the files' headers only."""
        total = 0
        for file in sorted(set(self.where.values())):
            header, _ = safetensors_header(self.path / file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                stored = SAFETENSORS_DTYPES.get(info["dtype"], torch.float32)
                # Floating tensors are converted to `dtype` on reading; others keep theirs.
                held = dtype if stored.is_floating_point else stored
                total += math.prod(info["shape"]) * held.itemsize
        return total


def available_memory(device: torch.device) -> int:
    """Bytes free for the model on `device`: MemAvailable on the host, free memory on a GPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def decide_streaming(mode: str, ref: str | None, dtype: str, device: str) -> tuple[bool, str]:
    """(stream?, why) for `--stream auto|on|off`. Auto streams a local model whose weights would
    fill more than 70% of the memory it can use; a hub model is streamed only when asked (its
    size is not known without downloading it)."""
    if mode not in STREAM_MODES:
        raise ModelError(f"unknown --stream {mode!r}: use one of {', '.join(STREAM_MODES)}")
    if mode != "auto":
        return mode == "on", f"--stream {mode}"
    path, _ = resolve_model_path(ref)
    if not Path(path).is_dir():
        return False, "a hub model (pass --stream on to stream it)"
    need = CheckpointTensors(path).nbytes(parse_dtype(dtype))
    free = available_memory(torch.device(device))
    stream = need > _AUTO_SHARE * free
    gib = 2**30
    why = f"the weights take {need / gib:.1f} GiB at {dtype}, {free / gib:.1f} GiB available"
    return stream, why


def local_model_dir(ref: str | None) -> tuple[Path, str]:
    """A local directory holding the model's files: GGUF files are dequantized once (cached),
    hub ids are downloaded to the Hugging Face cache as from_pretrained would."""
    path, description = resolve_model_path(ref)
    if Path(path).is_dir():
        return Path(path), description
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated repo
        raise ModelError(f"cannot download {path!r} to stream it: {err}".splitlines()[0]) from err
    return Path(local), description


class StreamedLayers:
    """What the carve loop calls around each decoder layer when streaming: `load` reads the
    layer's weights into the weightless model, `release` writes the carved layer to the output
    shards and frees it."""

    def __init__(self, tensors: CheckpointTensors, writer: ShardWriter | None, dtype: torch.dtype,
                 device: torch.device):
        self.tensors = tensors
        self.writer = writer
        self.dtype = dtype
        self.device = torch.device(device)

    def load(self, prefix: str, layer: nn.Module) -> None:
        names = [f"{prefix}.{key}" for key in layer.state_dict()]
        state = self.tensors.read(names, self.dtype, self.device)
        try:
            layer.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state.items()}, strict=True, assign=True)
        except RuntimeError as err:
            raise ModelError(f"{prefix} does not match its weights in {self.tensors.path} "
                             f"({str(err).splitlines()[0]}): use --stream off") from None

    def release(self, prefix: str, layer: nn.Module) -> None:
        if self.writer is not None:
            for key, tensor in layer.state_dict().items():
                self.writer.add(f"{prefix}.{key}", tensor)
        layer.to("meta")  # frees the weights; the module tree stays for the config and report

    def prepare(self, model: nn.Module, layer_prefixes: list[str]) -> None:
        """Note which tensors lie outside the decoder layers (as save_pretrained names them:
        no output head when it is tied to the embeddings) and read them, except the output head
        (the calibration forward stops after the last layer, and a 70B model's head is 2 GB)."""
        self.layer_prefixes = list(layer_prefixes)
        inside = tuple(p + "." for p in self.layer_prefixes)
        head = model.get_output_embeddings()
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        tied = head is not None and (head.weight is model.get_input_embeddings().weight
                                     or bool(getattr(text_config, "tie_word_embeddings", False)))
        head_names = {f"{n}.{p}" for n, m in model.named_modules() if m is head
                      for p, _ in m.named_parameters(recurse=False)}
        names = [n for n in model.state_dict() if not n.startswith(inside)]
        self.outside = [n for n in names if not (tied and n in head_names)]
        wanted = [n for n in self.outside if n not in head_names]  # tied: the embeddings serve
        for name, tensor in self.tensors.read(wanted, self.dtype, self.device).items():
            _assign(model, name, tensor)
        if tied:
            model.tie_weights()

    def free_outside(self, model: nn.Module) -> None:
        """Drop the embeddings once the calibration windows are embedded."""
        inside = tuple(p + "." for p in self.layer_prefixes)
        for name, module in model.named_modules():
            if name in self.layer_prefixes or name.startswith(inside):
                continue
            if any(p is not None for p in module._parameters.values()):
                module.to("meta")

    def write_outside(self) -> None:
        """Copy the tensors outside the layers from the source to the output, one at a time."""
        for name in self.outside:
            self.writer.add(name, self.tensors.read([name], self.dtype, "cpu")[name])


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def load_skeleton(ref: str | None, dtype: str, device: str) -> tuple[LoadedModel, CheckpointTensors]:
    """The model without its weights, its tokenizer and the tensors to stream from."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, description = local_model_dir(ref)
    tensors = CheckpointTensors(path)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        with init_empty_weights(include_buffers=False):  # rotary tables stay real
            model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot build {ref or path!r} to stream it: {str(err).splitlines()[0]}") from err
    for module in model.modules():
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                module._buffers[key] = buf.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, description, ref or str(path)), tensors
