"""Measuring an export: logits, perplexity, expert selection and gates against the carved model.

Two comparisons are made on the same check tokens: the original carve against the approximated
carve (the cost of each documented approximation; zero when there is none), and the
approximated carve against the exported files as loaded by their engine (the export's own
numerical error, which should be at float32 rounding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .rewrite import carved_mlps


@dataclass
class Fidelity:
    tokens: int
    max_abs_logit_diff: float
    mean_kl: float  # KL(reference || candidate) per token, nats
    ppl_reference: float
    ppl_candidate: float
    selection_agreement: float | None = None  # share of (token, layer) with the same expert set
    worst_gate_error: float | None = None  # max |weight - reference gate| where sets agree
    # The same two, each layer's router fed the carved model's own FFN inputs: the router
    # rewrite alone, without the drift that one changed choice causes in later layers.
    isolated_selection_agreement: float | None = None
    isolated_worst_gate_error: float | None = None

    def record(self) -> dict:
        return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        parts = [
            f"max |logit diff| {self.max_abs_logit_diff:.3g}",
            f"mean KL {self.mean_kl:.3g}",
            f"ppl {self.ppl_reference:.4g} -> {self.ppl_candidate:.4g}",
        ]
        if self.selection_agreement is not None:
            parts.append(f"same experts {100 * self.selection_agreement:.3f}%")
        if self.worst_gate_error is not None:
            parts.append(f"worst gate error {self.worst_gate_error:.2e}")
        if self.isolated_selection_agreement is not None:
            parts.append(
                f"per layer on the carved model's inputs: same experts "
                f"{100 * self.isolated_selection_agreement:.3f}%, worst gate error "
                f"{self.isolated_worst_gate_error:.2e}"
            )
        return f"{self.tokens} tokens: " + ", ".join(parts)


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="mean")
    return float(math.exp(nll))


def compare_logits(ref: torch.Tensor, cand: torch.Tensor, ids: torch.Tensor) -> Fidelity:
    """ref, cand [T, V] logits for ids [T]."""
    ref, cand = ref.double(), cand.double()
    logp, logq = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return Fidelity(
        tokens=int(ids.numel()),
        max_abs_logit_diff=float((ref - cand).abs().max()),
        mean_kl=float(kl),
        ppl_reference=_ppl(ref, ids),
        ppl_candidate=_ppl(cand, ids),
    )


@torch.no_grad()
def carved_run(model: torch.nn.Module, ids: torch.Tensor):
    """(logits [T, V], per-layer selected routed experts [T, k_l], per-layer FFN inputs [T, D])
    of a carved model."""
    mlps = carved_mlps(model)
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, mod.hidden_size).clone())) for m in mlps]
    for m in mlps:
        m.record_routing = True
    try:
        logits = model(ids[None]).logits[0].float()
        routing = [m.last_routing.clone() for m in mlps]
    finally:
        for m in mlps:
            m.record_routing = False
            m.last_routing = None
        for h in hooks:
            h.remove()
    return logits, routing, inputs


def selection_stats(
    ref_routing: list[torch.Tensor], cand: list[tuple[torch.Tensor, torch.Tensor]], num_real: int
) -> tuple[float, float]:
    """(share of token-layers with the same set of real experts, worst |weight - 1| there).

    cand: per layer (indices [T, K], weights [T, K]); indices >= num_real are zero experts,
    which contribute nothing whatever their weight."""
    agree, total, worst = 0, 0, 0.0
    for ref, (idx, w) in zip(ref_routing, cand):
        real = idx < num_real
        for t in range(idx.shape[0]):
            a = set(ref[t].tolist())
            b = set(idx[t][real[t]].tolist())
            total += 1
            if a == b:
                agree += 1
                if real[t].any():
                    worst = max(worst, float((w[t][real[t]].float() - 1.0).abs().max()))
    return agree / max(total, 1), worst


def approximation_effect(original: torch.nn.Module, approximated: torch.nn.Module, ids: torch.Tensor) -> Fidelity:
    ref_logits, ref_routing, _ = carved_run(original, ids)
    logits, routing, _ = carved_run(approximated, ids)
    fid = compare_logits(ref_logits, logits, ids)
    agree = [bool(set(a[t].tolist()) == set(b[t].tolist())) for a, b in zip(ref_routing, routing) for t in range(a.shape[0])]
    fid.selection_agreement = sum(agree) / max(len(agree), 1)
    return fid


def fmt(record: dict) -> dict:
    return {k: v for k, v in record.items() if v is not None}


def llama_cpp_logits(path, ids: torch.Tensor, threads: int = 1):
    """Logits [T, V] of a GGUF file through llama.cpp (llama-cpp-python), or None when absent."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np

    n = int(ids.numel())
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=max(n, 16), n_batch=max(n, 16), n_ubatch=max(n, 16),
        n_threads=threads, logits_all=True, verbose=False, seed=0,
        # float32 K/V cache (the default f16 cache alone moves logits by ~1e-3)
        type_k=0, type_v=0, flash_attn=False,
    )
    try:
        llm.eval(ids.tolist())
        scores = np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()
    return torch.from_numpy(scores)
