"""Tiny TransformerBridge models for the tests: GPT-NeoX, GPT-2 and Llama-style Hugging Face models built from
`transformers` configs, saved with `save_pretrained` (with a word-level tokenizer) and booted offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cbinterp.core import tl_compat as tc

#: The shape every tiny bridge shares: the tests' tiny HookedTransformer's (`tiny_models.TINY`).
VOCAB, D_MODEL, LAYERS, HEADS, D_MLP, N_CTX = 11, 32, 2, 4, 64, 16
ARCHITECTURES = ("neox", "gpt2", "llama")
#: Every model kind the behavioural tests run on: the HookedTransformer, and a bridge of each architecture.
KINDS = ("hooked",) + tuple(f"bridge_{a}" for a in ARCHITECTURES)


def _hf_model(architecture: str, seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    if architecture == "neox":
        config = tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=D_MLP, max_position_embeddings=N_CTX,
        )  # fmt: skip
        return tf.GPTNeoXForCausalLM(config)
    if architecture == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB, n_embd=D_MODEL, n_layer=LAYERS, n_head=HEADS, n_positions=N_CTX,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # train mode must not make the tests random
        )  # fmt: skip
        return tf.GPT2LMHeadModel(config)
    if architecture == "llama":
        config = tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=HEADS // 2, intermediate_size=D_MLP, max_position_embeddings=N_CTX,
        )  # fmt: skip
        return tf.LlamaForCausalLM(config)
    raise ValueError(f"Unknown architecture {architecture!r}; one of {ARCHITECTURES}.")


def tiny_tokenizer():
    """A word-level tokenizer over the 11 ids: `t0` ... `t9` and the end-of-text token (id 10)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<eos>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", bos_token="<eos>", unk_token="<eos>")


def save_hf_folder(architecture: str, folder: Path, seed: int = 0) -> Path:
    """A tiny Hugging Face causal LM of `architecture`, seeded, written with `save_pretrained` into `folder`."""
    _hf_model(architecture, seed).eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def boot(folder: Path):
    """The bridge of a local folder, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return tc.TransformerBridge.boot_transformers(str(folder.resolve()), device="cpu").eval()


def make_bridge(architecture: str, folder: Path, seed: int = 0):
    """A fresh tiny bridge of `architecture` (its Hugging Face folder written into `folder`)."""
    return boot(save_hf_folder(architecture, folder, seed))


#: Why a test that builds a HookedTransformer skips on this TransformerLens (None where it has the class).
NO_HOOKED_REASON: str | None = (
    None
    if tc.HAS_HOOKED
    else f"needs a HookedTransformer, which transformer-lens {tc.TL_VERSION} has not (the bridge tests cover 4.x)"
)


def skip_without_hooked() -> None:
    """Skip the running test, with the reason, where this TransformerLens has no HookedTransformer."""
    if NO_HOOKED_REASON is not None:
        pytest.skip(NO_HOOKED_REASON)


def make_any(kind: str, folder: Path, seed: int = 0):
    """A tiny model of `kind` (one of `KINDS`); the case skips where this TransformerLens lacks the class."""
    if kind == "hooked":
        from tiny_models import make_model

        return make_model(seed)
    if not tc.BRIDGE_SUPPORTED:
        pytest.skip(f"cbinterp takes a TransformerBridge from transformer-lens 4 on (this is {tc.TL_VERSION})")
    return make_bridge(kind.removeprefix("bridge_"), folder, seed)
