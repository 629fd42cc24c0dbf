"""Interventions on codebook codes: hooks that replace, force or ablate code ids, and steered generation.

Every helper returns an ordinary TransformerLens hook `(hook_name, fn)` on `<codebook name>.hook_codes`, so it
composes with `model.run_with_hooks(tokens, fwd_hooks=[...])`, `model.hooks(...)`, `intervene(model, ...)` and
`model.generate`. A codebook's output is the sum of the codes its `hook_codes` returns (-1 = no code), so
rewriting the ids is the whole intervention.

Selections follow numpy indexing of the code tensor `(batch, pos, k)` or `(batch, pos, heads, k)`:
`positions` picks along `pos` (an int or a per-example `(batch,)` tensor drops the axis, a slice, a list or a
`(batch, n)` tensor keeps it), `heads` along `heads` (an int drops the axis, a list keeps it), and the codes given
broadcast against the selected `(..., k)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from cbinterp.core.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.checks import is_int
from cbinterp.core.codebook import Codebook
from cbinterp.core.heads import is_missing_head
from cbinterp.core.naming import CODES_SUFFIX, codes_hook_name, did_you_mean

__all__ = ["ablate_codes", "force_codes", "generate_with_codes", "intervene", "replace_codes", "steering_hooks"]

HookFn = Callable[..., Tensor]
Hook = tuple[str, HookFn]
CodesLike = Union[int, Sequence[int], Tensor]
PositionsLike = Union[None, int, slice, Sequence[int], Sequence[Sequence[int]], Tensor]
HeadsLike = Union[None, int, Sequence[int]]


# -- finding the codebook -----------------------------------------------------------------------------------
def resolve_codebook(model: HookedTransformer, codebook: Union[str, Codebook]) -> tuple[str, Codebook]:
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


# -- what a hook selects ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Positions:
    """A parsed `positions` argument; its ranges are checked per run, when the sequence length is known."""

    kind: Literal["all", "int", "slice", "list", "per_example", "generated"]
    value: object = None

    @classmethod
    def parse(cls, positions: PositionsLike) -> "_Positions":
        if positions is None:
            return cls("all")
        if isinstance(positions, np.ndarray):
            positions = torch.as_tensor(positions)
        if isinstance(positions, bool):
            raise TypeError("positions must be None, an int, a slice, a list of ints or a tensor, got a bool.")
        if is_int(positions):
            return cls("int", int(positions))
        if isinstance(positions, slice):
            return cls("slice", positions)
        if isinstance(positions, Tensor):
            if positions.dtype.is_floating_point or positions.dtype == torch.bool or positions.dim() not in (0, 1, 2):
                raise TypeError(
                    f"A positions tensor must hold integers, shape (batch,) or (batch, n); got {positions.dtype} "
                    f"of shape {tuple(positions.shape)}."
                )
            if positions.dim() == 0:
                return cls("int", int(positions))
            return cls("per_example", positions.detach().long().cpu())
        if isinstance(positions, Sequence) and not isinstance(positions, str):
            items = list(positions)
            if items and all(isinstance(p, Sequence) and not isinstance(p, str) for p in items):
                lengths = {len(p) for p in items}
                if len(lengths) != 1 or 0 in lengths:
                    raise ValueError(
                        "Per-example positions need the same number (>= 1) for every example, got lengths "
                        f"{sorted(lengths)}."
                    )
                return cls("per_example", torch.tensor(items, dtype=torch.long))
            if not items or not all(is_int(p) for p in items):
                raise TypeError(
                    f"positions as a list must be a non-empty list of ints (or of lists of ints), got {positions!r}."
                )
            return cls("list", torch.tensor(items, dtype=torch.long))
        raise TypeError(
            f"positions must be None, an int, a slice, a list of ints or a tensor, got {type(positions).__name__}."
        )

    def index(self, batch: int, n_pos: int, device: torch.device, where: str) -> tuple[Tensor, Tensor]:
        """Broadcastable (batch index, position index) for a run of `batch` sequences of `n_pos` positions."""
        rows = torch.arange(batch, device=device)
        if self.kind == "all":
            return rows[:, None], torch.arange(n_pos, device=device)[None, :]
        if self.kind == "slice":
            picked = torch.arange(n_pos, device=device)[self.value]
            if picked.numel() == 0:
                raise IndexError(f"positions {self.value} select nothing in a run of {n_pos} positions at {where}.")
            return rows[:, None], picked[None, :]
        if self.kind == "generated":  # see generate_with_codes: a cached step sees one new position
            prompt_len, with_prompt = self.value
            start = 0 if with_prompt or n_pos < prompt_len else prompt_len - 1
            return rows[:, None], torch.arange(start, n_pos, device=device)[None, :]
        if self.kind == "int":
            return rows, _in_range(torch.tensor(self.value), n_pos, where).to(device).expand(batch)
        picked = _in_range(self.value, n_pos, where).to(device)
        if self.kind == "list":
            return rows[:, None], picked[None, :]
        if picked.shape[0] != batch:
            raise ValueError(
                f"Per-example positions have {picked.shape[0]} rows but the run at {where} has batch size {batch}; "
                f"give one row of positions per example (or a list of ints for the same positions in every example)."
            )
        return (rows, picked) if picked.dim() == 1 else (rows[:, None], picked)


def _in_range(positions: Tensor, n_pos: int, where: str) -> Tensor:
    bad = (positions < -n_pos) | (positions >= n_pos)
    if bool(bad.any()):
        raise IndexError(
            f"Position {int(positions[bad].flatten()[0])} is out of range for this run at {where}, which has "
            f"{n_pos} positions (valid: {-n_pos}..{n_pos - 1}). Choose positions inside the sequence."
        )
    return positions % n_pos  # negative positions count from the end, as in Python


def _parse_heads(heads: HeadsLike, name: str, codebook: Codebook) -> Optional[Tensor]:
    """The head index (0-dim drops the axis, 1-dim keeps it), or None for a codebook without heads.

    A missing value (`pd.NA`, NaN: a table's `head` for a codebook without heads) reads as None; for a codebook
    without heads `0` (its only group) is accepted too (`cbinterp.core.heads`)."""
    groups = codebook.cfg.groups
    if not isinstance(heads, (Tensor, Sequence)) and is_missing_head(heads):
        heads = None
    if not codebook.grouped:
        if heads is not None and not (is_int(heads) and int(heads) == 0):
            raise ValueError(
                f"heads={heads!r} given for {name}, which has one codebook for the whole activation (no heads); "
                f"leave heads out (None; 0 is accepted as its only group), or choose a per-head attention codebook "
                f"(e.g. blocks.0.attn.hook_z)."
            )
        return None
    if heads is None:
        return torch.arange(groups)
    if isinstance(heads, Tensor):
        heads = heads.tolist()
    single = is_int(heads)
    items = [int(heads)] if single else list(heads) if isinstance(heads, Sequence) else []
    if not items or not all(is_int(h) for h in items):
        raise TypeError(f"heads must be None, an int or a non-empty list of ints, got {heads!r}.")
    bad = [h for h in items if not 0 <= h < groups]
    if bad:
        raise ValueError(f"Head {bad[0]} is out of range for {name}, which has {groups} heads (0..{groups - 1}).")
    return torch.tensor(int(items[0])) if single else torch.tensor([int(h) for h in items])


def _parse_codes(codes: CodesLike, name: str, codebook: Codebook, allow_empty: bool, what: str) -> Tensor:
    """Code ids as an int64 tensor with a trailing id axis, checked against the codebook's range."""
    if isinstance(codes, np.ndarray):
        codes = torch.as_tensor(codes)
    if isinstance(codes, bool):
        raise TypeError(f"{what} must be an int, a list of ints or an integer tensor, got a bool.")
    if is_int(codes):
        ids = torch.tensor([int(codes)])
    elif isinstance(codes, Tensor):
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dtype.is_complex:
            raise TypeError(f"{what} must be integer code ids, got a {codes.dtype} tensor.")
        ids = codes.detach().long().reshape(1) if codes.dim() == 0 else codes.detach().long()
    elif isinstance(codes, Sequence) and not isinstance(codes, str):
        ids = torch.tensor(list(codes)) if len(codes) else torch.zeros(0, dtype=torch.long)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{what} must be integer code ids, got {codes!r}.")
        ids = ids.long()
    else:
        raise TypeError(f"{what} must be an int, a list of ints or an integer tensor, got {type(codes).__name__}.")
    if ids.shape[-1] == 0:
        raise ValueError(f"No {what} given for {name}; pass at least one code id.")
    low = -1 if allow_empty else 0
    bad = (ids < low) | (ids >= codebook.n_codes)
    if bool(bad.any()):
        allowed = f"[0, {codebook.n_codes - 1}]" + (", or -1 for no code" if allow_empty else "")
        raise ValueError(
            f"Code id {int(ids[bad][0])} is out of range for {name}, which has {codebook.n_codes} codes: use ids in "
            f"{allowed}."
        )
    return ids


def _make_hook(
    model: HookedTransformer,
    codebook: Union[str, Codebook],
    positions: PositionsLike,
    heads: HeadsLike,
    rewrite: Callable[[Tensor, str], Tensor],
) -> Hook:
    """A hook on `<codebook>.hook_codes` that passes the selected `(..., k)` code ids through `rewrite`."""
    name, cb = resolve_codebook(model, codebook)
    where = _Positions.parse(positions) if not isinstance(positions, _Positions) else positions
    head_index = _parse_heads(heads, name, cb)
    hook_name = codes_hook_name(name)

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
        out[index] = rewrite(codes[index], hook_name)
        return out

    fn.__name__ = fn.__qualname__ = f"{rewrite.__name__}@{hook_name}"  # shows in model.list_hooks()
    return hook_name, fn


def _broadcast(ids: Tensor, shape: tuple[int, ...], hook_name: str, what: str) -> Tensor:
    try:
        return ids.to(dtype=torch.long).expand(shape)
    except RuntimeError:
        raise ValueError(
            f"{what} of shape {tuple(ids.shape)} do not broadcast to the selected codes at {hook_name}, of shape "
            f"{shape} (batch, [positions], [heads], ids): give one row of ids, or one per selected "
            "example/position/head."
        ) from None


# -- the three interventions ------------------------------------------------------------------------------
def replace_codes(
    model: HookedTransformer,
    codebook: Union[str, Codebook],
    codes: CodesLike,
    *,
    positions: PositionsLike = None,
    heads: HeadsLike = None,
) -> Hook:
    """A hook that sets the code ids at the chosen positions (and heads) of a codebook to `codes`.

    Args:
        codebook: the codebook's hook name (e.g. "blocks.2.hook_mlp_out") or the Codebook itself.
        codes: an int, a list of up to k ids, or a tensor broadcastable to the selected `(..., k)`; fewer than k ids
            fill the remaining slots with -1 (no code), and -1 may be given explicitly.
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

    def replace(selected: Tensor, hook_name: str) -> Tensor:
        return _broadcast(ids.to(selected.device), tuple(selected.shape), hook_name, "codes")

    return _make_hook(model, cb, positions, heads, replace)


def force_codes(
    model: HookedTransformer,
    codebook: Union[str, Codebook],
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
        codes: an int, a list of n <= k ids, or a tensor broadcastable to the selected `(..., n)`.
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

    def force(selected: Tensor, hook_name: str) -> Tensor:
        wanted = _broadcast(forced.to(selected.device), (*selected.shape[:-1], n), hook_name, "forced codes")
        if keep == 0:
            return wanted.clone()
        is_forced = (selected[..., :, None] == wanted[..., None, :]).any(-1)
        # a stable sort moves forced ids behind the others and keeps the codebook's best-first order
        order = torch.sort(is_forced.to(torch.int8), dim=-1, stable=True).indices
        kept = selected.gather(-1, order[..., :keep])
        return torch.cat([kept, wanted], dim=-1)

    return _make_hook(model, cb, positions, heads, force)


def ablate_codes(
    model: HookedTransformer,
    codebook: Union[str, Codebook],
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

    def ablate(selected: Tensor, hook_name: str) -> Tensor:
        return selected.masked_fill(torch.isin(selected, ids.to(selected.device)), -1)

    return _make_hook(model, cb, positions, heads, ablate)


# -- applying hooks ---------------------------------------------------------------------------------------
def _flatten_hooks(model: HookedTransformer, hook_lists: Sequence) -> list[Hook]:
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
def intervene(model: HookedTransformer, *hook_lists: Union[Hook, Sequence[Hook]]) -> Iterator[HookedTransformer]:
    """Run a block of calls (forward passes, `run_with_cache`, `generate`) with the given hooks; they are removed
    on exit, also on an exception. Arguments are hooks or lists of hooks, applied in the order given.

    Hooks added inside the block (e.g. `run_with_cache`'s) run after these, so a cache sees the rewritten codes.
    """
    require_hooked_transformer(model)
    hooks = _flatten_hooks(model, hook_lists)
    # model.hooks removes what it added at its own context level in a `finally`, and nothing else
    with model.hooks(fwd_hooks=hooks):
        yield model


# -- steered generation -----------------------------------------------------------------------------------
def steering_hooks(
    model: HookedTransformer,
    codebook_codes: Mapping[str, CodesLike],
    n_slots: Union[None, int, Mapping[str, int]] = None,
    prompt_len: Optional[int] = None,
    prompt: bool = False,
) -> list[Hook]:
    """`force_codes` hooks for generation: per codebook, its codes tiled over `n_slots` slots, forced at the
    positions that predict new tokens (from the prompt's last position on; all positions with `prompt=True`).

    Args:
        codebook_codes: codebook name -> code ids (an int, a list, or a tensor whose last axis lists the ids,
            e.g. `(heads, n)` for per-head codebooks).
        n_slots: how many of the k slots the forced codes take (the strength): None = one per code given; an int
            for every codebook or a mapping by name. Codes are repeated in turn to fill the slots.
        prompt_len: the prompt's length (needed unless `prompt=True`).
    """
    if not codebook_codes:
        raise ValueError("codebook_codes is empty; give at least one codebook name -> code ids.")
    if not prompt and (prompt_len is None or prompt_len < 1):
        raise ValueError(f"prompt_len must be a positive int to steer only the new positions, got {prompt_len!r}.")
    where = _Positions("generated", (prompt_len or 1, prompt))
    hooks = []
    for key, codes in codebook_codes.items():
        name, cb = resolve_codebook(model, key)
        ids = _parse_codes(codes, name, cb, allow_empty=False, what="steering codes")
        slots = n_slots.get(key, n_slots.get(name)) if isinstance(n_slots, Mapping) else n_slots
        slots = ids.shape[-1] if slots is None else slots
        if not isinstance(slots, int) or not ids.shape[-1] <= slots <= cb.k:
            raise ValueError(
                f"n_slots={slots!r} for {name}: it must be an int from the number of codes given ({ids.shape[-1]}) "
                f"to the codebook's k={cb.k}."
            )
        ids = ids[..., torch.arange(slots) % ids.shape[-1]]
        hooks.append(force_codes(model, cb, ids, positions=where))
    return hooks


def generate_with_codes(
    model: HookedTransformer,
    tokens: Union[str, Int[Tensor, "batch pos"], Int[Tensor, " pos"]],
    codebook_codes: Mapping[str, CodesLike],
    n_slots: Union[None, int, Mapping[str, int]] = None,
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
    if tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise ValueError(
            f"tokens must be integer token ids of shape (batch, pos), got {tokens.dtype} {tuple(tokens.shape)}."
        )
    hooks = steering_hooks(model, codebook_codes, n_slots, prompt_len=tokens.shape[1], prompt=prompt)
    generate_kwargs.setdefault("verbose", False)
    if model.tokenizer is None and generate_kwargs.get("eos_token_id") is None:
        generate_kwargs.setdefault("stop_at_eos", False)  # there is no end-of-text token to stop at
    with intervene(model, hooks):
        return model.generate(tokens, max_new_tokens=max_new_tokens, **generate_kwargs)
