"""The HTML context view: escaping, highlighting, saving."""

from __future__ import annotations

import torch

from cbinterp import attach_codebooks, cache_codes
from cbinterp.codecache.queries import code_fires
from cbinterp.viz.html import CodeContextView, context_view


def test_view_escapes_and_highlights(tmp_path):
    view = CodeContextView("code <7>", [{"doc": 0, "pos": 3, "left": "a < b & ", "token": "<script>", "right": ' "x"'}])
    page = view._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "a &lt; b &amp; " in page and "code &lt;7&gt;" in page
    assert 'font-weight: bold; color: #1f4fd8">&lt;script&gt;</span>' in page
    assert page.count("<tr") == 1 and "text-align: right" in page  # one aligned row per context
    multi = CodeContextView("t", [{"doc": 0, "pos": 1, "left": "a\nb", "token": "c", "right": "d"}])._repr_html_()
    assert "a\u21b5b" in multi  # a context stays on one line
    view.save(tmp_path / "view.html")
    saved = (tmp_path / "view.html").read_text(encoding="utf-8")
    assert saved.startswith("<!DOCTYPE html>") and page in saved
    assert "does not fire" in CodeContextView("empty", [])._repr_html_()


def test_context_view_from_a_cache(make_tiny_model):
    model = attach_codebooks(make_tiny_model(seed=0, d_vocab=5), ["mlp"], n_codes=4, layers=[0])
    tokens = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(0))
    cache = cache_codes(model, tokens, progress=False)
    strings = ["a", "b", "c", "d", "<e>"]
    code = int(cache.codes("blocks.0.hook_mlp_out")[0, 0])
    view = context_view(cache, "blocks.0.hook_mlp_out", code, strings, window=2, max_examples=100)
    n_fires = int(code_fires(cache, "blocks.0.hook_mlp_out", code).sum())
    assert len(view.contexts) == n_fires and f"{n_fires} of {n_fires} firings shown" in view.title
    few = context_view(cache, "blocks.0.hook_mlp_out", code, strings, window=2, max_examples=2)
    assert len(few.contexts) == min(2, n_fires) and f"{len(few.contexts)} of {n_fires} firings" in few.title
    view = context_view(cache, "blocks.0.hook_mlp_out", code, strings, window=2, max_examples=100, sample="first")
    first = view.contexts[0]
    assert first["token"] == strings[int(tokens[0, 0])] and first["left"] == ""
    assert view._repr_html_().count("<span") == n_fires
    assert "<e>" not in view._repr_html_()
