"""Fixtures of the code-cache tests (the tiny model and `cb_model` come from tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def docs() -> torch.Tensor:
    """Five documents of six token ids below the tiny model's vocabulary of 11."""
    return torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(3))
