#!/usr/bin/env bash
# The second TransformerLens environment, for CI: the fast tier (-m "not slow") on transformer-lens 4.3, beside the
# main environment's pinned 3.9 (`make test`). Like the Makefile's .venv, the venv is built once, from pyproject.toml
# and requirements/constraints-tl4.txt with pip's normal resolution (cbinterp installed with its dependencies and the
# dev extras, as a user's `pip install cbinterp` next to transformer-lens 4.3 would), and rebuilt only when either
# file changed. Tests that need a HookedTransformer skip there with the reason (the needs_hooked marker).
#
# Usage: tools/tl_other_env.sh [pytest args...]     (venv: $CBINTERP_TL4_VENV, default .venv-tl4 in the repository)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${CBINTERP_TL4_VENV:-$ROOT/.venv-tl4}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/requirements/constraints-tl4.txt"
STAMP="$VENV/.cbinterp-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
cd "$ROOT"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    # torch first, alone: the CPU build pinned in the constraints (an unpinned torch pulls a CUDA build of several GB)
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" torch
    "$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -e ".[dev]"
    "$VENV/bin/python" -m pip check
    echo "$WANT" > "$STAMP"
fi
"$VENV/bin/python" -c 'import transformer_lens.model_bridge, importlib.metadata as m; print("transformer-lens", m.version("transformer-lens"))'
exec "$VENV/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider "$@"
