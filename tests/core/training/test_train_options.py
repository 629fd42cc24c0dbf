"""One-process `train` options: gradient accumulation, bf16 autocast (with a float32 code search), metrics loggers."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from tiny_models import assert_same_state, make_model

from cbinterp import attach_codebooks, get_codebooks
from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.training.loggers import JSONLLogger, TrainLogger, WandbLogger, read_jsonl
from cbinterp.core.training.train import TrainConfig, train
from cbinterp.tasks.fsm import FSM

FSM_TASK = FSM.random(6, 2, 10, seed=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def batches():
    return FSM_TASK.token_batches(8, 16, seed=0)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=4, lr=3e-3, progress=False, log_every=2, schedule="constant"), **kw})


def fresh(**codebook_options):
    return attach_codebooks(make_model(seed=0), ["attn", "mlp"], n_codes=16, **codebook_options)


# -- accumulation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["aeloss", "vqvae"])
def test_accumulate_equals_the_whole_batch(loss):
    """The mean of the micro-batches' gradients (the codebooks' reconstruction term included) is the batch's."""
    a, b = fresh(loss=loss), fresh(loss=loss)
    whole = train(a, batches(), config())
    split = train(b, batches(), config(accumulate=4))
    assert split.losses == pytest.approx(whole.losses, abs=1e-5)
    assert_same_state(b, a, atol=1e-5)  # usage counts exactly
    assert int(get_codebooks(b)["blocks.0.hook_mlp_out"].train_steps) == 4  # per optimizer step, not micro-batch


def test_accumulate_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 3"):
        train(fresh(), batches(), config(steps=1, accumulate=3))
    with pytest.raises(ValueError, match="accumulate"):
        TrainConfig(steps=1, accumulate=0)


# -- mixed precision --------------------------------------------------------------------------------------------
def test_autocast_setting_is_checked():
    with pytest.raises(ValueError, match="loss scaling"):
        TrainConfig(steps=1, autocast="fp16")
    model = fresh()
    result = train(model, batches(), config(steps=2, autocast="bf16"))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("similarity", ["inner_product", "euclidean"])
def test_codes_under_bf16_autocast_are_the_float32_codes(similarity):
    cb = Codebook(64, 512, similarity=similarity, seed=0)
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))
    seen = []
    cb.hook_codes.add_hook(lambda codes, hook: seen.append(codes.clone()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cb(x)
        bf16_search = cb._search(cb._as_groups(x))[0].squeeze(-2)  # what a search in bf16 would pick
    fp32 = cb.encode(x)
    assert not torch.equal(bf16_search, fp32)  # so the test can fail: bf16 scores do change codes here
    assert torch.equal(seen[0], fp32)


def test_deferred_finite_check_names_the_step_and_the_range(monkeypatch):
    """As on CUDA: no host sync per step; the check at the log step finds the first non-finite loss."""
    import cbinterp.core.training.loop as train_loop

    monkeypatch.setattr(train_loop, "_checks_each_step", lambda device: False)
    model = make_model(seed=0)
    with torch.no_grad():
        model.unembed.W_U[0, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 0 \(checked every log_every steps, here 0\.\.3"):
        train(model, batches(), config(steps=6, log_every=4))
    result = train(make_model(seed=0), batches(), config(steps=6, log_every=4))
    expected = train(make_model(seed=0), batches(), config(steps=6, log_every=1))
    assert result.losses == expected.losses and all(isinstance(x, float) for x in result.losses)


# -- loggers ----------------------------------------------------------------------------------------------------
def test_jsonl_logger_records_the_metrics(tmp_path):
    path = tmp_path / "logs" / "train.jsonl"
    model = fresh()
    train(
        model,
        batches(),
        config(steps=5, eval_every=2),
        eval_fn=lambda m, step: {"double": 2.0 * step, "x": "a"},
        loggers=[JSONLLogger(path)],
    )
    records = read_jsonl(path)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [2, 4, 5]
    assert [(r["step"], r["eval/double"]) for r in records if "eval/double" in r] == [(2, 4.0), (4, 8.0), (5, 10.0)]
    first = next(r for r in records if "loss" in r)
    names = get_codebooks(model)
    assert {f"mse/{n}" for n in names} | {f"dead_fraction/{n}" for n in names} <= set(first)
    assert first["tokens_per_s"] > 0 and first["lr"] == pytest.approx(3e-3) and 0 <= first["dead_fraction"] <= 1
    with path.open("a") as f:
        f.write('{"step": 9, "lo')  # a line cut short by a crash
    assert len(read_jsonl(path)) == len(records)


def test_logger_closed_when_training_fails(tmp_path):
    class Recorder:
        def __init__(self):
            self.calls = []

        def log(self, step, metrics):
            self.calls.append(step)

        def close(self):
            self.calls.append("closed")

    rec = Recorder()
    assert isinstance(rec, TrainLogger)

    def dying(step):
        if step == 3:
            raise RuntimeError("data gone")
        return batches()(step)

    with pytest.raises(RuntimeError, match="data gone"):
        train(fresh(), dying, config(steps=6), loggers=[rec])
    assert rec.calls == [2, "closed"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="cbinterp-test", mode="offline", dir=tmp_path)
    train(fresh(), batches(), config(), loggers=[logger])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in runs[0].iterdir())
    assert logger.run is None  # finished
    assert os.environ["WANDB_MODE"] == "offline"
