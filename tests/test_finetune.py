"""Fine-tuning a tiny carved Llama: what trains, the merged output, load balancing, resume."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cmoe_carve.balance import (
    RoutingRecorder,
    apply_bias_update,
    max_over_mean,
    routing_counts,
    updated_bias,
)
from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.checkpoint import load_carved, save_carved
from cmoe_carve.errors import CheckpointError
from cmoe_carve.finetune import (
    FinetuneConfig,
    FinetuneError,
    finetune,
    state_path,
    step_plan,
)
from cmoe_carve.modeling_cmoe import CarvedMLP
from tiny_models import byte_tokenizer, calib_ids, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 40
PROBE = calib_ids(1, 12, seed=7)  # fixed input whose logits are compared


@pytest.fixture(scope="module")
def carved(tmp_path_factory):
    """A tiny Llama carved at S2A2E8 with a real tokenizer, and a training text file."""
    root = tmp_path_factory.mktemp("finetune")
    model = tiny_model("llama")
    result = carve_model(model, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5), progress=False)
    save_carved(model, byte_tokenizer(), root / "carved", result.cmoe, {"layers": []},
                {"source_model": "tiny llama"})
    (root / "train.txt").write_text(TEXT)
    return root


def tiny_config(carved, **overrides) -> FinetuneConfig:
    # gamma on (off by default) so that the bias update is trained, saved and resumed too.
    values = {"data": str(carved / "train.txt"), "samples": 4, "seqlen": 16, "lr": 1e-3,
              "save_every": 0, "gamma": 1e-3}
    return FinetuneConfig(**{**values, **overrides})


def original_name(peft_name: str) -> str:
    """A PEFT-wrapped parameter's name in the plain model."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.fixture(scope="module")
def lora_run(carved):
    """Two LoRA steps; keeps the trainable state after step 1 and the unmerged logits at the end."""
    seen = {}

    def callback(info):
        model = info.model
        if info.step == 1:
            seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["bias"] = [m.router.bias.clone() for m in model.modules() if isinstance(m, CarvedMLP)]
        if info.step == info.total_steps:
            model.eval()
            with torch.no_grad():
                seen["logits"] = model(input_ids=PROBE).logits
            model.train()

    out = carved / "lora"
    result = finetune(carved / "carved", out, tiny_config(carved, samples=2), progress=False,
                      step_callback=callback)
    return result, seen, out


def test_one_step_trains_lora_and_router_scale_only(carved, lora_run):
    _, seen, _ = lora_run
    before = load_carved(carved / "carved").state_dict()
    params = seen["params"]
    lora_b = [n for n in params if "lora_B" in n]
    # Attention q/k/v/o of 2 layers and the 2 expert stacks of 2 layers.
    assert len(lora_b) == 2 * 4 + 2 * 2
    # B starts at 0, so after one step only B has moved (A's gradient is B^T ... = 0).
    assert all(params[n].abs().max() > 0 for n in lora_b)
    scales = [n for n in params if n.endswith("router.scale")]
    assert len(scales) == 2 and all(params[n].abs().max() > 0 for n in scales)  # init 0
    frozen = [n for n in params if "lora_" not in n and not n.endswith("router.scale")]
    assert any("gate_up_proj" in n for n in frozen) and any("q_proj" in n for n in frozen)
    for name in frozen:
        torch.testing.assert_close(params[name], before[original_name(name)], rtol=0, atol=0)
    # The selection bias moved by exactly gamma (1e-3) per expert off the mean load.
    for bias in seen["bias"]:
        assert torch.allclose(bias.abs()[bias != 0], torch.tensor(1e-3))


