"""`cache_codes` under torch.distributed: 2 gloo ranks on the CPU, checked against the one-process cache.

Each rank is a process forked from the test, which joins a gloo group (file rendezvous), caches the same input into
the same folder, and writes what happened to `<out>/rank<r>.json`: {"ok": true} or {"error": type, "message": ...}.
`die_after` makes one rank exit abruptly (no exception, no goodbye) once it has read that many batches, as a killed
or crashed process would.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny_models import make_cb_model

import cbinterp
from cbinterp import CodeCache, cache_codes, code_contexts, code_frequencies, token_positions, top_tokens
from cbinterp.core.storage.manifest import ResumeWarning

HOOK = "blocks.0.mlp.hook_post"

pytestmark = pytest.mark.usefixtures("one_thread")


def docs() -> tuple[torch.Tensor, torch.Tensor]:
    """11 documents of up to 8 tokens, right-padded (padding marked -1), one of them empty."""
    tokens = torch.randint(0, 11, (11, 8), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([8, 5, 8, 0, 3, 8, 8, 6, 1, 8, 7])
    mask = torch.arange(8)[None, :] < lengths[:, None]
    tokens = tokens.masked_fill(~mask, -1)  # padding may hold any id: it is never run as itself nor cached
    return tokens, mask


def cache_kwargs() -> dict:
    return dict(batch_size=2, hooks=[HOOK], chunk_tokens=10, progress=False, token_strings=[str(i) for i in range(11)])


def rank_main(rank: int, world: int, rdv: str, directory: str, out: str, die_rank: int, die_after: int) -> None:
    """One rank (in a forked process): cache `docs()` into `directory`, report to `out`/rank<r>.json."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rdv}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    tokens, mask = docs()

    def batches():
        for i, start in enumerate(range(0, tokens.shape[0], 2)):
            if rank == die_rank and i == die_after:
                os._exit(17)  # abrupt: what SIGKILL or a segfault leaves
            yield tokens[start : start + 2], mask[start : start + 2]

    try:
        cbinterp.cache_codes(make_cb_model(), batches(), directory=directory, **cache_kwargs())
        result = {"ok": True}
    except BaseException as err:  # noqa: BLE001 - reported to the test
        result = {"error": type(err).__name__, "message": str(err)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_ranks(tmp_path: Path, directory: Path, world: int = 2, die_rank: int = -1, die_after: int = -1) -> dict:
    """Run `world` ranks to the end; each rank's report (None for a rank that died)."""
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    out.mkdir()
    # forked from this process, which imported torch and cbinterp already (one thread: no pool to inherit)
    ctx = multiprocessing.get_context("fork")
    rdv = out / "rendezvous"
    procs = [
        ctx.Process(target=rank_main, args=(r, world, str(rdv), str(directory), str(out), die_rank, die_after))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank did not finish within 180 s")
    return {r: (json.loads(f.read_text()) if (f := out / f"rank{r}.json").exists() else None) for r in range(world)}


def one_process(directory=None) -> CodeCache:
    tokens, mask = docs()
    return cache_codes(make_cb_model(), tokens, mask=mask, directory=directory, **cache_kwargs())


def assert_identical(a: CodeCache, b: CodeCache) -> None:
    assert (a.n_docs, a.n_tokens) == (b.n_docs, b.n_tokens)
    assert torch.equal(a.doc_offsets, b.doc_offsets)
    for attr in ("tokens", "doc", "pos"):
        assert torch.equal(getattr(a, attr), getattr(b, attr)), attr
    for name in a.codebook_names:
        assert torch.equal(a.stored_codes(name), b.stored_codes(name)), name
        assert torch.equal(code_frequencies(a, name), code_frequencies(b, name))
    for hook in a.hook_names:
        assert torch.equal(a.activations(hook), b.activations(hook))
    name = a.codebook_names[-1]
    code = int(a.codes(name)[0, 0])
    assert code_contexts(a, name, code, window=3) == code_contexts(b, name, code, window=3)
    assert top_tokens(a, name, code).equals(top_tokens(b, name, code))
    assert torch.equal(token_positions(a, "7"), token_positions(b, "7"))


@pytest.mark.needs_hooked  # the ranks build the tiny HookedTransformer themselves
def test_two_ranks_make_the_one_process_cache(tmp_path):
    reports = run_ranks(tmp_path, tmp_path / "c")
    assert reports == {0: {"ok": True}, 1: {"ok": True}}
    cache = CodeCache.open(tmp_path / "c")
    alone = one_process()
    assert_identical(cache, alone)
    assert_identical(cache, one_process(tmp_path / "alone"))
    assert cache.n_docs == 11 and cache.doc_offsets.diff()[3] == 0  # the empty document keeps its number
    assert torch.equal(cache.pos[cache.doc == 4], torch.tensor([0, 1, 2]))  # only the real tokens
    chunks = cache.meta["chunks"]
    assert len(chunks) >= 4 and [c["first_doc"] for c in chunks] == sorted(c["first_doc"] for c in chunks)
    files = {p.name for p in (tmp_path / "c").iterdir()}
    assert files == set(cache.meta["files"]) | {"cbinterp.json"}  # no temporaries, nothing unlisted


@pytest.mark.needs_hooked  # the ranks build the tiny HookedTransformer themselves
def test_a_dead_rank_leaves_the_cache_as_it_was_and_the_run_resumes(tmp_path):
    directory = tmp_path / "c"
    reports = run_ranks(tmp_path, directory, die_rank=1, die_after=3)
    assert reports[1] is None  # it died
    assert reports[0]["error"] == "RuntimeError"
    assert "another rank stopped" in reports[0]["message"] and "run cache_codes again" in reports[0]["message"]
    partial = CodeCache.open(directory)
    assert partial.n_docs == 0 and partial.meta["chunks"] == []  # nothing of the broken run is visible
    assert list(directory.glob("chunk_d*.safetensors"))  # but the chunks finished before it are kept
    with pytest.warns(ResumeWarning, match="already cached"):
        resumed = one_process(directory)  # one process now: another world size
    assert_identical(resumed, one_process())


def test_two_ranks_resume_what_one_process_began(tmp_path):
    directory = tmp_path / "c"
    tokens, mask = docs()

    def interrupted():
        yield tokens[:5], mask[:5]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_codes(make_cb_model(), interrupted(), directory=directory, **cache_kwargs())
    before = CodeCache.open(directory)
    assert 0 < before.n_docs < 11
    assert run_ranks(tmp_path, directory) == {0: {"ok": True}, 1: {"ok": True}}
    assert_identical(CodeCache.open(directory), one_process())


def test_object_collectives_need_no_group_in_one_process():
    from cbinterp.core.training import distributed as dd

    assert not dd.active()
    assert dd.broadcast_object({"failure": None}) == {"failure": None}
    assert dd.gather_objects("done") == ["done"]
    dd.wait_for_all_ranks()  # returns at once: no other rank to wait for
