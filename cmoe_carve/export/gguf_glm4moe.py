"""`--format gguf`: a llama.cpp `glm4moe` GGUF file, written with gguf-py's GGUFWriter.

Why glm4moe (llama.cpp src/models/glm4-moe.cpp): shared experts of width
expert_shared_count * expert_feed_forward_length, an `exp_probs_b` selection bias used for
selection only, the gating function read from the file, optional q/k/v biases and per-head q/k
RMSNorm, NEOX rope over `rope.dimension_count` dims (HF's rotate_half: q/k weights go in
unpermuted). What it lacks: Llama-3.1 rope factors (the graph passes none) and sliding windows.

Routing: gating function 3 (LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT in
src/llama-hparams.h; gguf-py 0.19's enum stops at 2) selects top-k on the raw logits plus
exp_probs_b, then takes the softmax over the selected logits. With the router scaled by
eps = 1e-9, selection on eps (W_r x + c) keeps the order of W_r x + c (float32 keeps its
relative precision at any scale), and exp(eps * gap) rounds to 1.0f, so every weight is 1/K
to float32 precision; expert_weights_scale = K makes it 1. The router and exp_probs_b stay F32
(llama-quantize never quantizes ffn_gate_inp, and 1-D tensors stay F32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .layers import FORCE, NativeModel

ARCH = "glm4moe"
EPS = 1e-9
GATING_SOFTMAX_WEIGHT = 3
QUANTS = ("f32", "f16", "q8_0", "q4_0")

# HF names of the non-MoE tensors -> GGUF names ({i}: the layer).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def check_gguf_expressible(native: NativeModel) -> None:
    rope = dict(getattr(native.config, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise CheckpointError(
            f"rope_type {kind!r} (e.g. Llama-3.1 rope factors) is not expressible in llama.cpp's "
            "glm4moe graph: use --format hf"
        )


def _qtype(name: str, array: np.ndarray, quant: str):
    """The GGML type a tensor is stored as: 1-D tensors and the router stay F32 (what
    llama-quantize does too); rows that do not fill whole blocks fall back to F16 or F32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES

    if array.ndim == 1 or "ffn_gate_inp" in name or quant == "f32":
        return Q.F32
    if quant == "f16":
        return Q.F16
    qtype = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    block = GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return Q.F16
    return qtype


def _add(writer, name: str, tensor: torch.Tensor, quant: str) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    array = tensor.detach().float().contiguous().numpy()
    qtype = _qtype(name, array, quant)
    if qtype == Q.F32:
        writer.add_tensor(name, array)
    elif qtype == Q.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)


def copy_tokenizer(writer, source_gguf: Path) -> str:
    """tokenizer.* keys from a GGUF file. Returns a description."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source_gguf))
    n = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = field.types[0]
        if main == GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), main, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), main)
        n += 1
    if n == 0:
        raise CheckpointError(f"{source_gguf} has no tokenizer metadata: pass another --tokenizer-gguf")
    return f"copied from {source_gguf} ({n} keys)"


def add_tokenizer(writer, tokenizer) -> str:
    """A GGUF file's tokenizer (a Path: copied), a converted Hugging Face one (a
    gguf_tokenizer.GgufVocab), or none: llama.cpp's tokenizer model "none" (token ids in,
    logits out). Returns a description."""
    from . import gguf_tokenizer

    if tokenizer is None:
        writer.add_tokenizer_model("none")
        return "none (no tokenizer: token ids only)"
    if isinstance(tokenizer, gguf_tokenizer.GgufVocab):
        gguf_tokenizer.write(writer, tokenizer)
        return f"converted from the Hugging Face tokenizer: {tokenizer.model}, {tokenizer.how}"
    return copy_tokenizer(writer, Path(tokenizer))


def write_gguf(
    native: NativeModel, path: Path, quant: str = "f32", tokenizer=None,
    name: str = "carved", extra: dict[str, str] | None = None, progress=None,
) -> str:
    """Write the GGUF file to `path`; returns the tokenizer description (`tokenizer`: see
    add_tokenizer)."""
    import gguf

    check_gguf_expressible(native)
    c = native.config
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(name)
    ftype = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[quant]
    w.add_file_type(ftype)
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    w.add_block_count(int(c.num_hidden_layers))
    w.add_feed_forward_length(native.num_shared * native.expert_size)
    w.add_head_count(int(c.num_attention_heads))
    w.add_head_count_kv(int(c.num_key_value_heads))
    w.add_key_length(native.head_dim)
    w.add_value_length(native.head_dim)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    rope = dict(getattr(c, "rope_parameters", None) or {})
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    w.add_rope_dimension_count(native.head_dim)
    w.add_vocab_size(int(c.vocab_size))
    w.add_expert_count(native.num_experts)
    w.add_expert_used_count(native.top_k)
    w.add_expert_shared_count(native.num_shared)
    w.add_expert_feed_forward_length(native.expert_size)
    w.add_leading_dense_block_count(0)
    w.add_expert_weights_scale(float(native.top_k))
    w.add_expert_weights_norm(False)
    w.add_uint32(gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch=ARCH), GATING_SOFTMAX_WEIGHT)
    w.add_nextn_predict_layers(0)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    described = add_tokenizer(w, tokenizer)

    t = native.tensors
    _add(w, "token_embd.weight", t["model.embed_tokens.weight"], quant)
    _add(w, "output_norm.weight", t["model.norm.weight"], quant)
    if not native.tied:
        _add(w, "output.weight", t["lm_head.weight"], quant)
    for i, layer in enumerate(native.layers):
        for hf, gg in _LAYER_NAMES.items():
            key = f"model.layers.{i}.{hf}"
            if key in t:
                _add(w, f"blk.{i}.{gg}", t[key], quant)
        b = f"blk.{i}."
        _add(w, b + "ffn_gate_inp.weight", EPS * layer.router, quant)
        _add(w, b + "exp_probs_b.bias", EPS * layer.intercept + FORCE * layer.forced, quant)
        _add(w, b + "ffn_gate_exps.weight", layer.gate, quant)
        _add(w, b + "ffn_up_exps.weight", layer.up, quant)
        _add(w, b + "ffn_down_exps.weight", layer.down, quant)
        _add(w, b + "ffn_gate_shexp.weight", layer.shared_gate, quant)
        _add(w, b + "ffn_up_shexp.weight", layer.shared_up, quant)
        _add(w, b + "ffn_down_shexp.weight", layer.shared_down, quant)
        if progress is not None:
            progress.advance()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return described
