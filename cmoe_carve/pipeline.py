"""One path from a model reference to a carved checkpoint on disk."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from .atomic import holds_output_lock
from .carve import CarveConfig, carve_model
from .checkpoint import save_carved
from .errors import DataError
from .loading import load_model
from .preflight import check_carve_inputs

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
) -> Path:
    """Carve `model` (hub id, directory, .gguf, or None for the default) into `out`."""
    from .data import calibration_windows, resolve_text
    from .evaluate import model_context_length

    config = config or CarveConfig()
    if calib_samples < 1 or seqlen < 2:
        raise DataError("--calib-samples must be >= 1 and --seqlen >= 2")
    # Fail on an occupied, unwritable or wrong --out, a broken model or a missing text before
    # spending minutes on loading and carving.
    check_carve_inputs(model, Path(out), overwrite, dtype=dtype, device=device, device_map=device_map,
                       seqlen=seqlen)
    source = resolve_text(calib, purpose="calibration", data_dir=data_dir)
    loaded = load_model(model, dtype=dtype, device=device, device_map=device_map)
    if loaded.is_carved:
        raise DataError(f"{model} is already carved: pass the dense source model")
    log.info("calibration text: %s", source.describe())
    ids = calibration_windows(loaded.tokenizer, source, calib_samples, seqlen, seed,
                              context=model_context_length(loaded.model))
    log.info("carving %s at %s on %d x %d tokens", loaded.description, config.spec, *ids.shape)
    result = carve_model(loaded.model, ids, config, progress=progress)
    log.info("carved in %.1f s (model loading excluded)", result.seconds)
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
    }
    report = {"layers": [asdict(r) for r in result.layers]}
    path = save_carved(loaded.model, loaded.tokenizer, Path(out), result.cmoe, report, meta, overwrite)
    log.info("wrote %s", path)
    return path
