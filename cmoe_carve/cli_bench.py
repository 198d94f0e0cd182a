"""`cmoe bench`: decode and prefill speed of a carved model against its dense source. Parses
options into a BenchConfig, calls `cmoe_carve.bench`, prints tables and writes JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from .atomic import check_output_file, write_text_file
from . import bench
from .errors import CmoeError


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise CmoeError(
            f"{option} takes comma-separated integers like 1,16,128, got {text!r}"
        ) from None


def bench_command(
    model: Optional[str] = typer.Argument(
        None,
        help="Model to benchmark: a carved checkpoint directory, a hub id, a local model "
        "directory or a .gguf file. Default: the built-in SmolLM2-135M-Instruct ('default').",
        show_default=False,
    ),
    compare: Optional[str] = typer.Option(
        None,
        "--compare",
        help="Reference model measured side by side (its dense source; 'default' for the "
        "built-in SmolLM2). The tables give the ratio model / reference.",
    ),
    tokens: str = typer.Option(
        "1,16,128,512", "--tokens", help="Prompt lengths of the prefill runs, comma-separated."
    ),
    batch: str = typer.Option(
        "1,4", "--batch", help="Batch sizes of the decode runs, comma-separated."
    ),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prompt length of decode runs."),
    new_tokens: int = typer.Option(
        64, "--new-tokens", help="Tokens generated per decode run (EOS cannot stop it earlier)."
    ),
    repeats: int = typer.Option(5, "--repeats", help="Measured repetitions; medians are reported."),
    warmup: int = typer.Option(1, "--warmup", help="Discarded warm-up passes (short decodes)."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="torch intra-op threads (default: torch's own setting).",
        show_default=False,
    ),
    neuron_keep: Optional[float] = typer.Option(
        None,
        "--neuron-keep",
        help="MoNE keep ratio of the routed experts of MODEL (not of --compare) for this run; "
        "compare a checkpoint with itself to measure what neuron selection gains.",
        show_default=False,
    ),
    shared_neuron_keep: Optional[float] = typer.Option(
        None, "--shared-neuron-keep", help="MoNE keep ratio of MODEL's shared experts.",
        show_default=False,
    ),
    device: str = typer.Option("cpu", "--device", help="Device: cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option(
        "float32", "--dtype", help="Weight dtype: float32, bfloat16 or float16."
    ),
    loop_baseline: bool = typer.Option(
        True,
        "--loop-baseline/--no-loop-baseline",
        help="Also decode the carved model with the official CMoE per-expert loop.",
    ),
    json_out: Optional[Path] = typer.Option(
        None,
        "--json",
        help="Also write every sample and median as JSON to this file ('-': stdout).",
    ),
    profile: Optional[Path] = typer.Option(
        None,
        "--profile",
        help="After measuring, write torch.profiler tables (ops by self time) of one batch-1 "
        "decode of each model to this text file.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Decode and prefill speed, FFN time per layer and peak memory, carved vs dense."""
    config = bench.BenchConfig(
        prefill_tokens=_int_list(tokens, "--tokens"),
        decode_batches=_int_list(batch, "--batch"),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        device=device,
        loop_baseline=loop_baseline,
    )
    if json_out is not None and str(json_out) != "-":
        check_output_file(json_out, "--json")  # before the work, not after it
    if profile is not None:
        check_output_file(profile, "--profile")
    to_stdout = json_out is not None and str(json_out) == "-"
    console = Console(stderr=to_stdout)  # keep stdout for the JSON when it goes there
    models = bench.load_bench_models(
        model, compare, dtype=dtype, device=device,
        neuron_keep=neuron_keep, shared_neuron_keep=shared_neuron_keep,
    )
    report = bench.run_bench(models, config, progress=progress)
    console.print(main_table(report))
    if bench.LOOP_LABEL in report.labels:
        console.print(loop_table(report))
    console.print(conditions(report), soft_wrap=True, markup=False, highlight=False)
    if json_out is not None:
        text = json.dumps(report.to_record(), indent=2, sort_keys=True)
        if to_stdout:
            sys.stdout.write(text + "\n")
        else:
            write_text_file(json_out, text + "\n", "--json")
            console.print(f"results written to {json_out}")
    if profile is not None:
        with_loop = bench.LOOP_LABEL in report.labels
        _write_profiles(profile, models, config, with_loop)
        console.print(f"profiles written to {profile}")


