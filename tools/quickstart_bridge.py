"""The README's quick start on a TransformerBridge (transformer-lens 4.x): a tiny local Hugging Face model, booted
offline, codebooks attached, codes read from the cache. Run it with the environment that has transformer-lens 4:

    /tmp/cbinterp-tl4/bin/python tools/quickstart_bridge.py
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing is fetched

import torch
import transformers
from transformer_lens.model_bridge import TransformerBridge

from cbinterp import attach_codebooks, codebooks_bypassed, get_codebooks


def main() -> dict[str, tuple[int, ...]]:
    """Run the quick start; returns the shapes it printed."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=11, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cbinterp-quickstart-") as folder:
        transformers.GPTNeoXForCausalLM(config).save_pretrained(folder)  # any local causal-LM folder works the same
        bridge = TransformerBridge.boot_transformers(folder, device="cpu")

    model = attach_codebooks(bridge, sites=["attn", "mlp"], n_codes=1000, k=1)
    tokens = torch.randint(0, 11, (2, 16))
    logits, cache = model.run_with_cache(tokens)
    shapes = {
        "blocks.0.hook_mlp_out.hook_codes": tuple(cache["blocks.0.hook_mlp_out.hook_codes"].shape),  # (batch, pos, k)
        "blocks.0.attn.hook_z.hook_codes": tuple(cache["blocks.0.attn.hook_z.hook_codes"].shape),  # (.., n_heads, k)
        "blocks.0.hook_mlp_out.hook_input": tuple(cache["blocks.0.hook_mlp_out.hook_input"].shape),  # before codes
    }
    with codebooks_bypassed(model):
        bypassed = model(tokens)
    for name, shape in shapes.items():
        print(f"{name}: {shape}")
    print(f"codebooks at {list(get_codebooks(model))}")
    moved = (logits - bypassed).abs().max().item()
    print(f"logits {tuple(logits.shape)}; bypassing the codebooks moves them by up to {moved:.3f}")
    return shapes


if __name__ == "__main__":
    main()
