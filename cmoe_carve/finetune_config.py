"""What `cmoe finetune` takes and returns: its configuration (validated on construction, recorded in
the output's report and card), the per-step information a callback sees, and the result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from torch import nn

from .errors import CmoeError

Mode = Literal["lora", "router", "full"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Schedule = Literal["constant", "cosine", "linear"]
TeacherDtype = Literal["auto", "bf16", "fp32"]

# LoRA targets. Attention projections by module name (the same in every supported family:
# Llama, Mistral, Qwen2/3, Gemma 2/3); expert weights by parameter name inside each CarvedMLP.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")

# Learning rate of the main parameters per mode (the router scale has its own, `router_lr`).
# LoRA: the paper's 5.95e-5 is tuned for 2,048 windows of 2,048 tokens; over the few hundred
# short windows a CPU affords it barely moves the adapters. SmolLM2-135M at S2A2E16 (fitted
# router), 32 windows of 512 tokens of wiki.valid.raw, mean training loss of the last 10 steps:
# 6.25 at 5.95e-5, 5.38 at 5e-4, 5.03 at 1.5e-3, 4.94 at 4e-3 (first step 6.87). 2e-3 keeps most
# of that gain with a margin from the top of the range tried.
DEFAULT_LR: dict[str, float | None] = {"lora": 2e-3, "full": 1e-5, "router": None}

class FinetuneError(CmoeError):
    """A fine-tuning configuration or state that cannot be used."""


def _choice(value, allowed, flag: str) -> None:
    choices = get_args(allowed)
    if value not in choices:
        raise FinetuneError(f"{flag} {value!r} is not one of {', '.join(choices)}")


@dataclass
class FinetuneConfig:
    """How to fine-tune a carved checkpoint. Recorded in the output's report and card."""

    mode: Mode = field(
        default="lora",
        metadata={"help": "what trains: lora (adapters + router scale), router (scale only), full"},
    )
    data: str = field(
        default="wikitext2",
        metadata={"help": "training text: wikitext2, c4, or a file (text, .raw, .jsonl, .parquet)"},
    )
    samples: int = field(default=128, metadata={"help": "training windows, drawn at random starts"})
    seqlen: int = field(default=512, metadata={"help": "tokens per training window"})
    # None: 1.5 with --distill, else 1. On SmolLM2's S2A2E16 carve (128 x 512 tokens of
    # wiki.valid.raw), WikiText-2 after --distill: 45.28 at 1.25 epochs, 44.87 at 1.5, 44.50 at 2.
    # On the 2-core AVX2 EPYCs this project runs on, 1.5 epochs took 13 min 36 s wall (session
    # 24; 15 min 42 s on session 23's slower one) and 2 epochs 18 min, over the issue's 15 minutes.
    # The teacher's targets are made once, so later epochs cost the student only.
    epochs: float | None = field(
        default=None,
        metadata={"help": "passes over the windows (a fraction such as 1.5 ends part-way "
                  "through the last); default: 1.5 with --distill, else 1"},
    )
    lr: float | None = field(
        default=None,
        metadata={"help": "learning rate of LoRA (or all weights with --mode full); "
                  "default: 2e-3 for lora, 1e-5 for full"},
    )
    router_lr: float = field(default=1e-3, metadata={"help": "learning rate of the router scale u"})
    batch_size: int = field(default=1, metadata={"help": "windows per forward pass and process"})
    grad_accum: int = field(default=1, metadata={"help": "forward passes per optimizer step"})
    seed: int = field(default=0, metadata={"help": "seed of the windows, their order and LoRA init"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scaling alpha / r)"})
    # On by default: on a 2-core AVX2 EPYC, `--distill --epochs 1.5` of SmolLM2's S2A2E16 carve
    # reached WikiText-2 44.87 with them and 48.55 without, though a step without them took
    # 0.83-0.85x the time, alternating in one process (peft folds them into whole expert
    # weights, whose gradients are computed in full).
    lora_experts: bool = field(
        default=True,
        metadata={"help": "LoRA adapters on every expert's gate/up and down weights as well as "
                  "on q/k/v/o (off: q/k/v/o only, faster steps)"},
    )
    # Off by default: on SmolLM2's S2A2E16 carve, `--distill` on 128 x 512 tokens reached
    # WikiText-2 49.85 with gamma 1e-3 (test load max/mean 1.37) and 48.09 without it (2.10).
    # Forcing even loads sends tokens to experts the fitted router ranked lower; balance matters
    # for expert-parallel serving, not for one device, and a zero bias also keeps the result
    # exactly exportable (`cmoe export` expresses a selection bias only approximately).
    gamma: float = field(
        default=0.0,
        metadata={"help": "load-balancing bias step per optimizer step (aux-loss-free, as "
                  "DeepSeek-V3; e.g. 1e-3 for expert-parallel serving); 0: off"},
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    schedule: Schedule = field(
        default="cosine", metadata={"help": "lr schedule after warmup: constant, cosine, linear"}
    )
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "fraction of the steps with a linear lr warmup"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward to save memory"}
    )
    precision: Precision = field(
        default="auto",
        metadata={"help": "auto (bf16 autocast on GPUs that support it, else fp32), bf16, fp16, fp32"},
    )
    save_every: int = field(
        default=50, metadata={"help": "optimizer steps between resumable state saves (0: never)"}
    )
    distill: bool = field(
        default=False,
        metadata={"help": "learn from the dense source model's logits (KL divergence) instead "
                  "of the next token alone; the teacher runs frozen in the same process"},
    )
    teacher: str | None = field(
        default=None,
        metadata={"help": "the dense teacher for --distill (hub id, directory or .gguf); "
                  "default: the model the checkpoint was carved from"},
    )
    teacher_dtype: TeacherDtype = field(
        default="auto",
        metadata={"help": "weights of the --distill teacher, which only runs forward: auto (bf16 "
                  "where the hardware multiplies bf16, else fp32), bf16, fp32"},
    )
    # Off by default. SmolLM2's S2A2E16 carve, `--distill` on a 2-core AVX2 EPYC (session 27,
    # the two runs one after the other): 11 min 48 s wall with it against 12 min 39 s without
    # (0.93x), but peak resident memory 3.8 against 2.8 GiB, and WikiText-2 45.07 against 44.87:
    # its first steps train on one thread, whose rounding differs from two threads', and the
    # run then follows another path (as a change of the data order would).
    teacher_beside: bool = field(
        default=False,
        metadata={"help": "on a CPU, make the --distill teacher's targets in a thread of its own "
                  "beside the first steps, one core each: less wall time where a step uses its "
                  "second core poorly, more memory (default: the teacher first, then every "
                  "step on every core)"},
    )
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of --distill"})
    distill_hidden: float = field(
        default=0.0,
        metadata={"help": "weight of the per-layer hidden-state MSE (relative to the teacher's "
                  "energy) added to the --distill loss; 0: off"},
    )
    distill_ce: float | None = field(
        default=None,
        metadata={"help": "weight of the next-token cross-entropy added to the --distill loss "
                  "(hard targets beside the teacher's soft ones); 0: off; default: 1 with "
                  "--distill"},
    )
    distill_topk: int | None = field(
        default=None,
        metadata={"help": "teacher ids kept per token by --distill (the KL runs over them and one "
                  "bucket for the rest; the targets are made once and the teacher dropped); "
                  "0: the full vocabulary at every step; default: 128 with --distill"},
    )
    neuron_keep: float | None = field(
        default=None,
        metadata={"help": "MoNE keep ratio of the routed experts to train (and save) with; "
                  "default: the checkpoint's"},
    )
    shared_neuron_keep: float | None = field(
        default=None,
        metadata={"help": "MoNE keep ratio of the shared experts; default: the checkpoint's"},
    )

    def __post_init__(self):
        if self.epochs is None:
            self.epochs = 1.5 if self.distill else 1
        _choice(self.mode, Mode, "--mode")
        _choice(self.precision, Precision, "--precision")
        _choice(self.schedule, Schedule, "--schedule")
        _choice(self.teacher_dtype, TeacherDtype, "--teacher-dtype")
        if not self.epochs > 0:
            raise FinetuneError(f"--epochs must be positive, got {self.epochs}")
        if float(self.epochs).is_integer():
            self.epochs = int(self.epochs)  # 2.0 is 2: the same run, recorded alike
        positive = {
            "--samples": self.samples, "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum, "--lora-rank": self.lora_rank,
        }
        for flag, value in positive.items():
            if value < 1:
                raise FinetuneError(f"{flag} must be at least 1, got {value}")
        if self.seqlen < 2:
            raise FinetuneError(f"--seqlen {self.seqlen} leaves no token to predict: use 2 or more")
        if self.samples < self.batch_size:
            raise FinetuneError(
                f"--samples {self.samples} is fewer than one batch of --batch-size "
                f"{self.batch_size}: raise --samples or lower --batch-size"
            )
        if self.lr is not None and self.mode == "router":
            raise FinetuneError(
                f"--lr {self.lr} has no effect with --mode router (only the router scale trains, "
                "at --router-lr): drop --lr or choose --mode lora or full"
            )
        if not self.lora_experts and self.mode != "lora":
            raise FinetuneError(
                f"--no-lora-experts chooses LoRA targets, and --mode {self.mode} trains no LoRA: "
                "drop it or use --mode lora"
            )
        if self.lr is not None and not self.lr > 0:
            raise FinetuneError(f"--lr must be positive, got {self.lr}")
        if not self.router_lr > 0:
            raise FinetuneError(f"--router-lr must be positive, got {self.router_lr}")
        if self.lora_alpha <= 0:
            raise FinetuneError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        for flag, value in {"--gamma": self.gamma, "--weight-decay": self.weight_decay,
                            "--max-grad-norm": self.max_grad_norm,
                            "--save-every": self.save_every}.items():
            if value < 0:
                raise FinetuneError(f"{flag} must be 0 or more, got {value}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise FinetuneError(
                f"adam_beta1 and adam_beta2 must lie in [0, 1), got {self.adam_beta1}, "
                f"{self.adam_beta2}"
            )
        from .mone import check_ratio

        if self.neuron_keep is not None:
            check_ratio(self.neuron_keep, "--neuron-keep")
        if self.shared_neuron_keep is not None:
            check_ratio(self.shared_neuron_keep, "--shared-neuron-keep")
        if not self.temperature > 0:
            raise FinetuneError(f"--temperature must be positive, got {self.temperature}")
        if self.distill_hidden < 0:
            raise FinetuneError(f"--distill-hidden must be 0 or more, got {self.distill_hidden}")
        if self.distill_ce is not None and self.distill_ce < 0:
            raise FinetuneError(f"--distill-ce must be 0 or more, got {self.distill_ce}")
        if self.distill_topk is not None and self.distill_topk < 0:
            raise FinetuneError(f"--distill-topk must be 0 or more, got {self.distill_topk}")
        if not self.distill and (
            self.teacher is not None or self.distill_hidden > 0 or self.distill_ce
            or self.teacher_dtype != "auto" or self.distill_topk is not None
            or self.teacher_beside
        ):
            raise FinetuneError(
                "--teacher, --teacher-dtype, --teacher-beside, --distill-hidden, --distill-ce "
                "and --distill-topk need --distill: add it or drop them"
            )
        if self.distill_topk is None:
            from .distill import DEFAULT_TOPK

            self.distill_topk = DEFAULT_TOPK if self.distill else 0
        if self.distill_ce is None:
            # With the teacher's logits alone, SmolLM2's S2A2E16 carve reached 57.10 on
            # WikiText-2; with the next token beside them, 49.65 (same data, same time).
            self.distill_ce = 1.0 if self.distill else 0.0
        if not 0 <= self.warmup_ratio < 1:
            raise FinetuneError(f"--warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")

    @property
    def main_lr(self) -> float | None:
        """The learning rate of the LoRA adapters (lora) or of all weights (full)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def to_dict(self) -> dict:
        return {**asdict(self), "lr": self.main_lr}

    @classmethod
    def help(cls, name: str) -> str:
        """The help string of a field, for the CLI."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)


@dataclass
class StepInfo:
    """What a step callback sees after each optimizer step (and its bias update)."""

    step: int  # optimizer steps done, 1-based
    total_steps: int
    loss: float  # mean training loss of the step, over all processes
    tokens_per_second: float  # since this run (or resumption) started
    load_max_over_mean: float  # mean over layers of this step's busiest expert / mean load
    model: nn.Module  # the model being trained (PEFT-wrapped in lora mode, not merged)


@dataclass
class FinetuneResult:
    path: Path
    steps: int
    tokens: int
    seconds: float  # training time, summed over resumptions
    loss_first: float
    loss_last: float
