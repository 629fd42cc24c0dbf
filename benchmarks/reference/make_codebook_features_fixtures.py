"""Write the test fixtures of `cbinterp.from_codebook_features`: tiny models saved by `codebook-features` 0.1.2 itself.

Run with the Python of the authors' old-stack environment (see README.md beside this file), from the repo root:

    /tmp/refvenv/bin/python benchmarks/reference/make_codebook_features_fixtures.py

For each base (GPT-2, GPT-NeoX, GPT-Neo) it builds a random tiny causal LM, wraps it with the authors' `wrap_codebook`
in two layouts (`preproj`: grouped codebooks on the heads before the output projection plus a vanilla one on the MLP
output; `blocks`: vanilla codebooks on the attention output (not for GPT-Neo, see below), the MLP hidden layer and the
block output, last layer only), gives every layer norm (the codebooks' own included) random scales and biases as
training would, and writes

- `tests/fixtures/codebook_features/<base>-<layout>/`: the folder `CodebookModel.save_pretrained` writes (as on the
  Hub); safetensors, except `gpt2-blocks`, written as `pytorch_model.bin` (as older releases are) so that the
  converter's `torch.load(weights_only=True)` path is tested too;
- `tests/fixtures/codebook_features/base-<base>/config.json`: the base model's Hugging Face config (what a user
  downloads besides the codebook folder);
- `tests/fixtures/codebook_features/expected/<base>-<layout>.safetensors`: the token ids fed, the authors' logits,
  and the code ids every codebook chose (`codes.<layer>.<placement>`, `(batch, pos, k)` or `(batch, pos, groups, k)`).

Everything is seeded, so a rerun writes the same numbers. Nothing here is imported by cbinterp.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from codebook_features import models  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "codebook_features"
VOCAB, BATCH, POS = 40, 2, 12

BASES = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=16, n_layer=2, n_head=4, n_positions=32, vocab_size=VOCAB),
    "neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=32,
        rotary_pct=0.5,
        vocab_size=VOCAB,
    ),
    "neo": lambda: transformers.GPTNeoConfig(
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        # Set (codebook-features sizes mlp_mid codebooks from it), and 4 * hidden_size: TransformerLens' GPT-Neo
        # conversion assumes that width.
        intermediate_size=64,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=32,
        vocab_size=VOCAB,
    ),
}

LAYOUTS = {
    "preproj": dict(
        codebook_at=["attn_preproj", "mlp"],
        codebook_type=["group", "vanilla"],
        num_codebooks=[-1, 1],  # -1: one codebook per head
        k_codebook=[2, 1],
        num_codes=[12, 10],
        layers_to_snap="all",
        similarity_metric="inner_product",
    ),
    "blocks": dict(
        codebook_at=["attn", "mlp_mid", "transformer_block"],
        codebook_type=["vanilla", "vanilla", "vanilla"],
        num_codebooks=[1, 1, 1],
        k_codebook=[1, 3, 2],
        num_codes=[10, 12, 8],
        layers_to_snap=[-1],
        similarity_metric="euclidean",
    ),
}

# codebook-features 0.1.2 cannot put a codebook at "attn" of GPT-Neo (it looks up the attribute "attn.attention" in one
# step and fails), so no such checkpoint exists; GPT-Neo's "blocks" layout leaves that placement out.
LAYOUT_OVERRIDES = {
    "neo-blocks": dict(
        codebook_at=["mlp_mid", "transformer_block"],
        codebook_type=["vanilla", "vanilla"],
        num_codebooks=[1, 1],
        k_codebook=[3, 2],
        num_codes=[12, 8],
    )
}

PICKLED = {"gpt2-blocks"}  # saved as pytorch_model.bin


@torch.no_grad()
def randomise_layer_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every LayerNorm a random scale and bias, as training would (they start at 1 and 0)."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            shape = module.weight.shape
            module.weight.copy_(1 + 0.5 * torch.randn(shape, generator=generator))
            module.bias.copy_(0.3 * torch.randn(shape, generator=generator))


def make(base: str, layout: str, seed: int) -> None:
    name = f"{base}-{layout}"
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    hf_model = transformers.AutoModelForCausalLM.from_config(BASES[base]())
    config = models.CodebookModelConfig(**{**LAYOUTS[layout], **LAYOUT_OVERRIDES.get(name, {})})
    cb_model = models.wrap_codebook(hf_model, config=config)
    randomise_layer_norms(cb_model, generator)
    cb_model.eval()

    codes: dict[str, list] = {}
    cb_model.set_hook_fn(lambda key, ids: codes.setdefault(key, []).append(torch.from_numpy(ids).clone()))
    tokens = torch.randint(0, VOCAB, (BATCH, POS), generator=generator)
    logits = cb_model(input_ids=tokens).logits

    expected = {"tokens": tokens, "logits": logits.contiguous()}
    for layer, placements in cb_model.all_codebooks.items():
        for placement, layer_module in placements.items():
            key = f"layer{layer}_{placement}"
            if isinstance(layer_module, models.GroupCodebookLayer):
                ids = torch.stack([codes[f"{key}_gcb{g}"][0] for g in range(layer_module.num_codebooks)], dim=-2)
            else:
                ids = codes[key][0]
            expected[f"codes.{layer}.{placement}"] = ids.to(torch.int64).contiguous()

    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    cb_model.save_pretrained(folder, safe_serialization=name not in PICKLED)
    (OUT / "expected").mkdir(parents=True, exist_ok=True)
    save_file(expected, OUT / "expected" / f"{name}.safetensors")
    base_folder = OUT / f"base-{base}"
    if not base_folder.exists():
        hf_model.config.architectures = [type(hf_model).__name__]  # as in the base model's config on the Hub
        hf_model.config.save_pretrained(base_folder)
    print(f"{name}: {sorted(p.name for p in folder.iterdir())}, codebooks {sorted(k for k in expected if '.' in k)}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for index, (base, layout) in enumerate((b, l) for b in BASES for l in LAYOUTS):
        make(base, layout, seed=index)
    packages = ("codebook-features", "torch", "transformers", "transformer-lens")
    versions = {package: importlib.metadata.version(package) for package in packages}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
