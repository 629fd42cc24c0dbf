"""What `cache_codes` refuses: resumes under other conditions, masks that are not right padding, token ids out of
range, markers that point outside their folder or were edited, damaged chunks."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from cbinterp import CodeCache, attach_codebooks, cache_codes
from cbinterp.codecache import integrity
from cbinterp.codecache.documents import cache_documents
from cbinterp.core.codebooks.attach import codebooks_bypassed, codebooks_observed
from cbinterp.core.codebooks.interventions import ablate_codes, intervene
from cbinterp.core.storage.manifest import ResumeWarning
from cbinterp.tasks.text import DocumentTokens

pytestmark = pytest.mark.usefixtures("one_thread")

MLP0 = "blocks.0.hook_mlp_out"
HOOK = "blocks.0.mlp.hook_post"


def interrupted(docs):
    """The first three documents, then a kill."""
    yield docs[:2]
    yield docs[2:3]
    raise KeyboardInterrupt


def cache_part(model, docs, directory, **kwargs):
    with pytest.raises(KeyboardInterrupt):
        cache_codes(
            model, interrupted(docs), batch_size=1, directory=directory, chunk_tokens=6, progress=False, **kwargs
        )
    assert CodeCache.open(directory).n_docs == 3


def resume(model, docs, directory, **kwargs):
    return cache_codes(model, docs, batch_size=2, directory=directory, chunk_tokens=6, progress=False, **kwargs)


def no_resume_warning():
    """Refused resumes must not also say they resumed."""
    return warnings.catch_warnings(record=True)


# -- 1. the conditions of a run ---------------------------------------------------------------------------------
def test_resume_refuses_a_cache_made_under_an_intervention(cb_model, docs, tmp_path):
    ablate_all = ablate_codes(cb_model, MLP0, list(range(16)))
    with intervene(cb_model, ablate_all):
        cache_part(cb_model, docs, tmp_path / "c")
    assert (CodeCache.open(tmp_path / "c").codes(MLP0) == -1).all()
    with no_resume_warning() as seen, pytest.raises(ValueError, match=f"hooks at {MLP0}.hook_codes.*ablate"):
        resume(cb_model, docs, tmp_path / "c")
    assert not [w for w in seen if issubclass(w.category, ResumeWarning)]
    # under the same intervention (made again: equal hooks) the resume goes on, and equals one uninterrupted run
    with intervene(cb_model, ablate_codes(cb_model, MLP0, list(range(16)))), pytest.warns(ResumeWarning):
        resumed = resume(cb_model, docs, tmp_path / "c")
        whole = cache_codes(cb_model, docs, progress=False)
    assert resumed.n_docs == 5 and torch.equal(resumed.codes(MLP0), whole.codes(MLP0))
    assert (resumed.codes(MLP0) == -1).all()
    # the same hook with other settings (other ids) differs
    with intervene(cb_model, ablate_codes(cb_model, MLP0, [3])), pytest.raises(ValueError, match="hooks at"):
        resume(cb_model, docs, tmp_path / "c")


def test_resume_refuses_a_plain_cache_under_an_intervention(cb_model, docs, tmp_path):
    cache_part(cb_model, docs, tmp_path / "c")
    with intervene(cb_model, ablate_codes(cb_model, MLP0, [3])), pytest.raises(ValueError, match="this run"):
        resume(cb_model, docs, tmp_path / "c")


def test_resume_refuses_a_cache_made_with_observed_codebooks(cb_model, docs, tmp_path):
    with codebooks_observed(cb_model, [MLP0]):
        cache_part(cb_model, docs, tmp_path / "c")
    with pytest.raises(ValueError, match=f"{MLP0}: the cache has its codes observed"):
        resume(cb_model, docs, tmp_path / "c")
    with codebooks_observed(cb_model):  # all observed is not the same either
        with pytest.raises(ValueError, match="blocks.1.hook_mlp_out: the cache has its codes applied"):
            resume(cb_model, docs, tmp_path / "c")
    with codebooks_observed(cb_model, [MLP0]), pytest.warns(ResumeWarning):
        assert resume(cb_model, docs, tmp_path / "c").n_docs == 5


def test_a_hook_that_feeds_the_codebooks_counts(cb_model, docs, tmp_path):
    cache_part(cb_model, docs, tmp_path / "c")
    scale = ("blocks.0.hook_resid_pre", lambda x, hook: x * 2.0)
    with intervene(cb_model, scale), pytest.raises(ValueError, match="hooks at blocks.0.hook_resid_pre"):
        resume(cb_model, docs, tmp_path / "c")


def test_codebook_settings_count(cb_model, docs, tmp_path):
    cache_part(cb_model, docs, tmp_path / "c")
    cb_model.blocks[0].hook_mlp_out.cfg.similarity = "cosine"  # same weights, other search
    with pytest.raises(ValueError, match="similarity"):
        resume(cb_model, docs, tmp_path / "c")


def test_bypassed_or_training_codebooks_are_refused(cb_model, docs):
    with codebooks_bypassed(cb_model, [MLP0]), pytest.raises(ValueError, match="bypassed"):
        cache_codes(cb_model, docs, progress=False)
    from cbinterp.core.codebooks.attach import training_codebooks

    with training_codebooks(cb_model), pytest.raises(ValueError, match="training_codebooks"):
        cache_codes(cb_model, docs, progress=False)


def test_conditions_are_recorded(cb_model, docs):
    with codebooks_observed(cb_model, [MLP0]):
        cache = cache_codes(cb_model, docs, progress=False)
    assert cache.meta["conditions"]["codebooks"][MLP0] == "observed"
    assert cache.meta["conditions"]["hooks"] == {}


def test_a_cache_without_recorded_conditions_opens_but_is_not_resumed(cb_model, docs, tmp_path):
    cache_part(cb_model, docs, tmp_path / "c")
    older = ("conditions", "run_sha256", "activation_dtype")  # what an older cbinterp did not write
    edit_marker(tmp_path / "c", lambda meta: [meta.pop(key) for key in older])
    assert CodeCache.open(tmp_path / "c").n_docs == 3
    with pytest.raises(ValueError, match="older cbinterp.*CodeCache.open"):
        resume(cb_model, docs, tmp_path / "c")


# -- 2. masks -----------------------------------------------------------------------------------------------------
def test_left_padding_is_refused(cb_model):
    doc = [3, 5, 7, 2]
    with pytest.raises(ValueError, match="Right-pad each row"):
        cache_codes(cb_model, torch.tensor([[0, 0, 0] + doc]), mask=torch.tensor([[False] * 3 + [True] * 4]))
    # a variable-length list is the way (a 2-token document is a document, not a (tokens, mask) pair)
    alone = cache_codes(cb_model, torch.tensor([doc]), progress=False)
    listed = cache_codes(cb_model, [doc, [4, 5]], progress=False)
    assert listed.n_docs == 2 and torch.equal(listed.tokens, torch.tensor(doc + [4, 5]))
    for name in alone.codebook_names:
        assert torch.equal(listed.codes(name)[:4], alone.codes(name))


def test_masks_that_are_no_prefix_are_refused(cb_model):
    # what a mask `tokens != pad_token_id` gives for to_tokens output where BOS is the pad token (TransformerLens
    # pads with the tokenizer's pad token, which is often the BOS/EOS id): BOS is False
    tokens = torch.tensor([[0, 3, 4, 0, 0], [0, 5, 6, 7, 8]])
    with pytest.raises(ValueError, match="row 0.*not a prefix"):
        cache_codes(cb_model, tokens, mask=tokens != 0, progress=False)
    hole = torch.ones_like(tokens, dtype=torch.bool)
    hole[1, 2] = False
    with pytest.raises(ValueError, match="row 1"):
        cache_codes(cb_model, tokens, mask=hole, progress=False)
    with pytest.raises(ValueError, match="not a prefix"):  # the same in (tokens, mask) pairs
        cache_codes(cb_model, [(tokens, hole)], progress=False)


def test_padding_of_a_bidirectional_model_is_refused(make_tiny_model):
    model = attach_codebooks(make_tiny_model(attention_dir="bidirectional"), ["mlp"], n_codes=8)
    tokens = torch.tensor([[1, 2, 3, 0]])
    with pytest.raises(ValueError, match="bidirectional"):
        cache_codes(model, tokens, mask=torch.tensor([[True, True, True, False]]), progress=False)
    cache_codes(model, tokens, progress=False)  # without padding it caches


# -- 3. token ids -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-3, -1, 11, 40])
def test_token_ids_out_of_range_are_refused(cb_model, bad, tmp_path):
    doc = torch.tensor([[1, 2, bad, 4]])
    with pytest.raises(ValueError, match=rf"token id {bad}, outside the model's vocabulary \[0, 11\)"):
        cache_codes(cb_model, doc, progress=False)
    with pytest.raises(ValueError, match=rf"token id {bad}"):
        cache_codes(cb_model, [doc[0].tolist()], directory=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "cbinterp.json").exists() or CodeCache.open(tmp_path / "c").n_docs == 0


def test_padding_may_hold_any_id(cb_model):
    """Masked-out padding sits after every real token: it is run as token 0 and never cached, so -1 is fine."""
    padded = torch.tensor([[1, 2, 3, -1, -1], [4, 5, 6, 7, 8]])
    cached = cache_codes(cb_model, padded, mask=padded >= 0, progress=False)
    alone = cache_codes(cb_model, [[1, 2, 3], [4, 5, 6, 7, 8]], progress=False)
    for name in cached.codebook_names:
        assert torch.equal(cached.codes(name), alone.codes(name))


def test_cache_documents_checks_token_ids(model):
    attach_codebooks(model, sites=["mlp"], n_codes=8, k=1)
    tokens = torch.tensor([[0, 5, 6, -3], [0, 8, 9, 2]])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with pytest.raises(ValueError, match="token id -3"):
        cache_documents(model, DocumentTokens(tokens=tokens, mask=mask, doc_index=torch.tensor([0, 1])))
    # padding (mask False) may hold anything
    mask[0, 3] = False
    cache = cache_documents(model, DocumentTokens(tokens=tokens, mask=mask, doc_index=torch.tensor([0, 1])))
    assert cache.tokens.tolist() == [5, 6, 8, 9, 2] and cache.pos.tolist() == [0, 1, 0, 1, 2]
    with pytest.raises(ValueError, match="consecutive"):
        rows = DocumentTokens(tokens=tokens[[0, 1, 0]], mask=mask[[0, 1, 0]], doc_index=torch.tensor([0, 1, 0]))
        cache_documents(model, rows)


# -- 4. the marker ------------------------------------------------------------------------------------------------
def edit_marker(directory, change, checksum="drop"):
    """Edit the marker; its checksum dropped (as an older cbinterp wrote it), kept as it was, or recomputed."""
    path = directory / "cbinterp.json"
    meta = json.loads(path.read_text())
    change(meta)
    if checksum == "drop":
        meta.pop("meta_sha256", None)
    elif checksum == "recompute":
        integrity.seal(meta)
    path.write_text(json.dumps(meta))


def test_chunk_paths_never_leave_the_folder(cb_model, docs, tmp_path):
    cache_codes(cb_model, docs, directory=tmp_path / "c", progress=False)
    cache_codes(cb_model, docs.flip(0), directory=tmp_path / "evil", progress=False)
    name = json.loads((tmp_path / "c" / "cbinterp.json").read_text())["chunks"][0]["file"]

    def outside(meta):
        meta["chunks"][0]["file"] = f"../evil/{name}"

    edit_marker(tmp_path / "c", outside)
    with pytest.raises(ValueError, match="outside"):
        CodeCache.open(tmp_path / "c").codes(MLP0)
    for bad in (str(tmp_path / "evil" / name), "sub\\" + name, "", 3):
        edit_marker(tmp_path / "c", lambda meta, bad=bad: meta["chunks"][0].update(file=bad))
        with pytest.raises(ValueError, match="chunk"):
            CodeCache.open(tmp_path / "c").codes(MLP0)


def test_symlinked_chunks_are_refused(cb_model, docs, tmp_path):
    cache_codes(cb_model, docs, directory=tmp_path / "c", progress=False)
    chunk = next((tmp_path / "c").glob("chunk_*.safetensors"))
    moved = tmp_path / "elsewhere.safetensors"
    chunk.rename(moved)
    os.symlink(moved, chunk)
    with pytest.raises(ValueError, match="symbolic link"):
        CodeCache.open(tmp_path / "c").codes(MLP0)
    with pytest.raises(ValueError, match="symbolic link"):
        cache_codes(cb_model, docs, directory=tmp_path / "c", progress=False)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["codebooks"][MLP0].update(n_codes=10),
        lambda m: m.update(n_docs=2),
        lambda m: m.update(n_tokens=12),
        lambda m: m["chunks"][0].update(n_tokens=1),
        lambda m: m.update(hooks=[]),
    ],
)
def test_edited_metadata_is_refused(cb_model, docs, tmp_path, change):
    cache_codes(cb_model, docs, hooks=[HOOK], directory=tmp_path / "c", progress=False)
    edit_marker(tmp_path / "c", change, checksum="keep")
    with pytest.raises(ValueError, match="metadata.*changed"):
        CodeCache.open(tmp_path / "c")
    with pytest.raises(ValueError, match="metadata.*changed"):
        cache_codes(cb_model, docs, hooks=[HOOK], directory=tmp_path / "c", progress=False)


def test_metadata_edited_with_a_new_checksum_is_refused(cb_model, docs, tmp_path):
    """The chunks record the run that made them: an n_codes edited even with a fresh checksum does not match."""
    cache_codes(cb_model, docs, directory=tmp_path / "c", progress=False)
    edit_marker(tmp_path / "c", lambda m: m["codebooks"][MLP0].update(n_codes=10), checksum="recompute")
    with pytest.raises(ValueError, match="run_sha256"):
        CodeCache.open(tmp_path / "c").codes(MLP0)


def test_metadata_that_disagrees_with_the_chunks_is_refused(cb_model, docs, tmp_path):
    """Without its checksum (an older marker) a marker is still checked against what the chunks say of themselves."""
    cache_codes(cb_model, docs, directory=tmp_path / "c", batch_size=1, chunk_tokens=6, progress=False)
    edit_marker(tmp_path / "c", lambda m: m.update(n_docs=4))
    with pytest.raises(ValueError, match="n_docs"):
        CodeCache.open(tmp_path / "c")
    edit_marker(tmp_path / "c", lambda m: m.update(n_docs=5) or m["chunks"][1].update(first_doc=2))
    with pytest.raises(ValueError, match="first_doc"):
        CodeCache.open(tmp_path / "c")


# -- 5. damaged chunks, other settings --------------------------------------------------------------------------
def test_missing_or_truncated_chunks_are_named(cb_model, docs, tmp_path):
    cache_codes(cb_model, docs, directory=tmp_path / "c", batch_size=1, chunk_tokens=6, progress=False)
    chunk = sorted((tmp_path / "c").glob("chunk_*.safetensors"))[1]
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{chunk.name} is truncated.*delete the folder"):
        CodeCache.open(tmp_path / "c").codes(MLP0)
    with pytest.raises(ValueError, match=f"{chunk.name} is truncated"):
        cache_codes(cb_model, docs, directory=tmp_path / "c", batch_size=1, chunk_tokens=6, progress=False)
    chunk.write_bytes(data[:6])
    with pytest.raises(ValueError, match=chunk.name):
        _ = CodeCache.open(tmp_path / "c").doc_offsets
    chunk.unlink()
    with pytest.raises(FileNotFoundError, match=f"{chunk.name} is missing.*delete the folder"):
        CodeCache.open(tmp_path / "c").codes(MLP0)
    with pytest.raises(FileNotFoundError, match=chunk.name):
        _ = CodeCache.open(tmp_path / "c").pos


def test_resume_refuses_other_activation_dtype_or_token_strings(cb_model, docs, tmp_path):
    cache_part(cb_model, docs, tmp_path / "a", hooks=[HOOK])
    with pytest.raises(ValueError, match="activation_dtype"):
        resume(cb_model, docs, tmp_path / "a", hooks=[HOOK], activation_dtype=torch.float32)
    strings = [str(i) for i in range(11)]
    cache_part(cb_model, docs, tmp_path / "b", token_strings=strings)
    with pytest.raises(ValueError, match="token_strings"):
        resume(cb_model, docs, tmp_path / "b", token_strings=list("abcdefghijk"))
    with pytest.raises(ValueError, match="token_strings"):
        resume(cb_model, docs, tmp_path / "b")
    with pytest.warns(ResumeWarning):
        assert resume(cb_model, docs, tmp_path / "b", token_strings=strings).n_docs == 5
