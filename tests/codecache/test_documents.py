"""Code caches of whole documents (cbinterp.codecache.documents)."""

from __future__ import annotations

import pytest
import torch

from cbinterp import attach_codebooks
from cbinterp.codecache.documents import cache_documents, subset_cache, text_token_mask
from cbinterp.codecache.store import cache_codes
from cbinterp.tasks.text import DocumentTokens

pytestmark = pytest.mark.usefixtures("one_thread")


def documents() -> DocumentTokens:
    """Two documents: 5 text tokens (two rows of seq 4: BOS + 3, BOS + 2 + pad) and 1 text token (one row)."""
    tokens = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 0], [0, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return DocumentTokens(tokens=tokens, mask=mask, doc_index=torch.tensor([0, 0, 1]))


def test_cache_documents_keeps_text_tokens_numbered_by_document(model):
    attach_codebooks(model, sites=["mlp"], n_codes=8, k=2)
    cache = cache_documents(model, documents(), hooks=["blocks.0.mlp.hook_post"])
    assert cache.tokens.tolist() == [5, 6, 7, 8, 9, 3]
    assert cache.doc.tolist() == [0, 0, 0, 0, 0, 1]
    assert cache.pos.tolist() == [0, 1, 2, 3, 4, 0]
    assert cache.n_docs == 2 and cache.n_tokens == 6
    full = cache_codes(model, documents().tokens, hooks=["blocks.0.mlp.hook_post"], progress=False)
    keep = text_token_mask(documents().mask).reshape(-1)
    name = cache.codebook_names[0]
    assert torch.equal(cache.codes(name), full.codes(name)[keep])
    assert torch.equal(cache.activations("blocks.0.mlp.hook_post"), full.activations("blocks.0.mlp.hook_post")[keep])


def test_subset_cache_checks_its_mask(model):
    attach_codebooks(model, sites=["mlp"], n_codes=8, k=1)
    full = cache_codes(model, documents().tokens, progress=False)
    with pytest.raises(ValueError, match="bool mask"):
        subset_cache(full, torch.ones(3, dtype=torch.bool))
    part = subset_cache(full, full.tokens > 5)
    assert part.tokens.tolist() == [6, 7, 8, 9]
