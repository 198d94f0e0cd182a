"""The --distill teacher's targets: the order its batches are made in, how many steps train
beside it, and a fine-tune whose teacher works in a thread of its own."""

from __future__ import annotations

import json

import pytest
import torch

from cmoe_carve.checkpoint import REPORT_FILE, read_cmoe_config
from cmoe_carve.finetune import FinetuneConfig, _Run, finetune
from cmoe_carve.cpu_threads import thread_split
from cmoe_carve.teacher_targets import batch_order, overlap_steps
from test_distill import pair  # noqa: F401 (the fixture)
from test_finetune import Interrupt, interrupt_after


def _plan(*steps):
    return [[torch.tensor(micro) for micro in step] for step in steps]


def test_batches_are_made_in_the_order_the_plan_first_uses_them():
    # Windows 0..6 in batches of two (0-1, 2-3, 4-5, 6): the plan first asks for window 5,
    # then 0, then 3; batch 6 is never used and comes last.
    plan = _plan([[5, 4]], [[0, 1]], [[3, 5]])
    assert batch_order(7, 2, plan, 0) == [4, 0, 2, 6]
    # Resumed after the first step: its windows are not needed before window 0's.
    assert batch_order(7, 2, plan, 1) == [0, 2, 4, 6]


def test_steps_beside_the_teacher_follow_the_plan_and_only_on_a_cpu():
    config = FinetuneConfig(samples=128, distill=True, teacher_beside=True)
    plan = _plan(*[[[i]] for i in range(192)])
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert overlap_steps(128, config, plan, 0, cpu, 1) == 64
        assert overlap_steps(128, config, plan, 100, cpu, 1) == 100  # resumed past them: none
        assert overlap_steps(128, config, plan[:10], 0, cpu, 1) == 10
        assert overlap_steps(128, config, plan, 0, cpu, 2) == 0  # several processes
        assert overlap_steps(128, config, plan, 0, torch.device("cuda"), 1) == 0
        accum = FinetuneConfig(samples=128, distill=True, teacher_beside=True, grad_accum=4)
        assert overlap_steps(128, accum, plan, 0, cpu, 1) == 16
        first = FinetuneConfig(samples=128, distill=True)  # the default: the teacher first
        assert overlap_steps(128, first, plan, 0, cpu, 1) == 0
        torch.set_num_threads(1)
        assert overlap_steps(128, config, plan, 0, cpu, 1) == 0  # no second thread to share
    finally:
        torch.set_num_threads(threads)


def test_the_threads_are_shared_half_and_half_the_student_keeping_an_odd_one():
    assert thread_split(2) == (1, 1)
    assert thread_split(3) == (2, 1)
    assert thread_split(16) == (8, 8)


def _config(pair, **overrides):
    values = dict(data=str(pair / "train.txt"), samples=8, seqlen=16, lr=1e-3, save_every=0,
                  distill=True, mode="full", teacher_dtype="fp32")
    return FinetuneConfig(**{**values, **overrides})


def test_a_teacher_beside_the_steps_gives_the_same_training(pair):  # noqa: F811
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("one CPU thread: the teacher runs before training")
    finetune(pair / "carved", pair / "beside", _config(pair, teacher_beside=True),
             progress=False)
    beside = json.loads((pair / "beside" / REPORT_FILE).read_text())["finetune"]
    assert beside["teacher_beside_steps"] == 4  # 8 windows, half as many steps
    assert torch.get_num_threads() == threads  # the process has its threads back
    finetune(pair / "carved", pair / "before", _config(pair), progress=False)
    before = json.loads((pair / "before" / REPORT_FILE).read_text())["finetune"]
    assert before["teacher_beside_steps"] == 0 and before["teacher_seconds"] > 0
    # The same targets, the same windows: only the rounding of the 1-thread steps differs.
    assert beside["losses"] == pytest.approx(before["losses"], rel=1e-4)


def test_a_teacher_that_fails_in_its_thread_stops_the_run(pair, monkeypatch):  # noqa: F811
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("one CPU thread: the teacher runs before training")
    run = _Run.prepare(pair / "carved", read_cmoe_config(pair / "carved"),
                       _config(pair, teacher_beside=True), None, True)

    def broken(*args, **kwargs):
        raise MemoryError("no room for the logits")

    monkeypatch.setattr(run.teacher, "forward", broken)
    run.cache_teacher(progress=False)
    with pytest.raises(RuntimeError, match="teacher stopped") as caught:
        with run.teacher_stopped_on_exit():
            run.train(0, pair / ".unused-state", False, None)
    assert isinstance(caught.value.__cause__, MemoryError)
    assert torch.get_num_threads() == threads


def test_a_run_resumed_beside_the_teacher_ends_as_the_uninterrupted_one(pair):  # noqa: F811
    # 8 windows, one a step, 1.5 epochs: 12 steps, the first 4 beside the teacher. State saved
    # every 2 steps, interrupted after step 3: the resumed run trains steps 3-4 beside its own
    # teacher again, on one thread as the uninterrupted run did, and so ends in the same weights.
    from safetensors.torch import load_file

    from cmoe_carve.finetune import state_path

    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("one CPU thread: the teacher runs before training")
    config = _config(pair, teacher_beside=True, save_every=2)
    finetune(pair / "carved", pair / "whole", config, progress=False)
    out = pair / "interrupted"
    with pytest.raises(Interrupt):
        finetune(pair / "carved", out, config, progress=False, step_callback=interrupt_after(3))
    assert state_path(out).is_file() and torch.get_num_threads() == threads
    finetune(pair / "carved", out, config, resume=True, progress=False)
    a, b = load_file(pair / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    report = json.loads((out / REPORT_FILE).read_text())["finetune"]
    whole = json.loads((pair / "whole" / REPORT_FILE).read_text())["finetune"]
    assert report["losses"] == whole["losses"] and report["resumed_at_steps"] == [2]
    assert report["teacher_beside_steps"] == 2  # steps 3 and 4 of the resumed run
