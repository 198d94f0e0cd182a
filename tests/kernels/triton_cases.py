"""The Triton kernels against the per-token reference; run by test_carved_ffn_triton.py.

Not collected directly (the name does not start with test_): the driver runs this file in a
child pytest process, under TRITON_INTERPRET=1 on CPU tensors where there is no GPU, on CUDA
tensors where there is one.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from cmoe_kernels import (
    carved_ffn,
    carved_ffn_reference,
    carved_ffn_triton,
    kernel_backend,
    neuron_rows,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# bf16 is wrong in the interpreter (numpy has no bfloat16); it is tested on real GPUs only.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def skip_long_decode(case, path: str) -> None:
    # The GEMV decode path serves a few tokens (auto: T <= 4); at T=30 the interpreter takes
    # seconds per call, and the prefill path covers that case.
    if path == "decode" and case.T > 10:
        pytest.skip("decode path at T > 10: covered by prefill, slow in the interpreter")


def on_cpu_fp32(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.cpu().float() if t.is_floating_point() else t.cpu() for t in inputs]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_forward(ffn, case, path, dtype):
    skip_long_decode(case, path)
    inputs = ffn.make_inputs(case, dtype=dtype, device=DEVICE)
    out = carved_ffn_triton(*inputs, path=path)
    assert out.dtype == dtype and out.shape == (case.T, case.D)
    truth = carved_ffn_reference(*on_cpu_fp32(inputs))  # same rounded weights, fp32 math
    baseline = carved_ffn_reference(*[t.cpu() for t in inputs])
    ffn.assert_close_to_truth(out.cpu(), truth, baseline)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_gelu_tanh(ffn, path):
    # Gemma's activation, on odd sizes so that masked lanes go through the epilogue too.
    inputs = ffn.make_inputs(ffn.case("gelu", T=3, D=37, E=6, m=19, K=3), device=DEVICE)
    out = carved_ffn_triton(*inputs, activation="gelu_tanh", path=path)
    truth = carved_ffn_reference(*[t.cpu() for t in inputs], activation="gelu_tanh")
    torch.testing.assert_close(out.cpu(), truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_gradients(ffn, case, path):
    # The backward is the documented PyTorch fallback; this checks its plumbing (which inputs
    # get gradients, dtypes, shapes) through CarvedFFNFunction. fp16 in test_gradients_fp16.
    skip_long_decode(case, path)
    check_gradients(ffn, case, path, torch.float32)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_gradients_fp16(ffn, path):
    check_gradients(ffn, ffn.CASES[1], path, torch.float16)


def check_gradients(ffn, case, path, dtype):
    inputs = ffn.make_inputs(case, dtype=dtype, device=DEVICE)
    got = ffn.outputs_and_grads(carved_ffn_triton, inputs, path=path)
    truth = ffn.outputs_and_grads(carved_ffn_reference, on_cpu_fp32(inputs))
    baseline = ffn.outputs_and_grads(carved_ffn_reference, [t.cpu() for t in inputs])
    for name, g, t, b in zip(["y", "dx", "dgate_up", "ddown", "dgates"], got, truth, baseline):
        ffn.assert_close_to_truth(g.cpu(), t, b, name=name, dtype=dtype)


def test_prefill_is_deterministic(ffn):
    inputs = ffn.make_inputs(ffn.CASES[-1], device=DEVICE)
    first = carved_ffn_triton(*inputs, path="prefill")
    assert torch.equal(first, carved_ffn_triton(*inputs, path="prefill"))


def test_dispatch_picks_triton(ffn, monkeypatch):
    monkeypatch.delenv("CMOE_KERNEL", raising=False)
    inputs = ffn.make_inputs(ffn.CASES[0], device=DEVICE)
    assert kernel_backend(inputs[0]) == "triton"
    assert torch.equal(carved_ffn(*inputs), carved_ffn_triton(*inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_neuron_keep(ffn, case, path, dtype):
    # MoNE: expert 0 keeps every neuron (as a shared expert may), the others about half.
    skip_long_decode(case, path)
    inputs = ffn.make_inputs(case, dtype=dtype, device=DEVICE)
    keep = [case.m] + [max(1, case.m // 2)] * (case.E - 1)
    rows = neuron_rows(inputs[1], inputs[2])
    for rows_2d in (None, rows):
        out = carved_ffn_triton(*inputs, path=path, neuron_keep=keep, rows_2d=rows_2d)
        assert out.dtype == dtype and out.shape == (case.T, case.D)
        truth = carved_ffn_reference(*on_cpu_fp32(inputs), neuron_keep=keep)
        baseline = carved_ffn_reference(*[t.cpu() for t in inputs], neuron_keep=keep)
        ffn.assert_close_to_truth(out.cpu(), truth, baseline)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_neuron_keep_gradients(ffn, path):
    case = ffn.CASES[1]  # odd sizes
    inputs = ffn.make_inputs(case, device=DEVICE)
    keep = max(1, case.m // 2)
    got = ffn.outputs_and_grads(carved_ffn_triton, inputs, path=path, neuron_keep=keep)
    truth = ffn.outputs_and_grads(carved_ffn_reference, on_cpu_fp32(inputs), neuron_keep=keep)
    for g, t in zip(got, truth):
        torch.testing.assert_close(g.cpu(), t, rtol=1e-4, atol=1e-5)
