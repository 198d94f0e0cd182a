"""What a native MoE architecture cannot express, and how each piece of a carved model is handled.

Native MoE blocks (glm4_moe in transformers, vLLM and SGLang; glm4moe in llama.cpp) compute
`y = shared(x) + sum_{e in top-k(W_r x + c)} w_e * expert_e(x)` with one k per model, a linear
router, SiLU experts and no per-expert output bias. A carved layer can hold more. Each feature
gets one of three treatments, decided here from the checkpoint's contents (never from how it was
carved), before anything is written:

- exact: rewritten with no loss (per-layer top-k via always-selected zero experts, see
  layers.py; a selection bias of zero; the fitted router's intercept as a selection bias);
- approximate: changed into something the target expresses, only with `approximate=True`; the
  export then measures the effect (fidelity.py) and records it;
- impossible: a CheckpointError naming the fix.

`make_expressible` applies the approximations in place on the loaded carved model, so that the
project's own modeling code runs the approximated model: its logits are the reference that the
exported files must reproduce exactly, and its distance to the original carve is the measured
cost of the approximations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import CheckpointError
from ..modeling_cmoe import CarvedMLP

# Source architectures whose attention and norms glm4_moe / glm4moe reproduce exactly.
SUPPORTED_SOURCES = {"LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config"}


@dataclass
class Note:
    """One feature of the checkpoint and what the export did with it."""

    feature: str
    handling: str  # "exact" | "approximate"
    detail: str

    def line(self) -> str:
        return f"{self.feature}: {self.handling} ({self.detail})"


def carved_mlps(model: torch.nn.Module) -> list[CarvedMLP]:
    return [m for m in model.modules() if isinstance(m, CarvedMLP)]


def check_config(values: dict) -> None:
    """What config.json alone rules out, checked before any weight is loaded."""
    cmoe = values["cmoe"]
    base = cmoe.get("base_config_class", "?")
    if base.startswith("Gemma"):
        raise CheckpointError(
            f"{base} sources cannot be exported: their GELU-tanh experts, scaled embeddings and "
            "extra norms have no native MoE architecture (every MoE graph of llama.cpp hard-codes "
            "SiLU); export supports Llama, Mistral, Qwen2 and Qwen3 sources"
        )
    if base not in SUPPORTED_SOURCES:
        raise CheckpointError(
            f"{base} sources cannot be exported yet: export supports "
            f"{', '.join(sorted(SUPPORTED_SOURCES))} (Llama-style attention)"
        )
    if cmoe.get("activation") not in ("silu", "swish"):
        raise CheckpointError(
            f"experts with activation {cmoe.get('activation')!r} cannot be exported: native MoE "
            "architectures use SiLU experts"
        )
    if cmoe.get("router", "representative") != "linear":
        raise CheckpointError(
            "the checkpoint uses the representative-neuron router, a non-linear score that no "
            "native MoE router computes: re-carve with `--router fitted` (the default)"
        )


def lossy_features(path) -> list[str]:
    """The approximations a checkpoint needs, read from config.json and the few routing tensors
    of model.safetensors (one tensor at a time), so that a refusal comes before loading."""
    from pathlib import Path

    from safetensors import safe_open

    import json

    cmoe = json.loads((Path(path) / "config.json").read_text())["cmoe"]
    found = set()
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        return []  # sharded or missing: the loaded model is checked instead
    with safe_open(str(weights), "pt") as f:
        for name in f.keys():
            if name.endswith("expert_bias") and cmoe.get("compensate") and f.get_tensor(name).abs().max() > 0:
                found.add("compensation (expert_bias)")
            elif name.endswith("router.bias") and f.get_tensor(name).abs().max() > 0:
                found.add("selection bias b")
            elif name.endswith("router.scale") and f.get_tensor(name).abs().max() > 0:
                found.add("router scale u")
    if float(cmoe.get("neuron_keep", 1.0)) < 1.0 or float(cmoe.get("shared_neuron_keep", 1.0)) < 1.0:
        found.add("MoNE neuron keep")
    return sorted(found)


def check_source(model: torch.nn.Module) -> list[Note]:
    """Attention-side checks: the source family must be one glm4_moe's attention reproduces."""
    cmoe = model.config.cmoe
    config = model.config
    notes: list[Note] = []
    layer0 = model.model.layers[0].self_attn
    if getattr(layer0.o_proj, "bias", None) is not None:
        raise CheckpointError(
            "the source has an output-projection bias (attention_bias on a Llama), which "
            "glm4_moe attention lacks: this checkpoint cannot be exported"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True)
    if uses_window and window < getattr(config, "max_position_embeddings", 0):
        notes.append(Note(
            "sliding-window attention", "approximate",
            f"the export attends to the whole context; identical for contexts up to {window} "
            "tokens, different beyond",
        ))
    names = set(cmoe["mlp_names"])
    dense = [i for i, layer in enumerate(model.model.layers) if f"model.layers.{i}.mlp" not in names]
    if dense:
        raise CheckpointError(
            f"layers {dense} were not carved: a checkpoint with dense layers cannot be exported yet"
        )
    return notes


