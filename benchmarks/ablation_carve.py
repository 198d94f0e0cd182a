"""Carve SmolLM2-135M with each quality option on and off; write perplexity and carve time.

    python benchmarks/ablation_carve.py --data-dir ../shared/data --windows 32 \
        --out benchmarks/ablation_carve.md

Calibrates on wiki.valid.raw (8 x 2048 tokens, seed 0), evaluates on the first --windows
windows of 2048 tokens of wiki.test.raw; every variant on the same windows, in one process.
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

OFF = dict(compensate=False, adaptive=False, balance=False)
VARIANTS = {
    "official": dict(router="representative", warm_steps=0, **OFF),
    "fitted": dict(router="fitted", **OFF),
    "fitted+contribution": dict(router="fitted", grouping="contribution", **OFF),
    "fitted+adaptive": dict(router="fitted", **{**OFF, "adaptive": True}),
    "fitted+compensate": dict(router="fitted", **{**OFF, "compensate": True}),
    "fitted+balance": dict(router="fitted", **{**OFF, "balance": True}),
    "default": dict(),  # fitted + compensate + adaptive
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--specs", default="S2A2E16,S3A3E8")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/ablation_carve.md"))
    args = parser.parse_args()

    data = Path(args.data_dir)
    loaded = load_model(None)
    calib_src = resolve_text(str(data / "wikitext-2-raw/wiki.valid.raw"), purpose="calibration")
    test_src = resolve_text(str(data / "wikitext-2-raw/wiki.test.raw"), purpose="evaluation")
    calib = calibration_windows(loaded.tokenizer, calib_src, args.calib_samples, 2048, 0)
    test = eval_windows(loaded.tokenizer, test_src, 2048, args.windows)

    rows = []
    dense = perplexity(loaded.model, test, progress=False)
    rows.append(("dense", "-", dense.ppl, 0.0, None))
    print(f"dense: {dense.ppl:.2f}", flush=True)
    for spec in args.specs.split(","):
        for name in args.variants.split(","):
            model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            result = carve_model(model, calib, CarveConfig(spec=spec, **VARIANTS[name]), progress=False)
            seconds = time.perf_counter() - start
            ppl = perplexity(model, test, progress=False).ppl
            agree = sum(r.oracle_agreement for r in result.layers) / len(result.layers)
            rows.append((spec, name, ppl, seconds, agree))
            print(json.dumps({"spec": spec, "variant": name, "ppl": ppl, "carve_s": seconds, "oracle_agreement": agree}), flush=True)
            del model

    lines = [
        f"SmolLM2-135M, calibrated on wiki.valid.raw ({args.calib_samples} x 2048, seed 0), "
        f"WikiText-2 test perplexity on {test.shape[0]} windows of 2048.",
        "",
        "| spec | variant | perplexity | carve s | oracle agreement |",
        "|---|---|---|---|---|",
    ]
    for spec, name, ppl, seconds, agree in rows:
        agreement = f"{agree:.3f}" if agree is not None else "-"
        lines.append(f"| {spec} | {name} | {ppl:.2f} | {seconds:.1f} | {agreement} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
