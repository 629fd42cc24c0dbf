"""`train` under hostile input: frozen weights, numpy settings, out-of-range token ids, short data, bad arguments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_models import assert_same_state

from cbinterp import attach_codebooks, get_codebooks
from cbinterp.core.training.loggers import JSONLLogger, read_jsonl
from cbinterp.core.training.train import TRAINER_FILE, TrainConfig, make_optimizer, train
from cbinterp.tasks.fsm import FSM

FSM_TASK = FSM.random(6, 2, 10, seed=0)  # vocab 11 = the tiny model's d_vocab
MLP0 = "blocks.0.hook_mlp_out"

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def batch_list(n: int, seed: int = 0) -> list[torch.Tensor]:
    fn = FSM_TASK.token_batches(8, 16, seed=seed)
    return [fn(step) for step in range(n)]


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=3, lr=1e-2, progress=False, log_every=1), **kw})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def checkpoint_step(path) -> int:
    return json.loads((path / TRAINER_FILE).read_text())["step"]


# -- frozen parameters ----------------------------------------------------------------------------------------
def test_frozen_parameter_is_not_trained_nor_decayed(model):
    model.embed.W_E.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    optimized = [p for g in make_optimizer(model, config()).param_groups for p in g["params"]]
    assert all(p is not model.embed.W_E for p in optimized) and len(optimized) == len(flags) - 1
    before = snapshot(model)
    train(model, batch_list(3), config(weight_decay=0.5))
    assert torch.equal(model.embed.W_E, before["embed.W_E"])  # neither a gradient step nor weight decay
    assert not torch.equal(model.unembed.W_U, before["unembed.W_U"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_freeze_model_keeps_the_callers_frozen_codebook(model):
    attach_codebooks(model, ["attn", "mlp"], n_codes=16)
    books = get_codebooks(model)
    books[MLP0].weight.requires_grad_(False)
    model.embed.W_E.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = snapshot(model)
    train(model, batch_list(3), config(freeze_model=True, codebook_weight_decay=0.5))
    after = model.state_dict()
    assert torch.equal(after[f"{MLP0}.weight"], before[f"{MLP0}.weight"])
    assert not torch.equal(after["blocks.0.attn.hook_z.weight"], before["blocks.0.attn.hook_z.weight"])
    assert torch.equal(after["blocks.0.mlp.W_in"], before["blocks.0.mlp.W_in"])  # freeze_model
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored exactly


def test_nothing_left_to_train_is_a_clear_error(model):
    attach_codebooks(model, ["mlp"], n_codes=16)
    for cb in get_codebooks(model).values():
        cb.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="codebooks are frozen"):
        train(model, batch_list(3), config(freeze_model=True))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="Every parameter of the model is frozen"):
        train(model, batch_list(3), config())
    assert not any(p.requires_grad for p in model.parameters())


def test_frozen_codebook_with_dead_code_replacement_is_refused(model):
    attach_codebooks(model, ["mlp"], n_codes=16, dead_after=1, dead_check_every=1)
    get_codebooks(model)[MLP0].weight.requires_grad_(False)
    used = []
    with pytest.raises(ValueError, match="dead_after=1"):
        train(model, lambda step: used.append(step) or batch_list(1)[0], config())
    assert used == []


def test_frozen_codebooks_log_no_codebook_lr(model, tmp_path):
    attach_codebooks(model, ["mlp"], n_codes=16)
    for cb in get_codebooks(model).values():
        cb.weight.requires_grad_(False)
    path = tmp_path / "log.jsonl"
    train(model, batch_list(2), config(steps=2, codebook_lr=0.5, schedule="constant"), loggers=[JSONLLogger(path)])
    records = [r for r in read_jsonl(path) if "loss" in r]
    assert records and all("lr/codebooks" not in r and r["lr"] == pytest.approx(1e-2) for r in records)


def test_resume_with_other_frozen_parameters_is_refused(make_tiny_model, tmp_path):
    data = batch_list(4)
    train(make_tiny_model(seed=0), data, config(steps=2, schedule="constant", checkpoint_dir=str(tmp_path)))
    model = make_tiny_model(seed=0)
    model.embed.W_E.requires_grad_(False)
    with pytest.raises(ValueError, match=r"embed\.W_E trained only by the checkpoint's run"):
        train(model, data, config(steps=4, schedule="constant", checkpoint_dir=str(tmp_path)))


# -- numpy settings -------------------------------------------------------------------------------------------
NUMPY_SETTINGS = dict(
    steps=np.int64(3),
    lr=np.float32(1e-2),
    weight_decay=np.float32(0.01),
    codebook_lr=np.float64(2e-2),
    codebook_weight_decay=np.float16(0),
    betas=np.array([0.9, 0.99], dtype=np.float32),
    grad_clip=np.float32(1.0),
    warmup_steps=np.int32(1),
    min_lr_ratio=np.float32(0.1),
    freeze_model=np.bool_(False),
    eval_every=np.int8(0),
    checkpoint_every=np.uint8(2),
    log_every=np.int16(1),
    seed=np.int64(3),
    progress=np.bool_(False),
    batch_size=np.int64(8),
    accumulate=np.int32(2),
)


def test_numpy_settings_become_plain_python():
    cfg = TrainConfig(**NUMPY_SETTINGS, checkpoint_dir="never-written")
    for name in NUMPY_SETTINGS:
        value = getattr(cfg, name)
        kind = type(value)
        assert kind in (int, float, bool, tuple), (name, kind)
        assert all(type(b) is float for b in value) if kind is tuple else value == NUMPY_SETTINGS[name], name
    assert type(cfg.betas[0]) is float and cfg.betas == pytest.approx((0.9, 0.99))


def test_numpy_settings_train_checkpoint_and_resume(make_tiny_model, tmp_path):
    tokens = FSM_TASK.sample(32, 16, seed=0).tokens
    ckpt = str(tmp_path / "ckpt")
    result = train(make_tiny_model(seed=0), tokens, TrainConfig(**NUMPY_SETTINGS, checkpoint_dir=ckpt))
    assert result.steps == 3 and checkpoint_step(tmp_path / "ckpt") == 3
    plain = {k: (v.tolist() if isinstance(v, np.ndarray) else v.item()) for k, v in NUMPY_SETTINGS.items()}
    with pytest.warns(UserWarning, match="already complete"):  # the same settings, written as plain numbers
        again = train(make_tiny_model(seed=0), tokens, TrainConfig(**plain, checkpoint_dir=ckpt))
    assert again.resumed_from == 3


def test_settings_changed_after_construction_are_checked_again(model, tmp_path):
    cfg = config(steps=2, checkpoint_dir=str(tmp_path))
    cfg.lr, cfg.seed = np.float32(1e-2), np.int64(1)  # a dataclass: fields can be set after __post_init__
    assert train(model, batch_list(2), cfg).steps == 2
    assert checkpoint_step(tmp_path) == 2
    cfg.lr = float("nan")
    with pytest.raises(ValueError, match="lr must be a finite number"):
        train(model, batch_list(2), cfg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=np.float32("nan")), "lr must be a finite"),
        (dict(grad_clip=np.float64("inf")), "grad_clip"),
        (dict(steps=np.bool_(True)), "steps must be an int"),
        (dict(seed=True), "seed must be an int"),
        (dict(batch_size=np.float32(8)), "batch_size must be None or an int"),
        (dict(min_lr_ratio=np.float32("nan")), "min_lr_ratio"),
        (dict(checkpoint_dir=""), "non-empty path"),
        (dict(autocast=["bf16"]), "autocast"),
        (dict(schedule=["cosine"]), "schedule"),
        (dict(progress=1), "progress must be True or False"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(**kwargs)


# -- token ids ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-2, -1, 11, 500])
def test_out_of_range_token_ids_name_the_step(model, bad):
    data = batch_list(3)
    data[1] = data[1].clone()
    data[1][2, 5] = bad
    with pytest.raises(ValueError, match=rf"batch of step 1 hold the token id {bad}, outside .*\[0, 11\)"):
        train(model, data, config())


def test_out_of_range_ids_in_a_token_tensor_are_refused_before_training(model):
    tokens = FSM_TASK.sample(32, 16, seed=0).tokens.clone()
    tokens[-1, -1] = -1
    before = snapshot(model)
    with pytest.raises(ValueError, match="token tensor given to train hold the token id -1"):
        train(model, tokens, config(batch_size=8))
    assert_same_state(model, before)


def test_numpy_token_array_trains_as_a_tensor(make_tiny_model):
    tokens = FSM_TASK.sample(32, 16, seed=0).tokens
    a, b = make_tiny_model(seed=0), make_tiny_model(seed=0)
    expected = train(a, tokens, config(batch_size=8))
    assert train(b, tokens.numpy(), config(batch_size=8)).losses == expected.losses


# -- too little data ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 2])
def test_short_data_is_refused_before_training(model, tmp_path, accumulate):
    before = snapshot(model)
    with pytest.raises(ValueError, match="got 2 batches for steps=4"):
        train(model, batch_list(2), config(steps=4, accumulate=accumulate, checkpoint_dir=str(tmp_path / "c")))
    assert_same_state(model, before)
    assert not (tmp_path / "c").exists()
    assert train(model, batch_list(4), config(steps=4, accumulate=accumulate)).steps == 4  # one batch per step


def test_resume_needs_all_the_batches_again(make_tiny_model, tmp_path):
    cfg = dict(schedule="constant", checkpoint_dir=str(tmp_path))
    train(make_tiny_model(seed=0), batch_list(2), config(steps=2, **cfg))
    model = make_tiny_model(seed=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="got 3 batches for steps=4"):  # the first 2 are read again to check them
        train(model, batch_list(3), config(steps=4, **cfg))
    assert_same_state(model, before)
    with pytest.warns(UserWarning, match="2 steps to go"):
        assert train(model, batch_list(4), config(steps=4, **cfg)).resumed_from == 2


def test_iterator_running_dry_keeps_the_work_and_resumes_exactly(make_tiny_model, tmp_path):
    data = batch_list(5)
    full = make_tiny_model(seed=0)
    straight = train(full, data, config(steps=5))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=r"ran out at step 3.*3 steps ran in this call.*checkpoint of step 3"):
        train(make_tiny_model(seed=0), iter(data[:3]), config(steps=5, checkpoint_every=2, checkpoint_dir=str(ckpt)))
    assert checkpoint_step(ckpt) == 3
    model = make_tiny_model(seed=0)
    with pytest.warns(UserWarning, match="resum|Resum"):
        resumed = train(model, iter(data), config(steps=5, checkpoint_dir=str(ckpt)))
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses
    assert_same_state(model, full.state_dict())


def test_iterator_running_dry_after_a_resume_and_without_a_checkpoint(make_tiny_model, tmp_path):
    data = batch_list(4)
    ckpt = str(tmp_path)
    train(make_tiny_model(seed=0), data[:2], config(steps=2, schedule="constant", checkpoint_dir=ckpt))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"1 step ran in this call \(resumed at step 2\)"):
        train(make_tiny_model(seed=0), iter(data[:3]), config(steps=4, schedule="constant", checkpoint_dir=ckpt))
    assert checkpoint_step(tmp_path) == 3
    with pytest.raises(ValueError, match="no checkpoint was written"):
        train(make_tiny_model(seed=0), iter(data[:1]), config(steps=2))
    with pytest.raises(ValueError, match="ran out at step 0.*No step ran, so nothing was written"):
        train(make_tiny_model(seed=0), iter([]), config(steps=2, checkpoint_dir=str(tmp_path / "empty")))
    assert not (tmp_path / "empty").exists()


# -- other arguments ------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_before_training(model, tmp_path):
    used = []
    fn = lambda step: used.append(step) or batch_list(1)[0]  # noqa: E731
    with pytest.raises(TypeError, match="eval_fn"):
        train(model, fn, config(), eval_fn="loss")
    with pytest.raises(TypeError, match="resume must be True or False"):
        train(model, fn, config(), resume="no")
    with pytest.raises(TypeError, match="list or tuple of loggers"):
        train(model, fn, config(), loggers=JSONLLogger(tmp_path / "log.jsonl"))
    with pytest.raises(TypeError, match="log.*close"):
        train(model, fn, config(), loggers=[print])
    with pytest.raises(TypeError, match="TrainConfig"):
        train(model, fn, {"steps": 3})
    assert used == []


def test_eval_fn_must_return_a_dict(model):
    with pytest.raises(TypeError, match="must return a dict.*at step 2 it returned float"):
        train(model, batch_list(3), config(eval_every=2), eval_fn=lambda m, step: math.pi)
