"""The sites, sizes and hook-leak check shared by the intervention tests (test_intervention_hooks.py,
test_steered_generation.py; the cb_model fixture is in conftest.py)."""

from __future__ import annotations

MLP0, MLP1, ATTN0, ATTN1 = (
    "blocks.0.hook_mlp_out",
    "blocks.1.hook_mlp_out",
    "blocks.0.attn.hook_z",
    "blocks.1.attn.hook_z",
)
N_CODES, BATCH, POS, HEADS = 20, 3, 7, 4


def assert_no_hooks(model):
    leaked = {
        name: (hp.fwd_hooks, hp.bwd_hooks) for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks
    }
    assert not leaked
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())  # the torch hooks are gone too
