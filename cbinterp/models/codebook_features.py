"""The paper's released codebook models, as HookedTransformers with cbinterp codebooks, offline.

The folders are those saved by `codebook-features` 0.1.2.

`CodebookModel.save_pretrained` (GPT-2, GPT-NeoX or GPT-Neo base) writes `config.json` (the codebook settings only:
`model_type` "codebook") and the weights of the whole fine-tuned model, codebooks included, as `model.safetensors` or
`pytorch_model.bin` (read with `torch.load(weights_only=True)`, which runs no code from the file). The base model's
architecture is not in that folder, so `from_codebook_features` also takes the base model's config (its folder, as
`huggingface_hub.snapshot_download` of the base's Hub name gives it). Their codebook layer scores codes on a trained
affine LayerNorm of the input and outputs the mean of its k codes; the cbinterp codebooks made here do the same
(`normalize_input`, `norm_affine`, `combine="mean"`), so codes and logits are theirs (see
tests/models/test_codebook_features.py, against outputs of their own code).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from cbinterp.core.codebooks.attach import attach_codebooks
from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.tl_compat import Model
from cbinterp.models.from_hf import _tokenizer, from_hf

__all__ = ["PLACEMENT_HOOKS", "from_codebook_features"]

PathLike = str | os.PathLike

#: codebook-features' `codebook_at` placements and the TransformerLens hook each one's codebook sits at (per layer).
PLACEMENT_HOOKS = {
    "attn_preproj": "blocks.{layer}.attn.hook_z",  # the heads' outputs before the output projection, per head
    "attn": "blocks.{layer}.hook_attn_out",
    "mlp": "blocks.{layer}.hook_mlp_out",
    "mlp_mid": "blocks.{layer}.mlp.hook_post",
    "transformer_block": "blocks.{layer}.hook_resid_post",
}

#: Placements TransformerLens has no single hook for.
UNSUPPORTED = {
    "qkv": "the fused query-key-value projection's output (TransformerLens splits it into hook_q, hook_k, hook_v)",
    "attn_plus_mlp": "the sum of the attention and MLP outputs before the residual add",
}

#: codebook-features' model class -> (base model_type, where its layers' weights live, the attention module's name).
ARCHITECTURES = {
    "GPT2CodebookModel": ("gpt2", "model.transformer.h", "attn"),
    "GPTNeoXCodebookModel": ("gpt_neox", "model.gpt_neox.layers", "attention"),
    "GPTNeoCodebookModel": ("gpt_neo", "model.transformer.h", "attn.attention"),
}

SIMILARITIES = {"inner_product": "inner_product", "euclidean": "euclidean"}

# Weights newer transformers versions name otherwise (applied only when the model has the new name).
RENAMED = {"embed_out.": "lm_head."}

# Buffers older transformers versions saved with the weights; the model rebuilds them.
OLD_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _not_a_folder(what: str, source) -> FileNotFoundError:
    return FileNotFoundError(
        f"The {what} {str(source)!r} is not a local folder. cbinterp never downloads: if it is a Hugging Face Hub "
        f"name, fetch it first with `huggingface_hub.snapshot_download({str(source)!r})` and pass the folder it "
        "returns."
    )


def _folder(source: PathLike, what: str) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"The {what} must be a folder, got {type(source).__name__}.")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise _not_a_folder(what, source)
    return path.resolve()


def _read_config(path: Path) -> dict:
    """The codebook settings `save_pretrained` wrote, after checking that they are codebook-features' own."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a folder saved by codebook-features.")
    config = json.loads(config_file.read_text())
    if not isinstance(config, dict) or config.get("model_type") != "codebook":
        hint = (
            " It is a cbinterp model: load it with cbinterp.load."
            if isinstance(config, dict) and config.get("format") == "cbinterp-model"
            else " Plain Hugging Face models load with cbinterp.models.from_hf."
        )
        raise ValueError(
            f"{config_file} is not a codebook-features codebook model (model_type "
            f"{config.get('model_type') if isinstance(config, dict) else None!r}, expected 'codebook').{hint}"
        )
    architecture = (config.get("architectures") or [None])[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{config_file} is a {architecture!r} codebook model; from_codebook_features converts "
            f"{', '.join(ARCHITECTURES)} (folders saved by CodebookModel.save_pretrained)."
        )
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the saved model: safetensors, or a pytorch .bin read with weights_only (no code runs)."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            break
    else:
        raise FileNotFoundError(f"{path} holds none of {', '.join(WEIGHT_FILES)}: the model's weights are missing.")
    files = [name]
    if name.endswith(".index.json"):
        files = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
    state = {}
    for file in files:
        if file.endswith(".safetensors"):
            state.update(load_file(path / file))
        else:
            state.update(torch.load(path / file, map_location="cpu", weights_only=True))
    # Wrapped modules (a codebook around a layer, its MLP or its attention) keep the original under `module_layer`.
    return {re.sub(r"\.module_layer(?=\.)", "", key): value for key, value in state.items()}


