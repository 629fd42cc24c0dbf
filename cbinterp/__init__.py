"""cbinterp: codebook features for TransformerLens models."""

from cbinterp.attach import (
    SITE_HOOKS,
    attach_codebooks,
    codebooks_bypassed,
    detach_codebooks,
    get_codebooks,
    kmeans_init_codebooks,
)
from cbinterp.cache import CodeCache, cache_codes
from cbinterp.codebook import Codebook, CodebookConfig
from cbinterp.interventions import (
    ablate_codes,
    force_codes,
    generate_with_codes,
    intervene,
    replace_codes,
    steering_hooks,
)
from cbinterp.probes import probe, probe_figure, token_positions
from cbinterp.queries import (
    code_contexts,
    code_fires,
    code_frequencies,
    codes_at,
    codes_for_token,
    cooccurrence,
    dead_codes,
    search_codes,
    top_tokens,
)
from cbinterp.serialization import load, save
from cbinterp.views import CodeContextView, context_view

__all__ = [
    "CodeContextView",
    "context_view",
    "SITE_HOOKS",
    "Codebook",
    "CodeCache",
    "CodebookConfig",
    "ablate_codes",
    "attach_codebooks",
    "cache_codes",
    "code_contexts",
    "code_fires",
    "code_frequencies",
    "codebooks_bypassed",
    "codes_at",
    "codes_for_token",
    "cooccurrence",
    "dead_codes",
    "detach_codebooks",
    "force_codes",
    "generate_with_codes",
    "get_codebooks",
    "intervene",
    "kmeans_init_codebooks",
    "load",
    "probe",
    "probe_figure",
    "replace_codes",
    "save",
    "search_codes",
    "steering_hooks",
    "token_positions",
    "top_tokens",
]
__version__ = "0.1.0"
