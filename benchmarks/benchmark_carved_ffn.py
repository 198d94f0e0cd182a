"""Benchmark the carved FFN against the dense FFN and the official per-expert loop.

Sweeps the number of tokens for one FFN shape carved at S2A2E16 and S3A3E8 and times, per layer:

  dense        the dense gated FFN, three matmuls as transformers runs it (cuBLAS / MKL)
  loop         `cmoe_kernels.per_expert_loop`, the official CMoE code's loop over all experts
  gather-bmm   the first idea for decode: copy the chosen experts' weights, then bmm (T <= 16)
  torch        `carved_ffn_torch`, the PyTorch path
  triton       `carved_ffn_triton`, the Triton kernels (CUDA only)
  torch+keep   with --neuron-keep R: the PyTorch path with MoNE neuron selection (decode only,
  triton+keep  T <= 16), reading the kept neurons' rows of a neuron-major weight copy
  fused        `cmoe_kernels.cpu_decode.moe_decode`, the fused CPU decode step (fp32 CPU, T <= 16;
  fused+keep   with --neuron-keep, MoNE in it): it routes too, with a random linear router of
               the same S + A experts per token, so it reads the router's few KB on top

Weights are streamed from memory, not cached: every provider runs over a ring of distinct layers
whose weights total --ring-mb (default 1024 MB, beyond any cache), and the time per layer is the
ring's time divided by its length. Decode is memory-bound, so the report gives the bandwidth
reached on the bytes of weights actually needed (the union of the experts the tokens chose, or
all weights for dense); prefill is compute-bound, so it gives TFLOP/s (2 flops per multiply-add
of the active experts).

    python benchmarks/benchmark_carved_ffn.py                       # Llama-2-7B FFN, all tokens
    python benchmarks/benchmark_carved_ffn.py --shape smollm2 --tokens 1,4,16,64,512
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import cmoe_kernels
import torch
import torch.nn.functional as F
from cmoe_carve.modeling_cmoe import keep_count
from cmoe_kernels import carved_ffn_torch, cpu_decode, per_expert_loop

# (hidden size D, FFN neurons N)
SHAPES = {"llama2-7b": (4096, 11008), "smollm2": (576, 1536)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Row:
    shape: str
    layout: str
    provider: str
    tokens: int
    us: float
    active_mb: float
    gb_per_s: float
    tflops: float
    speedup_vs_dense: float = float("nan")


def parse_layout(spec: str, n_neurons: int) -> tuple[int, int, int, int]:
    """'S2A2E16' -> (shared 2, active routed 2, experts 16, neurons per expert m)."""
    s, rest = spec.upper().removeprefix("S").split("A")
    a, e = rest.split("E")
    S, A, E = int(s), int(a), int(e)
    if n_neurons % E:
        raise SystemExit(f"--layouts {spec}: {n_neurons} neurons do not split into {E} experts")
    return S, A, E, n_neurons // E


def route(T: int, S: int, A: int, E: int, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, S+A]: the shared experts 0..S-1, then A distinct random routed ones; gates."""
    routed = torch.rand(T, E - S, generator=generator).argsort(dim=1)[:, :A] + S  # [T, A]
    ids = torch.cat([torch.arange(S).expand(T, S), routed], dim=1)
    gates = torch.cat([torch.ones(T, S), 0.5 + torch.rand(T, A, generator=generator)], dim=1)
    return ids.to(device), gates.to(device)


