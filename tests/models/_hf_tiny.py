"""Tiny random Hugging Face models of each architecture `from_hf` converts, and a tiny tokenizer (test helpers)."""

from __future__ import annotations

import torch
import transformers as hf
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = "the a cat dog sat ran on under mat log and then it was big small red blue".split()
SPECIALS = ["<|endoftext|>", "<unk>"]
VOCAB = 96  # more ids than the tokenizer has: models may have a padded vocabulary

# Two layers, d_model 32, 4 heads: each forward pass takes milliseconds on one CPU thread.
CONFIGS = {
    "gpt2": lambda: hf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB),
    "neox": lambda: hf.GPTNeoXConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        rotary_pct=0.5,
        vocab_size=VOCAB,
    ),
    "neo": lambda: hf.GPTNeoConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=64,
        vocab_size=VOCAB,
    ),
    "llama": lambda: hf.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=VOCAB,
    ),
    "gptj": lambda: hf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, vocab_size=VOCAB),
    "opt": lambda: hf.OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        vocab_size=VOCAB,
    ),
    "bloom": lambda: hf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
    "mistral": lambda: hf.MistralConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        sliding_window=None,
        vocab_size=VOCAB,
    ),
    "qwen2": lambda: hf.Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=VOCAB,
    ),
    "qwen3": lambda: hf.Qwen3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=VOCAB,
    ),
    "phi": lambda: hf.PhiConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=VOCAB,
    ),
    "phi3": lambda: hf.Phi3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        vocab_size=VOCAB,
    ),
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
