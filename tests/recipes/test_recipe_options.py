"""The phase runner's per-phase settings, named control phases, k-means scaling and its hooks (what the LM uses)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cbinterp import get_codebooks
from cbinterp.core.training.train import train
from cbinterp.recipes.codebook import CodebookRecipe, CodebookSpec, Phase, run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(stream: int):
    return lambda step: torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(1000 * stream + step))


def quiet(**kwargs):
    return dict(progress=False, log=lambda m: None, **kwargs)


def test_phase_settings_reach_its_train_config():
    own = Phase("p", steps=40, lr=1e-3, stream=0, warmup_steps=10, cap_warmup=False, weight_decay=0.1,
                checkpoint_every=7, seed=5).train_config(3, Path("/ckpt"), False, False)  # fmt: skip
    assert (own.warmup_steps, own.weight_decay, own.checkpoint_every, own.seed) == (10, 0.1, 7, 5)
    assert own.checkpoint_dir == str(Path("/ckpt") / "p")
    default = Phase("p", steps=40, lr=1e-3, stream=0, warmup_steps=10).train_config(3, Path("/ckpt"), False, False)
    assert (default.warmup_steps, default.weight_decay, default.checkpoint_every, default.seed) == (4, 0.01, 50, 3)
    unsaved = Phase("p", steps=40, lr=1e-3, stream=0, checkpoint_every=7).train_config(3, None, False, False)
    assert unsaved.checkpoint_every == 0  # no folder, no checkpoints


def test_named_control_phases_train_the_warm_model(model):
    control = Phase("finetuned", steps=3, lr=1e-4, stream=2, seed=9)
    recipe = CodebookRecipe(
        warm=Phase("warm", steps=4, lr=1e-3, stream=0),
        codebooks=CodebookSpec(sites=("attn",), n_codes=8, k=1),
        phases=[Phase("end_to_end", steps=3, lr=1e-4, codebook_lr=1e-3, stream=2)],
        controls=[control],
    )
    assert recipe.control_phases() == [control]
    assert CodebookRecipe.from_dict(recipe.to_dict()) == recipe
    result = run_recipe(model, batches, recipe, kmeans_tokens=batches(9)(0), **quiet())
    assert list(result.steps) == ["warm", "end_to_end", "finetuned"]
    again = copy.deepcopy(result.warm_model)
    train(again, batches(2), control.train_config(recipe.seed, None, False, False))  # seed 9, the phase's own
    a, b = again.state_dict(), result.control_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="control phases"):
        CodebookRecipe(None, CodebookSpec(), [], controls=[Phase("c", 1, 1e-3, 0, freeze_model=True)])


def test_kmeans_mean_of_k_divides_the_initial_codes_by_k(model):
    codes = {}
    for mean_of_k in (False, True):
        spec = CodebookSpec(sites=("mlp",), n_codes=8, k=2, kmeans_mean_of_k=mean_of_k)
        recipe = CodebookRecipe(warm=None, codebooks=spec, phases=[], control=False)
        result = run_recipe(copy.deepcopy(model), batches, recipe, kmeans_tokens=batches(9)(0), **quiet())
        codes[mean_of_k] = {n: cb.weight.detach().clone() for n, cb in get_codebooks(result.model).items()}
    assert codes[True].keys() == codes[False].keys()
    for name in codes[True]:
        assert torch.allclose(codes[True][name], codes[False][name] / 2)


def test_on_trained_reports_each_phase_before_after_phase(model):
    recipe = CodebookRecipe(
        warm=Phase("warm", steps=2, lr=1e-3, stream=0),
        codebooks=CodebookSpec(sites=("attn",), n_codes=8, k=1),
        phases=[Phase("end_to_end", steps=3, lr=1e-4, stream=1)],
    )
    events = []
    run_recipe(
        model,
        batches,
        recipe,
        kmeans_tokens=batches(9)(0),
        after_phase=lambda name, m: events.append(("after", name)),
        on_trained=lambda name, result, seconds: events.append(("trained", name, result.steps, seconds >= 0)),
        **quiet(),
    )
    assert events == [
        ("trained", "warm", 2, True),
        ("after", "warm"),
        ("after", "attached"),
        ("trained", "end_to_end", 3, True),
        ("after", "end_to_end"),
        ("trained", "control_end_to_end", 3, True),
        ("after", "control_end_to_end"),
    ]


def test_progress_false_also_silences_kmeans(model, capsys):
    recipe = CodebookRecipe(warm=None, codebooks=CodebookSpec(sites=("attn",), n_codes=8), phases=[], control=False)
    run_recipe(model, batches, recipe, kmeans_tokens=batches(9)(0), **quiet())
    assert "k-means" not in capsys.readouterr().err
