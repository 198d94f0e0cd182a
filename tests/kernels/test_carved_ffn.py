"""The PyTorch path of the carved FFN against the per-token reference, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cmoe_kernels import carved_ffn_reference, carved_ffn_torch, per_expert_loop

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