def _base_config(base, model_type: str) -> PretrainedConfig:
    if isinstance(base, PretrainedConfig):
        config = base
    else:
        path = _folder(base, "base model")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: pass the base model's folder (the one the codebook model was trained "
                "from), e.g. `huggingface_hub.snapshot_download(base_name, allow_patterns=['*.json', '*.txt'])`."
            )
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type != model_type:
        raise ValueError(
            f"The base model is a {config.model_type!r} model but the codebook model was trained on a {model_type!r} "
            "one: pass the config of the base model it was made from."
        )
    return config


def _settings(config: dict, n_layers: int) -> tuple[list[int], list[dict]]:
    """The snapped layers and, per placement, its settings, with what cbinterp cannot reproduce refused."""
    placements = config["codebook_at"]
    placements = [placements] if isinstance(placements, str) else list(placements)

    def per_placement(key: str) -> list:
        value = config[key]
        return list(value) if isinstance(value, (list, tuple)) else [value] * len(placements)

    columns = {key: per_placement(key) for key in ("codebook_type", "num_codebooks", "k_codebook", "num_codes")}
    for at in placements:
        if at in UNSUPPORTED:
            raise ValueError(
                f"The codebook at {at!r} quantizes {UNSUPPORTED[at]}, which has no TransformerLens hook, so cbinterp "
                f"cannot place it. Convertible placements: {', '.join(PLACEMENT_HOOKS)}."
            )
        if at not in PLACEMENT_HOOKS:
            raise ValueError(
                f"Unknown codebook placement {at!r}; codebook-features 0.1.2 has {', '.join(PLACEMENT_HOOKS)}."
            )
    # codebook-features wraps modules in the order of `codebook_at`: once a block (or MLP) is wrapped, a codebook asked
    # for inside it is set on the wrapper, where it never runs. Such a saved codebook was never used: refuse it.
    for i, at in enumerate(placements):
        for later in placements[i + 1 :]:
            if (at == "transformer_block" and later != "transformer_block") or (at == "mlp" and later == "mlp_mid"):
                raise ValueError(
                    f"codebook_at lists {at!r} before {later!r}: codebook-features 0.1.2 then attaches the {later!r} "
                    "codebook to the wrapper of the first, where it never runs, so this model cannot be reproduced."
                )
    if config.get("similarity_metric") not in SIMILARITIES:
        raise ValueError(
            f"Unknown similarity_metric {config.get('similarity_metric')!r}; expected one of {list(SIMILARITIES)}."
        )
    kwargs = config.get("codebook_kwargs") or {}
    if kwargs.get("soft_snap") or kwargs.get("snap") is False:
        raise ValueError(f"codebook_kwargs {kwargs} turn snapping off or make it soft; only hard snapping converts.")
    layers = config.get("layers_to_snap", ())
    layers = range(n_layers) if layers == "all" else [layer % n_layers for layer in layers]
    rows = [dict(at=at, **{key: columns[key][i] for key in columns}) for i, at in enumerate(placements)]
    return sorted(set(layers)), rows


def _codebook(state: dict, prefix: str, row: dict, groups: int, similarity: str) -> Codebook:
    """The cbinterp codebook holding the weights under `prefix` (their `codebook_layer`)."""
    names = [f"{prefix}.codebook.{g}." for g in range(groups)] if row["codebook_type"] == "group" else [f"{prefix}."]
    try:
        weight = torch.stack([state.pop(n + "codebook.weight") for n in names])
        ln_weight = torch.stack([state.pop(n + "ln.weight") for n in names])
        ln_bias = torch.stack([state.pop(n + "ln.bias") for n in names])
    except KeyError as err:
        raise ValueError(f"The saved weights have no {err.args[0]!r}, which the codebook config asks for.") from err
    n_codes, dim = weight.shape[1:]
    codebook = Codebook(
        dim=dim,
        n_codes=n_codes,
        k=row["k_codebook"],
        groups=groups,
        similarity=similarity,
        normalize_input=True,
        norm_affine=True,
        combine="mean",
        dtype=weight.dtype,
    )
    with torch.no_grad():
        codebook.weight.copy_(weight)
        codebook.norm_weight.copy_(ln_weight)
        codebook.norm_bias.copy_(ln_bias)
    return codebook


