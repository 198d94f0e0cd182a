"""Tiny models of every supported family, built from a config (never downloaded)."""

import torch
import transformers

COMMON = dict(
    hidden_size=48,
    intermediate_size=100,  # 100 / 8 experts does not divide: exercises zero-neuron padding
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)

# family -> (config class, model class, extra config fields)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 12}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 12, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 12, "sliding_window": 16}),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    # Random init gives near-zero FFN outputs; widen weights so errors would show.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def calib_ids(n: int = 2, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (n, seqlen), generator=torch.Generator().manual_seed(seed))


def byte_tokenizer():
    """Byte-level BPE without merges: 256 ids, the tiny model's vocabulary, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(["x"], trainers.BpeTrainer(vocab_size=256, initial_alphabet=alphabet))
    # The newline byte doubles as end of text: lm-eval needs one, and the 256 ids are all bytes.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ċ")


def save_dense(path, family: str = "llama", seed: int = 0):
    """A tiny dense model directory with a tokenizer, as `cmoe carve` takes it."""
    model = tiny_model(family, seed)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def save_carved_tiny(path, spec: str = "S2A2E8", family: str = "llama"):
    """A tiny carved checkpoint directory (carved in-process, about a second)."""
    from cmoe_carve.carve import CarveConfig, carve_model
    from cmoe_carve.checkpoint import save_carved

    model = tiny_model(family)
    result = carve_model(model, calib_ids(), CarveConfig(spec=spec, k_act=5), progress=False)
    save_carved(model, byte_tokenizer(), path, result.cmoe, {"layers": []},
                {"source_model": f"tiny {family}"})
    return path


def training_text(chars: int = 20000) -> list[str]:
    """Rows of the packaged WikiText-2 excerpt, to train tiny tokenizers on."""
    from importlib import resources

    from cmoe_carve import data_files

    text = resources.files(data_files).joinpath(data_files.WIKITEXT2_EXCERPT).read_text(encoding="utf-8")
    return [r for r in text[:chars].split("\n") if r.strip()]


# The split regexes of Llama-3's and Qwen2's tokenizer.json files.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer(style: str, vocab_size: int = 400):
    """A trained byte-level BPE tokenizer built like a real family's tokenizer.json:
    gpt2 (ByteLevel's own regex), smollm (digits split first), llama3 (Llama-3's split regex,
    ignore_merges, a BOS added), qwen2 (NFC, Qwen2's regex), or custom (a split regex no
    llama.cpp pre-tokenizer has)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style in ("gpt2", "smollm"))
    split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "custom": r"\w+|\s+|[^\w\s]+"}.get(style)
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer)
    tok.add_tokens(["<tool>"])  # an added token that is not special (llama.cpp: USER_DEFINED)
    kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>")
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def spm_tokenizer(pieces: int = 120):
    """A Llama-2-style tokenizer.json (what transformers makes of a SentencePiece BPE model):
    <unk> <s> </s>, 256 byte tokens, then pieces; merges listing every split of every piece,
    ranked by the piece's id; "▁" for spaces, prepended; byte fallback; BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # Train plain BPE on "▁"-joined words for the pieces, then rebuild it the converter's way.
    rows = ["▁" + r.replace(" ", "▁") for r in training_text()]
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    base.train_from_iterator(rows, trainers.BpeTrainer(vocab_size=pieces + 100, show_progress=False))
    learned = sorted(base.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in learned:
        vocab.setdefault(piece, len(vocab))
    merges = sorted(
        ((vocab[p], vocab[p[:i]], vocab[p[i:]]), (p[:i], p[i:]))
        for p in vocab if len(p) > 1 and not p.startswith("<") for i in range(1, len(p))
        if p[:i] in vocab and p[i:] in vocab
    )
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m for _, m in merges], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(training_text(), trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
