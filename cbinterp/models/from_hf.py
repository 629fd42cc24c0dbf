"""A local Hugging Face causal LM (a folder, or a model in memory) as a HookedTransformer, with no network.

TransformerLens' own `HookedTransformer.from_pretrained` wants an official Hub name and fetches configs from the
Hub; `from_hf` instead reads the folder (``local_files_only``), converts the config and weights with TransformerLens'
converters, and attaches the folder's tokenizer the way `cbinterp.save` / `cbinterp.load` expect, so the result
can be given codebooks, trained, saved and loaded offline.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cbinterp.core import tl_compat as tc
from cbinterp.core.storage.tokenizer import attach_tokenizer
from cbinterp.core.tl_compat import Model

# The name of the record `cbinterp.models.to_hf` leaves in its exports (to_hf imports this module's names, not back).
EXPORT_FILE = "cbinterp_export.json"

__all__ = ["SUPPORTED_ARCHITECTURES", "from_hf"]

#: Causal-LM architectures (``config.architectures[0]``) whose config and weights TransformerLens converts from
#: the config alone; each is checked against the Hugging Face logits in tests/models/test_from_hf.py.
SUPPORTED_ARCHITECTURES = (
    "GPT2LMHeadModel",
    "GPTNeoForCausalLM",
    "GPTNeoXForCausalLM",
    "GPTJForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
)

PathLike = str | os.PathLike
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _not_a_folder(source: PathLike) -> FileNotFoundError:
    return FileNotFoundError(
        f"{str(source)!r} is not a local folder. from_hf never downloads: if it is a Hugging Face Hub name, fetch it "
        f"first with `huggingface_hub.snapshot_download({str(source)!r})` (online) and pass the folder it returns."
    )


def _refuse(architecture: str | None, where: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{where} is a {architecture or 'model of unknown architecture'}, which from_hf cannot convert. "
            f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )


def _read_folder(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: from_hf needs a folder written by `model.save_pretrained(folder)` (or "
            f"`huggingface_hub.snapshot_download(name)`)."
        )
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    _refuse((config.architectures or [None])[0], str(path))
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)


def _converter_config(config: PretrainedConfig, architecture: str):
    """A copy of `config` as TransformerLens' converter reads it.

    The architecture is named, and GPT-2's ``n_ctx``, which transformers 5 no longer sets, is filled from
    ``n_positions``."""
    data = config.to_dict()
    data["architectures"] = [architecture]
    if architecture == "GPT2LMHeadModel" and data.get("n_ctx") is None:
        data["n_ctx"] = data["n_positions"]
    return type(config).from_dict(data)


def _phi_config(config: PretrainedConfig) -> dict:
    """TransformerLens' PhiForCausalLM conversion, reading ``partial_rotary_factor`` where transformers 5 keeps it.

    That is ``rope_parameters``; TransformerLens 3.9 reads the attribute transformers 5 removed."""
    if getattr(config, "qk_layernorm", False):
        raise ValueError("This Phi model normalises queries and keys (qk_layernorm), which TransformerLens ignores.")
    rope = getattr(config, "rope_parameters", None) or {}
    d_head = config.hidden_size // config.num_attention_heads
    return {
        "d_model": config.hidden_size,
        "d_head": d_head,
        "n_heads": config.num_attention_heads,
        "d_mlp": config.intermediate_size,
        "n_layers": config.num_hidden_layers,
        "n_ctx": config.max_position_embeddings,
        "eps": config.layer_norm_eps,
        "d_vocab": config.vocab_size,
        "act_fn": config.hidden_act,
        "initializer_range": config.initializer_range,
        "normalization_type": "LN",
        "positional_embedding_type": "rotary",
        "rotary_base": rope.get("rope_theta", 10000.0),
        "rotary_dim": round(rope.get("partial_rotary_factor", 1.0) * d_head),
        "use_attn_scale": True,
        "parallel_attn_mlp": True,
        "default_prepend_bos": False,
        "original_architecture": "PhiForCausalLM",
    }


def _hooked_config(hf_model: PreTrainedModel, architecture: str, name: str, device, dtype, n_ctx):
    """The HookedTransformerConfig and converted state dict of `hf_model`.

    TransformerLens converts a copy of the config written to a private temporary folder: it treats a path as a
    local model, but picks branches by words in the name (``llama``, ``gemma`` ...), so the user's folder name
    must not reach it."""
    from transformer_lens import loading_from_pretrained as tl_loading  # TransformerLens 3 only (from_hf checks)

    with tempfile.TemporaryDirectory(prefix="cbinterp-from-hf-") as tmp:
        folder = Path(tmp) / "model"
        _converter_config(hf_model.config, architecture).save_pretrained(str(folder))
        if architecture == "PhiForCausalLM":
            data = _phi_config(hf_model.config)
        else:
            data = tl_loading.convert_hf_model_config(str(folder), local_files_only=True)
        if data.get("original_architecture") != architecture:
            raise RuntimeError(
                f"TransformerLens read the {architecture} config as {data.get('original_architecture')}; this "
                f"transformer-lens version is unsupported."
            )
        data.update(
            model_name=name,
            # Recorded names must never make a later `cbinterp.load` (or TransformerLens) go to the Hub, nor run code.
            tokenizer_name=None,
            trust_remote_code=False,
            init_weights=False,
            device=device,
            n_devices=1,
            dtype=dtype,
            from_checkpoint=False,
            d_vocab=hf_model.config.vocab_size,
        )
        data.setdefault("default_prepend_bos", True)
        if n_ctx is not None:
            data["n_ctx"] = n_ctx
        cfg = tc.HookedTransformerConfig.from_dict(data)
        state = tl_loading.get_pretrained_state_dict(str(folder), cfg, hf_model=hf_model, dtype=dtype)
    return cfg, state


def _tokenizer(tokenizer, path: Path | None) -> PreTrainedTokenizerBase | None:
    if tokenizer is None:
        if path is None or not any((path / f).is_file() for f in TOKENIZER_FILES):
            return None
        tokenizer = path
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        folder = Path(tokenizer).expanduser()
        if not folder.is_dir():
            raise _not_a_folder(tokenizer)
        return AutoTokenizer.from_pretrained(str(folder.resolve()), local_files_only=True)
    raise TypeError(f"tokenizer must be a transformers tokenizer or a folder, got {type(tokenizer).__name__}.")


def _exported_prepend_bos(path: Path) -> bool | None:
    """What the model `to_hf` exported into `path` did by default about BOS (None when it is no such export)."""
    try:
        value = json.loads((path / EXPORT_FILE).read_text()).get("default_prepend_bos")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def check_logits(hf_model: PreTrainedModel, model: Model, n_tokens: int = 8, seed: int = 0) -> float:
    """Run both models on the same `n_tokens` random ids (from `seed`); return max |logit difference|.

    Raise ValueError when it is too large to be rounding, so a conversion is never silently wrong."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, min(n_tokens, model.cfg.n_ctx)), generator=generator)
    hf_device = next(hf_model.parameters()).device
    was_training = hf_model.training
    try:
        hf_model.eval()  # a model handed over in training mode would apply dropout
        with torch.no_grad():
            expected = hf_model(tokens.to(hf_device)).logits.float().cpu()
            got = model(tokens.to(model.cfg.device)).float().cpu()
    finally:
        hf_model.train(was_training)
    diff = (expected - got).abs().max().item()
    exact = model.cfg.dtype in (torch.float32, torch.float64)
    tolerance = (1e-3 if exact else 5e-2) * max(1.0, expected.abs().max().item())
    if not diff <= tolerance:  # also catches NaN
        raise ValueError(
            f"The converted {model.cfg.original_architecture} model disagrees with the Hugging Face one (max |logit "
            f"difference| {diff:.3g} > {tolerance:.3g}): TransformerLens does not convert this configuration "
            f"faithfully. Pass check=False to get it anyway."
        )
    return diff


