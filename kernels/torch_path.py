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
    recorded = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gate_up, down, gates)
    )
    rows = []
    for t, experts in enumerate(ids.tolist()):  # one host sync; T <= DECODE_MAX_TOKENS here
        h = torch.stack([torch.mv(gu[e], x[t]) for e in experts])  # [K, 2m]
        a = act(h[:, :m]) * h[:, m:]  # [K, m]
        if recorded or x.dtype != torch.float32:
            out = torch.stack([torch.mv(dn[e], a[k]) for k, e in enumerate(experts)])  # [K, D]
            rows.append(gates[t].float() @ out.float())  # [D], the K-way sum in fp32
            continue
        # Inference in fp32: accumulate the gated experts in place (addmv with the gate as
        # alpha), a third of the small ops of the stacked form; at one token each op costs
        # microseconds, as much as reading a 96-neuron expert's down rows.
        out = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        for k, (e, g) in enumerate(zip(experts, gates[t].tolist())):
            torch.addmv(out, dn[e], a[k], alpha=g, out=out)
        rows.append(out)
    return torch.stack(rows).to(x.dtype)  # [T, D]


def neuron_rows(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The [E, m, 2D] neuron-major copy MoNE decode reads: row j of expert e holds neuron j's up
    row, then its down column. One gather then fetches both halves of each kept neuron."""
    m = down.shape[-1]
    return torch.cat([gate_up[:, m:], down.transpose(1, 2)], dim=2).contiguous()


def _decode_kept(x, gate_up, down, ids, gates, act, keep, rows_2d) -> torch.Tensor:
    """Decode with MoNE. Experts that keep every neuron run as in `_decode`; for the others the
    gate rows give act(gate x), and only the kept neurons' rows are read: their up and down
    halves from `rows_2d` ([E, m, 2D], see `neuron_rows`; made here when not given, which costs
    a copy of the weights per call). The selecting experts are handled by a fixed number of
    batched ops: at one token each op costs a few microseconds, as much as selection saves.
    """
    E, D, m = down.shape
    gu, dn = _expert_views(gate_up), _expert_views(down)
    if torch.is_grad_enabled() and (gate_up.requires_grad or down.requires_grad):
        rows_2d = None  # a detached copy would cut the weights' gradients: rebuild under autograd
    if rows_2d is None:
        rows_2d = neuron_rows(gate_up, down)
    flat = rows_2d.reshape(E * m, 2 * D)
    out_rows = []
    for t, experts in enumerate(ids.tolist()):  # one host sync; T <= DECODE_MAX_TOKENS here
        xt, gt = x[t], gates[t].float()
        groups: dict[int, list[int]] = {}
        for slot, e in enumerate(experts):
            groups.setdefault(keep[e], []).append(slot)
        parts = []
        for count, slots in groups.items():
            chosen = [experts[k] for k in slots]
            if count == m:  # no selection in these experts (e.g. shared ones kept whole)
                for k, e in zip(slots, chosen):
                    h = torch.mv(gu[e], xt)
                    parts.append(torch.mv(dn[e], act(h[:m]) * h[m:]).float() * gt[k])
                continue
            whole = len(slots) == len(experts)
            a = act(torch.stack([torch.mv(gu[e][:m], xt) for e in chosen]))  # [n, m]
            idx = torch.topk(a.abs(), count, dim=-1, sorted=False).indices  # [n, count]
            chosen_ids = ids[t] if whole else ids[t, slots]
            sel = flat.index_select(0, torch.add(idx, chosen_ids[:, None], alpha=m).view(-1))
            g = (gt if whole else gt[slots]).to(a.dtype)
            h = (a.gather(1, idx) * g[:, None]).view(-1) * (sel[:, :D] @ xt)  # [n * count]
            parts.append((h @ sel[:, D:]).float())
        out_rows.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
    return torch.stack(out_rows).to(x.dtype)


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
    rows_2d: torch.Tensor | None = None,
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
            return _decode_kept(x, gate_up, down, ids, gates, act, keep, rows_2d)
        return _decode(x, gate_up, down, ids, gates, act)
    if path == "prefill":
        return _prefill(x, gate_up, down, ids, gates, act, keep)
    raise ValueError(f"path={path!r} is not one of 'auto', 'decode', 'prefill'")
