"""Modeling code of a carved (CMoE) checkpoint: the carved FFN, its router, and the model class.

This file is copied into every carved checkpoint as `modeling_cmoe.py`, followed by two lines
that bind it to the source architecture, so that `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` works with only torch and transformers installed. It must therefore
import nothing from cmoe_carve. When the project is installed, the fast expert kernels of
`cmoe_kernels` are used; without it, the plain PyTorch path below runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

try:  # the project's kernels (Triton on GPUs, a fast gather path on CPUs), when installed
    from cmoe_kernels import carved_ffn as _fast_carved_ffn
except Exception:  # noqa: BLE001 - any import problem means: use the plain path
    _fast_carved_ffn = None
try:  # the fused CPU decode step (route + experts + compensation in one C++ call)
    from cmoe_kernels import cpu_decode as _cpu_decode
except Exception:  # noqa: BLE001 - older kernels, or none: the paths above
    _cpu_decode = None

# Token counts up to which the kernels' decode paths run (the PyTorch path: 1, Triton: 4).
_DECODE_TOKENS = 16

# Token counts up to which the fused CPU decode step runs (batched decode, short prompts); above,
# the grouped prefill path, whose matmuls win once the fused step's per-token dot products
# dominate. FFN benchmark, SmolLM2 shapes, one thread of the 2-core EPYC, fused vs prefill path:
# T=16 597 vs 1042 us (S2A2E16), 1259 vs 1571 (S3A3E8); T=32 955 vs 1395, 2783 vs 2165.
_CPU_FUSED_TOKENS = 16

# What a CarvedMLP derives from its weights and settings and keeps in its __dict__.
_CACHE_ENTRIES = ("_neuron_rows_cache", "_fused_args_cache", "_hugepages")

# Activations the kernels implement, by transformers' ACT2FN name.
_KERNEL_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def keep_count(ratio: float, m: int) -> int:
    """Neurons an expert of m keeps under a MoNE keep ratio: ceil(ratio * m), at least 1."""
    return max(1, min(m, math.ceil(ratio * m - 1e-9)))


def experts_forward_torch(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    act_fn,
    keep: list[int] | None = None,
) -> torch.Tensor:
    """Plain PyTorch experts: y[t] = sum_k gates[t,k] * down[e] @ (act(gate_e x) * up_e x).

    x [T, D], gate_up [E, 2m, D], down [E, D, m], ids [T, K], gates [T, K] -> [T, D].
    Tokens are grouped by expert (one matmul per expert that has tokens), never looped over.
    With `keep` (E counts, MoNE), only each token's keep[e] neurons of largest |act(gate_e x)|
    count in expert e.
    """
    num_tokens, top = ids.shape
    m = down.shape[-1]
    flat_ids = ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # [T*K] slots grouped by expert
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()
    x_sorted = x[order // top]  # [T*K, D]: slot t*K + k belongs to token t
    y_sorted = torch.empty(order.numel(), x.shape[-1], dtype=x.dtype, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        xe = x_sorted[start : start + count]  # [n, D]
        gu = xe @ gate_up[expert].t()  # [n, 2m]
        a = act_fn(gu[:, :m])
        h = a * gu[:, m:]
        if keep is not None and keep[expert] < m:
            idx = torch.topk(a.detach().abs(), keep[expert], dim=-1).indices
            h = h * torch.zeros_like(h).scatter_(-1, idx, 1.0)
        y_sorted[start : start + count] = h @ down[expert].t()
        start += count
    # Undo the sort and combine each token's K slots in a fixed order (deterministic).
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    weighted = y.view(num_tokens, top, -1).float() * gates.float()[..., None]  # [T, K, D]
    return weighted.sum(1).to(x.dtype)


class CarvedRouter(nn.Module):
    """Training-free router: scores from representative neurons (or a fitted linear map).

    scores = softmax(s); experts = top-k of (scores + bias); gates = 1 + scores * scale.
    `bias` only steers selection (load balancing); `scale` (u) starts at 0, so gates start at 1.
    """

    def __init__(self, hidden_size: int, num_routed: int, top_k: int, kind: str, act_fn):
        super().__init__()
        self.kind = kind
        self.top_k = top_k
        self.act_fn = act_fn
        self.gate_weight = nn.Parameter(torch.empty(num_routed, hidden_size))  # [Nr, D]
        self.up_weight = nn.Parameter(torch.empty(num_routed, hidden_size))  # [Nr, D]
        self.logit_bias = nn.Parameter(torch.zeros(num_routed))  # intercept of a fitted router
        self.scale = nn.Parameter(torch.zeros(num_routed))  # u [Nr]
        self.register_buffer("bias", torch.zeros(num_routed))  # b [Nr], selection only

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> unnormalised expert scores [T, Nr] in fp32."""
        if self.kind == "linear":
            return F.linear(x, self.gate_weight, self.logit_bias).float()
        # Representative neurons: |act(g_R x) * (u_R x)| as in CMoE.
        return (self.act_fn(x @ self.gate_weight.t()) * (x @ self.up_weight.t())).abs().float()

    def forward(self, x: torch.Tensor):
        scores = torch.softmax(self.logits(x), dim=-1)  # [T, Nr]
        top = torch.topk(scores + self.bias.float(), self.top_k, dim=-1).indices  # [T, k]
        gates = 1.0 + scores.gather(-1, top) * self.scale.float()[top]  # [T, k]
        return scores, top, gates


