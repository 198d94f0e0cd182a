"""Lightweight recovery of a carved model: LoRA + router scale + aux-loss-free load balancing.

What trains (`mode`):
  * lora: LoRA adapters (peft) on the attention projections q/k/v/o and on every expert's stacked
    gate/up and down weights (peft's `target_parameters`: one rank-r adapter per expert), plus the
    router's per-expert scale `u`; the adapters are merged into the weights at the end.
  * router: only `u`.
  * full: every weight of the model, `u` included.
In every mode the routers' selection biases follow the aux-loss-free update after each optimizer
step (`balance.py`), and they are saved in the checkpoint, so inference routes with them.

The loop runs on `accelerate`: the same code on a CPU, one GPU, or several GPUs under
`accelerate launch` (DDP, one shard of each global batch per process). State is saved every
`save_every` steps next to the output (`.NAME.finetune-state.pt`); `resume=True` continues from
it and, given the same configuration, ends in exactly the state of an uninterrupted run. The
output is a plain carved checkpoint written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from . import __version__
from .balance import RoutingRecorder, apply_bias_update, carved_mlps, max_over_mean
from .checkpoint import (
    REPORT_FILE,
    atomic_directory,
    check_output_dir,
    load_carved,
    read_cmoe_config,
    save_carved,
)
from .atomic import holds_output_lock
from .errors import CheckpointError, CmoeError
from .preflight import check_finetune_inputs
from .progress import progress_bar
from .state_io import load_state, save_state

log = logging.getLogger(__name__)

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

CHECKPOINT_FORMAT = 1  # version of the periodic training state file
# Fields that may differ between an interrupted run and its resumption: they change neither the
# arithmetic nor the order of the data.
RESUMABLE_CHANGES = ("save_every", "gradient_checkpointing")


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
    epochs: int = field(default=1, metadata={"help": "passes over the windows"})
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
    gamma: float = field(
        default=1e-3, metadata={"help": "load-balancing bias step per optimizer step (0: off)"}
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
        _choice(self.mode, Mode, "--mode")
        _choice(self.precision, Precision, "--precision")
        _choice(self.schedule, Schedule, "--schedule")
        _choice(self.teacher_dtype, TeacherDtype, "--teacher-dtype")
        positive = {
            "--samples": self.samples, "--epochs": self.epochs, "--batch-size": self.batch_size,
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
        if not self.distill and (
            self.teacher is not None or self.distill_hidden > 0 or self.distill_ce
            or self.teacher_dtype != "auto"
        ):
            raise FinetuneError(
                "--teacher, --teacher-dtype, --distill-hidden and --distill-ce need --distill: "
                "add it or drop them"
            )
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


# ----------------------------------------------------------------------------------------------
# What trains


def lora_targets(cmoe: dict) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) for peft: attention projections by module name, the
    stacked expert weights of every carved MLP by full parameter name."""
    params = [f"{name}.{p}" for name in cmoe["mlp_names"] for p in EXPERT_PARAMETERS]
    return list(ATTENTION_PROJECTIONS), params


def wrap_lora(model: nn.Module, cmoe: dict, config: FinetuneConfig) -> nn.Module:
    """The model with LoRA adapters (peft), everything else frozen."""
    from peft import LoraConfig, get_peft_model

    modules, params = lora_targets(cmoe)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,  # peft cannot apply dropout to a LoRA on a bare nn.Parameter
        target_modules=modules,
        target_parameters=params,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return get_peft_model(model, lora)
    except ValueError as err:  # peft's "not found" errors, e.g. a family with other names
        raise FinetuneError(
            f"cannot place LoRA adapters on {', '.join(modules)} and the experts' "
            f"{', '.join(EXPERT_PARAMETERS)}: {err}"
        ) from err


