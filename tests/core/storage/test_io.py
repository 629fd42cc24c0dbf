"""Saving and loading models with codebooks: round trips, atomic writes, and clear errors on bad files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import cbinterp
from cbinterp import attach_codebooks, get_codebooks, load, save
from cbinterp.core.storage import io as serialization
from cbinterp.core.storage.io import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, read_config, sha256_of


@pytest.fixture
def cb_model(model, tokens):
    """(`model` itself, with codebooks added.) A tiny model with codebooks that has taken one training step (so the
    usage buffers are not zero)."""
    attach_codebooks(
        model,
        sites=["attn", "mlp"],
        n_codes={"attn": 12, "mlp": 17},
        k={"attn": 1, "mlp": 2},
        similarity="cosine",
        dead_after=4,
        seed=3,
    )
    from cbinterp.core.codebooks.attach import training_codebooks

    model.train()
    with training_codebooks(model):
        model(tokens, return_type="loss").backward()
    return model.eval()


def leftovers(directory):
    """Temporary or backup entries a save may leave beside its target."""
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_round_trip(cb_model, tokens, tmp_path):
    path = tmp_path / "ckpt"
    assert save(cb_model, path, extra={"note": "hello", "steps": 1}) == path
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE])
    loaded = load(path, device="cpu")
    assert not loaded.training
    assert str(loaded.cfg.device) == "cpu"
    assert loaded.cfg.to_dict()["d_model"] == cb_model.cfg.d_model
    assert torch.equal(loaded(tokens), cb_model(tokens))
    _, cache = cb_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_codes"))
    _, cache2 = loaded.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_codes"))
    assert cache.keys() == cache2.keys() and len(cache) == 4
    for name in cache.keys():
        assert torch.equal(cache[name], cache2[name]), name
    before, after = get_codebooks(cb_model), get_codebooks(loaded)
    assert list(before) == list(after)
    for name in before:
        assert before[name].cfg == after[name].cfg
        assert torch.equal(before[name].weight, after[name].weight)
        assert torch.equal(before[name].counts, after[name].counts) and int(after[name].counts.sum()) > 0
        assert torch.equal(before[name].train_steps, after[name].train_steps)
    assert read_config(path)["extra"] == {"note": "hello", "steps": 1}
    # the pos_slice handling of per-head codes comes back with the codebooks
    _, sliced = loaded.run_with_cache(tokens, pos_slice=slice(0, 2), names_filter=lambda n: n.endswith("hook_codes"))
    assert torch.equal(sliced["blocks.0.attn.hook_z.hook_codes"], cache["blocks.0.attn.hook_z.hook_codes"][:, :2])


def test_round_trip_without_codebooks(model, tokens, tmp_path):
    save(model, tmp_path / "plain")
    loaded = load(tmp_path / "plain", device="cpu")
    assert get_codebooks(loaded) == {}
    assert torch.equal(loaded(tokens), model(tokens))


def test_config_is_plain_json(cb_model, tmp_path):
    save(cb_model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert config["format"] == "cbinterp-model"
    assert config["model_config"]["dtype"] == "float32"
    assert "device" not in config["model_config"]
    assert config["codebooks"]["blocks.0.hook_mlp_out"]["n_codes"] == 17
    assert config["codebooks"]["blocks.0.attn.hook_z"]["groups"] == 4
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())
    assert manifest["format"] == "cbinterp-model" and manifest["version"] == 2
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # every file is covered by a checksum
        assert manifest["files"][name]["sha256"] == sha256_of(tmp_path / "ckpt" / name)


def test_overwrite_replaces_checkpoint(cb_model, _base_model, tokens, tmp_path):
    path = tmp_path / "ckpt"
    save(cb_model, path)
    other = attach_codebooks(copy.deepcopy(_base_model), sites="mlp", n_codes=5)
    save(other, path)
    loaded = load(path, device="cpu")
    assert list(get_codebooks(loaded)) == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert torch.equal(loaded(tokens), other(tokens))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["save_file", "sha256_of"])
def test_failed_save_keeps_previous_checkpoint(cb_model, _base_model, tokens, tmp_path, monkeypatch, target):
    path = tmp_path / "ckpt"
    save(cb_model, path)
    expected = cb_model(tokens)
    other = attach_codebooks(copy.deepcopy(_base_model), sites="mlp", n_codes=5)

    def boom(*args, **kwargs):
        if target == "save_file":  # write part of a file, then fail, as a full disk would
            (args[1]).write_bytes(b"\0" * 100)
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(serialization, target, boom)
        with pytest.raises(OSError, match="disk full"):
            save(other, path)
    assert leftovers(tmp_path) == []
    loaded = load(path, device="cpu")
    assert torch.equal(loaded(tokens), expected)
    assert list(get_codebooks(loaded)) == list(get_codebooks(cb_model))


def test_failed_first_save_leaves_nothing(cb_model, tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError):
        save(cb_model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# -- bad files ------------------------------------------------------------------------------------------
@pytest.fixture
def saved(cb_model, tmp_path):
    path = tmp_path / "ckpt"
    save(cb_model, path)
    return path


def _refresh_manifest(path):
    """Record the current checksums of every file, so that only the content is wrong."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": sha256_of(path / name), "bytes": (path / name).stat().st_size}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def _rewrite_weights(path, state):
    """Replace the weights file and update the checksum so that only the content is wrong."""
    save_file(state, path / WEIGHTS_FILE)
    _refresh_manifest(path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No cbinterp model at .*nowhere"):
        load(tmp_path / "nowhere")


def test_missing_weights(saved):
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete: its file model\.safetensors is missing"):
        load(saved)


def test_truncated_weights(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load(saved)


def test_flipped_byte_in_weights(saved):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum differs"):
        load(saved)


def test_garbage_weights_with_matching_checksum(saved):
    (saved / WEIGHTS_FILE).write_bytes(b"this is not a safetensors file at all")
    _refresh_manifest(saved)
    with pytest.raises(ValueError, match="Corrupt weights file"):
        load(saved)


@pytest.mark.parametrize("content", ["", "{not json", '{"format": "cbinterp-model", "version": 1'])
def test_corrupt_config(saved, content):
    (saved / CONFIG_FILE).write_text(content)
    with pytest.raises(ValueError, match=r"config\.json does not match the checksum"):
        load(saved)
    _refresh_manifest(saved)  # a config damaged before its checksum was taken
    with pytest.raises(ValueError, match="Corrupt cbinterp config"):
        load(saved)


def test_wrong_format_and_newer_version(saved):
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    (saved / MANIFEST_FILE).write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a cbinterp marker"):
        load(saved)
    (saved / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="newer cbinterp"):
        load(saved)
    (saved / MANIFEST_FILE).write_text(json.dumps(manifest))
    config = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps({**config, "format": "something-else"}))
    _refresh_manifest(saved)
    with pytest.raises(ValueError, match="not a cbinterp model config"):
        load(saved)


def test_weights_from_another_save(saved, tmp_path, make_tiny_model):
    other = tmp_path / "other"
    save(attach_codebooks(make_tiny_model(seed=1), sites=["attn", "mlp"], n_codes={"attn": 12, "mlp": 17}, k=1), other)
    (saved / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="checksum differs"):
        load(saved)


def test_weights_with_missing_or_extra_tensors(saved):
    state = load_file(saved / WEIGHTS_FILE)
    state.pop("blocks.0.hook_mlp_out.weight")
    state["blocks.9.mystery"] = torch.zeros(2)
    _rewrite_weights(saved, state)
    with pytest.raises(ValueError, match=r"do not match the model.*blocks\.0\.hook_mlp_out\.weight"):
        load(saved)


def test_config_describing_other_codebooks(saved):
    """The config says 30 codes where the weights hold 17: a clear error, not a silent partial load."""
    config = json.loads((saved / CONFIG_FILE).read_text())
    config["codebooks"]["blocks.0.hook_mlp_out"]["n_codes"] = 30
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    _refresh_manifest(saved)
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_mlp_out\.weight"):
        load(saved)


def test_save_rejects_non_hooked_transformer(tmp_path):
    with pytest.raises(TypeError, match="HookedTransformer"):
        save(nn.Linear(2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_public_api():
    assert cbinterp.save is save and cbinterp.load is load


def test_recover_dir_puts_back_the_copy_left_aside(tmp_path):
    import subprocess
    import sys

    from cbinterp.core.storage.atomic import HOST, recover_dir

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a writer that is gone
    target = tmp_path / "ckpt"
    aside = tmp_path / f".ckpt.cbinterp-{HOST}.{proc.pid}-0badc0de.old"
    aside.mkdir()
    (aside / "f").write_text("last good")
    recover_dir(target)  # crashed between the renames: only the copy aside exists
    assert (target / "f").read_text() == "last good" and not aside.exists()
    aside.mkdir()
    (aside / "f").write_text("older")
    recover_dir(target)  # the new copy is in place: the one aside is stale
    assert (target / "f").read_text() == "last good" and not aside.exists()


@pytest.fixture(scope="module")
def bpe():
    from cbinterp.tasks.text import train_bpe_tokenizer
    from cbinterp.tasks.toytext import generate_corpus

    return train_bpe_tokenizer(generate_corpus(40, seed=1), vocab_size=300)


def test_tokenizer_is_saved_with_the_model_and_attached_on_load(make_tiny_model, bpe, tmp_path):
    from cbinterp.tasks.text import attach_tokenizer

    m = attach_codebooks(make_tiny_model(seed=0, d_vocab=len(bpe)), ["mlp"], n_codes=8)
    attach_tokenizer(m, bpe)
    save(m, tmp_path / "m")
    config = read_config(tmp_path / "m")
    files = config["tokenizer"]["files"]
    assert "tokenizer.json" in files
    listed = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())["files"]
    assert set(files) <= set(listed)  # every tokenizer file is checksummed
    back = load(tmp_path / "m")
    text = "The king sat."
    assert torch.equal(back.to_tokens(text), m.to_tokens(text))
    assert back.to_string(back.to_tokens(text, prepend_bos=False)[0]) == text
    assert back.generate(text, max_new_tokens=3, verbose=False, do_sample=False).startswith(text)
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="checksum"):
        load(tmp_path / "m")


def test_no_tokenizer_no_tokenizer_files(cb_model, tmp_path):
    save(cb_model, tmp_path / "m")
    assert "tokenizer" not in read_config(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE])


