"""Distillation from the dense source during `cmoe finetune --distill`: the teacher and the losses.

The carved model starts as a copy of its source with most of each FFN switched off per token, so
the source itself is the best teacher: its full next-token distribution carries far more signal
per token than the one-hot next token of the language-modelling loss (Hinton et al., 2015). The
teacher runs frozen in the same process (never copied to disk) on the same windows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import REPORT_FILE
from .errors import ModelError

log = logging.getLogger(__name__)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at `temperature`, times temperature^2 (so its
    gradients keep their size across temperatures). logits [B, T, V], any float dtype; the
    softmaxes are taken in fp32."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)  # [B*T, V]
    p = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


def hidden_mse(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over layers of the MSE between hidden states, each relative to the teacher's energy
    at that layer (deep layers' states are larger; relative errors weigh every layer alike).
    Takes the `hidden_states` tuples of both models (embeddings first, which are skipped)."""
    terms = []
    for s, t in zip(student_hidden[1:], teacher_hidden[1:]):
        t = t.float()
        terms.append((s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def teacher_reference(carved_dir: Path) -> str:
    """The dense model a checkpoint was carved from, as its carve report recorded it."""
    path = Path(carved_dir) / REPORT_FILE
    try:
        ref = json.loads(path.read_text())["meta"]["source_ref"]
    except (OSError, ValueError, KeyError, TypeError):
        ref = None
    if not ref:
        raise ModelError(
            f"{carved_dir} does not record the model it was carved from ({REPORT_FILE}): pass "
            "the dense model with --teacher"
        )
    return str(ref)


def load_teacher(ref: str, device: torch.device) -> nn.Module:
    """The dense teacher, frozen, in eval mode, fp32 on `device`."""
    from .loading import load_model

    loaded = load_model(ref, dtype="float32", device=str(device))
    if loaded.is_carved:
        raise ModelError(f"--teacher {ref} is a carved checkpoint: pass the dense source model")
    teacher = loaded.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    log.info("distilling from %s", loaded.description)
    return teacher


def check_same_vocabulary(student: nn.Module, teacher: nn.Module) -> None:
    ours = student.get_output_embeddings().weight.shape[0]
    theirs = teacher.get_output_embeddings().weight.shape[0]
    if ours != theirs:
        raise ModelError(
            f"the teacher's vocabulary ({theirs} tokens) differs from the carved model's ({ours}): "
            "pass the model it was carved from with --teacher"
        )
