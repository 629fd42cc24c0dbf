"""Export a HookedTransformer (one trained with cbinterp, say) to a Hugging Face folder.

Plain `transformers` loads the folder with ``AutoModelForCausalLM.from_pretrained(folder)``, giving the same logits.

cbinterp's models are pre-LayerNorm transformers with rotary attention, biases everywhere and an unembedding bias.
GPT-NeoX would take everything but that last bias (its output layer has none, and the bias is not in the span of
the unembedding, so it cannot be folded in). Phi (``PhiForCausalLM``) has it, but runs attention and MLP in
parallel from one LayerNorm; a sequential block is therefore written as two Phi layers, the first with the block's
attention (and an MLP of zeros), the second with its MLP (and an attention of zeros). Adding an exact zero changes
nothing, so the export is exact; it costs the zero sublayers' compute. A model whose attention and MLP already run
in parallel from one LayerNorm (e.g. one read from a Phi folder by `from_hf`) maps to one Phi layer per block.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import einops
import torch
from jaxtyping import Float
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
from transformers import PhiConfig, PhiForCausalLM

from cbinterp.core.codebooks.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.storage.atomic import atomic_dir
from cbinterp.core.tl_compat import Model
from cbinterp.models.from_hf import EXPORT_FILE  # written beside the Hugging Face files: layer map, files, BOS

__all__ = ["EXPORT_FILE", "to_hf"]

#: TransformerLens activation name -> the transformers name of the same function.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_fast": "gelu_fast", "relu": "relu", "silu": "silu"}

Tensor = torch.Tensor


def problems(cfg, state: dict[str, Tensor]) -> list[str]:
    """Every setting of a HookedTransformer (its `cfg` and TransformerLens-named `state`) Phi cannot reproduce exactly.

    `cfg` is a `HookedTransformerConfig` or anything with its attributes (a saved config read back)."""
    wanted = {
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "attention_dir": "causal",
        "attn_only": False,
        "gated_mlp": False,
        "final_rms": False,
        "use_local_attn": False,
        "use_attn_scale": True,
        "scale_attn_by_inverse_layer_idx": False,
        "use_qk_norm": False,
        "use_NTK_by_parts_rope": False,
        "use_yarn_rope": False,
        "use_dynamic_ntk_rope": False,
        "use_logn_attn": False,
        "use_attention_sinks": False,
        "post_embedding_ln": False,
        "use_normalization_before_and_after": False,
        "num_experts": None,
        "clip_qkv": None,
    }
    out = [f"cfg.{k} is {getattr(cfg, k, v)!r} (needs {v!r})" for k, v in wanted.items() if getattr(cfg, k, v) != v]
    if cfg.normalization_type not in ("LN", "LNPre"):
        out.append(f"cfg.normalization_type is {cfg.normalization_type!r} (needs 'LN' or 'LNPre')")
    if cfg.act_fn not in ACTIVATIONS:
        out.append(f"cfg.act_fn is {cfg.act_fn!r} (needs one of {sorted(ACTIVATIONS)})")
    if cfg.n_key_value_heads not in (None, cfg.n_heads):
        out.append(f"cfg.n_key_value_heads is {cfg.n_key_value_heads} (grouped-query attention; needs n_heads)")
    if cfg.d_head * cfg.n_heads != cfg.d_model:
        out.append(f"d_head * n_heads = {cfg.d_head * cfg.n_heads} differs from d_model = {cfg.d_model}")
    if cfg.d_vocab != cfg.d_vocab_out:
        out.append(f"d_vocab {cfg.d_vocab} differs from d_vocab_out {cfg.d_vocab_out}")
    if not math.isclose(cfg.attn_scale, math.sqrt(cfg.d_head), rel_tol=1e-6):
        out.append(f"cfg.attn_scale is {cfg.attn_scale} (needs sqrt(d_head) = {math.sqrt(cfg.d_head)})")
    if (cfg.attn_scores_soft_cap or -1) > 0 or (cfg.output_logits_soft_cap or -1) > 0:
        out.append("logit soft caps are set")
    if getattr(cfg, "rotary_scaling_factor", 1.0) != 1.0:
        out.append(f"cfg.rotary_scaling_factor is {cfg.rotary_scaling_factor} (needs 1.0)")
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        out.append(f"{cfg.original_architecture} normalises after each sublayer")
    if cfg.positional_embedding_type == "rotary" and int(cfg.d_head * (cfg.rotary_dim / cfg.d_head)) != cfg.rotary_dim:
        out.append(f"rotary_dim {cfg.rotary_dim} is not a fraction of d_head {cfg.d_head} Phi can express")
    if cfg.parallel_attn_mlp and cfg.normalization_type == "LN":
        for i in range(cfg.n_layers):
            ln1, ln2 = f"blocks.{i}.ln1.", f"blocks.{i}.ln2."
            if not all(torch.equal(state[ln1 + p], state[ln2 + p]) for p in ("w", "b") if ln2 + p in state):
                out.append(f"block {i} runs attention and MLP in parallel from two different LayerNorms")
                break
    return out


def _norm(state: dict[str, Tensor], prefix: str, d_model: int) -> dict[str, Tensor]:
    if prefix + "w" in state:
        return {"weight": state[prefix + "w"], "bias": state[prefix + "b"]}
    ones = torch.ones(d_model)  # LNPre: a LayerNorm with the identity affine map
    return {"weight": ones, "bias": torch.zeros_like(ones)}


def _attention(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    def heads_in(w: Float[Tensor, "heads d_model d_head"]) -> Float[Tensor, "heads*d_head d_model"]:
        return einops.rearrange(w, "n m h -> (n h) m")

    def heads_bias(b: Float[Tensor, "heads d_head"]) -> Float[Tensor, " heads*d_head"]:
        return einops.rearrange(b, "n h -> (n h)")

    return {
        "q_proj.weight": heads_in(state[prefix + "W_Q"]),
        "q_proj.bias": heads_bias(state[prefix + "b_Q"]),
        "k_proj.weight": heads_in(state[prefix + "W_K"]),
        "k_proj.bias": heads_bias(state[prefix + "b_K"]),
        "v_proj.weight": heads_in(state[prefix + "W_V"]),
        "v_proj.bias": heads_bias(state[prefix + "b_V"]),
        "dense.weight": einops.rearrange(state[prefix + "W_O"], "n h m -> m (n h)"),
        "dense.bias": state[prefix + "b_O"],
    }


def _mlp(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {
        "fc1.weight": state[prefix + "W_in"].T,
        "fc1.bias": state[prefix + "b_in"],
        "fc2.weight": state[prefix + "W_out"].T,
        "fc2.bias": state[prefix + "b_out"],
    }


def _zeros(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.zeros_like(v) for k, v in tensors.items()}


def phi_state_dict(cfg, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[dict]]:
    """The PhiForCausalLM state dict of a HookedTransformer's `cfg` and `state`, and which block part each layer holds.

    `cfg` and `state` should pass `problems` first."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    phi: dict[str, Tensor] = {"model.embed_tokens.weight": state["embed.W_E"]}
    layout: list[dict] = []

    def layer(ln: str, attention: dict, mlp: dict, part: dict) -> None:
        prefix = f"model.layers.{len(layout)}."
        phi.update({f"{prefix}input_layernorm.{k}": v for k, v in _norm(state, ln, cfg.d_model).items()})
        phi.update({f"{prefix}self_attn.{k}": v for k, v in attention.items()})
        phi.update({f"{prefix}mlp.{k}": v for k, v in mlp.items()})
        layout.append(part)

    for i in range(cfg.n_layers):
        attention, mlp = _attention(state, f"blocks.{i}.attn."), _mlp(state, f"blocks.{i}.mlp.")
        if cfg.parallel_attn_mlp:
            layer(f"blocks.{i}.ln1.", attention, mlp, {"block": i, "holds": "attention and MLP"})
        else:
            layer(f"blocks.{i}.ln1.", attention, _zeros(mlp), {"block": i, "holds": "attention (its MLP is zeros)"})
            layer(f"blocks.{i}.ln2.", _zeros(attention), mlp, {"block": i, "holds": "MLP (its attention is zeros)"})
    phi.update({f"model.final_layernorm.{k}": v for k, v in _norm(state, "ln_final.", cfg.d_model).items()})
    phi["lm_head.weight"] = state["unembed.W_U"].T
    phi["lm_head.bias"] = state["unembed.b_U"]
    return {k: v.contiguous() for k, v in phi.items()}, layout


