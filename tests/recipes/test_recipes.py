"""The recipe runner (warm start, attach, k-means, phases, control) and the FSM presets."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from cbinterp import get_codebooks
from cbinterp.core.training.train import train
from cbinterp.recipes.codebook import CodebookRecipe, CodebookSpec, Phase, run_recipe
from cbinterp.recipes.fsm import STREAM_SHORT, STREAM_WARM, FSMRecipe

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(stream: int):
    return lambda step: torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(1000 * stream + step))


def tiny_recipe(**overrides) -> CodebookRecipe:
    settings = dict(
        warm=Phase("warm", steps=4, lr=1e-3, stream=0),
        codebooks=CodebookSpec(sites=("attn", "mlp"), n_codes=8, k=1),
        phases=[
            Phase("codebooks_only", steps=2, lr=1e-3, stream=1, freeze_model=True),
            Phase("end_to_end", steps=3, lr=1e-4, codebook_lr=1e-3, stream=2),
        ],
    )
    return CodebookRecipe(**{**settings, **overrides})


def test_run_recipe_phases_control_and_tokens(model):
    recipe = tiny_recipe()
    result = run_recipe(model, batches, recipe, kmeans_tokens=batches(9)(0), progress=False, log=lambda m: None)
    assert result.model is model and len(get_codebooks(model)) == 4  # 2 layers x (attn, mlp)
    assert not get_codebooks(result.warm_model) and not get_codebooks(result.control_model)
    assert result.steps == {"warm": 4, "codebooks_only": 2, "end_to_end": 3, "control_end_to_end": 3}
    assert result.tokens["warm"] == 4 * 64 and result.tokens["kmeans"] == 64 and result.kmeans_initialised
    # The control is the warm model trained through the model-training phases only (not the frozen one), with the
    # same settings and data: the same as training a copy directly.
    again = copy.deepcopy(result.warm_model)
    train(again, batches(2), recipe.control_phases()[0].train_config(0, None, False, False))
    assert all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), result.control_model.state_dict().values())
    )
    assert not all(
        torch.equal(a, b) for a, b in zip(result.warm_model.state_dict().values(), again.state_dict().values())
    )


def test_run_recipe_resumes_without_training_again(make_tiny_model, tmp_path):
    recipe = tiny_recipe(control=False)
    first = run_recipe(make_tiny_model(), batches, recipe, batches(9)(0), tmp_path, progress=False, log=lambda m: None)
    second = run_recipe(make_tiny_model(), batches, recipe, batches(9)(0), tmp_path, progress=False, log=lambda m: None)
    assert first.kmeans_initialised and not second.kmeans_initialised  # the codes come from the checkpoint
    assert second.control_model is None
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.losses == first.losses


def test_recipe_checks_and_round_trips(model):
    with pytest.raises(ValueError, match="unique"):
        tiny_recipe(phases=[Phase("warm", 1, 1e-3, 1)])
    with pytest.raises(ValueError, match="kmeans_tokens"):
        run_recipe(model, batches, tiny_recipe(), kmeans_tokens=None)
    recipe = tiny_recipe()
    assert CodebookRecipe.from_dict(recipe.to_dict()) == recipe
    fsm_recipe = FSMRecipe.quick(seed=3)
    assert FSMRecipe.from_dict(fsm_recipe.to_dict()) == fsm_recipe
    assert fsm_recipe.training.seed == 3


@pytest.mark.needs_hooked  # model_config is a HookedTransformerConfig
def test_fsm_presets_are_the_papers_where_it_matters():
    paper = FSMRecipe.paper()
    fsm = paper.fsm()
    assert (fsm.n_states, fsm.n_edges, fsm.digits) == (100, 10, 2)
    cfg = paper.model_config(fsm, device="cpu")
    assert (cfg.n_layers, cfg.d_model, cfg.n_ctx) == (4, 128, 128)
    spec = paper.training.codebooks
    assert (spec.sites, spec.n_codes, spec.k, spec.loss) == (("attn", "mlp"), 1000, 1, "aeloss")
    quick = FSMRecipe.quick()
    assert quick.fsm().n_states < fsm.n_states and quick.seq_len <= paper.seq_len
    # Seeds differ in everything: the machine, the data and the weights.
    other = FSMRecipe.quick(seed=1)
    assert not (other.fsm().successors == quick.fsm().successors).all()
    assert not torch.equal(other.batches(other.fsm())(0)(0), quick.batches(quick.fsm())(0)(0))
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(quick, d_model=66)


def test_pretrain_phases_run_before_the_warm_start_on_their_own_streams(make_tiny_model):
    seen = []

    def recording(stream: int):
        seen.append(stream)
        return batches(stream)

    recipe = tiny_recipe(pretrain=[Phase("short", steps=2, lr=1e-3, stream=5)], control=False)
    assert [p.name for p in recipe.warm_phases()] == ["short", "warm"]
    result = run_recipe(make_tiny_model(), recording, recipe, batches(9)(0), progress=False, log=lambda m: None)
    assert seen[:2] == [5, 0] and result.steps["short"] == 2
    # The warm-started model is the one after both phases: the same as training them in turn by hand.
    by_hand = make_tiny_model()
    for phase in recipe.warm_phases():
        train(by_hand, batches(phase.stream), phase.train_config(0, None, False, False))
    a, b = by_hand.state_dict(), result.warm_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert CodebookRecipe.from_dict(recipe.to_dict()) == recipe
    old = recipe.to_dict()
    del old["pretrain"]  # a recipe written before pretrain phases existed
    assert CodebookRecipe.from_dict(old).pretrain == []
    with pytest.raises(ValueError, match="freeze"):
        tiny_recipe(pretrain=[Phase("short", steps=2, lr=1e-3, stream=5, freeze_model=True)])


def test_fsm_short_window_stream_has_its_own_shape():
    recipe = FSMRecipe.quick(short_seq_len=8, short_batch=3)
    fsm = recipe.fsm()
    short = recipe.batches(fsm)(STREAM_SHORT)(0)
    assert short.shape == (3, 8) and recipe.batches(fsm)(STREAM_WARM)(0).shape == (recipe.batch, recipe.seq_len)
    phases = {p.name: p for p in recipe.training.all_phases()}
    assert recipe.phase_tokens_per_step(Phase("x", 1, 1e-3, STREAM_SHORT)) == 24
    assert recipe.phase_tokens_per_step(phases["warm"]) == recipe.tokens_per_step
