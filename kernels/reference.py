"""Two slow implementations of the carved FFN: the test oracle and the benchmark baseline.

Neither is meant for real use. `carved_ffn_reference` is deliberately dumb (one token and one
expert at a time) so that it is obviously right; `per_expert_loop` is the loop of the official
CMoE code, kept as the baseline the fast paths are measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_inputs, expert_keep, torch_activation


def carved_ffn_reference(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    activation: str = "silu",
    neuron_keep=None,
) -> torch.Tensor:
    """y[t] = sum_k gates[t, k] * down[e] @ (act(W_gate[e] x_t) * (W_up[e] x_t)), e = ids[t, k].

    With `neuron_keep` (MoNE), only the neuron_keep[e] neurons of largest |act(W_gate[e] x_t)|
    contribute; the others count as zero.

    A Python loop over tokens and over their experts. Matmuls run in x.dtype, the sum over experts
    in fp32, like the fast paths. Differentiable, so tests compare gradients against it too.
    """
    T, D, E, m, K = check_inputs(x, gate_up, down, ids, gates)
    act = torch_activation(activation)
    keep = expert_keep(neuron_keep, E, m)
    rows = []
    for t in range(T):
        acc = torch.zeros(D, dtype=torch.float32, device=x.device)
        for k in range(K):
            e = int(ids[t, k])
            w_gate, w_up = gate_up[e, :m], gate_up[e, m:]  # [m, D] each
            a = act(w_gate @ x[t])  # [m]
            h = a * (w_up @ x[t])
            if keep is not None and keep[e] < m:
                kept = torch.topk(a.detach().abs(), keep[e]).indices
                h = torch.zeros_like(h).index_copy(0, kept, h[kept])
            acc = acc + gates[t, k].float() * (down[e] @ h).float()  # [D]
        rows.append(acc)
    return torch.stack(rows).to(x.dtype)


def per_expert_loop(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The official CMoE code's combine: every expert scans the routing table for its tokens.

    `for e in experts: idx = where(ids == e); y[idx] += gate * expert(x[idx])`. It visits all E
    experts even when a token uses K of them, and each `where` is a full pass over ids.
    """
    T, D, E, m, _ = check_inputs(x, gate_up, down, ids, gates)
    act = torch_activation(activation)
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    for e in range(E):
        tok, slot = torch.where(ids == e)  # [n], [n]
        if tok.numel() == 0:
            continue
        h = F.linear(x[tok], gate_up[e])  # [n, 2m]
        out = F.linear(act(h[:, :m]) * h[:, m:], down[e])  # [n, D]
        y = y.index_add(0, tok, gates[tok, slot, None].float() * out.float())
    return y.to(x.dtype)
