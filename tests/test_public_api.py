"""The public surface: `cbinterp` lists every public name and loads it lazily; every name the README and the
tutorials import comes from where they say; every public module says what it exports (`__all__`)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cbinterp

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
#: `from cbinterp[.x.y] import a, b as c` on one line or in brackets over several.
FROM_IMPORT = re.compile(r"^[ \t]*from\s+(cbinterp(?:\.\w+)*)\s+import\s+(\([^)]*\)|[^\n#]+)", re.M)


def _imports(text: str) -> list[tuple[str, str]]:
    """(module, name) of every `from cbinterp... import name` in `text`."""
    pairs = []
    for module, names in FROM_IMPORT.findall(text):
        for item in names.strip("()").replace("\\\n", " ").split(","):
            name = item.split("#")[0].split(" as ")[0].strip()
            if name:
                pairs.append((module, name))
    return pairs


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _documented_imports() -> list[tuple[str, str, str]]:
    found = [("README.md", m, n) for m, n in _imports(README.read_text(encoding="utf-8"))]
    for path in TUTORIALS:
        found += [(f"tutorials/{path.name}", m, n) for m, n in _imports(_notebook_code(path))]
    return sorted(set(found))


def _public_modules() -> list[str]:
    names = ["cbinterp"]
    for info in pkgutil.walk_packages(cbinterp.__path__, "cbinterp."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def test_the_parser_reads_one_line_and_bracketed_imports():
    text = (
        "from cbinterp import a, b as c  # note\nx = 1\n    from cbinterp.core.storage.io import (\n    d,\n    e,\n)\n"
    )
    assert _imports(text) == [
        ("cbinterp", "a"),
        ("cbinterp", "b"),
        ("cbinterp.core.storage.io", "d"),
        ("cbinterp.core.storage.io", "e"),
    ]


def test_the_readme_and_tutorials_import_something():
    sources = {source for source, _, _ in _documented_imports()}
    assert sources == {"README.md", *(f"tutorials/{p.name}" for p in TUTORIALS)} and len(TUTORIALS) >= 3


@pytest.mark.parametrize("source,module,name", _documented_imports(), ids=lambda x: str(x))
def test_every_documented_import_works(source, module, name):
    assert hasattr(importlib.import_module(module), name), f"{source}: `from {module} import {name}` fails"


def test_the_layout_table_names_import_from_cbinterp():
    """The layout table (docs/architecture.md) promises that `from cbinterp import ...` gives each name it lists."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text[text.index("## Layout") :]
    table = table[: table.index("\n## ")]
    missing = []
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or "cbinterp/" not in cells[1]:
            continue
        folder, modules = "", []
        for path in re.findall(r"[\w/]+\.py", cells[1]):  # `cbinterp/core/storage/io.py`, `manifest.py` (same folder)
            folder = path.rpartition("/")[0] if "/" in path else folder
            modules.append(f"{folder}/{path.rpartition('/')[2]}"[:-3].replace("/", "."))
        exported = {n for m in modules for n in getattr(importlib.import_module(m), "__all__", ())}
        for name in re.findall(r"`([A-Za-z_]\w*)`", cells[2]):
            if name in exported and name not in cbinterp.__all__:
                missing.append(f"{name} ({', '.join(modules)})")
    assert missing == []


def test_import_cbinterp_imports_no_heavy_dependency():
    code = (
        "import sys, cbinterp; "
        "print([m for m in ('torch', 'transformer_lens', 'numpy', 'pandas', 'plotly') if m in sys.modules])"
    )
    # run beside the package under test, whichever checkout an editable install points at
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(cbinterp.__file__).parents[1], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_name_is_listed_once_and_is_its_modules_own():
    listed = [name for names in cbinterp._EXPORTS.values() for name in names]
    assert len(listed) == len(set(listed)) == len(cbinterp.__all__)
    for module_name, names in cbinterp._EXPORTS.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert getattr(cbinterp, name) is getattr(module, name)
            assert name in module.__all__, f"{module_name}.__all__ lacks {name}"


def test_dir_lists_every_name_and_unknown_names_raise():
    assert set(cbinterp.__all__) <= set(dir(cbinterp)) and "pretrained" in dir(cbinterp)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        cbinterp.no_such_name  # noqa: B018
    assert not hasattr(cbinterp, "torch")
    assert cbinterp.pretrained is importlib.import_module("cbinterp.pretrained")


@pytest.mark.parametrize("module_name", _public_modules())
def test_every_public_module_says_what_it_exports(module_name):
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    assert isinstance(names, list), f"{module_name} has no __all__"
    assert len(names) == len(set(names)), f"{module_name}.__all__ lists a name twice"
    assert [n for n in names if not hasattr(module, n)] == [], f"{module_name}.__all__ names what it lacks"