def phi_config(cfg, n_layers: int, tokenizer=None) -> PhiConfig:
    """The PhiConfig of a HookedTransformer's `cfg` written as `n_layers` Phi layers (BOS/EOS/pad from `tokenizer`)."""
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        ids["pad_token_id"] = tokenizer.pad_token_id
    return PhiConfig(
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        hidden_act=ACTIVATIONS[cfg.act_fn],
        max_position_embeddings=cfg.n_ctx,
        layer_norm_eps=cfg.eps,
        tie_word_embeddings=False,
        qk_layernorm=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(cfg.rotary_base),
            "partial_rotary_factor": cfg.rotary_dim / cfg.d_head,
        },
        dtype="float32",
        **ids,
    )


def phi_model(cfg, state: dict[str, Tensor], tokenizer=None) -> tuple[PhiForCausalLM, list[dict]]:
    """The PhiForCausalLM computing what a HookedTransformer (`cfg`, `state`) computes, and its layer layout.

    Settings Phi cannot reproduce exactly raise a ValueError naming each; so do weights of other shapes than the
    config's (checked on the meta device, before the model is allocated)."""
    found = problems(cfg, state)
    if found:
        raise ValueError(
            "This model cannot be written exactly as a Hugging Face PhiForCausalLM: " + "; ".join(found) + "."
        )
    phi, layout = phi_state_dict(cfg, state)
    config = phi_config(cfg, len(layout), tokenizer)
    with torch.device("meta"):  # a config describing another (or a huge) model is refused before allocating it
        expected = {k: tuple(v.shape) for k, v in PhiForCausalLM(config).state_dict().items()}
    wrong = [k for k in expected if k not in phi or tuple(phi[k].shape) != expected[k]]
    wrong += sorted(set(phi) - set(expected))
    if wrong:
        raise ValueError(f"The weights do not match the config (first: {wrong[0]}).")
    hf_model = PhiForCausalLM(config)
    hf_model.load_state_dict(phi, strict=True)
    return hf_model.eval(), layout


