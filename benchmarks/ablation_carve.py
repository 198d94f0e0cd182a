"""Carve SmolLM2-135M with each quality option on and off; write perplexity and carve time.

    python benchmarks/ablation_carve.py --data-dir ../shared/data --windows 8 \
        --variants default,markers,markers-r0.01,oracle --out /tmp/ablation.md

Calibrates on wiki.valid.raw (8 x 2048 tokens, seed 0), evaluates on the first --windows
windows of 2048 tokens of wiki.test.raw and of the C4 sample (the C4 validation shard where
--data-dir has it); every variant on the same windows, in one process.

`oracle` is a measurement, not an option: every carved layer routes each token to the routed
experts with the largest output norms (computed for every expert), during the carve's refit and
the evaluation alike; it bounds what a better router could gain.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.data import calibration_windows, eval_windows, resolve_text
from cmoe_carve.evaluate import perplexity
from cmoe_carve.loading import load_model
from cmoe_carve.memory_reuse import reuse_freed_memory
from cmoe_carve.modeling_cmoe import CarvedMLP

import torch

OFF = dict(compensate=False, adaptive=False, balance=False)
VARIANTS = {
    "default": dict(),  # contribution grouping, fitted router, refit with the ridge on auto
    "stream-mix-1": dict(stream_mix=1.0),  # the stream goal alone (the default of session 10)
    "ffn-target": dict(refit_target="ffn"),  # targets: the dense FFN on the carved stream
    "no-held-out-join": dict(held_out_fits=False),  # the final solve on the fit tokens alone
    "session-10": dict(refit_target="ffn", held_out_fits=False),  # the default before stream
    "ridge-0.01": dict(refit_ridge=0.01),
    "ridge-0.1": dict(refit_ridge=0.1),
    "markers": dict(grouping="markers"),
    "markers-r0.01": dict(grouping="markers", refit_ridge=0.01),  # the session-5 default
    "markers-k32": dict(grouping="markers", k_act=32),
    "compensate": dict(compensate=True),
    "oracle": dict(),  # default options, oracle routing (see the docstring)
    "no-refit": dict(refit=False),
    "official": dict(router="representative", grouping="markers", warm_steps=0, refit=False, **OFF),
    "fitted": dict(grouping="markers", refit=False, **OFF),
    "fitted+adaptive": dict(grouping="markers", refit=False, **{**OFF, "adaptive": True}),
    "fitted+compensate": dict(grouping="markers", refit=False, **{**OFF, "compensate": True}),
    "fitted+balance": dict(grouping="markers", refit=False, **{**OFF, "balance": True}),
}


@contextlib.contextmanager
def oracle_routing():
    """Route every carved layer by the norm oracle: each token's top-k routed experts by output
    norm, gates as the router would give them."""
    from cmoe_carve.router_fit import expert_output_norms

    def route(self, x):
        scores = torch.softmax(self.router.logits(x), dim=-1)
        s = self.num_shared
        norms = expert_output_norms(x, self.gate_up_proj[s:], self.down_proj[s:], self.act_fn)
        top = torch.topk(norms, self.top_k, dim=-1).indices
        gates = 1.0 + scores.gather(-1, top) * self.router.scale.float()[top]
        shared, ones = self._shared_slots(x.device, gates.dtype)
        n = x.shape[0]
        ids = torch.cat([shared.expand(n, -1), top + s], dim=-1)
        return ids, torch.cat([ones.expand(n, -1), gates], dim=-1), top

    saved = CarvedMLP.route, CarvedMLP._cpu_fused
    CarvedMLP.route, CarvedMLP._cpu_fused = route, lambda self, x: None
    try:
        yield
    finally:
        CarvedMLP.route, CarvedMLP._cpu_fused = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--specs", default="S2A2E16,S3A3E8")
    parser.add_argument("--variants", default="default,markers,markers-r0.01,oracle",
                        help="comma-separated names: " + ", ".join(VARIANTS))
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("ablation.md"))
    args = parser.parse_args()
    reuse_freed_memory()  # as every cmoe command does: 1.6x faster carves

    data = Path(args.data_dir)
    loaded = load_model(None)
    calib_src = resolve_text(str(data / "wikitext-2-raw/wiki.valid.raw"), purpose="calibration")
    test_src = resolve_text(str(data / "wikitext-2-raw/wiki.test.raw"), purpose="evaluation")
    calib = calibration_windows(loaded.tokenizer, calib_src, args.calib_samples, 2048, 0)
    test = eval_windows(loaded.tokenizer, test_src, 2048, args.windows)

    c4 = eval_windows(loaded.tokenizer, resolve_text("c4", purpose="evaluation", data_dir=str(data)),
                      2048, args.windows)

    rows = []
    dense = (perplexity(loaded.model, test, progress=False).ppl,
             perplexity(loaded.model, c4, progress=False).ppl)
    rows.append(("dense", "-", *dense, 0.0, None))
    print(f"dense: {dense[0]:.2f} / C4 {dense[1]:.2f}", flush=True)
    for spec in args.specs.split(","):
        for name in args.variants.split(","):
            model = copy.deepcopy(loaded.model)
            routing = oracle_routing() if name == "oracle" else contextlib.nullcontext()
            with routing:
                start = time.perf_counter()
                config = CarveConfig(spec=spec, **VARIANTS[name])
                result = carve_model(model, calib, config, progress=False)
                seconds = time.perf_counter() - start
                ppl = perplexity(model, test, progress=False).ppl
                ppl_c4 = perplexity(model, c4, progress=False).ppl
            agree = sum(r.oracle_agreement for r in result.layers) / len(result.layers)
            rows.append((spec, name, ppl, ppl_c4, seconds, agree))
            print(json.dumps({"spec": spec, "variant": name, "ppl": ppl, "c4": ppl_c4,
                              "carve_s": seconds, "oracle_agreement": agree}), flush=True)
            del model

    lines = [
        f"SmolLM2-135M, calibrated on wiki.valid.raw ({args.calib_samples} x 2048, seed 0), "
        f"perplexity on the first {test.shape[0]} windows of 2048 of WikiText-2 test and of C4.",
        "",
        "| spec | variant | WikiText-2 | C4 | carve s | oracle agreement |",
        "|---|---|---|---|---|---|",
    ]
    for spec, name, ppl, ppl_c4, seconds, agree in rows:
        agreement = f"{agree:.3f}" if agree is not None else "-"
        lines.append(f"| {spec} | {name} | {ppl:.2f} | {ppl_c4:.2f} | {seconds:.1f} | {agreement} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
