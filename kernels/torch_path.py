"""The carved FFN in plain PyTorch: the path for CPUs and for any device without Triton.

Two strategies, picked by the number of tokens:

* decode (one token): a loop over the chosen experts that runs a matrix-vector
  product on a *view* of each expert's weights. Nothing is copied, so the bytes read are exactly
  the active experts' weights. Gathering the weights first (`gate_up[ids]` + `bmm`) is what one
  would write first, but it copies the active weights (read + write) before the bmm reads them
  again, and MKL's batched GEMV is slow: at SmolLM2-135M S2A2E16, T=1, weights streamed from
  memory (2-core Xeon, 2 threads, fp32, machine idle) the gather + bmm took 300-350 us a layer,
  the view loop 160 us, the dense FFN 420 us.
* prefill (many tokens): experts that every token chose (the shared ones) run on x directly;
  the other (token, slot) pairs are sorted by expert, each expert runs two matmuls over its
  contiguous slice (a loop over experts, never over tokens), and the gated outputs are
  scatter-added back to their tokens in fp32.

Everything is made of differentiable PyTorch ops, so autograd gives the gradients of x, gate_up,
down and gates. Threading is PyTorch's own (`torch.set_num_threads`); nothing here changes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from ._common import check_inputs, expert_keep, keep_mask, torch_activation

TorchPath = Literal["auto", "decode", "prefill"]

# Decode (the view loop) for up to this many tokens, prefill above. SmolLM2-135M shapes, fp32,
# 1 thread of the shared 2-core Xeon, best of 30 interleaved passes, us per layer decode/prefill:
# T=1 584/763 (S2A2E16), 1142/1291 (S3A3E8); T=2 824/608, 2418/2246. Beyond one token the
# prefill path wins or ties, and it reads each expert once where decode re-reads it per token.
DECODE_MAX_TOKENS = 1


def _expert_views(weight: torch.Tensor) -> Sequence[torch.Tensor] | torch.Tensor:
    """What `[e]` indexes to get expert e's weights as a view, cheaply under autograd too.

    Without autograd (inference, or frozen weights), indexing the stacked tensor is cheapest. When
    the weight's gradient is recorded, `weight[e]` would make each backward allocate a full-size
    zero gradient per use; `unbind` makes one view per expert whose backward stacks them once.
    """
    recorded = weight.requires_grad and torch.is_grad_enabled()
    return weight.unbind(0) if recorded else weight


def _decode(x, gate_up, down, ids, gates, act) -> torch.Tensor:
    """Loop over the T*K chosen (token, expert) pairs; each reads only its expert's rows."""
    m = down.shape[-1]
    gu, dn = _expert_views(gate_up), _expert_views(down)
    rows = []
    for t, experts in enumerate(ids.tolist()):  # one host sync; T <= DECODE_MAX_TOKENS here
        h = torch.stack([torch.mv(gu[e], x[t]) for e in experts])  # [K, 2m]
        a = act(h[:, :m]) * h[:, m:]  # [K, m]
        out = torch.stack([torch.mv(dn[e], a[k]) for k, e in enumerate(experts)])  # [K, D]
        rows.append(gates[t].float() @ out.float())  # [D], the K-way sum in fp32
    return torch.stack(rows).to(x.dtype)  # [T, D]


def _decode_kept(x, gate_up, down, ids, gates, act, keep, down_rows) -> torch.Tensor:
    """Decode with MoNE: per chosen expert, the gate rows give act(gate x); only the rows of up,
    and of down (from its row-major copy `down_rows` [E, m, D] when given), of the kept neurons
    are read. The K experts of a token are handled by a few batched ops, not a loop of small
    ones: at decode each op costs microseconds, as much as the bytes MoNE saves."""
    E, D, m = down.shape
    gate_rows = gate_up[:, :m]  # [E, m, D] views
    flat_gate_up = gate_up.reshape(E * 2 * m, D)
    rows = []
    for t, experts in enumerate(ids.tolist()):  # one host sync; T <= DECODE_MAX_TOKENS here
        e = ids[t]
        a = act(torch.stack([torch.mv(gate_rows[i], x[t]) for i in experts]))  # [K, m]
        out = torch.zeros(D, dtype=torch.float32, device=x.device)
        for count in sorted({keep[i] for i in experts}):  # shared and routed may differ
            sel = [k for k, i in enumerate(experts) if keep[i] == count]
            part = slice(None) if len(sel) == len(experts) else torch.tensor(sel, device=x.device)
            ak, ek = a[part], e[part]
            idx = torch.topk(ak.abs(), count, dim=-1).indices  # [k, count] kept neurons
            up = flat_gate_up.index_select(0, (idx + (ek * 2 * m + m)[:, None]).reshape(-1))
            h = ak.gather(1, idx) * (up @ x[t]).view_as(idx) * gates[t, part, None].to(a.dtype)
            flat = (idx + (ek * m)[:, None]).reshape(-1)  # rows of the kept neurons
            if down_rows is not None:
                w = down_rows.reshape(E * m, D)
                out += F.embedding_bag(
                    flat[None], w, per_sample_weights=h.reshape(-1)[None].to(w.dtype), mode="sum"
                )[0].float()
            else:
                cols = down.permute(0, 2, 1).reshape(E * m, D)  # a strided gather: correct, slower
                out += (h.reshape(-1)[None] @ cols[flat]).squeeze(0).float()
        rows.append(out)
    return torch.stack(rows).to(x.dtype)


