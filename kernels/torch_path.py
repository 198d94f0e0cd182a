"""The carved FFN in plain PyTorch: the path for CPUs and for any device without Triton.

Two strategies, picked by the number of (token, expert) pairs:

* decode (one token, a few pairs): a loop over the chosen experts that runs a matrix-vector
  product on a *view* of each expert's weights. Nothing is copied, so the bytes read are exactly
  the active experts' weights. Gathering the weights first (`gate_up[ids]` + `bmm`) is what one
  would write first, but it copies the active weights (read + write) before the bmm reads them
  again, and MKL's batched GEMV is slow: at SmolLM2-135M S2A2E16, T=1, weights streamed from
  memory (2-core Xeon, fp32) the gather + bmm took 300-350 us a layer, the view loop 160 us,
  the dense FFN 420 us.
* prefill (many tokens): the (token, slot) pairs are sorted by expert, each expert that has
  tokens runs two matmuls over its contiguous slice (a loop over experts, never over tokens),
  and the gated outputs are scatter-added back to their tokens in fp32.

Everything is made of differentiable PyTorch ops, so autograd gives the gradients of x, gate_up,
down and gates. Threading is PyTorch's own (`torch.set_num_threads`); nothing here changes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ._common import check_inputs, torch_activation

TorchPath = Literal["auto", "decode", "prefill"]

# Above this many (token, expert) pairs the sorted prefill path wins. Measured on the 2-core Xeon,
# fp32, SmolLM2-135M shapes: the decode loop costs ~20 us of dispatch per pair, the routing of
# the prefill path (argsort, bincount, gathers) ~60 us once; they cross at T=2 (K=4 and K=6).
DECODE_MAX_PAIRS = 6


def _expert_views(weight: torch.Tensor) -> Sequence[torch.Tensor] | torch.Tensor:
    """What `[e]` indexes to get expert e's weights as a view, cheaply under autograd too.

    Without grad, indexing the stacked tensor is the cheapest. With grad, `weight[e]` would make
    each backward allocate a full-size zero gradient per use; `unbind` makes one view per expert
    whose backward stacks the gradients once.
    """
    return weight.unbind(0) if weight.requires_grad else weight


def _decode(x, gate_up, down, ids, gates, act) -> torch.Tensor:
    """Loop over the T*K chosen (token, expert) pairs; each reads only its expert's rows."""
    m = down.shape[-1]
    gu, dn = _expert_views(gate_up), _expert_views(down)
    rows = []
    for t, experts in enumerate(ids.tolist()):  # one host sync; T*K <= DECODE_MAX_PAIRS here
        h = torch.stack([torch.mv(gu[e], x[t]) for e in experts])  # [K, 2m]
        a = act(h[:, :m]) * h[:, m:]  # [K, m]
        out = torch.stack([torch.mv(dn[e], a[k]) for k, e in enumerate(experts)])  # [K, D]
        rows.append(gates[t].float() @ out.float())  # [D], the K-way sum in fp32
    return torch.stack(rows).to(x.dtype)  # [T, D]


def _prefill(x, gate_up, down, ids, gates, act) -> torch.Tensor:
    """Sort the pairs by expert, two matmuls per expert with tokens, scatter-add back in fp32."""
    T, K = ids.shape
    E, D, m = down.shape
    flat = ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K] pair index, grouped by expert
    counts = torch.bincount(flat, minlength=E).tolist()  # [E], one host sync (fine on a CPU)
    token = order // K  # [T*K] token of each sorted pair
    xs = x.index_select(0, token)  # [T*K, D] tokens in expert order
    gs = gates.reshape(-1)[order].float().unsqueeze(-1)  # [T*K, 1]
    gu, dn = _expert_views(gate_up), _expert_views(down)
    outs, start = [], 0
    for e, n in enumerate(counts):  # a loop over experts, never over tokens
        if n == 0:
            continue
        h = F.linear(xs[start : start + n], gu[e])  # [n, 2m]
        outs.append(F.linear(act(h[:, :m]) * h[:, m:], dn[e]))  # [n, D]
        start += n
    out = torch.cat(outs).float() * gs  # [T*K, D], gated in fp32
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    return y.index_add_(0, token, out).to(x.dtype)  # [T, D]


def carved_ffn_torch(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    activation: str = "silu",
    path: TorchPath = "auto",
) -> torch.Tensor:
    """The carved FFN with PyTorch ops; same contract as `cmoe_kernels.carved_ffn`.

    `path` forces a strategy ("decode" or "prefill"); "auto" takes decode up to
    DECODE_MAX_PAIRS (token, expert) pairs, i.e. one token, and prefill above.
    """
    T, D, _, _, K = check_inputs(x, gate_up, down, ids, gates)
    act = torch_activation(activation)
    if T == 0:
        return x.new_zeros(0, D)
    if path == "auto":
        path = "decode" if T * K <= DECODE_MAX_PAIRS else "prefill"
    if path == "decode":
        return _decode(x, gate_up, down, ids, gates, act)
    if path == "prefill":
        return _prefill(x, gate_up, down, ids, gates, act)
    raise ValueError(f"path={path!r} is not one of 'auto', 'decode', 'prefill'")
