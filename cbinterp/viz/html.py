"""Notebook views: a code's contexts as HTML, as in the paper's figures.

One context per line, aligned on the firing token (bold blue), with the preceding text right-aligned before it.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

from cbinterp.codecache.features import VocabularyLike
from cbinterp.codecache.queries import code_contexts, code_fires, head_of
from cbinterp.core.codebooks.heads import codebook_label
from cbinterp.core.storage.atomic import atomic_file

__all__ = ["CodeContextView", "context_view"]

_STYLE = "font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.25"
_TOKEN_STYLE = "font-weight: bold; color: #1f4fd8"
_CELL = "white-space: pre; overflow: hidden; max-width: 48em; padding: 0"


def _one_line(text: str) -> str:
    # a context is one line, so newlines inside it show as a visible mark
    return text.replace("\r\n", "\n").replace("\n", "\u21b5")


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
        rows = []
        for c in self.contexts:
            where = html.escape(f"doc {c['doc']}, pos {c['pos']}")
            left, token, right = (html.escape(_one_line(c[key])) for key in ("left", "token", "right"))
            rows.append(
                f'<tr title="{where}"><td style="{_CELL}; text-align: right; direction: rtl">'
                f"<bdi>{left}</bdi></td>"
                f'<td style="{_CELL}"><span style="{_TOKEN_STYLE}">{token}</span></td>'
                f'<td style="{_CELL}; text-align: left">{right}</td></tr>'
            )
        return '<table style="border-collapse: collapse">\n' + "\n".join(rows) + "\n</table>"

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
    token_strings: VocabularyLike | None = None,
    window: int = 20,
    head: int | None = None,
    max_examples: int = 30,
    sample: str = "random",
    seed: int = 0,
) -> CodeContextView:
    """A `CodeContextView` of where `code` of codebook `name` (and `head`) fires in `cache`.

    A seeded sample of `max_examples` firings (see `code_contexts`), titled with how many of all firings are shown.
    `head` as in `code_contexts` (None or missing for a codebook without heads); the title names a head only for a
    per-head codebook ("blocks.0.hook_mlp_out, code 7", "blocks.0.attn.hook_z head 2, code 7")."""
    contexts = code_contexts(
        cache, name, code, token_strings, window=window, head=head, max_examples=max_examples, sample=sample, seed=seed
    )
    n_fires = int(code_fires(cache, name, code, head).sum())
    label = f"{codebook_label(name, head_of(cache, name, head))}, code {code}"
    return CodeContextView(f"{label}: {len(contexts)} of {n_fires} firings shown", contexts)