def dense_ffn(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def gather_bmm(x, gate_up, down, ids, gates):
    """The rejected decode idea: index_select the chosen experts' weights, then bmm."""
    T, K = ids.shape
    m = down.shape[-1]
    flat = ids.reshape(-1)
    h = torch.bmm(gate_up.index_select(0, flat), x.repeat_interleave(K, 0).unsqueeze(-1))
    a = (F.silu(h[:, :m]) * h[:, m:]).mul_(gates.reshape(-1, 1, 1).to(h.dtype))  # [T*K, m, 1]
    y = torch.bmm(down.index_select(0, flat), a)  # [T*K, D, 1]
    return y.view(T, K, -1).sum(1)


def fused_decode(x, gate_up, down, router_w, zeros, top_k, num_shared, rows_2d=None, keep=None):
    """The fused CPU decode step (routing, experts, no compensation) -> y [T, D]."""
    return cpu_decode.moe_decode(
        x, router_w, None, zeros, zeros, zeros, "linear", top_k, num_shared, gate_up, down,
        rows_2d, keep, None, "silu",
    )[0]


@dataclass
class Job:
    """One provider at one token count: a function, its ring of per-layer arguments, its work."""

    layout: str
    provider: str
    fn: Callable
    ring: list[tuple]
    active_bytes: int
    flops: int
    times: list[float] = field(default_factory=list)


def _with_keep(fn: Callable, ratio: float) -> Callable:
    """fn with MoNE: each expert keeps ceil(ratio * m) neurons; the ring passes rows_2d last."""

    def run(x, gate_up, down, ids, gates, rows_2d):
        keep = keep_count(ratio, down.shape[-1])
        return fn(x, gate_up, down, ids, gates, neuron_keep=keep, rows_2d=rows_2d)

    return run


def time_jobs(jobs: list[Job], device: torch.device, args) -> None:
    """Seconds per layer of each job, passes interleaved across jobs.

    One pass runs a job over its whole ring of layers. Passes of all jobs alternate (dense,
    loop, torch, dense, ...), so that a drift in machine load (this CPU is shared) hits every
    provider alike; each job keeps its pass times.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for job in jobs:  # warm-up pass
            for a in job.ring:
                job.fn(*a)
        sync()
        start = time.perf_counter()
        while True:
            for job in jobs:
                t0 = time.perf_counter()
                for a in job.ring:
                    job.fn(*a)
                sync()
                job.times.append((time.perf_counter() - t0) / len(job.ring))
            n = len(jobs[0].times)
            if n >= args.reps and (time.perf_counter() - start > args.min_s or n >= 100):
                return


def ring_length(layer_bytes: int, ring_mb: float) -> int:
    return max(2, int(ring_mb * 2**20 // layer_bytes) + 1)


def bench_shape(args, device: torch.device) -> list[Row]:
    D, N = SHAPES[args.shape]
    dtype = DTYPES[args.dtype]
    size = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(device, dtype)

    # Each ring holds --ring-mb of distinct layers, so every pass streams its weights from memory.
    dense_bytes = 3 * D * N * size
    dense_ring = [
        (randn(N, D), randn(N, D), randn(D, N))
        for _ in range(ring_length(dense_bytes, args.ring_mb))
    ]
    carved = {}
    for layout in args.layouts:
        S, A, E, m = parse_layout(layout, N)
        n_layers = ring_length(3 * D * N * size, args.ring_mb)
        layers = [(randn(E, 2 * m, D), randn(E, D, m)) for _ in range(n_layers)]
        if args.neuron_keep < 1.0:  # the neuron-major copy MoNE decode reads, made once
            layers = [(gu, dn, cmoe_kernels.neuron_rows(gu, dn)) for gu, dn in layers]
        carved[layout] = (S, A, E, m, layers)
    fused = (
        "fused" in args.providers and device.type == "cpu" and dtype == torch.float32
        and cpu_decode.load()
    )
    routers = {
        layout: [(randn(E - S, D), torch.zeros(E - S)) for _ in layers]
        for layout, (S, A, E, m, layers) in carved.items()
    } if fused else {}
    providers: dict[str, Callable] = {
        "loop": per_expert_loop,
        "gather-bmm": gather_bmm,
        "torch": carved_ffn_torch,
    }
    if device.type == "cuda" and cmoe_kernels.triton_available():
        providers["triton"] = cmoe_kernels.carved_ffn_triton
    if args.neuron_keep < 1.0:
        for name in list(providers):
            if name in ("torch", "triton"):
                providers[f"{name}+keep"] = _with_keep(providers[name], args.neuron_keep)

    rows: list[Row] = []
    for T in args.tokens:
        x = torch.randn(T, D, generator=gen).to(device, dtype)
        jobs = [
            Job(
                "dense",
                "dense",
                dense_ffn,
                [(x, *w) for w in dense_ring],
                dense_bytes,
                2 * T * 3 * D * N,
            )
        ]
        for layout, (S, A, E, m, weights) in carved.items():
            ids, gates = route(T, S, A, E, device, gen)
            active = torch.unique(ids).numel() * 3 * D * m * size  # union of the chosen experts
            flops = 2 * T * (S + A) * 3 * D * m
            for name, fn in providers.items():
                if name.split("+")[0] not in args.providers:
                    continue
                if (name in ("gather-bmm", "torch+keep", "triton+keep") and T > 16) or (
                    name == "loop" and T > args.loop_max_tokens
                ):
                    continue
                kept = name.endswith("+keep")
                ring = [(x, w[0], w[1], ids, gates, *w[2:]) if kept else (x, w[0], w[1], ids, gates)
                        for w in weights]
                if kept:  # every gate row of an active expert, the kept rows of up and down
                    k = keep_count(args.neuron_keep, m)
                    job_bytes, job_flops = active * (m + 2 * k) // (3 * m), flops * (m + 2 * k) // (3 * m)
                else:
                    job_bytes, job_flops = active, flops
                jobs.append(Job(layout, name, fn, ring, job_bytes, job_flops))
            if fused and T <= 16:
                for kept in ([False, True] if args.neuron_keep < 1.0 else [False]):
                    keep = [keep_count(args.neuron_keep, m)] * E if kept else None
                    ring = [
                        (x, w[0], w[1], r[0], r[1], A, S, w[2] if kept else None, keep)
                        for w, r in zip(weights, routers[layout])
                    ]
                    k = keep_count(args.neuron_keep, m) if kept else m
                    jobs.append(Job(
                        layout, "fused+keep" if kept else "fused", fused_decode, ring,
                        active * (m + 2 * k) // (3 * m), flops * (m + 2 * k) // (3 * m),
                    ))
        time_jobs(jobs, device, args)
        stat = min if args.stat == "min" else statistics.median
        dense_t = stat(jobs[0].times)
        for job in jobs:
            t = stat(job.times)
            rows.append(
                Row(
                    args.shape,
                    job.layout,
                    job.provider,
                    T,
                    t * 1e6,
                    job.active_bytes / 2**20,
                    job.active_bytes / t / 1e9,
                    job.flops / t / 1e12,
                    dense_t / t,
                )
            )
            print(f"{job.layout} {job.provider} T={T}: {t * 1e6:.0f} us", file=sys.stderr)
    return rows


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'layout':9} {'provider':10} {'T':>5} {'us':>10} {'MiB read':>9} {'GB/s':>7} "
        f"{'TFLOP/s':>8} {'x dense':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.layout:9} {r.provider:10} {r.tokens:5d} {r.us:10.1f} {r.active_mb:9.2f} "
            f"{r.gb_per_s:7.2f} {r.tflops:8.4f} {r.speedup_vs_dense:7.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b", help="FFN shape (D, N)")
    p.add_argument("--layouts", default="S2A2E16,S3A3E8", help="carved layouts, comma-separated")
    p.add_argument("--tokens", default="1,4,16,64,256,1024,4096", help="token counts to sweep")
    p.add_argument(
        "--providers",
        default="loop,gather-bmm,torch,triton,fused",
        help="carved providers to run (dense always runs)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights and activations (default fp32 on CPU, bf16 on CUDA)",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--ring-mb",
        type=float,
        default=1024.0,
        help="total weight bytes per provider's ring of layers (beyond the caches)",
    )
    p.add_argument("--reps", type=int, default=5, help="minimum timed passes over the ring")
    p.add_argument("--min-s", type=float, default=1.0, help="minimum timed seconds per point")
    p.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="statistic over passes; min on a machine shared with other jobs",
    )
    p.add_argument(
        "--loop-max-tokens",
        type=int,
        default=1024,
        help="skip the per-expert loop above this many tokens (it is slow)",
    )
    p.add_argument(
        "--neuron-keep",
        type=float,
        default=1.0,
        help="also time MoNE decode (torch+keep, triton+keep) at this neuron keep ratio",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.layouts = [s.strip() for s in args.layouts.split(",")]
    args.providers = [s.strip() for s in args.providers.split(",")]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# {args.shape} D,N={SHAPES[args.shape]} {args.dtype} on {name}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.stat} of passes"
    )
    rows = bench_shape(args, device)
    print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)


if __name__ == "__main__":
    main()