def _expert(x, w_gate_up, w_down, act, keep: int | None = None) -> torch.Tensor:
    """One expert on rows x [n, D]: down @ (act(gate x) * (up x)) -> [n, D]; with `keep`, only
    each row's `keep` neurons of largest |act(gate x)| count (MoNE; gradients flow through
    those). Many tokens pick different neurons, so all are computed and the rest masked."""
    m = w_down.shape[-1]
    h = F.linear(x, w_gate_up)  # [n, 2m]
    a = act(h[:, :m])
    hidden = a * h[:, m:]
    if keep is not None and keep < m:
        hidden = hidden * keep_mask(a, keep)
    return F.linear(hidden, w_down)


def _prefill(x, gate_up, down, ids, gates, act, keep=None) -> torch.Tensor:
    """Shared experts on all of x; the other pairs sorted by expert, two matmuls per expert,
    scatter-added back in fp32."""
    T, K = ids.shape
    E, D, _ = down.shape
    flat = ids.reshape(-1)  # [T*K]
    counts = torch.bincount(flat, minlength=E).tolist()  # [E], one host sync (fine on a CPU)
    gu, dn = _expert_views(gate_up), _expert_views(down)
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)

    # Experts that every token chose (the shared ones) run on x as it is, with no gather and no
    # scatter. SmolLM2-135M, T=512, 1 thread: S3A3E8 39.7 -> 31.8 ms, S2A2E16 21.0 -> 18.5 ms.
    full = [e for e, n in enumerate(counts) if n == T]
    for e in full:
        g = gates[ids == e].float().unsqueeze(-1)  # [T, 1]: each row holds e once
        y.add_(_expert(x, gu[e], dn[e], act, keep and keep[e]).float() * g)
    if len(full) == K:
        return y.to(x.dtype)

    # The other pairs, grouped by expert (stable: token order within an expert).
    if full:
        pairs = torch.isin(flat, flat.new_tensor(full)).logical_not_().nonzero().squeeze(1)
        order = pairs[torch.argsort(flat[pairs], stable=True)]  # [P]
    else:
        order = torch.argsort(flat, stable=True)  # [T*K]
    token = order // K  # [P] token of each sorted pair
    xs = x.index_select(0, token)  # [P, D] tokens in expert order
    outs, start = [], 0
    for e, n in enumerate(counts):  # a loop over experts, never over tokens
        if n == 0 or n == T:
            continue
        outs.append(_expert(xs[start : start + n], gu[e], dn[e], act, keep and keep[e]))
        start += n
    out = torch.cat(outs).float() * gates.reshape(-1)[order].float().unsqueeze(-1)  # [P, D]
    return y.index_add_(0, token, out).to(x.dtype)  # [T, D]


def carved_ffn_torch(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    activation: str = "silu",
    path: TorchPath = "auto",
    neuron_keep=None,
    down_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The carved FFN with PyTorch ops; same contract as `cmoe_kernels.carved_ffn`.

    `path` forces a strategy ("decode" or "prefill", both correct for any T); "auto" takes
    decode up to DECODE_MAX_TOKENS tokens and prefill above.
    """
    T, D, E, m, _ = check_inputs(x, gate_up, down, ids, gates)
    act = torch_activation(activation)
    keep = expert_keep(neuron_keep, E, m)
    if T == 0:
        return x.new_zeros(0, D)
    if path == "auto":
        path = "decode" if T <= DECODE_MAX_TOKENS else "prefill"
    if path == "decode":
        if keep is not None:
            return _decode_kept(x, gate_up, down, ids, gates, act, keep, down_rows)
        return _decode(x, gate_up, down, ids, gates, act)
    if path == "prefill":
        return _prefill(x, gate_up, down, ids, gates, act, keep)
    raise ValueError(f"path={path!r} is not one of 'auto', 'decode', 'prefill'")
