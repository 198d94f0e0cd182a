"""Perplexity (cmoe_carve.evaluate) against an independent, deliberately plain implementation of
the GPTQ protocol, on a tiny Llama built from its config and a tokenizer trained in memory."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cmoe_carve import data, evaluate
from cmoe_carve.errors import CmoeError, DataError, ModelError

TEXT = (
    " = Robert Boulter = \n\n Robert Boulter is an English film , television and theatre actor . "
    "He had a guest @-@ starring role on the television series The Bill in 2000 . This was "
    "followed by a starring role in the play Herons written by Simon Stephens , which was "
    "performed in 2001 at the Royal Court Theatre . \n\n = = Career = = \n\n In 2006 , Boulter "
    "starred alongside Whishaw in the play Citizenship written by Mark Ravenhill . \n"
)
CONTEXT = 64  # max_position_embeddings of the tiny model


def tiny_tokenizer():
    """A byte-level BPE trained in memory: encodes any text, no files or network needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=CONTEXT,
        initializer_range=0.2,  # peaked, varied logits: a near-uniform model would hide errors
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def windows(tokenizer):
    source = data.TextSource(TEXT * 3, "file", None, "test")
    return data.eval_windows(tokenizer, source, seqlen=24, max_windows=7)  # [7, 24]


def independent_perplexity(model, windows) -> float:
    """The protocol written out by hand: per window, log-softmax in fp64, pick each next token's
    log-probability one by one, sum over every predicted token of every window, exp of the mean."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None, :]).logits[0].double()  # [T, V]
            log_probs = torch.log_softmax(logits, dim=-1)
            for t in range(len(window) - 1):
                total -= log_probs[t, window[t + 1]].item()
                count += 1
    return math.exp(total / count)


def test_matches_an_independent_implementation(model, windows):
    result = evaluate.perplexity(model, windows, progress=False)
    expected = independent_perplexity(model, windows)
    assert result.ppl == pytest.approx(expected, rel=1e-5)  # issue 3 asks for 4 significant digits
    assert f"{result.ppl:.4g}" == f"{expected:.4g}"
    assert result.n_windows == 7 and result.n_tokens == 7 * 23
    assert result.nll_mean == pytest.approx(math.log(expected), rel=1e-6)
    assert result.seconds > 0 and result.seconds_per_window == pytest.approx(result.seconds / 7)
    assert 1.0 < result.ppl < 10 * model.config.vocab_size


def test_batch_size_does_not_change_the_result(model, windows):
    one = evaluate.perplexity(model, windows, batch_size=1, progress=False)
    three = evaluate.perplexity(model, windows, batch_size=3, progress=False)  # 7 = 3 + 3 + 1
    assert three.ppl == pytest.approx(one.ppl, rel=1e-5)
    assert three.n_tokens == one.n_tokens


def test_progress_bar_runs(model, windows):
    assert evaluate.perplexity(model, windows[:2], progress=True).n_windows == 2


def test_window_longer_than_the_context_is_an_error(model, tokenizer):
    source = data.TextSource(TEXT * 3, "file", None, "test")
    too_long = data.eval_windows(tokenizer, source, seqlen=CONTEXT + 1)
    with pytest.raises(
        ModelError, match=f"context of {CONTEXT} tokens.*--seqlen {CONTEXT} or less"
    ):
        evaluate.perplexity(model, too_long, progress=False)


def test_token_ids_beyond_the_vocabulary_are_an_error(model):
    windows = torch.full((1, 8), model.config.vocab_size, dtype=torch.long)
    with pytest.raises(ModelError, match="tokenizer does not belong"):
        evaluate.perplexity(model, windows, progress=False)


@pytest.mark.parametrize("shape", [(0, 8), (2, 1), (8,)])  # no window; nothing to predict; not 2-D
def test_malformed_windows_are_an_error(model, shape):
    with pytest.raises(DataError):
        evaluate.perplexity(model, torch.zeros(shape, dtype=torch.long), progress=False)


def test_train_mode_is_restored(model, windows):
    model.train()
    try:
        evaluate.perplexity(model, windows[:1], progress=False)
        assert model.training
    finally:
        model.eval()


def test_bfloat16_model_is_close_to_float32(tokenizer, windows):
    fp32 = evaluate.perplexity(tiny_model(len(tokenizer)), windows, progress=False)
    bf16 = evaluate.perplexity(
        tiny_model(len(tokenizer)).to(torch.bfloat16), windows, progress=False
    )
    assert bf16.ppl == pytest.approx(fp32.ppl, rel=0.05)


def test_compare_reports_the_ratio(model, tokenizer, windows):
    other = tiny_model(len(tokenizer), seed=1)
    comparison = evaluate.compare(other, model, windows, progress=False)
    assert comparison.ratio == pytest.approx(comparison.model.ppl / comparison.reference.ppl)
    assert comparison.reference.ppl == pytest.approx(
        independent_perplexity(model, windows), rel=1e-5
    )


# ---- the `cmoe eval` pipeline, with a stand-in for cmoe_carve.loading


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_hub_text", lambda name, purpose, tried: None)
    root = tmp_path / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(TEXT * 4)
    (root / "c4").mkdir()
    docs = [json.dumps({"text": TEXT[i * 40 : i * 40 + 200]}) for i in range(8)]
    (root / "c4" / "c4-en-train.00000-of-01024.first1000.jsonl").write_text("\n".join(docs))
    return root


@pytest.fixture
def fake_loading(monkeypatch, tokenizer):
    loaded = []

    def load(ref, *, dtype, device):
        loaded.append(ref)
        seed = 0 if ref in (None, "dense") else 1
        return types.SimpleNamespace(
            model=tiny_model(len(tokenizer), seed), tokenizer=tokenizer, description=f"tiny-{ref}"
        )

    monkeypatch.setattr(evaluate, "_load_model", load)
    return loaded


def test_evaluate_datasets_with_compare(data_dir, fake_loading, tokenizer):
    report = evaluate.evaluate_datasets(
        "carved",
        ["wikitext2", "c4"],
        seqlen=16,
        max_windows=3,
        data_dir=str(data_dir),
        compare_ref="dense",
        progress=False,
    )
    assert fake_loading == ["carved", "dense"]
    wiki, c4 = report.results
    assert (wiki.source.split, c4.source.split) == ("test", "train")  # C4 labelled as train sample
    assert wiki.result.n_windows == 3
    # The reference ran on the same windows: recompute them and check it independently.
    windows = data.eval_windows(tokenizer, wiki.source, 16, 3)
    dense = tiny_model(len(tokenizer), 0)
    assert wiki.reference.ppl == pytest.approx(independent_perplexity(dense, windows), rel=1e-5)
    assert wiki.ratio == pytest.approx(wiki.result.ppl / wiki.reference.ppl)
    record = wiki.to_record()
    assert record["windows"] == 3 and record["tokens"] == 48 and record["predicted_tokens"] == 45
    assert record["origin"].endswith("wiki.test.raw") and len(record["sha256"]) == 64


def test_missing_dataset_fails_before_loading_a_model(tmp_path, fake_loading, monkeypatch):
    monkeypatch.setattr(data, "_hub_text", lambda name, purpose, tried: None)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match="c4"):
        evaluate.evaluate_datasets(None, ["c4"], seqlen=16)
    assert fake_loading == []


def test_cli_eval_table_and_json(data_dir, fake_loading, tmp_path):
    import typer
    from typer.testing import CliRunner

    from cmoe_carve.cli_eval import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    out = tmp_path / "eval.json"
    args = [
        "--datasets",
        "wikitext2",
        "--seqlen",
        "16",
        "--max-windows",
        "2",
        "--data-dir",
        str(data_dir),
        "--json",
        str(out),
        "--compare",
        "dense",
        "--no-progress",
    ]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert (
        str(data_dir / "wikitext-2-raw" / "wiki.test.raw") in result.output
        and "ratio" in result.output
    )
    record = json.loads(out.read_text())
    row = record["perplexity"][0]
    assert (row["dataset"], row["split"], row["windows"]) == ("wikitext2", "test", 2)
    assert row["ratio"] == pytest.approx(row["ppl"] / row["reference"]["ppl"])
    assert record["model"] == "tiny-None" and record["reference"] == "tiny-dense"


# ---- lm-eval


def test_lm_eval_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(CmoeError, match="pip install lm-eval"):
        evaluate.run_lm_eval("some/dir", "piqa")


def test_cli_eval_json_to_stdout_keeps_the_table_off_it(data_dir, fake_loading):
    import typer
    from typer.testing import CliRunner

    from cmoe_carve.cli_eval import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    args = ["--datasets", "wikitext2", "--seqlen", "16", "--max-windows", "1"]
    args += ["--data-dir", str(data_dir), "--json", "-", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["perplexity"][0]["windows"] == 1
