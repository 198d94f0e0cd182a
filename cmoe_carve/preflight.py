"""What each writing command checks before it loads anything: seconds, not minutes, to a
one-line error about a wrong output path, a broken model, a device or a dtype."""

from __future__ import annotations

from pathlib import Path

from .atomic import check_not_input, check_output_dir, probe_writable
from .text_windows import require_within_context
from .errors import CheckpointError, ModelError
from .loading import is_carved_dir, parse_dtype
from .validate import check_device, check_model_dir


def check_carve_inputs(
    model: str | None, out: Path, overwrite: bool, *, dtype: str, device: str,
    device_map: str | None, seqlen: int | None = None,
) -> None:
    """`cmoe carve`: a dense source, a usable dtype/device and an --out that can be written."""
    parse_dtype(dtype)
    if not device_map:
        check_device(device)
    if model is not None and Path(model).expanduser().is_dir():
        path = Path(model).expanduser()
        values = check_model_dir(path)
        if is_carved_dir(path):
            raise ModelError(f"{model} is already carved: pass the dense source model")
        if seqlen is not None:
            require_within_context(seqlen, config_context(values))
    check_not_input(out, [model])
    check_output_dir(out, overwrite)
    probe_writable(out)


def check_finetune_inputs(carved_dir: Path, out: Path, overwrite: bool) -> None:
    """`cmoe finetune`: a complete carved checkpoint and an --out that can be written."""
    if not Path(carved_dir).is_dir():
        raise CheckpointError(
            f"{carved_dir} is not a directory: pass a carved checkpoint (from `cmoe carve`)"
        )
    check_model_dir(carved_dir)
    if not is_carved_dir(Path(carved_dir)):
        raise CheckpointError(
            f"{carved_dir} is a dense model, not a carved checkpoint: run `cmoe carve` first"
        )
    check_not_input(out, [carved_dir])
    check_output_dir(out, overwrite)
    probe_writable(out)


def config_context(values: dict) -> int | None:
    """max_position_embeddings of a config.json (of its text config for multimodal models)."""
    text = values.get("text_config") if isinstance(values.get("text_config"), dict) else values
    context = text.get("max_position_embeddings")
    return int(context) if isinstance(context, int) and context > 0 else None
