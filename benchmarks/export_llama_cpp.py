"""Dense SmolLM2 vs the carved model in llama.cpp: decode and prefill speed, and perplexity.

Both GGUF files start at f32 and go through llama.cpp's own `llama-quantize` for q8_0 and q4_0,
so the two sides differ only in the model: the dense one from llama.cpp's stock
`convert_hf_to_gguf.py`, the carved one from `cmoe export --format gguf` (the stock converter
stops on the `--format hf` export in its GLM-only `Glm4MoeModel.set_vocab`: README, `cmoe
export`).

Speed: `llama-bench` (batch 1, `-p 128 -n 64`, one repetition per call), dense and carved
called in turn (A B A B ...) so that a machine whose speed drifts (shared CPUs) affects both;
the ratio is taken pair by pair and its median reported.

Perplexity: llama-perplexity's protocol (chunks of 512 tokens, BOS first, the second half of each
chunk scored) on WikiText-2 test, computed in Python from llama.cpp's logits (llama-cpp-python)
and, on the very same token chunks, from the carved checkpoint's own remote-code model and the
dense model in transformers.

    python benchmarks/export_llama_cpp.py --bin /path/to/llama.cpp/build/bin \
        --dense-f32 dense-f32.gguf --carved-f32 carved-f32.gguf --carved-dir CARVED \
        --dense-dir DENSE_HF_DIR --out benchmarks/export_llama_cpp
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
from pathlib import Path

QUANTS = ("f32", "q8_0", "q4_0")


def quantized(bin_dir: Path, f32: Path, quant: str) -> Path:
    if quant == "f32":
        return f32
    out = f32.with_name(f32.name.replace("f32", quant))
    if not out.is_file():
        subprocess.run([str(bin_dir / "llama-quantize"), str(f32), str(out), quant],
                       check=True, capture_output=True)
    return out


def bench_once(bin_dir: Path, model: Path, threads: int) -> dict:
    """One llama-bench call: {'pp': prefill tok/s (128), 'tg': decode tok/s (64)}."""
    proc = subprocess.run(
        [str(bin_dir / "llama-bench"), "-m", str(model), "-p", "128", "-n", "64", "-t", str(threads),
         "-r", "1", "-o", "json"], check=True, capture_output=True, text=True,
    )
    rows = json.loads(proc.stdout)
    return {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}


def speed(bin_dir: Path, dense: Path, carved: Path, rounds: int, quants, threads_list) -> list[dict]:
    results = []
    for threads in threads_list:
        for quant in quants:
            d, c = quantized(bin_dir, dense, quant), quantized(bin_dir, carved, quant)
            bench_once(bin_dir, d, threads), bench_once(bin_dir, c, threads)  # warm-up
            pairs = [(bench_once(bin_dir, d, threads), bench_once(bin_dir, c, threads)) for _ in range(rounds)]
            row = {"threads": threads, "quant": quant, "rounds": rounds}
            for key in ("tg", "pp"):
                row[f"dense_{key}"] = statistics.median(a[key] for a, _ in pairs)
                row[f"carved_{key}"] = statistics.median(b[key] for _, b in pairs)
                row[f"ratio_{key}"] = statistics.median(b[key] / a[key] for a, b in pairs)
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def chunks_of(tokens: list[int], n_ctx: int, n_chunks: int, bos: int | None) -> list[list[int]]:
    out = []
    for i in range(min(n_chunks, len(tokens) // n_ctx)):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        out.append(chunk)
    return out


def scored_nll(logits, chunk: list[int]) -> tuple[float, int]:
    """llama-perplexity: tokens n_ctx/2 .. n_ctx-1 scored from the logits one position before."""
    import torch

    logits = torch.as_tensor(logits).double()
    n = len(chunk)
    first = n // 2
    targets = torch.tensor(chunk[first:])
    logp = logits[first - 1 : n - 1].log_softmax(-1)
    return float(-logp.gather(1, targets[:, None]).sum()), len(targets)


def ppl_llama_cpp(model: Path, chunks, threads: int) -> float:
    import llama_cpp
    import numpy as np

    n_ctx = len(chunks[0])
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                          logits_all=True, verbose=False)
    total, count = 0.0, 0
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk)
        nll, n = scored_nll(np.array(llm.scores[: len(chunk)]), chunk)
        total, count = total + nll, count + n
    llm.close()
    return math.exp(total / count)


def ppl_transformers(model_dir: Path, chunks, remote_code: bool) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=remote_code).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logits = model(torch.tensor([chunk])).logits[0]
            nll, n = scored_nll(logits, chunk)
            total, count = total + nll, count + n
    return math.exp(total / count)


def quality(args, dense_f32: Path, carved_f32: Path) -> dict:
    import llama_cpp

    text = Path(args.text).read_text(encoding="utf-8")
    vocab = llama_cpp.Llama(model_path=str(dense_f32), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode(), add_bos=False)
    bos = vocab.token_bos() if vocab.token_bos() >= 0 else None
    chunks = chunks_of(tokens, 512, args.chunks, bos)
    res = {"chunks": len(chunks), "n_ctx": 512, "text": args.text}
    for quant in ("f32", "q8_0"):
        res[f"llama_cpp_dense_{quant}"] = ppl_llama_cpp(quantized(args.bin, dense_f32, quant), chunks, args.threads)
        res[f"llama_cpp_carved_{quant}"] = ppl_llama_cpp(quantized(args.bin, carved_f32, quant), chunks, args.threads)
        print(json.dumps(res), flush=True)
    if args.carved_dir:
        res["transformers_carved_remote_code"] = ppl_transformers(Path(args.carved_dir), chunks, True)
    if args.dense_dir:
        res["transformers_dense"] = ppl_transformers(Path(args.dense_dir), chunks, False)
    print(json.dumps(res), flush=True)
    return res


def table(speed_rows: list[dict], q: dict | None) -> str:
    lines = [
        "| threads | weights | dense decode tok/s | carved decode tok/s | decode ratio | "
        "dense prefill-128 tok/s | carved prefill-128 tok/s | prefill ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in speed_rows:
        lines.append(
            f"| {r['threads']} | {r['quant']} | {r['dense_tg']:.1f} | {r['carved_tg']:.1f} | "
            f"**{r['ratio_tg']:.2f}x** | {r['dense_pp']:.0f} | {r['carved_pp']:.0f} | {r['ratio_pp']:.2f}x |"
        )
    if q:
        lines += ["", f"Perplexity, WikiText-2 test, {q['chunks']} chunks of {q['n_ctx']} tokens "
                  "(llama-perplexity protocol), same token chunks everywhere:", "",
                  "| model | perplexity |", "|---|---|"]
        for key, value in q.items():
            if isinstance(value, float):
                lines.append(f"| {key} | {value:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, threads in zip(axes, sorted({r["threads"] for r in rows})):
        sub = [r for r in rows if r["threads"] == threads]
        x = range(len(sub))
        ax.bar([i - 0.2 for i in x], [r["dense_tg"] for r in sub], 0.4, label="dense (stock converter)")
        ax.bar([i + 0.2 for i in x], [r["carved_tg"] for r in sub], 0.4, label="carved S2A2E16 (cmoe export)")
        for i, r in zip(x, sub):
            ax.text(i + 0.2, r["carved_tg"], f"{r['ratio_tg']:.2f}x", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(list(x), [r["quant"] for r in sub])
        ax.set_title(f"llama.cpp decode, batch 1, {threads} thread(s)")
        ax.set_ylabel("tokens/s")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, required=True, help="llama.cpp build/bin (llama-bench, llama-quantize)")
    ap.add_argument("--dense-f32", type=Path, required=True)
    ap.add_argument("--carved-f32", type=Path, required=True)
    ap.add_argument("--carved-dir", help="the carved checkpoint (remote-code perplexity)")
    ap.add_argument("--dense-dir", help="the dense model directory (transformers perplexity)")
    ap.add_argument("--text", default="/work/shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads for the perplexity runs")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--speed-rows", type=Path, help="reuse speed rows (JSON lines this script printed) instead of measuring")
    ap.add_argument("--speed-threads", default="1,2",
                    help="thread counts to measure; rows of other counts are kept from --out's JSON")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/export_llama_cpp"))
    args = ap.parse_args()
    threads = tuple(int(t) for t in args.speed_threads.split(","))
    previous = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() else {}
    if args.speed_rows:
        rows = [json.loads(line) for line in args.speed_rows.read_text().splitlines() if line.strip()]
    else:
        rows = speed(args.bin, args.dense_f32, args.carved_f32, args.rounds, QUANTS, threads)
    kept = [r for r in previous.get("speed", []) if r["threads"] not in {r["threads"] for r in rows}]
    rows = sorted(kept + rows, key=lambda r: (r["threads"], QUANTS.index(r["quant"])))
    # Speed alone (--no-quality) keeps the perplexity table measured before.
    q = previous.get("perplexity") if args.no_quality else quality(args, args.dense_f32, args.carved_f32)
    args.out.with_suffix(".json").write_text(json.dumps({"speed": rows, "perplexity": q}, indent=2))
    args.out.with_suffix(".md").write_text(table(rows, q))
    plot(rows, args.out.with_suffix(".png"))
    print(table(rows, q))


if __name__ == "__main__":
    main()
