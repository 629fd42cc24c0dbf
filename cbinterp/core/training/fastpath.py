"""Fused kernels for TransformerLens attention and layer norm in training forwards, with every used hook kept.

TransformerLens computes attention and layer norm op by op so that each intermediate (`hook_attn_scores`,
`hook_pattern`, `hook_scale`, `hook_normalized`) can be read and edited. Training reads none of them, and the op-by-op
form costs about as much as the model's matmuls on a CPU (see benchmarks/train_profile.py). Inside
`fast_kernels(model)` (where `train` runs its steps and its `eval_fn`) an attention layer runs
`F.scaled_dot_product_attention` and a layer norm `F.layer_norm`, but only in forwards where nothing could notice: no
hook and no module other than a bare `HookPoint` (such as a codebook) on the skipped hook points, no KV cache, no
padding mask, and a plain causal, global configuration. Any other forward (`run_with_cache`, a hooked pattern,
generation with a cache) takes TransformerLens's own code. Every hook point on the fused path's way (`hook_q`,
`hook_k`, `hook_v`, `hook_rot_q`, `hook_rot_k`, `hook_z`, and so codebooks at `hook_z`) still runs. Results match the
op-by-op forms to float tolerance.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from cbinterp.core.tl_compat import Model

try:
    from transformer_lens.components import Attention, LayerNorm, LayerNormPre
except ImportError:  # TransformerLens 4: only bridges, which run Hugging Face's modules (attention already fused)
    Attention = LayerNorm = LayerNormPre = None

__all__ = ["attention_fusable", "fast_kernels"]

_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _hooked(*points: HookPoint) -> bool:
    """Whether anything would see these hook points: a hook on one, or a module other than a bare `HookPoint` there.

    A `Codebook` attached at `hook_pattern` changes the pattern, with no hook of its own."""
    return any(
        type(p) is not HookPoint or p._forward_hooks or p._forward_pre_hooks or p._backward_hooks for p in points
    )


def attention_fusable(attn: Attention) -> bool:
    """Whether the layer's configuration is one the fused attention reproduces (hooks are checked per forward)."""
    cfg = attn.cfg
    soft_cap = getattr(cfg, "attn_scores_soft_cap", -1.0)
    return (
        type(attn) is Attention
        and getattr(attn, "attn_type", "global") == "global"  # local layers mask to a window, not just causally
        and cfg.positional_embedding_type in ("standard", "rotary", "shortformer")
        and (attn._attention_dir_override or cfg.attention_dir) == "causal"
        and not cfg.use_attn_result
        and not cfg.load_in_4bit
        and not getattr(cfg, "use_attention_sinks", False)
        and not (soft_cap is not None and soft_cap > 0)
        and getattr(cfg, "clip_qkv", None) is None
        and cfg.original_architecture not in _OLMO
        and cfg.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    )


def _rotate(attn: Attention, x: Tensor) -> Tensor | None:
    """TransformerLens's rotary embedding without a cache offset or mask, by the same formula (bit for bit).

    None when the cached sin/cos tables are too short (TransformerLens then extends them)."""
    cfg = attn.cfg
    pos = x.size(1)
    cos, sin = attn.rotary_cos, attn.rotary_sin
    if pos > cos.shape[0] or x.device != cos.device:
        return None
    x_rot, x_pass = x[..., : cfg.rotary_dim], x[..., cfg.rotary_dim :]
    if cfg.rotary_adjacent_pairs:
        flip = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        half = x_rot.size(-1) // 2
        flip = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    rotated = x_rot * cos[None, :pos, None, :] + flip * sin[None, :pos, None, :]
    return rotated if x_pass.size(-1) == 0 else torch.cat((rotated, x_pass), dim=-1)


def _attention_forward(self: Attention, query_input, key_input, value_input, *args, **kwargs):
    original = self._cbinterp_original_forward
    extra = list(args) + [v for v in kwargs.values()]
    if (
        any(v is not None for v in extra)  # KV cache, additive or padding mask, position bias
        or (self.cfg.use_logn_attn and not self.training)
        or (self.cfg.use_dynamic_ntk_rope and not self.training)
        or _hooked(self.hook_attn_scores, self.hook_pattern)
    ):
        return original(query_input, key_input, value_input, *args, **kwargs)
    q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
    if self.cfg.positional_embedding_type == "rotary":
        q_rot, k_rot = _rotate(self, q), _rotate(self, k)
        if q_rot is None or k_rot is None:
            return original(query_input, key_input, value_input, *args, **kwargs)
        q, k = self.hook_rot_q(q_rot), self.hook_rot_k(k_rot)
    if k.size(2) != q.size(2):  # grouped keys and values: TransformerLens's own code knows the layout
        return original(query_input, key_input, value_input, *args, **kwargs)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=1.0 / float(self.attn_scale)
    ).transpose(1, 2)
    z = self.hook_z(z)  # (batch, pos, head, d_head), as TransformerLens gives it
    w = self.W_O.reshape(self.cfg.n_heads * self.cfg.d_head, self.cfg.d_model).T
    return F.linear(z.reshape(z.shape[0], z.shape[1], -1).to(w.dtype), w, self.b_O)


def _layer_norm_forward(self, x: Tensor) -> Tensor:
    if _hooked(self.hook_scale, self.hook_normalized) or self.cfg.dtype not in (torch.float32, torch.float64):
        return self._cbinterp_original_forward(x)
    weight, bias = (self.w, self.b) if isinstance(self, LayerNorm) else (None, None)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)


@contextlib.contextmanager
def fast_kernels(model: Model, enabled: bool = True) -> Iterator[int]:
    """Within the block, fusable attention and layer-norm layers of `model` take the fused kernels.

    See the module docstring. Yields how many layers were switched. Nested or disabled, it changes nothing."""
    switched = []
    # A TransformerBridge runs Hugging Face's own layers, none of which is switched: it keeps its own kernels.
    if enabled and Attention is not None:
        for module in model.modules():
            if "_cbinterp_original_forward" in module.__dict__:
                continue  # already switched by an enclosing block
            if isinstance(module, Attention) and attention_fusable(module):
                new = _attention_forward
            elif type(module) in (LayerNorm, LayerNormPre):
                new = _layer_norm_forward
            else:
                continue
            own = module.__dict__.get("forward")  # an instance-level forward someone else set, put back after
            module._cbinterp_original_forward = module.forward
            module.forward = types.MethodType(new, module)
            switched.append((module, own))
    try:
        yield len(switched)
    finally:
        for module, own in switched:
            del module._cbinterp_original_forward
            if own is None:
                del module.forward
            else:
                module.forward = own