def prepare_trainable(model: nn.Module, cmoe: dict, config: FinetuneConfig) -> nn.Module:
    """Wrap and (un)freeze for `config.mode`; the router scales train in every mode.

    The official CMoE code wraps with PEFT after making `u` trainable, and PEFT then freezes it;
    here `u` is made trainable after wrapping, and the first step checks that it gets gradients.
    """
    if config.mode == "lora":
        model = wrap_lora(model, cmoe, config)
    else:
        for p in model.parameters():
            p.requires_grad_(config.mode == "full")
    for mlp in carved_mlps(model):
        mlp.router.scale.requires_grad_(True)
    return model


def parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict]:
    """Adam groups: the router scales at router_lr, every other trainable weight at the main lr."""
    scales = {id(mlp.router.scale) for mlp in carved_mlps(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    main = [p for p in trainable if id(p) not in scales]
    groups = [{"params": [p for p in trainable if id(p) in scales], "lr": config.router_lr,
               "name": "router_scale"}]
    if main:
        groups.append({"params": main, "lr": config.main_lr, "name": config.mode})
    return groups


def lr_factor(step: int, total: int, config: FinetuneConfig) -> float:
    """Multiplier of every group's lr before optimizer step `step` (0-based): linear warmup over
    warmup_ratio of the steps, then constant, cosine or linear decay to 10% of the peak."""
    warmup = int(config.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.schedule == "constant" or total - warmup <= 1:
        return 1.0
    progress = (step - warmup) / (total - warmup - 1)  # 0 .. 1
    if config.schedule == "linear":
        return 1.0 - 0.9 * progress
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Data order


def step_plan(
    n_windows: int, batch_size: int, grad_accum: int, epochs: int, world: int, seed: int
) -> list[list[torch.Tensor]]:
    """Window indices of every micro-batch of every optimizer step, fixed by the seed.

    Each epoch draws a permutation (seed + epoch); it is cut into global micro-batches of
    batch_size * world windows (a remainder is left out), grouped grad_accum at a time into
    steps (the last step of an epoch may hold fewer). Process r uses rows r*batch_size ...
    """
    global_batch = batch_size * world
    per_epoch = n_windows // global_batch
    if per_epoch == 0:
        raise FinetuneError(
            f"--samples {n_windows} is fewer than one global batch of {global_batch} windows "
            f"(--batch-size {batch_size} x {world} processes): raise --samples"
        )
    plan: list[list[torch.Tensor]] = []
    for epoch in range(epochs):
        order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + epoch))
        micro = [order[i * global_batch : (i + 1) * global_batch] for i in range(per_epoch)]
        plan += [micro[i : i + grad_accum] for i in range(0, per_epoch, grad_accum)]
    return plan


# ----------------------------------------------------------------------------------------------
# Resumable state


def state_path(out: Path) -> Path:
    """Where the periodic training state of a run writing `out` lives (beside `out`)."""
    out = Path(out)
    return out.parent / f".{out.name}.finetune-state.safetensors"  # never a pickle: state_io


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _router_biases(mlps) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------
# The run


def _precision(config: FinetuneConfig, cpu: bool) -> str:
    """accelerate's mixed_precision for the config and the device."""
    if config.precision == "fp32":
        return "no"
    if config.precision != "auto":
        return config.precision
    gpu = torch.cuda.is_available() and not cpu
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def _checkpoint_fingerprint(carved_dir: Path) -> dict:
    files = sorted(carved_dir.glob("*.safetensors"))
    return {"weights": [(f.name, f.stat().st_size) for f in files]}


def _source_report(carved_dir: Path) -> dict:
    path = carved_dir / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _saved_dtype(carved_dir: Path) -> str:
    values = json.loads((carved_dir / "config.json").read_text())
    name = str(values.get("dtype") or values.get("torch_dtype") or "float32")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


@holds_output_lock  # one writer per --out (and per state file beside it)
def finetune(
    carved_dir: str | Path,
    out: str | Path,
    config: FinetuneConfig | None = None,
    *,
    data_dir: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    cpu: bool = False,
    progress: bool = True,
    step_callback: Callable[[StepInfo], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the carved checkpoint `carved_dir` and write the merged result to `out`.

    `resume`: continue from the state saved beside `out` by an interrupted run with the same
    configuration. Without it, an existing state is an error unless `overwrite`. `cpu`: train
    on the CPU even where a GPU is present. `step_callback(StepInfo)` runs after every step.
    """
    config = config or FinetuneConfig()
    carved_dir, out = Path(carved_dir), Path(out)
    check_finetune_inputs(carved_dir, out, overwrite)
    cmoe = read_cmoe_config(carved_dir)
    # Training with MoNE on: gradients reach the kept neurons only, as at inference.
    for key in ("neuron_keep", "shared_neuron_keep"):
        if getattr(config, key) is not None:
            cmoe = {**cmoe, key: getattr(config, key)}
    check_output_dir(out, overwrite)
    state_file = state_path(out)
    if state_file.exists() and not resume and not overwrite:
        raise CheckpointError(
            f"an interrupted run left its state in {state_file}: pass --resume to continue it, "
            "or --overwrite to start over"
        )
    run = _Run.prepare(carved_dir, cmoe, config, data_dir, cpu)
    start = 0
    if resume and state_file.exists():
        start = run.restore(state_file)
    elif resume and run.main:
        log.warning("no saved state at %s: starting from the first step", state_file)
    run.train(start, state_file, progress, step_callback)

    accelerator, history = run.accelerator, run.history
    losses = history["losses"]
    summary = {
        "steps": len(run.plan),
        "tokens": sum(len(s) for s in run.plan) * run.tokens_per_micro,
        "seconds": round(history["seconds"], 2),
        "loss_first": losses[0] if losses else float("nan"),
        "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])),
    }
    if run.main:
        trained = run.n_trainable  # counted before the merge freezes every weight
        final = _merged(accelerator.unwrap_model(run.model))
        _write_output(final, run.tokenizer, carved_dir, out, cmoe, config, run.source, summary,
                      history, trained, accelerator, overwrite)
        state_file.unlink(missing_ok=True)
        log.info("fine-tuned checkpoint written to %s", out)
    accelerator.wait_for_everyone()
    return FinetuneResult(out, summary["steps"], summary["tokens"], summary["seconds"],
                          summary["loss_first"], summary["loss_last"])


@dataclass
class _Run:
    """One training run: what it holds, and the parts of its loop."""

    config: FinetuneConfig
    accelerator: Any
    model: nn.Module  # PEFT-wrapped in lora mode, prepared by accelerate
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    mlps: list  # the CarvedMLPs, in layer order
    source: Any  # the TextSource of the training windows
    windows: torch.Tensor  # [n, T] int64
    plan: list[list[torch.Tensor]]  # step -> micro-batches of window indices
    identity: dict  # what a saved state must match to be resumed
    teacher: nn.Module | None = None  # the frozen dense model of --distill
    history: dict = field(
        default_factory=lambda: {"losses": [], "load": [], "seconds": 0.0, "resumed_at": []}
    )

    @classmethod
    def prepare(cls, carved_dir: Path, cmoe: dict, config: FinetuneConfig, data_dir, cpu) -> _Run:
        """Load the model and the data, wrap for the mode, build the optimizer."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import AutoTokenizer

        from .data import calibration_windows, resolve_text
        from .evaluate import model_context_length
        from .mone import set_neuron_keep

        accelerator = Accelerator(mixed_precision=_precision(config, cpu), cpu=cpu)
        set_seed(config.seed)
        # The tokenizer needs none of the checkpoint's remote code: never prompt for it.
        model = load_carved(carved_dir, dtype="float32", device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(
            carved_dir, trust_remote_code=False, config=model.config
        )
        set_neuron_keep(model, cmoe.get("neuron_keep"), cmoe.get("shared_neuron_keep"))
        source = resolve_text(config.data, purpose="calibration", data_dir=data_dir)
        windows = calibration_windows(tokenizer, source, config.samples, config.seqlen, config.seed,
                                      context=model_context_length(model))
        plan = step_plan(len(windows), config.batch_size, config.grad_accum, config.epochs,
                         accelerator.num_processes, config.seed)
        torch.manual_seed(config.seed)  # LoRA's A matrices are drawn here
        model.config.use_cache = False
        if config.gradient_checkpointing:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        model = prepare_trainable(model, cmoe, config)
        optimizer = torch.optim.AdamW(
            parameter_groups(model, config),
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        # Stepped once per optimizer step here, not handed to accelerate (which would step it
        # once per process).
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, len(plan), config)
        )
        mlps = carved_mlps(model)
        teacher = None
        if config.distill:
            from .distill import (
                check_same_vocabulary,
                load_teacher,
                resolve_teacher_dtype,
                teacher_reference,
            )

            teacher = load_teacher(
                config.teacher or teacher_reference(carved_dir), accelerator.device,
                resolve_teacher_dtype(config.teacher_dtype, accelerator.device),
            )
            check_same_vocabulary(model, teacher)
        model, optimizer = accelerator.prepare(model, optimizer)
        identity = {
            "config": config.to_dict(),
            "data_sha256": source.sha256,
            "source": _checkpoint_fingerprint(carved_dir),
            "processes": accelerator.num_processes,
        }
        return cls(config, accelerator, model, tokenizer, optimizer, scheduler, mlps, source,
                   windows, plan, identity, teacher)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def tokens_per_micro(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes * self.config.seqlen

    def snapshot(self, step: int) -> dict:
        """Everything needed to continue after `step` optimizer steps exactly."""
        scaler = self.accelerator.scaler
        return {
            "format": CHECKPOINT_FORMAT,
            "identity": self.identity,
            "step": step,
            "trainable": _trainable_state(self.accelerator.unwrap_model(self.model)),
            "router_bias": _router_biases(self.mlps),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": self.history,
        }

    def restore(self, state_file: Path) -> int:
        """Load a snapshot saved by an interrupted run; returns the step to continue from."""
        state = load_state(state_file)
        check_resumable(state, self.identity)
        keys = self.accelerator.unwrap_model(self.model).load_state_dict(state["trainable"], strict=False)
        if keys.unexpected_keys:
            raise CheckpointError(f"the saved state has unknown weights {keys.unexpected_keys[:3]}")
        with torch.no_grad():
            for mlp, bias in zip(self.mlps, state["router_bias"]):
                mlp.router.bias.copy_(bias)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.history = state["history"]
        self.history["resumed_at"].append(state["step"])
        if self.main:
            log.info("resuming from step %d of %d (%s)", state["step"], len(self.plan), state_file)
        return state["step"]

    def step(self, index: int, recorder: RoutingRecorder, first: bool) -> tuple[float, torch.Tensor]:
        """One optimizer step and the bias update after it: (mean loss, routing counts [L, Nr])."""
        acc, config, micro_batches = self.accelerator, self.config, self.plan[index]
        rank, bs = acc.process_index, config.batch_size
        loss_sum = torch.zeros((), device=acc.device)
        for j, idx in enumerate(micro_batches):
            ids = self.windows[idx[rank * bs : (rank + 1) * bs]].to(acc.device)  # [B, T]
            last = j == len(micro_batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                loss = self._loss(ids)
                recorder.collect()  # before backward, which may recompute the layers
                acc.backward(loss / len(micro_batches))
            loss_sum += loss.detach().float()
        if first:
            _require_router_gradients(self.mlps)
        if config.max_grad_norm > 0:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            acc.clip_grad_norm_(trainable, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = acc.reduce(recorder.reset().to(acc.device), "sum").cpu()  # [L, Nr]
        if config.gamma > 0:
            apply_bias_update(self.mlps, counts, config.gamma)
        return acc.reduce(loss_sum / len(micro_batches), "mean").item(), counts

    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro-batch [B, T]: next-token cross-entropy, or with
        --distill the KL divergence from the teacher (plus the hidden-state term)."""
        if self.teacher is None:
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss
        from .distill import distill_loss, hidden_mse

        hidden = self.config.distill_hidden > 0
        with torch.no_grad():
            ref = self.teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        out = self.model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        loss = distill_loss(out.logits, ref.logits, ids, self.config.temperature,
                            self.config.distill_ce)
        if hidden:
            loss = loss + self.config.distill_hidden * hidden_mse(out.hidden_states, ref.hidden_states)
        return loss

    def train(self, start: int, state_file: Path, progress: bool, callback) -> None:
        """Steps `start`..end with a progress bar, periodic state saves and the callback."""
        total, config = len(self.plan), self.config
        if self.main:
            log.info(
                "fine-tuning (%s) %d trainable parameters on %d x %d tokens of %s: %d steps, "
                "%d process(es), %s, precision %s",
                config.mode, self.n_trainable, *self.windows.shape, self.source.describe(),
                total, self.accelerator.num_processes, self.accelerator.device,
                self.accelerator.mixed_precision,
            )
        log_every = max(1, total // 20)  # without a progress bar, about 20 log lines
        run_start, run_tokens = time.perf_counter(), 0
        self.model.train()
        with RoutingRecorder(self.mlps) as recorder, progress_bar(
            total, "finetuning", enabled=progress and self.main
        ) as bar:
            bar.advance(start)
            for index in range(start, total):
                step_start = time.perf_counter()
                loss, counts = self.step(index, recorder, first=index == start)
                balance = max_over_mean(counts).mean().item()  # mean over layers
                run_tokens += len(self.plan[index]) * self.tokens_per_micro
                self.history["losses"].append(loss)
                self.history["load"].append(round(balance, 4))
                self.history["seconds"] += time.perf_counter() - step_start
                tok_s = run_tokens / (time.perf_counter() - run_start)
                info = f"loss {loss:.3f} | {tok_s:,.0f} tok/s | load max/mean {balance:.2f}"
                bar.advance(info=info)
                done = index + 1
                if self.main and not progress and (done % log_every == 0 or done == total):
                    log.info("step %d/%d: %s", done, total, info)
                if config.save_every and done % config.save_every == 0 and done < total:
                    self.accelerator.wait_for_everyone()
                    if self.main:
                        save_state(state_file, self.snapshot(done))
                if callback is not None:
                    callback(StepInfo(done, total, loss, tok_s, balance, self.model))
        self.model.eval()
        self.accelerator.wait_for_everyone()


def _require_router_gradients(mlps) -> None:
    """The router scale must learn: fail loudly if backward gave it no gradient at all."""
    grads = [m.router.scale.grad for m in mlps]
    if all(g is None or not torch.any(g != 0) for g in grads):
        raise RuntimeError(
            "the router scales received no gradient in the first step: they would not train "
            "(check that the carved FFN's gates take part in the forward pass)"
        )


def _merged(model: nn.Module) -> nn.Module:
    """The plain carved model: LoRA adapters merged into the weights, everything frozen."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()  # writes through .data: drop caches made before
    for module in model.modules():
        if hasattr(module, "drop_caches"):
            module.drop_caches()
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    model.config.use_cache = True
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Output


def _write_output(model, tokenizer, carved_dir, out, cmoe, config, source, summary, history,
                  n_trainable, accelerator, overwrite) -> None:
    """The merged checkpoint, its loss curve and its training record, renamed into place whole."""
    model.to(device="cpu", dtype=getattr(torch, _saved_dtype(carved_dir)))
    mlps = carved_mlps(model)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {
        **summary,
        "created": created,
        "cmoe_carve_version": __version__,
        "source_checkpoint": str(carved_dir),
        "config": config.to_dict(),
        "data": {**source.to_record(), "description": source.describe()},
        "windows": config.samples,
        "trainable_parameters": n_trainable,
        "lora_targets": (list(ATTENTION_PROJECTIONS) + list(EXPERT_PARAMETERS))
        if config.mode == "lora" else [],
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "resumed_at_steps": history["resumed_at"],
        "losses": [round(v, 5) for v in history["losses"]],
        "load_max_over_mean": history["load"],
        "router_scale_abs_mean": [round(m.router.scale.abs().mean().item(), 6) for m in mlps],
        "router_bias_abs_mean": [round(m.router.bias.abs().mean().item(), 6) for m in mlps],
    }
    report = _source_report(carved_dir)
    meta = report.pop("meta", {})
    report.pop("cmoe", None)
    if "finetune" in report:
        report.setdefault("finetune_history", []).append(report.pop("finetune"))
    report["finetune"] = record
    meta = {**meta, "finetune": {k: record[k] for k in ("created", "steps", "tokens", "seconds",
                                                        "loss_first", "loss_last")}}
    cmoe = {k: v for k, v in cmoe.items() if k != "cmoe_carve_version"}
    with atomic_directory(out, overwrite) as tmp:
        save_carved(model, tokenizer, tmp, cmoe, report, meta, overwrite=True)
        plot_losses(history["losses"], tmp / "loss_curve.png", title=f"cmoe finetune ({config.mode})")
        with open(tmp / "README.md", "a") as card:
            card.write(finetune_card(record))


def plot_losses(losses: list[float], path: Path, title: str = "") -> None:
    """Training loss per optimizer step (and a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="step loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.6, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _loss_description(c: dict) -> str:
    if not c.get("distill"):
        return "next-token cross-entropy"
    text = f"KL divergence from the dense teacher's logits, temperature {c['temperature']:g}"
    if c.get("distill_hidden"):
        text += f", plus {c['distill_hidden']:g} x per-layer hidden-state MSE"
    if c.get("distill_ce"):
        text += f", plus {c['distill_ce']:g} x next-token cross-entropy"
    return text


def finetune_card(record: dict) -> str:
    """The fine-tuning section appended to the model card."""
    c = record["config"]
    what = {
        "lora": f"LoRA r={c['lora_rank']}, alpha={c['lora_alpha']:g} on q/k/v/o and every "
                "expert's gate/up and down (merged), plus the router scale u",
        "router": "the router scale u only",
        "full": "every weight, plus the router scale u",
    }[c["mode"]]
    lrs = f"router scale {c['router_lr']:g}" + (f", main {c['lr']:g}" if c["lr"] else "")
    load = record["load_max_over_mean"]
    lines = [
        "",
        "## Fine-tuning",
        "",
        "| | |",
        "|---|---|",
        f"| trained | {what} ({record['trainable_parameters']:,} parameters) |",
        f"| data | {record['data']['description']} |",
        f"| windows | {c['samples']} x {c['seqlen']} tokens, {c['epochs']} epoch(s), seed {c['seed']} |",
        (f"| steps | {record['steps']} of {c['batch_size']} x {c['grad_accum']} x "
         f"{record['processes']} window(s), {record['tokens']:,} tokens |"),
        (f"| optimizer | AdamW betas ({c['adam_beta1']}, {c['adam_beta2']}), lr {lrs}, "
         f"{c['schedule']} after {c['warmup_ratio']:g} warmup |"),
        f"| load balancing | selection-bias update, gamma {c['gamma']:g} per step |",
        f"| loss | {_loss_description(c)} |",
        (f"| training loss | {record['loss_first']:.3f} (first step) -> "
         f"{record['loss_last']:.3f} (mean of the last 10) |"),
        (f"| load max/mean | {load[0] if load else float('nan'):.2f} (first step) -> "
         f"{load[-1] if load else float('nan'):.2f} (last step), mean over layers |"),
        (f"| time | {record['seconds']:.0f} s on {record['device']}, precision "
         f"{record['mixed_precision']} |"),
        "",
        f"Loss curve: `loss_curve.png`; per-step losses in `{REPORT_FILE}` under `finetune`.",
    ]
    return "\n".join(lines) + "\n"
