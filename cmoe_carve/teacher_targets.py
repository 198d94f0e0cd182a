"""The `--distill` teacher's top-k targets of every training window, made once per run.

The teacher runs forward only, each window once, in batches of --batch-size in window order
(so a resumed run makes the same ones), and is dropped once every window has its targets.

With --teacher-beside, on a CPU, it runs in a thread of its own beside the first optimizer
steps, each side on half the CPU threads (one each on two cores): a student step gains less
from a second core than the teacher's dense matmuls do (SmolLM2-135M's S2A2E16 carve on a
2-core AVX2 EPYC: a step 2.8 s on two threads and 4.4 s on one, a teacher window 1.25 s and
2.3 s), so side by side both finish sooner than in turn. The batches are made in the order the
plan first asks for their windows; a step that needs one not yet made waits for it.
"""

from __future__ import annotations

import math
import threading
import time

import torch
from torch import nn

from .distill import SparseTargets, sparse_targets
from .progress import progress_bar

# The most memory the cached targets may take (12 bytes per kept id and token: 128 x 512 tokens
# at k = 128 take 100 MB); beyond it the teacher runs at every step instead.
TEACHER_CACHE_BYTES = 4 * 2**30

# Steps trained beside the background teacher, per teacher batch: one 1-thread teacher window
# took about half of a 1-thread student step of the same window (2.3 against 4.4 s, above), so
# the first half as many steps as there are batches keeps both sides busy. The count is fixed
# by the plan alone, not by timing, so a resumed run trains the same steps on one thread (a
# student step's gradients differ in rounding between one and two threads; the teacher's
# logits do not).
OVERLAP_STEPS_PER_BATCH = 0.5


def cacheable(n_windows: int, length: int, k: int) -> bool:
    """Whether the targets of n_windows x length tokens at top-k fit TEACHER_CACHE_BYTES."""
    return n_windows * length * (k * 12 + 4) <= TEACHER_CACHE_BYTES


def batch_order(n_windows: int, batch_size: int, plan: list, start: int) -> list[int]:
    """First windows of the teacher's batches (window order, `batch_size` each), sorted by the
    first step from `start` on whose micro-batches use one of their windows; batches no step
    uses come last, in window order."""
    first_use: dict[int, int] = {}
    for step, micro_batches in enumerate(plan[start:]):
        for idx in micro_batches:
            for w in idx.tolist():
                first_use.setdefault(w // batch_size, step)
    batches = range(-(-n_windows // batch_size))
    never = len(plan) + 1
    return [b * batch_size for b in sorted(batches, key=lambda b: (first_use.get(b, never), b))]


def overlap_steps(n_windows: int, config, plan: list, start: int, device: torch.device,
                  processes: int) -> int:
    """The last step (exclusive) trained beside the background teacher; `start` (none) where
    the teacher runs first: without --teacher-beside, on a GPU (its kernels queue on one device
    anyway), across several processes, or with one CPU thread to share."""
    if (not config.teacher_beside or device.type != "cpu" or processes > 1
            or torch.get_num_threads() < 2):
        return start
    batches = -(-n_windows // config.batch_size)
    steps = math.ceil(batches * OVERLAP_STEPS_PER_BATCH / config.grad_accum)
    return max(start, min(steps, len(plan)))


class TeacherTargets:
    """The targets of every window, filled in by `make` (here) or `start` (a thread); `get`
    returns a micro-batch's, waiting for any not made yet."""

    def __init__(self, teacher: nn.Module, windows: torch.Tensor, batch_size: int, k: int,
                 temperature: float, device: torch.device):
        n, length = windows.shape
        self.teacher, self.windows, self.batch_size = teacher, windows, batch_size
        self.k, self.temperature, self.device = k, temperature, device
        # Rows of three tensors made before the teacher runs: kept as each batch's own small
        # tensors, the targets would be scattered between the teacher's freed logits (100 MB
        # a window), which the heap (`memory_reuse`) then cannot give back or reuse whole:
        # SmolLM2-135M's 128 windows took resident memory from 0.75 to 5.9 GiB that way.
        self.kept = SparseTargets.empty(n * length, k, device)
        self.ready = [threading.Event() for _ in range(-(-n // batch_size))]
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.made = 0  # batches made so far
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def batches(self) -> int:
        return len(self.ready)

    def make(self, order: list[int], progress: bool = False, threads: int | None = None) -> None:
        """Make the targets of the batches starting at `order`'s windows, in that order (on
        `threads` CPU threads where given)."""
        start, length, bs = time.perf_counter(), self.windows.shape[1], self.batch_size
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            with torch.no_grad(), progress_bar(len(order), "teacher targets",
                                               enabled=progress) as bar:
                for first in order:
                    if self._stop.is_set():
                        raise RuntimeError("the teacher was stopped")
                    ids = self.windows[first : first + bs].to(self.device)
                    logits = self.teacher(input_ids=ids, use_cache=False).logits
                    batch = sparse_targets(logits, self.k, self.temperature)
                    del logits
                    self.kept[first * length : first * length + batch.log_p.shape[0]] = batch
                    del batch
                    self.made += 1
                    self.ready[first // bs].set()
                    bar.advance()
        except BaseException as exc:  # handed to whoever waits in `get` or `join`
            self.error = exc
            for event in self.ready:  # no wait for a batch that will never come
                event.set()
            if self._thread is None:
                raise
        finally:
            self.seconds += time.perf_counter() - start

    def start(self, order: list[int], threads: int) -> None:
        """Make the targets in a background thread on `threads` CPU threads."""
        self._thread = threading.Thread(target=self.make, args=(order, False, threads),
                                        name="cmoe-teacher", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self) -> None:
        """Wait for the background teacher; re-raise what stopped it."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Ask the background teacher to stop after its current batch, and wait for it."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()

    def release(self) -> None:
        """Drop the teacher once every target is made."""
        self.teacher = None

    def get(self, windows: list[int]) -> SparseTargets:
        """The targets of the given windows' tokens, one window after another."""
        length = self.windows.shape[1]
        parts = []
        for w in windows:
            self.ready[w // self.batch_size].wait()
            if self.error is not None:
                raise RuntimeError("the teacher stopped before making its targets") from self.error
            parts.append(self.kept[w * length : (w + 1) * length])
        return SparseTargets.cat(parts)
