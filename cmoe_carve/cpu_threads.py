"""Sharing a CPU's threads between two streams of work that run side by side (the carve and the
dense model's stream; the fine-tune's student and its teacher)."""

from __future__ import annotations


def thread_split(threads: int) -> tuple[int, int]:
    """CPU threads for (the main work, the work beside it): half each, the odd one to the main
    work, at least one each."""
    beside = max(1, threads // 2)
    return max(1, threads - beside), beside
