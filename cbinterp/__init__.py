"""cbinterp: codebook features for TransformerLens models."""

from cbinterp.attach import (
    SITE_HOOKS,
    attach_codebooks,
    codebooks_bypassed,
    detach_codebooks,
    get_codebooks,
    kmeans_init_codebooks,
)
from cbinterp.codebook import Codebook, CodebookConfig
from cbinterp.serialization import load, save

__all__ = [
    "SITE_HOOKS",
    "Codebook",
    "CodebookConfig",
    "attach_codebooks",
    "codebooks_bypassed",
    "detach_codebooks",
    "get_codebooks",
    "kmeans_init_codebooks",
    "load",
    "save",
]
__version__ = "0.1.0"
