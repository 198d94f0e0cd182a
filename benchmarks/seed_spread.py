"""How much the training-free perplexity moves with the calibration windows drawn: carve
SmolLM2-135M once per calibration seed and evaluate each carve on the same WikiText-2 test
windows; with --set, carve a variant of the options beside the default on every draw and report
the paired differences.

    python benchmarks/seed_spread.py --data-dir ../shared/data --spec S3A3E8 --seeds 0,1,2 \
        --windows 32 --out /tmp/seed_spread.md
    python benchmarks/seed_spread.py --spec S3A3E8 --seeds 0,1,2,3,4 --set max_iter=20

The issue's protocol draws 8 x 2,048 calibration tokens of wiki.valid.raw with seed 0. A goal
stated to a fraction of a percent is only meaningful against the spread the draw itself gives,
which is what this measures (each seed is one carve and one evaluation per variant, in one
process). An option is judged on its difference from the default on the same draws: the mean
difference against its standard error, and on how many draws it helps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.data import calibration_windows, eval_windows, resolve_text
from cmoe_carve.errors import CmoeError
from cmoe_carve.evaluate import perplexity
from cmoe_carve.loading import load_model
from cmoe_carve.memory_reuse import reuse_freed_memory

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_settings(items: list[str]) -> dict:
    """KEY=VALUE strings -> CarveConfig overrides, each value read as its field's type."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(CarveConfig)
              if f.init and f.name != "spec"}  # --spec names the layout of both
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(
                f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}"
            )
        kind, low = fields[key], text.strip().lower()
        try:
            if "None" in kind and low == "none":
                value = None
            elif kind.startswith("bool"):
                if low not in _TRUE | _FALSE:
                    raise ValueError
                value = low in _TRUE
            elif kind.startswith("int"):
                value = int(text)
            elif kind.startswith("float"):
                value = float(text)
            else:
                value = text.strip()
        except ValueError:
            raise ValueError(f"--set {item!r}: {key} takes a value of type {kind}") from None
        settings[key] = value
    return settings


def paired_summary(pairs: list[tuple[float, float]]) -> str:
    """The default's and the variant's mean over draws, the mean difference with its standard
    error, and on how many draws the variant is lower."""
    diffs = [variant - default for default, variant in pairs]
    line = (f"default mean {statistics.fmean(d for d, _ in pairs):.2f}, variant mean "
            f"{statistics.fmean(v for _, v in pairs):.2f}; difference (variant - default) mean "
            f"{statistics.fmean(diffs):+.3f}")
    if len(diffs) > 1:
        line += f", standard error {statistics.stdev(diffs) / len(diffs) ** 0.5:.3f}"
    lower = sum(d < 0 for d in diffs)
    return line + f"; the variant is lower on {lower} of {len(diffs)} draws"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--spec", default="S3A3E8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a carve option of the variant compared with the default on every "
                        "draw (a CarveConfig field: max_iter=20, stream_mix=0.6, refit_ridge=0.1); "
                        "repeat for several")
    parser.add_argument("--out", type=Path, default=Path("seed_spread.md"))
    args = parser.parse_args()
    try:
        settings = parse_settings(args.settings)
        seeds = [int(s) for s in args.seeds.split(",")]
        variants = {"default": CarveConfig(spec=args.spec)}
        if settings:
            variants["variant"] = CarveConfig(**{"spec": args.spec, **settings})
    except (ValueError, CmoeError) as exc:
        parser.error(str(exc))
    reuse_freed_memory()  # as every cmoe command does

    data = Path(args.data_dir)
    loaded = load_model(None)
    calib_src = resolve_text(str(data / "wikitext-2-raw/wiki.valid.raw"), purpose="calibration")
    test_src = resolve_text(str(data / "wikitext-2-raw/wiki.test.raw"), purpose="evaluation")
    test = eval_windows(loaded.tokenizer, test_src, 2048, args.windows)

    rows = []  # (seed, {variant: (ppl, carve seconds)})
    for seed in seeds:
        calib = calibration_windows(loaded.tokenizer, calib_src, args.calib_samples, 2048, seed)
        results = {}
        for name, config in variants.items():
            model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            carve_model(model, calib, config, progress=False)
            seconds = time.perf_counter() - start
            results[name] = (perplexity(model, test, progress=False).ppl, seconds)
            print(json.dumps({"spec": args.spec, "seed": seed, "variant": name,
                              "ppl": results[name][0], "carve_s": seconds}), flush=True)
            del model
        rows.append((seed, results))

    what = "default options" + (f" and a variant ({', '.join(args.settings)})" if settings else "")
    lines = [
        f"SmolLM2-135M at {args.spec}, {what}, calibrated on {args.calib_samples} x 2048 tokens "
        f"of wiki.valid.raw drawn with each seed; perplexity on the first {test.shape[0]} windows "
        "of 2048 of WikiText-2 test.",
        "",
    ]
    if settings:
        lines += [
            "| calibration seed | default | variant | difference | default carve s | variant carve s |",
            "|---|---|---|---|---|---|",
            *(f"| {seed} | {r['default'][0]:.2f} | {r['variant'][0]:.2f} | "
              f"{r['variant'][0] - r['default'][0]:+.2f} | {r['default'][1]:.1f} | "
              f"{r['variant'][1]:.1f} |" for seed, r in rows),
            "",
            paired_summary([(r["default"][0], r["variant"][0]) for _, r in rows]),
        ]
    else:
        values = [r["default"][0] for _, r in rows]
        lines += [
            "| calibration seed | WikiText-2 | carve s |",
            "|---|---|---|",
            *(f"| {seed} | {r['default'][0]:.2f} | {r['default'][1]:.1f} |" for seed, r in rows),
            "",
            f"mean {statistics.fmean(values):.2f}, min {min(values):.2f}, max {max(values):.2f}"
            + (f", standard deviation {statistics.stdev(values):.2f}" if len(values) > 1 else ""),
        ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
