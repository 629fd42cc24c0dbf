"""Tests for cbinterp.codecache.store: caching code ids over a data set, in memory and on disk."""

from __future__ import annotations

import json

import pytest
import torch

from cbinterp import CodeCache, attach_codebooks, cache_codes, get_codebooks

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.mlp.hook_post"


def direct_codes(model, docs):
    names = [f"{n}.hook_codes" for n in get_codebooks(model)]
    with torch.no_grad():
        _, cache = model.run_with_cache(docs, names_filter=lambda n: n in names or n == HOOK)
    return cache


def assert_same(a: CodeCache, b: CodeCache):
    assert a.codebook_names == b.codebook_names
    assert a.n_tokens == b.n_tokens
    for name in a.codebook_names:
        assert torch.equal(a.codes(name), b.codes(name))
    for attr in ("tokens", "doc", "pos"):
        assert torch.equal(getattr(a, attr), getattr(b, attr))
    for hook in a.meta["hooks"]:
        assert torch.equal(a.activations(hook), b.activations(hook))


def test_codes_match_run_with_cache(cb_model, docs):
    cache = cache_codes(cb_model, docs, batch_size=2, hooks=[HOOK], progress=False)
    direct = direct_codes(cb_model, docs)
    n, seq = docs.shape
    assert cache.n_tokens == n * seq
    for name in get_codebooks(cb_model):
        expected = direct[f"{name}.hook_codes"]
        got = cache.codes(name)
        assert got.dtype == torch.int64
        assert got.shape == (n * seq, *expected.shape[2:])
        assert torch.equal(got, expected.reshape(n * seq, *expected.shape[2:]))
    assert cache.codes("blocks.0.attn.hook_z").shape == (n * seq, 4, 1)  # per-head codebook
    assert torch.equal(cache.tokens, docs.reshape(-1))
    assert torch.equal(cache.doc, torch.arange(n).repeat_interleave(seq))
    assert torch.equal(cache.pos, torch.arange(seq).repeat(n))
    # each token's id is found back from its coordinates
    assert torch.equal(docs[cache.doc, cache.pos], cache.tokens)
    act = cache.activations(HOOK)
    assert act.dtype == torch.float16 and act.shape == (n * seq, 64)
    torch.testing.assert_close(act.float(), direct[HOOK].reshape(n * seq, 64), atol=1e-2, rtol=1e-2)


def test_activations_in_float32_are_exact(cb_model, docs, tmp_path):
    direct = direct_codes(cb_model, docs)[HOOK].reshape(-1, 64)
    for directory in (None, tmp_path / "c"):
        cache = cache_codes(
            cb_model, docs, hooks=[HOOK], directory=directory, progress=False, activation_dtype=torch.float32
        )
        assert cache.activations(HOOK).dtype == torch.float32
        assert torch.equal(cache.activations(HOOK), direct)


def test_smallest_dtype(cb_model, make_tiny_model, docs):
    small = cache_codes(cb_model, docs[:2], progress=False)
    assert small.stored_codes("blocks.0.hook_mlp_out").dtype == torch.uint8
    assert small.storage_dtype("blocks.0.hook_mlp_out") == torch.uint8
    assert small.bytes_per_token("blocks.0.hook_mlp_out") == 1
    assert small.bytes_per_token("blocks.0.attn.hook_z") == 4  # 4 heads, k=1, one byte each
    big_model = attach_codebooks(make_tiny_model(seed=1), ["mlp"], n_codes=1000, layers=[0])
    big = cache_codes(big_model, docs[:2], progress=False)
    assert big.stored_codes("blocks.0.hook_mlp_out").dtype == torch.uint16
    assert big.bytes_per_token("blocks.0.hook_mlp_out") == 2
    assert big.n_codes("blocks.0.hook_mlp_out") == 1000
    direct = direct_codes(big_model, docs[:2])["blocks.0.hook_mlp_out.hook_codes"]
    assert torch.equal(big.codes("blocks.0.hook_mlp_out"), direct.reshape(-1, 1))