class CarvedMLP(nn.Module):
    """A gated FFN cut into shared and routed experts stored as stacked tensors.

    gate_up_proj [E, 2m, D] (gate rows then up rows) and down_proj [E, D, m], the layout of
    transformers' MoE blocks; experts 0..S-1 are shared (always on, gate 1), S..E-1 routed.
    """

    def __init__(
        self,
        hidden_size: int,
        expert_size: int,
        num_shared: int,
        num_experts: int,
        top_k: int,
        activation: str,
        router: str = "representative",
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.expert_size = expert_size
        self.num_shared = num_shared
        self.num_experts = num_experts
        self.activation = activation
        self.act_fn = ACT2FN[activation]
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))
        self.router = CarvedRouter(
            hidden_size, num_experts - num_shared, top_k, router, self.act_fn
        )
        # Mean output of each routed expert over calibration tokens that did not choose it:
        # added for the experts a token leaves out, so dropping one costs its variance, not its
        # mean. Zero means no compensation; with every expert active nothing is added.
        self.expert_bias = nn.Parameter(torch.zeros(num_experts - num_shared, hidden_size))
        self.compensate = False
        # MoNE: the fraction of each active expert's neurons that a token keeps (largest
        # |act(gate x)|), for routed and for shared experts; 1.0 keeps all (selection off).
        self.neuron_keep = 1.0
        self.shared_neuron_keep = 1.0
        # Filled by route() callers that want statistics (carving report, bench, finetune).
        self.last_routing: torch.Tensor | None = None
        self.record_routing = False

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def num_routed(self) -> int:
        return self.num_experts - self.num_shared

    def _shared_slots(self, device, dtype):
        """Shared experts' ids [1, S] and gates [1, S], made once per device and dtype: at decode
        each small tensor op costs ~5-10 us on a CPU, a sizeable share of a 96-neuron expert."""
        key = (device, dtype)
        cache = self.__dict__.setdefault("_shared_cache", {})
        if key not in cache:
            cache[key] = (
                torch.arange(self.num_shared, device=device)[None],
                torch.ones(1, self.num_shared, dtype=dtype, device=device),
            )
        return cache[key]

    def route(self, x: torch.Tensor):
        """x [T, D] -> expert ids [T, S+k] (shared first) and gates [T, S+k]."""
        scores, top, gates = self.router(x)
        if not self.num_shared:
            return top, gates, top
        num_tokens = x.shape[0]
        shared_ids, ones = self._shared_slots(x.device, gates.dtype)
        ids = torch.cat([shared_ids.expand(num_tokens, -1), top + self.num_shared], dim=-1)
        return ids, torch.cat([ones.expand(num_tokens, -1), gates], dim=-1), top

    def keep_counts(self) -> list[int] | None:
        """Neurons kept per expert id (shared first) under MoNE, or None when selection is off."""
        if self.neuron_keep >= 1.0 and self.shared_neuron_keep >= 1.0:
            return None
        m = self.expert_size
        shared, routed = keep_count(self.shared_neuron_keep, m), keep_count(self.neuron_keep, m)
        return [shared] * self.num_shared + [routed] * self.num_routed

    def _neuron_rows(self, num_tokens: int) -> torch.Tensor | None:
        """[E, m, 2D]: each neuron's up row and down column side by side, for MoNE at decode:
        one gather then fetches just the kept neurons' bytes (columns of down_proj [E, D, m]
        are strided). Made once per weight version (it costs 2/3 of the experts' memory
        again); not for prefill (which masks instead) nor while the weights train. Writes through `.data` (a LoRA merge) do not
        bump a tensor's version: whoever does that calls `drop_caches()`."""
        up, down = self.gate_up_proj, self.down_proj
        if num_tokens > _DECODE_TOKENS or (
            torch.is_grad_enabled() and (up.requires_grad or down.requires_grad)
        ):
            return None
        key = (up.data_ptr(), up._version, down.data_ptr(), down._version, down.device, down.dtype)
        cached = self.__dict__.get("_neuron_rows_cache")
        if cached is None or cached[0] != key:
            m = self.expert_size
            rows = torch.cat([up.detach()[:, m:], down.detach().transpose(1, 2)], dim=2)
            if _cpu_decode is not None and rows.device.type == "cpu":
                rows = _cpu_decode.hugepage_copy(rows)  # scattered kept rows: see its docs
            cached = (key, rows.contiguous())
            self.__dict__["_neuron_rows_cache"] = cached
        return cached[1]

    def __getstate__(self):
        """Pickling and deepcopy leave the weight-derived caches out (a copy would rebuild them
        anyway; the MoNE rows alone are 2/3 of the experts' size) and let a copy move its own
        weights to huge pages."""
        state = dict(super().__getstate__())
        for name in _CACHE_ENTRIES:
            state.pop(name, None)
        return state

    def drop_caches(self) -> None:
        """Forget weight-derived caches (after changing weights in place)."""
        for name in _CACHE_ENTRIES:
            if name != "_hugepages":
                self.__dict__.pop(name, None)

    def experts(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the chosen experts: x [T, D], ids/gates [T, S+k] -> [T, D]."""
        keep = self.keep_counts()
        kernel_act = _KERNEL_ACTIVATIONS.get(self.activation)
        if _fast_carved_ffn is not None and kernel_act is not None:
            if keep is None:  # the call every kernel version understands
                return _fast_carved_ffn(x, self.gate_up_proj, self.down_proj, ids, gates, kernel_act)
            return _fast_carved_ffn(
                x, self.gate_up_proj, self.down_proj, ids, gates, kernel_act,
                neuron_keep=keep, rows_2d=self._neuron_rows(x.shape[0]),
            )
        return experts_forward_torch(
            x, self.gate_up_proj, self.down_proj, ids, gates, self.act_fn, keep
        )

    def _cpu_fused(self, x: torch.Tensor):
        """(y, top) from the fused CPU decode kernel, or None where it does not apply: not a
        float32 CPU inference step of a few tokens, the kernel not built, or `experts` replaced on
        this instance (a benchmark baseline or a test), which the general path honours."""
        if _cpu_decode is None or x.shape[0] > _CPU_FUSED_TOKENS or "experts" in self.__dict__:
            return None
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return None  # gradients wanted: the general path is differentiable, the kernel not
        if not _cpu_decode.applies(x):
            return None
        args = self._fused_args()
        return None if args is None else _cpu_decode.run(x, args)

    def _fused_args(self) -> tuple | None:
        """The fused kernel's arguments after x, or None where this layer cannot use it; made
        once and reused while the key below holds. Inside a decode the Python work of every
        call counts: building them each time cost 4 us a layer, 11 us with MoNE (SmolLM2-135M,
        one thread of the 2-core EPYC), as much as MoNE saves in the kernel.

        The tuple holds the Parameter objects themselves, so in-place and `.data` changes of
        their values are seen; what is derived from them (the MoNE rows) or chosen per layer
        (keep ratios, budget, compensation, router) is in the key. Parameters are read from
        `_parameters`: nn.Module's attribute lookup costs about 0.4 us a name."""
        params, router = self._parameters, self._modules["router"]
        rparams = router._parameters
        tensors = (
            params.get("gate_up_proj"), params.get("down_proj"), rparams.get("gate_weight"),
            rparams.get("up_weight"), rparams.get("logit_bias"), rparams.get("scale"),
            router._buffers.get("bias"), params.get("expert_bias"),
        )
        if any(t is None for t in tensors):
            return None  # parametrized (e.g. an unmerged peft LoRA): the general path
        gate_up, down = tensors[0], tensors[1]
        # Objects by identity (the cache holds them, so their ids stay theirs), derived data by
        # storage and version, settings by value.
        key = (
            router, *map(id, tensors), gate_up.dtype, gate_up.data_ptr(), down.data_ptr(),
            gate_up._version, down._version, router.kind, router.top_k, self.activation,
            self.neuron_keep, self.shared_neuron_keep, self.compensate,
        )
        cached = self.__dict__.get("_fused_args_cache")
        if cached is not None and cached[0][0] is router and cached[0][1:] == key[1:]:
            return cached[1]
        args = None
        f32 = torch.float32
        if (
            self.activation in _KERNEL_ACTIVATIONS
            and all(t.dtype == f32 and t.device.type == "cpu" for t in tensors)
        ):
            if "_hugepages" not in self.__dict__:
                self._weights_to_hugepages()
                return self._fused_args()  # the weights' storage moved: key them anew
            keep = self.keep_counts()
            linear = router.kind == "linear"
            args = _cpu_decode.prepare(
                rparams["gate_weight"], None if linear else rparams["up_weight"],
                rparams["logit_bias"], router._buffers["bias"], rparams["scale"],
                "linear" if linear else "representative", router.top_k, self.num_shared,
                gate_up, down, self._neuron_rows(1) if keep is not None else None, keep,
                params["expert_bias"] if self.compensate else None,
                _KERNEL_ACTIVATIONS[self.activation],
            )
        self.__dict__["_fused_args_cache"] = (key, args, tensors)
        return args

    def _weights_to_hugepages(self) -> None:
        """Once, at the first fused decode step: the experts' weights move into memory backed by
        2 MiB pages (`cmoe_kernels.cpu_decode.hugepage_copy`: fewer TLB misses when a token
        reads a few experts out of hundreds of MB). Same values, same Parameter objects."""
        self.__dict__["_hugepages"] = True
        if not _cpu_decode.hugepages_possible():
            return
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, fit for training
            for name in ("gate_up_proj", "down_proj"):
                param = self._parameters[name]
                if param.is_shared():  # shared with other processes: a copy would unshare it
                    continue
                param.data = _cpu_decode.hugepage_copy(param.data)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)  # [T, D]
        fused = self._cpu_fused(x)
        if fused is not None:
            y, top = fused
            if self.record_routing:
                self.last_routing = top
            return y.reshape(shape)
        ids, gates, top = self.route(x)
        if self.record_routing:
            self.last_routing = top.detach()
        y = self.experts(x, ids, gates)
        if self.compensate:
            dropped = self.expert_bias.sum(0) - self.expert_bias[top].sum(1)  # [T, D]
            y = y + dropped.to(y.dtype)
        return y.reshape(shape)