def check_routing(model: torch.nn.Module, approximate: bool) -> list[Note]:
    """Decide every routing feature; raise for what cannot be exported or needs `approximate`."""
    mlps = carved_mlps(model)
    notes, lossy = [], []
    ks = sorted({m.top_k for m in mlps})
    if len(ks) > 1:
        notes.append(Note(
            "per-layer top-k", "exact",
            f"k per layer {[m.top_k for m in mlps]}; every layer selects {ks[-1]} experts, of "
            "which the surplus are always-selected zero experts (decode still reads k_max "
            "slots, so no speed-up over uniform k_max)",
        ))
    if any(bool(m.router.logit_bias.abs().max() > 0) for m in mlps):
        notes.append(Note("router intercept", "exact", "moved into the selection bias"))
    if any(m.compensate and bool(m.expert_bias.abs().max() > 0) for m in mlps):
        lossy.append(Note(
            "compensation (expert_bias)", "approximate",
            "dropped: native experts have no output bias; re-carve with --no-compensate for "
            "an exact export",
        ))
    if any(bool(m.router.bias.abs().max() > 0) for m in mlps):
        lossy.append(Note(
            "selection bias b", "approximate",
            "the carved model selects on softmax(s) + b; the export on s + N_r * b (softmax "
            "linearised around uniform scores)",
        ))
    if any(bool(m.router.scale.abs().max() > 0) for m in mlps):
        lossy.append(Note(
            "router scale u", "approximate",
            "gates 1 + p_e * u_e replaced by each expert's mean gate over the check tokens that "
            "select it, folded into its down projection",
        ))
    if any(m.neuron_keep < 1.0 or m.shared_neuron_keep < 1.0 for m in mlps):
        lossy.append(Note(
            "MoNE neuron keep", "approximate",
            "every neuron of an active expert is computed (keep ratio 1.0)",
        ))
    return notes + lossy


def require_allowed(notes: list[Note], approximate: bool) -> None:
    lossy = [n.feature for n in notes if n.handling == "approximate"]
    if lossy and not approximate:
        recarve = ""
        if any(f.startswith(("compensation", "selection", "router scale", "MoNE")) for f in lossy):
            recarve = ", or re-carve with `--no-compensate` (and no --balance, no --neuron-keep, no finetune)"
        raise CheckpointError(
            f"this checkpoint cannot be exported exactly ({'; '.join(lossy)}): pass "
            "--approximate to export it with documented approximations (their effect is measured "
            f"and recorded){recarve}"
        )


@torch.no_grad()
def mean_gates(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, each routed expert's mean gate 1 + p_e * u_e over the tokens that select it
    (1 where no check token selects it), measured on `ids` with the original routing."""
    mlps = carved_mlps(model)
    sums = [torch.zeros(m.num_routed, dtype=torch.float64) for m in mlps]
    counts = [torch.zeros(m.num_routed, dtype=torch.float64) for m in mlps]
    hooks = []
    for i, mlp in enumerate(mlps):
        def hook(module, args, i=i):
            x = args[0].reshape(-1, module.hidden_size)
            _, top, gates = module.router(x)
            sums[i].index_add_(0, top.reshape(-1), gates.reshape(-1).double())
            counts[i].index_add_(0, top.reshape(-1), torch.ones(top.numel(), dtype=torch.float64))
        hooks.append(mlp.register_forward_pre_hook(hook))
    try:
        model(ids[None])
    finally:
        for h in hooks:
            h.remove()
    return [torch.where(c > 0, s / c.clamp(min=1), torch.ones_like(s)).float() for s, c in zip(sums, counts)]


@torch.no_grad()
def make_expressible(model: torch.nn.Module, notes: list[Note], ids: torch.Tensor | None) -> None:
    """Apply the approximations in `notes` in place (see the module docstring)."""
    features = {n.feature for n in notes if n.handling == "approximate"}
    mlps = carved_mlps(model)
    if "router scale u" in features:
        if ids is None:
            raise CheckpointError("folding the router scale u needs check tokens: pass --check-tokens > 0")
        for mlp, gate in zip(mlps, mean_gates(model, ids)):
            s = mlp.num_shared
            mlp.down_proj.data[s:] *= gate.to(mlp.down_proj.dtype)[:, None, None]
            mlp.router.scale.zero_()
    for mlp in mlps:
        if "selection bias b" in features:
            # softmax(s)_e ~ (1 + s_e - mean s) / N_r near uniform scores, so selecting on
            # softmax(s) + b ~ selecting on s + N_r * b. The router's softmax is monotone, so the
            # carved model itself selects on s + c exactly once the bias sits in the intercept.
            mlp.router.logit_bias += mlp.num_routed * mlp.router.bias.to(mlp.router.logit_bias.dtype)
            mlp.router.bias.zero_()
        if "compensation (expert_bias)" in features:
            mlp.compensate = False
        if "MoNE neuron keep" in features:
            mlp.neuron_keep = mlp.shared_neuron_keep = 1.0
        mlp.drop_caches()
        mlp.__dict__.pop("_fused_args_cache", None)


def notes_record(notes: list[Note]) -> list[dict]:
    return [asdict(n) for n in notes]
