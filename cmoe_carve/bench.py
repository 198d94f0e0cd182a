"""Speed of a carved model against its dense source, measured side by side in one process.

What `cmoe bench` runs. Every figure comes from whole-model runs through transformers'
`generate()` or `forward()`, never from a micro-benchmark whose weights sit in cache:

* decode: greedy `generate()` with a KV cache and a fixed number of new tokens (`min_new_tokens`
  = `max_new_tokens`, so EOS cannot end a run early). A stopping criterion stamps the time after
  every token, so one run gives the time to the first token (prefill + first sampling step) and
  the decode rate over the remaining `new_tokens - 1` steps.
* FFN time per layer: forward hooks around every FFN module (the dense gated MLP, or the carved
  MLP with its router) during the batch-1 decode runs; only one-position calls (decode steps)
  count. Weights are streamed from memory exactly as in real decoding.
* prefill: one forward pass over a prompt of each length, with a fresh KV cache and
  `logits_to_keep=1` as `generate()` does.
* the official CMoE combine (`for e in experts: idx = where(ids == e); y[idx] += ...`,
  `cmoe_kernels.per_expert_loop`) swapped into the carved model for a third set of decode runs.
* peak memory of each run above what was resident before it (model weights excluded): the Linux
  RSS high-water mark, reset through /proc/self/clear_refs; `torch.cuda.max_memory_allocated`
  on CUDA.

Machine noise: each repetition runs every measurement for every model, in an order rotated from
one repetition to the next, so that a burst of load elsewhere hits all of them; medians are
reported, with the spread of the samples and the load average before and after.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .bench_ffn import (
    carved_ffn_backend,
    ffn_bytes_per_token,
    ffn_modules,
    is_carved_mlp,
    per_expert_loop_installed,
)
from .bench_report import (
    LOOP_LABEL,
    METRIC_KINDS,
    BenchReport,
    Metric,
    load_average,
    machine_info,
    model_info,
)
from .bench_runs import DecodeSample, PrefillSample, decode_once, prefill_once, prompt_ids
from .errors import BenchError
from .progress import progress_bar

# Re-exported: the names callers and tests use from `cmoe_carve.bench`.
__all__ = [
    "DEFAULT_MODEL_REF", "LOOP_LABEL", "BenchConfig", "BenchError", "BenchModel", "BenchReport",
    "Metric", "bench", "carved_ffn_backend", "decode_once", "ffn_modules", "is_carved_mlp",
    "load_bench_models", "per_expert_loop_installed", "prefill_once", "profile_decode",
    "prompt_ids", "run_bench",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_REF = "default"  # names the built-in default where None cannot be passed (CLI)


@dataclass
class BenchConfig:
    """What to measure. Saved in the JSON report under `options`."""

    prefill_tokens: tuple[int, ...] = field(
        default=(1, 16, 128, 512), metadata={"help": "prompt lengths of the prefill runs"}
    )
    decode_batches: tuple[int, ...] = field(
        default=(1, 4), metadata={"help": "batch sizes of the decode runs"}
    )
    prompt_tokens: int = field(default=128, metadata={"help": "prompt length of decode runs"})
    new_tokens: int = field(default=64, metadata={"help": "tokens generated per decode run"})
    repeats: int = field(default=5, metadata={"help": "measured repetitions (medians)"})
    warmup: int = field(default=1, metadata={"help": "discarded passes before measuring"})
    threads: int | None = field(
        default=None, metadata={"help": "torch intra-op threads; None keeps torch's setting"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    loop_baseline: bool = field(
        default=True, metadata={"help": "also decode with the official per-expert loop"}
    )
    seed: int = field(default=0, metadata={"help": "seed of random prompts (no tokenizer)"})

    def __post_init__(self):
        self.prefill_tokens = tuple(int(n) for n in self.prefill_tokens)
        self.decode_batches = tuple(int(b) for b in self.decode_batches)
        if not self.prefill_tokens and not self.decode_batches:
            raise BenchError("nothing to measure: give --tokens or --batch")
        if any(n < 1 for n in self.prefill_tokens):
            raise BenchError(f"--tokens must be positive lengths, got {self.prefill_tokens}")
        if any(b < 1 for b in self.decode_batches):
            raise BenchError(f"--batch must be positive batch sizes, got {self.decode_batches}")
        if self.new_tokens < 2:
            raise BenchError(
                f"--new-tokens must be at least 2 (one decode step), got {self.new_tokens}"
            )
        if self.prompt_tokens < 2:
            # A one-token prompt would make the prefill look like a decode step to the FFN hooks.
            raise BenchError(f"--prompt-tokens must be at least 2, got {self.prompt_tokens}")
        if self.repeats < 1 or self.warmup < 0:
            raise BenchError(
                f"--repeats must be >= 1 and --warmup >= 0, got {self.repeats}, {self.warmup}"
            )
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"--threads must be at least 1, got {self.threads}")

    def longest_sequence(self) -> int:
        decode = self.prompt_tokens + self.new_tokens if self.decode_batches else 0
        return max([decode, *self.prefill_tokens])


@dataclass
class BenchModel:
    """A model to measure, under a short label ("dense", "carved")."""

    label: str
    model: nn.Module
    description: str
    tokenizer: object | None = None


# ----------------------------------------------------------------------------------------------
# The schedule: groups of runs, every model in each, rotated from one repetition to the next


@dataclass
class _Variant:
    label: str
    model: nn.Module
    context: Callable[[], contextlib.AbstractContextManager]  # e.g. the per-expert loop patch
    ffn_bytes: float  # weight bytes a token reads per FFN layer (batch 1)


@dataclass
class _Group:
    kind: str  # "decode" or "prefill"
    size: int  # batch size (decode) or prompt length (prefill)
    ids: torch.Tensor  # [B, L]
    variants: list[_Variant]
    time_ffn: bool = False  # hooks around the FFNs (the smallest decode batch only)

    def describe(self) -> str:
        return f"decode b={self.size}" if self.kind == "decode" else f"prefill {self.size}"


def _metric(metrics: dict[str, Metric], kind: str, suffix: str, **names) -> Metric:
    key = f"{kind}.{suffix}"
    if key not in metrics:
        name, unit, higher = METRIC_KINDS[kind]
        metrics[key] = Metric(key, name.format(**names), unit, higher)
    return metrics[key]


def _record_decode(metrics, group: _Group, variant: _Variant, sample: DecodeSample, prompt: int):
    b, label = group.size, variant.label
    suffix, names = f"b{b}", {"b": b, "p": prompt}
    _metric(metrics, "decode_tokens_per_s", suffix, **names).add(
        label, sample.batch * sample.steps / sample.decode_s
    )
    _metric(metrics, "ttft_ms", suffix, **names).add(label, sample.ttft_s * 1e3)
    if sample.ffn_s is not None and sample.ffn_calls:
        per_layer = sample.ffn_s / sample.ffn_calls  # seconds per FFN call = per layer per step
        _metric(metrics, "ffn_us_per_layer", suffix, **names).add(label, per_layer * 1e6)
        if sample.router_s is not None and sample.router_calls:
            _metric(metrics, "router_us_per_layer", suffix, **names).add(
                label, sample.router_s / sample.router_calls * 1e6
            )
        if b == 1:  # with more tokens the experts they share are read once: bytes unknown
            _metric(metrics, "ffn_gb_per_s", suffix, **names).add(
                label, variant.ffn_bytes / per_layer / 1e9
            )
        _metric(metrics, "ffn_share_pct", suffix, **names).add(
            label, 100 * sample.ffn_s / sample.decode_s
        )
        _metric(metrics, "rest_ms_per_step", suffix, **names).add(
            label, (sample.decode_s - sample.ffn_s) / sample.steps * 1e3
        )
    if sample.peak_bytes is not None:
        _metric(metrics, "decode_peak_mb", suffix, **names).add(label, sample.peak_bytes / 2**20)


def _record_prefill(metrics, group: _Group, variant: _Variant, sample: PrefillSample):
    n, label = group.size, variant.label
    _metric(metrics, "prefill_tokens_per_s", f"L{n}", L=n).add(label, n / sample.seconds)
    if sample.peak_bytes is not None:
        _metric(metrics, "prefill_peak_mb", f"L{n}", L=n).add(label, sample.peak_bytes / 2**20)


def _loop_baseline_available(model: nn.Module) -> bool:
    try:
        import cmoe_kernels
    except ImportError:
        cmoe_kernels = None
    if not hasattr(cmoe_kernels, "per_expert_loop"):
        log.warning("cmoe_kernels has no per_expert_loop: the loop baseline is skipped")
        return False
    carved = [m for m in model.modules() if is_carved_mlp(m)]
    return bool(carved) and all(
        getattr(m, "activation", None) in _kernel_activation_names() for m in carved
    )


def _kernel_activation_names() -> set[str]:
    from .modeling_cmoe import _KERNEL_ACTIVATIONS

    return set(_KERNEL_ACTIVATIONS)


def _groups(models: list[BenchModel], config: BenchConfig, device: torch.device) -> list[_Group]:
    tokenizer = next((m.tokenizer for m in models if m.tokenizer is not None), None)
    vocab = models[0].model.config.vocab_size
    variants = []
    for m in models:
        ffn = ffn_modules(m.model)
        nbytes = statistics.mean(ffn_bytes_per_token(f) for f in ffn)
        variants.append(_Variant(m.label, m.model, contextlib.nullcontext, nbytes))
    carved = next((v for v in variants if carved_ffn_backend(v.model) is not None), None)
    loop = None
    if config.loop_baseline and carved is not None and _loop_baseline_available(carved.model):
        patch = functools.partial(per_expert_loop_installed, carved.model)
        loop = _Variant(LOOP_LABEL, carved.model, patch, carved.ffn_bytes)
    groups = []
    timed_batch = min(config.decode_batches, default=None)
    for b in config.decode_batches:
        ids = prompt_ids(tokenizer, vocab, b, config.prompt_tokens, config.seed).to(device)
        extra = [loop] if loop is not None and b == timed_batch else []
        groups.append(_Group("decode", b, ids, variants + extra, time_ffn=b == timed_batch))
    for n in config.prefill_tokens:
        ids = prompt_ids(tokenizer, vocab, 1, n, config.seed).to(device)
        groups.append(_Group("prefill", n, ids, list(variants)))
    return groups


def _run(group: _Group, variant: _Variant, new_tokens: int):
    with variant.context():
        if group.kind == "prefill":
            return prefill_once(variant.model, group.ids)
        ffn = ffn_modules(variant.model) if group.time_ffn else None
        return decode_once(variant.model, group.ids, new_tokens, ffn)


def _check_models(models: list[BenchModel], config: BenchConfig) -> None:
    if not models:
        raise BenchError("no model to benchmark")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels) or LOOP_LABEL in labels:
        raise BenchError(f"model labels must be distinct and not {LOOP_LABEL!r}, got {labels}")
    vocabs = {m.model.config.vocab_size for m in models}
    if len(vocabs) > 1:
        raise BenchError(f"the models have different vocabularies {sorted(vocabs)}: compare a "
                         "carved model with its own dense source")
    for m in models:
        limit = getattr(m.model.config, "max_position_embeddings", None)
        if limit is not None and config.longest_sequence() > limit:
            raise BenchError(
                f"{m.label} takes at most {limit} positions, but the runs need "
                f"{config.longest_sequence()}: lower --tokens, --prompt-tokens or --new-tokens"
            )


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_bench(models: list[BenchModel], config: BenchConfig, progress: bool = True) -> BenchReport:
    """Measure `models` (the first is the one benchmarked, the second its reference) side by side.

    Warm-up passes (short decodes) are discarded; then `config.repeats` passes, each running
    every group for every model in an order rotated by one each pass.
    """
    _check_models(models, config)
    device = torch.device(config.device)
    start = time.perf_counter()
    with _torch_threads(config.threads):
        for m in models:
            m.model.to(device).eval()
        machine = machine_info(device)
        groups = _groups(models, config, device)
        metrics: dict[str, Metric] = {}
        runs = (config.warmup + config.repeats) * sum(len(g.variants) for g in groups)
        with progress_bar(runs, "bench", enabled=progress) as bar:
            for rep in range(-config.warmup, config.repeats):
                warm = rep < 0
                new_tokens = min(config.new_tokens, 8) if warm else config.new_tokens
                for group in groups:
                    shift = rep % len(group.variants)
                    for variant in group.variants[shift:] + group.variants[:shift]:
                        bar.advance(info=f"{'warm-up' if warm else f'rep {rep + 1}'}: "
                                    f"{group.describe()} {variant.label}")
                        sample = _run(group, variant, new_tokens)
                        if warm:
                            continue
                        if group.kind == "decode":
                            _record_decode(metrics, group, variant, sample, config.prompt_tokens)
                        else:
                            _record_prefill(metrics, group, variant, sample)
    machine["load_average_end"] = load_average()
    order = list(METRIC_KINDS)
    ordered = dict(sorted(metrics.items(), key=lambda kv: order.index(kv[0].split(".")[0])))
    return BenchReport(
        config=config,
        primary=models[0].label,
        reference=models[1].label if len(models) > 1 else None,
        models={m.label: model_info(m) for m in models},
        metrics=ordered,
        machine=machine,
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------------
# From model references to a report; a profile of one decode


def _load(ref: str | None, dtype: str, device: str, **keep):
    from .loading import load_model

    if ref == DEFAULT_MODEL_REF and not os.path.exists(ref):
        ref = None
    keep = {k: v for k, v in keep.items() if v is not None}
    return load_model(ref, dtype=dtype, device=device, **keep)


def _described(item) -> str:
    cmoe = getattr(item.model.config, "cmoe", None)
    if not item.is_carved or not cmoe:
        return item.description
    routed, shared = cmoe.get("neuron_keep", 1.0), cmoe.get("shared_neuron_keep", 1.0)
    if routed >= 1.0 and shared >= 1.0:
        return item.description
    return f"{item.description} (neuron keep {routed}/{shared})"


def load_bench_models(
    model_ref: str | None,
    compare_ref: str | None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    neuron_keep: float | None = None,
    shared_neuron_keep: float | None = None,
) -> list[BenchModel]:
    """The model to benchmark and its reference, labelled "carved"/"dense" by what they are.
    The keep ratios (MoNE) override the first model's only, so that a carved checkpoint can be
    compared with itself without neuron selection."""
    from .loading import resolve_model_path

    keep = {"neuron_keep": neuron_keep, "shared_neuron_keep": shared_neuron_keep}
    for ref in (model_ref, compare_ref):  # a wrong path fails before the first model loads
        if ref not in (None, DEFAULT_MODEL_REF) and not ref.lower().endswith(".gguf"):
            resolve_model_path(ref)
    loaded = [_load(model_ref, dtype, device, **keep)]
    if compare_ref is not None:
        loaded.append(_load(compare_ref, dtype, device))
    labels = ["carved" if item.is_carved else "dense" for item in loaded]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [labels[0], "reference"]
    return [
        BenchModel(label, item.model, _described(item), item.tokenizer)
        for label, item in zip(labels, loaded, strict=True)
    ]


def bench(
    model_ref: str | None,
    compare_ref: str | None = None,
    *,
    config: BenchConfig | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> BenchReport:
    """Load `model_ref` (and `compare_ref`; "default" or None = the built-in SmolLM2) and
    benchmark them side by side."""
    config = config or BenchConfig()
    models = load_bench_models(model_ref, compare_ref, dtype=dtype, device=config.device)
    return run_bench(models, config, progress=progress)


def profile_decode(
    bench_model: BenchModel, config: BenchConfig, row_limit: int = 25, loop: bool = False
) -> str:
    """torch.profiler's table (ops by self CPU time) of one batch-1 decode of `config.new_tokens`
    tokens: where a decode step spends its time. `loop`: with the per-expert loop installed."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(config.device)
    model = bench_model.model.to(device)
    ids = prompt_ids(
        bench_model.tokenizer, model.config.vocab_size, 1, config.prompt_tokens, config.seed
    ).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    patch = per_expert_loop_installed(model) if loop else contextlib.nullcontext()
    with _torch_threads(config.threads), patch:
        decode_once(model, ids, min(config.new_tokens, 8))  # warm-up
        with profile(activities=activities) as prof:
            decode_once(model, ids, config.new_tokens)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit)