def test_merged_checkpoint_equals_unmerged_model(lora_run):
    result, seen, out = lora_run
    assert result.steps == 2 and (out / "loss_curve.png").stat().st_size > 1000
    merged = load_carved(out)
    with torch.no_grad():
        logits = merged(input_ids=PROBE).logits
    torch.testing.assert_close(logits, seen["logits"], rtol=1e-5, atol=1e-5)
    assert any(m.router.bias.abs().sum() > 0 for m in merged.modules() if isinstance(m, CarvedMLP))
    # The same checkpoint through transformers' remote code.
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(remote(input_ids=PROBE).logits, logits, rtol=1e-5, atol=1e-5)
    report = json.loads((out / "carve_report.json").read_text())["finetune"]
    assert report["steps"] == 2 and len(report["losses"]) == 2
    assert "## Fine-tuning" in (out / "README.md").read_text()
    assert not state_path(out).exists()


def test_without_expert_adapters_the_experts_keep_their_weights(carved):
    out = carved / "attn-lora"
    seen = {}

    def callback(info):
        seen["lora"] = [n for n, p in info.model.named_parameters() if "lora_B" in n]

    finetune(carved / "carved", out, tiny_config(carved, samples=2, lora_experts=False),
             progress=False, step_callback=callback)
    assert len(seen["lora"]) == 2 * 4 and not any(".mlp." in n for n in seen["lora"])
    before, after = load_carved(carved / "carved").state_dict(), load_carved(out).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("q_proj.weight") for k in changed)  # the attention adapters, merged
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in changed)
    record = json.loads((out / "carve_report.json").read_text())["finetune"]
    assert record["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(FinetuneError, match="--no-lora-experts"):
        FinetuneConfig(mode="router", lora_experts=False)


def test_updated_bias_moves_against_the_load():
    bias = torch.zeros(2, 3)
    counts = torch.tensor([[10, 0, 2], [4, 4, 4]])  # means 4 and 4
    expected = torch.tensor([[-0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(updated_bias(bias, counts, 0.5), expected)
    assert max_over_mean(counts).tolist() == [2.5, 1.0]


def test_bias_update_balances_an_imbalanced_batch():
    mlp = CarvedMLP(16, 4, num_shared=1, num_experts=7, top_k=2, activation="silu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (mlp.gate_up_proj, mlp.down_proj, mlp.router.gate_weight, mlp.router.up_weight):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    # One tight cluster of tokens: a few experts win nearly all of them.
    x = torch.randn(16, generator=gen) + 0.6 * torch.randn(512, 16, generator=gen)
    loads = []
    with torch.no_grad(), RoutingRecorder([mlp]) as recorder:
        for _ in range(40):
            mlp(x)
            recorder.collect()
            counts = recorder.reset()  # [1, 6]
            loads.append(max_over_mean(counts)[0].item())
            apply_bias_update([mlp], counts, gamma=0.01)
    assert loads[0] > 2.5  # constructed imbalance: 2.92 (3.0 = every token on the same 2 of 6)
    assert all(b <= a for a, b in itertools.pairwise(loads[:20]))  # every update helps at first
    assert loads[-1] < 0.8 * loads[0]  # 2.16 after 40 updates
    assert routing_counts(mlp.route(x)[2], 6).sum() == 512 * 2


class Interrupt(Exception):
    """What `interrupt_after` raises: a run stopped as a crash would stop it."""


def interrupt_after(step: int):
    """A step callback that stops the run after optimizer step `step`."""

    def callback(info):
        if info.step == step:
            raise Interrupt

    return callback


def test_resume_after_interruption_matches_uninterrupted_run(carved):
    # 8 windows, 2 per step: 4 steps; state saved at step 2; interrupted after step 3.
    config = tiny_config(carved, samples=8, grad_accum=2, save_every=2)
    finetune(carved / "carved", carved / "full", config, progress=False)
    out = carved / "resumed"
    with pytest.raises(Interrupt):
        finetune(carved / "carved", out, config, progress=False,
                 step_callback=interrupt_after(3))
    assert not out.exists() and state_path(out).is_file()  # no finished-looking directory
    with pytest.raises(CheckpointError, match="--resume"):
        finetune(carved / "carved", out, config, progress=False)
    with pytest.raises(CheckpointError, match="seed: 0 -> 1"):
        finetune(carved / "carved", out, tiny_config(carved, samples=8, grad_accum=2, seed=1),
                 resume=True, progress=False)
    # Gradient checkpointing may change on resumption: it recomputes the same numbers.
    resumed = tiny_config(carved, samples=8, grad_accum=2, save_every=2, gradient_checkpointing=True)
    finetune(carved / "carved", out, resumed, resume=True, progress=False)
    a = load_file(carved / "full" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    report = json.loads((out / "carve_report.json").read_text())["finetune"]
    full = json.loads((carved / "full" / "carve_report.json").read_text())["finetune"]
    assert report["losses"] == full["losses"] and report["resumed_at_steps"] == [2]


def test_cli_router_mode_trains_only_the_router(carved):
    from cmoe_carve.cli import app

    out = carved / "router"
    args = ["finetune", str(carved / "carved"), "--out", str(out), "--data",
            str(carved / "train.txt"), "--samples", "2", "--seqlen", "16", "--mode", "router",
            "--save-every", "0", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    before, after = load_carved(carved / "carved").state_dict(), load_carved(out).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("router.scale", "router.bias")) for k in changed)
    bad = CliRunner().invoke(app, args[:-3] + ["--mode", "router", "--lr", "1e-3"])
    assert bad.exit_code == 2 and "--lr" in bad.output


def test_config_errors_name_the_fields():
    with pytest.raises(FinetuneError, match="--samples 2 is fewer than one batch"):
        FinetuneConfig(samples=2, batch_size=4)
    with pytest.raises(FinetuneError, match="--mode 'adapter'"):
        FinetuneConfig(mode="adapter")
    with pytest.raises(FinetuneError, match="global batch"):
        step_plan(3, batch_size=2, grad_accum=1, epochs=1, world=2, seed=0)
    plan = step_plan(10, batch_size=2, grad_accum=2, epochs=2, world=1, seed=0)
    assert [len(step) for step in plan] == [2, 2, 1, 2, 2, 1]  # 5 micro-batches per epoch


def test_a_fractional_epoch_ends_part_way_through_the_next_permutation():
    whole = step_plan(10, batch_size=2, grad_accum=1, epochs=2, world=1, seed=3)
    part = step_plan(10, batch_size=2, grad_accum=1, epochs=1.4, world=1, seed=3)
    assert len(whole) == 10 and len(part) == 7  # 5 micro-batches per epoch, then 2 of the next
    assert all(torch.equal(a[0], b[0]) for a, b in zip(part, whole))  # the same order, cut short
    assert len(step_plan(10, batch_size=2, grad_accum=1, epochs=0.01, world=1, seed=3)) == 1
    whole_number = FinetuneConfig(epochs=2.0).epochs
    assert whole_number == 2 and isinstance(whole_number, int)
    assert FinetuneConfig(distill=True, epochs=1.5).epochs == 1.5
    with pytest.raises(FinetuneError, match="--epochs must be positive"):
        FinetuneConfig(epochs=-1.0)


def test_finetune_with_neuron_selection_keeps_the_ratio(carved):
    # MoNE during training: gradients reach the experts through the kept neurons only.
    out = carved / "mone"
    seen = {}

    def callback(info):
        mlps = [m for m in info.model.modules() if isinstance(m, CarvedMLP)]
        seen["keep"] = {m.neuron_keep for m in mlps}

    result = finetune(carved / "carved", out, tiny_config(carved, samples=2, neuron_keep=0.5),
                      progress=False, step_callback=callback)
    assert seen["keep"] == {0.5} and result.loss_last == result.loss_last  # finite, not NaN
    cmoe = json.loads((out / "config.json").read_text())["cmoe"]
    assert cmoe["neuron_keep"] == 0.5
    assert all(m.neuron_keep == 0.5 for m in load_carved(out).modules() if isinstance(m, CarvedMLP))
