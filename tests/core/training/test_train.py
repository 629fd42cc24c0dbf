"""The training loop: schedule, optimizer groups, learning, determinism, exact resume, atomic checkpoints and errors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import assert_same_state
from torch import nn

import cbinterp
import cbinterp.core.training.checkpoint as train_checkpoint
from cbinterp import attach_codebooks, get_codebooks
from cbinterp.core.storage.io import WEIGHTS_FILE, read_config
from cbinterp.core.training.train import TRAINER_FILE, TRAINER_TENSORS, TrainConfig, lr_factor, make_optimizer, train
from cbinterp.tasks.fsm import FSM

FSM_TASK = FSM.random(6, 2, 10, seed=0)  # one-digit states, vocab 11 = the tiny model's d_vocab


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(seed: int = 0):
    return FSM_TASK.token_batches(8, 16, seed=seed)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=8, lr=3e-3, progress=False, log_every=4), **kw})


def with_codebooks(model):
    """Codebooks whose dead-code replacement draws from the global torch RNG during training."""
    return attach_codebooks(model, ["mlp"], n_codes=16, dead_after=2, dead_check_every=3)


# -- schedule -------------------------------------------------------------------------------------------------
def test_lr_factor_values():
    cfg = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.5) and lr_factor(1, cfg) == pytest.approx(1.0)
    assert lr_factor(2, cfg) == pytest.approx(1.0)
    assert lr_factor(6, cfg) == pytest.approx(0.55)  # half way through the cosine
    assert lr_factor(10, cfg) == pytest.approx(0.1) and lr_factor(50, cfg) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg) for s in range(2, 12)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    const = TrainConfig(steps=10, warmup_steps=4, schedule="constant")
    assert [lr_factor(s, const) for s in range(7)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1])
    assert lr_factor(0, TrainConfig(steps=1)) == 1.0  # no warmup, one step


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 200), warmup=st.integers(0, 50), ratio=st.floats(0, 1), step=st.integers(0, 300))
def test_lr_factor_bounds(steps, warmup, ratio, step):
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, min_lr_ratio=ratio)
    f = lr_factor(step, cfg)
    if step < warmup:
        assert f == pytest.approx((step + 1) / warmup)
    else:
        assert ratio - 1e-12 <= f <= 1 + 1e-12


def test_lr_factor_unknown_schedule():
    with pytest.raises(ValueError, match="linear"):
        lr_factor(3, TrainConfig(steps=10, schedule="linear"))


def test_unknown_schedule_rejected_before_training(model):
    used = []
    with pytest.raises(ValueError, match="schedule"):
        train(model, lambda step: used.append(step) or batches()(step), config(schedule="linear", warmup_steps=3))
    assert used == []


# -- optimizer ------------------------------------------------------------------------------------------------
def test_make_optimizer_groups(model):
    with_codebooks(model)
    codebook_weights = [cb.weight for cb in get_codebooks(model).values()]
    assert len(codebook_weights) == 2
    opt = make_optimizer(
        model, TrainConfig(steps=1, lr=1e-3, weight_decay=0.05, codebook_lr=7e-3, codebook_weight_decay=0.2)
    )
    cb_group, rest_group = opt.param_groups
    assert {id(p) for p in cb_group["params"]} == {id(w) for w in codebook_weights}
    assert (cb_group["lr"], cb_group["weight_decay"], cb_group["base_lr"]) == (7e-3, 0.2, 7e-3)
    assert (rest_group["lr"], rest_group["weight_decay"], rest_group["base_lr"]) == (1e-3, 0.05, 1e-3)
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())  # every parameter, exactly once
    assert all(p.requires_grad for p in model.parameters())
    defaults = make_optimizer(model, TrainConfig(steps=1, lr=2e-3, weight_decay=0.05, codebook_weight_decay=None))
    assert (defaults.param_groups[0]["lr"], defaults.param_groups[0]["weight_decay"]) == (2e-3, 0.05)
    assert TrainConfig(steps=1).codebook_weight_decay == 0.0  # codebooks are not decayed unless asked


def test_make_optimizer_without_codebooks(model):
    opt = make_optimizer(model, TrainConfig(steps=1, lr=1e-3))
    assert len(opt.param_groups) == 1
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


def test_make_optimizer_zero_codebook_lr(model):
    with_codebooks(model)
    opt = make_optimizer(model, TrainConfig(steps=1, lr=1e-3, codebook_lr=0.0))
    assert opt.param_groups[0]["lr"] == 0.0


def test_freeze_model_trains_codebooks_only(model):
    with_codebooks(model)
    opt = make_optimizer(model, TrainConfig(steps=1, freeze_model=True))
    codebook_ids = {id(cb.weight) for cb in get_codebooks(model).values()}
    assert len(opt.param_groups) == 1 and {id(p) for p in opt.param_groups[0]["params"]} == codebook_ids
    assert {id(p) for p in model.parameters() if p.requires_grad} == codebook_ids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, batches(), config(steps=3, freeze_model=True))
    after = model.state_dict()
    for name, value in before.items():
        if name.endswith(".weight") and "hook_mlp_out" in name:
            assert not torch.equal(value, after[name]), name
        elif "hook_mlp_out" not in name:  # the model's own weights (codebook usage buffers do change)
            assert torch.equal(value, after[name]), name


def test_freeze_model_needs_codebooks(model):
    with pytest.raises(ValueError, match="no codebooks"):
        make_optimizer(model, TrainConfig(steps=1, freeze_model=True))


def test_freeze_model_error_leaves_model_trainable(model):
    with pytest.raises(ValueError):
        make_optimizer(model, TrainConfig(steps=1, freeze_model=True))
    assert all(p.requires_grad for p in model.parameters())


# -- learning and determinism ---------------------------------------------------------------------------------
def test_training_lowers_loss(model):
    data = FSM_TASK.sample(64, 16, seed=99)
    with torch.no_grad():
        before = float(model(data.tokens, return_type="loss"))
    result = train(model, FSM_TASK.token_batches(16, 16, seed=0), config(steps=40, lr=1e-2, warmup_steps=5))
    assert result.steps == 40 and len(result.losses) == 40 and result.resumed_from is None
    assert all(math.isfinite(x) for x in result.losses)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.8
    assert not model.training
    with torch.no_grad():
        after = float(model(data.tokens, return_type="loss"))
    assert after < before - 0.8  # on held-out sequences too
    assert after > FSM_TASK.optimal_loss(data) - 0.05  # and never (meaningfully) below the Bayes-optimal loss


@pytest.mark.parametrize("codebooks", [False, True])
def test_same_seed_same_losses(make_tiny_model, codebooks):
    runs = []
    for _ in range(2):
        model = make_tiny_model(seed=0)
        if codebooks:
            with_codebooks(model)
        runs.append((train(model, batches(), config(steps=6, seed=5)).losses, model))
    assert runs[0][0] == runs[1][0]
    assert_same_state(runs[0][1], runs[1][1])


def test_iterable_batches_match_callable(make_tiny_model):
    fn = batches()
    a, b = make_tiny_model(seed=0), make_tiny_model(seed=0)
    from_fn = train(a, fn, config(steps=5)).losses
    from_list = train(b, [fn(step) for step in range(5)], config(steps=5)).losses
    assert from_fn == from_list
    assert_same_state(a, b)
    c = make_tiny_model(seed=0)
    assert train(c, iter([fn(step) for step in range(5)]), config(steps=5)).losses == from_fn


# -- resume ---------------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def crashing(get_batch, at: int):
    def batch_at(step):
        if step == at:
            raise Crash(f"killed at step {step}")
        return get_batch(step)

    return batch_at


@pytest.mark.parametrize("codebooks", [False, True])
def test_resume_after_shorter_run(make_tiny_model, tmp_path, codebooks):
    """Train 8 steps straight, or 4 steps and then on to 8 from the checkpoint: the same losses and weights."""
    prepare = with_codebooks if codebooks else (lambda m: m)
    cfg = dict(schedule="constant", warmup_steps=2, checkpoint_every=2)
    full = prepare(make_tiny_model(seed=0))
    straight = train(full, batches(), config(steps=8, checkpoint_dir=str(tmp_path / "a"), **cfg))
    first = prepare(make_tiny_model(seed=0))
    half = train(first, batches(), config(steps=4, checkpoint_dir=str(tmp_path / "b"), **cfg))
    assert half.losses == straight.losses[:4]
    second = prepare(make_tiny_model(seed=0))  # a fresh process: same initial model, weights from the checkpoint
    resumed = train(second, batches(), config(steps=8, checkpoint_dir=str(tmp_path / "b"), **cfg))
    assert resumed.resumed_from == 4 and resumed.steps == 8
    assert resumed.losses == straight.losses
    assert_same_state(second, full)
    if codebooks:
        assert int(get_codebooks(second)["blocks.0.hook_mlp_out"].train_steps) == 8


@pytest.mark.parametrize("codebooks", [False, True])
def test_resume_after_crash(make_tiny_model, tmp_path, codebooks):
    """A run killed mid-way (cosine schedule, checkpoint every 3 steps) resumes to the uninterrupted result."""
    prepare = with_codebooks if codebooks else (lambda m: m)
    cfg = dict(steps=10, warmup_steps=2, checkpoint_every=3)
    full = prepare(make_tiny_model(seed=0))
    straight = train(full, batches(), config(checkpoint_dir=str(tmp_path / "a"), **cfg))
    with pytest.raises(Crash):
        train(
            prepare(make_tiny_model(seed=0)), crashing(batches(), 7), config(checkpoint_dir=str(tmp_path / "b"), **cfg)
        )
    assert json.loads((tmp_path / "b" / TRAINER_FILE).read_text())["step"] == 6
    model = prepare(make_tiny_model(seed=0))
    resumed = train(model, batches(), config(checkpoint_dir=str(tmp_path / "b"), **cfg))
    assert resumed.resumed_from == 6 and resumed.losses == straight.losses
    assert_same_state(model, full)
    # the final checkpoint holds the final model
    assert_same_state(cbinterp.load(tmp_path / "b", device="cpu"), full)


def test_resume_with_iterable_skips_used_batches(make_tiny_model, tmp_path):
    fn = batches()
    data = [fn(step) for step in range(6)]
    full = make_tiny_model(seed=0)
    straight = train(full, data, config(steps=6))

    def dying():
        yield from data[:4]
        raise Crash("killed")

    with pytest.raises(Crash):
        train(make_tiny_model(seed=0), dying(), config(steps=6, checkpoint_every=2, checkpoint_dir=str(tmp_path)))
    model = make_tiny_model(seed=0)
    resumed = train(model, data, config(steps=6, checkpoint_dir=str(tmp_path)))
    assert resumed.resumed_from == 4 and resumed.losses == straight.losses
    assert_same_state(model, full)


def test_resume_false_starts_over(make_tiny_model, tmp_path):
    train(make_tiny_model(seed=0), batches(), config(steps=4, checkpoint_dir=str(tmp_path)))
    fresh = train(make_tiny_model(seed=0), batches(), config(steps=4, checkpoint_dir=str(tmp_path)), resume=False)
    again = train(make_tiny_model(seed=0), batches(), config(steps=4))
    assert fresh.resumed_from is None and fresh.losses == again.losses
    finished = train(make_tiny_model(seed=0), batches(), config(steps=4, checkpoint_dir=str(tmp_path)))
    assert finished.resumed_from == 4 and finished.losses == again.losses  # nothing left to do


# -- checkpoints ----------------------------------------------------------------------------------------------
def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def check_checkpoint(path, step: int):
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["cbinterp.json", "config.json", WEIGHTS_FILE, TRAINER_FILE, TRAINER_TENSORS]
    )
    state = json.loads((path / TRAINER_FILE).read_text())
    assert state["step"] == step and len(state["losses"]) == step
    assert read_config(path)["extra"] == {"step": step}
    return cbinterp.load(path, device="cpu")  # checks the weights against their checksum


@pytest.mark.parametrize("fail_in", ["write_model", "save_file"])
def test_checkpoint_survives_crash_while_saving(make_tiny_model, tmp_path, monkeypatch, fail_in):
    """A save that dies part way leaves the previous checkpoint whole, and training resumes from it."""
    ckpt = tmp_path / "ckpt"
    real = getattr(train_checkpoint, fail_in)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if fail_in == "save_file":  # the weights are already written in the temporary directory by now
                assert (args[1].parent / WEIGHTS_FILE).exists()
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_checkpoint, fail_in, flaky)
    model = with_codebooks(make_tiny_model(seed=0))
    with pytest.raises(OSError, match="No space"):
        train(model, batches(), config(steps=6, checkpoint_every=2, checkpoint_dir=str(ckpt)))
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    loaded = check_checkpoint(ckpt, 2)
    assert get_codebooks(loaded).keys() == get_codebooks(model).keys()
    resumed = train(with_codebooks(make_tiny_model(seed=0)), batches(), config(steps=6, checkpoint_dir=str(ckpt)))
    assert resumed.resumed_from == 2 and len(resumed.losses) == 6


def test_checkpoint_survives_failed_final_rename(make_tiny_model, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    real_replace = os.replace
    renames = []

    def flaky_replace(src, dst):
        if os.fspath(dst) == os.fspath(ckpt) and os.path.basename(os.fspath(src)).endswith(".tmp"):
            renames.append(src)
            if len(renames) == 2:
                raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        train(make_tiny_model(seed=0), batches(), config(steps=6, checkpoint_every=2, checkpoint_dir=str(ckpt)))
    monkeypatch.undo()
    check_checkpoint(ckpt, 2)


@pytest.mark.parametrize("victim", [WEIGHTS_FILE, TRAINER_FILE])
def test_corrupt_checkpoint_is_a_clear_error(make_tiny_model, tmp_path, victim):
    ckpt = tmp_path / "ckpt"
    train(make_tiny_model(seed=0), batches(), config(steps=2, checkpoint_dir=str(ckpt)))
    path = ckpt / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="Cannot resume") as err:
        train(make_tiny_model(seed=0), batches(), config(steps=4, checkpoint_dir=str(ckpt)))
    assert str(ckpt) in str(err.value)


def test_checkpoint_with_flipped_weight_bytes_is_rejected(make_tiny_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    train(make_tiny_model(seed=0), batches(), config(steps=2, checkpoint_dir=str(ckpt)))
    raw = bytearray((ckpt / WEIGHTS_FILE).read_bytes())
    raw[-8:] = bytes(8)  # the last weights' bytes, header untouched
    (ckpt / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="ckpt"):
        train(make_tiny_model(seed=0), batches(), config(steps=4, checkpoint_dir=str(ckpt)))


def test_checkpoint_of_another_model_is_a_clear_error(make_tiny_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    train(make_tiny_model(seed=0), batches(), config(steps=2, checkpoint_dir=str(ckpt)))
    with pytest.raises(ValueError, match="does not fit"):
        train(with_codebooks(make_tiny_model(seed=0)), batches(), config(steps=4, checkpoint_dir=str(ckpt)))


def test_checkpoint_with_other_codebook_size_is_a_clear_error(make_tiny_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    train(
        attach_codebooks(make_tiny_model(seed=0), ["mlp"], n_codes=16),
        batches(),
        config(steps=2, checkpoint_dir=str(ckpt)),
    )
    with pytest.raises(ValueError, match="does not fit"):
        train(
            attach_codebooks(make_tiny_model(seed=0), ["mlp"], n_codes=8),
            batches(),
            config(steps=4, checkpoint_dir=str(ckpt)),
        )


# -- errors and callbacks -------------------------------------------------------------------------------------
def test_non_finite_loss(model):
    with torch.no_grad():
        model.unembed.W_U[0, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="step 0"):
        train(model, batches(), config(steps=3))
    assert not model.training


def test_eval_fn_schedule_and_mode(model):
    modes, seen = [], []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))

    def eval_fn(m, step):
        assert m is model
        seen.append((step, m.training))
        return {"step_squared": step * step}

    result = train(model, batches(), config(steps=5, eval_every=2), eval_fn=eval_fn)
    assert seen == [(2, False), (4, False), (5, False)]
    assert result.evals == [(2, {"step_squared": 4}), (4, {"step_squared": 16}), (5, {"step_squared": 25})]
    assert modes == [True] * 5  # the training steps themselves run in train mode
    assert not model.training
    only_end = []
    train(model, batches(), config(steps=3), eval_fn=lambda m, step: only_end.append(step) or {})
    assert only_end == [3]


def test_rejects_non_hooked_transformer():
    with pytest.raises(TypeError, match="HookedTransformer"):
        train(nn.Linear(3, 3), batches(), config(steps=1))
