"""Tiny random Hugging Face models of each architecture `from_hf` converts, and a tiny tokenizer (test helpers)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as hf
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = "the a cat dog sat ran on under mat log and then it was big small red blue".split()
SPECIALS = ["<|endoftext|>", "<unk>"]
VOCAB = 96  # more ids than the tokenizer has: models may have a padded vocabulary

# Two layers, d_model 32, 4 heads: each forward pass takes milliseconds on one CPU thread.
#: The Llama-style spelling of that shape, which most architectures' configs share.
SHAPE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64
)
GQA = dict(num_key_value_heads=2)  # grouped-query attention: two heads share each key and value


def _config(config_class, **settings) -> Callable[[], hf.PretrainedConfig]:
    """A maker of the tiny `config_class` config: SHAPE, the padded vocabulary, then `settings` (which win)."""
    return lambda: config_class(**{**SHAPE, "vocab_size": VOCAB, **settings})


CONFIGS = {
    "gpt2": lambda: hf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB),
    "neox": _config(hf.GPTNeoXConfig, rotary_pct=0.5),
    "neo": lambda: hf.GPTNeoConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=64,
        vocab_size=VOCAB,
    ),
    "llama": _config(hf.LlamaConfig, **GQA),
    "gptj": lambda: hf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, vocab_size=VOCAB),
    "opt": lambda: hf.OPTConfig(  # OPT names the MLP width ffn_dim
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        vocab_size=VOCAB,
    ),
    "bloom": lambda: hf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
    "mistral": _config(hf.MistralConfig, sliding_window=None, **GQA),
    "qwen2": _config(hf.Qwen2Config, **GQA),
    "qwen3": _config(hf.Qwen3Config, head_dim=8, **GQA),
    "phi": _config(hf.PhiConfig),
    "phi3": _config(hf.Phi3Config, pad_token_id=0),
}


def make_hf_model(arch: str, seed: int = 0) -> hf.PreTrainedModel:
    """A random tiny `arch` model in eval mode; every weight is jittered so that norms and biases are not trivial."""
    torch.manual_seed(seed)
    model = hf.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def make_tokenizer() -> hf.PreTrainedTokenizerFast:
    """A word-level tokenizer over a few words, with <|endoftext|> as BOS / EOS."""
    vocab = {word: i for i, word in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return hf.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>"
    )
