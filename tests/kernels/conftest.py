"""Helpers shared by the kernel tests: random carved-FFN inputs and a dtype-aware comparison.

Handed to tests through the `ffn` fixture rather than imported, so that they work under any
pytest import mode and whatever other conftest.py files the test tree grows.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch


def case(id: str, T: int, D: int, E: int, m: int, K: int, idle_expert: bool = False):
    """A test shape: T tokens, width D, E experts of m neurons, K per token."""
    return SimpleNamespace(id=id, T=T, D=D, E=E, m=m, K=K, idle_expert=idle_expert)


# The shapes every kernel test runs on (a test asks for them by taking a `case` argument). Tiny,
# so that the Triton interpreter stays fast; each names the edge it covers. Block sizes under the
# interpreter are 16 (rows, neurons, reduction), 32 for the decode GEMV's D blocks.
CASES = [
    # T=1: single-token decode, the memory-bound case the decode paths exist for.
    case("T1", T=1, D=64, E=4, m=16, K=2),
    # T=3 smaller than a 16-row block; D=37 and m=19 divide no block size (masked tails).
    case("odd-sizes", T=3, D=37, E=6, m=19, K=3),
    # Expert E-1 receives no token: empty groups in the sort and in the grouped GEMM grid.
    case("idle-expert", T=9, D=32, E=8, m=16, K=2, idle_expert=True),
    # K = E: every token uses every expert (the carved FFN is then the dense FFN).
    case("K-equals-E", T=5, D=24, E=4, m=8, K=4),
    # T*K = 60 pairs, about 20 per expert: each expert spans two 16-row blocks, one partial.
    case("multi-block", T=30, D=40, E=3, m=24, K=2),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=[c.id for c in CASES])


def make_inputs(
    case: SimpleNamespace,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    gates_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[torch.Tensor]:
    """[x, gate_up, down, ids, gates] of one carved FFN call, scaled so that outputs are O(1).

    With case.idle_expert, ids are drawn from experts 0..E-2 only: expert E-1 gets no token.
    """
    T, D, E, m, K = case.T, case.D, case.E, case.m, case.K
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    gate_up = torch.randn(E, 2 * m, D, generator=g) / D**0.5
    down = torch.randn(E, D, m, generator=g) / m**0.5
    pool = E - 1 if case.idle_expert else E
    ids = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(T)])  # [T, K]
    gates = 0.5 + torch.rand(T, K, generator=g)
    return [
        x.to(device, dtype),
        gate_up.to(device, dtype),
        down.to(device, dtype),
        ids.to(device),
        gates.to(device, gates_dtype),
    ]


def outputs_and_grads(fn: Callable, inputs: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """[y, dx, dgate_up, ddown, dgates] of fn(*inputs) against a fixed random output gradient."""
    x, gate_up, down, ids, gates = (t.detach().clone() for t in inputs)
    leaves = [x, gate_up, down, gates]
    for t in leaves:
        t.requires_grad_(True)
    y = fn(x, gate_up, down, ids, gates, **kwargs)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return [y.detach(), *grads]


def assert_close_to_truth(
    out: torch.Tensor,
    truth: torch.Tensor,
    baseline: torch.Tensor,
    name: str = "output",
    dtype: torch.dtype | None = None,
) -> None:
    """flash-attention's rule: out's error against the fp32 truth is at most twice the error of a
    same-dtype PyTorch baseline (plus one rounding unit of the output's scale); fp32 is tight.

    dtype: the precision the computation ran in (default out.dtype; gradients of fp32 gates
    computed from fp16 activations are fp32 tensors of fp16 accuracy).
    """
    dtype = dtype or out.dtype
    truth = truth.float()
    if dtype == torch.float32:
        torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        return
    err = (out.float() - truth).abs().max().item()
    base = (baseline.float() - truth).abs().max().item()
    floor = torch.finfo(dtype).eps * truth.abs().max().item()
    assert err <= 2 * base + floor, (
        f"{name}: error {err:.3g} > 2 x baseline {base:.3g} + {floor:.3g}"
    )


@pytest.fixture(scope="session")
def ffn() -> SimpleNamespace:
    """CASES, case, make_inputs, outputs_and_grads and assert_close_to_truth."""
    return SimpleNamespace(
        CASES=CASES,
        case=case,
        make_inputs=make_inputs,
        outputs_and_grads=outputs_and_grads,
        assert_close_to_truth=assert_close_to_truth,
    )


@pytest.fixture
def cmoe_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A monkeypatch with CMOE_KERNEL and TRITON_INTERPRET cleared, for dispatch tests."""
    monkeypatch.delenv("CMOE_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch
