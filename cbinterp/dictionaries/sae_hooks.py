"""Sparse autoencoders at hook names of a HookedTransformer, their latents cached as a codebook's codes are.

`attach_saes(model, {"blocks.0.attn.hook_z": sae, ...})` puts an `SAEHook` at each hook name (as
`attach_codebooks` puts a `Codebook`). Its nested hook points show the SAE's work in `run_with_cache` and to hooks:

    <site>.hook_input    the activation the SAE reads
    <site>.hook_latents  the latents `(batch, pos, [heads,] n_latents)`; a hook that rewrites them (e.g. forces a
                         latent on, for steering) changes the reconstruction
    <site>.hook_codes    the most active latent ids `(batch, pos, [heads,] n_ids)`, -1 past the active ones: the
                         same form as a codebook's `hook_codes` (read only: rewriting it changes nothing)
    <site>.hook_recon    the reconstruction

By default the reconstruction replaces the activation downstream ("spliced", no error term). In
`saes_observed(model)` the activation passes through unchanged while everything above is still computed (SAELens'
`use_error_term=True`): the model computes as without SAEs, each SAE reading the clean activation.

`cache_latents(model, documents, hooks)` is `cache_documents` for such a model: a `CodeCache` in which each SAE
site is a "codebook" whose codes are its latent ids, so that `probe_heldout`, `top_tokens`, `context_view` and every
other code query read SAE latents exactly as they read codes (a latent "fires" on a token where it is among the
token's listed ids, i.e. active).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from cbinterp.codecache.documents import text_token_mask
from cbinterp.codecache.identity import model_identity, new_marker
from cbinterp.codecache.layout import code_dtype, stored_codes
from cbinterp.codecache.store import CodeCache
from cbinterp.core.checks import check_token_ids, is_int
from cbinterp.core.codebooks.attach import get_codebooks, insert_codebook, refresh_hooks, resolve_sites
from cbinterp.core.codebooks.naming import did_you_mean
from cbinterp.core.tl_compat import Model
from cbinterp.dictionaries.sae import SparseAutoencoder

__all__ = ["SAEHook", "attach_saes", "cache_latents", "detach_saes", "force_latent", "get_saes", "saes_observed"]


class SAEHook(HookPoint):
    """An SAE placed at a hook name (see the module docstring); `observe_only` passes the activation through."""

    def __init__(self, sae: SparseAutoencoder):
        super().__init__()
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(f"SAEHook holds a SparseAutoencoder, got {type(sae).__name__}.")
        self.sae = sae
        self.observe_only = False
        self.hook_input = HookPoint()
        self.hook_latents = HookPoint()
        self.hook_codes = HookPoint()
        self.hook_recon = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos ..."]) -> Float[Tensor, "batch pos ..."]:
        """The reconstruction (or, observing only, `x` itself); latents and ids go to the nested hooks."""
        x = self.hook_input(x)
        latents = self.hook_latents(self.sae.encode(x))
        self.hook_codes(self.sae.active_ids(latents))
        recon = self.hook_recon(self.sae.decode(latents).to(x.dtype))
        return x if self.observe_only else recon


def get_saes(model: Model) -> dict[str, SAEHook]:
    """Every attached SAE, by the hook name it sits at, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SAEHook)}


