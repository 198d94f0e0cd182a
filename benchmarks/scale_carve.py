"""Carve time and peak memory of large-shaped models, streamed and whole, on this machine.

Random-weight models with real shapes (honest for time and memory, never for quality) are
written to disk once, then `cmoe carve` runs on each in a child process whose peak resident
memory (ru_maxrss) and wall time are recorded. Runs:

  8b      4 layers shaped like Llama-3-8B (hidden 4096, FFN 14336, 32 heads, 8 KV heads), fp32,
          S2A2E16 on 2 x 512 tokens: streamed and whole side by side, then the result is loaded
          and generates.
  widths  one layer at each FFN width 1,536 ... 28,672 (hidden = width / 3.5), streamed: how carve
          time and peak memory grow with the width.
  70b     N layers shaped like Llama-3-70B (hidden 8192, FFN 28672, 64 heads, 8 KV heads) in
          bf16; 16 layers are ~27 GB on disk, more than this machine's memory.

    python benchmarks/scale_carve.py 8b widths --out benchmarks/scale_carve
    python benchmarks/scale_carve.py 70b --layers 16 --work /work/scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}
VOCAB = 32000  # Llama-2's vocabulary: the embeddings stay a small share of a 4-layer model


def write_random_model(path: Path, layers: int, dtype: torch.dtype, seed: int = 0, **shape) -> int:
    """A Llama model directory of random weights, written layer by layer (never whole in
    memory); returns its weight bytes."""
    import transformers
    from accelerate import init_empty_weights

    from cmoe_carve.shards import ShardWriter
    from tiny_models import byte_tokenizer

    if (path / "DONE").is_file():
        return int((path / "DONE").read_text())
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(
        **shape, num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    config.dtype = dtype
    with init_empty_weights():
        skeleton = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(path, max_bytes=4 * 2**30)
    for name, param in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(param.shape)
        else:  # scaled so activations neither vanish nor explode through the layers
            tensor = torch.randn(param.shape, generator=gen) * (param.shape[-1] ** -0.5)
        writer.add(name, tensor.to(dtype))
        del tensor
    writer.finish()
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    (path / "DONE").write_text(str(writer.total_bytes))
    return writer.total_bytes


def timed_carve(model: Path, out: Path, stream: str, dtype: str, extra: list[str]) -> dict:
    """`cmoe carve` in a child process: wall seconds and the child's peak RSS."""
    cmd = [sys.executable, "-m", "cmoe_carve.cli", "carve", str(model), "--out", str(out),
           "--overwrite", "--calib-samples", "2", "--seqlen", "512", "--stream", stream,
           "--dtype", dtype, "--no-progress", *extra]
    # A fresh Python per run: ru_maxrss of children is the largest over all of them so far.
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:]); "
               "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, "
               "'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"]:
        raise SystemExit(f"carve failed: {proc.stderr[-3000:]}")
    report = json.loads((out / "carve_report.json").read_text())
    result["carve_seconds"] = report["meta"]["carve_seconds"]
    result["layer_seconds"] = [round(r["seconds"], 1) for r in report["layers"]]
    return result


def loads_and_generates(out: Path) -> list[int]:
    from cmoe_carve.loading import load_model

    model = load_model(str(out)).model
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=4, do_sample=False)[0].tolist()


def runtime_rss() -> int:
    """Peak RSS of a child that only imports what a carve imports: the floor under every run."""
    code = ("import resource, torch, transformers, cmoe_carve.pipeline; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.split()[-1])


def run_8b(work: Path, rows: list) -> None:
    model = work / "llama3-8b-shaped-4l-fp32"
    size = write_random_model(model, 4, torch.float32, **SHAPES["8b"])
    for stream in ("on", "off"):
        r = timed_carve(model, work / f"carved-8b-{stream}", stream, "float32", [])
        r.update(run="8b-shaped, 4 layers, fp32", stream=stream, model_bytes=size,
                 peak_over_model=r["peak_rss"] / size)
        rows.append(r)
        print(json.dumps(r), flush=True)
    rows[-2]["generates"] = loads_and_generates(work / "carved-8b-on")


def run_widths(work: Path, rows: list) -> None:
    for width in (1536, 3072, 6144, 14336, 28672):
        hidden = int(round(width / 3.5 / 128) * 128)
        shape = dict(hidden_size=hidden, intermediate_size=width, num_attention_heads=hidden // 128,
                     num_key_value_heads=max(1, hidden // 1024))
        model = work / f"width-{width}"
        size = write_random_model(model, 1, torch.float32, **shape)
        r = timed_carve(model, work / f"carved-width-{width}", "on", "float32", [])
        r.update(run=f"1 layer, FFN {width}, hidden {hidden}", stream="on", width=width,
                 model_bytes=size, peak_over_model=r["peak_rss"] / size)
        rows.append(r)
        print(json.dumps(r), flush=True)


def run_70b(work: Path, rows: list, layers: int) -> None:
    model = work / f"llama3-70b-shaped-{layers}l-bf16"
    size = write_random_model(model, layers, torch.bfloat16, **SHAPES["70b"])
    r = timed_carve(model, work / "carved-70b", "auto", "bfloat16", [])
    r.update(run=f"70b-shaped, {layers} layers, bf16", stream="auto", model_bytes=size,
             peak_over_model=r["peak_rss"] / size)
    rows.append(r)
    print(json.dumps(r), flush=True)


def table(rows: list, floor: int) -> str:
    gib = 2**30
    lines = [f"Runtime alone (Python, torch, transformers, cmoe imported): peak RSS {floor / gib:.2f} GiB.", "",
             "| run | stream | model GiB | wall s | carve s | s per layer | peak RSS GiB | peak / model |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["layer_seconds"]
        lines.append(f"| {r['run']} | {r['stream']} | {r['model_bytes'] / gib:.2f} | {r['seconds']:.1f} | "
                     f"{r['carve_seconds']:.1f} | {', '.join(f'{s:g}' for s in per[:6])}{' ...' if len(per) > 6 else ''} | "
                     f"{r['peak_rss'] / gib:.2f} | {r['peak_over_model']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", choices=["8b", "widths", "70b"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cmoe-scale"), help="where models are written")
    parser.add_argument("--layers", type=int, default=16, help="layers of the 70b-shaped model")
    parser.add_argument("--out", type=Path, default=HERE / "scale_carve", help="table prefix (.md, .json)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list = []
    floor = runtime_rss()
    for run in args.runs:
        {"8b": lambda: run_8b(args.work, rows), "widths": lambda: run_widths(args.work, rows),
         "70b": lambda: run_70b(args.work, rows, args.layers)}[run]()
    meta = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "runtime_rss": floor,
            "date": time.strftime("%Y-%m-%d")}
    out_json = args.out.with_suffix(".json")
    previous = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    done = {(r["run"], r["stream"]) for r in rows}
    keep = [p for p in previous if (p["run"], p["stream"]) not in done]
    rows = keep + rows
    out_json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(table(rows, floor))
    print(table(rows, floor))


if __name__ == "__main__":
    main()
