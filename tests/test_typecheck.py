"""Core paths run with every annotation checked at run time (jaxtyping + beartype), in a fresh interpreter.

`from __future__ import annotations` does not stop this: beartype resolves the string annotations in each module's
namespace, and jaxtyping binds axis names across one call's arguments and return value. What the checks need from
the code: `torch.library` operators are exempt (`typing.no_type_check`), since a wrapper would hide the annotations
their schema is read from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "_typecheck_paths.py"


@pytest.mark.slow
def test_core_paths_pass_their_annotations_checked_at_run_time():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.stdout + result.stderr)[-6000:]
