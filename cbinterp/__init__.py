"""cbinterp: codebook features for TransformerLens models."""

from cbinterp.codecache.features import token_positions
from cbinterp.codecache.queries import (
    code_contexts,
    code_fires,
    code_frequencies,
    codes_at,
    codes_for_token,
    cooccurrence,
    dead_codes,
    top_tokens,
)
from cbinterp.codecache.store import CodeCache, cache_codes
from cbinterp.core.attach import (
    SITE_HOOKS,
    attach_codebooks,
    codebooks_bypassed,
    codebooks_observed,
    counting_usage,
    detach_codebooks,
    get_codebooks,
    kmeans_init_codebooks,
)
from cbinterp.core.codebook import Codebook, CodebookConfig
from cbinterp.core.fastpath import fast_kernels
from cbinterp.core.interventions import (
    ablate_codes,
    force_codes,
    generate_with_codes,
    intervene,
    replace_codes,
    steering_hooks,
)
from cbinterp.core.io import load, load_codebook, load_codebooks, save, save_codebook, save_codebooks
from cbinterp.core.manifest import ResumeWarning
from cbinterp.core.train import TrainConfig, TrainResult, train
from cbinterp.metrics.probes import probe, search_codes
from cbinterp.pretrained import list_pretrained, load_pretrained
from cbinterp.viz.html import CodeContextView, context_view
from cbinterp.viz.plots import probe_figure

__all__ = [
    "fast_kernels",
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
    "codebooks_observed",
    "counting_usage",
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
    "list_pretrained",
    "load",
    "load_codebook",
    "load_codebooks",
    "load_pretrained",
    "probe",
    "probe_figure",
    "replace_codes",
    "ResumeWarning",
    "save",
    "save_codebook",
    "save_codebooks",
    "search_codes",
    "steering_hooks",
    "token_positions",
    "top_tokens",
    "train",
    "TrainConfig",
    "TrainResult",
]
__version__ = "0.1.0"
