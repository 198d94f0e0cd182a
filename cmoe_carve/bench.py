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
import ctypes
import functools
import gc
import inspect
import logging
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources

import torch
from torch import nn

from .errors import CmoeError
from .modeling_cmoe import find_gated_mlps
from .progress import progress_bar

log = logging.getLogger(__name__)

DEFAULT_MODEL_REF = "default"  # names the built-in default where None cannot be passed (CLI)


class BenchError(CmoeError):
    """Benchmark options or models that cannot be measured as asked."""


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
# The FFN modules of a model, and the official per-expert loop swapped into a carved one


def is_carved_mlp(module: nn.Module) -> bool:
    """A CarvedMLP, whether from this package or from a checkpoint's remote code."""
    return all(hasattr(module, a) for a in ("route", "gate_up_proj", "down_proj", "router"))


def ffn_modules(model: nn.Module) -> list[nn.Module]:
    """Every FFN of the model in order: carved MLPs and dense gated MLPs."""
    dense = {id(m) for _, m in find_gated_mlps(model)}
    found = [m for m in model.modules() if is_carved_mlp(m) or id(m) in dense]
    if not found:
        raise BenchError(
            f"{type(model).__name__} has no gated or carved MLP to time: expected modules with "
            "gate_proj/up_proj/down_proj/act_fn (dense) or gate_up_proj/down_proj/route (carved)"
        )
    return found


def carved_ffn_backend(model: nn.Module) -> str | None:
    """Which implementation runs the carved model's experts; None for a dense model."""
    carved = [m for m in model.modules() if is_carved_mlp(m)]
    if not carved:
        return None
    module = sys.modules.get(type(carved[0]).__module__)
    if getattr(module, "_fast_carved_ffn", None) is None:
        return "plain PyTorch of modeling_cmoe (cmoe_kernels not importable)"
    import cmoe_kernels

    probe = carved[0].gate_up_proj.new_zeros(1, carved[0].hidden_size)
    try:
        backend = cmoe_kernels.kernel_backend(probe)
    except (RuntimeError, ValueError) as err:
        backend = f"unusable: {err}"
    fused = getattr(module, "_cpu_decode", None)
    if fused is not None and fused.applies(probe):
        limit = getattr(module, "_CPU_FUSED_TOKENS", "a few")
        return (
            f"fused CPU decode step up to {limit} tokens, cmoe_kernels.carved_ffn ({backend}) "
            "above"
        )
    return f"cmoe_kernels.carved_ffn ({backend})"


def _kernel_activation(module: nn.Module) -> str:
    from .modeling_cmoe import _KERNEL_ACTIVATIONS

    try:
        return _KERNEL_ACTIVATIONS[module.activation]
    except KeyError:
        raise BenchError(
            f"the per-expert loop baseline has no kernel for activation {module.activation!r}: "
            "run with --no-loop-baseline"
        ) from None


def _per_expert_loop_experts(
    self: nn.Module, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """CarvedMLP.experts with the official CMoE combine in place of our kernels."""
    from cmoe_kernels import per_expert_loop

    return per_expert_loop(x, self.gate_up_proj, self.down_proj, ids, gates, _kernel_activation(self))


@contextlib.contextmanager
def per_expert_loop_installed(model: nn.Module) -> Iterator[nn.Module]:
    """The carved model with every CarvedMLP running the official per-expert loop, restored
    after."""
    carved = [m for m in model.modules() if is_carved_mlp(m)]
    if not carved:
        raise BenchError("the per-expert loop baseline needs a carved model")
    for module in carved:
        _kernel_activation(module)  # fail before patching anything
    try:
        for module in carved:
            module.experts = types.MethodType(_per_expert_loop_experts, module)
        yield model
    finally:
        for module in carved:
            module.__dict__.pop("experts", None)  # the class's experts again


# ----------------------------------------------------------------------------------------------
# Clocks: device sync, the per-token stamps of generate(), FFN hooks, peak memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage collection inside a timed region (collected just before it)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _token_clock(device: torch.device):
    """A stopping criterion that never stops and stamps the time at which each token exists."""
    from transformers import StoppingCriteria

    class TokenClock(StoppingCriteria):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            _sync(device)
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenClock()


class FfnTimer:
    """Forward hooks around FFN modules, summing the time of decode calls (one position each).

    CPU: perf_counter around each call (torch on CPU is synchronous). CUDA: events, read at exit.
    Cost: two Python hooks per FFN call, a few microseconds against a millisecond-scale token.
    """

    def __init__(
        self,
        modules: list[nn.Module],
        device: torch.device,
        counts: Callable[[tuple, dict], bool] | None = None,
    ):
        self.modules, self.device = modules, device
        self.counts = counts or self._is_decode  # which calls to time, from their inputs
        self.seconds, self.calls = 0.0, 0
        self._handles: list = []
        self._start: float | torch.cuda.Event | None = None
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @staticmethod
    def _is_decode(args: tuple, kwargs: dict) -> bool:
        x = args[0] if args else next(iter(kwargs.values()), None)
        return isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-2] == 1

    @property
    def in_call(self) -> bool:
        """Whether a timed call is running now (for nested timers)."""
        return self._start is not None

    def _pre(self, module, args, kwargs) -> None:
        if not self.counts(args, kwargs):
            self._start = None
        elif self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output) -> None:
        if self._start is None:
            return
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._start
        self.calls += 1
        self._start = None

    def __enter__(self) -> FfnTimer:
        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._events:
            _sync(self.device)
            self.seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1e3
            self._events.clear()


