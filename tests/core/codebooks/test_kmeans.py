"""`kmeans_init_codebooks`: codebooks initialised from their own inputs, in forward order, at the right scale."""

from __future__ import annotations

import copy

import pytest
import torch

from cbinterp import attach_codebooks, codebooks_bypassed, detach_codebooks, get_codebooks, kmeans_init_codebooks


def attached(model, **kwargs):
    kwargs.setdefault("n_codes", 20)
    return attach_codebooks(model, **kwargs)


def test_kmeans_init_codebooks_in_forward_order(model, tokens):
    """Each codebook gets k-means of the input it sees with the codebooks before it in place (and none after)."""

    attach_codebooks(model, ["mlp"], n_codes=4)
    names = list(get_codebooks(model))
    reference, again = copy.deepcopy(model), copy.deepcopy(model)
    kmeans_init_codebooks(model, tokens, iters=3, seed=5)
    for index, name in enumerate(names):
        captured = {}
        ref_cbs = get_codebooks(reference)
        with codebooks_bypassed(reference, names[index:]):
            reference.run_with_hooks(
                tokens,
                fwd_hooks=[(f"{name}.hook_input", lambda t, hook: captured.setdefault("x", t))],  # noqa: B023
            )
        ref_cbs[name].kmeans_init(captured["x"].flatten(0, 1), iters=3, seed=5 + index)
        assert torch.equal(get_codebooks(model)[name].weight, ref_cbs[name].weight)
    kmeans_init_codebooks(again, tokens, iters=3, seed=5)  # the same seed gives the same codes
    assert all(torch.equal(get_codebooks(again)[n].weight, get_codebooks(model)[n].weight) for n in names)


def test_kmeans_init_codebooks_batches_and_samples(model, tokens):

    attach_codebooks(model, ["attn", "mlp"], n_codes=4)
    batched, sampled, sampled_again = (copy.deepcopy(model) for _ in range(3))
    kmeans_init_codebooks(model, tokens, iters=3, progress=False)
    kmeans_init_codebooks(batched, tokens, iters=3, batch_size=1, progress=False)
    for name, cb in get_codebooks(model).items():  # batching the forward pass does not change the data
        torch.testing.assert_close(get_codebooks(batched)[name].weight, cb.weight)
    kmeans_init_codebooks(sampled, tokens, iters=3, sample_size=5, progress=False)
    kmeans_init_codebooks(sampled_again, tokens, iters=3, sample_size=5, progress=False)
    for name, cb in get_codebooks(sampled).items():
        assert torch.equal(get_codebooks(sampled_again)[name].weight, cb.weight)  # the sample is seeded
    assert any(
        not torch.allclose(get_codebooks(sampled)[n].weight, cb.weight) for n, cb in get_codebooks(model).items()
    )
    with pytest.raises(ValueError, match="batch_size"):
        kmeans_init_codebooks(model, tokens, batch_size=0)
    with pytest.raises(ValueError, match="sample_size"):
        kmeans_init_codebooks(model, tokens, sample_size=0)
    with pytest.raises(ValueError, match=r"\(batch, pos\)"):
        kmeans_init_codebooks(model, tokens[0])
    with pytest.raises(ValueError, match="no codebooks"):
        kmeans_init_codebooks(detach_codebooks(model), tokens)


def _output_to_input_norm(model, tokens) -> dict[str, float]:
    """Per codebook: mean |output| / mean |input| over every position of `tokens`."""
    inputs, outputs = {}, {}
    hooks = [(f"{name}.hook_input", lambda t, hook: inputs.setdefault(hook.name, t)) for name in get_codebooks(model)]
    handles = [
        cb.register_forward_hook(lambda m, args, out: outputs.setdefault(m.name, out))
        for cb in get_codebooks(model).values()
    ]
    try:
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=hooks)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: float(outputs[name].norm(dim=-1).mean() / inputs[f"{name}.hook_input"].norm(dim=-1).mean())
        for name in get_codebooks(model)
    }


@pytest.mark.parametrize("sites", [["mlp"], ["attn", "mlp"]])
def test_kmeans_init_codebooks_output_has_the_inputs_scale_for_any_k(model, sites):
    """k-means centroids each approximate the input; a codebook sums k of them, so they are divided by k."""

    tokens = torch.randint(0, 11, (16, 16), generator=torch.Generator().manual_seed(3))
    attach_codebooks(model, sites, n_codes=32, k=8)
    raw = copy.deepcopy(model)
    kmeans_init_codebooks(model, tokens, iters=5, progress=False)
    kmeans_init_codebooks(raw, tokens, iters=5, progress=False, mean_of_k=False)
    for name, ratio in _output_to_input_norm(model, tokens).items():
        assert 0.5 <= ratio <= 2, f"{name}: output/input norm {ratio:.2f} after k-means at k = 8"
    assert all(ratio > 4 for ratio in _output_to_input_norm(raw, tokens).values())  # undivided: about k times
    first = next(iter(get_codebooks(model)))  # the first codebook's data does not depend on the others' codes
    torch.testing.assert_close(get_codebooks(model)[first].weight, get_codebooks(raw)[first].weight / 8)


def test_kmeans_init_codebooks_leaves_k1_and_averaging_codebooks_undivided(model, tokens):

    attach_codebooks(model, ["mlp"], n_codes=8, k=1)
    raw = copy.deepcopy(model)
    kmeans_init_codebooks(model, tokens, iters=3, progress=False)
    kmeans_init_codebooks(raw, tokens, iters=3, progress=False, mean_of_k=False)
    for name, cb in get_codebooks(model).items():
        assert torch.equal(cb.weight, get_codebooks(raw)[name].weight)
    detach_codebooks(model)
    detach_codebooks(raw)
    attach_codebooks(model, ["mlp"], n_codes=8, k=4)
    attach_codebooks(raw, ["mlp"], n_codes=8, k=4)
    for cb in [*get_codebooks(model).values(), *get_codebooks(raw).values()]:
        cb.cfg.combine = "mean"  # a codebook that averages its k codes (the option's name in CodebookConfig)
    kmeans_init_codebooks(model, tokens, iters=3, progress=False)
    kmeans_init_codebooks(raw, tokens, iters=3, progress=False, mean_of_k=False)
    for name, cb in get_codebooks(model).items():
        assert torch.equal(cb.weight, get_codebooks(raw)[name].weight)
