"""MoNE on carved models: neuron keep ratios, and how much of the FFN a token reads with them.

A keep ratio r makes every active expert keep, per token, its ceil(r * m) neurons of largest
|act(gate x)| (arXiv 2510.05781). The ratios live in the checkpoint's config (`cmoe.neuron_keep`
for routed experts, `cmoe.shared_neuron_keep` for shared ones; 1.0 is off) and can be changed
on a loaded model or in a checkpoint directory without carving again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from .errors import ModelError, SpecError
from .modeling_cmoe import CarvedMLP, keep_count


def check_ratio(value: float, flag: str = "--neuron-keep") -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise SpecError(f"{flag} must be in (0, 1] (a fraction of each expert's neurons; 1 is off), got {value}")
    return value


def set_neuron_keep(model: nn.Module, routed: float | None = None, shared: float | None = None) -> dict:
    """Set the keep ratios of every carved FFN of `model` (None leaves one as it is), and in its
    config so that a save keeps them. Returns the updated `cmoe` config."""
    mlps = [m for m in model.modules() if isinstance(m, CarvedMLP)]
    if not mlps:
        raise ModelError("neuron keep ratios apply to carved models: carve the model first (cmoe carve)")
    cmoe = dict(getattr(model.config, "cmoe", {}))
    for mlp in mlps:
        mlp.drop_caches()
    for key, value, flag in (("neuron_keep", routed, "--neuron-keep"),
                             ("shared_neuron_keep", shared, "--shared-neuron-keep")):
        if value is None:
            continue
        value = check_ratio(value, flag)
        for mlp in mlps:
            setattr(mlp, key, value)
        cmoe[key] = value
    model.config.cmoe = cmoe
    return cmoe


def rewrite_neuron_keep(path: str | Path, routed: float | None, shared: float | None) -> dict:
    """Change the keep ratios stored in a carved checkpoint directory (config.json, and the
    modeling code refreshed; the weights do not change). Files are written beside the old ones
    and renamed over them."""
    from .checkpoint import MODELING_FILE, modeling_source, read_carved_config

    values = read_carved_config(Path(path))
    if routed is not None:
        values["cmoe"]["neuron_keep"] = check_ratio(routed, "the neuron keep ratio")
    if shared is not None:
        values["cmoe"]["shared_neuron_keep"] = check_ratio(shared, "the shared keep ratio (--shared)")
    _replace_file(Path(path) / "config.json", json.dumps(values, indent=2, sort_keys=True) + "\n")
    # Checkpoints carved before MoNE existed ship modeling code that ignores the ratios:
    # bring it up to date so that plain transformers honours them too.
    _replace_file(Path(path) / MODELING_FILE, modeling_source(values["cmoe"]))
    return values["cmoe"]


def _replace_file(target: Path, text: str) -> None:
    """Write `text` beside `target`, then rename it over it (same permissions)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        if target.exists():
            shutil.copymode(target, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _expert_read(ratio: float, m: int) -> float:
    """Fraction of one expert's weights a token reads: all gate rows (to rank the neurons), and
    the kept neurons' rows of up and down."""
    return (m + 2 * keep_count(ratio, m)) / (3 * m)


def _mean_top_k(cmoe: dict) -> float:
    top_k = cmoe["top_k"]
    return sum(top_k) / len(top_k) if isinstance(top_k, list) else float(top_k)


def ffn_read_fraction(cmoe: dict) -> float:
    """Fraction of the FFN's weights a token reads (the decode cost), for a carved config."""
    m, experts, shared = cmoe["expert_size"], cmoe["num_experts"], cmoe["num_shared"]
    routed_read = _expert_read(cmoe.get("neuron_keep", 1.0), m)
    shared_read = _expert_read(cmoe.get("shared_neuron_keep", 1.0), m)
    return (shared * shared_read + _mean_top_k(cmoe) * routed_read) / experts


def ffn_active_fraction(cmoe: dict) -> float:
    """Fraction of the FFN's neurons that contribute to a token's output."""
    m, experts, shared = cmoe["expert_size"], cmoe["num_experts"], cmoe["num_shared"]
    routed = keep_count(cmoe.get("neuron_keep", 1.0), m) / m
    shared_kept = keep_count(cmoe.get("shared_neuron_keep", 1.0), m) / m
    return (shared * shared_kept + _mean_top_k(cmoe) * routed) / experts
