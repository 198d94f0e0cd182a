"""The carving driver: layer by layer, profile the FFN on the output of the carved layers before
it, group its neurons, build the carved FFN, and move on (the GPTQ / Wanda calibration loop).

Memory stays bounded by one layer's activations for the calibration batch: the hidden states of
all windows at the current layer, and that layer's FFN inputs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .build import build_carved_mlp
from .errors import ModelError, SpecError
from .grouping import group_neurons
from .modeling_cmoe import CarvedMLP, find_gated_mlps, replace_module
from .profiling import profile_layer
from .progress import progress_bar
from .spec import ExpertSpec, check_spec_fits, parse_spec

log = logging.getLogger(__name__)


@dataclass
class CarveConfig:
    """How to carve. Saved in the checkpoint's config under `cmoe`."""

    spec: str = field(default="S2A2E16", metadata={"help": "experts: S<shared>A<active>E<total>"})
    k_act: int = field(default=10, metadata={"help": "neurons marked active per token (K_a)"})
    max_iter: int = field(default=10, metadata={"help": "cap on balanced k-means passes"})
    cosine_scores: bool = field(
        default=True, metadata={"help": "profile with unit-norm inputs and weight rows"}
    )

    def __post_init__(self):
        self.layout: ExpertSpec = parse_spec(self.spec)
        self.spec = str(self.layout)
        if self.k_act < 1:
            raise SpecError(f"--k-act must be at least 1, got {self.k_act}")
        if self.max_iter < 1:
            raise SpecError(f"--max-iter must be at least 1, got {self.max_iter}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "layout"}


def activation_name(config) -> str:
    """The FFN activation's ACT2FN name (Gemma calls it hidden_activation)."""
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if not name:
        raise ModelError("the model config names no hidden_act: cannot tell the FFN activation")
    return name


def gated_mlps_or_error(model: nn.Module) -> list[tuple[str, nn.Module]]:
    mlps = find_gated_mlps(model)
    if not mlps:
        raise ModelError(
            f"{type(model).__name__} has no gated MLP: expected decoder layers whose MLP has "
            "gate_proj, up_proj, down_proj and act_fn (Llama, Mistral, Qwen2/3, Gemma 2/3 style)"
        )
    for name, mlp in mlps:
        if any(getattr(mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
            raise ModelError(f"{name} has biases in its MLP, which carving does not support yet")
    return mlps


def _layer_of(model: nn.Module, mlp_name: str) -> nn.Module:
    """The decoder layer holding an MLP: its parent module."""
    return model.get_submodule(mlp_name.rpartition(".")[0])


@contextlib.contextmanager
def _recording_layers(layers: list[nn.Module], store: list[list]):
    """Replace every decoder layer by a recorder that keeps its inputs and passes them through.

    Running the model then costs only the embeddings, masks and rotary tables, yet yields the
    exact arguments each layer receives (masks and positions differ per layer in Gemma).
    """

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            store[index].append((hidden_states.detach(), args, kwargs))
            return hidden_states

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _no_cache(model: nn.Module):
    saved = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        yield
    finally:
        model.config.use_cache = saved


@dataclass
class LayerReport:
    name: str
    top_k: int
    rate_mean: float
    rate_max: float
    rate_min: float
    never_marked: int
    shared_rate_mean: float
    expert_sizes: list[int]  # real (non-padding) neurons per expert
    representatives: list[int]
    expert_load: list[float]  # fraction of calibration tokens routed to each routed expert
    load_max_over_mean: float
    reconstruction_error: float  # ||carved - dense||^2 / ||dense||^2 on calibration tokens
    kmeans_iterations: int
    kmeans_converged: bool
    seconds: float


@dataclass
class CarveResult:
    config: CarveConfig
    layers: list[LayerReport]
    seconds: float
    num_tokens: int
    cmoe: dict  # what goes into the checkpoint's config


@torch.no_grad()
def _layer_ffn_inputs(layer, mlp, inputs):
    """Run one decoder layer on every window, keeping its FFN's inputs and outputs."""
    xs, ys = [], []

    def hook(_module, args, output):
        xs.append(args[0].reshape(-1, args[0].shape[-1]))
        ys.append(output.reshape(-1, output.shape[-1]))

    handle = mlp.register_forward_hook(hook)
    try:
        for hidden, args, kwargs in inputs:
            layer(hidden, *args, **kwargs)
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def _evaluate_carved(carved: CarvedMLP, x: torch.Tensor, dense_out: torch.Tensor, chunk=4096):
    """Expert load (fraction of tokens per routed expert) and relative reconstruction error."""
    counts = torch.zeros(carved.num_routed, dtype=torch.float64)
    err = ref = 0.0
    for s in range(0, x.shape[0], chunk):
        xc = x[s : s + chunk]
        _, _, top = carved.route(xc)
        counts += torch.bincount(top.reshape(-1).cpu(), minlength=carved.num_routed).double()
        diff = carved(xc).float() - dense_out[s : s + chunk].float()
        err += diff.pow(2).sum().item()
        ref += dense_out[s : s + chunk].float().pow(2).sum().item()
    load = (counts / x.shape[0]).tolist()
    return load, err / max(ref, 1e-30)


def carve_model(
    model: nn.Module, calib_ids: torch.Tensor, config: CarveConfig, progress: bool = True
) -> CarveResult:
    """Carve every gated MLP of `model` in place, calibrating on `calib_ids` [n, seqlen]."""
    start = time.perf_counter()
    layout = config.layout
    mlps = gated_mlps_or_error(model)
    act_name = activation_name(model.config)
    intermediate = mlps[0][1].gate_proj.weight.shape[0]
    check_spec_fits(layout, intermediate)
    layers = [_layer_of(model, name) for name, _ in mlps]
    model.eval()
    device = next(model.parameters()).device

    # Inputs of every layer for every window; only layer 0's hidden states are kept.
    store: list[list] = [[] for _ in layers]
    with _no_cache(model), _recording_layers(layers, store):
        for window in calib_ids:
            model(window[None].to(device), use_cache=False)
    inputs = [(h, a, k) for h, a, k in store[0]]
    per_layer_args = [[(a, k) for _, a, k in s] for s in store]
    del store

    reports: list[LayerReport] = []
    bar = progress_bar(len(mlps), "carving layers", enabled=progress)
    for index, ((name, mlp), layer) in enumerate(zip(mlps, layers)):
        t0 = time.perf_counter()
        layer_device = mlp.gate_proj.weight.device
        inputs = [
            (h.to(layer_device), a, k)
            for (h, _, _), (a, k) in zip(inputs, per_layer_args[index])
        ]
        x, dense_out = _layer_ffn_inputs(layer, mlp, inputs)
        prof = profile_layer(
            x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.act_fn, config.k_act,
            config.cosine_scores,
        )
        groups = group_neurons(
            prof.markers, prof.rates, layout.num_shared, layout.num_experts, config.max_iter
        )
        carved = build_carved_mlp(
            mlp, groups, layout.num_shared, layout.top_k, act_name, config.cosine_scores
        )
        replace_module(model, name, carved)
        load, rel_err = _evaluate_carved(carved, x, dense_out)
        del x, dense_out, prof.markers
        # The next layer sees this layer's output with the carved FFN in place.
        inputs = [
            (_first_output(layer(h, *a, **k)).detach(), None, None) for h, a, k in inputs
        ]
        real = (groups.experts < intermediate).sum(1).tolist()
        shared_ids = groups.experts[: layout.num_shared].reshape(-1)
        shared_ids = shared_ids[shared_ids < intermediate]
        mean_load = sum(load) / len(load)
        reports.append(
            LayerReport(
                name=name,
                top_k=layout.top_k,
                rate_mean=prof.rates.mean().item(),
                rate_max=prof.rates.max().item(),
                rate_min=prof.rates.min().item(),
                never_marked=int((prof.rates == 0).sum()),
                shared_rate_mean=prof.rates[shared_ids].mean().item() if shared_ids.numel() else 0.0,
                expert_sizes=real,
                representatives=groups.representatives.tolist(),
                expert_load=[round(v, 6) for v in load],
                load_max_over_mean=max(load) / mean_load if mean_load else 0.0,
                reconstruction_error=rel_err,
                kmeans_iterations=groups.iterations,
                kmeans_converged=groups.converged,
                seconds=time.perf_counter() - t0,
            )
        )
        log.debug("%s: rel. error %.4f, %d k-means passes", name, rel_err, groups.iterations)
        bar.advance()
    bar.close()

    cmoe = {
        **config.to_dict(),
        "num_shared": layout.num_shared,
        "num_experts": layout.num_experts,
        "top_k": [r.top_k for r in reports],
        "expert_size": layout.expert_size(intermediate),
        "intermediate_size": intermediate,
        "activation": act_name,
        "router": "representative",
        "mlp_names": [name for name, _ in mlps],
        "base_config_class": type(model.config).__name__,
        "base_model_class": type(model).__name__,
    }
    return CarveResult(
        config, reports, time.perf_counter() - start, int(calib_ids.numel()), cmoe
    )