def _check_replaceable(path: Path) -> None:
    """Replace only an empty folder or an earlier export holding nothing but the files it wrote."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"Refusing to export to {path}: a file is there. Choose another folder.")
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return
    try:
        written = set(json.loads((path / EXPORT_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        written = set()
    if not written or not entries <= written | {EXPORT_FILE}:
        raise FileExistsError(
            f"Refusing to export to {path}: it holds files that an earlier to_hf did not write. Choose an empty or "
            f"new folder."
        )


def to_hf(model: Model, folder: str | os.PathLike) -> Path:
    """Write `model` (without codebooks) as a Hugging Face PhiForCausalLM folder, with its tokenizer; returns it.

    ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` then gives the same logits (float32), and
    `cbinterp.models.from_hf(folder)` reads it back. A sequential block becomes two Phi layers (see the module
    docstring); ``cbinterp_export.json`` in the folder says which. The write is atomic, and replaces only an empty
    folder or an earlier export. Settings Phi cannot reproduce exactly are refused, each named.
    """
    require_hooked_transformer(model)
    codebooks = get_codebooks(model)
    if codebooks:
        raise ValueError(
            f"The model has codebooks attached ({', '.join(codebooks)}); Hugging Face architectures have no "
            f"codebooks. Export the base model: `cbinterp.detach_codebooks(model)` (its logits then differ from the "
            f"model with codebooks), or the model the codebooks were trained on."
        )
    hf_model, layout = phi_model(model.cfg, model.state_dict(), getattr(model, "tokenizer", None))
    path = Path(folder).expanduser()
    with atomic_dir(path, check=_check_replaceable) as tmp:
        hf_model.save_pretrained(str(tmp))
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir())
        record = {
            "format": "cbinterp-hf-export",
            "architecture": "PhiForCausalLM",
            "default_prepend_bos": bool(model.cfg.default_prepend_bos),
            "layers": layout,
            "files": files,
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return path
