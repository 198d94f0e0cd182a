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
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .balance import RoutingRecorder, apply_bias_update, carved_mlps, max_over_mean
from .checkpoint import check_output_dir, load_carved, read_cmoe_config
from .cpu_threads import thread_split
from .errors import CheckpointError
from .finetune_config import (  # noqa: F401 (the public names, importable from here as before)
    ATTENTION_PROJECTIONS,
    EXPERT_PARAMETERS,
    FinetuneConfig,
    FinetuneError,
    FinetuneResult,
    StepInfo,
)
from .finetune_output import write_output
from .finetune_state import (  # noqa: F401 (state_path: importable from here as before)
    CHECKPOINT_FORMAT,
    check_resumable,
    checkpoint_fingerprint,
    router_biases,
    state_path,
    trainable_state,
)
from .finetune_trainable import (  # noqa: F401 (importable from here as before)
    lora_targets,
    lr_factor,
    parameter_groups,
    prepare_trainable,
    step_plan,
    wrap_lora,
)
from .preflight import check_finetune_inputs
from .progress import progress_bar
from .state_io import load_state, save_state
from .teacher_targets import (
    TEACHER_CACHE_BYTES,
    TeacherTargets,
    batch_order,
    cacheable,
    overlap_steps,
)

log = logging.getLogger(__name__)

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
    with run.teacher_stopped_on_exit():
        run.cache_teacher(progress, start)
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
        write_output(final, run.tokenizer, carved_dir, out, cmoe, config, run.source, summary,
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
    # The teacher's top-k targets of every window (--distill-topk), made once (with
    # --teacher-beside, beside the steps before `teacher_until`); the teacher is then dropped.
    # None: the teacher runs at every step.
    teacher_targets: TeacherTargets | None = None
    teacher_until: int = 0  # the step before which the teacher's thread is joined
    threads: int = 0  # the CPU threads to train on once the teacher's thread is joined
    history: dict = field(
        default_factory=lambda: {"losses": [], "load": [], "seconds": 0.0, "resumed_at": []}
    )

    @classmethod
    def prepare(cls, carved_dir: Path, cmoe: dict, config: FinetuneConfig, data_dir, cpu) -> _Run:
        """Load the model and the data, wrap for the mode, build the optimizer."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import AutoTokenizer

        from .data import resolve_text
        from .text_windows import calibration_windows
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
            "source": checkpoint_fingerprint(carved_dir),
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
            "trainable": trainable_state(self.accelerator.unwrap_model(self.model)),
            "router_bias": router_biases(self.mlps),
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

    def cache_teacher(self, progress: bool, start: int = 0) -> None:
        """The teacher's top-k targets of every window, once (`teacher_targets`): the epochs
        after the first cost no teacher forward, and no step holds both models' logits. With
        --teacher-beside on a CPU the teacher starts in its own thread, half the CPU threads
        each for it and for the steps until `teacher_until`; otherwise it runs to the end
        first. Not with --distill-hidden (its targets are the teacher's hidden states at every
        step) nor where the targets would take more than TEACHER_CACHE_BYTES."""
        config, teacher = self.config, self.teacher
        if teacher is None or not config.distill_topk or config.distill_hidden > 0:
            if teacher is not None and config.teacher_beside:
                log.info("--teacher-beside has no targets to make: the teacher runs at every step")
            return
        n, length = self.windows.shape
        k = min(config.distill_topk, teacher.get_output_embeddings().weight.shape[0] - 1)
        if not cacheable(n, length, k):
            log.info("the teacher's targets would not fit in %.1f GiB: it runs at every step",
                     TEACHER_CACHE_BYTES / 2**30)
            return
        acc = self.accelerator
        targets = TeacherTargets(teacher, self.windows, config.batch_size, k,
                                 config.temperature, acc.device)
        self.teacher_targets = targets
        order = batch_order(n, config.batch_size, self.plan, start)
        self.teacher_until = overlap_steps(n, config, self.plan, start, acc.device,
                                           acc.num_processes)
        # The steps this process trains beside the teacher (a resumed run: its own).
        self.history["teacher_beside_steps"] = self.teacher_until - start
        if self.teacher_until > start:
            self.threads = torch.get_num_threads()
            student, teacher_threads = thread_split(self.threads)
            torch.set_num_threads(student)
            targets.start(order, teacher_threads)
        else:
            if config.teacher_beside and start == 0:
                log.info("--teacher-beside needs a CPU, one process and two or more threads: "
                         "the teacher runs first")
            targets.make(order, progress and self.main)
            self._teacher_done()

    def _teacher_done(self) -> None:
        """Wait for the teacher's last target, drop the teacher, train on every thread again."""
        targets = self.teacher_targets
        if targets is None or targets.teacher is None:
            return
        try:
            targets.join()
        finally:
            if self.threads:
                torch.set_num_threads(self.threads)
        targets.release()
        self.teacher = None
        self.history["teacher_seconds"] = self.history.get("teacher_seconds", 0.0) + targets.seconds

    @contextlib.contextmanager
    def teacher_stopped_on_exit(self):
        """If training ends early (an error, an interrupt), stop the teacher's thread and give
        the process its CPU threads back."""
        try:
            yield
        finally:
            targets = self.teacher_targets
            if targets is not None and targets.teacher is not None:  # not joined
                targets.stop()
                if self.threads:
                    torch.set_num_threads(self.threads)

    def step(self, index: int, recorder: RoutingRecorder, first: bool) -> tuple[float, torch.Tensor]:
        """One optimizer step and the bias update after it: (mean loss, routing counts [L, Nr])."""
        acc, config, micro_batches = self.accelerator, self.config, self.plan[index]
        rank, bs = acc.process_index, config.batch_size
        loss_sum = torch.zeros((), device=acc.device)
        for j, idx in enumerate(micro_batches):
            mine = idx[rank * bs : (rank + 1) * bs]
            ids = self.windows[mine].to(acc.device)  # [B, T]
            last = j == len(micro_batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                loss = self._loss(ids, mine)
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

    def _loss(self, ids: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro-batch ids [B, T] (rows `windows` of self.windows):
        next-token cross-entropy, or with --distill the KL divergence from the teacher (over its
        top-k ids with --distill-topk; plus the hidden-state term)."""
        config = self.config
        if not config.distill:
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss
        from .distill import (
            SparseTargets,
            distill_loss,
            hidden_mse,
            sparse_distill_loss,
            sparse_targets,
        )

        hidden = config.distill_hidden > 0
        ref = None
        if self.teacher_targets is not None:
            targets = self.teacher_targets.get(windows.tolist())
            targets = SparseTargets(*(t.to(ids.device) for t in targets.tensors()))
        else:
            with torch.no_grad():
                ref = self.teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            targets = (sparse_targets(ref.logits, config.distill_topk, config.temperature)
                       if config.distill_topk else None)
        out = self.model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        if targets is not None:
            loss = sparse_distill_loss(out.logits, targets, ids, config.temperature,
                                       config.distill_ce)
        else:
            loss = distill_loss(out.logits, ref.logits, ids, config.temperature,
                                config.distill_ce)
        if hidden:
            loss = loss + config.distill_hidden * hidden_mse(out.hidden_states, ref.hidden_states)
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
        targets = self.teacher_targets
        with RoutingRecorder(self.mlps) as recorder, progress_bar(
            total, "finetuning", enabled=progress and self.main
        ) as bar:
            bar.advance(start)
            for index in range(start, total):
                step_start = time.perf_counter()  # a wait for the teacher counts as training
                if index == self.teacher_until:
                    self._teacher_done()
                loss, counts = self.step(index, recorder, first=index == start)
                balance = max_over_mean(counts).mean().item()  # mean over layers
                run_tokens += len(self.plan[index]) * self.tokens_per_micro
                self.history["losses"].append(loss)
                self.history["load"].append(round(balance, 4))
                self.history["seconds"] += time.perf_counter() - step_start
                tok_s = run_tokens / (time.perf_counter() - run_start)
                info = f"loss {loss:.3f} | {tok_s:,.0f} tok/s | load max/mean {balance:.2f}"
                if targets is not None and targets.running:
                    info += f" | teacher {targets.made}/{targets.batches}"
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
            self._teacher_done()  # a plan no longer than the steps beside the teacher
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