def _rss_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (Linux), {} elsewhere."""
    values = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, number, _unit = line.split()
                    values[key.rstrip(":")] = int(number) * 1024
    except OSError:
        pass
    return values


def _reset_rss_peak() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand glibc's free heap back to the OS, so that a run's RSS peak counts its own allocations
    rather than whatever the previous run left in malloc's free lists."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory of a region above what was in use when it began, in bytes (None: unknown).

    CPU: RSS high-water mark after a reset, minus RSS at the start (Linux only); approximate,
    since the allocator may serve a run from memory it already holds. CUDA: max_memory_allocated.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None
        self._base = 0
        self._tracking = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._tracking = True
        else:
            _malloc_trim()
            self._tracking = _reset_rss_peak()
            self._base = _rss_status().get("VmRSS", 0)
        return self

    def __exit__(self, *exc) -> None:
        if not self._tracking:
            return
        if self.device.type == "cuda":
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_status().get("VmHWM", 0)
        self.bytes = max(0, peak - self._base)


# ----------------------------------------------------------------------------------------------
# Prompts and single runs


def _packaged_text() -> str:
    return (
        resources.files("cmoe_carve.data_files")
        .joinpath("wikitext2_valid_excerpt.txt")
        .read_text(encoding="utf-8")
    )


def prompt_ids(
    tokenizer, vocab_size: int, batch: int, length: int, seed: int = 0
) -> torch.Tensor:
    """[batch, length] token ids: consecutive windows of the packaged WikiText-2 excerpt when
    there is a tokenizer (real text routes like real use), seeded random ids otherwise."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (batch, length), generator=gen)
    ids = torch.tensor(tokenizer(_packaged_text())["input_ids"], dtype=torch.long)
    ids = ids[ids < vocab_size]
    need = batch * length
    if ids.numel() < need:
        ids = ids.repeat(need // max(ids.numel(), 1) + 1)
    return ids[:need].reshape(batch, length)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class PrefillSample:
    seconds: float
    peak_bytes: int | None


@dataclass
class DecodeSample:
    ttft_s: float  # start of generate() to the first new token
    decode_s: float  # first new token to the last
    steps: int  # decode forward passes in decode_s (new_tokens - 1)
    batch: int
    ffn_s: float | None  # FFN time of all decode steps, all layers (hooked runs only)
    ffn_calls: int
    router_s: float | None  # the carved FFNs' routers' share of ffn_s
    router_calls: int
    peak_bytes: int | None


def prefill_once(model: nn.Module, ids: torch.Tensor) -> PrefillSample:
    """One forward pass over `ids` [B, L] with a fresh KV cache, as generate()'s prefill."""
    device = ids.device
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    with torch.inference_mode(), PeakMemory(device) as memory, _gc_paused():
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, **extra)
        _sync(device)
        seconds = time.perf_counter() - start
    return PrefillSample(seconds, memory.bytes)


def _generation_config(model: nn.Module, new_tokens: int):
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    first_eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # EOS suppressed: every run decodes exactly new_tokens
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=first_eos if first_eos is not None else 0,
    )


