"""A model saved from a HookedTransformer, rebuilt as a TransformerBridge (TransformerLens 4 has no HookedTransformer).

The weights become the Hugging Face `PhiForCausalLM` that `to_hf` exports (the same logits), the bridge boots from it,
and each codebook goes where the same activation is. Phi runs attention and MLP in parallel from one LayerNorm, so a
sequential block is two Phi layers and hook names move: block L's attention is layer 2L, its MLP layer 2L + 1
(`blocks.1.attn.hook_z` -> `blocks.2.attn.hook_z`, `blocks.1.hook_mlp_out` -> `blocks.3.hook_mlp_out`).
`hooked_names(model)` maps each codebook's name back to the one it was saved under.

`cbinterp.load` takes this path by itself on TransformerLens 4 for a folder saved from a HookedTransformer (the
shipped models, a FSM run's models), so they load on either major version.
"""

from __future__ import annotations

import math
import re
import types

import torch
from torch import Tensor

from cbinterp.core import tl_compat as tc
from cbinterp.core.codebooks.attach import get_codebooks, insert_codebook, refresh_hooks
from cbinterp.core.codebooks.codebook import Codebook, CodebookConfig
from cbinterp.core.device import default_device
from cbinterp.models.to_hf import phi_model

__all__ = ["bridge_from_hooked", "bridge_name", "hooked_names"]

#: The attribute a rebuilt bridge keeps its codebooks' saved names in ({name on the bridge: name as saved}).
HOOKED_NAMES_ATTR = "cbinterp_hooked_names"

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
#: Hook names of a block that belong to its attention (ln1, attn.*) or to its MLP (ln2, mlp.*) sublayer.
_ATTENTION = ("hook_attn_in", "hook_attn_out", "hook_q_input", "hook_k_input", "hook_v_input", "hook_resid_pre")
_MLP = ("hook_mlp_in", "hook_mlp_out", "hook_resid_post")

#: Settings a config saved by an older TransformerLens may lack, with the value HookedTransformerConfig gives them.
_DEFAULTS = {
    "normalization_type": "LN",
    "n_key_value_heads": None,
    "d_vocab_out": -1,
    "attn_scores_soft_cap": -1.0,
    "output_logits_soft_cap": -1.0,
    "original_architecture": None,
    "parallel_attn_mlp": False,
    "rotary_base": 10000,
    "eps": 1e-5,
    "default_prepend_bos": True,
}


def _config(model_config: dict):
    """A saved HookedTransformerConfig dict as an object with its attributes (filled where an older one lacks them)."""
    data = {**_DEFAULTS, **model_config}
    data.setdefault("d_head", data["d_model"] // data["n_heads"])
    data.setdefault("attn_scale", math.sqrt(data["d_head"]))
    data.setdefault("rotary_dim", data["d_head"])
    if data["d_vocab_out"] in (None, -1):
        data["d_vocab_out"] = data["d_vocab"]
    return types.SimpleNamespace(**data)


def bridge_name(name: str, layout: list[dict]) -> str:
    """The hook name on the Phi bridge of hook `name` of the HookedTransformer that `layout` (`phi_state_dict`'s) maps.

    Raises a ValueError for a name inside a block that is neither its attention's nor its MLP's."""
    match = _BLOCK.match(name)
    if match is None:  # hook_embed, ln_final.*, ...: outside the blocks, the same on both
        return name
    block, rest = int(match.group(1)), match.group(2)
    layers = [i for i, part in enumerate(layout) if part["block"] == block]
    if not layers:
        raise ValueError(f"{name!r}: the model has no block {block}.")
    attention, mlp = layers[0], layers[-1]
    if rest in _ATTENTION or rest.startswith(("attn.", "ln1.")):
        return f"blocks.{attention}.{rest}"
    if rest in _MLP or rest.startswith(("mlp.", "ln2.")):
        return f"blocks.{mlp}.{rest}"
    if rest == "hook_resid_mid":  # between the two sublayers: after the attention's Phi layer
        return f"blocks.{attention}.hook_resid_post"
    raise ValueError(
        f"{name!r} has no place on a bridge of the exported model (block {block} is Phi layers {layers}); codebooks "
        f"after attention heads, the MLP, or on the residual stream map."
    )


def hooked_names(model) -> dict[str, str]:
    """{codebook name on `model`: the name it was saved under}; the identity for a model that was not rebuilt."""
    saved = getattr(model, HOOKED_NAMES_ATTR, {})
    return {name: saved.get(name, name) for name in get_codebooks(model)}


def bridge_from_hooked(
    model_config: dict,
    state: dict[str, Tensor],
    codebooks: dict[str, dict],
    tokenizer=None,
    device: str | torch.device | None = None,
):
    """The TransformerBridge of a saved HookedTransformer, with its codebooks (and their trained state) in place.

    Args:
        model_config: the saved `HookedTransformerConfig` as a dict.
        state: its state dict (TransformerLens names), codebooks' entries included.
        codebooks: {hook name as saved: `CodebookConfig` fields}.
        tokenizer: the saved tokenizer, if any (the bridge boots with it).
    """
    if not tc.BRIDGE_SUPPORTED:
        raise RuntimeError(
            f"transformer-lens {tc.TL_VERSION}: cbinterp takes a TransformerBridge from transformer-lens 4 on; here, "
            "load the model as the HookedTransformer it was saved from (cbinterp.load)."
        )
    cfg = _config(model_config)
    hf_model, layout = phi_model(cfg, state, tokenizer)
    model = tc.boot_bridge(hf_model, tokenizer=tokenizer, device=device or default_device())
    if hasattr(model.cfg, "default_prepend_bos"):
        model.cfg.default_prepend_bos = bool(cfg.default_prepend_bos)
    names = {}
    for name, cb_config in codebooks.items():
        new = bridge_name(name, layout)
        codebook = Codebook.from_config(CodebookConfig(**cb_config), device=model.cfg.device, dtype=model.cfg.dtype)
        prefix = name + "."
        codebook.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        insert_codebook(model, new, codebook, setup=False)
        names[new] = name
    refresh_hooks(model)
    setattr(model, HOOKED_NAMES_ATTR, names)
    return model.eval()
