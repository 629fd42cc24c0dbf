"""Interventions on codes as hooks: each changes exactly what it claims, they compose, never leak, and refuse bad
input with clear errors (steered generation: test_steered_generation.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from interventions_common import ATTN0, ATTN1, BATCH, HEADS, MLP0, MLP1, N_CODES, POS, assert_no_hooks

from cbinterp import attach_codebooks, get_codebooks
from cbinterp.core.codebooks.interventions import ablate_codes, force_codes, intervene, replace_codes


@pytest.fixture
def cb_model_k1(model):
    return attach_codebooks(model, sites=["attn", "mlp"], n_codes=N_CODES, k=1)


def run(model, tokens, *hooks):
    """Logits and a cache of every hook, with `hooks` active (added first, so the cache sees their result)."""
    with torch.no_grad(), intervene(model, *hooks):
        return model.run_with_cache(tokens)


def selection_mask(positions, batch=BATCH, pos=POS) -> torch.Tensor:
    """(batch, pos) True where `positions` selects, written out by hand."""
    mask = torch.zeros(batch, pos, dtype=torch.bool)
    if positions is None:
        mask[:] = True
    elif isinstance(positions, torch.Tensor) and positions.dim() == 1:
        mask[torch.arange(batch), positions] = True
    elif isinstance(positions, torch.Tensor) or (isinstance(positions, list) and isinstance(positions[0], list)):
        for row, ps in enumerate(torch.as_tensor(positions).tolist()):
            mask[row, ps] = True
    else:
        mask[:, positions] = True
    return mask


POSITIONS = [
    None,
    2,
    -1,
    slice(1, 4),
    [0, 3],
    torch.tensor([1, 6, 3]),
    [[0, 1], [2, 5], [6, 4]],
    torch.tensor([[3], [0], [5]]),
]


def first_selected(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.any(1), mask.float().argmax(1), mask.shape[1])


def assert_untouched_outside(base, hooked, mask, name, cb_names):
    """Codes and output of codebook `name` unchanged where `mask` is False; earlier codebooks unchanged entirely;
    logits unchanged before each example's first selected position (the model is causal)."""
    base_logits, base_cache = base
    logits, cache = hooked
    codes_name = f"{name}.hook_codes"
    assert torch.equal(cache[codes_name][~mask], base_cache[codes_name][~mask])
    assert torch.equal(cache[name][~mask], base_cache[name][~mask])
    for other in cb_names[: cb_names.index(name)]:
        assert torch.equal(cache[f"{other}.hook_codes"], base_cache[f"{other}.hook_codes"])
        assert torch.equal(cache[other], base_cache[other])
    for row, start in enumerate(first_selected(mask).tolist()):
        assert torch.equal(logits[row, :start], base_logits[row, :start])


# -- replace ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", POSITIONS, ids=repr)
def test_replace_sets_exactly_the_selected_codes(cb_model, tokens, positions):
    base = run(cb_model, tokens)
    hooked = run(cb_model, tokens, replace_codes(cb_model, MLP1, [5, 7], positions=positions))
    mask = selection_mask(positions)
    codes = hooked[1][f"{MLP1}.hook_codes"]
    assert bool((codes[mask] == torch.tensor([5, 7, -1])).all())  # fewer than k ids: the rest is no code
    cb = get_codebooks(cb_model)[MLP1]
    assert torch.allclose(hooked[1][MLP1][mask], (cb.weight[0, 5] + cb.weight[0, 7]).expand(int(mask.sum()), -1))
    assert_untouched_outside(base, hooked, mask, MLP1, list(get_codebooks(cb_model)))
    assert not torch.equal(hooked[0], base[0])


def test_replace_takes_per_example_codes(cb_model, tokens):
    """A (batch, k) tensor at one position per example: each example gets its own codes."""
    wanted = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, -1]])
    positions = torch.tensor([0, 4, 6])
    _, cache = run(cb_model, tokens, replace_codes(cb_model, MLP0, wanted, positions=positions))
    assert torch.equal(cache[f"{MLP0}.hook_codes"][torch.arange(BATCH), positions], wanted)


@pytest.mark.parametrize("heads", [0, pd.NA, float("nan")])
def test_a_codebook_without_heads_takes_no_head_or_its_only_group(cb_model, tokens, heads):
    """heads=None is the way; a table's missing head (pd.NA) and 0 (its only group) mean the same."""
    want = run(cb_model, tokens, replace_codes(cb_model, MLP0, 4, positions=3))
    got = run(cb_model, tokens, replace_codes(cb_model, MLP0, 4, positions=3, heads=heads))
    assert torch.equal(got[1][f"{MLP0}.hook_codes"], want[1][f"{MLP0}.hook_codes"])
    assert torch.equal(got[0], want[0])


