"""The carving driver: layer by layer, profile the FFN on the output of the carved layers before
it, group its neurons, build the carved FFN, and move on (the GPTQ / Wanda calibration loop).

Memory stays bounded by one layer's activations for the calibration batch: the hidden states of
all windows at the current layer, and that layer's FFN inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .budget import allocate_budgets
from .dense_ahead import DenseStream, beside_layers, runs_beside
from .errors import ModelError, SpecError
from .layer_calls import (
    adds_ffn_to_stream,
    call_bytes,
    capture_ffn_residual,
    carve_layer,
    no_cache,
    Recorded,
    recording_layers,
    stream_goal,
    window_batches,
)
from .layer_carve import carve_mlp
from .modeling_cmoe import find_gated_mlps, replace_module
from .progress import progress_bar
from .spec import ExpertSpec, check_spec_fits, parse_spec

log = logging.getLogger(__name__)

ROUTERS = ("fitted", "representative")
REFIT_TARGETS = ("auto", "stream", "ffn")
GROUPINGS = ("markers", "contribution")


@dataclass
class CarveConfig:
    """How to carve. Saved in the checkpoint's config under `cmoe`."""

    spec: str = field(default="S2A2E16", metadata={"help": "experts: S<shared>A<active>E<total>"})
    k_act: int = field(default=10, metadata={"help": "neurons marked active per token (K_a)"})
    max_iter: int = field(default=10, metadata={"help": "cap on balanced k-means passes"})
    kmeans_tol: float = field(
        default=0.0,
        metadata={
            "help": "the assignment counts as stable when at most this fraction of neurons "
            "changes expert in a pass (each pass is one LSA solve, ~0.2 s for SmolLM2)"
        },
    )
    warm_steps: int = field(
        default=5,
        metadata={"help": "unbalanced k-means passes before the balanced ones (fewer LSA solves)"},
    )
    cosine_scores: bool = field(
        default=True, metadata={"help": "profile with unit-norm inputs and weight rows"}
    )
    router: str = field(
        default="fitted",
        metadata={
            "help": "fitted: ridge regression of expert output norms on the FFN input; "
            "representative: CMoE's representative-neuron router"
        },
    )
    ridge: float = field(default=1e-3, metadata={"help": "ridge strength of the fitted router"})
    compensate: bool = field(
        default=False,
        metadata={"help": "add the mean output of the routed experts a token leaves out"},
    )
    balance: bool = field(
        default=False,
        metadata={"help": "calibrate the selection bias so expert loads are even on calibration"},
    )
    adaptive: bool = field(
        default=False,
        metadata={
            "help": "layer-adaptive budgets: more active experts where the carve error is "
            "largest, at the same average"
        },
    )
    grouping: str = field(
        default="contribution",
        metadata={
            "help": "markers: CMoE's binary top-K_a markers and activation rates; contribution: "
            "|h_i| * ||W_down[:, i]|| per token, shared experts by mean contribution"
        },
    )

    refit: bool = field(
        default=True,
        metadata={
            "help": "refit the down projections (and compensation) by least squares once the "
            "routing is fixed, on the calibration tokens"
        },
    )
    # auto (stream where the FFN adds straight to the residual stream, else ffn): on SmolLM2,
    # stream targets gave WikiText-2 84.22 against 95.55 at S2A2E16 and 30.67 against 31.15 at
    # S3A3E8 (32 windows, benchmarks/ablation_carve.md), at one more dense layer per layer.
    refit_target: str = field(
        default="auto",
        metadata={
            "help": "what the refit reproduces: stream, the dense model's own hidden states after "
            "the layer (later layers then correct earlier ones' errors); ffn, the dense FFN on "
            "the carved stream; auto, stream where the model adds its FFN output straight to "
            "the residual stream (Llama, Mistral, Qwen), else ffn (Gemma)"
        },
    )
    stream_mix: float = field(
        default=0.5,
        metadata={
            "help": "with stream targets, the weight of the dense stream's goal in the refit's "
            "target, the rest being the dense FFN's output on the carved stream (1: the stream "
            "alone)"
        },
    )
    # On SmolLM2 (32 windows, stream targets): 84.22 -> 81.26 at S2A2E16, 30.67 -> 30.19 at S3A3E8.
    held_out_fits: bool = field(
        default=True,
        metadata={
            "help": "the held-out calibration tokens, which choose the refit's ridge and guard it, "
            "then also fit the router and join the final refit (the report's errors on them are "
            "then in-sample)"
        },
    )
    refit_ridge: float | None = field(
        default=None,
        metadata={
            "help": "ridge of the refit toward the carved weights, relative per neuron; None: "
            "chosen per layer on held-out calibration tokens among refit.RIDGE_CHOICES"
        },
    )

    neuron_keep: float = field(
        default=1.0,
        metadata={
            "help": "MoNE: fraction of each active routed expert's neurons a token keeps (largest "
            "|act(gate x)|); 1.0 is off. Changeable later with `cmoe neuron-keep`"
        },
    )
    shared_neuron_keep: float = field(
        default=1.0, metadata={"help": "MoNE keep ratio of the shared experts; 1.0 is off"}
    )
    dense_beside: bool = field(
        default=True,
        metadata={
            "help": "on a CPU, make the dense model's own stream (stream targets) in a thread "
            "beside the carve's first layers, each on half the threads"
        },
    )

    def __post_init__(self):
        from .mone import check_ratio

        check_ratio(self.neuron_keep, "--neuron-keep")
        check_ratio(self.shared_neuron_keep, "--shared-neuron-keep")
        self.layout: ExpertSpec = parse_spec(self.spec)
        self.spec = str(self.layout)
        if self.k_act < 1:
            raise SpecError(f"--k-act must be at least 1, got {self.k_act}")
        if self.max_iter < 1:
            raise SpecError(f"--max-iter must be at least 1, got {self.max_iter}")
        if self.grouping not in GROUPINGS:
            raise SpecError(
                f"unknown --grouping {self.grouping!r}: use one of {', '.join(GROUPINGS)}"
            )
        if self.refit_target not in REFIT_TARGETS:
            raise SpecError(
                f"unknown --refit-target {self.refit_target!r}: use one of {', '.join(REFIT_TARGETS)}"
            )
        if not 0.0 <= self.stream_mix <= 1.0:  # nan too
            raise SpecError(f"--stream-mix must be between 0 and 1, got {self.stream_mix}")
        if self.refit_ridge is not None and not self.refit_ridge > 0:  # nan too
            raise SpecError(f"--refit-ridge must be positive, got {self.refit_ridge}")
        if self.router not in ROUTERS:
            raise SpecError(f"unknown --router {self.router!r}: use one of {', '.join(ROUTERS)}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "layout"}


def profile_defaults(exportable: bool, **options: bool | None) -> tuple[bool, ...]:
    """compensate and adaptive as asked, else their defaults (off: with the refit neither helps,
    see benchmarks/ablation_carve.md). The exportable profile cannot have them (engines take one
    k for all layers and have no per-expert output bias): asking for either is a contradiction."""
    if exportable:
        asked = [name for name, value in options.items() if value]
        if asked:
            flags = " and ".join(f"--{n}" for n in asked)
            raise SpecError(
                f"--exportable carves without {flags}, which no export target can express: "
                f"drop {flags} or --exportable"
            )
        return tuple(False for _ in options)
    return tuple(bool(value) for value in options.values())


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
    reconstruction_error: float  # ||carved - dense||^2 / ||dense||^2 on held-out tokens
    energy_reproduced: float  # 1 - reconstruction_error: share of the dense output's energy kept
    oracle_agreement: float  # share of the norm-oracle's top-k experts the router picks
    refit_kept: bool | None  # the refit lowered the held-out error and was kept (None: no refit)
    refit_ridge: float | None  # the ridge of the kept refit (None: slices kept, or no refit)
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
    # Seconds the dense stream's thread ran beside the carve's first layers (None: no thread).
    dense_beside_seconds: float | None = None


def carve_model(
    model: nn.Module, calib_ids: torch.Tensor, config: CarveConfig, progress: bool = True,
    layer_io=None,
) -> CarveResult:
    """Carve every gated MLP of `model` in place, calibrating on `calib_ids` [n, seqlen].

    `layer_io` (streaming.StreamedLayers) streams a model built without weights: each decoder
    layer is read before it is carved and written out and freed after.
    """
    start = time.perf_counter()
    layout = config.layout
    found = gated_mlps_or_error(model)
    act_name = activation_name(model.config)
    intermediate = found[0][1].gate_proj.weight.shape[0]
    check_spec_fits(layout, intermediate)
    # Names only: a list of the dense MLPs would keep every one alive beside its carved copy.
    names = [name for name, _ in found]
    del found
    prefixes = [name.rpartition(".")[0] for name in names]  # each MLP's decoder layer
    layers = [model.get_submodule(prefix) for prefix in prefixes]
    model.eval()
    if layer_io is not None:
        device = layer_io.device
        layer_io.prepare(model, prefixes)
    else:
        device = next(model.parameters()).device

    # The arguments every layer receives for the whole calibration batch (masks, positions);
    # the recorders skip the layers' work, so this costs only the embeddings.
    store: list[list] = [[] for _ in layers]
    with torch.no_grad(), no_cache(model), recording_layers(layers, store):
        try:
            model(calib_ids.to(device), use_cache=False)
        except Recorded:
            pass
    if layer_io is not None:
        layer_io.free_outside(model)
    hidden = store[0][0][0]
    layer_args = [s[0][1:] for s in store]
    del store
    if config.refit_target == "auto":
        target = "stream" if adds_ffn_to_stream(layers[0]) else "ffn"
        config = dataclasses.replace(config, refit_target=target)
        log.info("refit target: %s", target)
    # Stream targets need the dense model's own hidden states, carried beside the carved ones
    # (not at --stream-mix 0, whose target is the dense FFN's output alone).
    streams = config.refit and config.refit_target == "stream" and config.stream_mix > 0
    batches = window_batches(hidden.shape[0], hidden.shape[1], intermediate)
    dense = DenseStream(layers, hidden, layer_args, batches) if streams else None
    # A dense layer call's activations come beside the carve's own.
    widest = max(b - a for a, b in batches)
    beside = dense is not None and runs_beside(
        config.dense_beside, torch.device(device), hidden, len(layers), layer_io is not None,
        layer_bytes=call_bytes(widest, hidden.shape[1], intermediate))
    # The carve's stream moves on layer by layer: this frame must not keep the embeddings.
    inputs = [hidden]
    del hidden
    try:
        if beside:
            dense.start(beside_layers(len(layers)))
        reports, layer_costs = _carve_layers(
            model, names, layers, prefixes, layer_args, inputs, batches, dense, config,
            act_name, intermediate, layer_io, progress)
    finally:
        if dense is not None:
            dense.stop()

    if config.adaptive:
        ks = allocate_budgets(
            layer_costs, layout.top_k, k_min=1, k_max=min(layout.num_routed, 2 * layout.top_k)
        )
        for name, k, report in zip(names, ks, reports):
            model.get_submodule(name).router.top_k = k
            report.top_k = k
        log.info("adaptive budgets (active routed experts per layer): %s", ks)
    # MoNE applies from here on: the routers, budgets and report above see whole experts.
    for name in names:
        carved = model.get_submodule(name)
        carved.neuron_keep, carved.shared_neuron_keep = config.neuron_keep, config.shared_neuron_keep

    cmoe = {
        **config.to_dict(),
        "num_shared": layout.num_shared,
        "num_experts": layout.num_experts,
        "top_k": [r.top_k for r in reports],
        "expert_size": layout.expert_size(intermediate),
        "intermediate_size": intermediate,
        "activation": act_name,
        "router": "linear" if config.router == "fitted" else "representative",
        "compensate": config.compensate,
        "mlp_names": list(names),
        "base_config_class": type(model.config).__name__,
        "base_model_class": type(model).__name__,
    }
    return CarveResult(
        config, reports, time.perf_counter() - start, int(calib_ids.numel()), cmoe,
        dense.seconds if beside else None,
    )


def _carve_layers(model, names, layers, prefixes, layer_args, inputs, batches, dense, config,
                  act_name, intermediate, layer_io, progress):
    """Carve the MLPs `names` of `layers` in order, each on the carved stream leaving the one
    before (the first on `inputs`' one tensor, taken from the list so that only this loop holds
    it): (the layers' reports, their adaptive-budget costs)."""
    layout = config.layout
    hidden = inputs.pop()
    reports: list[LayerReport] = []
    layer_costs: list[torch.Tensor] = []
    with progress_bar(len(names), "carving layers", enabled=progress) as bar:
        for index, (name, layer, prefix, (args, kwargs)) in enumerate(
                zip(names, layers, prefixes, layer_args)):
            t0 = time.perf_counter()
            facts = {}
            if layer_io is not None:
                layer_io.load(prefix, layer)
            mlp = model.get_submodule(name)

            residual = hidden.reshape(-1, hidden.shape[-1])  # this layer's input stream
            # The dense layer on the dense stream, before carving it.
            dense_next = dense.take(index) if dense is not None else None
            mids: list[torch.Tensor] = []
            mid_hook = capture_ffn_residual(layer, mids) if dense_next is not None else None
            carve_fn = functools.partial(
                carve_mlp, config=config, act_name=act_name, name=name, facts=facts,
                residual=residual, stream_goal=stream_goal(dense_next, mids),
                free_dense=layer_io is not None,
            )
            try:
                with torch.no_grad():
                    hidden, carved = carve_layer(model, name, mlp, layer, hidden, args, kwargs,
                                                  batches, carve_fn, mid_hook)
            except BaseException:
                replace_module(model, name, mlp)
                raise
            finally:
                if mid_hook is not None:
                    mid_hook.remove()
            replace_module(model, name, carved)
            if config.adaptive:
                layer_costs.append(facts["cost"])
            if layer_io is not None:
                layer_io.release(prefix, layer)  # the dense MLP went in carve_mlp (free_dense)
            del mlp, carved, carve_fn, dense_next
            seconds = time.perf_counter() - t0
            reports.append(_layer_report(name, layout, intermediate, facts, seconds))
            bar.advance(info=f"last layer {seconds:.1f} s")
    return reports, layer_costs


def _layer_report(name, layout, intermediate, facts, seconds) -> LayerReport:
    prof, groups = facts["prof"], facts["groups"]
    load, rel_err, agreement = facts["stats"]
    shared_ids = groups.experts[: layout.num_shared].reshape(-1)
    shared_ids = shared_ids[shared_ids < intermediate]
    mean_load = sum(load) / len(load)
    return LayerReport(
        name=name,
        top_k=layout.top_k,
        rate_mean=prof.rates.mean().item(),
        rate_max=prof.rates.max().item(),
        rate_min=prof.rates.min().item(),
        never_marked=int((prof.rates == 0).sum()),
        shared_rate_mean=prof.rates[shared_ids].mean().item() if shared_ids.numel() else 0.0,
        expert_sizes=(groups.experts < intermediate).sum(1).tolist(),
        representatives=groups.representatives.tolist(),
        expert_load=[round(v, 6) for v in load],
        load_max_over_mean=max(load) / mean_load if mean_load else 0.0,
        reconstruction_error=rel_err,
        energy_reproduced=1.0 - rel_err,
        oracle_agreement=agreement,
        refit_kept=facts.get("refit_kept"),
        refit_ridge=facts.get("refit_ridge"),
        kmeans_iterations=groups.iterations,
        kmeans_converged=groups.converged,
        seconds=seconds,
    )
