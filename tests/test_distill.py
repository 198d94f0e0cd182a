"""`cmoe finetune --distill`: the losses, the teacher, and a run that moves the student to it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.checkpoint import REPORT_FILE, load_carved, save_carved
from cmoe_carve import distill
from cmoe_carve.distill import (
    distill_loss,
    hidden_mse,
    kd_loss,
    resolve_teacher_dtype,
    sparse_distill_loss,
    sparse_targets,
    teacher_reference,
)
from cmoe_carve.errors import ModelError
from cmoe_carve.finetune import FinetuneConfig, FinetuneError, finetune
from test_finetune import TEXT
from tiny_models import byte_tokenizer, calib_ids, tiny_model


def test_kd_loss_is_the_token_mean_kl_divergence():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen)
    teacher = torch.randn(2, 5, 11, generator=gen)
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    q = torch.softmax(student / t, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * t * t
    torch.testing.assert_close(kd_loss(student, teacher, t), expected)
    assert kd_loss(teacher, teacher).abs() < 1e-6
    # Shifting logits by a constant changes no distribution.
    assert kd_loss(teacher + 3.0, teacher).abs() < 1e-5


def _autograd_reference(student, teacher, ids, t, ce_weight):
    """kd_loss plus transformers' causal-LM cross-entropy (shifted), by plain autograd."""
    loss = kd_loss(student, teacher, t)
    if ce_weight:
        v = student.shape[-1]
        ce = torch.nn.functional.cross_entropy(
            student[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1)
        )
        loss = loss + ce_weight * ce
    return loss


@pytest.mark.parametrize("t,ce_weight", [(1.0, 0.0), (1.0, 1.0), (2.0, 0.5)])
def test_fused_distill_loss_matches_autograd_in_value_and_gradient(monkeypatch, t, ce_weight):
    # Chunks smaller than the rows, and rows not a multiple of them, so chunk edges are crossed.
    monkeypatch.setattr(distill, "LOSS_CHUNK_ROWS", 4)
    gen = torch.Generator().manual_seed(1)
    teacher = 3 * torch.randn(2, 7, 13, generator=gen)
    ids = torch.randint(0, 13, (2, 7), generator=gen)
    student = (3 * torch.randn(2, 7, 13, generator=gen)).requires_grad_(True)
    reference = student.detach().clone().requires_grad_(True)
    fused = distill_loss(student, teacher, ids, t, ce_weight)
    expected = _autograd_reference(reference, teacher, ids, t, ce_weight)
    torch.testing.assert_close(fused, expected)
    (2.5 * fused).backward()
    (2.5 * expected).backward()
    torch.testing.assert_close(student.grad, reference.grad)


def _bucket_reference(student, teacher, ids, k, t, ce_weight):
    """KL over each token's teacher top-k ids plus one bucket for the rest, by plain autograd
    (the tails by logsumexp over masked entries), plus the causal-LM cross-entropy."""
    v = student.shape[-1]
    log_p = torch.log_softmax(teacher.reshape(-1, v) / t, -1)
    log_q = torch.log_softmax(student.reshape(-1, v).float() / t, -1)
    top = log_p.topk(k, -1).indices
    mask = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, top, True)
    tail_p = log_p.masked_fill(mask, float("-inf")).logsumexp(-1)
    tail_q = log_q.masked_fill(mask, float("-inf")).logsumexp(-1)
    lp, lq = log_p.gather(-1, top), log_q.gather(-1, top)
    kl = (lp.exp() * (lp - lq)).sum(-1) + tail_p.exp() * (tail_p - tail_q)
    loss = kl.mean() * t * t
    if ce_weight:
        ce = torch.nn.functional.cross_entropy(
            student[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1)
        )
        loss = loss + ce_weight * ce
    return loss


@pytest.mark.parametrize("k,t,ce_weight", [(3, 1.0, 0.0), (5, 1.0, 1.0), (4, 2.0, 0.5)])
def test_sparse_distill_loss_matches_the_bucketed_kl_in_value_and_gradient(monkeypatch, k, t,
                                                                             ce_weight):
    monkeypatch.setattr(distill, "LOSS_CHUNK_ROWS", 4)
    gen = torch.Generator().manual_seed(2)
    teacher = 3 * torch.randn(2, 7, 13, generator=gen)
    ids = torch.randint(0, 13, (2, 7), generator=gen)
    student = (3 * torch.randn(2, 7, 13, generator=gen)).requires_grad_(True)
    reference = student.detach().clone().requires_grad_(True)
    targets = sparse_targets(teacher, k, t)
    assert targets.ids.shape == (14, k)
    # The kept mass and the tail make up the whole distribution.
    total = targets.log_p.exp().sum(-1) + targets.log_tail.exp()
    torch.testing.assert_close(total, torch.ones(14))
    fused = sparse_distill_loss(student, targets, ids, t, ce_weight)
    expected = _bucket_reference(reference, teacher, ids, k, t, ce_weight)
    torch.testing.assert_close(fused, expected)
    (1.5 * fused).backward()
    (1.5 * expected).backward()
    torch.testing.assert_close(student.grad, reference.grad)


