"""Interventions on codebook codes: hooks that replace, force or ablate code ids, and steered generation.

Every helper returns an ordinary TransformerLens hook `(hook_name, fn)` on `<codebook name>.hook_codes`, so it
composes with `model.run_with_hooks(tokens, fwd_hooks=[...])`, `model.hooks(...)`, `intervene(model, ...)` and
`model.generate`. A codebook's output is the sum of the codes its `hook_codes` returns (-1 = no code), so
rewriting the ids is the whole intervention.

Selections follow numpy indexing of the code tensor `(batch, pos, k)` or `(batch, pos, heads, k)`:
`positions` picks along `pos` (an int or a per-example `(batch,)` tensor drops the axis, a slice, a list or a
`(batch, n)` tensor keeps it), `heads` along `heads` (an int drops the axis, a list or None keeps it). The selection
thus has the axes `(batch, [positions], [heads], ids)`, and the codes given are either 1-d ids (the same at every
selected place) or have exactly one axis per selected axis, each of its size or of size 1 (the same along it): per
example codes for every position are `(batch, 1, n)`, never `(batch, n)`, which numpy would read as one row per
position, silently so when the batch size equals the number of positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from cbinterp.core.checks import check_token_ids, is_int
from cbinterp.core.codebooks.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.codebooks.naming import CODES_SUFFIX, codes_hook_name, did_you_mean
from cbinterp.core.codebooks.selection import (
    CodesLike,
    HeadsLike,
    PositionsLike,
    _broadcast,
    _parse_codes,
    _parse_heads,
    _Positions,
    _selected_axes,
    _shape_hint,
)
from cbinterp.core.tl_compat import Model

__all__ = ["ablate_codes", "force_codes", "generate_with_codes", "intervene", "replace_codes", "steering_hooks"]

HookFn = Callable[..., Tensor]
Hook = tuple[str, HookFn]


# -- finding the codebook -----------------------------------------------------------------------------------
def resolve_codebook(model: Model, codebook: str | Codebook) -> tuple[str, Codebook]:
    """The `(name, Codebook)` for a codebook given by its hook name (with or without `.hook_codes`) or itself."""
    require_hooked_transformer(model)
    codebooks = get_codebooks(model)
    if isinstance(codebook, Codebook):
        for name, cb in codebooks.items():
            if cb is codebook:
                return name, cb
        raise ValueError(
            f"This Codebook is not part of the model (its codebooks are at {list(codebooks)}); pass one of the "
            f"model's own codebooks, or its hook name."
        )
    if not isinstance(codebook, str):
        raise TypeError(f"codebook must be a hook name (str) or a Codebook, got {type(codebook).__name__}.")
    name = codebook.removesuffix(CODES_SUFFIX)
    if name in codebooks:
        return name, codebooks[name]
    if not codebooks:
        raise ValueError(f"No codebook at {codebook!r}: the model has no codebooks. Attach some with attach_codebooks.")
    raise ValueError(
        f"No codebook at {codebook!r}. The model's codebooks: {list(codebooks)}{did_you_mean(name, codebooks)}"
    )


# -- one hook ----------------------------------------------------------------------------------------------
def _make_hook(
    model: Model,
    codebook: str | Codebook,
    positions: PositionsLike,
    heads: HeadsLike,
    rewrite: Callable[[Tensor, str, tuple[str, ...]], Tensor],
    codes: Tensor | None = None,
    what: str = "codes",
) -> Hook:
    """A hook on `<codebook>.hook_codes` that passes the selected `(..., k)` code ids through `rewrite`.

    `codes`, when given, are the ids `rewrite` writes: checked here to be 1-d or to have one axis per selected
    axis (`_selected_axes`), so they never broadcast along an axis they were not meant for."""
    name, cb = resolve_codebook(model, codebook)
    where = _Positions.parse(positions) if not isinstance(positions, _Positions) else positions
    head_index = _parse_heads(heads, name, cb)
    hook_name = codes_hook_name(name)
    axes = _selected_axes(where, head_index)
    if codes is not None and codes.dim() not in (1, len(axes)):
        raise ValueError(
            f"{what} of shape {tuple(codes.shape)} for {name} are ambiguous: the selected codes have the axes "
            f"({', '.join(axes)}). Give 1-d ids (the same at every selected place) or a tensor with one axis per "
            f"selected axis, size 1 where the same ids apply along it; {_shape_hint(axes)}."
        )

    # TransformerLens calls fn(activation, hook=hook_point): the second argument must be named `hook`.
    def fn(codes: Int[Tensor, "batch pos *heads k"], hook: HookPoint) -> Int[Tensor, "batch pos *heads k"]:
        rows, pos = where.index(codes.shape[0], codes.shape[1], codes.device, hook_name)
        if head_index is None:
            index = (rows, pos)
        elif head_index.dim() == 0:
            index = (rows, pos, head_index.to(codes.device))
        else:  # a head axis after the (batch, positions) ones
            index = (rows[..., None], pos[..., None], head_index.to(codes.device))
        index = torch.broadcast_tensors(*index)
        out = codes.clone()  # never write into the tensor the codebook (or a cache) holds
        out[index] = rewrite(codes[index], hook_name, axes)
        return out

    fn.__name__ = fn.__qualname__ = f"{rewrite.__name__}@{hook_name}"  # shows in model.list_hooks()
    return hook_name, fn


# -- the three interventions ------------------------------------------------------------------------------
def replace_codes(
    model: Model,
    codebook: str | Codebook,
    codes: CodesLike,
    *,
    positions: PositionsLike = None,
    heads: HeadsLike = None,
) -> Hook:
    """A hook that sets the code ids at the chosen positions (and heads) of a codebook to `codes`.

    Args:
        codebook: the codebook's hook name (e.g. "blocks.2.hook_mlp_out") or the Codebook itself.
        codes: an int, a list of up to k ids, or a tensor: 1-d ids, or one axis per selected axis `(batch,
            [positions], [heads], ids)`, each of the selection's size or 1 (e.g. `(batch, 1, n)` for per-example
            codes at every position); fewer than k ids fill the remaining slots with -1 (no code), and -1 may be
            given explicitly.
        positions: None (all), an int (negative counts from the end), a slice, a list of ints (the same in every
            example), a `(batch,)` tensor (one position per example) or a `(batch, n)` tensor / list of lists.
        heads: for per-head attention codebooks, None (all), an int or a list of ints. A codebook without heads
            (an MLP codebook) takes None (or a missing value such as a table's `pd.NA` head; 0, its only group, is
            accepted too).

    Returns:
        `(hook_name, fn)` for `fwd_hooks`, `model.hooks` or `intervene`.
    """
    name, cb = resolve_codebook(model, codebook)
    ids = _parse_codes(codes, name, cb, allow_empty=True, what="codes")
    if ids.shape[-1] > cb.k:
        raise ValueError(
            f"{ids.shape[-1]} code ids given for {name}, which has k={cb.k} slots; give at most {cb.k} ids per "
            "position. "
            "The last axis of a codes tensor lists the ids: for one id per example or position, add it (codes[..., "
            "None])."
        )
    if ids.shape[-1] < cb.k:  # the unnamed slots hold no code
        ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], cb.k - ids.shape[-1]), -1)], dim=-1)

    def replace(selected: Tensor, hook_name: str, axes: tuple[str, ...]) -> Tensor:
        return _broadcast(ids.to(selected.device), tuple(selected.shape), axes, hook_name, "codes")

    return _make_hook(model, cb, positions, heads, replace, codes=ids, what="codes")


def force_codes(
    model: Model,
    codebook: str | Codebook,
    codes: CodesLike,
    *,
    positions: PositionsLike = None,
    heads: HeadsLike = None,
) -> Hook:
    """A hook that makes `codes` active beside the codebook's own top-(k - n) choices, n being the number forced.

    The forced ids take the last n slots; the first k - n slots keep the best chosen codes that are not forced
    (so a forced code the codebook chose anyway is not counted twice). With n == k the forced codes replace all.
    Repeat an id to give it more weight (its vector is summed once per slot).

    Args:
        codes: an int, a list of n <= k ids, or a tensor of n ids along its last axis, shaped as in
            `replace_codes`.
        positions, heads: as in `replace_codes`.

    Returns:
        `(hook_name, fn)`.
    """
    name, cb = resolve_codebook(model, codebook)
    forced = _parse_codes(codes, name, cb, allow_empty=False, what="forced codes")
    n = forced.shape[-1]
    if n > cb.k:
        raise ValueError(
            f"{n} codes forced at {name}, which has only k={cb.k} slots; force at most {cb.k} codes "
            f"(k == n replaces all of the codebook's own choices)."
        )
    keep = cb.k - n

    def force(selected: Tensor, hook_name: str, axes: tuple[str, ...]) -> Tensor:
        wanted = _broadcast(forced.to(selected.device), (*selected.shape[:-1], n), axes, hook_name, "forced codes")
        if keep == 0:
            return wanted.clone()
        is_forced = (selected[..., :, None] == wanted[..., None, :]).any(-1)
        # a stable sort moves forced ids behind the others and keeps the codebook's best-first order
        order = torch.sort(is_forced.to(torch.int8), dim=-1, stable=True).indices
        kept = selected.gather(-1, order[..., :keep])
        return torch.cat([kept, wanted], dim=-1)

    return _make_hook(model, cb, positions, heads, force, codes=forced, what="forced codes")


def ablate_codes(
    model: Model,
    codebook: str | Codebook,
    codes: CodesLike,
    *,
    positions: PositionsLike = None,
    heads: HeadsLike = None,
) -> Hook:
    """A hook that removes the given code ids wherever they fire (their slot becomes -1, no code).

    Args:
        codes: an int or a list / 1-d tensor of the ids to remove.
        heads, positions: as in `replace_codes` (note the order: heads first).

    Returns:
        `(hook_name, fn)`.
    """
    name, cb = resolve_codebook(model, codebook)
    ids = _parse_codes(codes, name, cb, allow_empty=False, what="codes to ablate").flatten()

    def ablate(selected: Tensor, hook_name: str, axes: tuple[str, ...]) -> Tensor:
        return selected.masked_fill(torch.isin(selected, ids.to(selected.device)), -1)

    return _make_hook(model, cb, positions, heads, ablate)


# -- applying hooks ---------------------------------------------------------------------------------------
def _flatten_hooks(model: Model, hook_lists: Sequence) -> list[Hook]:
    hooks = []
    for item in hook_lists:
        is_hook = isinstance(item, tuple) and len(item) == 2 and (isinstance(item[0], str) or callable(item[0]))
        for hook in [item] if is_hook else list(item):
            if not (
                isinstance(hook, tuple)
                and len(hook) == 2
                and callable(hook[1])
                and (isinstance(hook[0], str) or callable(hook[0]))
            ):
                raise TypeError(f"Expected hooks as (hook_name, fn) pairs or lists of them, got {hook!r}.")
            if isinstance(hook[0], str) and hook[0] not in model.hook_dict:
                raise ValueError(
                    f"Unknown hook name {hook[0]!r}{did_you_mean(hook[0], model.hook_dict)} See model.hook_dict."
                )
            hooks.append(hook)
    return hooks


@contextlib.contextmanager
def intervene(model: Model, *hook_lists: Hook | Sequence[Hook]) -> Iterator[Model]:
    """Run a block of calls (forward passes, `run_with_cache`, `generate`) with the given hooks.

    They are removed on exit, also on an exception. Arguments are hooks or lists of hooks, applied in the order
    given.

    Hooks added inside the block (e.g. `run_with_cache`'s) run after these, so a cache sees the rewritten codes.
    """
    require_hooked_transformer(model)
    hooks = _flatten_hooks(model, hook_lists)
    # model.hooks removes what it added at its own context level in a `finally`, and nothing else
    with model.hooks(fwd_hooks=hooks):
        yield model


# -- steered generation -----------------------------------------------------------------------------------
def _steering_ids(ids: Tensor, name: str, cb: Codebook) -> Tensor:
    """Steering codes `([batch,] [heads,] n)` with a size-1 positions axis put in: `(batch, 1, [heads,] n)`.

    1-d ids stay 1-d. Generation has no fixed positions, so the axes besides the ids are named by the codebook: for a
    per-head codebook a 2-d tensor lists ids per head, for one without heads it lists ids per example."""
    if ids.dim() == 1:
        return ids
    if cb.grouped:
        forms = "(n,), (heads, n) or (batch, heads, n)"
        if ids.dim() == 2:
            ids = ids[None]
    else:
        forms = "(n,) or (batch, n)"
    if ids.dim() != (3 if cb.grouped else 2):
        raise ValueError(
            f"steering codes of shape {tuple(ids.shape)} for {name}: give {forms}, the last axis listing the ids."
        )
    if cb.grouped and ids.shape[1] not in (1, cb.cfg.groups):
        raise ValueError(
            f"steering codes of shape {tuple(ids.shape)} for {name}, which has {cb.cfg.groups} heads: the axis "
            f"before the ids lists heads, so it needs {cb.cfg.groups} entries (or 1: the same ids in every head)."
        )
    return ids[:, None]


def steering_hooks(
    model: Model,
    codebook_codes: Mapping[str, CodesLike],
    n_slots: None | int | Mapping[str, int] = None,
    prompt_len: int | None = None,
    prompt: bool = False,
) -> list[Hook]:
    """`force_codes` hooks for generation: per codebook, its codes tiled over `n_slots` slots.

    They are forced at the positions that predict new tokens (from the prompt's last position on; all positions with
    `prompt=True`).

    Args:
        codebook_codes: codebook name -> code ids: an int, a list, or a tensor whose last axis lists the ids, with
            the axes `(n,)` or `(batch, n)` for a codebook without heads, and `(n,)`, `(heads, n)` or
            `(batch, heads, n)` for a per-head codebook.
        n_slots: how many of the k slots the forced codes take (the strength): None = one per code given; an int
            for every codebook or a mapping by name. Codes are repeated in turn to fill the slots.
        prompt_len: the prompt's length (needed unless `prompt=True`).
    """
    if not isinstance(codebook_codes, Mapping):
        raise TypeError(
            f"codebook_codes must be a mapping from codebook name to code ids, got {type(codebook_codes).__name__}."
        )
    if not codebook_codes:
        raise ValueError("codebook_codes is empty; give at least one codebook name -> code ids.")
    if not isinstance(prompt, bool):
        raise TypeError(f"prompt must be True or False, got {prompt!r}.")
    if not prompt and not (is_int(prompt_len) and prompt_len >= 1):
        raise ValueError(f"prompt_len must be a positive int to steer only the new positions, got {prompt_len!r}.")
    if isinstance(n_slots, Mapping):
        names = {resolve_codebook(model, key)[0] for key in codebook_codes}
        unknown = [key for key in n_slots if resolve_codebook(model, key)[0] not in names]
        if unknown:
            raise ValueError(
                f"n_slots names {unknown}, which codebook_codes does not steer; give n_slots only for the codebooks "
                f"in codebook_codes ({list(codebook_codes)})."
            )
    where = _Positions("generated", (int(prompt_len or 1), prompt))
    hooks = []
    for key, codes in codebook_codes.items():
        name, cb = resolve_codebook(model, key)
        ids = _steering_ids(_parse_codes(codes, name, cb, allow_empty=False, what="steering codes"), name, cb)
        slots = n_slots.get(key, n_slots.get(name)) if isinstance(n_slots, Mapping) else n_slots
        slots = ids.shape[-1] if slots is None else slots
        if not is_int(slots) or not ids.shape[-1] <= slots <= cb.k:
            raise ValueError(
                f"n_slots={slots!r} for {name}: it must be an int from the number of codes given ({ids.shape[-1]}) "
                f"to the codebook's k={cb.k}."
            )
        ids = ids[..., torch.arange(int(slots)) % ids.shape[-1]]
        hooks.append(force_codes(model, cb, ids, positions=where))
    return hooks


def generate_with_codes(
    model: Model,
    tokens: str | Int[Tensor, "batch pos"] | Int[Tensor, " pos"],
    codebook_codes: Mapping[str, CodesLike],
    n_slots: None | int | Mapping[str, int] = None,
    max_new_tokens: int = 10,
    prompt: bool = False,
    **generate_kwargs,
):
    """`model.generate` with codes forced at every position that predicts a new token.

    Without `prompt`, the codes are forced from the prompt's last position on (it predicts the first new token)
    and at every generated position; with `prompt=True` at the whole prompt too. Works with and without
    `use_past_kv_cache` (a cached step runs one new position). The hooks are removed afterwards.

    Args:
        tokens: a `(batch, pos)` or `(pos,)` token tensor, or one string (tokenized with the model's tokenizer).
        codebook_codes, n_slots: see `steering_hooks`; n_slots of k is the strength (k replaces the codebook's choice).
        generate_kwargs: passed to `model.generate` (defaults here: verbose=False, and stop_at_eos=False for a
            model without tokenizer).

    Returns:
        what `model.generate` returns (tokens of prompt and continuation, for token input).
    """
    require_hooked_transformer(model)
    if isinstance(tokens, str):
        if model.tokenizer is None:
            raise ValueError("The model has no tokenizer, so it cannot read a string prompt; pass token ids instead.")
        tokenize = {key: generate_kwargs.pop(key) for key in ("prepend_bos", "padding_side") if key in generate_kwargs}
        tokens = model.to_tokens(tokens, **tokenize)
        generate_kwargs.setdefault("return_type", "str")  # as model.generate answers a string prompt
    elif not isinstance(tokens, Tensor):
        raise TypeError(
            f"tokens must be a token tensor or one string, got {type(tokens).__name__}; tokenize lists of prompts "
            "first."
        )
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(
            f"tokens must be integer token ids of shape (batch, pos), got {tokens.dtype} {tuple(tokens.shape)}."
        )
    if tokens.numel() == 0:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} hold no prompt; give at least one token per example.")
    check_token_ids(tokens, model.cfg.d_vocab)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    hooks = steering_hooks(model, codebook_codes, n_slots, prompt_len=tokens.shape[1], prompt=prompt)
    generate_kwargs.setdefault("verbose", False)
    if model.tokenizer is None and generate_kwargs.get("eos_token_id") is None:
        generate_kwargs.setdefault("stop_at_eos", False)  # there is no end-of-text token to stop at
    with intervene(model, hooks):
        return model.generate(tokens, max_new_tokens=max_new_tokens, **generate_kwargs)
