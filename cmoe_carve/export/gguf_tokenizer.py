"""GGUF tokenizer metadata (`tokenizer.*`) from a Hugging Face tokenizer (tokenizer.json and
tokenizer_config.json), for `--format gguf` when the carve did not start from a GGUF file.

Two kinds are converted, the two llama.cpp runs from these files:
- byte-level BPE (GPT-2, Llama-3, Qwen2/2.5/3, SmolLM/SmolLM2): tokenizer model "gpt2", the
  vocabulary in id order, the merges, and the name of the pre-tokenizer (tokenizer.ggml.pre).
- SentencePiece-style BPE with byte fallback (Llama-2, Mistral v0.1-v0.3 as tokenizer.json):
  tokenizer model "llama" with per-token scores. llama.cpp's SPM tokenizer merges the adjacent
  pair whose result has the highest score, so a token's score is minus the rank of the first
  merge that makes it (HF applies merges by rank): gguf-py's LlamaHfVocab gives every token
  -1000, which makes llama.cpp merge left to right instead.
Anything else (WordPiece, Unigram, WordLevel, a byte-level pre-tokenizer llama.cpp has no name
for) is refused in one line; `--tokenizer-gguf` copies the metadata from a GGUF file instead.

The pre-tokenizer name: llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre) hashes the ids
of a fixed check text and looks the hash up in its table. A hash identifies a whole tokenizer,
vocabulary included, so a re-trained or tiny vocabulary is never in such a table. Here the
structure of the normalizer and pre-tokenizer decides first, for the structures whose llama.cpp
regexes are known to be the same (STRUCTURES); the hash (a short table of llama.cpp's published
values, KNOWN_HASHES) names the tokenizers whose structure is not in that table. Either way
the written file is checked through llama.cpp when llama-cpp-python is installed
(`check_in_llama_cpp`), and the export refuses a converted tokenizer that llama.cpp does not
reproduce.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError

log = logging.getLogger(__name__)

# The check text of llama.cpp's convert_hf_to_gguf_update.py: the published hashes below are
# sha256(str(tokenizer.encode(CHECK_TEXT))), so the text must be exactly this one.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# Check-text hash -> (tokenizer.ggml.pre, the model llama.cpp's table names it after). Values
# from llama.cpp's published table (vendored in llama-cpp-python 0.3.36) for the families this
# project carves; the SmolLM one is also reproduced here from SmolLM2-135M-Instruct.
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": ("llama-bpe", "meta-llama/Meta-Llama-3-8B"),
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": ("qwen2", "Qwen/Qwen1.5-7B"),
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": ("qwen2", "Qwen/Qwen3-Embedding-0.6B"),
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": ("deepseek-r1-qwen", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": ("smollm", "HuggingFaceTB/SmolLM-135M"),
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": ("gpt-2", "openai-community/gpt2"),
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": ("tekken", "mistralai/Mistral-Nemo-Base-2407"),
}

# The split regexes of tokenizer.json files whose llama.cpp counterparts are known
# (src/llama-vocab.cpp quotes them as "original regex from tokenizer.json").
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (normalizer, pre-tokenizer steps, model.ignore_merges) -> tokenizer.ggml.pre. ByteLevel with
# use_regex is GPT-2's regex; llama.cpp's "smollm" is that regex after splitting every digit.
STRUCTURES = {
    (None, (("ByteLevel", False, True),), False): "gpt-2",
    (None, (("Digits", True), ("ByteLevel", False, True)), False): "smollm",
    (None, (("Split", LLAMA3_REGEX, "Isolated", False), ("ByteLevel", False, False)), True): "llama-bpe",
    ("NFC", (("Split", QWEN2_REGEX, "Isolated", False), ("ByteLevel", False, False)), False): "qwen2",
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GgufVocab:
    """What `write` puts in a GGUF file: one entry per embedding row."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    scores: list[float] | None  # "llama" only
    add_bos: bool  # what the HF tokenizer does with add_special_tokens=True
    add_eos: bool
    add_space_prefix: bool
    special: object  # gguf.SpecialVocab: merges, special token ids, chat template
    how: str  # one line for the report
    notes: list[str] = field(default_factory=list)


