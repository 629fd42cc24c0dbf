#!/usr/bin/env bash
# The second TransformerLens environment: builds (once) a venv with transformer-lens 4.3.0 beside the pinned 3.9.0
# one, installs cbinterp into it without touching its pins, and runs the fast tier there. Idempotent: a venv whose
# marker names the same versions is reused. Usage: tools/tl_other_env.sh [venv dir] [pytest args...]
set -euo pipefail
VENV="${1:-/tmp/cbinterp-tl4}"
shift || true
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TORCH=2.13.0
TL=4.3.0
MARK="$VENV/.cbinterp-tl-env"
WANT="torch=$TORCH transformer-lens=$TL"
if [[ ! -f "$MARK" || "$(cat "$MARK")" != "$WANT" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==$TORCH"
    "$VENV/bin/pip" install -q "transformer-lens==$TL"
    "$VENV/bin/pip" install -q -e "$ROOT" --no-deps
    "$VENV/bin/pip" install -q "safetensors>=0.4" "tqdm>=4.66" "jaxtyping>=0.2.25" "plotly>=5.18" "tokenizers>=0.21" \
        "pandas>=2.0" "einops>=0.7" "numpy>=1.24" "pytest>=8" "hypothesis>=6.100" beartype
    echo "$WANT" > "$MARK"
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -m "not slow" -q "$@"
