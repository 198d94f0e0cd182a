"""A target-neutral description of an exportable carved model: what each export target maps.

Built from a carved model after `rewrite.make_expressible`, so every layer here is exactly
`y = shared(x) + sum_{e in top-K(s + c)} routed_e(x)` with s = W_r x, gates of exactly 1, and
one K for the whole model. Targets differ only in how they make their router produce that
selection with weights of 1 (see hf_glm4moe.py and gguf_glm4moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .rewrite import carved_mlps

# Expert widths are zero-padded to a multiple of this (exact: a zero neuron adds act(0) * 0):
# transformers' grouped_mm experts need 16-byte strides (8 bf16 values).
WIDTH_MULTIPLE = 8

# Selection offset of the zero experts that pad a layer's k up to K: far above (forced in) or
# below (forced out) any real expert's score in every target's selection domain.
FORCE = 16.0


@dataclass
class MoeLayer:
    shared_gate: torch.Tensor  # [S*m, D]
    shared_up: torch.Tensor  # [S*m, D]
    shared_down: torch.Tensor  # [D, S*m]
    gate: torch.Tensor  # [N, m, D] routed experts, zero experts last
    up: torch.Tensor  # [N, m, D]
    down: torch.Tensor  # [N, D, m]
    router: torch.Tensor  # [N, D] fp32, rows of zero experts zero
    intercept: torch.Tensor  # [N] fp32 selection offset c in logit units (0 for zero experts)
    forced: torch.Tensor  # [N] +1 always selected (zero experts padding k), -1 never, 0 routed
    top_k: int  # this layer's own k (before padding)


@dataclass
class NativeModel:
    """Everything the targets write: source hyper-parameters, dense tensors, MoE layers."""

    config: object  # the carved checkpoint's config (source architecture fields + cmoe)
    family: str  # LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    head_dim: int
    attention_bias: bool
    qk_norm: bool
    tied: bool
    num_shared: int  # shared experts written (at least 1: zero-padded when the carve has none)
    expert_size: int
    num_experts: int  # routed experts per layer, zero experts included
    top_k: int  # K, the same in every layer
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # HF names, non-MoE tensors
    layers: list[MoeLayer] = field(default_factory=list)

    @property
    def num_zero_experts(self) -> int:
        return self.num_experts - (self.config.cmoe["num_experts"] - self.config.cmoe["num_shared"])


@torch.no_grad()
def describe(model: torch.nn.Module) -> NativeModel:
    """The NativeModel of an expressible carved model (fp32 copies, model unchanged)."""
    config = model.config
    cmoe = config.cmoe
    mlps = carved_mlps(model)
    ks = [m.top_k for m in mlps]
    top_k = max(max(ks), 1)
    # Zero experts: enough to pad the smallest k up to K in every layer.
    num_zero = top_k - min(ks)
    num_routed = cmoe["num_experts"] - cmoe["num_shared"]
    m = -(-cmoe["expert_size"] // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    state = {k: v.detach().float() for k, v in model.state_dict().items() if ".mlp." not in k}
    attn = model.model.layers[0].self_attn
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
    native = NativeModel(
        config=config,
        family=cmoe["base_config_class"],
        head_dim=int(head_dim),
        attention_bias=getattr(attn.q_proj, "bias", None) is not None,
        qk_norm=hasattr(attn, "q_norm"),
        tied=bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in state,
        num_shared=max(cmoe["num_shared"], 1),
        expert_size=m,
        num_experts=num_routed + num_zero,
        top_k=top_k,
        tensors=state,
    )
    for mlp in mlps:
        native.layers.append(_layer(mlp, num_zero, top_k, m))
    return native


def _layer(mlp, num_zero: int, top_k: int, width: int) -> MoeLayer:
    s, m, d = mlp.num_shared, mlp.expert_size, mlp.hidden_size
    gate_up = mlp.gate_up_proj.detach().float()  # [E, 2m, D]
    down = mlp.down_proj.detach().float()  # [E, D, m]
    if width > m:  # zero neurons up to `width`
        pad = width - m
        e = gate_up.shape[0]
        gate_up = torch.cat([gate_up[:, :m], torch.zeros(e, pad, d), gate_up[:, m:], torch.zeros(e, pad, d)], 1)
        down = torch.cat([down, torch.zeros(e, d, pad)], 2)
        m = width
    if s:
        shared_gate = gate_up[:s, :m].reshape(s * m, d)
        shared_up = gate_up[:s, m:].reshape(s * m, d)
        shared_down = down[:s].permute(1, 0, 2).reshape(d, s * m)
    else:  # one expert of zeros: the targets require a shared expert; act(0) * 0 = 0
        shared_gate = shared_up = torch.zeros(m, d)
        shared_down = torch.zeros(d, m)
    routed_gu, routed_down = gate_up[s:], down[s:]
    n = routed_gu.shape[0]
    zeros = lambda *shape: torch.zeros(num_zero, *shape)  # noqa: E731
    forced = torch.zeros(n + num_zero)
    need = top_k - mlp.top_k  # this layer's zero experts that are always selected
    forced[n : n + need] = 1.0
    forced[n + need :] = -1.0
    router = mlp.router
    return MoeLayer(
        shared_gate=shared_gate.contiguous(),
        shared_up=shared_up.contiguous(),
        shared_down=shared_down.contiguous(),
        gate=torch.cat([routed_gu[:, :m], zeros(m, d)]).contiguous(),
        up=torch.cat([routed_gu[:, m:], zeros(m, d)]).contiguous(),
        down=torch.cat([routed_down, zeros(d, m)]).contiguous(),
        router=torch.cat([router.gate_weight.detach().float(), zeros(d)]).contiguous(),
        intercept=torch.cat([router.logit_bias.detach().float(), torch.zeros(num_zero)]),
        forced=forced,
        top_k=mlp.top_k,
    )