def test_iterable_equals_tensor(cb_model, docs):
    a = cache_codes(cb_model, docs, batch_size=2, hooks=[HOOK], progress=False)
    b = cache_codes(cb_model, iter([docs[:3], docs[3:]]), batch_size=2, hooks=[HOOK], progress=False)
    assert_same(a, b)


def test_an_empty_list_is_an_empty_document(cb_model, docs):
    """A document given as a list of ids may be empty, as an empty int tensor may: it keeps its number."""
    lists = [docs[0].tolist(), [], docs[1].tolist()]
    cache = cache_codes(cb_model, lists, batch_size=1, progress=False)
    assert cache.n_docs == 3 and cache.doc_offsets.diff().tolist() == [6, 0, 6]
    assert torch.equal(cache.tokens, torch.cat([docs[0], docs[1]]))
    assert cache_codes(cb_model, [docs[:2], [[], []]], progress=False).doc_offsets.diff().tolist() == [6, 6, 0, 0]


def test_directory_roundtrip(cb_model, docs, tmp_path):
    memory = cache_codes(cb_model, docs, batch_size=2, hooks=[HOOK], progress=False)
    on_disk = cache_codes(
        cb_model, docs, batch_size=2, hooks=[HOOK], directory=tmp_path / "c", chunk_tokens=10, progress=False
    )
    meta = json.loads((tmp_path / "c" / "cbinterp.json").read_text())
    assert meta["n_tokens"] == docs.numel() and meta["n_docs"] == docs.shape[0]
    assert meta["model"]["d_vocab"] == 11 and meta["hooks"] == [HOOK]
    assert meta["codebooks"]["blocks.0.hook_mlp_out"]["n_codes"] == 16
    assert len(meta["chunks"]) == 3  # 12-token batches, chunks of >= 10 tokens
    for chunk in meta["chunks"]:
        assert (tmp_path / "c" / chunk["file"]).exists()
    assert not list((tmp_path / "c").glob(".*.tmp"))
    assert_same(memory, on_disk)
    reopened = CodeCache.open(tmp_path / "c")
    assert_same(memory, reopened)
    reopened.check_model(cb_model)


