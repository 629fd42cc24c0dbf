"""The same seed trains to the same weights with two CPU threads, and the caller's torch setting is kept."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_model

from cbinterp import TrainConfig, attach_codebooks, train
from cbinterp.core.training.determinism import deterministic_on_cpu


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def trained_weights() -> torch.Tensor:
    model = make_model(seed=0, d_model=128, d_mlp=512, n_ctx=128)  # wide enough to split over threads
    attach_codebooks(model, sites=["attn", "mlp"], n_codes=64, seed=0)
    tokens = torch.randint(0, 11, (64, 128), generator=torch.Generator().manual_seed(0))
    train(model, tokens, TrainConfig(steps=4, batch_size=32, progress=False))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_the_same_seed_trains_to_the_same_weights_on_two_threads(two_threads):
    assert torch.equal(trained_weights(), trained_weights())


def test_the_callers_setting_is_put_back():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_on_cpu("cpu"):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_on_cpu("meta"):  # not a CPU: left as the caller set it
        assert not torch.are_deterministic_algorithms_enabled()
