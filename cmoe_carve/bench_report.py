"""What `cmoe bench` reports: metrics with their samples, medians, spreads and ratios between
models, the report itself, and what it records about the models and the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from .bench_ffn import carved_ffn_backend, ffn_bytes_per_token, ffn_modules, tensor_bytes

if TYPE_CHECKING:
    from .bench import BenchConfig, BenchModel


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
        "parameter_bytes": sum(tensor_bytes(p) for p in params),
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
        "load_average_start": load_average(),
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
