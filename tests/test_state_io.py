"""The fine-tune state and every file cmoe reads back: safetensors or JSON, never a pickle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cmoe_carve.checkpoint import model_card, routed_budget
from cmoe_carve.errors import CheckpointError
from cmoe_carve.state_io import load_state, save_state
from cmoe_carve.validate import check_safetensors

ROOT = Path(__file__).resolve().parents[1]


def trained_optimizer():
    """AdamW + LambdaLR after two steps: int-keyed per-parameter state, tuples, 0-d tensors."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}],
                            betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        (params[0].sum() + params[1].square().sum()).backward()
        opt.step()
        sched.step()
    return params, opt, sched


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN equals NaN here


def test_optimizer_state_round_trips_exactly(tmp_path):
    params, opt, sched = trained_optimizer()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 2,
             "history": {"losses": [1.5, float("nan")], "resumed_at": []}, "bias": torch.zeros(2, 3),
             "scaler": None}
    path = tmp_path / "state.safetensors"
    save_state(path, state)
    check_safetensors(path)  # a plain safetensors file, readable by any safetensors reader
    back = load_state(path)
    assert_same(state, back)
    assert 0 in back["optimizer"]["state"]  # int keys stay ints, as load_state_dict needs
    _, opt2, _ = trained_optimizer()
    opt2.load_state_dict(back["optimizer"])  # accepted by torch as it is


def test_unreadable_state_is_one_clear_error(tmp_path):
    path = tmp_path / "state.safetensors"
    path.write_bytes(b"\x80\x04 a pickle, say")
    with pytest.raises(CheckpointError, match="not a readable training state"):
        load_state(path)


def test_no_pickle_loading_in_the_package():
    # Reading a pickle (torch.load, pickle.load) or writing one (torch.save) anywhere in the code.
    pattern = re.compile(r"torch\.(load|save)\(|import pickle|pickle\.loads?\(|weights_only\s*=\s*False")
    hits = [f"{path.relative_to(ROOT)}:{n}" for folder in ("cmoe_carve", "kernels")
            for path in sorted((ROOT / folder).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line) and not line.lstrip().startswith("#")]
    assert hits == []


def test_model_card_states_varying_layer_budgets():
    cmoe = {"spec": "S2A2E16", "num_shared": 2, "num_experts": 16, "expert_size": 96,
            "top_k": [4, 1, 2, 1], "k_act": 10, "neuron_keep": 1.0, "shared_neuron_keep": 1.0}
    assert routed_budget(cmoe) == "on average 2 (1-4 by layer)"
    assert routed_budget({**cmoe, "top_k": [2, 2]}) == "2"
    card = model_card(cmoe, {"source_model": "m"})
    assert "2 shared + on average 2 (1-4 by layer) of 14 routed" in card
    assert "https://github.com/)" not in card
