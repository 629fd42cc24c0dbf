"""Names of a codebook's nested hook points, and the "did you mean" hint for an unknown name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["CODES_HOOK", "CODES_SUFFIX", "INPUT_HOOK", "INPUT_SUFFIX", "codes_hook_name", "did_you_mean"]

#: Nested hook points of every `Codebook`: the selected code ids, and the activation before quantization.
CODES_HOOK = "hook_codes"
INPUT_HOOK = "hook_input"
CODES_SUFFIX = "." + CODES_HOOK
INPUT_SUFFIX = "." + INPUT_HOOK


def codes_hook_name(codebook_name: str) -> str:
    """`<codebook>.hook_codes`, the cache key of a codebook's code ids."""
    return codebook_name + CODES_SUFFIX


def did_you_mean(name: str, known: Iterable[str], n: int = 3) -> str:
    """An error message's end: `"; did you mean one of [...]?"` with the closest known names, or `"."`."""
    close = [c for c in difflib.get_close_matches(name, list(known), n=n + 1) if c != name][:n]
    return f"; did you mean one of {close}?" if close else "."
