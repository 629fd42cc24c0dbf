"""Notebook views: a code's contexts as HTML, the firing token in bold blue as in the paper's figures."""

from __future__ import annotations

import html
import os
from typing import Optional, Sequence

from cbinterp.codecache.queries import code_contexts
from cbinterp.core.atomic import atomic_file

_STYLE = "font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.5"
_TOKEN_STYLE = "font-weight: bold; color: #1f4fd8"


class CodeContextView:
    """The contexts in which one code fires; renders in Jupyter (`_repr_html_`) and saves as a standalone page.

    Every piece of text is HTML-escaped, so tokens such as `<script>` show as text.
    """

    def __init__(self, title: str, contexts: Sequence[dict]):
        self.title = title
        self.contexts = list(contexts)

    def _rows(self) -> str:
        if not self.contexts:
            return "<p><em>The code does not fire in this cache.</em></p>"
        lines = []
        for c in self.contexts:
            where = html.escape(f"doc {c['doc']}, pos {c['pos']}")
            lines.append(
                f'<div title="{where}">{html.escape(c["left"])}'
                f'<span style="{_TOKEN_STYLE}">{html.escape(c["token"])}</span>{html.escape(c["right"])}</div>'
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f'<div style="{_STYLE}"><h4>{html.escape(self.title)}</h4>\n{self._rows()}\n</div>'

    def save(self, path: str | os.PathLike) -> None:
        """Write a standalone HTML page (atomically)."""
        page = (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title></head>'
            f"<body>\n{self._repr_html_()}\n</body></html>\n"
        )
        with atomic_file(path) as tmp:
            tmp.write_text(page, encoding="utf-8")

    def __repr__(self) -> str:
        return f"CodeContextView({self.title!r}, {len(self.contexts)} contexts)"


def context_view(
    cache,
    name: str,
    code: int,
    token_strings: Sequence[str],
    window: int = 8,
    head: Optional[int] = None,
    max_examples: int = 30,
) -> CodeContextView:
    """A `CodeContextView` of where `code` of codebook `name` (and `head`) fires in `cache`."""
    contexts = code_contexts(cache, name, code, token_strings, window=window, head=head, max_examples=max_examples)
    label = f"{name}" + (f" head {head}" if head is not None else "") + f", code {code}"
    return CodeContextView(f"{label}: {len(contexts)} contexts", contexts)
