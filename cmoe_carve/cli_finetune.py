"""`cmoe finetune`: options to FinetuneConfig, then the library's fine-tuning loop."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .finetune import FinetuneConfig


def _h(name: str) -> str:
    """The help of a FinetuneConfig field (kept with the field), as a sentence."""
    text = FinetuneConfig.help(name)
    return text[0].upper() + text[1:] + "."


def finetune_command(
    carved: Path = typer.Argument(..., help="Carved checkpoint directory (from `cmoe carve`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the fine-tuned checkpoint to."),
    data: str = typer.Option("wikitext2", help=_h("data")),
    samples: int = typer.Option(128, help=_h("samples")),
    seqlen: int = typer.Option(512, help=_h("seqlen")),
    epochs: Optional[float] = typer.Option(None, help=_h("epochs"), show_default=False),
    mode: str = typer.Option("lora", help=_h("mode")),
    lr: Optional[float] = typer.Option(None, help=_h("lr") , show_default=False),
    router_lr: float = typer.Option(1e-3, help=_h("router_lr")),
    batch_size: int = typer.Option(1, help=_h("batch_size")),
    grad_accum: int = typer.Option(1, help=_h("grad_accum")),
    seed: int = typer.Option(0, help=_h("seed")),
    lora_rank: int = typer.Option(8, help=_h("lora_rank")),
    lora_alpha: float = typer.Option(32.0, help=_h("lora_alpha")),
    lora_experts: bool = typer.Option(True, help=_h("lora_experts")),
    gamma: float = typer.Option(0.0, help=_h("gamma")),
    schedule: str = typer.Option("cosine", help=_h("schedule")),
    warmup_ratio: float = typer.Option(0.05, help=_h("warmup_ratio")),
    weight_decay: float = typer.Option(0.0, help=_h("weight_decay")),
    max_grad_norm: float = typer.Option(1.0, help=_h("max_grad_norm")),
    gradient_checkpointing: bool = typer.Option(False, help=_h("gradient_checkpointing")),
    precision: str = typer.Option("auto", help=_h("precision")),
    save_every: int = typer.Option(50, help=_h("save_every")),
    resume: bool = typer.Option(
        False, help="Continue an interrupted run from the state it saved beside --out."
    ),
    data_dir: Optional[str] = typer.Option(
        None,
        help="Local data directory laid out like wikitext-2-raw/, c4/ (else $CMOE_DATA_DIR).",
        show_default=False,
    ),
    cpu: bool = typer.Option(False, help="Train on the CPU even where a GPU is present."),
    overwrite: bool = typer.Option(
        False, help="Replace a non-empty --out directory, or a saved state when not resuming."
    ),
    distill: bool = typer.Option(False, help=_h("distill")),
    teacher: Optional[str] = typer.Option(None, help=_h("teacher"), show_default=False),
    teacher_dtype: str = typer.Option("auto", help=_h("teacher_dtype")),
    teacher_beside: bool = typer.Option(False, help=_h("teacher_beside")),
    temperature: float = typer.Option(1.0, help=_h("temperature")),
    distill_hidden: float = typer.Option(0.0, help=_h("distill_hidden")),
    distill_ce: Optional[float] = typer.Option(None, help=_h("distill_ce"), show_default=False),
    distill_topk: Optional[int] = typer.Option(None, help=_h("distill_topk"), show_default=False),
    neuron_keep: Optional[float] = typer.Option(None, help=_h("neuron_keep"), show_default=False),
    shared_neuron_keep: Optional[float] = typer.Option(
        None, help=_h("shared_neuron_keep"), show_default=False
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Recover a carved model's quality: LoRA, router scale and load balancing, merged.

    Several GPUs: `accelerate launch -m cmoe_carve.cli finetune ...` (or torchrun).
    """
    from .finetune import finetune

    config = FinetuneConfig(
        mode=mode, data=data, samples=samples, seqlen=seqlen, epochs=epochs, lr=lr,
        router_lr=router_lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_experts=lora_experts, gamma=gamma,
        schedule=schedule, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        gradient_checkpointing=gradient_checkpointing, precision=precision,
        save_every=save_every, distill=distill, teacher=teacher, teacher_dtype=teacher_dtype,
        teacher_beside=teacher_beside, temperature=temperature,
        distill_hidden=distill_hidden, distill_ce=distill_ce, distill_topk=distill_topk, neuron_keep=neuron_keep, shared_neuron_keep=shared_neuron_keep,
    )
    result = finetune(
        carved, out, config, data_dir=data_dir, resume=resume, overwrite=overwrite, cpu=cpu,
        progress=progress,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:  # once, also under `accelerate launch`
        typer.echo(
            f"fine-tuned checkpoint written to {result.path} ({result.steps} steps, "
            f"loss {result.loss_first:.3f} -> {result.loss_last:.3f}, {result.seconds:.0f} s)"
        )
