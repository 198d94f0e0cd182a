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


def tiny_model(family: str, seed: int = 0):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
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
