"""The paper's window-level code selection: codes active on much of a topic's (or a source's) text, rare elsewhere.

The token-level search (`cbinterp.metrics.steering.topic_codes`) asks which code fires on the topic's words. The
paper's rule asks which code is active across whole passages about the topic: the text is cut into windows of
`window` tokens (consecutive tokens of one document); a window is "topical" when its text holds at least
`min_matches` matches of the topic's regex and "elsewhere" when it holds none (windows with a few matches count as
neither). For every (codebook, head, code):

    active_in  = mean over topical windows of the share of the window's tokens on which the code is active
                 (among the head's k codes)
    active_out = the same over the elsewhere windows
    score      = active_in - active_out

and a code passes when `active_in >= min_active` and `active_out <= max_elsewhere`. The same rule selects codes for
any split of the windows into a group and the rest (`window_codes`), e.g. the windows of one corpus source.

`score="ratio"` ranks by precision instead, `active_in / (active_in + active_out)`: a rare code found almost only
in the group outranks a common one that is merely a little more common there. With `min_in`, codes less active than
that in the group are left out (a precise code that is almost never active cannot steer).
"""

from __future__ import annotations

import re

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from cbinterp.codecache.features import VocabularyLike, token_positions
from cbinterp.core.checks import is_int, is_real
from cbinterp.core.codebooks.heads import HEAD_DTYPE

__all__ = [
    "WINDOW_COLUMNS",
    "WINDOW_SCORES",
    "best_window_codes",
    "text_windows",
    "topic_window_codes",
    "window_code_shares",
    "window_codes",
    "window_match_counts",
    "window_steering_codes",
]

WINDOW_COLUMNS = ["codebook", "head", "code", "active_in", "active_out", "score", "passes"]
#: How `window_codes` ranks codes: active_in - active_out, or active_in / (active_in + active_out).
WINDOW_SCORES = ("difference", "ratio")


