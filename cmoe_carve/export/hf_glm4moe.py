"""`--format hf`: a transformers-native `glm4_moe` checkpoint (no remote code, no auto_map).

Why glm4_moe: transformers 5.23, vLLM and SGLang implement it natively (fused MoE kernels,
tensor and expert parallelism). (llama.cpp's stock convert_hf_to_gguf.py maps its tensors, but
its Glm4MoeModel.set_vocab only takes GLM's own tokenizer: see tests/test_stock_converter.py;
--format gguf writes the GGUF file instead.) It has
everything a carved Llama / Mistral / Qwen2 / Qwen3 needs: shared experts of any total width
(`n_shared_experts * moe_intermediate_size`), a per-expert selection bias used for selection
only (`e_score_correction_bias`), Llama attention with `rotate_half` rope over the whole head
(`partial_rotary_factor = 1.0`), q/k/v biases (`attention_bias`, as in Qwen2; no o bias) and
per-head q/k RMSNorm (`use_qk_norm`, as in Qwen3). The rival `granitemoeshared` selects on raw
logits (exact gates) but has no selection bias, so neither the fitted router's intercept nor
the zero experts that pad per-layer k can be expressed.

Routing in glm4_moe: scores = sigmoid(W_g x) in fp32, experts = top-k(scores + e), weights =
scores / sum(selected scores) * routed_scaling_factor. With W_g = eps * W_r:
sigmoid(eps s) = 1/2 + eps s / 4 + O(eps^3), so e = eps c / 4 selects on s + c (the cubic term
only matters for near-ties), and every weight is 1/K + O(eps * spread), times K = 1. The
choice of eps trades gate error (about eps * spread / 2) against resolution: scores near 1/2
have a float32 spacing of 6e-8, so logit gaps below about 2.4e-7 / eps tie. Both effects are
measured after writing (fidelity.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .layers import FORCE, NativeModel

DEFAULT_EPS = 1e-3

# Copied from the source config when present (the rest of glm4_moe's fields are set below).
_COPIED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
)


def glm4_moe_config(native: NativeModel) -> dict:
    src = native.config
    values = {k: getattr(src, k) for k in _COPIED if getattr(src, k, None) is not None}
    rope = dict(getattr(src, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    if "rope_theta" not in rope:
        rope["rope_theta"] = float(getattr(src, "rope_theta", 10000.0))
    rope["partial_rotary_factor"] = 1.0  # glm4_moe rotates half the head by default
    values.update(
        architectures=["Glm4MoeForCausalLM"],
        model_type="glm4_moe",
        head_dim=native.head_dim,
        hidden_act="silu",
        intermediate_size=native.num_shared * native.expert_size,  # dense layers: none
        attention_bias=native.attention_bias,
        use_qk_norm=native.qk_norm,
        tie_word_embeddings=native.tied,
        rope_parameters=rope,
        moe_intermediate_size=native.expert_size,
        n_shared_experts=native.num_shared,
        n_routed_experts=native.num_experts,
        num_experts_per_tok=native.top_k,
        routed_scaling_factor=float(native.top_k),  # weights 1/K each, times K
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        num_nextn_predict_layers=0,
        dtype="float32",
    )
    return values


def glm4_moe_tensors(native: NativeModel, eps: float) -> dict[str, torch.Tensor]:
    """State dict in the hub's per-expert layout (what transformers, vLLM and SGLang read)."""
    out = {}
    for name, t in native.tensors.items():
        if name == "lm_head.weight" and native.tied:
            continue
        if "rotary_emb" in name:
            continue
        out[name] = t
    for i, layer in enumerate(native.layers):
        p = f"model.layers.{i}.mlp."
        out[p + "gate.weight"] = eps * layer.router
        # Selection only: eps*c/4 is c in sigmoid-score units; zero experts forced in or out.
        out[p + "gate.e_score_correction_bias"] = eps * layer.intercept / 4 + FORCE * layer.forced
        out[p + "shared_experts.gate_proj.weight"] = layer.shared_gate
        out[p + "shared_experts.up_proj.weight"] = layer.shared_up
        out[p + "shared_experts.down_proj.weight"] = layer.shared_down
        for e in range(layer.gate.shape[0]):
            q = f"{p}experts.{e}."
            out[q + "gate_proj.weight"] = layer.gate[e]
            out[q + "up_proj.weight"] = layer.up[e]
            out[q + "down_proj.weight"] = layer.down[e]
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_hf(native: NativeModel, out: Path, eps: float = DEFAULT_EPS) -> None:
    """config.json, model.safetensors and generation_config.json into directory `out`."""
    out = Path(out)
    (out / "config.json").write_text(json.dumps(glm4_moe_config(native), indent=2, sort_keys=True))
    save_file(glm4_moe_tensors(native, eps), str(out / "model.safetensors"), metadata={"format": "pt"})


def router_modules(model) -> list:
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    return [m for m in model.modules() if isinstance(m, Glm4MoeTopkRouter)]


@torch.no_grad()
def routing_of(model) -> dict:
    """Hooks on every glm4_moe router: per layer, the selected experts and weights of the last
    forward ({layer: (indices [T, K], weights [T, K])})."""
    seen: dict[int, tuple] = {}
    routers = router_modules(model)

    def make(i):
        def hook(module, args, output):
            _, weights, indices = output
            seen[i] = (indices.detach(), weights.detach())
        return hook

    handles = [r.register_forward_hook(make(i)) for i, r in enumerate(routers)]
    return {"seen": seen, "handles": handles}
