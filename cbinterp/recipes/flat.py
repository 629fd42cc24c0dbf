"""`replace`, `to_dict` and `from_dict` for a recipe that is one flat dataclass of plain settings.

LMRecipe and FinetuneRecipe: JSON holds their tuples as lists, and reading back refuses unknown settings by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

__all__ = ["FlatRecipe"]


class FlatRecipe:
    """A mixin for a dataclass recipe whose settings are plain values (no nested recipes)."""

    #: The settings held as tuples (or None), written as lists.
    _tuple_settings: ClassVar[tuple[str, ...]] = ("sites",)

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
