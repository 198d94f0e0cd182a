"""Perplexity against the fraction of FFN weights read per token: expert-level sparsity alone
(several specs) and combined with MoNE neuron keep ratios. Writes a table and a PNG plot.

    python benchmarks/mone_sweep.py --data-dir ../shared/data --windows 32 \
        --out benchmarks/mone_sweep

SmolLM2-135M (the built-in default) is carved once per spec, calibrated on wiki.valid.raw
(8 x 2048 tokens, seed 0, default options), in this process; each keep ratio is then set on the
carved model (shared and routed experts alike) and evaluated on the first --windows windows of
2048 tokens of wiki.test.raw. Results are appended to OUT.json as they come, so an interrupted
sweep keeps what it measured (rerun with the same --out to skip the points already there).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.data import calibration_windows, eval_windows, resolve_text
from cmoe_carve.evaluate import perplexity
from cmoe_carve.loading import load_model
from cmoe_carve.mone import ffn_active_fraction, ffn_read_fraction, set_neuron_keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--specs", default="S2A2E16,S3A3E16,S4A4E16,S3A3E8")
    parser.add_argument(
        "--keep", default="S2A2E16,S4A4E16,S3A3E8",
        help="specs also evaluated with the keep ratios below 1",
    )
    parser.add_argument("--ratios", default="1.0,0.75,0.5,0.25")
    parser.add_argument("--out", default="benchmarks/mone_sweep", help="OUT.json/.md/.png")
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results_file = out.with_suffix(".json")
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {(r["spec"], r["neuron_keep"]) for r in results}

    loaded = load_model(None)
    calib = resolve_text("wikitext2", purpose="calibration", data_dir=args.data_dir)
    test = resolve_text("wikitext2", purpose="evaluation", data_dir=args.data_dir)
    calib_ids = calibration_windows(loaded.tokenizer, calib, 8, 2048, 0)
    windows = eval_windows(loaded.tokenizer, test, 2048, args.windows)
    ratios = [float(r) for r in args.ratios.split(",")]
    keep_specs = set(args.keep.split(","))

    for spec in args.specs.split(","):
        todo = [r for r in (ratios if spec in keep_specs else [1.0]) if (spec, r) not in done]
        if not todo:
            continue
        model = copy.deepcopy(loaded.model)
        result = carve_model(model, calib_ids, CarveConfig(spec=spec), progress=False)
        for ratio in todo:
            set_neuron_keep(model, ratio, ratio)
            cmoe = {**result.cmoe, "neuron_keep": ratio, "shared_neuron_keep": ratio}
            start = time.perf_counter()
            ppl = perplexity(model, windows, 1, False, description=f"{spec} keep {ratio}").ppl
            row = {
                "spec": spec,
                "neuron_keep": ratio,
                "ffn_read": round(ffn_read_fraction(cmoe), 4),
                "ffn_active": round(ffn_active_fraction(cmoe), 4),
                "ppl": round(ppl, 3),
                "carve_seconds": round(result.seconds, 1),
                "eval_seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps(row), flush=True)
            results.append(row)
            results_file.write_text(json.dumps(results, indent=2) + "\n")
        del model

    write_table(results, out.with_suffix(".md"), args.windows)
    plot(results, out.with_suffix(".png"))


def write_table(results: list[dict], path: Path, windows: int) -> None:
    rows = sorted(results, key=lambda r: (-r["ffn_read"], r["spec"]))
    lines = [
        f"SmolLM2-135M-Instruct, WikiText-2 test perplexity (first {windows} windows of 2048), "
        "calibrated on wiki.valid.raw (8 x 2048, seed 0, default carve options). `neuron keep` "
        "applies to shared and routed experts alike; 1.0 is expert-level sparsity alone. "
        "`FFN read`: fraction of the FFN weights a token reads (MoNE reads every gate row of an "
        "active expert, and the kept neurons' up and down rows); `FFN active`: fraction of FFN "
        "neurons that contribute.",
        "",
        "| spec | neuron keep | FFN read | FFN active | perplexity |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['spec']} | {r['neuron_keep']} | {r['ffn_read']:.3f} | {r['ffn_active']:.3f} "
            f"| {r['ppl']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    alone = sorted((r for r in results if r["neuron_keep"] == 1.0), key=lambda r: r["ffn_read"])
    ax.plot([r["ffn_read"] for r in alone], [r["ppl"] for r in alone], "k-o",
            label="expert-level sparsity alone")
    for r in alone:
        ax.annotate(r["spec"], (r["ffn_read"], r["ppl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    for spec in sorted({r["spec"] for r in results if r["neuron_keep"] < 1.0}):
        pts = sorted((r for r in results if r["spec"] == spec), key=lambda r: r["ffn_read"])
        ax.plot([r["ffn_read"] for r in pts], [r["ppl"] for r in pts], "--s",
                label=f"{spec} + neuron keep (1.0 ... {pts[0]['neuron_keep']})")
    ax.set_xlabel("fraction of FFN weights read per token")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: expert sparsity vs expert + neuron sparsity (MoNE)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
