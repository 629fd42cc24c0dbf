"""Steered generation: generate_with_codes and steering_hooks force codes where new tokens are predicted, leave no
hooks behind, and refuse bad tokens, counts and shapes (the hooks themselves: test_intervention_hooks.py)."""

from __future__ import annotations

import pytest
import torch
from interventions_common import ATTN0, ATTN1, BATCH, MLP0, MLP1, N_CODES, assert_no_hooks

from cbinterp import attach_codebooks, get_codebooks
from cbinterp.core.codebooks.interventions import generate_with_codes, intervene, steering_hooks


# -- steered generation ---------------------------------------------------------------------------------------
def record_outputs(name, calls):
    def record(tensor, hook):
        calls.append(tensor.detach().clone())

    return name, record


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("prompt", [False, True])
def test_generate_with_codes_forces_codes_where_new_tokens_are_predicted(model, tokens, use_cache, prompt):
    model = attach_codebooks(model, sites=["attn", "mlp"], n_codes=N_CODES, k=2)
    cb = get_codebooks(model)[MLP1]
    forced = 2 * cb.weight[0, 13]  # code 13 in both slots: n_slots=2 doubles its weight
    prompt_tokens, new = tokens[:, :4], 5
    calls = []
    with intervene(model, record_outputs(MLP1, calls)):
        out = generate_with_codes(
            model,
            prompt_tokens,
            {MLP1: 13},
            n_slots=2,
            max_new_tokens=new,
            prompt=prompt,
            use_past_kv_cache=use_cache,
            do_sample=False,
        )
    assert out.shape == (BATCH, 4 + new) and torch.equal(out[:, :4], prompt_tokens)
    assert len(calls) == new
    for index, output in enumerate(calls):
        n_pos = output.shape[1]
        assert n_pos == (1 if use_cache and index else 4 + index * (not use_cache))
        starts_at = 0 if prompt or n_pos < 4 else 3  # from the prompt's last position: it predicts the first new token
        is_forced = torch.isclose(output, forced.expand_as(output), atol=1e-5).all(-1)
        assert bool(is_forced[:, starts_at:].all())
        assert not bool(is_forced[:, :starts_at].any())
    assert_no_hooks(model)


@pytest.mark.parametrize("use_cache", [True, False])
def test_steering_hooks_in_generate_put_the_codes_in_the_last_slots(cb_model, tokens, use_cache):
    """The codes seen after the steering hook (a recorder added after it) at every position predicting a new token."""
    codes_seen = []
    steer = steering_hooks(
        cb_model, {MLP0: 13, ATTN1: torch.tensor([[1], [2], [3], [4]])}, n_slots={MLP0: 2}, prompt_len=4
    )
    with intervene(cb_model, steer, record_outputs(f"{MLP0}.hook_codes", codes_seen)):
        cb_model.generate(
            tokens[:, :4],
            max_new_tokens=4,
            use_past_kv_cache=use_cache,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
        )
    for index, codes in enumerate(codes_seen):
        start = 0 if use_cache and index else 3
        assert bool((codes[:, start:, 1:] == 13).all())  # two of k=3 slots
        assert not bool((codes[:, start:, 0] == 13).any())  # the codebook's own best other code stays first
        assert not bool((codes[:, :start] == 13).all(-1).any())
    assert_no_hooks(cb_model)


def test_generate_with_codes_is_the_same_with_and_without_kv_cache(cb_model, tokens):
    kwargs = dict(
        codebook_codes={MLP0: [4, 9], ATTN1: torch.tensor([[1], [2], [3], [4]])}, max_new_tokens=6, do_sample=False
    )
    cached = generate_with_codes(cb_model, tokens[:, :3], use_past_kv_cache=True, **kwargs)
    full = generate_with_codes(cb_model, tokens[:, :3], use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, full)
    plain = cb_model.generate(tokens[:, :3], max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert not torch.equal(cached, plain)


def test_generate_with_codes_bad_input(cb_model, tokens):
    with pytest.raises(ValueError, match="n_slots"):
        generate_with_codes(cb_model, tokens, {MLP0: [1, 2]}, n_slots=1)
    with pytest.raises(ValueError, match="n_slots"):
        generate_with_codes(cb_model, tokens, {MLP0: 1}, n_slots=4)
    with pytest.raises(ValueError, match="empty"):
        generate_with_codes(cb_model, tokens, {})
    with pytest.raises(ValueError, match="No codebook"):
        generate_with_codes(cb_model, tokens, {"blocks.0.hook_resid_post": 1})
    assert_no_hooks(cb_model)


# -- steering: token ids, counts and the shapes of steering codes ------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tokens=torch.tensor([[1, 2, 11]])), ValueError, r"token id 11.*\[0, 11\)"),
        (dict(tokens=torch.tensor([[1, -1, 2]])), ValueError, r"token id -1.*d_vocab=11"),
        (dict(tokens=torch.tensor([[True, False]])), ValueError, "integer token ids"),
        (dict(tokens=torch.zeros(2, 0, dtype=torch.long)), ValueError, "no prompt"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 1"),
        (dict(max_new_tokens=2.5), ValueError, "max_new_tokens must be an int >= 1"),
        (dict(n_slots=True), ValueError, "n_slots=True"),
        (dict(n_slots={MLP1: 1}), ValueError, "n_slots names.*does not steer"),
        (dict(prompt="yes"), TypeError, "prompt must be True or False"),
        (dict(codebook_codes={MLP0: torch.ones(2, 3, 1, dtype=torch.long)}), ValueError, r"give \(n,\) or \(batch"),
        (dict(codebook_codes={ATTN0: torch.ones(3, 1, dtype=torch.long)}), ValueError, "lists heads.*4 entries"),
    ],
)
def test_generate_with_codes_refuses_bad_tokens_and_counts(cb_model, tokens, kwargs, error, match):
    args = dict(tokens=tokens[:, :3], codebook_codes={MLP0: 1}, max_new_tokens=2)
    with pytest.raises(error, match=match):
        generate_with_codes(cb_model, **{**args, **kwargs})
    assert_no_hooks(cb_model)


def test_steering_prompt_len_must_be_a_positive_int(cb_model):
    for bad in (2.5, True, 0, None):
        with pytest.raises(ValueError, match="prompt_len must be a positive int"):
            steering_hooks(cb_model, {MLP0: 1}, prompt_len=bad)


def test_steering_takes_per_example_codes(cb_model):
    """(batch, n) steers each example with its own codes (batch == prompt length here, where a (batch, n) tensor
    forced with positions would have spread along the positions)."""
    prompt = torch.randint(0, 11, (3, 3), generator=torch.Generator().manual_seed(4))
    seen = []
    codes = {MLP0: torch.tensor([[5], [6], [7]]), ATTN1: torch.tensor([[[1]] * 4, [[2]] * 4, [[3]] * 4])}
    steer = steering_hooks(cb_model, codes, prompt_len=3)
    recorders = [record_outputs(f"{MLP0}.hook_codes", seen), record_outputs(f"{ATTN1}.hook_codes", seen)]
    with intervene(cb_model, steer, recorders):  # the recorders run after the steering hooks
        cb_model.generate(prompt, max_new_tokens=1, do_sample=False, stop_at_eos=False, verbose=False)
    mlp, attn = seen[0], seen[1]  # the first step: the whole prompt, forced at its last position
    assert mlp[:, -1, -1].tolist() == [5, 6, 7] and attn[:, -1, :, -1].tolist() == [[1] * 4, [2] * 4, [3] * 4]
    assert not bool((mlp[:, :-1, -1] == torch.tensor([5, 6, 7])[:, None]).all())
