"""The README's Python snippets run as written, in order, in one namespace (as a reader pastes them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_snippets():
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 2


@pytest.mark.needs_hooked  # the quick start on a bridge: tools/quickstart_bridge.py, run by test_quickstart_bridge
def test_readme_snippets_run(one_thread):
    namespace: dict = {}
    for i, block in enumerate(python_blocks(README.read_text(encoding="utf-8"))):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # name the block, so a broken snippet is easy to find
            pytest.fail(f"README python block {i} failed: {type(err).__name__}: {err}\n{block}")