def text_windows(
    cache, window: int = 128, min_tokens: int | None = None
) -> tuple[Int[Tensor, " n_tokens"], Int[Tensor, " n_windows"]]:
    """Cut the cached text into windows of `window` consecutive tokens of one document (by position).

    Args:
        min_tokens: a window with fewer tokens (a document's short last piece) is dropped; default `window // 2`.

    Returns:
        (each token's window id, -1 for a token of a dropped window; each window's document index).
    """
    if not is_int(window) or window < 1:
        raise ValueError(f"window must be a positive int (tokens per window), got {window!r}.")
    min_tokens = window // 2 if min_tokens is None else min_tokens
    if not is_int(min_tokens) or not 1 <= min_tokens <= window:
        raise ValueError(f"min_tokens must be an int in [1, window={window}], got {min_tokens!r}.")
    doc, pos = cache.doc, cache.pos
    if doc.numel() == 0:
        raise ValueError("The cache holds no tokens, so it has no windows.")
    key = doc * (int(pos.max()) // window + 1) + pos // window
    unique, inverse = torch.unique(key, return_inverse=True)
    lengths = torch.bincount(inverse, minlength=len(unique))
    kept = lengths >= min_tokens
    renumber = torch.full((len(unique),), -1, dtype=torch.long)
    renumber[kept] = torch.arange(int(kept.sum()))
    window_doc = unique[kept] // (int(pos.max()) // window + 1)
    return renumber[inverse], window_doc


def window_match_counts(
    cache,
    windows: Int[Tensor, " n_tokens"],
    pattern: str | re.Pattern,
    token_strings: VocabularyLike = None,
) -> Int[Tensor, " n_windows"]:
    """Per window, the matches of `pattern` in the decoded documents that start in it."""
    first = token_positions(cache, token_strings, pattern, which="first")
    n_windows = int(windows.max()) + 1 if windows.numel() else 0
    inside = first & (windows >= 0)
    return torch.bincount(windows[inside], minlength=n_windows)


def window_code_shares(
    cache, windows: Int[Tensor, " n_tokens"], group: Bool[Tensor, " n_windows"]
) -> dict[str, Float[Tensor, "heads n_codes"]]:
    """Per codebook, each code's mean share (over the windows of `group`) of a window's tokens where it is active.

    A codebook without heads gets one row. An empty group gives zeros."""
    group = torch.as_tensor(group, dtype=torch.bool)
    n_windows = len(group)
    if windows.numel() and int(windows.max()) >= n_windows:
        raise ValueError(f"group has {n_windows} entries but the windows go up to id {int(windows.max())}.")
    valid = windows >= 0
    lengths = torch.bincount(windows[valid], minlength=n_windows).double()
    # a token's weight: 1 / (its window's length x the group's window count), so that the sum is a window mean
    per_window = torch.where(group & (lengths > 0), 1.0 / (lengths.clamp(min=1) * max(int(group.sum()), 1)), 0.0)
    weight = torch.zeros(len(windows), dtype=torch.float64)
    weight[valid] = per_window[windows[valid]]
    out = {}
    for name in cache.codebook_names:
        n_codes = cache.n_codes(name)
        codes = cache.codes(name)
        if codes.dim() == 2:
            codes = codes[:, None, :]
        codes = codes.sort(dim=-1).values
        # a code listed twice among a token's k counts once; "no code" ids (< 0 or >= n_codes) never count
        fresh = torch.ones_like(codes, dtype=torch.bool)
        fresh[..., 1:] = codes[..., 1:] != codes[..., :-1]
        ok = fresh & (codes >= 0) & (codes < n_codes)
        shares = torch.zeros(codes.shape[1], n_codes, dtype=torch.float64)
        for head in range(codes.shape[1]):
            ids, keep = codes[:, head, :], ok[:, head, :]
            w = weight[:, None].expand_as(ids)
            shares[head] = torch.bincount(ids[keep], weights=w[keep], minlength=n_codes)
        out[name] = shares.float()
    return out


def _check_thresholds(min_active, max_elsewhere) -> tuple[float, float]:
    for label, value in (("min_active", min_active), ("max_elsewhere", max_elsewhere)):
        if not is_real(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{label} must be a share of a window's tokens in [0, 1], got {value!r}.")
    return float(min_active), float(max_elsewhere)


def window_codes(
    cache,
    windows: Int[Tensor, " n_tokens"],
    in_group: Bool[Tensor, " n_windows"],
    out_group: Bool[Tensor, " n_windows"] | None = None,
    *,
    min_active: float = 0.5,
    max_elsewhere: float = 0.05,
    score: str = "difference",
    min_in: float = 0.0,
) -> pd.DataFrame:
    """Every code active in the windows of `in_group`, scored against `out_group` (default: every other window).

    Args:
        score: "difference" (`active_in - active_out`) or "ratio" (`active_in / (active_in + active_out)`).
        min_in: codes with `active_in` below this are left out.

    Returns the columns `WINDOW_COLUMNS`, best `score` first: `active_in` / `active_out` are the codes' mean shares
    of a window's tokens (see the module's docstring), `passes` is `active_in >= min_active` and `active_out <=
    max_elsewhere`. `head` is `Int64`, `pd.NA` for a codebook without heads."""
    min_active, max_elsewhere = _check_thresholds(min_active, max_elsewhere)
    if score not in WINDOW_SCORES:
        raise ValueError(f"score must be one of {WINDOW_SCORES}, got {score!r}.")
    if not is_real(min_in) or not 0.0 <= min_in <= 1.0:
        raise ValueError(f"min_in must be a share of a window's tokens in [0, 1], got {min_in!r}.")
    in_group = torch.as_tensor(in_group, dtype=torch.bool)
    out_group = ~in_group if out_group is None else torch.as_tensor(out_group, dtype=torch.bool)
    if out_group.shape != in_group.shape:
        raise ValueError(f"in_group {tuple(in_group.shape)} and out_group {tuple(out_group.shape)} differ in shape.")
    if not bool(in_group.any()):
        raise ValueError(
            "in_group holds no window: no text of the group to find codes on (more text, or fewer matches required)."
        )
    inside = window_code_shares(cache, windows, in_group)
    outside = window_code_shares(cache, windows, out_group)
    frames = []
    for name, shares in inside.items():
        heads, codes = torch.nonzero((shares > 0) & (shares >= min_in), as_tuple=True)
        a_in, a_out = shares[heads, codes], outside[name][heads, codes]
        per_head = cache.codes(name).dim() == 3
        head_col = pd.array(heads.tolist() if per_head else [pd.NA] * len(heads), dtype=HEAD_DTYPE)
        frames.append(
            pd.DataFrame(
                {
                    "codebook": name,
                    "head": head_col,
                    "code": codes.numpy(),
                    "active_in": a_in.double().numpy(),
                    "active_out": a_out.double().numpy(),
                }
            )
        )
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=WINDOW_COLUMNS[:5])
    if score == "ratio":  # active_in > 0 on every row, so the ratio is defined
        table["score"] = table["active_in"] / (table["active_in"] + table["active_out"])
    else:
        table["score"] = table["active_in"] - table["active_out"]
    table["passes"] = (table["active_in"] >= min_active) & (table["active_out"] <= max_elsewhere)
    table = table.sort_values(["score", "codebook", "head", "code"], ascending=[False, True, True, True])
    return table[WINDOW_COLUMNS].reset_index(drop=True)


def best_window_codes(table: pd.DataFrame, cache, per_head: int = 1) -> pd.DataFrame:
    """The `per_head` best-scoring codes of every (codebook, head) of a `window_codes` table.

    In codebook then head order, best first within a head: with `per_head=1`, what
    `cbinterp.metrics.steering.steering_codes` turns into codes to force (`window_steering_codes` takes any)."""
    if not is_int(per_head) or per_head < 1:
        raise ValueError(f"per_head must be a positive int, got {per_head!r}.")
    ranked = table.sort_values("score", ascending=False, kind="mergesort")
    best = ranked.groupby(["codebook", "head"], dropna=False, sort=False).head(per_head)
    order = {name: i for i, name in enumerate(cache.codebook_names)}
    best = best.assign(_order=best["codebook"].map(order)).sort_values(["_order", "head"], kind="mergesort")
    return best.drop(columns="_order").reset_index(drop=True)


def window_steering_codes(best: pd.DataFrame, cache) -> dict[str, Tensor]:
    """`generate_with_codes`' `codebook_codes` from `best_window_codes` rows, several codes per head allowed.

    Codebook -> `(n,)` ids, or `(heads, n)` for a per-head codebook (row h: head h's codes, best first), n the
    fewest codes any head has; a per-head codebook with a head that has none is left out (every head is forced)."""
    out = {}
    for name in cache.codebook_names:
        rows = best[best["codebook"] == name]
        if rows.empty:
            continue
        if cache.codes(name).dim() == 3:
            heads = cache.codes(name).shape[1]
            per = [rows.loc[rows["head"] == h, "code"].astype(int).to_list() for h in range(heads)]
            n = min(len(c) for c in per)
            if n:
                out[name] = torch.tensor([c[:n] for c in per], dtype=torch.long)
        else:
            out[name] = torch.tensor(rows["code"].astype(int).to_list(), dtype=torch.long)
    return out


def topic_window_codes(
    cache,
    pattern: str | re.Pattern,
    token_strings: VocabularyLike = None,
    *,
    window: int = 128,
    min_matches: int = 3,
    min_active: float = 0.5,
    max_elsewhere: float = 0.05,
) -> tuple[pd.DataFrame, dict]:
    """The paper's rule for a regex-defined topic: its topical windows' codes against those of the other windows.

    `window_codes` of the windows with at least `min_matches` matches of `pattern` against the windows without one.

    Returns:
        (the `window_codes` table, counts: {"windows", "topical", "elsewhere"}).
    """
    if not is_int(min_matches) or min_matches < 1:
        raise ValueError(f"min_matches must be a positive int, got {min_matches!r}.")
    windows, _ = text_windows(cache, window)
    matches = window_match_counts(cache, windows, pattern, token_strings)
    topical, elsewhere = matches >= min_matches, matches == 0
    counts = {"windows": len(matches), "topical": int(topical.sum()), "elsewhere": int(elsewhere.sum())}
    if not counts["topical"]:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in WINDOW_COLUMNS})
        return empty, counts
    table = window_codes(cache, windows, topical, elsewhere, min_active=min_active, max_elsewhere=max_elsewhere)
    return table, counts
