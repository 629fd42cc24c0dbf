"""Heads of codebooks, in tables and in arguments.

A per-head (grouped) attention codebook has one group per head, numbered 0..n_heads-1; an ungrouped codebook (an
MLP codebook, or any codebook over the whole activation) has no head. Every table of the analysis layer
(`code_feature_table`, `search_codes`, `probe`, `probe_heldout`, `topic_codes`, the FSM tables) holds heads in a
nullable `Int64` column: the head index for a per-head codebook, missing (`pd.NA`) for an ungrouped one, so attention
heads stay integers and an MLP row never claims a head 0 it does not have. Labels read "blocks.0.hook_mlp_out" for
an ungrouped codebook and "blocks.0.attn.hook_z head 2" for a head.

Arguments (`head=` of the cache queries, `context_view`, `code_frequency_figure`, `code_fires_in`; `heads=` of the
interventions) follow one rule: None and a missing value (`pd.NA`, NaN) mean "no head" (the whole codebook; for a
per-head codebook, every head), so `head=row.head` works for a row of any table. For an ungrouped codebook, `0`
is accepted too, as the index of its only group (backward compatibility: tables used to report head 0); any other
head of an ungrouped codebook is an error. A head is never negative: -1 does not count from the end (a table never
holds a negative head, and elsewhere -1 reads as "none"), so a head outside 0..n_heads-1 is an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd
import torch
from torch import Tensor

from cbinterp.core.checks import is_int

__all__ = ["HEAD_DTYPE", "check_head", "code_label", "codebook_label", "head_column", "is_missing_head"]

#: The dtype of every `head` column: pandas' nullable integer, `pd.NA` for an ungrouped codebook.
HEAD_DTYPE = "Int64"


def is_missing_head(head) -> bool:
    """True for None and for a missing value (`pd.NA`, NaN): a row or an argument that names no head."""
    if head is None or head is pd.NA:
        return True
    return isinstance(head, float) and math.isnan(head)


def as_index(value, what: str) -> int:
    """`value` as an int when it is one (Python, numpy or a 0-d integer tensor); never truncated: 2.7 is refused."""
    if (
        isinstance(value, Tensor)
        and value.dim() == 0
        and not value.dtype.is_floating_point
        and value.dtype != torch.bool
    ):
        return int(value)
    if is_int(value):
        return int(value)
    raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__}).")


def check_head(head, name: str, n_heads: int | None) -> int | None:
    """`head` of codebook `name` (`n_heads` None for an ungrouped codebook) as an index in 0..n_heads-1, or None.

    None or a missing value gives None (the whole codebook; every head of a per-head codebook). For an ungrouped
    codebook `0` also gives None (its only group); any other value is refused. A negative head is refused, as
    everywhere in the package (the queries, the interventions' `heads=`): heads are labels, not Python indices.
    """
    if is_missing_head(head):
        return None
    head = as_index(head, "head")
    if n_heads is None:
        if head != 0:
            raise ValueError(
                f"Codebook {name!r} has no heads (one group for the whole activation, as an MLP codebook): use "
                f"head=None (0 is accepted as its only group), got head={head}."
            )
        return None
    if not 0 <= head < n_heads:
        hint = f"; for the last head pass {n_heads - 1}" if head < 0 else ""
        raise ValueError(
            f"head {head} is out of range for codebook {name!r} with {n_heads} heads: use 0..{n_heads - 1}{hint}."
        )
    return head


def head_column(values: Iterable) -> pd.arrays.IntegerArray:
    """A `head` column (`Int64`) from head indices, None / missing for an ungrouped codebook."""
    return pd.array([pd.NA if is_missing_head(v) else as_index(v, "head") for v in values], dtype=HEAD_DTYPE)


def codebook_label(name: str, head=None) -> str:
    """The label of a codebook or one of its heads: "blocks.0.hook_mlp_out", "blocks.0.attn.hook_z head 2"."""
    return name if is_missing_head(head) else f"{name} head {int(head)}"


def code_label(name: str, head, code) -> str:
    """The short label of a code in figures: "blocks.0.hook_mlp_out/c7", "blocks.0.attn.hook_z/h2/c7"."""
    return f"{name}/c{code}" if is_missing_head(head) else f"{name}/h{int(head)}/c{code}"