def test_sparse_distill_loss_is_the_full_kl_when_one_id_is_left_out():
    # With V - 1 ids kept the bucket holds one id: nothing is lumped, so the loss is exact.
    gen = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(1, 6, 9, generator=gen), torch.randn(1, 6, 9, generator=gen)
    ids = torch.randint(0, 9, (1, 6), generator=gen)
    full = distill_loss(student, teacher, ids, 1.0, 1.0)
    sparse = sparse_distill_loss(student, sparse_targets(teacher, 50, 1.0), ids, 1.0, 1.0)
    torch.testing.assert_close(sparse, full)
    # And the bucketed KL never exceeds the full one (it is a coarser view of the same pair).
    kl_full = distill_loss(student, teacher, ids, 1.0, 0.0)
    kl_top2 = sparse_distill_loss(student, sparse_targets(teacher, 2, 1.0), ids, 1.0, 0.0)
    assert 0 < kl_top2 < kl_full


def test_teacher_dtype_follows_the_choice_and_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_teacher_dtype("fp32", cpu) == "float32"
    assert resolve_teacher_dtype("bf16", cpu) == "bfloat16"
    monkeypatch.setattr(distill, "native_bf16", lambda device: False)
    assert resolve_teacher_dtype("auto", cpu) == "float32"
    monkeypatch.setattr(distill, "native_bf16", lambda device: True)
    assert resolve_teacher_dtype("auto", cpu) == "bfloat16"


def test_teacher_dtype_needs_distill():
    with pytest.raises(FinetuneError, match="--teacher-dtype"):
        FinetuneConfig(teacher_dtype="bf16")
    with pytest.raises(FinetuneError, match="--teacher-dtype"):
        FinetuneConfig(distill=True, teacher_dtype="fp16")


