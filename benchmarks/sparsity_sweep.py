"""Perplexity against the active FFN fraction: dense, the official CMoE code's published figures,
our training-free carve with each profile, written as a table, JSON and a plot.

    python benchmarks/sparsity_sweep.py --data-dir ../shared/data --windows 8 \
        --out benchmarks/sparsity_sweep

Calibrates on wiki.valid.raw (8 x 2048 tokens, seed 0) and evaluates on the first --windows
windows of 2048 tokens of wiki.test.raw, every spec in one process. Fine-tuned points are added
with --finetuned SPEC=PPL (measured with `cmoe finetune --distill` and `cmoe eval`).
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
from cmoe_carve.memory_reuse import reuse_freed_memory
from cmoe_carve.spec import parse_spec

# The official CMoE code on SmolLM2-135M, WikiText-2 test, as measured in this project's
# earlier issues (32 windows): only these two layouts were run.
OFFICIAL = {"S2A2E16": 1963.4, "S3A3E8": 42.82}

PROFILES = {
    "default": {},  # also the exportable profile: one k in every layer, no compensation
    "markers, ridge 0.01 (session-5 default)": dict(grouping="markers", refit_ridge=0.01),
    "no refit (session-3 default)": dict(grouping="markers", refit=False, adaptive=True,
                                         compensate=True),
}


def active_fraction(spec: str) -> float:
    layout = parse_spec(spec)
    return (layout.num_shared + layout.top_k) / layout.num_experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--specs", default="S1A1E16,S2A2E16,S3A3E16,S4A4E16,S6A6E16,S3A3E8")
    parser.add_argument("--profiles", default="default", help="comma-separated: " + ", ".join(PROFILES))
    parser.add_argument("--finetuned", nargs="*", default=[], help="SPEC=PPL points to add")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/sparsity_sweep"))
    args = parser.parse_args()
    reuse_freed_memory()  # as every cmoe command does: 1.6x faster carves

    data = Path(args.data_dir)
    loaded = load_model(None)
    calib_src = resolve_text(str(data / "wikitext-2-raw/wiki.valid.raw"), purpose="calibration")
    test_src = resolve_text(str(data / "wikitext-2-raw/wiki.test.raw"), purpose="evaluation")
    calib = calibration_windows(loaded.tokenizer, calib_src, 8, 2048, 0)
    test = eval_windows(loaded.tokenizer, test_src, 2048, args.windows)

    dense = perplexity(loaded.model, test, progress=False).ppl
    rows = []
    for spec in args.specs.split(","):
        for profile in args.profiles.split(","):
            model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            carve_model(model, calib, CarveConfig(spec=spec, **PROFILES[profile]), progress=False)
            seconds = time.perf_counter() - start
            ppl = perplexity(model, test, progress=False).ppl
            row = {"spec": spec, "profile": profile, "active": active_fraction(spec), "ppl": ppl,
                   "carve_s": seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
    finetuned = {k: float(v) for k, v in (p.split("=") for p in args.finetuned)}
    record = {"dense": dense, "windows": int(test.shape[0]), "rows": rows, "official": OFFICIAL,
              "finetuned": finetuned}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    write_table(record, args.out.with_suffix(".md"))
    plot(record, args.out.with_suffix(".png"))


def write_table(record: dict, path: Path) -> None:
    profiles = list(dict.fromkeys(r["profile"] for r in record["rows"]))
    lines = [
        f"SmolLM2-135M-Instruct, WikiText-2 test perplexity, first {record['windows']} windows "
        f"of 2048 (dense: {record['dense']:.2f}); calibrated on wiki.valid.raw 8 x 2048.",
        "",
        "| spec | active FFN | " + " | ".join(profiles) + " | official code (32 windows) |",
        "|---|---|" + "---|" * (len(profiles) + 1),
    ]
    for spec in dict.fromkeys(r["spec"] for r in record["rows"]):
        by = {r["profile"]: r for r in record["rows"] if r["spec"] == spec}
        cells = [f"{by[p]['ppl']:.2f}" if p in by else "-" for p in profiles]
        official = record["official"].get(spec)
        frac = next(iter(by.values()))["active"]
        lines.append(f"| {spec} | {frac:.1%} | " + " | ".join(cells) +
                     f" | {official if official else '-'} |")
    path.write_text("\n".join(lines) + "\n")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(record["dense"], color="black", lw=1, ls="--", label="dense")
    for profile in dict.fromkeys(r["profile"] for r in record["rows"]):
        pts = sorted((r["active"], r["ppl"]) for r in record["rows"] if r["profile"] == profile)
        ax.plot(*zip(*pts), marker="o", label=f"carved, {profile} (training-free)")
    if record["official"]:
        pts = sorted((active_fraction(s), p) for s, p in record["official"].items())
        ax.plot(*zip(*pts), marker="x", ls=":", label="official CMoE code (32 windows)")
    if record["finetuned"]:
        pts = sorted((active_fraction(s), p) for s, p in record["finetuned"].items())
        ax.plot(*zip(*pts), marker="s", ls="", label="carved + finetune --distill (32 windows)")
    ax.set_yscale("log")
    ax.set_xlabel("active FFN fraction")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("SmolLM2-135M: perplexity against sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
