"""The shared checks, `replace`, `to_dict` and `from_dict` of a recipe that is one flat dataclass of settings.

LMRecipe and FinetuneRecipe: JSON holds their tuples as lists, and reading back refuses unknown settings by name.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the package supports 3.10
    from typing_extensions import Self

from cbinterp.core.checks import is_int
from cbinterp.core.codebooks.codebook import LOSSES

__all__ = ["FlatRecipe"]


class FlatRecipe:
    """A mixin for a frozen dataclass recipe of plain settings (no nested recipes).

    Its settings include `sites`, `n_codes`, `k` and `loss`.
    """

    #: The settings held as tuples (or None), written as lists.
    _tuple_settings: ClassVar[tuple[str, ...]] = ("sites",)

    def _check_shared(self, positive: tuple[str, ...], non_negative: tuple[str, ...]) -> None:
        """The checks every flat recipe makes in `__post_init__`.

        `sites` becomes a non-empty tuple; the settings `positive` must be ints >= 1, `non_negative` ints >= 0;
        k <= n_codes; the loss is known.
        """
        recipe = type(self).__name__
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        object.__setattr__(self, "sites", sites)
        if not sites:
            raise ValueError(f"{recipe}.sites is empty: name at least one site ('attn', 'mlp', or a hook name).")
        for name in positive + non_negative:
            value, least = getattr(self, name), 1 if name in positive else 0
            if not is_int(value) or value < least:
                raise ValueError(f"{recipe}.{name} must be an int >= {least}, got {value!r}.")
        if self.k > self.n_codes:
            raise ValueError(f"k={self.k} is larger than n_codes={self.n_codes}.")
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown codebook loss {self.loss!r}; choose one of {LOSSES}.")

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied (checked again, as a new recipe)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The recipe as plain JSON-ready data (`from_dict` reads it back)."""
        out = dataclasses.asdict(self)
        for name in self._tuple_settings:
            out[name] = None if out[name] is None else list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        """The recipe that `to_dict` wrote; unknown settings are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} settings {unknown}; known: {sorted(known)}.")
        return cls(**data)
