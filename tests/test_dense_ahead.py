"""The dense model's stream made in a thread beside the carve's first layers: the same layer
outputs in the same order as made in turn, on the planned thread counts, the carve's thread count
restored on every exit, and a failure in the thread raised in the carve."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn

from cmoe_carve import dense_ahead
from cmoe_carve.carve import CarveConfig
from cmoe_carve.cpu_threads import thread_split
from cmoe_carve.dense_ahead import DenseStream, beside_layers, runs_beside
from cmoe_carve.pipeline import carve
from tiny_models import save_dense

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 40
ARGS = dict(calib_samples=3, seqlen=24, progress=False)


@pytest.fixture
def two_threads():
    """Two CPU threads for the test (a one-core runner has one), the count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Step(nn.Module):
    """A stand-in decoder layer: adds its index (so every layer's output tells which layers ran
    on it, in which order) and records the thread and thread count it ran on."""

    def __init__(self, index: int, seen: list):
        super().__init__()
        self.index = index
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = seen

    def forward(self, hidden, offset):
        self.seen.append((self.index, threading.current_thread().name, torch.get_num_threads()))
        return hidden * 2 + self.index + offset


def _stream(n: int, seen: list) -> DenseStream:
    layers = [Step(i, seen) for i in range(n)]
    args = [((torch.tensor(0.5),), {}) for _ in range(n)]
    return DenseStream(layers, torch.zeros(2, 3, 4), args, [(0, 2)])


def _expected(n: int) -> list[torch.Tensor]:
    h, out = torch.zeros(2, 3, 4), []
    for i in range(n):
        h = h * 2 + i + 0.5
        out.append(h)
    return out


def test_plan_splits_threads_and_layers():
    assert thread_split(2) == (1, 1) and thread_split(16) == (8, 8) and thread_split(3) == (2, 1)
    assert beside_layers(30) == 15 and beside_layers(2) == 1 and beside_layers(7) == 4
    hidden = torch.zeros(8, 2048, 576)
    cpu = torch.device("cpu")
    ample = dict(layer_bytes=400 << 20, available=16 << 30)
    assert runs_beside(True, cpu, hidden, 30, False, **ample) == (torch.get_num_threads() >= 2)
    assert not runs_beside(False, cpu, hidden, 30, False, **ample)
    assert not runs_beside(True, cpu, hidden, 30, True, **ample)  # streamed
    assert not runs_beside(True, torch.device("meta"), hidden, 30, False, **ample)
    # every layer's output held at once must fit: 8 x 2,048 x 576 fp32 is 38 MB a layer
    assert not runs_beside(True, cpu, hidden, 100, False, **ample)
    # ... and, with a dense layer call's activations, in half the memory available
    # (1.13 GB of outputs + 0.42 GB: in half of 4 GiB, not in half of 2.5 GiB)
    two = torch.get_num_threads() >= 2
    assert runs_beside(True, cpu, hidden, 30, False, layer_bytes=400 << 20, available=4 << 30) == two
    assert not runs_beside(True, cpu, hidden, 30, False, layer_bytes=400 << 20, available=5 << 29)


def test_made_in_turn_gives_each_layer_on_the_callers_thread():
    seen: list = []
    stream = _stream(4, seen)
    for i, want in enumerate(_expected(4)):
        assert torch.equal(stream.take(i), want)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert {s[1] for s in seen} == {threading.current_thread().name}
    with pytest.raises(RuntimeError, match="asked for layer 1"):
        _stream(4, []).take(1)


def test_thread_makes_the_same_outputs_on_its_half_of_the_threads(two_threads):
    seen: list = []
    stream = _stream(6, seen)
    stream.start(beside_layers(6))
    counts = []
    try:
        for i, want in enumerate(_expected(6)):
            got = stream.take(i)
            counts.append(torch.get_num_threads())
            assert torch.equal(got, want)
    finally:
        stream.stop()
    assert [s[0] for s in seen] == list(range(6))
    assert {s[1] for s in seen} == {"cmoe-dense-stream"}
    assert {s[2] for s in seen} == {1}  # the dense thread's half
    # the carve's layers beside the thread on its own half, all threads from the plan's layer on
    assert counts == [1, 1, 1, 2, 2, 2]
    assert torch.get_num_threads() == 2 and stream.seconds is not None


def test_stopped_thread_restores_the_thread_count(two_threads):
    stream = _stream(6, [])
    stream.start(3)
    stream.take(0)
    stream.stop()  # the carve failed at its first layer
    assert torch.get_num_threads() == 2


def test_thread_that_cannot_start_leaves_the_thread_count_alone(two_threads, monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    stream = _stream(4, [])
    with pytest.raises(RuntimeError, match="can't start new thread"):
        stream.start(2)
    stream.stop()  # what the carve's cleanup does: nothing to join, nothing to restore
    assert torch.get_num_threads() == 2


def test_carve_beside_writes_the_checkpoint_of_the_stream_made_in_turn(tmp_path, two_threads):
    # Tiny shapes run every operation on one thread, so the split cannot change the rounding:
    # a difference here would be a layer output taken out of order or from the wrong layer.
    save_dense(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    common = dict(calib=str(tmp_path / "text.txt"), **ARGS)
    carve(str(tmp_path / "dense"), tmp_path / "a", config=CarveConfig(spec="S2A2E8", k_act=5),
          **common)
    assert torch.get_num_threads() == 2
    carve(str(tmp_path / "dense"), tmp_path / "b",
          config=CarveConfig(spec="S2A2E8", k_act=5, dense_beside=False), **common)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    meta_a = json.loads((tmp_path / "a" / "carve_report.json").read_text())["meta"]
    meta_b = json.loads((tmp_path / "b" / "carve_report.json").read_text())["meta"]
    assert meta_a["dense_beside_seconds"] is not None and meta_b["dense_beside_seconds"] is None


def test_failure_in_the_thread_is_raised_by_the_carve(tmp_path, two_threads, monkeypatch):
    save_dense(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(TEXT)
    calls = []
    real = dense_ahead.run_layer

    def failing(*args):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise MemoryError("out of memory in layer 1")
        return real(*args)

    monkeypatch.setattr(dense_ahead, "run_layer", failing)
    with pytest.raises(RuntimeError, match="dense stream's thread failed") as info:
        carve(str(tmp_path / "dense"), tmp_path / "out", calib=str(tmp_path / "text.txt"), **ARGS)
    assert isinstance(info.value.__cause__, MemoryError)
    assert set(calls) == {"cmoe-dense-stream"}
    assert torch.get_num_threads() == 2
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing that looks complete