def check_text_hash(hf_tokenizer) -> str:
    return hashlib.sha256(str(hf_tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def _steps(pre: dict | None) -> tuple:
    """A pre-tokenizer as a tuple of its steps, each reduced to the fields that change splits."""
    if pre is None:
        return ()
    if pre.get("type") == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _steps(p))
    kind = pre.get("type")
    if kind == "ByteLevel":
        return (("ByteLevel", bool(pre.get("add_prefix_space")), bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return (("Digits", bool(pre.get("individual_digits"))),)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return (("Split", pattern.get("Regex", pattern.get("String")), pre.get("behavior"), bool(pre.get("invert"))),)
    return ((kind,),)


def _normalizer(norm: dict | None) -> str | None:
    if norm is None:
        return None
    if norm.get("type") == "Sequence":
        return "+".join(str(_normalizer(n)) for n in norm.get("normalizers", [])) or None
    return norm.get("type")


def structure(tokenizer_json: dict) -> tuple:
    return (
        _normalizer(tokenizer_json.get("normalizer")),
        _steps(tokenizer_json.get("pre_tokenizer")),
        bool(tokenizer_json["model"].get("ignore_merges", False)),
    )


def _describe(struct: tuple) -> str:
    norm, steps, ignore = struct
    parts = [s[0] + ("(" + ", ".join(map(str, s[1:])) + ")" if s[0] != "Split" else "(regex)") for s in steps]
    return f"normalizer {norm}, pre-tokenizer [{', '.join(parts)}], ignore_merges {ignore}"


def name_pre_tokenizer(tokenizer_json: dict, hf_tokenizer) -> tuple[str, str]:
    """(tokenizer.ggml.pre, how it was found), or CheckpointError.

    The structure first: it says what this tokenizer.json does. The hash names the model the
    vocabulary comes from, whose own tokenizer may differ: transformers' GGUF loader rebuilds
    SmolLM2's tokenizer as plain GPT-2 byte-level BPE, without the digit split of the model's
    original tokenizer (llama.cpp's "smollm"); the two differ on " ½" in WikiText-2 test."""
    digest = check_text_hash(hf_tokenizer)
    struct = structure(tokenizer_json)
    known = KNOWN_HASHES.get(digest)
    if struct in STRUCTURES:
        pre = STRUCTURES[struct]
        how = f"pre-tokenizer {pre!r} by its structure ({_describe(struct)})"
        if known and known[0] != pre:
            how += f"; its check-text hash is llama.cpp's {known[0]!r} ({known[1]}), whose tokenizer splits differently"
        return pre, how
    if known:
        return known[0], f"pre-tokenizer {known[0]!r} by its check-text hash (llama.cpp's, as {known[1]})"
    raise CheckpointError(
        f"llama.cpp has no pre-tokenizer known to match this tokenizer ({_describe(struct)}; "
        f"check-text hash {digest[:16]}): pass --tokenizer-gguf FILE, a GGUF of the source model"
    )


def _kind(tj: dict) -> str:
    model, decoder = tj.get("model", {}), tj.get("decoder") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise CheckpointError(
            f"the Hugging Face tokenizer is a {kind} model: only BPE tokenizers (byte-level or "
            "SentencePiece-style) are converted to GGUF; pass --tokenizer-gguf FILE"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise CheckpointError(
            "the BPE tokenizer uses a subword prefix/suffix or dropout, which llama.cpp's "
            "tokenizers do not: pass --tokenizer-gguf FILE"
        )
    if not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "gpt2"
    if model.get("byte_fallback") and decoder.get("type") == "Sequence":
        return "llama"
    raise CheckpointError(
        f"BPE tokenizer with byte_fallback={bool(model.get('byte_fallback'))} and a "
        f"{decoder.get('type')} decoder is neither byte-level nor SentencePiece-style: pass "
        "--tokenizer-gguf FILE"
    )


def _looks_special(text: str) -> bool:
    """Added tokens that some tokenizers forget to mark special (llama.cpp treats them so)."""
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def _token_table(tj: dict, vocab_size: int, kind: str) -> tuple[list[str], list[int]]:
    """Tokens in id order and their types; ids without a token become [PAD<id>] (UNUSED)."""
    from gguf import TokenType

    vocab: dict[str, int] = tj["model"]["vocab"]
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    top = max([*vocab.values(), *added.keys()]) + 1
    if top > vocab_size:
        raise CheckpointError(
            f"the tokenizer has ids up to {top - 1} but the model has {vocab_size} embedding rows: "
            "the tokenizer does not belong to this checkpoint"
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(TokenType.BYTE if kind == "llama" and _BYTE_TOKEN.fullmatch(text) else TokenType.NORMAL)
    unk = tj["model"].get("unk_token")
    for i, a in added.items():
        tokens[i] = a["content"]
        if a["content"] == unk and kind == "llama":
            types[i] = int(TokenType.UNKNOWN)
        elif a.get("special") or _looks_special(a["content"]):
            types[i] = int(TokenType.CONTROL)
        else:
            types[i] = int(TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
    return tokens, types  # type: ignore[return-value]


def _spm_scores(tj: dict, tokens: list[str]) -> list[float]:
    """Minus the rank of the first merge that makes each token (0 for tokens no merge makes)."""
    rank: dict[str, int] = {}
    for r, m in enumerate(tj["model"].get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _space_prefix(tj: dict) -> bool:
    """Whether a SentencePiece-style tokenizer prepends "▁" to the text."""
    norm = json.dumps(tj.get("normalizer"))
    pre = tj.get("pre_tokenizer") or {}
    if '"Prepend"' in norm:
        return True
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never" and pre.get("add_prefix_space", True)
    return False


def _adds(hf_tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) as measured: add_special_tokens=True against False."""
    plain = hf_tokenizer.encode("a b", add_special_tokens=False)
    full = hf_tokenizer.encode("a b", add_special_tokens=True)
    bos, eos = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
    head = len(full) > len(plain) and full[0] == bos and full[1:1 + len(plain)] == plain
    tail = len(full) > len(plain) and full[-1] == eos and full[-1 - len(plain):-1] == plain
    extra = len(full) - len(plain) - int(head) - int(tail)
    if extra:
        raise CheckpointError(
            f"the tokenizer adds {len(full) - len(plain)} special tokens around a text "
            f"({full} for {plain}): llama.cpp can only add BOS and EOS; pass --tokenizer-gguf FILE"
        )
    return head, tail


def load_hf_tokenizer(directory: Path, config=None):
    from transformers import AutoTokenizer

    kwargs = {"config": config} if config is not None else {}
    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, **kwargs)


def from_hf(directory: str | Path, vocab_size: int, config=None) -> GgufVocab:
    """The GGUF tokenizer of the Hugging Face tokenizer files in `directory`."""
    import gguf

    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no tokenizer.json (a fast Hugging Face tokenizer): pass "
            "--tokenizer-gguf FILE"
        )
    tj = json.loads(path.read_text(encoding="utf-8"))
    kind = _kind(tj)
    hf = load_hf_tokenizer(directory, config)
    tokens, types = _token_table(tj, vocab_size, kind)
    add_bos, add_eos = _adds(hf)
    special = gguf.SpecialVocab(directory, load_merges=kind == "gpt2", n_vocab=vocab_size)
    if kind == "gpt2":
        steps = _steps(tj.get("pre_tokenizer"))
        if any(s[0] == "ByteLevel" and s[1] for s in steps):
            raise CheckpointError(
                "the byte-level tokenizer adds a prefix space (ByteLevel add_prefix_space), "
                "which llama.cpp's BPE tokenizer does not: pass --tokenizer-gguf FILE"
            )
        pre, how = name_pre_tokenizer(tj, hf)
        scores, space = None, False
    else:
        pre, how = "default", "SentencePiece-style BPE (scores from merge ranks)"
        scores, space = _spm_scores(tj, tokens), _space_prefix(tj)
    return GgufVocab(
        model=kind, pre=pre, tokens=tokens, types=types, scores=scores, add_bos=add_bos,
        add_eos=add_eos, add_space_prefix=space, special=special, how=how,
    )


def write(writer, vocab: GgufVocab) -> None:
    """Add the tokenizer.* keys to a GGUFWriter (through gguf-py's own helpers)."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    # Merges, bos/eos/unk/pad ids, the chat template; add_bos/add_eos as measured, not as
    # SpecialVocab's reading of the post-processor template.
    vocab.special.add_special_token = {"bos": vocab.add_bos}
    if vocab.add_eos:  # llama.cpp's default for gpt2 and llama vocabularies is False
        vocab.special.add_special_token["eos"] = True
    vocab.special.add_to_gguf(writer, quiet=True)


def check_in_llama_cpp(gguf_path: str | Path, hf_tokenizer, text: str) -> dict | None:
    """Token ids of `text` through the GGUF file's vocabulary in llama.cpp against the HF
    tokenizer's: plain, with BOS/EOS added, and with special tokens parsed. None without
    llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    specials = [t for t in hf_tokenizer.all_special_tokens if t][:4]
    tagged = "".join(f"{s}{chunk}" for s, chunk in zip(specials, text.split("\n")[:4] or [text]))
    cases = {  # name: (text, HF add_special_tokens, llama add_bos, llama parse special)
        "plain": (text, False, False, False),
        "with BOS/EOS": (text[:200], True, True, False),
        "special tokens": (tagged, False, False, True),
    }
    vocab = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    record: dict = {"tokens": 0, "agree": True}
    try:
        for name, (t, hf_add, bos, special) in cases.items():
            want = hf_tokenizer.encode(t, add_special_tokens=hf_add)
            got = vocab.tokenize(t.encode("utf-8"), add_bos=bos, special=special)
            record["tokens"] += len(want)
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                record["agree"] = False
                record["first_difference"] = (
                    f"{name}: at token {at} llama.cpp {got[at:at + 4]} vs Hugging Face {want[at:at + 4]}"
                )
                break
    finally:
        vocab.close()
    return record


def verify(path: Path, carved: Path, tokenizer, config, echo) -> dict | str:
    """The written file's tokenizer through llama.cpp against the checkpoint's HF tokenizer;
    a converted one that llama.cpp does not reproduce is refused."""
    from importlib import resources

    from .. import data_files

    try:
        hf = load_hf_tokenizer(carved, config)
    except Exception:  # noqa: BLE001 - no HF tokenizer to compare with
        return "not checked: the checkpoint has no Hugging Face tokenizer"
    excerpt = resources.files(data_files).joinpath(data_files.WIKITEXT2_EXCERPT).read_text(encoding="utf-8")
    record = check_in_llama_cpp(path, hf, CHECK_TEXT + "\n" + excerpt[:6000])
    if record is None:
        return "not checked: llama-cpp-python is not installed"
    if record["agree"]:
        echo(f"tokenizer: llama.cpp gives the Hugging Face token ids on {record['tokens']} tokens")
        return record
    line = f"llama.cpp does not tokenize as the Hugging Face tokenizer ({record['first_difference']})"
    if isinstance(tokenizer, GgufVocab):
        raise CheckpointError(f"{line}: the conversion is wrong for this tokenizer; pass --tokenizer-gguf FILE")
    echo(f"warning: {line}")
    return record