def test_a_missing_head_on_a_per_head_codebook_is_every_head(cb_model, tokens):
    want = run(cb_model, tokens, force_codes(cb_model, ATTN0, 4, positions=3))
    got = run(cb_model, tokens, force_codes(cb_model, ATTN0, 4, positions=3, heads=pd.NA))
    assert torch.equal(got[1][f"{ATTN0}.hook_codes"], want[1][f"{ATTN0}.hook_codes"])


@pytest.mark.parametrize("heads", [1, [0, 3], None])
def test_replace_touches_only_chosen_heads(cb_model, tokens, heads):
    base = run(cb_model, tokens)
    hooked = run(cb_model, tokens, replace_codes(cb_model, ATTN1, 4, positions=3, heads=heads))
    chosen = list(range(HEADS)) if heads is None else [heads] if isinstance(heads, int) else heads
    others = [h for h in range(HEADS) if h not in chosen]
    codes, base_codes = hooked[1][f"{ATTN1}.hook_codes"], base[1][f"{ATTN1}.hook_codes"]
    assert bool((codes[:, 3, chosen] == torch.tensor([4, -1, -1])).all())
    assert torch.equal(codes[:, 3, others], base_codes[:, 3, others])
    assert torch.equal(hooked[1][ATTN1][:, 3, others], base[1][ATTN1][:, 3, others])  # per-head output, before W_O
    mask = selection_mask(3)
    assert_untouched_outside(base, hooked, mask, ATTN1, list(get_codebooks(cb_model)))


def test_replace_heads_with_per_head_codes(cb_model, tokens):
    wanted = torch.tensor([[1, 2, 3], [9, 8, 7]])  # one row per chosen head
    hook = replace_codes(cb_model, ATTN0, wanted[None, None], positions=[1, 2], heads=[2, 0])
    _, cache = run(cb_model, tokens, hook)
    codes = cache[f"{ATTN0}.hook_codes"]
    assert bool((codes[:, 1:3, 2] == wanted[0]).all()) and bool((codes[:, 1:3, 0] == wanted[1]).all())


@pytest.mark.parametrize("fixture", ["cb_model", "cb_model_k1"])
def test_replacing_codes_with_the_models_own_choice_is_bit_identical(request, tokens, fixture):
    model = request.getfixturevalue(fixture)
    base_logits, base_cache = run(model, tokens)
    hooks = [replace_codes(model, name, base_cache[f"{name}.hook_codes"]) for name in get_codebooks(model)]
    logits, cache = run(model, tokens, hooks)
    assert torch.equal(logits, base_logits)
    for name in get_codebooks(model):
        assert torch.equal(cache[name], base_cache[name])
    # and one position of one example, with per-example positions
    own = base_cache[f"{MLP0}.hook_codes"][torch.arange(BATCH), torch.tensor([2, 0, 6])]
    logits, _ = run(model, tokens, replace_codes(model, MLP0, own, positions=torch.tensor([2, 0, 6])))
    assert torch.equal(logits, base_logits)


def test_codebook_can_be_given_as_module_or_codes_hook_name(cb_model, tokens):
    cb = get_codebooks(cb_model)[MLP0]
    by_module = run(cb_model, tokens, replace_codes(cb_model, cb, 3, positions=1))[0]
    by_name = run(cb_model, tokens, replace_codes(cb_model, f"{MLP0}.hook_codes", 3, positions=1))[0]
    assert torch.equal(by_module, by_name)
    assert replace_codes(cb_model, cb, 3)[0] == f"{MLP0}.hook_codes"


# -- force --------------------------------------------------------------------------------------------------
def test_force_keeps_the_best_other_codes_and_puts_forced_last(cb_model, tokens):
    base = run(cb_model, tokens)
    own = base[1][f"{MLP0}.hook_codes"]  # (batch, pos, 3), best first
    hooked = run(cb_model, tokens, force_codes(cb_model, MLP0, 11, positions=[2, 5]))
    codes = hooked[1][f"{MLP0}.hook_codes"]
    for b in range(BATCH):
        for p in (2, 5):
            others = [c for c in own[b, p].tolist() if c != 11][:2]
            assert codes[b, p].tolist() == others + [11]
    mask = selection_mask([2, 5])
    assert_untouched_outside(base, hooked, mask, MLP0, list(get_codebooks(cb_model)))
    cb = get_codebooks(cb_model)[MLP0]
    assert torch.allclose(hooked[1][MLP0][mask], cb.decode(codes[mask]))


