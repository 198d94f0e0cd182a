"""The fused CPU decode step (`cmoe_kernels.cpu_decode`): one C++ call per carved layer that
routes, runs the chosen experts and adds the compensation. Checked against the general path
(the module's PyTorch routing + `carved_ffn`), which the rest of the suite checks against the
naive reference; and against the dense FFN when every expert is on.
"""

import copy
import os
import shutil

import pytest
import torch

from cmoe_carve import modeling_cmoe
from cmoe_carve.modeling_cmoe import CarvedMLP
from cmoe_kernels import cpu_decode

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
    reason="no C++ compiler: the fused CPU kernel cannot be built here",
)


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    # The suite may run under TRITON_INTERPRET=1, which sends CPU tensors to Triton.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CMOE_KERNEL", raising=False)


def test_the_kernel_builds_where_there_is_a_compiler():
    assert cpu_decode.load(), "the fused CPU decode kernel failed to build (see the warning)"


def carved_mlp(kind="linear", activation="silu", D=200, m=24, S=2, E=8, k=2, seed=0):
    """A CarvedMLP with O(1) random weights. D=200 spans several of the kernel's 64-wide
    output blocks, so a split over two threads has a seam."""
    torch.manual_seed(seed)
    mlp = CarvedMLP(D, m, S, E, k, activation, router=kind)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, D**-0.5 if p.dim() == 3 else 0.3)
        mlp.router.bias.normal_(0, 0.1)
    return mlp.eval()


def general_path(mlp, x, monkeypatch):
    """The module's output and routing with the fused kernel off."""
    with monkeypatch.context() as patch:
        patch.setenv("CMOE_KERNEL", "torch")
        mlp.record_routing = True
        y = mlp(x)
        return y, mlp.last_routing


