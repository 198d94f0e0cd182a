"""The carved FFN in Triton: a gather-GEMV for decode, two grouped GEMMs for prefill.

Layered like ScatterMoE, each level using only the one below it:
  @triton.jit kernels -> launchers (torch.library custom ops, so torch.compile can trace
  through them) -> CarvedFFNFunction (autograd) -> carved_ffn_triton (the functional op).

Imported lazily by `cmoe_kernels.carved_ffn`, never at package import: triton may be absent, and
`triton.jit` decides at decoration time whether to compile or interpret, so TRITON_INTERPRET=1
must be set before this module is first imported.

Backward: not written in Triton yet. CarvedFFNFunction.backward recomputes the forward with the
PyTorch path (`carved_ffn_torch`) under autograd and differentiates that, so gradients are exact
but fine-tuning pays one extra PyTorch forward and a PyTorch backward on GPUs.

Block sizes are not tuned: this task had no GPU. The GPU defaults below are the usual starting
point for fp16/bf16 tensor-core GEMMs (64x64 tiles, 32-wide K steps); the benchmark script's
sweep is where to tune them and DECODE_MAX_TOKENS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_inputs, expert_keep, torch_activation
from .torch_path import carved_ffn_torch, neuron_rows

# Decode (gather-GEMV) up to this many tokens, prefill (grouped GEMM) above. Untuned (no GPU
# here): the GEMV re-reads an expert's weights for every token that chose it, the grouped GEMM
# reads them once per BLOCK_T tokens, so the GEMV only pays while tokens are very few.
DECODE_MAX_TOKENS = 4

_ACTIVATION_IDS = {"silu": 0, "gelu_tanh": 1}


# Whether the kernels below are interpreted: triton.jit reads TRITON_INTERPRET when it decorates
# them, i.e. now, so later changes of the variable do not matter.
_INTERPRETED = bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _activation(h, ACTIVATION: tl.constexpr):
    """SiLU (0) or GELU-tanh (1) of an fp32 block."""
    if ACTIVATION == 0:
        return h / (1.0 + tl.exp(-h))  # h * sigmoid(h)
    else:
        # 0.5 * h * (1 + tanh(z)) == h * sigmoid(2 z), z = sqrt(2/pi) * (h + 0.044715 h^3);
        # written with exp because tanh is not in triton.language.
        z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return h / (1.0 + tl.exp(-2.0 * z))


@triton.jit
def _decode_gate_up_kernel(
    x_ptr,
    gate_up_ptr,
    ids_ptr,
    gates_ptr,
    h_ptr,
    D,
    m,
    K,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """h[p, i] = gate_p * act(W_gate[e_p, i] . x_t) * (W_up[e_p, i] . x_t) for one (pair, block of
    BLOCK_M neurons): reads only the rows of the expert this pair chose.

    x [T, D], gate_up [E, 2m, D], ids and gates [T, K], h [T*K, m] fp32; p = t * K + k.
    """
    pair = tl.program_id(0).to(tl.int64)  # p = t * K + k
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    token = pair // K
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    gate = tl.load(gates_ptr + pair).to(tl.float32)
    w_gate = gate_up_ptr + expert * 2 * m * D + offs_m[:, None] * D  # [BLOCK_M, 1] row starts
    w_up = w_gate + m * D
    acc_gate = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xv = tl.load(x_ptr + token * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        mask = mask_m[:, None] & mask_d[None, :]
        wg = tl.load(w_gate + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        wu = tl.load(w_up + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_gate += tl.sum(wg * xv[None, :], axis=1)
        acc_up += tl.sum(wu * xv[None, :], axis=1)
    h = _activation(acc_gate, ACTIVATION) * acc_up * gate
    tl.store(h_ptr + pair * m + offs_m, h, mask=mask_m)


@triton.jit
def _decode_down_kernel(
    h_ptr,
    down_ptr,
    ids_ptr,
    y_ptr,
    D,
    m,
    K,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """y[t, block of D] = sum_k down[e_k] @ h[t, k]: the K experts' sum in fp32 registers, in a
    fixed order (deterministic, no atomics).

    h [T*K, m] fp32 (gated), down [E, D, m], ids [T, K], y [T, D].
    """
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(K):
        pair = token * K + k
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        w = down_ptr + expert * D * m + offs_d[:, None] * m  # [BLOCK_D, 1] row starts
        for m0 in range(0, m, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < m
            hv = tl.load(h_ptr + pair * m + offs_m, mask=mask_m, other=0.0)
            wv = tl.load(w + offs_m[None, :], mask=mask_d[:, None] & mask_m[None, :], other=0.0)
            acc += tl.sum(wv.to(tl.float32) * hv[None, :], axis=1)
    tl.store(y_ptr + token * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _rows_dot_x(rows, x_row, row_mask, D, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 dot products of BLOCK_ROWS weight rows (row starts `rows` [BLOCK_ROWS, 1], masked
    by `row_mask`) with the token x_row [D]: the GEMV of the MoNE decode kernels."""
    acc = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xv = tl.load(x_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(rows + offs_d[None, :], mask=row_mask[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
    return acc


@triton.jit
def _decode_gate_kernel(
    x_ptr,
    gate_up_ptr,
    ids_ptr,
    a_ptr,
    D,
    m,
    K,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """MoNE, step 1: a[p, i] = act(W_gate[e_p, i] . x_t), the gate rows only, for one (pair,
    block of BLOCK_M neurons). x [T, D], gate_up [E, 2m, D], ids [T, K], a [T*K, m] fp32."""
    pair = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    token = pair // K
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    w_gate = gate_up_ptr + expert * 2 * m * D + offs_m[:, None] * D
    acc = _rows_dot_x(w_gate, x_ptr + token * D, mask_m, D, BLOCK_M, BLOCK_D)
    tl.store(a_ptr + pair * m + offs_m, _activation(acc, ACTIVATION), mask=mask_m)


@triton.jit
def _decode_up_kept_kernel(
    x_ptr,
    gate_up_ptr,
    ids_ptr,
    gates_ptr,
    a_ptr,
    kept_ptr,
    count_ptr,
    h_ptr,
    D,
    m,
    K,
    KMAX,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """MoNE, step 2: h[p, j] = gate_p * a[p, n_j] * (W_up[e_p, n_j] . x_t) for the kept neurons
    n_j = kept[p, j], j < count[p]: reads only those rows of W_up.

    kept [T*K, KMAX] int64 neuron ids, count [T*K] int32, h [T*K, KMAX] fp32 (0 past count).
    """
    pair = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    valid = offs_j < tl.load(count_ptr + pair)
    token = pair // K
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    gate = tl.load(gates_ptr + pair).to(tl.float32)
    neuron = tl.load(kept_ptr + pair * KMAX + offs_j, mask=valid, other=0)
    w_up = gate_up_ptr + expert * 2 * m * D + (m + neuron[:, None]) * D
    acc = _rows_dot_x(w_up, x_ptr + token * D, valid, D, BLOCK_J, BLOCK_D)
    a = tl.load(a_ptr + pair * m + neuron, mask=valid, other=0.0)
    tl.store(h_ptr + pair * KMAX + offs_j, tl.where(valid, a * acc * gate, 0.0), mask=offs_j < KMAX)


@triton.jit
def _decode_down_kept_kernel(
    h_ptr,
    rows_ptr,
    ids_ptr,
    kept_ptr,
    count_ptr,
    y_ptr,
    D,
    m,
    K,
    KMAX,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """MoNE, step 3: y[t, block of D] = sum_k sum_j h[p, j] * W_down[e_p][block, n_j], read from
    the down halves of the kept neurons' rows of rows [E, m, 2D]; a fixed summation order."""
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(K):
        pair = token * K + k
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        count = tl.load(count_ptr + pair)
        for j0 in range(0, KMAX, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            valid = offs_j < count
            neuron = tl.load(kept_ptr + pair * KMAX + offs_j, mask=valid, other=0)
            hv = tl.load(h_ptr + pair * KMAX + offs_j, mask=valid, other=0.0)
            w = rows_ptr + (expert * m + neuron[:, None]) * 2 * D + D + offs_d[None, :]
            wv = tl.load(w, mask=valid[:, None] & mask_d[None, :], other=0.0)
            acc += tl.sum(wv.to(tl.float32) * hv[:, None], axis=0)
    tl.store(y_ptr + token * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _block_rows(expert, block_first_ptr, expert_start_ptr, BLOCK_T: tl.constexpr):
    """The sorted rows of this program's block of pairs, all routed to `expert` (see _route)."""
    first = tl.load(block_first_ptr + expert)
    row0 = tl.load(expert_start_ptr + expert) + (tl.program_id(0) - first) * BLOCK_T
    rows = row0 + tl.arange(0, BLOCK_T)
    return rows, rows < tl.load(expert_start_ptr + expert + 1)


@triton.jit
def _prefill_gate_up_kernel(
    x_ptr,
    gate_up_ptr,
    order_ptr,
    h_ptr,
    block_expert_ptr,
    block_first_ptr,
    expert_start_ptr,
    D,
    m,
    K,
    E,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grouped GEMM: for a block of pairs routed to one expert, gather their tokens' rows of x and
    compute act(x W_gate^T) * (x W_up^T) for BLOCK_N neurons; the activation is the epilogue.

    x [T, D], gate_up [E, 2m, D], order [T*K] (pairs sorted by expert), h [T*K, m] in sorted order.
    """
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= E:  # a spare block of the shape-sized grid (see _route): nothing to do
        return
    rows, mask_t = _block_rows(expert, block_first_ptr, expert_start_ptr, BLOCK_T)
    pair = tl.load(order_ptr + rows, mask=mask_t, other=0)
    token = pair // K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < m
    w_gate = gate_up_ptr + expert * 2 * m * D + offs_n[None, :] * D  # [1, BLOCK_N]
    w_up = w_gate + m * D
    acc_gate = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        offs_k = d0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        xb = tl.load(
            x_ptr + token[:, None] * D + offs_k[None, :],
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_T, BLOCK_K]
        mask_w = mask_k[:, None] & mask_n[None, :]
        wg = tl.load(w_gate + offs_k[:, None], mask=mask_w, other=0.0)  # [BLOCK_K, BLOCK_N]
        wu = tl.load(w_up + offs_k[:, None], mask=mask_w, other=0.0)
        acc_gate = tl.dot(xb, wg, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(xb, wu, acc_up, input_precision=DOT_PRECISION)
    h = _activation(acc_gate, ACTIVATION) * acc_up
    tl.store(
        h_ptr + rows[:, None] * m + offs_n[None, :],
        h.to(h_ptr.dtype.element_ty),
        mask=mask_t[:, None] & mask_n[None, :],
    )


@triton.jit
def _prefill_down_kernel(
    h_ptr,
    down_ptr,
    order_ptr,
    gates_ptr,
    out_ptr,
    block_expert_ptr,
    block_first_ptr,
    expert_start_ptr,
    D,
    m,
    E,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grouped GEMM: out[pair] = gate_pair * down[e] @ h[pair] for a block of sorted pairs and
    BLOCK_N outputs, written back at the pair's own (unsorted) row: each row has one writer.

    h [T*K, m] in sorted order, down [E, D, m], gates [T*K], out [T*K, D] fp32 in pair order.
    """
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= E:  # a spare block of the shape-sized grid (see _route): nothing to do
        return
    rows, mask_t = _block_rows(expert, block_first_ptr, expert_start_ptr, BLOCK_T)
    pair = tl.load(order_ptr + rows, mask=mask_t, other=0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    w = down_ptr + expert * D * m + offs_n[None, :] * m  # [1, BLOCK_N]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, m, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < m
        hb = tl.load(
            h_ptr + rows[:, None] * m + offs_k[None, :],
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_T, BLOCK_K]
        wb = tl.load(w + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(hb, wb, acc, input_precision=DOT_PRECISION)
    gate = tl.load(gates_ptr + pair, mask=mask_t, other=0.0).to(tl.float32)
    acc = acc * gate[:, None]
    tl.store(
        out_ptr + pair[:, None] * D + offs_n[None, :], acc, mask=mask_t[:, None] & mask_n[None, :]
    )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _route(ids: torch.Tensor, E: int, block_t: int):
    """Routing metadata, computed once on the device (no host sync) and used by both GEMMs.

    The (token, slot) pairs are sorted by expert; expert e owns sorted rows
    expert_start[e]:expert_start[e+1] and row blocks block_first[e]:block_first[e]+blocks[e].
    The grid needs a host-side size, so it takes the bound cdiv(T*K, BLOCK_T) + E (each expert
    wastes at most one partial block); block_expert maps every block of that grid to its expert,
    E for the spare ones.
    """
    flat = ids.reshape(-1).long()  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K] pair indices grouped by expert
    counts = torch.zeros(E, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync on CUDA
    expert_start = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=expert_start[1:])  # [E+1]
    blocks = (counts + block_t - 1) // block_t  # [E]
    block_end = torch.cumsum(blocks, 0)  # [E]
    n_blocks = triton.cdiv(flat.numel(), block_t) + E
    block_ids = torch.arange(n_blocks, device=ids.device)
    block_expert = torch.searchsorted(block_end, block_ids, right=True)  # [n_blocks]
    return order, block_expert, block_end - blocks, expert_start, n_blocks


@torch.library.custom_op("cmoe_kernels::carved_ffn_decode", mutates_args=())
def carved_ffn_decode(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Launch the gather-GEMV pair: gate/up GEMV with the activation fused, then down in fp32."""
    T, D = x.shape
    m, K = down.shape[2], ids.shape[1]
    h = torch.empty(T * K, m, dtype=torch.float32, device=x.device)  # gated, fp32
    y = torch.empty(T, D, dtype=x.dtype, device=x.device)
    block_m, block_d = (16, 32) if _INTERPRETED else (16, 256)
    _decode_gate_up_kernel[(T * K, triton.cdiv(m, block_m))](
        x,
        gate_up,
        ids,
        gates,
        h,
        D,
        m,
        K,
        ACTIVATION=_ACTIVATION_IDS[activation],
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    block_d, block_m = (32, 16) if _INTERPRETED else (32, 128)
    _decode_down_kernel[(T, triton.cdiv(D, block_d))](
        h,
        down,
        ids,
        y,
        D,
        m,
        K,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
    )
    return y


@torch.library.custom_op("cmoe_kernels::carved_ffn_prefill", mutates_args=())
def carved_ffn_prefill(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """Launch the two grouped GEMMs, then sum each token's K gated rows in fp32, in slot order."""
    T, D = x.shape
    E, m, K = down.shape[0], down.shape[2], ids.shape[1]
    # tl.dot needs every block dimension >= 16; the interpreter is fastest with the smallest.
    block_t, block_n, block_k = (16, 16, 16) if _INTERPRETED else (64, 64, 32)
    order, block_expert, block_first, expert_start, n_blocks = _route(ids, E, block_t)
    # fp32 inputs use TF32 tensor cores only where PyTorch allows them for its own matmuls (off by
    # default), so that the fp32 kernel is as exact as the fp32 PyTorch path. ("tf32" is
    # Triton's default and means nothing for fp16/bf16 inputs.)
    fp32_exact = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if fp32_exact else "tf32"
    h = torch.empty(T * K, m, dtype=x.dtype, device=x.device)  # sorted pair order
    out = torch.empty(T * K, D, dtype=torch.float32, device=x.device)  # unsorted pair order
    _prefill_gate_up_kernel[(n_blocks, triton.cdiv(m, block_n))](
        x,
        gate_up,
        order,
        h,
        block_expert,
        block_first,
        expert_start,
        D,
        m,
        K,
        E,
        ACTIVATION=_ACTIVATION_IDS[activation],
        DOT_PRECISION=precision,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    _prefill_down_kernel[(n_blocks, triton.cdiv(D, block_n))](
        h,
        down,
        order,
        gates.reshape(-1),
        out,
        block_expert,
        block_first,
        expert_start,
        D,
        m,
        E,
        DOT_PRECISION=precision,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out.view(T, K, D).sum(1).to(x.dtype)  # fixed-order sum: deterministic


@torch.library.custom_op("cmoe_kernels::carved_ffn_decode_kept", mutates_args=())
def carved_ffn_decode_kept(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows_2d: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    keep: torch.Tensor,
    kmax: int,
    activation: str,
) -> torch.Tensor:
    """MoNE decode: gate GEMV, top-k of |act| per (token, expert) in PyTorch, then the up and
    down GEMVs on the kept rows only. keep [E] int32 neurons kept per expert, kmax its maximum
    (passed from the host, so that no device value is read back)."""
    T, D = x.shape
    m, K = rows_2d.shape[1], ids.shape[1]
    a = torch.empty(T * K, m, dtype=torch.float32, device=x.device)
    block_m, block_d = (16, 32) if _INTERPRETED else (16, 256)
    _decode_gate_kernel[(T * K, triton.cdiv(m, block_m))](
        x, gate_up, ids, a, D, m, K,
        ACTIVATION=_ACTIVATION_IDS[activation], BLOCK_M=block_m, BLOCK_D=block_d,
    )
    count = keep[ids.reshape(-1).long()].to(torch.int32).contiguous()  # [T*K]
    kept = torch.topk(a.abs(), kmax, dim=-1).indices.contiguous()  # sorted: first count[p] kept
    h = torch.empty(T * K, kmax, dtype=torch.float32, device=x.device)
    block_j = 16
    _decode_up_kept_kernel[(T * K, triton.cdiv(kmax, block_j))](
        x, gate_up, ids, gates, a, kept, count, h, D, m, K, kmax,
        BLOCK_J=block_j, BLOCK_D=block_d,
    )
    y = torch.empty(T, D, dtype=x.dtype, device=x.device)
    block_d2 = 32 if _INTERPRETED else 128
    _decode_down_kept_kernel[(T, triton.cdiv(D, block_d2))](
        h, rows_2d, ids, kept, count, y, D, m, K, kmax, BLOCK_D=block_d2, BLOCK_J=block_j,
    )
    return y


@carved_ffn_decode.register_fake
@carved_ffn_prefill.register_fake
def _(x, gate_up, down, ids, gates, activation):
    return x.new_empty(x.shape)


@carved_ffn_decode_kept.register_fake
def _(x, gate_up, rows_2d, ids, gates, keep, kmax, activation):
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------
# Autograd and the functional op
# ---------------------------------------------------------------------------------------------


class CarvedFFNFunction(torch.autograd.Function):
    """Triton forward; backward by recomputing with the PyTorch path (documented fallback)."""

    @staticmethod
    def forward(ctx, x, gate_up, down, ids, gates, activation, path, keep=None, rows_2d=None):
        ctx.save_for_backward(x, gate_up, down, ids, gates)
        ctx.activation, ctx.keep = activation, keep
        if keep is None:
            launch = carved_ffn_decode if path == "decode" else carved_ffn_prefill
            return launch(x, gate_up, down, ids, gates, activation)
        if path == "decode":
            if rows_2d is None:
                rows_2d = neuron_rows(gate_up, down)
            counts = torch.tensor(keep, dtype=torch.int32, device=x.device)
            return carved_ffn_decode_kept(
                x, gate_up, rows_2d, ids, gates, counts, max(keep), activation
            )
        # MoNE at prefill: tokens keep different neurons, so a grouped GEMM computes them all
        # anyway; the PyTorch path's masked grouped matmuls do exactly that.
        return carved_ffn_torch(x, gate_up, down, ids, gates, activation, "prefill", keep)

    @staticmethod
    def backward(ctx, grad_y):
        x, gate_up, down, ids, gates = ctx.saved_tensors
        need = ctx.needs_input_grad  # (x, gate_up, down, ids, gates, activation, path)
        leaves = [t.detach().requires_grad_(n) for t, n in zip((x, gate_up, down), need[:3])]
        gates_leaf = gates.detach().requires_grad_(need[4])
        wanted = [t for t in (*leaves, gates_leaf) if t.requires_grad]
        with torch.enable_grad():
            y = carved_ffn_torch(
                *leaves, ids, gates_leaf, ctx.activation, "prefill", neuron_keep=ctx.keep
            )
        grads = iter(torch.autograd.grad(y, wanted, grad_y))
        gx, ggu, gdn, gg = (next(grads) if t.requires_grad else None for t in (*leaves, gates_leaf))
        return gx, ggu, gdn, None, gg, None, None, None, None


def carved_ffn_triton(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    activation: str = "silu",
    path: str = "auto",
    neuron_keep=None,
    rows_2d: torch.Tensor | None = None,
) -> torch.Tensor:
    """The carved FFN with the Triton kernels; same contract as `cmoe_kernels.carved_ffn`.

    `path` forces "decode" (gather-GEMV) or "prefill" (grouped GEMM); "auto" takes decode up to
    DECODE_MAX_TOKENS tokens. With `neuron_keep` (MoNE), decode runs the kept-rows kernels
    (reading the down halves of `rows_2d`, see `neuron_rows`) and prefill the PyTorch
    path's masked grouped matmuls.
    """
    T, D, E, m, _ = check_inputs(x, gate_up, down, ids, gates)
    keep = expert_keep(neuron_keep, E, m)
    torch_activation(activation)  # ValueError naming the choices for an unknown activation
    if path == "auto":
        path = "decode" if T <= DECODE_MAX_TOKENS else "prefill"
    if path not in ("decode", "prefill"):
        raise ValueError(f"path={path!r} is not one of 'auto', 'decode', 'prefill'")
    if T == 0:
        return x.new_zeros(0, D)
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    ids, gates = ids.contiguous(), gates.contiguous()
    if keep is None:
        return CarvedFFNFunction.apply(x, gate_up, down, ids, gates, activation, path)
    if rows_2d is not None and tuple(rows_2d.shape) != (E, m, 2 * D):
        raise ValueError(f"rows_2d must be [E, m, 2D] = {(E, m, 2 * D)}, got {tuple(rows_2d.shape)}")
    rows = None if rows_2d is None else rows_2d.contiguous()
    return CarvedFFNFunction.apply(x, gate_up, down, ids, gates, activation, path, keep, rows)