def test_force_does_not_count_a_code_the_codebook_chose_anyway_twice(cb_model, tokens):
    own = run(cb_model, tokens)[1][f"{MLP0}.hook_codes"]
    chosen = int(own[0, 3, 1])  # the second best code at one place
    codes = run(cb_model, tokens, force_codes(cb_model, MLP0, chosen, positions=3))[1][f"{MLP0}.hook_codes"]
    expected = [c for c in own[0, 3].tolist() if c != chosen] + [chosen]
    assert codes[0, 3].tolist() == expected


def test_forcing_k_codes_replaces_all(cb_model, tokens):
    codes = run(cb_model, tokens, force_codes(cb_model, MLP1, [1, 2, 3]))[1][f"{MLP1}.hook_codes"]
    assert bool((codes == torch.tensor([1, 2, 3])).all())


def test_force_per_example_positions_and_heads(cb_model, tokens):
    base = run(cb_model, tokens)
    positions = torch.tensor([[0, 6], [1, 2], [3, 3]])
    hooked = run(cb_model, tokens, force_codes(cb_model, ATTN0, [7, 8], positions=positions, heads=2))
    codes, base_codes = hooked[1][f"{ATTN0}.hook_codes"], base[1][f"{ATTN0}.hook_codes"]
    mask = selection_mask(positions)
    assert bool((codes[mask][:, 2, 1:] == torch.tensor([7, 8])).all())
    assert torch.equal(codes[mask][:, [0, 1, 3]], base_codes[mask][:, [0, 1, 3]])
    assert_untouched_outside(base, hooked, mask, ATTN0, list(get_codebooks(cb_model)))


# -- ablate -------------------------------------------------------------------------------------------------
def test_ablating_every_code_of_a_k1_codebook_zeroes_its_output(cb_model_k1, tokens):
    base = run(cb_model_k1, tokens)
    hooked = run(cb_model_k1, tokens, ablate_codes(cb_model_k1, MLP0, list(range(N_CODES))))
    assert bool((hooked[1][f"{MLP0}.hook_codes"] == -1).all())
    assert bool((hooked[1][MLP0] == 0).all())
    # one head of an attention codebook, at some positions: that head's output is zero there, the rest unchanged
    hooked = run(cb_model_k1, tokens, ablate_codes(cb_model_k1, ATTN1, list(range(N_CODES)), heads=1, positions=[4, 6]))
    mask = selection_mask([4, 6])
    assert bool((hooked[1][ATTN1][mask][:, 1] == 0).all())
    assert torch.equal(hooked[1][ATTN1][mask][:, [0, 2, 3]], base[1][ATTN1][mask][:, [0, 2, 3]])
    assert_untouched_outside(base, hooked, mask, ATTN1, list(get_codebooks(cb_model_k1)))


def test_ablate_removes_only_the_given_ids(cb_model, tokens):
    base = run(cb_model, tokens)
    own = base[1][f"{MLP1}.hook_codes"]
    target = int(own.flatten().mode().values)  # a code that fires
    codes = run(cb_model, tokens, ablate_codes(cb_model, MLP1, target))[1][f"{MLP1}.hook_codes"]
    assert torch.equal(codes, own.masked_fill(own == target, -1))
    assert bool((own == target).any())


def test_ablate_per_example_positions(cb_model, tokens):
    base = run(cb_model, tokens)
    own = base[1][f"{MLP0}.hook_codes"]
    positions = torch.tensor([5, 0, 2])
    hooked = run(cb_model, tokens, ablate_codes(cb_model, MLP0, list(range(N_CODES)), positions=positions))
    mask = selection_mask(positions)
    assert bool((hooked[1][f"{MLP0}.hook_codes"][mask] == -1).all())
    assert bool((hooked[1][MLP0][mask] == 0).all())
    assert torch.equal(hooked[1][f"{MLP0}.hook_codes"][~mask], own[~mask])
    assert_untouched_outside(base, hooked, mask, MLP0, list(get_codebooks(cb_model)))


# -- composing and cleaning up ------------------------------------------------------------------------------
def test_hooks_compose_with_run_with_hooks_and_model_hooks(cb_model, tokens):
    hooks = [replace_codes(cb_model, MLP0, 3, positions=2), ablate_codes(cb_model, ATTN1, [0, 1, 2], heads=[0])]
    with torch.no_grad():
        via_run = cb_model.run_with_hooks(tokens, fwd_hooks=hooks)
        with cb_model.hooks(fwd_hooks=hooks):
            via_context = cb_model(tokens)
        with intervene(cb_model, hooks[0], [hooks[1]]):  # single hooks and lists mix
            via_intervene = cb_model(tokens)
    assert torch.equal(via_run, via_context) and torch.equal(via_run, via_intervene)
    assert not torch.equal(via_run, cb_model(tokens))
    assert_no_hooks(cb_model)