def is_gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def find_gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every gated MLP, in model order."""
    return [(name, mod) for name, mod in model.named_modules() if is_gated_mlp(mod)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def install_carved_mlps(model: nn.Module, cmoe: dict, hidden_size: int) -> None:
    """Replace the gated MLPs named in `cmoe["mlp_names"]` by empty CarvedMLPs of the saved shape."""
    for name, top_k in zip(cmoe["mlp_names"], cmoe["top_k"]):
        carved = CarvedMLP(
            hidden_size=hidden_size,
            expert_size=cmoe["expert_size"],
            num_shared=cmoe["num_shared"],
            num_experts=cmoe["num_experts"],
            top_k=top_k,
            activation=cmoe["activation"],
            router=cmoe.get("router", "representative"),
        )
        carved.compensate = bool(cmoe.get("compensate", False))
        carved.neuron_keep = float(cmoe.get("neuron_keep", 1.0))
        carved.shared_neuron_keep = float(cmoe.get("shared_neuron_keep", 1.0))
        replace_module(model, name, carved)


def build_classes(base_config_cls, base_model_cls):
    """The carved config and model classes for one source architecture (e.g. Llama)."""

    class CmoeConfig(base_config_cls):
        model_type = "cmoe"

    class CmoeForCausalLM(base_model_cls):
        config_class = CmoeConfig

        def __init__(self, config):
            super().__init__(config)
            install_carved_mlps(self, config.cmoe, config.hidden_size)

    CmoeConfig.__name__ = CmoeConfig.__qualname__ = "CmoeConfig"
    CmoeForCausalLM.__name__ = CmoeForCausalLM.__qualname__ = "CmoeForCausalLM"
    return CmoeConfig, CmoeForCausalLM
