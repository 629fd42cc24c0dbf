"""Persistence under adversarial conditions: what loading reads and runs, what cleanup touches, concurrent writers
and readers, read-only folders, odd paths and configs."""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from cbinterp import attach_codebooks, get_codebooks, load, save
from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.storage import folder
from cbinterp.core.storage import io as serialization
from cbinterp.core.storage.atomic import HOST
from cbinterp.core.storage.io import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, read_config, sha256_of

pytestmark = pytest.mark.usefixtures("one_thread")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def writer_entry(target: Path, pid: int, kind: str, host: str = HOST) -> Path:
    """The name cbinterp gives a temporary ("tmp") or a folder set aside ("old") of a write of `target`."""
    return target.with_name(f".{target.name}.cbinterp-{host}.{pid}-0badc0de.{kind}")


def rechecksum(path: Path) -> None:
    """Record the current checksums of every listed file: the folder is then as if written so."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": sha256_of(path / name), "bytes": (path / name).stat().st_size}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def bpe():
    from cbinterp.tasks.text import train_bpe_tokenizer
    from cbinterp.tasks.toytext import generate_corpus

    return train_bpe_tokenizer(generate_corpus(40, seed=1), vocab_size=300)


@pytest.fixture
def tok_model(make_tiny_model, bpe):
    from cbinterp.tasks.text import attach_tokenizer

    return attach_tokenizer(make_tiny_model(seed=0, d_vocab=len(bpe)), bpe)


# -- 1. a codebook save replaces the whole set --------------------------------------------------------------------
def test_save_codebooks_replaces_the_whole_set(model, make_tiny_model, tmp_path):
    from cbinterp import load_codebooks, save_codebooks

    both = attach_codebooks(model, sites=["attn", "mlp"], n_codes=8, seed=0)
    mlp_only = attach_codebooks(make_tiny_model(seed=1), sites="mlp", n_codes=5, seed=1)
    save_codebooks(both, tmp_path / "cbs")
    save_codebooks(mlp_only, tmp_path / "cbs")
    loaded = load_codebooks(tmp_path / "cbs")
    assert sorted(loaded) == sorted(get_codebooks(mlp_only))
    for name, cb in get_codebooks(mlp_only).items():
        assert torch.equal(loaded[name].weight, cb.weight)


def test_codebooks_recording_one_hook_name_twice_are_refused(model, tmp_path):
    from cbinterp import load_codebooks, save_codebook

    cbs = get_codebooks(attach_codebooks(model, sites="mlp", n_codes=8))
    one, two = cbs.values()
    save_codebook(one, tmp_path / "cbs" / "a", hook_name="blocks.0.hook_mlp_out")
    save_codebook(two, tmp_path / "cbs" / "b", hook_name="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match=r"record the hook name 'blocks\.0\.hook_mlp_out' \(a and b\)"):
        load_codebooks(tmp_path / "cbs")


def test_codebook_set_is_checked_as_a_whole(model, tmp_path):
    from cbinterp import load_codebooks, save_codebooks

    attach_codebooks(model, sites="mlp", n_codes=8)
    d = save_codebooks(model, tmp_path / "cbs")
    (d / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"does not list \(\['notes\.txt'\]\)"):
        load_codebooks(d)
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        save_codebooks(model, d)  # replacing the set would delete it
    (d / "notes.txt").unlink()
    shutil.rmtree(d / "blocks.1.hook_mlp_out")
    shutil.copytree(d / "blocks.0.hook_mlp_out", d / "blocks.1.hook_mlp_out")  # another member in its place
    with pytest.raises(ValueError, match="does not match the checksum recorded"):
        load_codebooks(d)


# -- 2. only what cbinterp wrote, and whose writer is gone, is cleaned up ---------------------------------------------
def test_files_that_only_look_like_debris_are_left_alone(model, tmp_path):
    d = tmp_path / "mdl"
    save(model, d)
    lookalikes = [tmp_path / ".mdl.old", tmp_path / ".mdl.abcdefgh.tmp", tmp_path / f".mdl.{dead_pid()}-0badc0de.tmp"]
    for p in lookalikes:
        p.mkdir()
        (p / "notes.txt").write_text("mine")
    load(d, device="cpu")
    assert all((p / "notes.txt").read_text() == "mine" for p in lookalikes)
    shutil.rmtree(d)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(d)  # `.mdl.old` is not put in its place
    assert not d.exists()
    save(model, d)
    assert sorted(p.name for p in d.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE])
    assert all((p / "notes.txt").read_text() == "mine" for p in lookalikes)


def test_only_entries_of_gone_writers_on_this_host_are_cleaned(model, tokens, tmp_path):
    d = tmp_path / "d"
    gone = dead_pid()
    stale = writer_entry(d, gone, "tmp")
    stale.mkdir()
    (stale / WEIGHTS_FILE).write_bytes(b"x" * 100)
    alive = writer_entry(d, os.getppid(), "tmp")  # a writer still running
    elsewhere = writer_entry(d, gone, "tmp", host="00000000")  # a pid on another machine says nothing here
    for p in (alive, elsewhere):
        p.mkdir()
    save(model, d)
    assert not stale.exists() and alive.exists() and elsewhere.exists()
    os.replace(d, writer_entry(d, gone, "old"))  # killed between its two renames
    loaded = load(d, device="cpu")  # puts the copy set aside back
    assert torch.equal(loaded(tokens), model(tokens))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", alive.name, elsewhere.name])


# -- 3, 4, 6. loading runs no code, reads one checked tokenizer, needs no network ----------------------------------
def test_load_runs_no_code_named_by_the_config(tok_model, bpe, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # were it run: not in ~/.cache
    ran = tmp_path / "ran"
    evil = tmp_path / "evil"
    bpe.save_pretrained(evil)
    (evil / "evil_tok.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((evil / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (evil / "tokenizer_config.json").write_text(json.dumps(config))
    tok_model.cfg.tokenizer_name, tok_model.cfg.trust_remote_code = str(evil), True
    save(tok_model, tmp_path / "m")
    assert read_config(tmp_path / "m")["model_config"]["trust_remote_code"] is True
    loaded = load(tmp_path / "m", device="cpu")
    assert not ran.exists()
    assert loaded.cfg.trust_remote_code is False
    assert torch.equal(loaded.to_tokens("The king sat."), tok_model.to_tokens("The king sat."))


def test_load_needs_no_network(tok_model, tmp_path, monkeypatch):
    import huggingface_hub.constants

    tok_model.cfg.tokenizer_name = "EleutherAI/pythia-14m"  # as a model made from a Hub model records it
    save(tok_model, tmp_path / "m")

    def no_network(*args, **kwargs):
        raise OSError("network access during load")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load(tmp_path / "m", device="cpu")
    text = "The king sat."
    assert torch.equal(loaded.to_tokens(text), tok_model.to_tokens(text))
    assert state_equal(loaded, tok_model)


# -- 5. every file read is listed, checked, and inside the folder -----------------------------------------------------
@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"])
def test_every_file_read_must_be_listed(tok_model, tmp_path, name):
    d = tmp_path / "m"
    save(tok_model, d)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    del manifest["files"][name]
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')} is not listed in .*{MANIFEST_FILE}"):
        load(d)


def test_codebook_weights_must_be_listed(model, tmp_path):
    from cbinterp import load_codebook, save_codebook

    one = next(iter(get_codebooks(attach_codebooks(model, sites="mlp", n_codes=8)).values()))
    d = save_codebook(one, tmp_path / "cb")
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    del manifest["files"]["codebook.safetensors"]
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"codebook[.]safetensors is not listed"):
        load_codebook(d)


def test_a_file_linked_from_elsewhere_is_refused(model, tmp_path):
    d = tmp_path / "m"
    save(model, d)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(d / WEIGHTS_FILE, outside)
    (d / WEIGHTS_FILE).symlink_to(outside)  # same bytes, so the checksum matches
    with pytest.raises(ValueError, match="symbolic link"):
        load(d)


@pytest.mark.parametrize("name", ["../config.json", "/etc/passwd", "..", "sub\\..\\x"])
def test_marker_names_never_leave_the_folder(model, tmp_path, name):
    d = tmp_path / "m"
    save(model, d)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    manifest["files"][name] = manifest["files"][CONFIG_FILE]
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="bad file name"):
        load(d)


# -- 7. a concurrent save never makes a load report corruption --------------------------------------------------------
def test_a_save_landing_mid_load_leaves_the_load_whole(model, make_tiny_model, tmp_path, monkeypatch):
    d = tmp_path / "d"
    before = attach_codebooks(model, sites=["attn", "mlp"], n_codes=8)
    after = attach_codebooks(make_tiny_model(seed=1), sites="mlp", n_codes=5)
    save(before, d)
    real_build = serialization.build_model
    saved = []

    def build_after_a_save(*args, **kwargs):
        if not saved:
            saved.append(save(after, d))  # another writer replaces the folder while this load reads it
        return real_build(*args, **kwargs)

    monkeypatch.setattr(serialization, "build_model", build_after_a_save)
    assert state_equal(load(d, device="cpu"), before)  # what was opened, whole
    monkeypatch.undo()
    assert state_equal(load(d, device="cpu"), after)


def test_a_marker_missed_mid_swap_is_not_taken_for_the_old_format(model, tmp_path, monkeypatch):
    # The reader looks for the marker while a save has set the old folder aside, then finds the new folder's
    # config.json: a version-2 config without a marker seen is a swap in progress, never a version-1 folder.
    d = tmp_path / "d"
    save(model, d)
    real_lexists, missed = os.path.lexists, []

    def lexists(path):
        if Path(path) == d / "cbinterp.json" and not missed:
            missed.append(path)
            return False
        return real_lexists(path)

    monkeypatch.setattr(os.path, "lexists", lexists)
    loaded = load(d, device="cpu")
    assert missed and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_load_between_the_renames_of_a_save_gets_the_new_model(model, make_tiny_model, tmp_path, monkeypatch):
    d = tmp_path / "d"
    save(model, d)
    new = make_tiny_model(seed=1)
    real_replace, real_sleep = os.replace, time.sleep
    waiting = threading.Event()
    results = []

    def read():
        try:
            results.append(load(d, device="cpu"))
        except Exception as err:  # handed to the test's thread
            results.append(err)

    reader = threading.Thread(target=read)

    def replace(src, dst):
        real_replace(src, dst)
        if Path(src) == d and not reader.is_alive() and not results:  # `d` is set aside, the new one not in place
            reader.start()
            waiting.wait(timeout=10)

    monkeypatch.setattr(
        folder, "time", types.SimpleNamespace(sleep=lambda s: (waiting.set(), real_sleep(s))), raising=False
    )
    monkeypatch.setattr(os, "replace", replace)
    save(new, d)
    reader.join(timeout=120)
    assert len(results) == 1 and not isinstance(results[0], Exception), results
    assert state_equal(results[0], new)


def test_the_loser_of_two_concurrent_saves_is_told_so(model, make_tiny_model, tokens, tmp_path, monkeypatch):
    d = tmp_path / "d"
    save(model, d)
    mine, theirs = make_tiny_model(seed=1), make_tiny_model(seed=2)
    real_replace = os.replace
    raced = []

    def replace(src, dst):
        if Path(dst) == d and Path(src).name.endswith(".tmp") and not raced:
            raced.append(src)
            save(theirs, d)  # the other writer puts its folder in place first
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(FileExistsError, match=r"Another process wrote .* its write won"):
        save(mine, d)
    monkeypatch.undo()
    assert torch.equal(load(d, device="cpu")(tokens), theirs(tokens))
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


# -- 8. read-only folders load --------------------------------------------------------------------------------------
@contextlib.contextmanager
def read_only(root: Path, monkeypatch):
    """`root` and everything in it read-only; as root (whom permissions do not stop) every change under it is
    refused the way a read-only file system would."""
    folders = [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]
    for p in folders:
        p.chmod(0o555)
    with monkeypatch.context() as m:
        if os.geteuid() == 0:

            def refuse(real):
                def guarded(*args, **kwargs):
                    if any(isinstance(a, (str, os.PathLike)) and str(a).startswith(str(root)) for a in args[:2]):
                        raise PermissionError(errno.EACCES, "Permission denied", str(args[0]))
                    return real(*args, **kwargs)

                return guarded

            for name in ("unlink", "rmdir", "rename", "replace", "remove"):
                m.setattr(os, name, refuse(getattr(os, name)))
            real_rmtree = shutil.rmtree

            def rmtree(path, ignore_errors=False, *args, **kwargs):
                if str(path).startswith(str(root)):
                    if ignore_errors:
                        return
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real_rmtree(path, ignore_errors, *args, **kwargs)

            m.setattr(shutil, "rmtree", rmtree)
        try:
            yield
        finally:
            for p in folders:
                p.chmod(0o755)


def test_a_read_only_folder_loads(model, tokens, tmp_path, monkeypatch):
    root = tmp_path / "ro"
    d = root / "d"
    save(model, d)
    gone = dead_pid()
    writer_entry(d, gone, "tmp").write_bytes(b"debris")  # a killed writer's temporaries
    (root / f".d.{gone}-0badc0de.tmp").write_bytes(b"debris")  # (the name an earlier cbinterp gave them)
    with read_only(root, monkeypatch):
        assert torch.equal(load(d, device="cpu")(tokens), model(tokens))
    os.replace(d, writer_entry(d, gone, "old"))  # and a save killed between its renames, not yet repaired
    with read_only(root, monkeypatch):
        assert torch.equal(load(d, device="cpu")(tokens), model(tokens))
    assert not d.exists()


# -- 9. paths and configs ---------------------------------------------------------------------------------------------
def test_dot_and_tilde_paths(model, tokens, tmp_path, monkeypatch):
    from cbinterp import load_codebooks, save_codebooks

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert save(model, "~/m") == home / "m"
    assert torch.equal(load("~/m", device="cpu")(tokens), model(tokens))
    assert read_config("~/m")["format"] == "cbinterp-model"
    save_codebooks(attach_codebooks(copy.deepcopy(model), sites="mlp", n_codes=4), "~/cbs")
    assert sorted(load_codebooks("~/cbs")) == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert list(work.iterdir()) == []  # no folder named '~'
    here = work / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert save(model, ".") == here
    save(model, ".")  # and again, replacing it
    assert Path.cwd() == here and (here / MANIFEST_FILE).is_file()  # '.' still names the model folder
    assert torch.equal(load(".", device="cpu")(tokens), model(tokens))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("d_vocab", 10**11, r"embed[.]W_E"),
        ("n_ctx", 10**9, r"rotary_sin"),
        ("n_layers", 10**6, r"n_layers=1000000, the weights hold 2 blocks"),
        ("d_model", 1e11, r"d_model is 100000000000[.]0, not a positive integer"),
    ],
)
def test_a_config_describing_a_huge_model_is_refused_before_it_is_built(
    model, tmp_path, monkeypatch, field, value, match
):
    d = tmp_path / "d"
    save(model, d)
    config = json.loads((d / CONFIG_FILE).read_text())
    config["model_config"][field] = value
    (d / CONFIG_FILE).write_text(json.dumps(config))
    rechecksum(d)
    real = serialization.HookedTransformer

    class Allocating(real):
        def __init__(self, cfg, *args, **kwargs):
            assert str(cfg.device) == "meta" or getattr(cfg, field) == getattr(model.cfg, field), "allocated"
            super().__init__(cfg, *args, **kwargs)

    monkeypatch.setattr(serialization, "HookedTransformer", Allocating)
    with pytest.raises(ValueError, match=match):
        load(d)


def test_a_codebook_config_describing_a_huge_codebook_is_refused_before_it_is_built(model, tmp_path, monkeypatch):
    from cbinterp import load_codebook, save_codebook

    one = next(iter(get_codebooks(attach_codebooks(model, sites="mlp", n_codes=8)).values()))
    d = save_codebook(one, tmp_path / "cb")
    config = json.loads((d / "codebook.json").read_text())
    config["config"]["n_codes"] = 10**11
    (d / "codebook.json").write_text(json.dumps(config))
    rechecksum(d)
    real_init = Codebook.__init__

    def init(self, *args, **kwargs):
        assert str(kwargs.get("device")) == "meta" or kwargs.get("n_codes", 0) < 10**6, "allocated"
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Codebook, "__init__", init)
    with pytest.raises(ValueError, match=r"weight: \(1, 8, 32\) in the file, \(1, 100000000000, 32\) by the config"):
        load_codebook(d)


def test_save_tokenizer_replaces_only_a_tokenizer(bpe, tmp_path):
    from cbinterp.core.storage.tokenizer import load_tokenizer, save_tokenizer

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        save_tokenizer(bpe, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    save_tokenizer(bpe, tmp_path / "tok")
    save_tokenizer(bpe, tmp_path / "tok")  # a tokenizer folder is replaced
    assert len(load_tokenizer(tmp_path / "tok")) == len(bpe)