def attach_saes(model: Model, saes: Mapping[str, SparseAutoencoder]) -> Model:
    """Put each SAE at its hook name (in place; moved to the model's device and dtype) and return the model.

    Each SAE must fit its site's activation: `(d_in,)` per position, or `(groups, d_in)` (heads at `hook_z`)."""
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError("attach_saes takes a non-empty mapping from hook name to SparseAutoencoder.")
    names = [name for _, name in resolve_sites(model, list(saes))]
    taken = {**get_codebooks(model), **get_saes(model)}
    shapes = {}

    def record(tensor, hook):
        shapes[hook.name] = tuple(tensor.shape[2:])

    with torch.no_grad():
        model.run_with_hooks(
            torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device),
            fwd_hooks=[(n, record) for n in names if n not in taken],
        )
    for name, sae in zip(names, saes.values()):
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(f"The value for {name!r} is a {type(sae).__name__}, not a SparseAutoencoder.")
        if name in taken:
            raise ValueError(f"{name} already holds a codebook or an SAE; detach it first.")
        c = sae.cfg
        want = (c.d_in,) if c.groups == 1 else (c.groups, c.d_in)
        if shapes[name] != want:
            raise ValueError(
                f"The SAE for {name} reads activations of per-position shape {want}, but {name} has "
                f"{shapes[name]}; attach it at the site it was trained on."
            )
    for name, sae in zip(names, saes.values()):
        insert_codebook(model, name, SAEHook(sae.to(device=model.cfg.device, dtype=model.cfg.dtype)), setup=False)
    refresh_hooks(model)
    return model


def detach_saes(model: Model, names: Sequence[str] | None = None) -> Model:
    """Remove the SAEs (all, or those at `names`), restoring plain hook points; returns the model."""
    saes = get_saes(model)
    for name in saes if names is None else names:
        if name not in saes:
            raise ValueError(f"No SAE at {name!r}{did_you_mean(name, saes)} SAEs are at {list(saes)}.")
        insert_codebook(model, name, HookPoint(), setup=False)
    refresh_hooks(model)
    return model


@contextlib.contextmanager
def saes_observed(model: Model) -> Iterator[Model]:
    """Inside, every SAE computes its latents but passes its activation through (the model's own outputs)."""
    saes = list(get_saes(model).values())
    before = [s.observe_only for s in saes]
    for s in saes:
        s.observe_only = True
    try:
        yield model
    finally:
        for s, was in zip(saes, before):
            s.observe_only = was


def force_latent(
    site: str, latent: int, value: float, head: int | None = None, last_only: bool = False
) -> tuple[str, Callable]:
    """A hook `(name, fn)` that sets `latent` of the SAE at `site` to `value` at every position.

    In `head` only for a per-head SAE (every head when None). For `run_with_hooks`, `model.hooks` or `generate`:
    steering with a latent, as `force_codes` steers with a code. The SAE must be spliced (not observed) for it to
    change anything. With `last_only`, only at the last position of each forward pass: in a `generate` with its
    (default) KV cache, that is from the prompt's last position on, where `generate_with_codes` forces codes."""
    if not is_int(latent) or latent < 0:
        raise ValueError(f"latent must be an int >= 0, got {latent!r}.")
    if head is not None and (not is_int(head) or head < 0):
        raise ValueError(f"head must be None (every head) or an int >= 0, got {head!r}.")

    def hook(latents: Tensor, hook) -> Tensor:
        if latent >= latents.shape[-1]:
            raise ValueError(f"latent {latent} is out of range: {hook.name} has {latents.shape[-1]} latents.")
        target = latents[:, -1:] if last_only else latents  # a view: writing it writes `latents`
        if head is None:
            target[..., latent] = value
        else:
            if latents.dim() < 4 or head >= latents.shape[-2]:
                raise ValueError(f"head {head} is out of range for {hook.name}'s latents {tuple(latents.shape)}.")
            target[..., head, latent] = value
        return latents

    return f"{site}.hook_latents", hook


