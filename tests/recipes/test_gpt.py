"""`gpt_config`: the one statement of the GPT-style shape that the recipes, the benchmarks and the tests build."""

from __future__ import annotations

import pytest
import torch

from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.recipes.gpt import gpt_config
from cbinterp.recipes.lm_recipe import LMRecipe

pytestmark = pytest.mark.needs_hooked  # gpt_config is a HookedTransformerConfig


def test_the_shape_is_pre_ln_gelu_rotary_with_whole_heads():
    cfg = gpt_config(2, 48, 3, 96, 20, 11, seed=5, device="cpu")
    sizes = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.n_ctx, cfg.d_vocab)
    assert sizes == (2, 48, 3, 16, 96, 20, 11) and (cfg.seed, cfg.device) == (5, "cpu")
    assert (cfg.act_fn, cfg.normalization_type, cfg.positional_embedding_type) == ("gelu", "LN", "rotary")


def test_settings_take_precedence():
    cfg = gpt_config(1, 32, 4, 64, 16, 11, seed=0, device="cpu", act_fn="relu", d_head=4, dtype=torch.bfloat16)
    assert (cfg.act_fn, cfg.d_head, cfg.dtype, cfg.normalization_type) == ("relu", 4, torch.bfloat16, "LN")


def test_no_device_means_the_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpt_config(1, 32, 4, 64, 16, 11, seed=0).device == "cpu"


def test_heads_that_do_not_divide_d_model_are_refused_by_name():
    with pytest.raises(ValueError, match="d_model 30 is not a multiple of n_heads 4"):
        gpt_config(1, 30, 4, 64, 16, 11, seed=0, device="cpu")


def test_both_recipes_build_their_model_from_it():
    fsm_recipe = FSMRecipe.quick(seed=3)
    fsm = fsm_recipe.fsm()
    r = fsm_recipe
    expected = gpt_config(r.n_layers, r.d_model, r.n_heads, r.d_mlp, r.seq_len, fsm.vocab_size, seed=3, device="cpu")
    assert fsm_recipe.model_config(fsm, "cpu").to_dict() == expected.to_dict()
    lm = LMRecipe.quick(act_fn="relu", positional_embedding_type="standard", seed=2)
    cfg = lm.model_config(100, "cpu")
    assert (cfg.d_head, cfg.n_ctx, cfg.d_vocab, cfg.act_fn, cfg.seed) == (16, 64, 100, "relu", 2)
    assert (cfg.positional_embedding_type, cfg.normalization_type) == ("standard", "LN")
