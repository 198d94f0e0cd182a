"""The periodic training state of `cmoe finetune`: where it lives, what it holds of the model,
and whether a saved one belongs to the run that would resume it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

CHECKPOINT_FORMAT = 1  # version of the periodic training state file
# Fields that may differ between an interrupted run and its resumption: they change neither the
# arithmetic nor the order of the data.
RESUMABLE_CHANGES = ("save_every", "gradient_checkpointing")


def state_path(out: Path) -> Path:
    """Where the periodic training state of a run writing `out` lives (beside `out`)."""
    out = Path(out)
    return out.parent / f".{out.name}.finetune-state.safetensors"  # never a pickle: state_io


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def router_biases(mlps) -> torch.Tensor:
    return torch.stack([m.router.bias.detach().cpu().clone() for m in mlps])  # [L, Nr]


def check_resumable(state: dict, identity: dict) -> None:
    """Refuse a saved state that belongs to a different run, naming what differs."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"training state format {state.get('format')} is not {CHECKPOINT_FORMAT}")
    saved, now = dict(state["identity"]), dict(identity)
    for key in RESUMABLE_CHANGES:
        saved["config"].pop(key, None)
        now["config"].pop(key, None)
    diffs = [f"{k}: {saved['config'].get(k)!r} -> {v!r}" for k, v in now["config"].items()
             if saved["config"].get(k) != v]
    diffs += [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items()
              if k != "config" and saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            "the saved training state belongs to a different run (" + "; ".join(diffs) + "): "
            "rerun with the same options, or without --resume and with --overwrite to start over"
        )


def checkpoint_fingerprint(carved_dir: Path) -> dict:
    """What identifies the carved checkpoint a run trains: its weight files and their sizes."""
    files = sorted(carved_dir.glob("*.safetensors"))
    return {"weights": [(f.name, f.stat().st_size) for f in files]}