def _cell(metric: bench.Metric, label: str) -> str:
    value, spread = metric.median(label), metric.spread(label)
    if value is None:
        return ""
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    text = f"{value:,.{digits}f}"
    return text if spread is None else f"{text} ±{50 * spread:.0f}%"  # half the sample range


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def main_table(report: bench.BenchReport) -> Table:
    """One row per metric: each model's median (± half the sample range) and the ratio."""
    models = [report.primary] + ([report.reference] if report.reference else [])
    title = " vs ".join(f"{label}: {report.models[label]['description']}" for label in models)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("metric", overflow="fold")
    table.add_column("unit", no_wrap=True)
    for label in models:
        table.add_column(label, justify="right", no_wrap=True)
    if report.reference:
        table.add_column(f"{report.primary}/{report.reference}", justify="right", no_wrap=True)
    for metric in report.metrics.values():
        if not any(label in metric.samples for label in models):
            continue
        cells = [metric.name, f"{metric.unit} {'↑' if metric.higher_is_better else '↓'}"]
        cells += [_cell(metric, label) for label in models]
        if report.reference:
            cells.append(_ratio(metric.ratio(report.primary, report.reference)))
        table.add_row(*cells)
    return table


LOOP_ROWS = (
    "ffn_us_per_layer", "router_us_per_layer", "decode_tokens_per_s", "ffn_share_pct", "ttft_ms"
)


def loop_table(report: bench.BenchReport) -> Table:
    """Our carved FFN against the official per-expert loop, in the same decode runs."""
    ours = next(label for label, info in report.models.items() if info["carved_ffn_backend"])
    table = Table(
        title=f"carved FFN: ours ({report.models[ours]['carved_ffn_backend']}) vs the official "
        "CMoE per-expert loop",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("metric", overflow="fold")
    table.add_column("unit", no_wrap=True)
    for name in ("ours", "per-expert loop", "ours faster by"):
        table.add_column(name, justify="right", no_wrap=True)
    for metric in report.metrics.values():
        if metric.key.split(".")[0] not in LOOP_ROWS or bench.LOOP_LABEL not in metric.samples:
            continue
        ratio = metric.ratio(ours, bench.LOOP_LABEL)
        faster = None if ratio is None else ratio if metric.higher_is_better else 1 / ratio
        if metric.key.startswith("ffn_share"):
            faster = None  # a share, not a speed
        table.add_row(metric.name, metric.unit, _cell(metric, ours),
                      _cell(metric, bench.LOOP_LABEL), "" if faster is None else f"{faster:.2f}x")
    return table


def conditions(report: bench.BenchReport) -> str:
    """The machine, threads and load, and a warning when the machine was busy."""
    m, c = report.machine, report.config
    start, end = m.get("load_average_start"), m.get("load_average_end")
    lines = [
        (
            f"{m['device']} ({m['gpu'] or m['cpu']}), {m['usable_cpus']} usable CPUs, "
            f"{m['torch_threads']} torch threads; torch {m['torch']}, transformers "
            f"{m['transformers']}; {c.repeats} repetitions after {c.warmup} warm-up, medians; "
            f"decode: {c.prompt_tokens}-token prompt + {c.new_tokens} new tokens; "
            f"{report.seconds:.0f} s in all"
        ),
    ]
    if start and end:
        lines.append(f"load average (1 min) {start[0]:.2f} at start, {end[0]:.2f} at end")
        # The load average counts our own threads too; what is left is other processes'.
        others = max(start[0], end[0]) - m["torch_threads"]
        busy = others > max(m["usable_cpus"] - m["torch_threads"], 0) + 0.5
        if m["device"] == "cpu" and busy:
            lines.append(
                "warning: other processes were using the CPUs the benchmark needs: timings are "
                "noisy; measure on a quiet machine for figures to publish"
            )
            if m["torch_threads"] > 1:
                # Measured here: 2 threads with 4 other busy processes on 2 cores decoded
                # SmolLM2 at 0.5 tok/s (every op waits on a descheduled thread), 1 thread at 11.
                lines.append("on a busy machine, --threads 1 avoids threads waiting on each other")
    return "\n".join(lines)


def _write_profiles(path: Path, models, config, with_loop: bool) -> None:
    parts = []
    for m in models:
        parts.append(f"== {m.label}: {m.description}\n{bench.profile_decode(m, config)}")
        if with_loop and bench.carved_ffn_backend(m.model):
            table = bench.profile_decode(m, config, loop=True)
            parts.append(f"== {m.label} with the per-expert loop\n{table}")
    write_text_file(path, "\n\n".join(parts) + "\n", "--profile")
