"""Perplexity by the GPTQ protocol, a dense-versus-carved comparison, and lm-eval tasks.

Perplexity = exp(mean negative log-likelihood of every predicted token): each window of T
tokens predicts its last T - 1 tokens from the ones before (no context carried across windows),
and the mean runs over all windows' predicted tokens together. GPTQ computes the same figure as
exp(sum_w mean_w * T / (n * T)), which equals ours because every window predicts as many tokens.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from .data import TextSource, resolve_text
from .text_windows import eval_windows
from .errors import CmoeError, DataError, ModelError
from .balance import RoutingRecorder, carved_mlps, max_over_mean
from .progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model on one set of windows."""

    ppl: float  # exp(nll_mean)
    nll_mean: float  # mean negative log-likelihood per predicted token, in nats
    n_windows: int
    n_tokens: int  # predicted tokens: n_windows * (seqlen - 1)
    seconds: float  # wall time of the forward passes
    seconds_per_window: float
    # Carved models: the busiest routed expert's load over the mean load, per layer, averaged
    # over layers, on these windows (1.0 is perfectly even); None for dense models.
    load_max_over_mean: float | None = None

    def to_record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """Two models on the same windows; `ratio` = model ppl / reference ppl (1.0 = no loss)."""

    model: PerplexityResult
    reference: PerplexityResult
    ratio: float

    def to_record(self) -> dict:
        return {
            "model": self.model.to_record(),
            "reference": self.reference.to_record(),
            "ratio": self.ratio,
        }


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    description: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of a causal LM on token windows.

    model: a Hugging Face causal LM (returns `.logits`), dense or carved, on any device.
    windows: int64 [n, T] token ids, T >= 2 and at most the model's context; moved to the device
        of the model's input embeddings, `batch_size` windows per forward pass.
    Runs in eval mode under torch.inference_mode with use_cache=False and restores the model's
    train/eval mode afterwards. Token NLLs are computed in fp32 from the logits (upcast from any
    model dtype) and summed in fp64.
    """
    windows = _check_windows(model, windows, batch_size)
    n, seqlen = windows.shape
    device = model.get_input_embeddings().weight.device
    total_nll = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    mlps = carved_mlps(model)
    recorder = RoutingRecorder(mlps) if mlps else contextlib.nullcontext()
    try:
        with torch.inference_mode(), progress_bar(
            n, f"{description} (windows)", progress
        ) as bar, recorder:
            for first in range(0, n, batch_size):
                batch = windows[first : first + batch_size].to(device)  # [B, T]
                logits = model(input_ids=batch, use_cache=False).logits  # [B, T, V]
                total_nll += _sum_token_nll(logits, batch).cpu()
                if mlps:
                    recorder.collect()
                bar.advance(batch.shape[0])
    finally:
        model.train(was_training)
    load = max_over_mean(recorder.counts).mean().item() if mlps else None
    seconds = time.perf_counter() - start
    n_tokens = n * (seqlen - 1)
    nll_mean = total_nll.item() / n_tokens
    result = PerplexityResult(
        ppl=math.exp(nll_mean),
        nll_mean=nll_mean,
        n_windows=n,
        n_tokens=n_tokens,
        seconds=seconds,
        seconds_per_window=seconds / n,
        load_max_over_mean=load,
    )
    logger.info(
        "%s: ppl %.4f over %d windows (%.2f s/window)",
        description,
        result.ppl,
        n,
        result.seconds_per_window,
    )
    return result


def _sum_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of -log p(token t+1 | tokens <= t), as an fp64 scalar."""
    vocab = logits.shape[-1]
    predicted = logits[:, :-1].float().reshape(-1, vocab)  # [B*(T-1), V]
    targets = batch[:, 1:].reshape(-1)  # [B*(T-1)]
    nll = F.cross_entropy(predicted, targets, reduction="none")  # [B*(T-1)] fp32
    return nll.double().sum()


