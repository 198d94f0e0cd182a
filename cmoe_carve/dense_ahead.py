"""The dense model's own stream for stream targets: each dense layer's output on the dense
model's hidden states, made layer by layer as the carve reaches it, or ahead of it in a thread of
its own.

The dense stream never depends on the carve, so on a CPU it can run beside the carve's first
layers, each side on half the threads (one each on two cores). A matrix product on one thread
runs closer to the core's peak than on two (SmolLM2's FFN products here: 74 GFLOP/s on one
thread, 125-133 on two), so the two halves together do more work per second than either alone.

Which operations run on how many threads is fixed by the plan, never by timing: the carve's
first `beside_layers` layers run on the carve's half, and before the next one the carve waits
for the dense thread to finish and takes every thread back. Thread counts change how some
reductions round, so a plan fixed in advance keeps the carve repeatable to the bit.
"""

from __future__ import annotations

import math
import threading
import time

import torch

from .cpu_threads import thread_split
from .layer_calls import run_layer
from .streaming import available_memory

# The dense stream's outputs made ahead wait in memory until the carve takes them: beside the
# carve only where all of them together fit in this (SmolLM2 on 8 x 2,048 tokens: 30 x 38 MB).
AHEAD_BYTES = 2 << 30
# ... and where they, with the dense layer's own activations (which now overlap the carve's),
# take at most this share of the memory available when the carve starts.
AHEAD_MEMORY_SHARE = 0.5
# Share of the layers carved beside the dense thread. On SmolLM2 a dense layer took 2.4-2.7 s on
# one thread and a carved layer 4.3-5.5 s, so the dense thread ends about half-way through.
BESIDE_SHARE = 0.5


def runs_beside(enabled: bool, device: torch.device, hidden: torch.Tensor, num_layers: int,
                streamed: bool, layer_bytes: int = 0, available: int | None = None) -> bool:
    """Whether the dense stream runs in its own thread: asked for, on a CPU with two threads or
    more, the whole model in memory (a streamed carve reads each layer's weights only when it
    carves it), every layer's output fitting in AHEAD_BYTES at once, and those outputs with one
    dense layer call's activations (`layer_bytes`) in AHEAD_MEMORY_SHARE of `available` memory
    (default: what the host has available now)."""
    if not (enabled and device.type == "cpu" and not streamed and torch.get_num_threads() >= 2
            and num_layers > 1):
        return False
    held = hidden.numel() * hidden.element_size() * num_layers
    if held > AHEAD_BYTES:
        return False
    if available is None:
        available = available_memory(device)
    return held + layer_bytes <= AHEAD_MEMORY_SHARE * available


class DenseStream:
    """`take(i)`: layer i's dense output on the dense stream [n, seqlen, D], made on demand, or
    by `start`'s thread ahead of the carve."""

    def __init__(self, layers, hidden: torch.Tensor, layer_args, batches):
        self.layers = layers
        self.layer_args = layer_args
        self.batches = batches
        self._hidden = hidden
        self._outputs: list[torch.Tensor | None] = [None] * len(layers)
        self._ready = [threading.Event() for _ in layers]
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._next = 0  # the next layer to make on demand (no thread)
        self.beside_layers = len(layers)  # the layer at which the carve takes every thread back
        self.threads: int | None = None  # the main thread's count, to restore
        self.seconds: float | None = None  # the thread's time from start to its last layer

    def _make(self, index: int) -> torch.Tensor:
        args, kwargs = self.layer_args[index]
        with torch.no_grad():
            out = run_layer(self.layers[index], self._hidden, args, kwargs, self.batches)
        self._hidden = out
        return out

    def _run(self, threads: int) -> None:
        try:
            # Grad mode and the thread count are per thread: set both here, not in the caller.
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            for index in range(len(self.layers)):
                if self._stop.is_set():
                    return
                self._outputs[index] = self._make(index)
                self._ready[index].set()
            self.seconds = time.perf_counter() - t0
        except BaseException as exc:  # handed to the carve, which raises it
            self._error = exc
        finally:
            self._hidden = None
            for event in self._ready:  # a carve waiting on a layer never made wakes up
                event.set()

    def start(self, beside_layers: int) -> None:
        """Make every layer's output in a thread on half the CPU threads; the carve's own first
        `beside_layers` layers run on the other half."""
        threads = torch.get_num_threads()
        carve, dense = thread_split(threads)
        self.beside_layers = beside_layers
        thread = threading.Thread(target=self._run, args=(dense,), name="cmoe-dense-stream",
                                  daemon=True)
        thread.start()  # may fail (no thread to be had): nothing changed yet
        self._thread, self.threads = thread, threads
        torch.set_num_threads(carve)

    def take(self, index: int) -> torch.Tensor:
        """Layer `index`'s output; the carve asks for them in order, once each."""
        if self._thread is None:
            if index != self._next:
                raise RuntimeError(f"dense stream asked for layer {index}, next is {self._next}")
            self._next += 1
            return self._make(index)
        if index == self.beside_layers:
            self.finish()
        self._ready[index].wait()
        self._raise_failure()
        out, self._outputs[index] = self._outputs[index], None
        return out

    def finish(self) -> None:
        """Wait for the thread to end and give the carve every thread back."""
        if self._thread is not None:
            self._thread.join()
            self._restore_threads()
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise RuntimeError("the dense stream's thread failed") from self._error

    def _restore_threads(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            self.threads = None

    def stop(self) -> None:
        """On any exit: stop the thread after its current layer, restore the thread count and
        drop the outputs the carve did not take."""
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join()
        finally:
            self._restore_threads()
            self._outputs = [None] * len(self._outputs)


def beside_layers(num_layers: int) -> int:
    """The carve's layers run beside the dense thread, fixed by the plan (at least one)."""
    return max(1, min(num_layers - 1, math.ceil(num_layers * BESIDE_SHARE)))
