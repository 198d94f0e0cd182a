"""The PyTorch path of the carved FFN against the per-token reference, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cmoe_kernels import carved_ffn_reference, carved_ffn_torch, neuron_rows, per_expert_loop

PATHS = ["decode", "prefill", "auto"]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("path", PATHS)
def test_forward_fp32(ffn, case, path, activation):
    inputs = ffn.make_inputs(case)
    out = carved_ffn_torch(*inputs, activation=activation, path=path)
    truth = carved_ffn_reference(*inputs, activation=activation)
    assert out.dtype == torch.float32 and out.shape == (case.T, case.D)
    torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_forward_low_precision(ffn, case, path, dtype):
    inputs = ffn.make_inputs(case, dtype=dtype)
    out = carved_ffn_torch(*inputs, path=path)
    truth = carved_ffn_reference(*ffn.make_inputs(case))
    assert out.dtype == dtype
    ffn.assert_close_to_truth(out, truth, carved_ffn_reference(*inputs))


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=dtype_id)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_gradients(ffn, case, path, dtype):
    inputs = ffn.make_inputs(case, dtype=dtype)
    got = ffn.outputs_and_grads(carved_ffn_torch, inputs, path=path)
    truth = ffn.outputs_and_grads(carved_ffn_reference, ffn.make_inputs(case))
    baseline = ffn.outputs_and_grads(carved_ffn_reference, inputs)
    for name, g, t, b in zip(["y", "dx", "dgate_up", "ddown", "dgates"], got, truth, baseline):
        ffn.assert_close_to_truth(g, t, b, name=name, dtype=dtype)


def test_per_expert_loop_matches_reference(ffn, case):
    inputs = ffn.make_inputs(case)
    torch.testing.assert_close(per_expert_loop(*inputs), carved_ffn_reference(*inputs))


def test_all_experts_on_equal_the_dense_ffn(ffn):
    # Every expert is an exact slice of the dense weights: with all on and gates 1, carved = dense.
    x, gate_up, down, _, _ = ffn.make_inputs(ffn.case("dense", T=7, D=32, E=4, m=8, K=4))
    E, m = gate_up.shape[0], gate_up.shape[1] // 2
    w_gate = gate_up[:, :m].reshape(E * m, -1)  # [E*m, D]
    w_up = gate_up[:, m:].reshape(E * m, -1)
    w_down = down.permute(1, 0, 2).reshape(down.shape[1], E * m)  # [D, E*m]
    dense = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    ids = torch.arange(E).expand(7, E)
    for path in PATHS:
        out = carved_ffn_torch(x, gate_up, down, ids, torch.ones(7, E), path=path)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_gates_in_x_dtype_and_int32_ids(ffn, path):
    case = ffn.case("mixed", T=4, D=16, E=4, m=8, K=2)
    x, gate_up, down, ids, gates = ffn.make_inputs(
        case, dtype=torch.float16, gates_dtype=torch.float16
    )
    out = carved_ffn_torch(x, gate_up, down, ids.int(), gates, path=path)
    expected = carved_ffn_reference(x, gate_up, down, ids, gates)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


def test_no_tokens(ffn):
    _, gate_up, down, _, _ = ffn.make_inputs(ffn.case("empty", T=1, D=16, E=4, m=8, K=2))
    x, ids, gates = torch.zeros(0, 16), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2)
    assert carved_ffn_torch(x, gate_up, down, ids, gates).shape == (0, 16)


def test_bad_inputs_name_the_argument(ffn):
    x, gate_up, down, ids, gates = ffn.make_inputs(ffn.case("bad", T=2, D=16, E=4, m=8, K=2))
    with pytest.raises(ValueError, match="down must be"):
        carved_ffn_torch(x, gate_up, down.transpose(1, 2), ids, gates)
    with pytest.raises(ValueError, match="gates must be"):
        carved_ffn_torch(x, gate_up, down, ids, gates[:, :1])
    with pytest.raises(ValueError, match="activation='relu'"):
        carved_ffn_torch(x, gate_up, down, ids, gates, activation="relu")
    with pytest.raises(ValueError, match="path="):
        carved_ffn_torch(x, gate_up, down, ids, gates, path="fast")


# MoNE: neuron-granular selection inside each chosen expert.


def keep_for(case, shared_full: bool) -> list[int]:
    """Per-expert keep counts: about half of m, or (shared_full) m for expert 0 as a shared one."""
    half = max(1, case.m // 2)
    return [case.m if (shared_full and e == 0) else half for e in range(case.E)]


@pytest.mark.parametrize("shared_full", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_neuron_keep_forward_and_gradients(ffn, case, path, shared_full):
    inputs = ffn.make_inputs(case)
    keep = keep_for(case, shared_full)
    for rows in (None, neuron_rows(inputs[1], inputs[2])):
        out = carved_ffn_torch(*inputs, path=path, neuron_keep=keep, rows_2d=rows)
        truth = carved_ffn_reference(*inputs, neuron_keep=keep)
        torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5)
    # Selection really changes the output (else the test above could not fail).
    assert (truth - carved_ffn_reference(*inputs)).abs().max() > 1e-3
    want = ffn.outputs_and_grads(carved_ffn_reference, inputs, neuron_keep=keep)
    # A detached neuron-major copy handed in must not cut the weights' gradients.
    detached = neuron_rows(inputs[1], inputs[2]).detach()
    for rows in (None, detached):
        got = ffn.outputs_and_grads(
            carved_ffn_torch, inputs, path=path, neuron_keep=keep, rows_2d=rows
        )
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_neuron_keep_of_m_is_no_selection(ffn, case):
    inputs = ffn.make_inputs(case)
    for path in ("decode", "prefill"):
        full = carved_ffn_torch(*inputs, path=path, neuron_keep=case.m)
        assert torch.equal(full, carved_ffn_torch(*inputs, path=path))


def test_neuron_keep_one_keeps_the_largest_gate(ffn):
    # One expert, one token, keep 1: y = down[:, j] * act(g_j) * u_j for j = argmax |act(g)|.
    case = ffn.case("one", T=1, D=8, E=1, m=6, K=1)
    x, gate_up, down, ids, gates = ffn.make_inputs(case)
    a = F.silu(gate_up[0, :6] @ x[0])
    j = int(a.abs().argmax())
    expected = gates[0, 0] * down[0, :, j] * a[j] * (gate_up[0, 6 + j] @ x[0])
    for path in ("decode", "prefill"):
        out = carved_ffn_torch(x, gate_up, down, ids, gates, path=path, neuron_keep=1)
        torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)


def test_neuron_keep_bad_counts_are_rejected(ffn, case):
    inputs = ffn.make_inputs(case)
    with pytest.raises(ValueError, match="neuron_keep"):
        carved_ffn_torch(*inputs, neuron_keep=case.m + 1)
    with pytest.raises(ValueError, match="one count per expert"):
        carved_ffn_torch(*inputs, neuron_keep=[1, 2])