def _check_windows(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise DataError(
            f"windows must be a [n, seqlen] token tensor with n >= 1 and seqlen >= 2, got shape "
            f"{tuple(windows.shape)}: use --seqlen 2 or more and a text of at least one window"
        )
    if windows.dtype not in (torch.int64, torch.int32):
        raise DataError(f"windows must hold integer token ids, got {windows.dtype}")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be 1 or more")
    seqlen = windows.shape[1]
    context = model_context_length(model)
    if context is not None and seqlen > context:
        raise ModelError(
            f"windows of {seqlen} tokens exceed the model's context of {context} tokens "
            f"(config.max_position_embeddings): use --seqlen {context} or less"
        )
    rows = model.get_input_embeddings().num_embeddings
    top = int(windows.max())
    if top >= rows:
        raise ModelError(
            f"token id {top} is outside the model's embedding table of {rows} rows: the tokenizer "
            "does not belong to this model; evaluate with the model's own tokenizer"
        )
    return windows.long()


def model_context_length(model: torch.nn.Module) -> int | None:
    """config.max_position_embeddings (of the text config for multimodal models), if known."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(text_config, "max_position_embeddings", None)
    return int(context) if context else None


def compare(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
) -> Comparison:
    """Perplexity of `model` (say, carved) and `reference` (its dense source) on one set of
    windows."""
    ours = perplexity(model, windows, batch_size, progress, description="model")
    theirs = perplexity(reference, windows, batch_size, progress, description="reference")
    return Comparison(model=ours, reference=theirs, ratio=ours.ppl / theirs.ppl)


# ----------------------------------------------------------------------------------------------
# A model (and optionally its reference) on several datasets: what `cmoe eval` runs


@dataclass(frozen=True)
class DatasetResult:
    """One dataset's perplexity, with the text it was measured on and the reference's figure."""

    source: TextSource
    seqlen: int
    result: PerplexityResult
    reference: PerplexityResult | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.reference is None else self.result.ppl / self.reference.ppl

    def to_record(self) -> dict:
        return {
            **self.source.to_record(),
            "seqlen": self.seqlen,
            "windows": self.result.n_windows,
            "tokens": self.result.n_windows * self.seqlen,
            "predicted_tokens": self.result.n_tokens,
            **{
                k: v
                for k, v in self.result.to_record().items()
                if k not in ("n_windows", "n_tokens")
            },
            "reference": None if self.reference is None else self.reference.to_record(),
            "ratio": self.ratio,
        }


@dataclass(frozen=True)
class EvalReport:
    model: str  # the loaded model's description
    reference: str | None  # the --compare model's description
    results: list[DatasetResult]


def evaluate_datasets(
    model_ref: str | None,
    datasets: Sequence[str],
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    data_dir: str | None = None,
    compare_ref: str | None = None,
    neuron_keep: float | None = None,
    shared_neuron_keep: float | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
) -> EvalReport:
    """Perplexity of `model_ref` (and of `compare_ref` on the very same windows) on each dataset.

    Every text is resolved before any model loads, so a missing dataset fails in seconds. The two
    models are loaded one after the other, never both at once, to bound memory.
    """
    sources = [resolve_text(name, purpose="evaluation", data_dir=data_dir) for name in datasets]
    keep = _keep_overrides(neuron_keep, shared_neuron_keep)
    loaded = _load_model(model_ref, dtype=dtype, device=device, **keep)
    tokenizer, description = loaded.tokenizer, loaded.description
    if neuron_keep is not None or shared_neuron_keep is not None:
        description += f" (neuron keep {loaded.model.config.cmoe.get('neuron_keep', 1.0)}/" \
            f"{loaded.model.config.cmoe.get('shared_neuron_keep', 1.0)})"
    context = model_context_length(loaded.model)
    all_windows = [eval_windows(tokenizer, source, seqlen, max_windows, context) for source in sources]
    results = [
        perplexity(loaded.model, windows, batch_size, progress, description=source.dataset)
        for source, windows in zip(sources, all_windows, strict=True)
    ]
    if compare_ref is None:
        return EvalReport(
            description,
            None,
            [DatasetResult(s, seqlen, r) for s, r in zip(sources, results, strict=True)],
        )
    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the first model's memory to the second
    reference = _load_model(compare_ref, dtype=dtype, device=device)
    _require_same_tokenizer(
        tokenizer, reference.tokenizer, sources, description, reference.description
    )
    rows = []
    for source, windows, result in zip(sources, all_windows, results, strict=True):
        label = f"{source.dataset} (reference)"
        rows.append(
            DatasetResult(
                source,
                seqlen,
                result,
                perplexity(reference.model, windows, batch_size, progress, label),
            )
        )
    return EvalReport(description, reference.description, rows)


DEFAULT_MODEL_REF = "default"  # names the built-in default model where None cannot be passed


def _load_model(ref: str | None, *, dtype: str, device: str, **keep):
    from .loading import load_model  # imported here: loading pulls in GGUF and carved-model code

    if ref == DEFAULT_MODEL_REF and not Path(ref).exists():
        ref = None
    return load_model(ref, dtype=dtype, device=device, **keep)


def _keep_overrides(neuron_keep: float | None, shared_neuron_keep: float | None) -> dict:
    """The MoNE keep ratios the caller set, as load_model keywords (none when unset)."""
    keep = {"neuron_keep": neuron_keep, "shared_neuron_keep": shared_neuron_keep}
    return {k: v for k, v in keep.items() if v is not None}


def _require_same_tokenizer(ours, theirs, sources: list[TextSource], name: str, other: str) -> None:
    """Perplexities compare only on the same token ids: check both tokenizers agree on samples."""
    for source in sources:
        sample = source.text[:4000]
        if ours(sample)["input_ids"] != theirs(sample)["input_ids"]:
            raise ModelError(
                f"{name} and {other} tokenize {source.dataset} differently, so their perplexities "
                "are not comparable: --compare a model with the same tokenizer"
            )


# ----------------------------------------------------------------------------------------------
# lm-evaluation-harness


def require_lm_eval():
    """The lm_eval module, or a CmoeError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise CmoeError(
            "lm-eval is not installed: `pip install -e \".[lm-eval]\"` in the project (or `pip "
            "install lm-eval==0.4.13`, the version tested) to run --tasks"
        ) from None
    return lm_eval


def run_lm_eval(
    model_ref: str | None,
    tasks: Sequence[str] | str,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    neuron_keep: float | None = None,
    shared_neuron_keep: float | None = None,
    include_path: Sequence[str] | None = None,
    manager=None,
) -> dict[str, dict]:
    """Downstream tasks through lm-eval's `hf` backend; returns {task: {metric: value}}.

    `include_path`: folders of task YAMLs (local tasks; see `cmoe_carve.lm_tasks`), or
    `manager`, an lm-eval TaskManager already built. The tasks and their data are loaded before
    the model, so a missing task or dataset fails in seconds.

    A model directory (dense or carved: `trust_remote_code=True` loads the carved modeling code)
    or a hub id goes to lm-eval by name; a `.gguf` file or None (the built-in default) is loaded
    with `cmoe_carve.loading.load_model` and handed to lm-eval's HFLM as a model object.
    """
    lm_eval = require_lm_eval()
    task_list = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    task_list = [t for t in task_list if t]
    if not task_list:
        raise CmoeError("no lm-eval task named: pass --tasks piqa,arc_easy,...")
    from .lm_tasks import load_tasks, task_manager

    manager = manager or task_manager(include_path, task_list)
    common = dict(tasks=load_tasks(manager, task_list), batch_size=batch_size,
                  num_fewshot=num_fewshot, limit=limit, task_manager=manager)
    keep = _keep_overrides(neuron_keep, shared_neuron_keep)
    by_name = (
        model_ref not in (None, DEFAULT_MODEL_REF)
        and not model_ref.lower().endswith(".gguf")
        and neuron_keep is None
        and shared_neuron_keep is None
    )
    if by_name:
        model_args = f"pretrained={model_ref},trust_remote_code=True,dtype={dtype}"
        logger.info(
            "lm-eval hf backend: %s on %s, tasks %s", model_args, device, ",".join(task_list)
        )
        output = lm_eval.simple_evaluate(model="hf", model_args=model_args, device=device, **common)
    else:
        from lm_eval.models.huggingface import HFLM

        loaded = _load_model(model_ref, dtype=dtype, device=device, **keep)
        logger.info("lm-eval hf backend on %s, tasks %s", loaded.description, ",".join(task_list))
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, **common)
    if output is None:  # lm-eval returns None on non-zero ranks of a distributed run
        return {}
    return {task: dict(metrics) for task, metrics in output["results"].items()}