def test_resume_after_interruption(cb_model, docs, tmp_path):
    full = cache_codes(
        cb_model, docs, batch_size=1, hooks=[HOOK], directory=tmp_path / "full", chunk_tokens=6, progress=False
    )

    def interrupted():
        yield docs[:2]
        yield docs[2:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_codes(
            cb_model,
            interrupted(),
            batch_size=1,
            hooks=[HOOK],
            directory=tmp_path / "part",
            chunk_tokens=6,
            progress=False,
        )
    partial = CodeCache.open(tmp_path / "part")
    assert partial.n_docs == 3 and partial.n_tokens == 18
    resumed = cache_codes(
        cb_model, docs, batch_size=2, hooks=[HOOK], directory=tmp_path / "part", chunk_tokens=6, progress=False
    )
    assert_same(full, resumed)
    assert resumed.n_docs == docs.shape[0]
    pairs = torch.stack([resumed.doc, resumed.pos], 1)
    assert pairs.unique(dim=0).shape[0] == pairs.shape[0]  # no duplicate documents
    # running again over the same data adds nothing
    again = cache_codes(cb_model, docs, directory=tmp_path / "part", hooks=[HOOK], progress=False)
    assert_same(full, again)


def test_resume_mid_chunk_drops_unfinished(cb_model, docs, tmp_path):
    def interrupted():
        yield docs[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_codes(cb_model, interrupted(), batch_size=1, directory=tmp_path / "c", chunk_tokens=12, progress=False)
    assert CodeCache.open(tmp_path / "c").n_docs == 2  # the third document's chunk was not finished
    resumed = cache_codes(cb_model, docs, batch_size=2, directory=tmp_path / "c", chunk_tokens=12, progress=False)
    assert_same(cache_codes(cb_model, docs, progress=False), resumed)


def test_mismatched_model_raises(cb_model, model, make_tiny_model, docs, tmp_path):
    cache_codes(cb_model, docs, directory=tmp_path / "c", progress=False)
    other = attach_codebooks(make_tiny_model(seed=0), ["attn", "mlp"], n_codes=32)
    with pytest.raises(ValueError, match="different model"):
        cache_codes(other, docs, directory=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="n_codes"):
        CodeCache.open(tmp_path / "c").check_model(other)
    vocab = attach_codebooks(make_tiny_model(d_vocab=13), ["attn", "mlp"], n_codes=16)
    with pytest.raises(ValueError, match="d_vocab"):
        CodeCache.open(tmp_path / "c").check_model(vocab)


def test_unknown_hook_raises(cb_model, docs):
    with pytest.raises(ValueError, match="blocks.0.mlp.hook_post"):
        cache_codes(cb_model, docs, hooks=["blocks.0.mlp.hook_pots"], progress=False)


def test_empty_input_raises(cb_model):
    with pytest.raises(ValueError, match="no tokens"):
        cache_codes(cb_model, torch.zeros(0, 5, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        cache_codes(cb_model, [], progress=False)


def test_model_not_moved_and_progress(cb_model, docs, capsys):
    device = next(cb_model.parameters()).device
    cache_codes(cb_model, docs, batch_size=2, progress=True)
    assert next(cb_model.parameters()).device == device


def test_code_dtype_boundaries_round_trip():
    from cbinterp.codecache.layout import code_dtype
    from cbinterp.codecache.layout import read_codes as _read_codes
    from cbinterp.codecache.layout import stored_codes as _stored_codes

    for n_codes, dtype in [
        (1, torch.uint8),
        (255, torch.uint8),
        (256, torch.uint16),  # 255 is a real code here, so "no code" needs another value
        (65535, torch.uint16),
        (65536, torch.int32),
    ]:
        assert code_dtype(n_codes) == dtype
        ids = torch.tensor([0, n_codes - 1, -1], dtype=torch.int32)
        # the largest id and "no code" both survive storage and widening
        assert torch.equal(_read_codes(_stored_codes(ids, dtype), n_codes), ids.long())


def test_tokenizer_name_is_recorded_and_checked(cb_model, docs, tmp_path):
    cache = cache_codes(cb_model, docs[:2], directory=tmp_path / "c", tokenizer_name="char-97", progress=False)
    assert cache.meta["model"]["tokenizer_name"] == "char-97"
    CodeCache.open(tmp_path / "c").check_model(cb_model, tokenizer_name="char-97")
    with pytest.raises(ValueError, match="tokenizer_name"):
        CodeCache.open(tmp_path / "c").check_model(cb_model, tokenizer_name="gpt2")
    with pytest.raises(ValueError, match="records the tokenizer 'char-97' and this call 'gpt2'"):
        cache_codes(cb_model, docs, directory=tmp_path / "c", tokenizer_name="gpt2", progress=False)
    # forgetting tokenizer_name= is told as such, not as "a different model"
    with pytest.raises(ValueError, match=r"pass tokenizer_name='char-97'") as err:
        CodeCache.open(tmp_path / "c").check_model(cb_model)
    assert "different model" not in str(err.value)


def test_padding_mask_drops_padded_positions(make_tiny_model, tmp_path):
    from cbinterp import code_frequencies

    model = attach_codebooks(make_tiny_model(seed=0), ["attn", "mlp"], n_codes=8, k=2)
    lengths = [5, 3, 6]
    docs = [torch.randint(0, 11, (n,), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    padded = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for i, d in enumerate(docs):
        padded[i, : len(d)] = d
        padded[i, len(d) :] = 7  # a real token id used as padding: only the mask says it is padding
        mask[i, : len(d)] = True
    cached = cache_codes(model, padded, mask=mask, progress=False)
    alone = cache_codes(model, [d[None] for d in docs], batch_size=1, progress=False)  # no padding at all
    assert cached.n_tokens == alone.n_tokens == sum(lengths)
    assert torch.equal(cached.tokens, alone.tokens) and torch.equal(cached.pos, alone.pos)
    assert torch.equal(cached.doc, alone.doc)
    for name in cached.codebook_names:  # right padding changes nothing before it in a causal model
        assert torch.equal(cached.codes(name), alone.codes(name))
        assert int(code_frequencies(cached, name).sum()) <= sum(lengths) * 2 * (
            4 if cached.codes(name).dim() == 3 else 1
        )
    pairs = cache_codes(model, [(padded[:2], mask[:2]), (padded[2:], mask[2:])], progress=False)
    assert torch.equal(pairs.tokens, cached.tokens)
    on_disk = cache_codes(model, padded, mask=mask, directory=tmp_path / "c", progress=False)
    assert torch.equal(on_disk.tokens, cached.tokens)
    other = mask.clone()
    other[0, 4] = False
    with pytest.raises(ValueError, match="differ"):
        cache_codes(model, padded, mask=other, directory=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        cache_codes(model, padded, mask=mask.long(), progress=False)
    with pytest.raises(ValueError, match="pairs"):
        cache_codes(model, [padded], mask=mask, progress=False)


def test_the_cache_knows_its_text(make_tiny_model, tmp_path):
    from cbinterp import code_contexts, context_view, probe, search_codes, token_positions, top_tokens
    from cbinterp.tasks.text import attach_tokenizer, train_bpe_tokenizer
    from cbinterp.tasks.toytext import generate_corpus

    texts = generate_corpus(30, seed=2)
    bpe = train_bpe_tokenizer(texts, vocab_size=300)
    model = attach_codebooks(make_tiny_model(seed=0, d_vocab=len(bpe), n_ctx=32), ["mlp"], n_codes=8, k=2)
    attach_tokenizer(model, bpe)
    tokens = model.to_tokens(texts[:6], padding_side="right")[:, :32]
    in_memory = cache_codes(model, tokens, progress=False)
    on_disk = cache_codes(model, tokens, directory=tmp_path / "c", progress=False)
    reopened = CodeCache.open(tmp_path / "c")
    assert reopened.tokenizer is not None and reopened.meta["tokenizer_files"]
    assert set(reopened.meta["tokenizer_files"]) <= set(reopened.meta["files"])  # checksummed
    for cache in (in_memory, on_disk, reopened):
        assert cache.vocabulary is not None
        explicit = token_positions(cache, bpe, r"[A-Z]\w+")
        assert torch.equal(token_positions(cache, r"[A-Z]\w+"), explicit) and explicit.any()
        name = cache.codebook_names[0]
        code = int(cache.codes(name)[3, 0])
        assert code_contexts(cache, name, code) == code_contexts(cache, name, code, bpe)
        assert context_view(cache, name, code).contexts
        top = top_tokens(cache, name, code)
        assert list(top.columns) == ["token", "text", "count", "share"]
        assert top["text"].tolist() == [bpe.decode([int(i)]) for i in top["token"]]
        assert len(search_codes(cache, r"[A-Z]\w+")) > 0
        assert len(probe(cache, {"capital": r"[A-Z]\w+"}, neurons=False)) > 0
    # a model without a tokenizer: token strings kept in the cache, or a clear error
    plain = attach_codebooks(make_tiny_model(seed=0), ["mlp"], n_codes=8)
    digits = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    strings = [str(i) for i in range(11)]
    kept = cache_codes(plain, digits, token_strings=strings, directory=tmp_path / "d", progress=False)
    assert torch.equal(token_positions(CodeCache.open(tmp_path / "d"), "7"), digits.reshape(-1) == 7)
    assert torch.equal(token_positions(kept, "7"), digits.reshape(-1) == 7)
    bare = cache_codes(plain, digits, progress=False)
    assert bare.vocabulary is None and "text" not in top_tokens(bare, bare.codebook_names[0], 0).columns
    with pytest.raises(ValueError, match="token_strings"):
        token_positions(bare, "7")
    with pytest.raises(ValueError, match="d_vocab"):
        cache_codes(plain, digits, token_strings=strings[:5], progress=False)


def test_offsets_layout_answers_as_per_token_coordinates(cb_model, docs, tmp_path, monkeypatch):
    """Layout 2 derives doc/pos from one offset per document; queries on it equal those on explicit coordinates."""
    from cbinterp import code_contexts, token_positions, top_tokens
    from cbinterp.codecache import inputs
    from cbinterp.codecache.documents import subset_cache

    mask = torch.ones_like(docs, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1] = False  # a hole: that chunk stores pos
    mask[3] = False  # a document without tokens keeps its number
    # an older cbinterp cached masks with holes (now refused); its chunks store pos, and are still read
    monkeypatch.setattr(inputs, "check_documents", lambda *args: None)
    strings = [str(i) for i in range(11)]
    cache = cache_codes(
        cb_model, docs, mask=mask, directory=tmp_path / "c", chunk_tokens=6, token_strings=strings, progress=False
    )
    chunk = cache._parts()[0]
    assert "doc_lengths" in chunk.keys and "doc" not in chunk.keys
    assert cache.doc_offsets.tolist() == [0, 6, 10, 15, 15, 21]
    rows = torch.arange(6).expand(5, 6)
    assert torch.equal(cache.pos, rows[mask]) and torch.equal(cache.doc, torch.arange(5)[:, None].expand(5, 6)[mask])
    explicit = subset_cache(cache, torch.ones(cache.n_tokens, dtype=torch.bool))
    assert explicit.doc_offsets is None
    name = "blocks.0.hook_mlp_out"
    for code in torch.unique(cache.codes(name)).tolist():
        assert code_contexts(cache, name, code, window=2) == code_contexts(explicit, name, code, window=2)
        assert top_tokens(cache, name, code).equals(top_tokens(explicit, name, code))
    assert torch.equal(token_positions(cache, "[0-5]+"), token_positions(explicit, "[0-5]+"))


def test_layout_1_cache_is_read_but_not_resumed(cb_model, docs, tmp_path):
    from safetensors.torch import save_file

    from cbinterp.core.storage import manifest as mf

    made = cache_codes(cb_model, docs, progress=False)
    old = tmp_path / "old"
    old.mkdir()
    arrays = {"tokens": made.stored_tokens(), "doc": made._get("doc"), "pos": made._get("pos")}
    arrays.update({f"codes/{n}": made.stored_codes(n) for n in made.codebook_names})
    save_file(arrays, str(old / "chunk_000000.safetensors"))
    meta = {k: v for k, v in made.meta.items() if k not in ("layout", "files", "format", "version")}
    meta["chunks"] = [{"file": "chunk_000000.safetensors", "n_tokens": made.n_tokens, "n_docs": made.n_docs}]
    mf.write_manifest(old, mf.CODE_CACHE, ["chunk_000000.safetensors"], extra=meta)
    reopened = CodeCache.open(old)
    assert reopened.doc_offsets is None
    for attr in ("tokens", "doc", "pos"):
        assert torch.equal(getattr(reopened, attr), getattr(made, attr))
    assert torch.equal(reopened.codes("blocks.0.hook_mlp_out"), made.codes("blocks.0.hook_mlp_out"))
    with pytest.raises(ValueError, match="older layout 1.*run cache_codes again"):
        cache_codes(cb_model, docs, directory=old, progress=False)
