"""Guarantees about folders on disk: nothing lost, nothing run, nothing mixed, no debris, one verifier.

Saves, checkpoints and caches refuse folders holding other files; resume never unpickles and refuses what would
mix two runs; atomic writes leave no debris; models, checkpoints and caches are opened by one verifier. One test per
case, each failing before its fix; the sections keep their numbers (3, 5, 6 and 8 are in test_guarantees_values.py).
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from guarantees_common import batch_fn, cfg

import cbinterp
from cbinterp import (
    Codebook,
    CodebookConfig,
    attach_codebooks,
    cache_codes,
    get_codebooks,
    load,
    save,
    train,
)
from cbinterp.core.storage import manifest as mf
from cbinterp.core.storage.io import CONFIG_FILE, WEIGHTS_FILE
from cbinterp.core.storage.manifest import MANIFEST_FILE, ResumeWarning
from cbinterp.core.training.train import TRAINER_FILE

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::cbinterp.ResumeWarning")]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. data loss -----------------------------------------------------------------------------------------------------
def test_save_into_folder_with_other_files_is_refused(model, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(d)):
        save(model, d)
    assert (d / "notes.txt").read_text() == "mine"


def test_save_onto_a_file_is_refused(model, tmp_path):
    f = tmp_path / "model"
    f.write_text("a file")
    with pytest.raises(FileExistsError, match="a file is there"):
        save(model, f)
    assert f.read_text() == "a file"


def test_save_replaces_only_its_own_files(model, tmp_path):
    d = tmp_path / "d"
    save(model, d)
    save(model, d)  # a previous model is replaced
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        save(model, d)
    assert (d / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    save(model, empty)  # an empty folder holds nothing to lose
    load(empty, device="cpu")


def test_checkpoint_dir_with_other_files_is_refused_before_training(model, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileExistsError, match=str(d)):
        train(model, batch_fn(), cfg(checkpoint_dir=str(d)))
    assert (d / "notes.txt").read_text() == "mine"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    saved = tmp_path / "saved"
    save(model, saved)  # a saved model is not a checkpoint: train does not overwrite it either
    with pytest.raises(FileExistsError, match="training checkpoint"):
        train(model, batch_fn(), cfg(checkpoint_dir=str(saved)))


def test_cache_directory_with_other_files_is_refused(model, tmp_path):
    attach_codebooks(model, ["mlp"], n_codes=8)
    d = tmp_path / "c"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(d)):
        cache_codes(model, torch.zeros(2, 4, dtype=torch.long), directory=d, progress=False)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


# -- 2. no code execution on resume -----------------------------------------------------------------------------------
class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))  # unpickling creates the file


def test_old_pickle_checkpoint_is_refused_without_unpickling(model, tmp_path):
    ckpt = tmp_path / "ckpt"
    save(model, ckpt)
    # turn it into a version-1 checkpoint: no marker, the weights' sha in config.json, a crafted trainer.pt
    config = json.loads((ckpt / CONFIG_FILE).read_text())
    config.update(version=1, weights_sha256=mf.sha256_of(ckpt / WEIGHTS_FILE))
    (ckpt / CONFIG_FILE).write_text(json.dumps(config))
    (ckpt / MANIFEST_FILE).unlink()
    ran = tmp_path / "payload-ran"
    (ckpt / "trainer.pt").write_bytes(pickle.dumps({"optimizer": _Payload(ran), "step": 1}))
    with pytest.raises(ValueError, match="never loads"):
        train(model, batch_fn(), cfg(checkpoint_dir=str(ckpt)))
    assert not ran.exists()
    result = train(model, batch_fn(), cfg(checkpoint_dir=str(ckpt)), resume=False)  # replaced on request
    assert result.resumed_from is None and not ran.exists() and not (ckpt / "trainer.pt").exists()


def test_resume_loads_without_any_unpickling(make_tiny_model, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    straight = train(make_tiny_model(seed=0), batch_fn(), cfg(steps=4))
    train(make_tiny_model(seed=0), batch_fn(), cfg(steps=4, checkpoint_dir=str(ckpt), checkpoint_every=2))

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    # the last checkpoint is at step 4; make one at step 2 and resume from it
    again = tmp_path / "again"
    with pytest.raises(KeyboardInterrupt):

        def dies(step):
            if step == 3:
                raise KeyboardInterrupt
            return batch_fn()(step)

        train(make_tiny_model(seed=0), dies, cfg(steps=4, checkpoint_dir=str(again), checkpoint_every=2))
    resumed = train(make_tiny_model(seed=0), batch_fn(), cfg(steps=4, checkpoint_dir=str(again)))
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses


def test_every_checkpoint_file_is_checksummed(model, tmp_path):
    ckpt = tmp_path / "ckpt"
    train(model, batch_fn(), cfg(checkpoint_dir=str(ckpt)))
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {p.name for p in ckpt.iterdir()} - {MANIFEST_FILE}
    state = json.loads((ckpt / TRAINER_FILE).read_text())
    state["losses"][0] += 1.0  # still valid JSON, but not what was written
    (ckpt / TRAINER_FILE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="checksum differs"):
        train(model, batch_fn(), cfg(steps=5, checkpoint_dir=str(ckpt)))


# -- 4. resume checks what decides the result, and says so ------------------------------------------------------------
@pytest.fixture
def checkpointed(make_tiny_model, tmp_path):
    def build(seed=0, **cb):
        return attach_codebooks(make_tiny_model(seed=seed), ["mlp"], **{"n_codes": 8, **cb})

    ckpt = tmp_path / "ckpt"

    def dies(step):
        if step == 2:
            raise KeyboardInterrupt
        return batch_fn()(step)

    with pytest.raises(KeyboardInterrupt):
        train(build(), dies, cfg(steps=4, checkpoint_dir=str(ckpt), checkpoint_every=1))
    return build, ckpt


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(cb=dict(similarity="cosine")), "similarity"),
        (dict(cb=dict(k=2)), "k: checkpoint 1, now 2"),
        (dict(train=dict(lr=1e-2)), "lr: checkpoint 0.001, now 0.01"),
        (dict(train=dict(steps=6)), "steps"),  # the cosine schedule depends on it
        (dict(data=batch_fn(seed=1)), "other data"),
        (dict(seed=1), "seed: checkpoint 0, now 1"),  # HookedTransformerConfig.seed
        (dict(perturb=True), "started from other weights"),
    ],
)
def test_resume_refuses_what_would_mix_two_runs(checkpointed, change, match):
    build, ckpt = checkpointed
    model = build(seed=change.get("seed", 0), **change.get("cb", {}))
    if change.get("perturb"):
        with torch.no_grad():
            model.embed.W_E[0, 0] += 1.0
    with pytest.raises(ValueError, match=match):
        settings = {"steps": 4, **change.get("train", {})}
        train(model, change.get("data", batch_fn()), cfg(checkpoint_dir=str(ckpt), **settings))


def test_resume_may_skip_codebook_initialisation(checkpointed):
    """The checkpoint's codebooks replace the initial ones, so a resumed run may skip e.g. k-means (fsm_precision)."""
    build, ckpt = checkpointed
    model = build()
    with torch.no_grad():
        get_codebooks(model)["blocks.0.hook_mlp_out"].weight.mul_(3.0)
    assert train(model, batch_fn(), cfg(steps=4, checkpoint_dir=str(ckpt))).resumed_from == 2