def test_codebooks_saved_on_their_own_attach_to_another_instance(cb_model, make_tiny_model, tokens, tmp_path):
    from cbinterp import load_codebook, load_codebooks, save_codebook, save_codebooks

    save_codebooks(cb_model, tmp_path / "cbs")
    assert sorted(p.name for p in (tmp_path / "cbs").iterdir()) == sorted([*get_codebooks(cb_model), MANIFEST_FILE])
    loaded = load_codebooks(tmp_path / "cbs")
    assert set(loaded) == set(get_codebooks(cb_model))
    other = attach_codebooks(make_tiny_model(seed=0), loaded)
    _, a = cb_model.run_with_cache(tokens)
    _, b = other.run_with_cache(tokens)
    for name, cb in get_codebooks(cb_model).items():
        assert torch.equal(get_codebooks(other)[name].weight, cb.weight)
        assert torch.equal(get_codebooks(other)[name].counts, cb.counts)  # usage buffers travel too
        assert torch.equal(a[f"{name}.hook_codes"], b[f"{name}.hook_codes"])
    one = next(iter(get_codebooks(cb_model).values()))
    save_codebook(one, tmp_path / "one")
    assert load_codebook(tmp_path / "one").cfg == one.cfg
    weights = tmp_path / "one" / "codebook.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    with pytest.raises(ValueError, match="checksum"):
        load_codebook(tmp_path / "one")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_codebook(one, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="No saved codebooks"):
        load_codebooks(tmp_path / "mine")
    with pytest.raises(TypeError):
        save_codebook(torch.nn.Linear(2, 2), tmp_path / "x")