def fused_path(mlp, x, monkeypatch):
    calls = []
    real = cpu_decode.run
    monkeypatch.setattr(cpu_decode, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    mlp.record_routing = True
    y = mlp(x)
    assert calls, "the fused kernel did not run"
    return y, mlp.last_routing


LAYERS = [
    # (router, activation, T, top_k, routed keep ratio, shared keep ratio, compensate)
    ("linear", "silu", 1, 2, 1.0, 1.0, True),  # the default carve at one token
    ("representative", "silu", 1, 2, 1.0, 1.0, False),  # CMoE's own router
    ("linear", "gelu_pytorch_tanh", 3, 3, 1.0, 1.0, True),  # Gemma's activation, batched decode
    ("linear", "silu", 1, 0, 1.0, 1.0, True),  # an adaptive budget of 0 routed experts
    ("linear", "silu", 8, 6, 1.0, 1.0, True),  # every routed expert on
    ("linear", "silu", 16, 3, 0.5, 1.0, True),  # the most tokens fused, MoNE by row and masked
    ("linear", "silu", 1, 2, 0.5, 1.0, True),  # MoNE in the routed experts only
    ("representative", "gelu_pytorch_tanh", 4, 2, 0.25, 0.75, True),  # MoNE everywhere, T > 1
    # MoNE where every expert serves several tokens: each is read whole and masked per token
    ("linear", "silu", 8, 6, 0.5, 0.5, False),
]


@pytest.mark.parametrize("layer", LAYERS, ids=[f"{c[0]}-{c[1]}-T{c[2]}-k{c[3]}-keep{c[4]}" for c in LAYERS])
def test_fused_step_equals_the_general_path(layer, monkeypatch):
    kind, activation, T, k, keep, shared_keep, compensate = layer
    mlp = carved_mlp(kind, activation, k=k)
    mlp.neuron_keep, mlp.shared_neuron_keep, mlp.compensate = keep, shared_keep, compensate
    x = torch.randn(1, T, mlp.hidden_size)
    with torch.no_grad():
        want, want_top = general_path(mlp, x, monkeypatch)
        got, got_top = fused_path(mlp, x, monkeypatch)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got_top, want_top)  # the same experts, in the same order
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_every_expert_on_equals_the_dense_ffn(monkeypatch):
    """S + k = E with compensation on: nothing is left out, so the layer is the dense FFN whose
    neurons it holds."""
    mlp = carved_mlp(k=6)
    mlp.compensate = True
    mlp.router.scale.data.zero_()  # u = 0: every gate is 1, as after carving
    E, m = mlp.num_experts, mlp.expert_size
    w_gate = mlp.gate_up_proj[:, :m].reshape(E * m, -1)
    w_up = mlp.gate_up_proj[:, m:].reshape(E * m, -1)
    w_down = mlp.down_proj.permute(1, 0, 2).reshape(mlp.hidden_size, E * m)
    x = torch.randn(2, mlp.hidden_size)
    with torch.no_grad():
        dense = (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
        got, _ = fused_path(mlp, x, monkeypatch)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_two_threads_give_the_one_thread_result(monkeypatch):
    mlp = carved_mlp()
    mlp.neuron_keep = 0.5
    x = torch.randn(3, mlp.hidden_size)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one, _ = fused_path(mlp, x, monkeypatch)
            torch.set_num_threads(2)
            two, _ = fused_path(mlp, x, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6)


def test_training_and_other_dtypes_take_the_general_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel has no backward and runs float32 only")

    monkeypatch.setattr(cpu_decode, "run", refuse)
    mlp = carved_mlp()
    x = torch.randn(1, mlp.hidden_size)
    y = mlp(x)  # grad mode, trainable weights: must stay differentiable
    y.sum().backward()
    assert mlp.gate_up_proj.grad is not None
    mlp.zero_grad()
    mlp.requires_grad_(False)
    xg = x.clone().requires_grad_(True)  # frozen weights, gradients wanted for the input
    mlp(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with torch.no_grad():
        mlp.to(torch.float64)(x.double())  # no float64 kernel
        mlp.to(torch.bfloat16)(x.bfloat16())
    # A baseline swapped in on the instance (cmoe bench's per-expert loop) is honoured.
    mlp = carved_mlp()
    mlp.experts = lambda x, ids, gates: torch.zeros_like(x)
    with torch.no_grad():
        assert torch.equal(mlp(x), torch.zeros_like(x))  # compensation is off by default


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'cmoe_cpu_decode': c++ not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    cpu_decode.load.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not cpu_decode.load()
            mlp = carved_mlp()
            x = torch.randn(1, mlp.hidden_size)
            with torch.no_grad():
                y = mlp(x)  # runs on the PyTorch path
        assert torch.isfinite(y).all()
        assert "could not be built" in caplog.text and "c++ not found" in caplog.text
    finally:
        cpu_decode.load.cache_clear()


def test_carved_model_generates_the_same_tokens_fused_and_unfused(monkeypatch):
    from tiny_models import calib_ids, tiny_model

    from cmoe_carve.carve import CarveConfig, carve_model

    model = tiny_model("llama")
    carve_model(model, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5), progress=False)
    prompt = calib_ids(n=2, seqlen=5, seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        fused = model.generate(prompt, **kwargs)
        monkeypatch.setenv("CMOE_KERNEL", "torch")
        plain = copy.deepcopy(model).generate(prompt, **kwargs)
    assert torch.equal(fused.sequences, plain.sequences)
    for a, b in zip(fused.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert modeling_cmoe._cpu_decode is cpu_decode


def test_hugepage_copy_keeps_values_and_aligns_large_tensors():
    big = torch.randn(3, 1024, 700)  # 8.6 MB: a few 2 MiB pages
    copy = cpu_decode.hugepage_copy(big)
    assert torch.equal(copy, big) and copy.is_contiguous() and copy.data_ptr() != big.data_ptr()
    if cpu_decode.hugepages_possible():
        assert copy.data_ptr() % (2 << 20) == 0
    # Exactly the tensor's bytes: torch.save of a moved weight writes nothing more.
    assert copy.untyped_storage().nbytes() == big.numel() * 4
    small = torch.randn(5, 7)
    assert torch.equal(cpu_decode.hugepage_copy(small), small)


def test_parametrized_expert_weights_take_the_general_path(monkeypatch):
    """An unmerged peft LoRA on the stacked experts parametrizes gate_up_proj: the kernel would
    read the raw weight without the adapter, so the general path must run."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    mlp = carved_mlp()
    x = torch.randn(1, mlp.hidden_size)
    with torch.no_grad():
        want = general_path(mlp, x, monkeypatch)[0]
        parametrize.register_parametrization(mlp, "gate_up_proj", Doubled())
        got = mlp(x)
        doubled_plain = general_path(mlp, x, monkeypatch)[0]
    assert not torch.allclose(got, want)  # the adapter counts
    torch.testing.assert_close(got, doubled_plain)


def test_decoding_under_inference_mode_leaves_trainable_weights(monkeypatch):
    """The first fused step may move the expert weights (huge pages); that must not turn them
    into inference tensors, which autograd refuses, nor change their values or identity."""
    monkeypatch.setattr(cpu_decode, "hugepages_possible", lambda: True)
    mlp = carved_mlp()
    before = {n: (p, p.detach().clone()) for n, p in mlp.named_parameters()}
    x = torch.randn(1, mlp.hidden_size)
    with torch.inference_mode():
        fused_path(mlp, x, monkeypatch)
    for name, (param, value) in before.items():
        assert mlp.get_parameter(name) is param and torch.equal(param, value), name
    mlp(x).sum().backward()  # grad mode: the general path, on the moved weights
    assert mlp.gate_up_proj.grad is not None and mlp.down_proj.grad is not None


def test_changes_after_a_fused_step_are_honoured(monkeypatch):
    """The layer caches the kernel's arguments: every later change of what they derive from must
    still show, as on the general path."""
    mlp = carved_mlp()
    x = torch.randn(1, mlp.hidden_size)

    def check():
        with torch.no_grad():
            got, got_top = fused_path(mlp, x, monkeypatch)
            want, want_top = general_path(mlp, x, monkeypatch)
        assert torch.equal(got_top, want_top)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    mlp.neuron_keep = 0.5
    check()
    with torch.no_grad():
        mlp.down_proj.mul_(2.0)  # in place: MoNE's neuron-major rows must follow
        mlp.gate_up_proj[:, :3].neg_()
    check()
    mlp.neuron_keep, mlp.shared_neuron_keep = 1.0, 0.5
    check()
    mlp.router.top_k, mlp.compensate = 4, True
    check()
    with torch.no_grad():
        mlp.router.scale.add_(0.5)  # router parameters are read live
    check()
    # Replaced objects (a user's assignment, load_state_dict(assign=True) of a submodule).
    mlp.expert_bias = torch.nn.Parameter(torch.randn_like(mlp.expert_bias))
    check()
    mlp.router.scale = torch.nn.Parameter(torch.randn_like(mlp.router.scale))
    mlp.router.bias = torch.randn_like(mlp.router.bias)
    check()
    mlp.to(torch.float64)
    with torch.no_grad():
        assert mlp(x.double()).dtype == torch.float64  # the general path, no stale float32 call


def test_copies_decode_with_their_own_weights(monkeypatch):
    mlp = carved_mlp()
    mlp.neuron_keep = 0.5
    x = torch.randn(1, mlp.hidden_size)
    with torch.no_grad():
        before, _ = fused_path(mlp, x, monkeypatch)
        twin = copy.deepcopy(mlp)
        assert "_fused_args_cache" not in twin.__dict__  # caches are not copied
        twin.gate_up_proj.mul_(0.5)
        got, _ = fused_path(twin, x, monkeypatch)
        want, _ = general_path(twin, x, monkeypatch)
        again, _ = fused_path(mlp, x, monkeypatch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, before)  # the original is untouched
