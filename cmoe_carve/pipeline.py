"""One path from a model reference to a carved checkpoint on disk."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from .atomic import atomic_directory, holds_output_lock
from .carve import CarveConfig, carve_model
from .checkpoint import as_carved_model, save_carved, stamped, write_beside_weights
from .errors import DataError
from .loading import load_model, parse_dtype
from .preflight import check_carve_inputs
from .shards import DEFAULT_SHARD_BYTES, ShardWriter
from .streaming import StreamedLayers, decide_streaming, load_skeleton

log = logging.getLogger(__name__)


@holds_output_lock  # two carves to one --out: the second fails at once
def carve(
    model: str | None,
    out: str | Path,
    *,
    config: CarveConfig | None = None,
    calib: str = "wikitext2",
    calib_samples: int = 8,
    seqlen: int = 2048,
    seed: int = 0,
    data_dir: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stream: str = "auto",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Carve `model` (hub id, directory, .gguf, or None for the default) into `out`.

    `stream`: on reads, carves and writes one decoder layer at a time (for models larger than
    memory); auto does so when the weights would not fit comfortably; off loads the whole model.
    """
    from .data import resolve_text
    from .memory_reuse import reuse_freed_memory

    reuse_freed_memory()  # 1.6x faster on SmolLM2: see memory_reuse
    config = config or CarveConfig()
    if calib_samples < 1 or seqlen < 2:
        raise DataError("--calib-samples must be >= 1 and --seqlen >= 2")
    # Fail on an occupied, unwritable or wrong --out, a broken model or a missing text before
    # spending minutes on loading and carving.
    check_carve_inputs(model, Path(out), overwrite, dtype=dtype, device=device, device_map=device_map,
                       seqlen=seqlen)
    source = resolve_text(calib, purpose="calibration", data_dir=data_dir)
    if device_map and stream == "on":
        raise DataError("--stream on carves one layer at a time on --device; it cannot be combined "
                        "with --device-map: drop one of them")
    streaming, why = (False, "--device-map") if device_map else decide_streaming(stream, model, dtype, device)
    log.info("%s: %s", "streaming layer by layer" if streaming else "loading the whole model", why)
    if streaming:
        return _carve_streamed(model, out, config, source, calib_samples, seqlen, seed, dtype,
                               device, overwrite, progress, shard_bytes)
    loaded = load_model(model, dtype=dtype, device=device, device_map=device_map)
    if loaded.is_carved:
        raise DataError(f"{model} is already carved: pass the dense source model")
    ids = _calibration(loaded, source, calib_samples, seqlen, seed)
    log.info("carving %s at %s on %d x %d tokens", loaded.description, config.spec, *ids.shape)
    result = carve_model(loaded.model, ids, config, progress=progress)
    log.info("carved in %.1f s (model loading excluded)", result.seconds)
    meta, report = _record(loaded, source, ids, seed, dtype, result)
    path = save_carved(loaded.model, loaded.tokenizer, Path(out), result.cmoe, report, meta, overwrite)
    log.info("wrote %s", path)
    return path


def _calibration(loaded, source, calib_samples, seqlen, seed) -> torch.Tensor:
    from .text_windows import calibration_windows
    from .evaluate import model_context_length

    log.info("calibration text: %s", source.describe())
    return calibration_windows(loaded.tokenizer, source, calib_samples, seqlen, seed,
                               context=model_context_length(loaded.model))


def _carve_streamed(model, out, config, source, calib_samples, seqlen, seed, dtype, device,
                    overwrite, progress, shard_bytes) -> Path:
    """The same carve, one decoder layer in memory at a time, written shard by shard."""
    from .loading import is_carved_dir

    loaded, tensors = load_skeleton(model, dtype, device)
    if is_carved_dir(tensors.path):
        raise DataError(f"{model} is already carved: pass the dense source model")
    ids = _calibration(loaded, source, calib_samples, seqlen, seed)
    log.info("carving %s at %s on %d x %d tokens, streaming", loaded.description, config.spec, *ids.shape)
    with atomic_directory(Path(out), overwrite) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        layer_io = StreamedLayers(tensors, writer, parse_dtype(dtype), torch.device(device))
        result = carve_model(loaded.model, ids, config, progress=progress, layer_io=layer_io)
        layer_io.write_outside()
        writer.finish()
        log.info("carved in %.1f s (model loading excluded)", result.seconds)
        meta, report = _record(loaded, source, ids, seed, dtype, result)
        meta["streamed"] = True
        carved = as_carved_model(loaded.model, stamped(result.cmoe))
        write_beside_weights(carved, loaded.tokenizer, tmp, report, meta, config_too=True)
    log.info("wrote %s", out)
    return Path(out)


def _record(loaded, source, ids, seed, dtype, result) -> tuple[dict, dict]:
    record = source.to_record()
    meta = {
        "source_model": loaded.description,
        "source_ref": loaded.source,
        "calibration": {**record, "description": source.describe()},
        "calibration_windows": int(ids.shape[0]),
        "seqlen": int(ids.shape[1]),
        "calibration_tokens": result.num_tokens,
        "seed": seed,
        "dtype": dtype,
        "carve_seconds": round(result.seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "dense_beside_seconds": (None if result.dense_beside_seconds is None
                                 else round(result.dense_beside_seconds, 2)),
    }
    report = {"layers": [asdict(r) for r in result.layers]}
    return meta, report
