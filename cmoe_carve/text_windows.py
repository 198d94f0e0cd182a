"""Token windows cut from a text source: the random calibration windows and the contiguous
evaluation windows of the GPTQ protocol, each tokenised from the whole text once."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .errors import DataError

if TYPE_CHECKING:  # data imports this module to re-export its names
    from .data import TextSource

logger = logging.getLogger(__name__)

# GPTQ's C4 protocol: at most 256 evaluation windows (of the first 1,100 validation documents).
C4_EVAL_MAX_WINDOWS = 256


def tokenize_text(tokenizer, source: TextSource) -> torch.Tensor:
    """The whole text tokenised once, as GPTQ does: `tokenizer(text)`, with the tokenizer's
    default special tokens (a single BOS at the very start for Llama; none for SmolLM2).
    Returns int64 [N]."""
    # verbose=False: the text is longer than model_max_length on purpose; windows cut it later.
    ids = tokenizer(source.text, return_tensors="pt", verbose=False)["input_ids"][0]
    return ids.to(torch.long)


def calibration_windows(
    tokenizer, source: TextSource, n_samples: int, seqlen: int, seed: int,
    context: int | None = None,
) -> torch.Tensor:
    """`n_samples` windows of `seqlen` tokens at random starts (GPTQ style; windows may overlap),
    drawn with a torch.Generator seeded by `seed`, so the same seed gives the same windows.
    `context`: the model's context length, which a window may not exceed.
    Returns int64 [n_samples, seqlen]."""
    if n_samples < 1 or seqlen < 1:
        raise DataError(
            f"need at least one calibration window of one token, got {n_samples} x {seqlen}"
        )
    require_within_context(seqlen, context)
    ids = tokenize_text(tokenizer, source)  # [N]
    n_tokens = ids.numel()
    _require_one_window(source, n_tokens, seqlen, context)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seqlen + 1, (n_samples,), generator=generator)  # [n]
    windows = ids[starts[:, None] + torch.arange(seqlen)]  # [n, seqlen]
    logger.info(
        "calibration: %d windows of %d tokens (seed %d) from %d tokens of %s",
        n_samples,
        seqlen,
        seed,
        n_tokens,
        source.describe(),
    )
    return windows


def eval_windows(
    tokenizer, source: TextSource, seqlen: int, max_windows: int | None = None,
    context: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start of the text (GPTQ:
    n = tokens // seqlen, the remainder dropped), at most `max_windows`, and for C4 at most 256
    by protocol. Returns int64 [n, seqlen]."""
    if seqlen < 2:
        raise DataError(f"--seqlen {seqlen} leaves no token to predict: use 2 or more")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"--max-windows {max_windows} must be 1 or more")
    require_within_context(seqlen, context)
    ids = tokenize_text(tokenizer, source)  # [N]
    n_tokens = ids.numel()
    _require_one_window(source, n_tokens, seqlen, context)
    available = n_tokens // seqlen
    n = available if max_windows is None else min(available, max_windows)
    if source.dataset == "c4" and n > C4_EVAL_MAX_WINDOWS:
        logger.info(
            "c4: keeping the first %d windows, as the GPTQ protocol does", C4_EVAL_MAX_WINDOWS
        )
        n = C4_EVAL_MAX_WINDOWS
    logger.info(
        "%s: %d tokens -> %d windows of %d, %d used",
        source.describe(),
        n_tokens,
        available,
        seqlen,
        n,
    )
    return ids[: n * seqlen].reshape(n, seqlen).clone()  # [n, seqlen]


def require_within_context(seqlen: int, context: int | None) -> None:
    """A window may not be longer than the model's context (position embeddings)."""
    if context is not None and seqlen > context:
        raise DataError(
            f"--seqlen {seqlen} exceeds the model's context of {context} tokens "
            f"(config.max_position_embeddings): use --seqlen {context} or less"
        )


def _require_one_window(
    source: TextSource, n_tokens: int, seqlen: int, context: int | None = None
) -> None:
    if n_tokens < seqlen:
        # Suggest a window the model can also take, not only one the text can fill.
        fit = n_tokens if context is None else min(n_tokens, context)
        raise DataError(
            f"{source.dataset} text from {source.origin} has {n_tokens} tokens, fewer than one "
            f"window of {seqlen}: use --seqlen {fit} or less, or more text"
        )