def test_resume_is_announced(checkpointed):
    build, ckpt = checkpointed
    with pytest.warns(ResumeWarning, match=r"step 2 of 4"):
        result = train(build(), batch_fn(), cfg(steps=4, checkpoint_dir=str(ckpt)))
    assert result.resumed_from == 2
    with pytest.warns(ResumeWarning, match="already complete"):  # a second call: nothing left, and it says so
        again = train(build(), batch_fn(), cfg(steps=4, checkpoint_dir=str(ckpt)))
    assert again.resumed_from == 4 and again.steps == 4


def test_cache_resume_refuses_other_weights_data_or_length(model, tmp_path):
    attach_codebooks(model, ["mlp"], n_codes=8)
    docs = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(0))

    def interrupted():
        yield docs[:2]
        yield docs[2:4]
        raise KeyboardInterrupt

    def start(path):
        with pytest.raises(KeyboardInterrupt):
            cache_codes(model, interrupted(), batch_size=2, directory=path, chunk_tokens=1, progress=False)

    start(tmp_path / "a")
    other = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="other data"):
        cache_codes(model, other, directory=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="sequence length"):
        cache_codes(model, docs[:, :4], directory=tmp_path / "a", progress=False)
    with torch.no_grad():
        get_codebooks(model)["blocks.0.hook_mlp_out"].weight.add_(0.5)
    with pytest.raises(ValueError, match="other weights"):
        cache_codes(model, docs, directory=tmp_path / "a", progress=False)
    with torch.no_grad():
        get_codebooks(model)["blocks.0.hook_mlp_out"].weight.sub_(0.5)
    start(tmp_path / "b")
    with pytest.warns(ResumeWarning, match="4 documents were already cached"):
        resumed = cache_codes(model, docs, directory=tmp_path / "b", progress=False)
    assert torch.equal(resumed.tokens, docs.reshape(-1))