@torch.no_grad()
def cache_latents(
    model: Model,
    documents,
    hooks: Sequence[str] = (),
    batch_size: int = 16,
    activation_dtype: torch.dtype = torch.float16,
) -> CodeCache:
    """What `cache_documents` makes of a codebook model, for a model with SAEs: their latent ids as codes.

    `documents` is a `DocumentTokens` (`tokenize_documents`); only text tokens are kept (no BOS, no padding), `doc`
    and `pos` numbered as `cache_documents` numbers them. Each SAE site is a "codebook" of the cache (`n_codes` =
    n_latents, `k` = the ids listed per token, `cfg.ids_per_token`). The SAEs read the clean activations
    (`saes_observed`), so each one's latents are those it was trained on, and `hooks`' activations (stored as
    `activation_dtype`, float16 as `cache_documents`) are those of the model without SAEs. A model with codebooks of
    its own is refused: its codes would be mixed with the latents. The cache lives in memory."""
    saes = get_saes(model)
    if not saes:
        raise ValueError("The model has no SAEs; attach some with attach_saes first.")
    if get_codebooks(model):
        raise ValueError("cache_latents caches SAE latents of a model without codebooks; this one has codebooks.")
    hooks = list(hooks)
    unknown = [h for h in hooks if h not in model.hook_dict]
    if unknown:
        raise ValueError(f"Unknown hook {unknown[0]!r}{did_you_mean(unknown[0], model.hook_dict)}")
    tokens, mask = torch.as_tensor(documents.tokens), torch.as_tensor(documents.mask)
    doc_index = torch.as_tensor(documents.doc_index).reshape(-1)
    if tokens.dim() != 2 or mask.shape != tokens.shape or mask.dtype != torch.bool or len(doc_index) != len(tokens):
        raise ValueError("documents must be a DocumentTokens (tokenize_documents): tokens, a bool mask, doc_index.")
    check_token_ids(tokens[mask], model.cfg.d_vocab, "documents")
    rows, seq = tokens.shape
    row_in_doc = torch.zeros(rows, dtype=torch.long)
    for i in range(1, rows):  # rows of a document are consecutive
        row_in_doc[i] = row_in_doc[i - 1] + 1 if doc_index[i] == doc_index[i - 1] else 0
    keep = text_token_mask(mask)
    position = row_in_doc[:, None] * (seq - 1) + torch.arange(seq)[None, :] - 1
    code_hooks = {f"{name}.hook_codes": name for name in saes}
    wanted = set(hooks) | set(code_hooks)
    parts: dict[str, list[Tensor]] = {key: [] for key in [*(f"act/{h}" for h in hooks), *code_hooks]}
    with saes_observed(model):
        for start in range(0, rows, batch_size):
            batch = tokens[start : start + batch_size].masked_fill(~mask[start : start + batch_size], 0)
            here = keep[start : start + batch_size]
            _, cache = model.run_with_cache(batch.to(model.cfg.device), names_filter=lambda n: n in wanted)
            for h in hooks:
                parts[f"act/{h}"].append(cache[h][here.to(cache[h].device)].to("cpu", activation_dtype))
            for h in code_hooks:
                parts[h].append(cache[h][here.to(cache[h].device)].to("cpu", torch.int32))
    arrays = {
        "tokens": tokens[keep].to(torch.int32),
        "doc": doc_index[:, None].expand(rows, seq)[keep].to(torch.int32),
        "pos": position[keep].to(torch.int32),
    }
    entries = {}
    for hook, name in code_hooks.items():
        c = saes[name].sae.cfg
        arrays[f"codes/{name}"] = stored_codes(torch.cat(parts[hook]), code_dtype(c.n_latents))
        shape = [c.groups, c.ids_per_token] if c.groups > 1 else [c.ids_per_token]
        entries[name] = {"n_codes": c.n_latents, "k": c.ids_per_token, "groups": c.groups, "dim": c.d_in}
        entries[name]["shape"] = shape
    for h in hooks:
        arrays[f"act/{h}"] = torch.cat(parts[f"act/{h}"])
    identity = model_identity(model) | {"codebooks": entries}
    meta = new_marker(model, identity, hooks, activation_dtype, None)
    meta.update(n_tokens=int(keep.sum()), n_docs=int(torch.unique(arrays["doc"]).numel()))
    return CodeCache(meta, arrays=arrays, tokenizer=getattr(model, "tokenizer", None))