def from_hf(
    source: PathLike | PreTrainedModel,
    tokenizer: None | PathLike | PreTrainedTokenizerBase = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    n_ctx: int | None = None,
    default_prepend_bos: bool | None = None,
    check: bool = True,
) -> Model:
    """A Hugging Face causal LM as a HookedTransformer in eval mode, with its tokenizer attached; never online.

    Args:
        source: a local folder written by ``save_pretrained`` (or ``huggingface_hub.snapshot_download``), or a
            ``PreTrainedModel`` in memory (not modified). Hub names are refused: download the folder first.
        tokenizer: a tokenizer or a tokenizer folder; default: the one in `source`'s folder, if any. It needs a
            BOS token. A model given in memory gets none unless given here.
        device: where the model lives (default: TransformerLens' choice, CUDA when present).
        dtype: the model's dtype (default float32).
        n_ctx: the longest context the model takes (default: the config's); lower it for long-context models,
            whose causal-mask and rotary buffers grow with n_ctx squared and n_ctx.
        default_prepend_bos: whether ``to_tokens`` etc. start text with BOS by default (default: what a `to_hf`
            export in the folder records, else TransformerLens' choice for the family: False for GPT-NeoX / Pythia,
            Phi, Qwen, Bloom).
        check: compare the two models' logits on a few tokens and refuse a conversion that disagrees (one short
            forward pass of each).

    The weights are converted unprocessed (no layer-norm folding or centring), so logits match the Hugging Face
    model's.
    """
    tc.require_hooked("from_hf")
    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}.")
    if isinstance(source, PreTrainedModel):
        hf_model, path = source, None
        architecture = type(source).__name__
        _refuse(architecture, f"The model given ({architecture})")
        name = Path(str(getattr(source.config, "name_or_path", "") or architecture)).name
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise _not_a_folder(source)
        path = path.resolve()
        hf_model = _read_folder(path, dtype)
        architecture = type(hf_model).__name__
        name = path.name
    else:
        raise TypeError(f"from_hf needs a folder or a transformers PreTrainedModel, got {type(source).__name__}.")
    tok = _tokenizer(tokenizer, path)
    if default_prepend_bos is None and path is not None:
        default_prepend_bos = _exported_prepend_bos(path)
    cfg, state = _hooked_config(hf_model, architecture, name, device, dtype, n_ctx)
    if default_prepend_bos is not None:
        cfg.default_prepend_bos = bool(default_prepend_bos)
    if "pos_embed.W_pos" in state:  # a learned position table longer than the n_ctx asked for
        state["pos_embed.W_pos"] = state["pos_embed.W_pos"][: cfg.n_ctx]
    model = tc.HookedTransformer(cfg)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    if check:
        check_logits(hf_model, model)
    if tok is not None:
        attach_tokenizer(model, tok)
    return model
