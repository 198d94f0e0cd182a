"""Running decoder layers on the calibration batch: recording the arguments each layer receives,
calling a layer on all windows (in batches when they are many), and swapping in a stand-in for
its MLP that carves it from the inputs it sees."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import ModelError
from .modeling_cmoe import CarvedMLP, replace_module


class Recorded(Exception):
    """Ends the recording forward once the last decoder layer has its arguments."""


@contextlib.contextmanager
def recording_layers(layers: list[nn.Module], store: list[list]):
    """Replace every decoder layer by a recorder that keeps its inputs and passes them through.

    Running the model then costs only the embeddings, masks and rotary tables, yet yields the
    exact arguments each layer receives (masks and positions differ per layer in Gemma).
    """

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            store[index].append((hidden_states.detach(), args, kwargs))
            if index == len(layers) - 1:
                raise Recorded  # nothing after the last layer is needed (nor, streaming, loaded)
            return hidden_states

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


def capture_ffn_residual(layer: nn.Module, mids: list):
    """Keep the residual stream entering the FFN (the input of the norm before it) in `mids`
    (one tensor per layer call), for layers whose output is that residual plus the FFN's output (Llama, Mistral,
    Qwen): a forward pre-hook on `post_attention_layernorm`. Gemma's FFN output passes through
    one more norm, so stream targets are not linear in its down projections."""
    if not adds_ffn_to_stream(layer):
        raise ModelError(
            f"{type(layer).__name__} does not add its FFN output straight to the residual "
            "stream: use --refit-target ffn for this model"
        )

    def hook(_module, args):
        mids.append(args[0].detach())

    return layer.post_attention_layernorm.register_forward_pre_hook(hook)


def adds_ffn_to_stream(layer: nn.Module) -> bool:
    """Whether the layer's output is the residual before its FFN plus the FFN's output, the
    form stream targets need (Llama, Mistral, Qwen; not Gemma, whose FFN output is normed)."""
    return (getattr(layer, "post_attention_layernorm", None) is not None
            and not hasattr(layer, "post_feedforward_layernorm"))


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def no_cache(model: nn.Module):
    saved = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        yield
    finally:
        model.config.use_cache = saved


class _CarveOnCall(nn.Module):
    """Stands in for a dense MLP during one batched layer call: carves the MLP on the inputs it
    receives and answers with the carved FFN, so each layer runs once (attention included)."""

    def __init__(self, dense: nn.Module, carve_fn):
        super().__init__()
        self.dense = dense
        self.carve_fn = carve_fn
        self.carved: CarvedMLP | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.carved is not None:
            raise RuntimeError("the MLP was called twice in one layer call; cannot carve it")
        made: list[torch.Tensor] = []  # the carve's own output on these rows, when it has one
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        self.carved = self.carve_fn(self.dense, x, outputs=made)
        if made:
            return made[0].to(hidden_states.dtype).reshape(hidden_states.shape)
        return self.carved(hidden_states)


# Activations of one layer call are bounded by running the calibration windows through it in
# batches of about this many bytes of FFN-wide fp32 activations (4 per token and neuron); below
# it (SmolLM2 on 8 x 2048 tokens, a Llama-3-8B layer on 9k tokens) the layer runs once.
BATCH_BYTES = 2 * 2**30


def call_bytes(windows: int, seqlen: int, width: int) -> int:
    """The FFN-wide fp32 activations of one layer call on `windows` windows (4 per token and
    neuron)."""
    return 16 * width * seqlen * windows


def window_batches(num_windows: int, seqlen: int, width: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of calibration windows run through a layer together."""
    per_batch = max(1, BATCH_BYTES // call_bytes(1, seqlen, width))
    return [(i, min(i + per_batch, num_windows)) for i in range(0, num_windows, per_batch)]


def _take(value, start: int, stop: int, n: int):
    """A layer argument for windows [start, stop): tensors batched over the n windows are sliced,
    shared ones (rotary tables of shape [1, ...], None masks) pass as they are."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() and value.shape[0] == n and n > 1 else value
    if isinstance(value, tuple):
        return tuple(_take(v, start, stop, n) for v in value)
    if isinstance(value, list):
        return [_take(v, start, stop, n) for v in value]
    if isinstance(value, dict):
        return {k: _take(v, start, stop, n) for k, v in value.items()}
    return value


def run_layer(layer, hidden, args, kwargs, batches) -> torch.Tensor:
    device = next(layer.parameters()).device
    n = hidden.shape[0]
    outs = []
    for start, stop in batches:
        a, kw = _take(args, start, stop, n), _take(kwargs, start, stop, n)
        outs.append(first_output(layer(hidden[start:stop].to(device), *a, **kw)))
    return outs[0] if len(outs) == 1 else torch.cat(outs)  # one batch: no copy of the output


class _CollectInputs(nn.Module):
    """Stands in for a dense MLP while the windows pass in batches: keeps its inputs, answers
    zeros (the layer's outputs of this pass are thrown away)."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.inputs.append(hidden_states.reshape(-1, hidden_states.shape[-1]))
        return torch.zeros_like(hidden_states)


def carve_layer(model, name, mlp, layer, hidden, args, kwargs, batches, carve_fn, mid_hook):
    """Carve the MLP `name` of `layer` on this layer's calibration inputs and return the layer's
    output with the carved FFN in place (the next layer's input) and the carved FFN.

    One batch: a single layer call carves on the fly. Several: one pass collects the FFN's
    inputs, the carve runs on all of them, a second pass computes the output."""
    if len(batches) == 1:
        stand_in = _CarveOnCall(mlp, carve_fn)
        replace_module(model, name, stand_in)
        out = run_layer(layer, hidden, args, kwargs, batches)
        carved = stand_in.carved
    else:
        collector = _CollectInputs()
        replace_module(model, name, collector)
        run_layer(layer, hidden, args, kwargs, batches)
        if mid_hook is not None:
            mid_hook.remove()  # the residual of the collecting pass is the one the carve saw
        carved = carve_fn(mlp, torch.cat(collector.inputs)) if collector.inputs else None
        del collector
        if carved is not None:
            replace_module(model, name, carved)
            out = run_layer(layer, hidden, args, kwargs, batches)
    if carved is None:
        raise ModelError(f"{name} was not called by its decoder layer; cannot carve it")
    return out, carved


def stream_goal(dense_next, mids):
    """Stream targets for rows idx: what the layer must add to its own residual to land on the
    dense model's state (the FFN also makes up for attention's drift); None without them."""
    if dense_next is None:
        return None

    def goal(idx):
        if len(mids) > 1:
            mids[:] = [torch.cat([m.reshape(-1, m.shape[-1]) for m in mids])]
        dim, i = dense_next.shape[-1], idx.to(dense_next.device)
        return (dense_next.reshape(-1, dim)[i] - mids[0].reshape(-1, dim)[i]).float()

    return goal