# -- 7. atomic writes leave no debris ---------------------------------------------------------------------------------
def test_stale_temporaries_of_the_path_are_removed(model, tmp_path):
    from cbinterp.core.storage.atomic import HOST

    d = tmp_path / "d"
    pid = dead_pid()
    stale_dir = tmp_path / f".d.cbinterp-{HOST}.{pid}-0badc0de.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x" * 1000)
    keep = [
        tmp_path / f".other.cbinterp-{HOST}.{pid}-0badc0de.tmp",  # another path's
        tmp_path / ".d.abcd1234.tmp",  # not named by cbinterp: never removed, whatever it looks like
        tmp_path / ".d.notes",
        tmp_path / "d.tmp",
    ]
    for p in keep:
        p.write_text("not ours")
    save(model, d)
    assert not stale_dir.exists()
    assert all(p.exists() for p in keep)
    (tmp_path / f".d.cbinterp-{HOST}.{pid}-00000001.tmp").mkdir()
    load(d, device="cpu")  # load cleans up too
    assert not (tmp_path / f".d.cbinterp-{HOST}.{pid}-00000001.tmp").exists()


def test_load_recovers_a_save_killed_between_its_renames(model, tokens, tmp_path):
    from cbinterp.core.storage.atomic import HOST

    d = tmp_path / "d"
    save(model, d)
    os.replace(d, tmp_path / f".d.cbinterp-{HOST}.{dead_pid()}-0badc0de.old")  # the first rename happened only
    loaded = load(d, device="cpu")
    assert torch.equal(loaded(tokens), model(tokens))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_saved_files_respect_the_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        save(model, tmp_path / "d")
        attach_codebooks(model, ["mlp"], n_codes=8)
        cache_codes(model, torch.zeros(2, 4, dtype=torch.long), directory=tmp_path / "c", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    for folder in (tmp_path / "d", tmp_path / "c"):
        for p in folder.iterdir():
            assert p.stat().st_mode & 0o777 == 0o644, p


# -- one verifier, one list of codebook settings ----------------------------------------------------------------------
def test_one_verifier_for_models_checkpoints_and_caches(model, tmp_path, monkeypatch):
    from cbinterp.core.storage import folder

    calls = []
    real = folder.open_folder
    monkeypatch.setattr(
        folder, "open_folder", lambda path, kinds, *a, **k: calls.append(kinds) or real(path, kinds, *a, **k)
    )
    save(model, tmp_path / "m")
    load(tmp_path / "m", device="cpu")
    train(model, batch_fn(), cfg(steps=2, checkpoint_dir=str(tmp_path / "ckpt")))
    train(model, batch_fn(), cfg(steps=2, checkpoint_dir=str(tmp_path / "ckpt")))
    attach_codebooks(model, ["mlp"], n_codes=8)
    cache_codes(model, torch.zeros(2, 4, dtype=torch.long), directory=tmp_path / "c", progress=False)
    cbinterp.CodeCache.open(tmp_path / "c")
    kinds = {k for ks in calls for k in ks}
    assert {mf.MODEL, mf.CHECKPOINT, mf.CODE_CACHE} <= kinds


def test_codebook_config_is_the_single_list_of_settings():
    params = set(inspect.signature(Codebook.__init__).parameters)
    fields = {f for f in CodebookConfig.__dataclass_fields__}
    assert params & fields == {"dim", "n_codes"}  # the other settings are not written out again
    cb = Codebook(4, 8, k=2, groups=2, similarity="cosine")
    assert cb.cfg == CodebookConfig(dim=4, n_codes=8, k=2, groups=2, similarity="cosine")
    with pytest.raises(TypeError, match="did you mean one of \\['k'"):
        Codebook(4, 8, kk=2)
