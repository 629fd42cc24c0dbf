"""Guarantees about values: no silent wrong results, usage statistics that agree, values checked in one place.

Ablated and non-finite codes are "no code", never another code; usage counts agree wherever they are read; settings,
data and damaged files give clear errors; train leaves the model's state as it was. One test per case, each failing
before its fix; the sections keep their numbers (1, 2, 4 and 7 are in test_guarantees_files.py).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from guarantees_common import batch_fn, cfg

import cbinterp
from cbinterp import (
    Codebook,
    CodebookConfig,
    TrainConfig,
    attach_codebooks,
    cache_codes,
    code_fires,
    code_frequencies,
    dead_codes,
    get_codebooks,
    load,
    save,
    train,
)
from cbinterp.core.codebooks.attach import counting_usage, resolve_sites
from cbinterp.core.codebooks.interventions import ablate_codes, intervene
from cbinterp.core.storage import manifest as mf
from cbinterp.core.storage.io import CONFIG_FILE
from cbinterp.core.storage.manifest import MANIFEST_FILE
from cbinterp.core.training.train import TRAINER_FILE

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::cbinterp.ResumeWarning")]


def refresh_manifest(path):
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = mf.file_entry(path / name)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


# -- 3. ablated codes are "no code" in the cache ----------------------------------------------------------------------
@pytest.mark.parametrize("n_codes", [255, 256, 65535])
def test_ablated_codes_are_not_cached_as_the_top_code(model, n_codes):
    attach_codebooks(model, ["mlp"], n_codes=n_codes, layers=[0])
    name = "blocks.0.hook_mlp_out"
    docs = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))
    with intervene(model, ablate_codes(model, name, list(range(n_codes)))):
        cache = cache_codes(model, docs, progress=False)
    assert bool((cache.codes(name) == -1).all())
    top = n_codes - 1
    assert not bool(code_fires(cache, name, top).any())
    assert int(code_frequencies(cache, name).sum()) == 0
    assert top in dead_codes(cache, name).tolist()
    feature = torch.ones(cache.n_tokens, dtype=torch.bool)
    assert len(cbinterp.search_codes(cache, feature)) == 0  # no code detects anything: none fires


# -- 5. no silent wrong results ---------------------------------------------------------------------------------------
def test_nan_activation_in_eval_is_no_code_and_nan_output():
    cb = Codebook(4, 6).eval()
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    cb.hook_codes.add_hook(lambda codes, hook: seen.append(codes.clone()))
    seen = []
    out = cb(x)
    assert seen[0][1:].eq(-1).all() and seen[0][0].ge(0).all()
    assert bool(torch.isnan(out[1:]).all()) and bool(torch.isfinite(out[0]).all())


def test_kmeans_init_ignores_non_finite_rows():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    x[7] = float("nan")
    cb = Codebook(4, 5)
    with pytest.warns(UserWarning, match="left out 1 of 200"):
        cb.kmeans_init(x, iters=3)
    assert bool(torch.isfinite(cb.weight).all())
    with pytest.raises(ValueError, match="every input row"):
        cb.kmeans_init(torch.full((3, 4), float("nan")))


@pytest.mark.parametrize("bad", [6, -1, -2])
def test_decode_never_returns_another_groups_code(bad):
    cb = Codebook(3, 6, groups=2)
    codes = torch.tensor([[[bad], [0]]])
    with pytest.raises(ValueError, match="out of range"):
        cb.decode(codes, allow_empty=False)
    if bad != -1:
        with pytest.raises(ValueError, match="out of range"):
            cb.decode(codes)


def test_query_refuses_a_fractional_code(model):
    attach_codebooks(model, ["mlp"], n_codes=8, layers=[0])
    cache = cache_codes(model, torch.zeros(1, 4, dtype=torch.long), progress=False)
    with pytest.raises(TypeError, match="code must be an int"):
        code_fires(cache, "blocks.0.hook_mlp_out", 2.7)
    assert code_fires(cache, "blocks.0.hook_mlp_out", torch.tensor(2)).shape == (4,)


def test_fp16_training_is_refused_up_front(make_tiny_model):
    model = make_tiny_model(dtype=torch.float16)
    with pytest.raises(TypeError, match="float16"):
        train(model, batch_fn(), cfg())


# -- 6. usage statistics ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("progress", [False, True])
def test_counts_after_train_are_not_reset_by_the_display(model, progress):
    attach_codebooks(model, ["mlp"], n_codes=8)
    train(model, batch_fn(), cfg(steps=4, log_every=1, progress=progress))
    for cb in get_codebooks(model).values():
        assert int(cb.counts.sum()) == 4 * 4 * 8  # every training token of the 4 steps, k=1
        assert cb.n_dead < 8


def test_n_dead_agrees_with_dead_codes_of_a_cache(model):
    attach_codebooks(model, ["attn"], n_codes=40, layers=[0])
    name = "blocks.0.attn.hook_z"
    docs = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    with counting_usage(model):
        cache = cache_codes(model, docs, progress=False)
    cb = get_codebooks(model)[name]
    assert cb.n_dead == len(dead_codes(cache, name))
    assert torch.equal(cb.dead_codes(), dead_codes(cache, name))
    assert torch.equal(cb.dead_codes(head=1), dead_codes(cache, name, head=1))


def test_train_mode_forwards_change_neither_codes_nor_counts(model, tokens):
    attach_codebooks(model, ["mlp"], n_codes=8, dead_after=1, dead_check_every=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for _ in range(4):
        model.run_with_cache(tokens)
    model.eval()
    model(tokens)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# -- 8. values checked in one place, clear errors ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("dead_check_every", 0),
        ("beta", -0.1),
        ("recon_weight", float("nan")),
        ("n_codes", True),
        ("replace_noise", -1.0),
        ("init_std", 0.0),
        ("k", 1.5),
        ("dead_after", 0),
        ("normalize_input", "yes"),
    ],
)
def test_codebook_settings_are_checked(field, value):
    kwargs = {"dim": 4, "n_codes": 8, field: value}
    with pytest.raises(ValueError, match=field):
        CodebookConfig(**kwargs)
    with pytest.raises(ValueError, match=field):
        Codebook(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(codebook_lr=-1e-3), "codebook_lr"),
        (dict(min_lr_ratio=-0.1), "min_lr_ratio"),
        (dict(steps=2.5), "steps"),
        (dict(checkpoint_every=5), "checkpoint_dir"),
        (dict(log_every=0), "log_every"),
        (dict(lr=float("nan")), "lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(weight_decay=-1), "weight_decay"),
        (dict(grad_clip=-1.0), "grad_clip"),
    ],
)
def test_train_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 3, **kwargs})


def test_empty_sites_are_refused(model):
    with pytest.raises(ValueError, match="No sites"):
        attach_codebooks(model, sites=[])


def test_data_errors_name_the_step(model):
    with pytest.raises(ValueError, match="got 0 batches for steps=3"):
        train(model, [], cfg())
    with pytest.raises(ValueError, match="ran out at step 2"):
        train(model, iter([batch_fn()(0), batch_fn()(1)]), cfg(steps=3))
    with pytest.raises(ValueError, match="step 0 is empty"):
        train(model, lambda step: torch.zeros(4, 0, dtype=torch.long), cfg())
    with pytest.raises(ValueError, match="n_ctx=16"):
        train(model, lambda step: torch.zeros(2, 17, dtype=torch.long), cfg())
    attach_codebooks(model, ["mlp"], n_codes=8)
    with pytest.raises(ValueError, match="n_ctx=16"):
        cache_codes(model, torch.zeros(2, 17, dtype=torch.long), progress=False)


def test_damaged_files_give_clear_errors(model, tmp_path):
    d = tmp_path / "d"
    save(model, d)
    config = json.loads((d / CONFIG_FILE).read_text())
    del config["model_config"]
    (d / CONFIG_FILE).write_text(json.dumps(config))
    refresh_manifest(d)  # damaged before its checksum was taken: the content itself is wrong
    with pytest.raises(ValueError, match=r"Damaged cbinterp config .*KeyError"):
        load(d)
    ckpt = tmp_path / "ckpt"
    train(model, batch_fn(), cfg(checkpoint_dir=str(ckpt)))
    state = json.loads((ckpt / TRAINER_FILE).read_text())
    del state["step"]
    (ckpt / TRAINER_FILE).write_text(json.dumps(state))
    refresh_manifest(ckpt)
    with pytest.raises(ValueError, match=r"Cannot resume .*'step'"):
        train(model, batch_fn(), cfg(steps=5, checkpoint_dir=str(ckpt)))
    (ckpt / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="Damaged marker"):
        load(ckpt)


def test_hook_name_errors_suggest_only_acceptable_names(model):
    attach_codebooks(model, ["mlp"], n_codes=8)
    with pytest.raises(ValueError) as err:
        resolve_sites(model, "blocks.0.hook_mlp_out.hook_codes")
    suggestions = str(err.value).split("did you mean one of")[1]
    assert "hook_codes" not in suggestions and "hook_input" not in suggestions


# -- data and model state in train ------------------------------------------------------------------------------------
def test_bare_token_tensor(make_tiny_model, tmp_path):
    data = torch.randint(0, 11, (10, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="batch_size"):
        train(make_tiny_model(seed=0), data, cfg())
    a = train(make_tiny_model(seed=0), data, cfg(steps=6, batch_size=4))
    b = train(make_tiny_model(seed=0), data, cfg(steps=6, batch_size=4))
    assert a.losses == b.losses and len(a.losses) == 6 and all(math.isfinite(x) for x in a.losses)


def test_freeze_model_restores_requires_grad(model):
    attach_codebooks(model, ["mlp"], n_codes=8)
    train(model, batch_fn(), cfg(steps=1, freeze_model=True))
    assert all(p.requires_grad for p in model.parameters())


def test_eval_fn_forwards_do_not_count(model):
    attach_codebooks(model, ["mlp"], n_codes=8)
    train(
        model, batch_fn(), cfg(steps=2), eval_fn=lambda m, step: {"loss": float(m(batch_fn(5)(0), return_type="loss"))}
    )
    for cb in get_codebooks(model).values():
        assert int(cb.counts.sum()) == 2 * 4 * 8 and int(cb.train_steps) == 2


def test_no_warnings_on_a_plain_run(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, batch_fn(), cfg(steps=1))