def test_intervene_removes_its_hooks_on_exit_and_on_exceptions(cb_model, tokens):
    hooks = [replace_codes(cb_model, MLP0, 3), force_codes(cb_model, ATTN0, 1, heads=2)]
    with intervene(cb_model, hooks):
        assert len(cb_model.hook_dict[f"{MLP0}.hook_codes"].fwd_hooks) == 1
    assert_no_hooks(cb_model)
    with pytest.raises(RuntimeError, match="boom"), intervene(cb_model, hooks):
        raise RuntimeError("boom")
    assert_no_hooks(cb_model)
    with (
        pytest.raises(IndexError, match="out of range"),
        intervene(cb_model, replace_codes(cb_model, MLP1, 1, positions=9)),
    ):
        cb_model(tokens)  # the hook itself raises, mid forward pass
    assert_no_hooks(cb_model)
    with (
        pytest.raises(ValueError, match="Unknown hook name"),
        intervene(cb_model, hooks, ("blocks.0.hook_mpl_out", lambda t, hook: t)),
    ):
        pass
    assert_no_hooks(cb_model)


def test_hooks_nest_with_an_outer_hook_kept(cb_model, tokens):
    """intervene removes only its own hooks: one the user added before stays."""
    cb_model.add_hook(f"{MLP0}.hook_codes", lambda codes, hook: codes)
    with intervene(cb_model, replace_codes(cb_model, MLP0, 2)):
        assert len(cb_model.hook_dict[f"{MLP0}.hook_codes"].fwd_hooks) == 2
    assert len(cb_model.hook_dict[f"{MLP0}.hook_codes"].fwd_hooks) == 1
    cb_model.reset_hooks()


# -- bad input ----------------------------------------------------------------------------------------------
def test_unknown_codebook_lists_the_codebooks_and_suggests(cb_model, make_tiny_model):
    with pytest.raises(
        ValueError, match=r"(?s)blocks\.0\.hook_mlp_out.*did you mean one of \['blocks\.1\.hook_mlp_out'"
    ):
        replace_codes(cb_model, "blocks.1.hook_mlp_ot", 1)
    with pytest.raises(ValueError, match="no codebooks"):
        replace_codes(make_tiny_model(), MLP0, 1)
    with pytest.raises(TypeError, match="HookedTransformer"):
        replace_codes(torch.nn.Linear(2, 2), MLP0, 1)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda m: replace_codes(m, MLP0, N_CODES), ValueError, "out of range.*20 codes"),
        (lambda m: replace_codes(m, MLP0, -2), ValueError, "out of range"),
        (lambda m: replace_codes(m, MLP0, [1, 2, 3, 4]), ValueError, "at most 3"),
        (lambda m: replace_codes(m, MLP0, [1.0]), TypeError, "integer"),
        (lambda m: replace_codes(m, MLP0, []), ValueError, "at least one"),
        (lambda m: replace_codes(m, MLP0, 1, heads=1), ValueError, "no heads"),
        (lambda m: replace_codes(m, MLP0, 1, heads=[0]), ValueError, "no heads"),
        (lambda m: replace_codes(m, ATTN0, 1, heads=4), ValueError, "head 4 is out of range"),
        (lambda m: replace_codes(m, ATTN0, 1, heads=[]), TypeError, "heads"),
        (lambda m: replace_codes(m, MLP0, 1, positions="last"), TypeError, "positions"),
        (lambda m: replace_codes(m, MLP0, 1, positions=[[0, 1], [2]]), ValueError, "same number"),
        (lambda m: replace_codes(m, MLP0, 1, positions=torch.tensor([0.5])), TypeError, "integers"),
        (lambda m: force_codes(m, MLP0, -1), ValueError, "out of range"),
        (lambda m: force_codes(m, MLP0, [1, 2, 3, 4]), ValueError, "only k=3 slots"),
        (lambda m: ablate_codes(m, ATTN0, 99), ValueError, "out of range"),
    ],
)
def test_bad_arguments_give_clear_errors(cb_model, make, error, match):
    with pytest.raises(error, match=match):
        make(cb_model)


