"""Keep freed memory in the process for the next tensor instead of handing it back to the OS.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mapping and
unmaps it on free, so each large tensor the carve makes (a layer's neuron scores, expert
activations, Gram chunks: tens to hundreds of MB, thousands per carve) is paid again in page
faults as its pages are first touched. On SmolLM2's default carve that was 20.5 million minor
faults and 78 s of system time; with large allocations kept on the heap and the heap not trimmed,
0.66 million faults, and the carve took 112.2 s instead of 179.5 s (same process, same result,
2-core AMD EPYC), for a peak resident size of 3.24 GB instead of 2.67 GB: freed memory is reused,
not returned. This is what jemalloc or tcmalloc preloading does for PyTorch on CPUs, without
either installed.

Threads that first allocate after this call share that one heap (one malloc arena): a thread's
own arena can hold no block past 64 MiB, so glibc maps each larger tensor of a second thread (the
carve's dense stream, the fine-tune's teacher) afresh whatever the thresholds say. With the
carve's dense stream in a thread, that was 25 s of system time against 5 s with one arena. The
commands call this first; arenas made before it stay in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# Allocations below this come from the heap (and their memory is reused); a larger one is rare
# enough that a fresh mapping costs little beside the work on it.
MMAP_THRESHOLD = 1 << 30
# Free memory at the top of the heap is returned to the OS only above this.
TRIM_THRESHOLD = 2 << 30
# The heap grows in steps of at least this, not page by page.
TOP_PAD = 256 << 20

# Set to 0 to leave the C library's allocator as it is.
ENV = "CMOE_REUSE_MEMORY"

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Tune glibc's malloc for large tensors (once per process); True where it took effect,
    False on other C libraries or platforms, or where $CMOE_REUSE_MEMORY is 0."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = [mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            mallopt(_M_TOP_PAD, TOP_PAD), mallopt(_M_ARENA_MAX, 1)]
    _applied = all(v == 1 for v in done)
    if not _applied:
        log.debug("mallopt refused some settings: %s", done)
    return _applied