def decode_once(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    ffn: list[nn.Module] | None = None,
) -> DecodeSample:
    """Greedy generate() of exactly `new_tokens` after `ids` [B, P]; with `ffn`, the time of
    those modules, and of the routers of the carved ones, in the decode steps."""
    from transformers import StoppingCriteriaList

    device = ids.device
    clock = _token_clock(device)
    routers = [m.router for m in ffn or [] if is_carved_mlp(m)]
    timer = FfnTimer(ffn or [], device)
    # A router sees the FFN input flattened to [B*S, D]: time it inside timed FFN calls.
    router_timer = FfnTimer(routers, device, counts=lambda args, kwargs: timer.in_call)
    config = _generation_config(model, new_tokens)
    with torch.inference_mode(), PeakMemory(device) as memory, timer, router_timer, _gc_paused():
        _sync(device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    made = out.shape[1] - ids.shape[1]
    if made != new_tokens or len(clock.stamps) != new_tokens:
        raise BenchError(f"generate() made {made} tokens instead of {new_tokens}")
    return DecodeSample(
        ttft_s=clock.stamps[0] - start,
        decode_s=clock.stamps[-1] - clock.stamps[0],
        steps=new_tokens - 1,
        batch=ids.shape[0],
        ffn_s=timer.seconds if ffn else None,
        ffn_calls=timer.calls,
        router_s=router_timer.seconds if routers else None,
        router_calls=router_timer.calls,
        peak_bytes=memory.bytes,
    )


# ----------------------------------------------------------------------------------------------
# Metrics and the report


# kind -> (row name, unit, higher is better). The table shows them in this order.
METRIC_KINDS: dict[str, tuple[str, str, bool]] = {
    "decode_tokens_per_s": ("decode, batch {b}", "tok/s", True),
    "ttft_ms": ("time to first token, batch {b}, {p}-token prompt", "ms", False),
    "ffn_us_per_layer": ("FFN per layer per decode step, batch {b}", "us", False),
    "router_us_per_layer": ("router per layer per decode step (part of FFN), batch {b}", "us",
                            False),
    "ffn_gb_per_s": ("FFN weight bytes read / FFN time, batch {b}", "GB/s", True),
    "ffn_share_pct": ("FFN share of decode time, batch {b}", "%", False),
    "rest_ms_per_step": ("rest of the model per decode step, batch {b}", "ms", False),
    "prefill_tokens_per_s": ("prefill, {L} tokens", "tok/s", True),
    "decode_peak_mb": ("peak memory over weights, decode batch {b}", "MB", False),
    "prefill_peak_mb": ("peak memory over weights, prefill {L} tokens", "MB", False),
}


@dataclass
class Metric:
    """One measured quantity: samples per model label, medians, and ratios between labels."""

    key: str  # "<kind>.b<batch>" or "<kind>.L<tokens>"
    name: str
    unit: str
    higher_is_better: bool
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, label: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(label, []).append(float(value))

    def median(self, label: str) -> float | None:
        values = self.samples.get(label)
        return statistics.median(values) if values else None

    def spread(self, label: str) -> float | None:
        """(max - min) / median of the samples: how much the machine's noise moved them."""
        values, mid = self.samples.get(label), self.median(label)
        if not values or len(values) < 2 or not mid:
            return None
        return (max(values) - min(values)) / abs(mid)

    def ratio(self, numerator: str, denominator: str) -> float | None:
        top, bottom = self.median(numerator), self.median(denominator)
        return None if top is None or not bottom else top / bottom

    def to_record(self, labels: list[str], pairs: list[tuple[str, str]]) -> dict:
        return {
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "samples": self.samples,
            "median": {label: self.median(label) for label in labels if label in self.samples},
            "spread": {label: self.spread(label) for label in labels if label in self.samples},
            "ratios": {f"{a}/{b}": self.ratio(a, b) for a, b in pairs},
        }


LOOP_LABEL = "loop"  # the carved model running the official per-expert loop


@dataclass
class BenchReport:
    config: BenchConfig
    primary: str  # label of the model benchmarked (MODEL)
    reference: str | None  # label of the --compare model
    models: dict[str, dict]  # label -> what was loaded, its size, its FFN backend
    metrics: dict[str, Metric]
    machine: dict
    seconds: float

    @property
    def labels(self) -> list[str]:
        extra = [LOOP_LABEL] if any(LOOP_LABEL in m.samples for m in self.metrics.values()) else []
        return [self.primary] + ([self.reference] if self.reference else []) + extra

    def ratio_pairs(self) -> list[tuple[str, str]]:
        pairs = [(self.primary, self.reference)] if self.reference else []
        if LOOP_LABEL in self.labels:
            pairs.append((LOOP_LABEL, self.primary))
        return pairs

    def to_record(self) -> dict:
        from . import __version__

        return {
            "cmoe_carve_version": __version__,
            "options": asdict(self.config),
            "machine": self.machine,
            "models": self.models,
            "primary": self.primary,
            "reference": self.reference,
            "seconds": round(self.seconds, 2),
            "metrics": [
                m.to_record(self.labels, self.ratio_pairs()) for m in self.metrics.values()
            ],
        }


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def ffn_bytes_per_token(module: nn.Module) -> float:
    """Weight bytes one token reads in this FFN: all of a dense MLP; the router plus the shared
    and the top-k routed experts of a carved one."""
    if is_carved_mlp(module):
        per_expert = (_tensor_bytes(module.gate_up_proj) + _tensor_bytes(module.down_proj)) / (
            module.num_experts
        )
        router = sum(_tensor_bytes(p) for p in module.router.parameters())
        return (module.num_shared + module.top_k) * per_expert + router
    projections = ("gate_proj", "up_proj", "down_proj")
    return sum(_tensor_bytes(getattr(module, p).weight) for p in projections)


def model_info(bench_model: BenchModel) -> dict:
    model = bench_model.model
    params = list(model.parameters())
    ffn = ffn_modules(model)
    cmoe = getattr(model.config, "cmoe", None) or {}
    return {
        "description": bench_model.description,
        "class": type(model).__name__,
        "dtype": str(params[0].dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in params),
        "parameter_bytes": sum(_tensor_bytes(p) for p in params),
        "ffn_layers": len(ffn),
        "ffn_bytes_per_token_per_layer": statistics.mean(ffn_bytes_per_token(m) for m in ffn),
        "spec": cmoe.get("spec"),
        "carved_ffn_backend": carved_ffn_backend(model),
    }


def machine_info(device: torch.device) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cmoe_kernel_env": os.environ.get("CMOE_KERNEL"),
        "load_average_start": _load_average(),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
    machine["load_average_end"] = _load_average()
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
