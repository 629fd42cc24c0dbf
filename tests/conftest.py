"""Shared tiny-model fixtures: every model here runs a forward pass in milliseconds on a CPU."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from bridge_models import KINDS, NO_HOOKED_REASON, make_any
from tiny_models import TINY, add_codebooks, make_model  # noqa: F401  (TINY: re-exported for test modules)

from cbinterp.core.tl_compat import Model as HookedTransformer


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs_hooked: the test builds a HookedTransformer other than by make_model (a recipe, from_hf, a spawned "
        "rank); it skips, with the reason, on transformer-lens 4",
    )


def pytest_collection_modifyitems(config, items):
    if NO_HOOKED_REASON is None:
        return
    skip = pytest.mark.skip(reason=NO_HOOKED_REASON)
    for item in items:
        if item.get_closest_marker("needs_hooked") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _base_model() -> HookedTransformer:
    return make_model()  # skips where this TransformerLens has no HookedTransformer


@pytest.fixture
def model(_base_model) -> HookedTransformer:
    """A tiny model without codebooks; a private copy per test so tests may attach, hook and mutate it."""
    return copy.deepcopy(_base_model)


@pytest.fixture(scope="session", params=KINDS)
def _base_any_model(request, tmp_path_factory):
    return make_any(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture
def any_model(_base_any_model):
    """A tiny model of each kind: the HookedTransformer (where this TransformerLens has it) and GPT-NeoX, GPT-2 and
    Llama-style TransformerBridges of the same shape; a private copy per test. A kind this TransformerLens lacks
    skips with the reason."""
    return copy.deepcopy(_base_any_model)


@pytest.fixture
def cb_model(model) -> HookedTransformer:
    """`model` with 16-code codebooks after every attention layer and MLP (`make_cb_model()`'s model)."""
    return add_codebooks(model)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, TINY["d_vocab"], (3, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def make_tiny_model():
    """Factory for further independent tiny models: `make_tiny_model(seed=1)`."""
    return make_model


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(name: str):
    """The script benchmarks/<name>.py as the module `benchmarks.<name>`, as `python -m benchmarks.<name>` runs it.

    The package is loaded from its folder, not looked up on the import path, which plain `pytest` does not give the
    repository root (`python -m pytest` does): so this works however pytest was started."""
    if "benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", BENCHMARKS / "__init__.py", submodule_search_locations=[str(BENCHMARKS)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="session")
def load_benchmark():
    """Import a script of benchmarks/ as a module: `load_benchmark("fsm_precision").main([...])`."""
    return _load_benchmark


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny models run faster so, and do not fight other jobs for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fsm_quick_run(tmp_path_factory):
    """The quick FSM model, trained once for the whole session by `fsm_precision.py --quick` (slow tests only):
    `(out folder, results)`. Tests that need the quick model read it from here instead of training their own."""
    out = tmp_path_factory.mktemp("fsm_quick")
    results = _load_benchmark("fsm_precision").main(["--quick", "--out", str(out), "--no-progress"])
    return out, results