def test_hidden_mse_skips_embeddings_and_is_relative_per_layer():
    a = (torch.zeros(1, 2, 3), torch.ones(1, 2, 3), 10 * torch.ones(1, 2, 3))
    b = (torch.ones(1, 2, 3), 2 * torch.ones(1, 2, 3), 20 * torch.ones(1, 2, 3))
    # layer 1: (1-2)^2 / 4, layer 2: (10-20)^2 / 400 -> both 0.25
    torch.testing.assert_close(hidden_mse(a, b), torch.tensor(0.25))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny dense Llama saved as a model directory, its S1A1E8 carve, and a training text."""
    root = tmp_path_factory.mktemp("distill")
    dense = tiny_model("llama")
    dense.save_pretrained(root / "dense")
    byte_tokenizer().save_pretrained(root / "dense")
    model = copy.deepcopy(dense)
    result = carve_model(model, calib_ids(), CarveConfig(spec="S1A1E8", k_act=5), progress=False)
    save_carved(model, byte_tokenizer(), root / "carved", result.cmoe, {"layers": []},
                {"source_model": "tiny llama", "source_ref": str(root / "dense")})
    (root / "train.txt").write_text(TEXT)
    return root


def _kl_to(teacher_dir, student, ids):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        return kd_loss(student(ids).logits, teacher(ids).logits).item()


def _run(pair, name, **overrides):
    values = dict(data=str(pair / "train.txt"), samples=8, seqlen=16, lr=1e-3, save_every=0,
                  distill=True, mode="full")
    finetune(pair / "carved", pair / name, FinetuneConfig(**{**values, **overrides}), progress=False)
    return json.loads((pair / name / REPORT_FILE).read_text())["finetune"]


def test_distillation_moves_the_student_toward_the_teacher(pair):
    record = _run(pair, "ft")
    assert record["config"]["distill"] is True
    assert record["losses"][-1] < record["losses"][0]
    probe = byte_tokenizer()(TEXT[:200], return_tensors="pt")["input_ids"][:, :64]
    before = _kl_to(pair / "dense", load_carved(pair / "carved"), probe)
    after = _kl_to(pair / "dense", load_carved(pair / "ft"), probe)
    assert after < 0.97 * before


def test_the_first_distillation_loss_is_the_kl_to_the_teacher(pair):
    # Step 1 sees the untrained student: its loss must be the KL divergence from the teacher on
    # that window (plus, with --distill-hidden, the positive hidden-state term). The teacher in
    # fp32, as the reference computes it (auto may choose bf16 on this CPU).
    exact = dict(samples=1, teacher_dtype="fp32", distill_topk=0)
    plain = _run(pair, "ft_plain", distill_ce=0.0, **exact)["losses"][0]
    with_hidden = _run(pair, "ft_hidden", distill_hidden=1.0, distill_ce=0.0, **exact)["losses"][0]
    from cmoe_carve.data import calibration_windows, resolve_text

    source = resolve_text(str(pair / "train.txt"), purpose="calibration")
    window = calibration_windows(byte_tokenizer(), source, 1, 16, 0)
    student = load_carved(pair / "carved")
    expected = _kl_to(pair / "dense", student, window)
    assert plain == pytest.approx(expected, rel=1e-3)
    assert with_hidden > plain + 1e-3
    # --distill-ce adds that weight times the student's own next-token loss on the window
    # (1 unless told).
    with_ce = _run(pair, "ft_ce", distill_ce=0.5, **exact)["losses"][0]
    default = _run(pair, "ft_default", **exact)["losses"][0]
    with torch.no_grad():
        ce = student(window, labels=window).loss.item()
    assert with_ce == pytest.approx(expected + 0.5 * ce, rel=1e-3)
    assert default == pytest.approx(expected + ce, rel=1e-3)


def test_the_first_top_k_distillation_loss_is_the_bucketed_kl(pair):
    # The default --distill keeps the teacher's top 128 ids (made once before training, the
    # teacher then dropped); the first step's loss is the bucketed KL plus the cross-entropy.
    record = _run(pair, "ft_topk", samples=1, teacher_dtype="fp32")
    assert record["config"]["distill_topk"] == 128
    assert record["teacher_seconds"] > 0
    from cmoe_carve.data import calibration_windows, resolve_text
    from transformers import AutoModelForCausalLM

    source = resolve_text(str(pair / "train.txt"), purpose="calibration")
    window = calibration_windows(byte_tokenizer(), source, 1, 16, 0)
    teacher = AutoModelForCausalLM.from_pretrained(pair / "dense").eval()
    with torch.no_grad():
        expected = _bucket_reference(load_carved(pair / "carved")(window).logits,
                                     teacher(window).logits, window, 128, 1.0, 1.0)
    assert record["losses"][0] == pytest.approx(expected.item(), rel=1e-3)


def test_each_window_keeps_its_own_teacher_targets_in_batches_with_a_short_last_one(pair):
    # Three windows in teacher batches of two: every window's cached targets must be the top-k
    # of the teacher's own logits on that window, whichever batch and row it was made in.
    from cmoe_carve.checkpoint import read_cmoe_config
    from cmoe_carve.finetune import _Run

    config = FinetuneConfig(data=str(pair / "train.txt"), samples=3, seqlen=16, batch_size=2,
                            save_every=0, distill=True, teacher_dtype="fp32", distill_topk=5)
    run = _Run.prepare(pair / "carved", read_cmoe_config(pair / "carved"), config, None, True)
    teacher = run.teacher
    run.cache_teacher(progress=False)
    assert run.teacher is None and run.teacher_targets.batches == 2
    for i in range(3):
        kept = run.teacher_targets.get([i])
        with torch.no_grad():
            want = sparse_targets(teacher(input_ids=run.windows[i : i + 1]).logits, 5)
        assert kept.ids.shape == (16, 5)
        torch.testing.assert_close(kept.log_p, want.log_p, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept.log_tail, want.log_tail, rtol=1e-5, atol=1e-5)
        assert torch.equal(kept.ids, want.ids)


def test_teacher_comes_from_the_carve_report_or_is_asked_for(pair, tmp_path):
    assert teacher_reference(pair / "carved") == str(pair / "dense")
    (tmp_path / REPORT_FILE).write_text(json.dumps({"meta": {}}))
    with pytest.raises(ModelError, match="--teacher"):
        teacher_reference(tmp_path)


def test_a_carved_teacher_is_refused(pair):
    config = FinetuneConfig(data=str(pair / "train.txt"), samples=2, seqlen=16, save_every=0,
                            distill=True, teacher=str(pair / "carved"))
    with pytest.raises(ModelError, match="dense source"):
        finetune(pair / "carved", pair / "ft2", config, progress=False)
    assert not (pair / "ft2").exists()


def test_distill_options_need_distill():
    with pytest.raises(FinetuneError, match="need --distill"):
        FinetuneConfig(teacher="x")
    with pytest.raises(FinetuneError, match="need --distill"):
        FinetuneConfig(distill_ce=1.0)
    with pytest.raises(FinetuneError, match="need --distill"):
        FinetuneConfig(distill_topk=64)
    with pytest.raises(FinetuneError, match="need --distill"):
        FinetuneConfig(teacher_beside=True)
    with pytest.raises(FinetuneError, match="--distill-topk"):
        FinetuneConfig(distill=True, distill_topk=-1)
    assert FinetuneConfig(distill=True).distill_topk == 128
    assert FinetuneConfig().distill_topk == 0
    with pytest.raises(FinetuneError, match="--distill-ce"):
        FinetuneConfig(distill=True, distill_ce=-1.0)
    with pytest.raises(FinetuneError, match="--temperature"):
        FinetuneConfig(distill=True, temperature=0.0)


def test_distill_defaults_to_one_and_a_half_epochs_and_an_explicit_count_wins():
    assert FinetuneConfig().epochs == 1
    assert FinetuneConfig(distill=True).epochs == 1.5
    assert FinetuneConfig(distill=True, epochs=1).epochs == 1
    assert FinetuneConfig(epochs=3).epochs == 3
    with pytest.raises(FinetuneError, match="--epochs"):
        FinetuneConfig(distill=True, epochs=0)
