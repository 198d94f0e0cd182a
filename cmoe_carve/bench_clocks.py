"""Clocks and meters of `cmoe bench`: device sync, the time of each token generate() makes,
hooks that time FFN modules in decode steps, and the peak memory of a region."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection inside a timed region (collected just before it)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def token_clock(device: torch.device):
    """A stopping criterion that never stops and stamps the time at which each token exists."""
    from transformers import StoppingCriteria

    class TokenClock(StoppingCriteria):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            sync_device(device)
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
            sync_device(self.device)
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
            sync_device(self.device)
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
            sync_device(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_status().get("VmHWM", 0)
        self.bytes = max(0, peak - self._base)