def _groups(row: dict, placement: str, n_heads: int, hook: str) -> int:
    groups = row["num_codebooks"] if row["codebook_type"] == "group" else 1
    groups = n_heads if groups == -1 else groups
    if placement == "attn_preproj" and groups != n_heads:
        raise ValueError(
            f"The {row['codebook_type']} codebook at attn_preproj quantizes the {n_heads} heads' outputs in "
            f"{groups} group(s); cbinterp places codebooks at {hook} with one group per head, so only a grouped "
            "codebook with one codebook per head (num_codebooks -1) converts."
        )
    if placement != "attn_preproj" and groups != 1:
        raise ValueError(
            f"The grouped codebook at {placement!r} splits one vector into {groups} chunks; cbinterp codebooks at "
            f"{hook} take the whole vector, so only vanilla codebooks convert there."
        )
    return groups


def from_codebook_features(
    folder: PathLike,
    base: PathLike | PretrainedConfig,
    tokenizer: None | PathLike | PreTrainedTokenizerBase = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    n_ctx: int | None = None,
    default_prepend_bos: bool | None = None,
    check: bool = True,
) -> Model:
    """A codebook model saved by `codebook-features` 0.1.2 as a HookedTransformer with cbinterp codebooks, offline.

    Args:
        folder: the folder `CodebookModel.save_pretrained` wrote (GPT-2, GPT-NeoX or GPT-Neo base), e.g. what
            `huggingface_hub.snapshot_download` returns for a released model. Hub names are refused: download first.
        base: the config of the base model it was trained from: that model's folder (only its config.json is read;
            the weights are the codebook folder's), or a transformers `PretrainedConfig`.
        tokenizer: a tokenizer or tokenizer folder; default: the one in `folder`, else in `base`'s folder, if any.
        device, dtype, n_ctx, default_prepend_bos, check: as for `cbinterp.models.from_hf` (`check` compares the
            base model's logits, codebooks off, with the Hugging Face model's).

    Placements go to hooks as `PLACEMENT_HOOKS` says; "qkv" and "attn_plus_mlp" have no TransformerLens hook and are
    refused. Each codebook scores codes as theirs does (a LayerNorm with its trained scale and bias, then inner
    product or euclidean distance) and outputs the mean of its k codes. Returns the model in eval mode.
    """
    path = _folder(folder, "codebook model folder")
    config = _read_config(path)
    model_type, layers_prefix, attn_name = ARCHITECTURES[config["architectures"][0]]
    hf_config = _base_config(base, model_type)
    state = _read_weights(path)

    n_layers, n_heads = hf_config.num_hidden_layers, hf_config.num_attention_heads
    layers, rows = _settings(config, n_layers)
    similarity = SIMILARITIES[config["similarity_metric"]]
    module_of = {"attn_preproj": attn_name, "attn": attn_name, "mlp": "mlp", "mlp_mid": "mlp.act"}
    codebooks = {}
    for layer in layers:
        for row in rows:
            at = row["at"]
            hook = PLACEMENT_HOOKS[at].format(layer=layer)
            prefix = f"{layers_prefix}.{layer}" + (f".{module_of[at]}" if at in module_of else "") + ".codebook_layer"
            codebooks[hook] = _codebook(state, prefix, row, _groups(row, at, n_heads, hook), similarity)
    leftover = [key for key in state if ".codebook_layer." in key]
    if leftover:
        raise ValueError(
            f"The saved weights hold codebooks its config does not describe ({leftover[:3]}); the folder is damaged."
        )

    hf_model = AutoModelForCausalLM.from_config(hf_config)
    base_state = {key.removeprefix("model."): value for key, value in state.items()}
    base_state = {key: value for key, value in base_state.items() if not key.endswith(OLD_BUFFERS)}
    names = set(hf_model.state_dict())
    for old, new in RENAMED.items():
        for key in [k for k in base_state if k.startswith(old) and k not in names]:
            base_state[new + key.removeprefix(old)] = base_state.pop(key)
    missing, unexpected = hf_model.load_state_dict(base_state, strict=False)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    missing = [key for key in missing if not (tied and key == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"The weights in {path} do not fit the base model's config (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}): pass the config of the base model this codebook model was trained from."
        )
    if tied:
        hf_model.tie_weights()
    hf_model.config.name_or_path = _model_name(path)
    if tokenizer is None:
        tokenizer = _tokenizer(None, path)
        if tokenizer is None and not isinstance(base, PretrainedConfig):
            tokenizer = _tokenizer(None, _folder(base, "base model"))
    model = from_hf(hf_model, tokenizer, device, dtype, n_ctx, default_prepend_bos, check)  # from_hf's own order
    attach_codebooks(model, codebooks)
    return model.eval()


def _model_name(path: Path) -> str:
    """The model's name: the folder's, or a Hugging Face cache snapshot's repository name.

    A snapshot lies at `models--org--name/snapshots/<hash>`."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name
