"""What an intervention hook selects: parsed `positions`, `heads` and code ids, and the shapes codes must have.

The selected codes have the axes `(batch, [positions], [heads], ids)` (see `interventions`); codes
given are 1-d or have one axis per selected axis, so they never broadcast along an axis they were not meant for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from cbinterp.core.checks import is_int
from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.codebooks.heads import check_head, is_missing_head

__all__ = ["CodesLike", "HeadsLike", "PositionsLike"]

CodesLike = int | Sequence[int] | Tensor
HeadsLike = int | Sequence[int] | None


@dataclasses.dataclass(frozen=True)
class _Positions:
    """A parsed `positions` argument; its ranges are checked per run, when the sequence length is known."""

    kind: Literal["all", "int", "slice", "list", "per_example", "generated"]
    value: object = None

    @classmethod
    def parse(cls, positions: PositionsLike) -> _Positions:
        if positions is None:
            return cls("all")
        if isinstance(positions, np.ndarray):
            positions = torch.as_tensor(positions)
        if isinstance(positions, bool):
            raise TypeError("positions must be None, an int, a slice, a list of ints or a tensor, got a bool.")
        if is_int(positions):
            return cls("int", int(positions))
        if isinstance(positions, slice):
            if not all(part is None or is_int(part) for part in (positions.start, positions.stop, positions.step)):
                raise TypeError(f"A positions slice takes ints (or None), got {positions!r}.")
            if positions.step is not None and positions.step == 0:
                raise ValueError("A positions slice cannot have step 0.")
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
                if not all(is_int(q) for p in items for q in p):
                    raise TypeError(f"Per-example positions must be lists of ints, got {positions!r}.")
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

    @property
    def keeps_axis(self) -> bool:
        """Whether the selection keeps a positions axis (an int or a `(batch,)` tensor drops it)."""
        return not (self.kind == "int" or (self.kind == "per_example" and self.value.dim() == 1))

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


#: Where to act: all, an int, a slice, ints, per-example ints or a tensor (steering passes its parsed `_Positions`).
PositionsLike = int | slice | Sequence[int] | Sequence[Sequence[int]] | Tensor | _Positions | None


def _in_range(positions: Tensor, n_pos: int, where: str) -> Tensor:
    bad = (positions < -n_pos) | (positions >= n_pos)
    if bool(bad.any()):
        raise IndexError(
            f"Position {int(positions[bad].flatten()[0])} is out of range for this run at {where}, which has "
            f"{n_pos} positions (valid: {-n_pos}..{n_pos - 1}). Choose positions inside the sequence."
        )
    return positions % n_pos  # negative positions count from the end, as in Python


def _parse_heads(heads: HeadsLike, name: str, codebook: Codebook) -> Tensor | None:
    """The head index (0-dim drops the axis, 1-dim keeps it), or None for a codebook without heads.

    Every head is checked by `heads.check_head`, the rule the cache queries follow too: a missing
    value (`pd.NA`, NaN: a table's `head` for a codebook without heads) reads as None; for a codebook without heads
    `0` (its only group) is accepted too; a head is an int in 0..n_heads-1, never negative."""
    if isinstance(heads, np.ndarray):
        heads = torch.as_tensor(heads)
    if isinstance(heads, Tensor) and heads.dim() == 1 and not heads.dtype.is_floating_point:
        heads = heads.tolist()
    many = isinstance(heads, Sequence) and not isinstance(heads, str)
    if not codebook.grouped:
        if many or not (is_missing_head(heads) or (is_int(heads) and int(heads) == 0)):
            raise ValueError(
                f"heads={heads!r} given for {name}, which has one codebook for the whole activation (no heads); "
                f"leave heads out (None; 0 is accepted as its only group), or choose a per-head attention codebook "
                f"(e.g. blocks.0.attn.hook_z)."
            )
        return None
    groups = codebook.cfg.groups
    if not many:
        head = check_head(heads, name, groups)
        return torch.arange(groups) if head is None else torch.tensor(head)
    items = list(heads)
    if not items or not all(is_int(h) for h in items):
        raise TypeError(f"heads must be None, an int or a non-empty list of ints, got {heads!r}.")
    return torch.tensor([check_head(h, name, groups) for h in items])


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


def _selected_axes(where: _Positions, head_index: Tensor | None) -> tuple[str, ...]:
    """The axes of the selected codes: `("batch", ["positions"], ["heads"], "ids")`."""
    keeps_heads = head_index is not None and head_index.dim() == 1
    return ("batch",) + ("positions",) * where.keeps_axis + ("heads",) * keeps_heads + ("ids",)


def _shape_hint(axes: tuple[str, ...]) -> str:
    """How to give per-example (and per-head) ids for a selection with these axes."""
    middle = len(axes) - 2
    hint = "e.g. per-example ids `ids` of shape (batch, n) as " + (f"ids[:, {'None, ' * middle}:]" if middle else "ids")
    if "heads" in axes:
        hint += f", per-head ids (heads, n) as ids[{'None, ' * (len(axes) - 2)}:, :]"
    return hint


def _broadcast(ids: Tensor, shape: tuple[int, ...], axes: tuple[str, ...], hook_name: str, what: str) -> Tensor:
    """`ids` (1-d, or one axis per selected axis) expanded to the selected `shape`; a mismatch names its axis."""
    ids = ids.to(dtype=torch.long)
    if ids.dim() == len(shape):
        for axis, have, want in zip(axes[:-1], ids.shape[:-1], shape[:-1]):
            if have not in (1, want):
                raise ValueError(
                    f"{what} of shape {tuple(ids.shape)} do not broadcast to the selected codes at {hook_name}, of "
                    f"shape {shape} ({', '.join(axes)}): they have {have} entries along the {axis} axis, where the "
                    f"run selects {want}. Give {want} (one per selected {axis}) or 1 (the same for all)."
                )
    return ids.expand(shape)
