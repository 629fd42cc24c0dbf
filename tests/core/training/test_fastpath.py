"""The fused attention and layer-norm kernels give TransformerLens's results and keep every hook that is used."""

from __future__ import annotations

import pytest
import torch

from cbinterp import attach_codebooks
from cbinterp.core import tl_compat as tc
from cbinterp.core.training.fastpath import Attention, attention_fusable, fast_kernels


def loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, return_type="loss")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(model, tokens):
    loss, grads = loss_and_grads(model, tokens)
    with fast_kernels(model) as switched:
        assert switched > 0
        fast_loss, fast_grads = loss_and_grads(model, tokens)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"normalization_type": "LNPre"}, {"positional_embedding_type": "standard"}, {"rotary_adjacent_pairs": True}],
    ids=["rotary-LN", "LNPre", "standard-positions", "adjacent-rotary"],
)
def test_fused_kernels_give_the_same_loss_and_gradients(make_tiny_model, overrides):
    model = make_tiny_model(seed=3, **overrides).train()
    tokens = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(0))
    assert_same_training_signal(model, tokens)


def test_codebook_model_keeps_its_codes_and_gradients(make_tiny_model):
    model = make_tiny_model(seed=4).train()
    attach_codebooks(model, sites=["attn", "mlp"], n_codes=16, k=2, seed=0)
    tokens = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(1))
    assert_same_training_signal(model, tokens)
    names = [n for n in model.hook_dict if n.endswith("hook_codes")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    seen = {}
    hooks = [(n, lambda t, hook: seen.__setitem__(hook.name, t.clone())) for n in names]
    with fast_kernels(model):
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert any("attn.hook_z" in n for n in names)
    for n in names:
        assert torch.equal(seen[n], cache[n]), n


def test_a_hooked_pattern_or_a_cache_takes_transformer_lens_own_path(model, tokens):
    seen = []
    with fast_kernels(model):
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: seen.append(t))]
        )
        _, cache = model.run_with_cache(tokens)
    assert len(seen) == 1 and seen[0].shape == (3, 4, 7, 7)
    assert "blocks.1.attn.hook_pattern" in cache and "blocks.0.ln1.hook_scale" in cache
    torch.testing.assert_close(logits, model(tokens))


def test_a_padding_mask_takes_transformer_lens_own_path(model, tokens):
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    expected = model(tokens, attention_mask=mask)
    with fast_kernels(model):
        torch.testing.assert_close(model(tokens, attention_mask=mask), expected)


def test_the_layers_get_their_own_forward_back_and_nesting_is_harmless(model, tokens):
    attn = model.blocks[0].attn
    with fast_kernels(model) as outer:
        with fast_kernels(model) as inner:
            assert inner == 0
        assert "forward" in attn.__dict__  # the outer block is still in force
    assert outer == 2 * 2 + 2 + 1  # two attention layers, two layer norms per block, the final one
    assert "forward" not in attn.__dict__ and "forward" not in model.ln_final.__dict__
    with fast_kernels(model, enabled=False) as switched:
        assert switched == 0


def test_an_attention_result_config_is_not_fused(make_tiny_model):
    model = make_tiny_model(use_attn_result=True)
    assert not any(attention_fusable(m) for m in model.modules() if isinstance(m, Attention))
    with fast_kernels(model) as switched:
        assert switched == 5  # the layer norms only


def test_train_with_and_without_the_fused_kernels_agrees(make_tiny_model):
    from cbinterp import TrainConfig, train

    tokens = torch.randint(0, 11, (16, 16), generator=torch.Generator().manual_seed(2))
    runs = {}
    for fused in (True, False):
        model = make_tiny_model(seed=5)
        attach_codebooks(model, sites=["attn", "mlp"], n_codes=16, seed=0)
        cfg = TrainConfig(steps=4, batch_size=8, progress=False, fast_kernels=fused)
        runs[fused] = (train(model, tokens, cfg).losses, model)
    torch.testing.assert_close(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), rtol=1e-4, atol=1e-5)
    assert "forward" not in runs[True][1].blocks[0].attn.__dict__  # train put TransformerLens's own forward back


def test_a_codebook_on_a_skipped_hook_point_keeps_transformer_lens_own_path(make_tiny_model):
    from transformer_lens.hook_points import HookPoint

    from cbinterp import Codebook

    class Sharpened(HookPoint):  # a module in place of a hook point changes what flows on, with no hook of its own
        def forward(self, x):
            return x * 2

    model = make_tiny_model(seed=6)
    model.blocks[0].attn.hook_pattern = Sharpened()
    model.setup()
    attach_codebooks(model, {"blocks.1.ln2.hook_normalized": Codebook(32, 8, seed=1)})
    tokens = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(3))
    expected = model(tokens, return_type="loss")
    with fast_kernels(model):
        torch.testing.assert_close(model(tokens, return_type="loss"), expected)


def test_local_attention_is_not_fused(make_tiny_model):
    model = make_tiny_model(seed=7, use_local_attn=True, attn_types=["local", "global"], window_size=2).train()
    assert [attention_fusable(block.attn) for block in model.blocks] == [False, True]
    tokens = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(4))
    expected = model(tokens, return_type="loss")
    with fast_kernels(model):
        torch.testing.assert_close(model(tokens, return_type="loss"), expected, rtol=1e-5, atol=1e-6)


def test_a_bridge_keeps_its_own_layers_and_trains_the_same(any_model, tokens):
    """A bridge runs Hugging Face's layers (eager attention, so that its pattern hooks fire): nothing is switched."""
    model = attach_codebooks(any_model, ["attn", "mlp"], n_codes=16).train()
    expected = model(tokens, return_type="loss")
    with fast_kernels(model) as switched:
        assert (switched == 0) == tc.is_bridge(model)
        torch.testing.assert_close(model(tokens, return_type="loss"), expected, rtol=1e-5, atol=1e-6)
