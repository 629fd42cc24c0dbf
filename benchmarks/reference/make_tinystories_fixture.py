"""Write the TinyStories-shaped fixture of benchmarks/paper_tinystories.py: a tiny model saved by `codebook-features`
0.1.2, and what the authors' own topic forcing does to it.

Run with the Python of the authors' old-stack environment (see README.md beside this file), from the repo root:

    /tmp/refvenv/bin/python benchmarks/reference/make_tinystories_fixture.py

The paper's TinyStories codebook model (`taufeeque/TinyStories-1Layer-21M-Codebook`) is GPT-Neo, one layer, 16 heads,
a grouped codebook per head before the attention's output projection, k = 8. This writes a random model of that
shape (d_model 32, 48 codes per head) and a word-level tokenizer, then runs the authors' tutorial forcing
(`parse_topic_codes_string(..., pos=None, code_append=False)` and `utils.run_model_fn_with_codes` on their
TransformerLens conversion, with the tutorial's conversion settings) for a small topic table:

- `tests/fixtures/codebook_features/neo1-tinystories/`: the folder `CodebookModel.save_pretrained` writes;
- `tests/fixtures/codebook_features/base-neo1/`: the base model's config and the tokenizer (as the base's Hub folder
  holds them);
- `tests/fixtures/codebook_features/expected/neo1-tinystories.safetensors`: `tokens` (two prompts with BOS and a few
  more tokens), and per topic of `TOPICS` (and "" for none) `logits.<topic>` and `codes.<topic>`, the code ids of
  every head `(batch, pos, heads, k)` after the forcing.

and `expected/neo1-tinystories.topics.json`, that topic table ((head, code) pairs in the order listed).

Everything is seeded. Nothing here is imported by cbinterp.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from codebook_features import models  # noqa: E402
from codebook_features import utils as cb_utils  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, normalizers, pre_tokenizers  # noqa: E402
from tokenizers import models as tokenizer_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "codebook_features"
NAME, BASE = "neo1-tinystories", "base-neo1"
N_CODES, SEED = 48, 7
AT = "attn_preproj"
WORDS = (
    "once upon a time , there was long ago . the little girl boy dragon fire flower baby friend slide king "
    "castle prince crown saw big red and she he played with her his"
).split()
SPECIALS = ["<|endoftext|>", "<unk>"]
# Code ids as the tutorial lists them: per topic, "Code, Layer, Head" lines, a head's n-th code going to slot -n.
# "dragon" fills all 8 slots of head 13; "fire" 3 of head 2 and 1 of head 13; "baby" repeats a code (the tutorial
# writes a repeated code into two slots) and lists head 5 around head 9 (slots restart only when the head changes).
TOPICS = {
    "dragon": [(13, c) for c in (4, 17, 19, 23, 3, 45, 2, 16)],
    "fire": [(2, 9), (2, 40), (2, 11), (13, 7)],
    "baby": [(5, 6), (5, 6), (9, 1), (5, 30)],
}


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()  # "Once upon a time," reads as words of the table
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>"
    )


def topic_string(codes: list[tuple[int, int]]) -> str:
    return "\n".join(f"Code: {code}, Layer: 0, Head: {head}" for head, code in codes)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    tokenizer = make_tokenizer()
    config = transformers.GPTNeoConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=16,
        intermediate_size=128,  # 4 * hidden_size, as TransformerLens' GPT-Neo conversion assumes
        attention_types=[[["global"], 1]],
        max_position_embeddings=64,
        vocab_size=48,
        bos_token_id=0,
        eos_token_id=0,
    )
    config.architectures = ["GPTNeoForCausalLM"]
    base = OUT / BASE
    shutil.rmtree(base, ignore_errors=True)
    config.save_pretrained(base)
    tokenizer.save_pretrained(base)

    hf_model = transformers.AutoModelForCausalLM.from_config(config)
    cb_config = models.CodebookModelConfig(
        codebook_at=[AT],
        codebook_type=["group"],
        num_codebooks=[-1],
        k_codebook=[8],
        num_codes=[N_CODES],
        layers_to_snap="all",
        similarity_metric="inner_product",
    )
    cb_model = models.wrap_codebook(hf_model, config=cb_config)
    for module in cb_model.modules():  # trained-looking layer norms (they start at 1 and 0)
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
            module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    cb_model.eval()
    folder = OUT / NAME
    shutil.rmtree(folder, ignore_errors=True)
    cb_model.save_pretrained(folder, safe_serialization=True)

    # The tutorial's conversion; the base folder's path stands in for the Hub name (it finds the tokenizer there).
    hooked_kwargs = dict(
        center_unembed=False,
        fold_value_biases=False,
        center_writing_weights=False,
        fold_ln=False,
        refactor_factored_attn_matrices=False,
    )
    tl_model = models.convert_to_hooked_model_for_tokfsm(str(base), cb_model, config, hooked_kwargs=hooked_kwargs)
    tl_model.eval()

    prompts = ["Once upon a time, the dragon", "A long time ago, the little"]
    rows = [[0] + tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [tokenizer.convert_tokens_to_ids(".")] * (width - len(r)) for r in rows])
    expected = {"tokens": tokens}
    hf_logits = cb_model(input_ids=tokens).logits
    heads = range(config.num_heads)
    for topic, codes in {"": [], **TOPICS}.items():
        infos = []
        if codes:  # the tutorial's call; 0.1.2 needs cb_at to name the codebooks' hooks (its CodeInfo has no default)
            infos = cb_utils.parse_topic_codes_string(topic_string(codes), pos=None, code_append=False, cb_at=AT)
        logits, cache = cb_utils.run_model_fn_with_codes(tokens, tl_model, "run_with_cache", list_of_code_infos=infos)
        if not topic:
            assert torch.allclose(logits, hf_logits, atol=1e-4), "their conversion changed the logits"
        ids = [cache[f"blocks.0.attn.codebook_layer.codebook.{h}.hook_codebook_ids"] for h in heads]
        expected[f"logits.{topic}"] = logits.contiguous()
        expected[f"codes.{topic}"] = torch.stack(ids, dim=-2).to(torch.int64).contiguous()
    (OUT / "expected").mkdir(parents=True, exist_ok=True)
    save_file(expected, OUT / "expected" / f"{NAME}.safetensors")
    (OUT / "expected" / f"{NAME}.topics.json").write_text(json.dumps(TOPICS, indent=1) + "\n")
    print(f"{NAME}: {sorted(p.name for p in folder.iterdir())}; {BASE}: {sorted(p.name for p in base.iterdir())}")


if __name__ == "__main__":
    main()
