"""Distillation from the dense source during `cmoe finetune --distill`: the teacher and the losses.

The carved model starts as a copy of its source with most of each FFN switched off per token, so
the source itself is the best teacher: its full next-token distribution carries far more signal
per token than the one-hot next token of the language-modelling loss (Hinton et al., 2015). The
teacher runs frozen in the same process (never copied to disk) on the same windows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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


# Rows of the logits handled at once by the fused loss: 256 x 49,152 fp32 is 50 MB of temporaries
# instead of the several full [B*T, V] copies autograd keeps for log_softmax and kl_div.
LOSS_CHUNK_ROWS = 256


class _DistillLoss(torch.autograd.Function):
    """KL(teacher || student) at a temperature plus the weighted next-token cross-entropy, with
    the gradient computed in the same pass over the logits, chunk by chunk of rows. Autograd's
    version keeps the student's log-probabilities twice (KL and cross-entropy) and the teacher's
    beside the logits, [B*T, V] fp32 each (1 GB apiece for a 128k vocabulary at 2,048 tokens);
    this one keeps one gradient buffer of that size. On SmolLM2 (512 tokens, V 49,152, 2 CPU
    cores) both take about 0.6 s per step: the softmaxes' exponentials, not memory traffic, set
    the time there."""

    @staticmethod
    def forward(ctx, logits, teacher_logits, targets, temperature, ce_weight):
        rows = logits.shape[0]
        valid = targets >= 0
        with_target = int(valid.sum())
        t = float(temperature)
        grad = torch.empty_like(logits)
        kd_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, rows, LOSS_CHUNK_ROWS):
            part = slice(start, start + LOSS_CHUNK_ROWS)
            s = logits[part].float()
            log_q = F.log_softmax(s / t, dim=-1)
            log_p = F.log_softmax(teacher_logits[part].float() / t, dim=-1)
            p = log_p.exp()
            q = log_q.exp()
            kd_sum += (p * (log_p - log_q)).sum(dtype=torch.float64)
            # d/ds of t^2 * KL(p_t || q_t) is t * (q_t - p_t)
            g = (q - p).mul_(t / rows)
            if ce_weight and with_target:
                log_q1 = log_q if t == 1.0 else F.log_softmax(s, dim=-1)
                q1 = q if t == 1.0 else log_q1.exp()
                here = valid[part].nonzero(as_tuple=True)[0]
                tgt = targets[part][here]
                ce_sum -= log_q1[here, tgt].sum(dtype=torch.float64)
                # d/ds of the mean cross-entropy: (softmax - one-hot) / tokens with a target
                w = ce_weight / with_target
                g.index_add_(0, here, q1[here], alpha=w)
                g[here, tgt] -= w
            grad[part] = g.to(grad.dtype)
        ctx.save_for_backward(grad)
        loss = kd_sum * (t * t) / rows
        if ce_weight and with_target:
            loss = loss + ce_weight * ce_sum / with_target
        return loss.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """`kd_loss` plus `ce_weight` times the next-token cross-entropy (each position predicts the
    next id of its window, the last predicts nothing: transformers' causal-LM loss), fused into
    one pass over the logits. logits [B, T, V], input_ids [B, T]."""
    vocab = student_logits.shape[-1]
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    return _DistillLoss.apply(
        student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab).detach(),
        targets.reshape(-1), temperature, ce_weight,
    )


# Teacher probabilities kept per token by default (`--distill-topk`): the KL then runs over
# these and one bucket for the rest of the vocabulary, so a step costs about what the
# cross-entropy alone costs, and the teacher's targets fit in memory to be reused.
DEFAULT_TOPK = 128


@dataclass
class SparseTargets:
    """The teacher's distribution at a temperature, cut to each token's k most likely ids plus
    one bucket for the rest: log_p [N, k] fp32 (log-probabilities of ids [N, k]) and
    log_tail [N] fp32 (log of the mass outside them)."""

    log_p: torch.Tensor
    ids: torch.Tensor
    log_tail: torch.Tensor

    @staticmethod
    def empty(rows: int, k: int, device=None) -> "SparseTargets":
        """Room for the targets of `rows` tokens, in the dtypes `sparse_targets` makes."""
        return SparseTargets(torch.empty(rows, k, dtype=torch.float32, device=device),
                             torch.empty(rows, k, dtype=torch.long, device=device),
                             torch.empty(rows, dtype=torch.float32, device=device))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.log_p, self.ids, self.log_tail

    def __getitem__(self, rows) -> "SparseTargets":
        return SparseTargets(*(t[rows] for t in self.tensors()))

    def __setitem__(self, rows, value: "SparseTargets") -> None:
        for mine, theirs in zip(self.tensors(), value.tensors()):
            mine[rows] = theirs

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @staticmethod
    def cat(parts: list["SparseTargets"]) -> "SparseTargets":
        return SparseTargets(*(torch.cat(ts) for ts in zip(*(p.tensors() for p in parts))))


def sparse_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTargets:
    """The teacher's top-k log-probabilities at `temperature` and its tail mass, per row of
    logits [N, V] (or [B, T, V], flattened), in chunks of LOSS_CHUNK_ROWS rows."""
    logits = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    k = min(k, logits.shape[-1] - 1)  # at least one id in the tail keeps its log finite
    parts = []
    for start in range(0, logits.shape[0], LOSS_CHUNK_ROWS):
        log_p = F.log_softmax(logits[start : start + LOSS_CHUNK_ROWS].float() / temperature, dim=-1)
        top, ids = log_p.topk(k, dim=-1)
        # The tail summed from its own entries, not as 1 - sum(top): that difference loses
        # every digit when the top ids hold nearly all the mass.
        tail = log_p.scatter_(-1, ids, float("-inf")).logsumexp(-1)
        parts.append(SparseTargets(top, ids, tail))
    return SparseTargets.cat(parts)


class _SparseDistillLoss(torch.autograd.Function):
    """As `_DistillLoss`, against `SparseTargets`: KL(p || q) over the k ids of each token and
    one bucket for the rest (the teacher's tail mass against the student's), a lower bound of
    the full KL that equals it when the teacher's tail follows the student's shape. Its
    gradient, t * (q - p) on the k ids and t * q_j (1 - p_tail / q_tail) elsewhere, needs no
    softmax of the teacher: the step's only pass of exponentials is the student's own."""

    @staticmethod
    def forward(ctx, logits, log_p, ids, log_tail, targets, temperature, ce_weight):
        rows = logits.shape[0]
        valid = targets >= 0
        with_target = int(valid.sum())
        t = float(temperature)
        grad = torch.empty_like(logits)
        kd_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, rows, LOSS_CHUNK_ROWS):
            part = slice(start, start + LOSS_CHUNK_ROWS)
            s = logits[part].float()
            log_q = F.log_softmax(s if t == 1.0 else s / t, dim=-1)
            lp, ix, lt = log_p[part].float(), ids[part], log_tail[part].float()
            p = lp.exp()
            p_tail = lt.exp()
            # The gradient is built in place in its own rows of `grad` (fp32 logits): q, then q
            # with the top ids zeroed gives the student's tail mass from its own entries (as in
            # sparse_targets), is then scaled row by row and gets the top ids' values.
            g = grad[part] if grad.dtype == torch.float32 else torch.empty_like(log_q)
            torch.exp(log_q, out=g)
            q_top, log_q_top = g.gather(-1, ix), log_q.gather(-1, ix)
            g.scatter_(-1, ix, 0.0)
            log_q_tail = g.sum(-1).clamp_min(torch.finfo(torch.float32).tiny).log()
            kd_sum += (p * (lp - log_q_top)).sum(dtype=torch.float64)
            kd_sum += (p_tail * (lt - log_q_tail)).sum(dtype=torch.float64)
            scale = t / rows
            tail_coef = (1.0 - (lt - log_q_tail).exp()) * scale  # [r]
            top_val = (q_top - p) * scale  # [r, k]
            here = tgt = None
            if ce_weight and with_target:
                here = valid[part].nonzero(as_tuple=True)[0]
                tgt = targets[part][here]
                w = ce_weight / with_target
            if here is not None and t == 1.0:
                # d/ds of the mean cross-entropy, (q - one-hot) * w on rows with a target,
                # folded into the same row scale and top values: no second pass over q.
                ce_sum -= log_q[here, tgt].sum(dtype=torch.float64)
                b = valid[part].to(g.dtype) * w
                tail_coef += b
                top_val += b[:, None] * q_top
            g.mul_(tail_coef[:, None]).scatter_(-1, ix, top_val)
            if here is not None and t == 1.0:
                g[here, tgt] -= w
            elif here is not None:
                log_q1 = F.log_softmax(s, dim=-1)
                ce_sum -= log_q1[here, tgt].sum(dtype=torch.float64)
                g.index_add_(0, here, log_q1[here].exp(), alpha=w)
                g[here, tgt] -= w
            if g.data_ptr() != grad[part].data_ptr():
                grad[part] = g.to(grad.dtype)
        ctx.save_for_backward(grad)
        loss = kd_sum * (t * t) / rows
        if ce_weight and with_target:
            loss = loss + ce_weight * ce_sum / with_target
        return loss.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None


def sparse_distill_loss(
    student_logits: torch.Tensor,
    teacher: SparseTargets,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """`distill_loss` against the teacher's top-k targets (rows in the order of the flattened
    logits [B, T, V]) instead of its full logits."""
    vocab = student_logits.shape[-1]
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    return _SparseDistillLoss.apply(
        student_logits.reshape(-1, vocab), teacher.log_p, teacher.ids, teacher.log_tail,
        targets.reshape(-1), temperature, ce_weight,
    )


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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (else bf16 is emulated, and slower
    than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch's own probes (private, hence the getattr): AVX-512 BF16 or AMX tiles.
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_teacher_dtype(choice: str, device: torch.device) -> str:
    """auto: bf16 where the hardware has it, else fp32. The teacher only runs forward without
    gradients, so bf16 weights cost nothing in the student's arithmetic: on SmolLM2-135M its
    logits move the distribution by a KL of 0.002 nats per token from fp32's, against about 1 nat
    between the carved student and the teacher, and its forward takes 0.41x the time on an
    AVX-512 BF16 CPU (2 cores, 512 tokens: 0.48 s vs 1.17 s)."""
    if choice == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return {"bf16": "bfloat16", "fp32": "float32"}[choice]


def load_teacher(ref: str, device: torch.device, dtype: str = "float32") -> nn.Module:
    """The dense teacher, frozen, in eval mode, in `dtype` on `device`."""
    from .loading import load_model

    loaded = load_model(ref, dtype=dtype, device=str(device))
    if loaded.is_carved:
        raise ModelError(f"--teacher {ref} is a carved checkpoint: pass the dense source model")
    teacher = loaded.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    log.info("distilling from %s (%s)", loaded.description, dtype)
    return teacher


def check_same_vocabulary(student: nn.Module, teacher: nn.Module) -> None:
    ours = student.get_output_embeddings().weight.shape[0]
    theirs = teacher.get_output_embeddings().weight.shape[0]
    if ours != theirs:
        raise ModelError(
            f"the teacher's vocabulary ({theirs} tokens) differs from the carved model's ({ours}): "
            "pass the model it was carved from with --teacher"
        )
