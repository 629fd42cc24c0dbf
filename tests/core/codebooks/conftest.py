"""The codebook model of the intervention tests, shared by test_intervention_hooks.py and
test_steered_generation.py."""

from __future__ import annotations

import pytest
from interventions_common import N_CODES

from cbinterp import attach_codebooks


@pytest.fixture
def cb_model(model):
    return attach_codebooks(model, sites=["attn", "mlp"], n_codes=N_CODES, k=3)
