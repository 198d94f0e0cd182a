"""The prompts of `cmoe bench` and its single measured runs: one prefill forward pass and one
greedy generate() of a fixed number of tokens."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

from .bench_clocks import FfnTimer, PeakMemory, gc_paused, sync_device, token_clock
from .bench_ffn import is_carved_mlp
from .errors import BenchError


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
    with torch.inference_mode(), PeakMemory(device) as memory, gc_paused():
        sync_device(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, **extra)
        sync_device(device)
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
    clock = token_clock(device)
    routers = [m.router for m in ffn or [] if is_carved_mlp(m)]
    timer = FfnTimer(ffn or [], device)
    # A router sees the FFN input flattened to [B*S, D]: time it inside timed FFN calls.
    router_timer = FfnTimer(routers, device, counts=lambda args, kwargs: timer.in_call)
    config = _generation_config(model, new_tokens)
    with torch.inference_mode(), PeakMemory(device) as memory, timer, router_timer, gc_paused():
        sync_device(device)
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