@pytest.mark.parametrize(
    "hook, error, match",
    [
        (lambda m: replace_codes(m, MLP0, 1, positions=7), IndexError, "Position 7 is out of range.*7 positions"),
        (lambda m: replace_codes(m, MLP0, 1, positions=-8), IndexError, "out of range"),
        (lambda m: force_codes(m, MLP0, 1, positions=[0, 10]), IndexError, "Position 10"),
        (lambda m: ablate_codes(m, MLP0, 1, positions=torch.tensor([1, 2])), ValueError, "batch size 3"),
        (
            lambda m: replace_codes(m, MLP0, torch.zeros(2, 3, dtype=torch.long), positions=1),
            ValueError,
            "do not broadcast",
        ),
        (lambda m: replace_codes(m, MLP0, 1, positions=slice(9, None)), IndexError, "select nothing"),
    ],
)
def test_bad_positions_for_the_run_raise_inside_the_hook(cb_model, tokens, hook, error, match):
    with pytest.raises(error, match=match):
        cb_model.run_with_hooks(tokens, fwd_hooks=[hook(cb_model)])
    assert_no_hooks(cb_model)


# -- shapes of the codes given: never broadcast along the wrong axis -------------------------------------------
@pytest.mark.parametrize("make", [replace_codes, force_codes])
def test_per_example_codes_need_their_positions_axis_when_batch_equals_seq(cb_model, make):
    """(batch, 1) codes at every position would spread along positions when batch == seq: refused, naming the axes;
    (batch, 1, 1) gives each example its own code at every position."""
    square = torch.randint(0, 11, (4, 4), generator=torch.Generator().manual_seed(3))
    wanted = torch.tensor([[1], [2], [3], [4]])
    with pytest.raises(ValueError, match=r"ambiguous.*\(batch, positions, ids\).*ids\[:, None, :\]"):
        make(cb_model, MLP0, wanted)
    _, cache = run(cb_model, square, make(cb_model, MLP0, wanted[:, None]))
    slot = 0 if make is replace_codes else -1  # replaced ids come first, forced ones last
    codes = cache[f"{MLP0}.hook_codes"][..., slot]
    assert bool((codes == torch.tensor([1, 2, 3, 4])[:, None]).all())  # per example, along every position


def test_per_head_codes_need_the_batch_and_positions_axes(cb_model, tokens):
    wanted = torch.tensor([[1], [2], [3], [4]])  # one code per head
    with pytest.raises(ValueError, match=r"ambiguous.*\(batch, positions, heads, ids\).*ids\[None, None, :, :\]"):
        replace_codes(cb_model, ATTN0, wanted)
    _, cache = run(cb_model, tokens, replace_codes(cb_model, ATTN0, wanted[None, None]))
    assert bool((cache[f"{ATTN0}.hook_codes"][..., 0] == torch.tensor([1, 2, 3, 4])).all())


def test_codes_of_the_wrong_size_name_the_axis(cb_model, tokens):
    hook = replace_codes(cb_model, MLP0, torch.zeros(2, 1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 entries along the batch axis, where the run selects 3"):
        cb_model.run_with_hooks(tokens, fwd_hooks=[hook])
    hook = force_codes(cb_model, ATTN0, torch.zeros(1, 1, 3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="3 entries along the heads axis, where the run selects 4"):
        cb_model.run_with_hooks(tokens, fwd_hooks=[hook])
    assert_no_hooks(cb_model)


def test_heads_follow_the_one_rule_of_check_head(cb_model, tokens):
    """A negative head is refused (as by the cache queries); numpy and tensor heads are read as ints."""
    for heads in (-1, [0, -1], torch.tensor([-4])):
        with pytest.raises(ValueError, match=r"head -\d+ is out of range.*0\.\.3"):
            replace_codes(cb_model, ATTN0, 1, heads=heads)
    with pytest.raises(TypeError, match="head must be an int"):
        replace_codes(cb_model, ATTN0, 1, heads=1.5)
    want = run(cb_model, tokens, replace_codes(cb_model, ATTN0, 1, heads=[1, 3]))[1][f"{ATTN0}.hook_codes"]
    for heads in (np.array([1, 3]), torch.tensor([1, 3])):
        got = run(cb_model, tokens, replace_codes(cb_model, ATTN0, 1, heads=heads))[1][f"{ATTN0}.hook_codes"]
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "positions, error, match",
    [
        (slice(0.5, 3), TypeError, "slice takes ints"),
        (slice(0, 3, 0), ValueError, "step 0"),
        ([[True], [False], [True]], TypeError, "lists of ints"),
        ([[0.5], [1], [2]], TypeError, "lists of ints"),
    ],
)
def test_bad_positions_are_refused_when_the_hook_is_made(cb_model, positions, error, match):
    with pytest.raises(error, match=match):
        replace_codes(cb_model, MLP0, 1, positions=positions)
