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
from cbinterp.serialization import load, save

__all__ = [
    "SITE_HOOKS",
    "Codebook",
    "CodeCache",
    "CodebookConfig",
    "ablate_codes",
    "attach_codebooks",
    "cache_codes",
    "codebooks_bypassed",
    "detach_codebooks",
    "force_codes",
    "generate_with_codes",
    "get_codebooks",
    "intervene",
    "kmeans_init_codebooks",
    "load",
    "replace_codes",
    "save",
    "steering_hooks",
]
__version__ = "0.1.0"
