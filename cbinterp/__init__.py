"""cbinterp: codebook features for TransformerLens models.

Every public name is importable from here (`from cbinterp import attach_codebooks, cache_codes`); `_EXPORTS` below is
the one list of them, each under the module the README's layout table names for it (its own, or the module that
gathers a topic, such as `cbinterp.tasks.text`). Names load on first use (PEP 562), so `import cbinterp` is
instant and imports neither torch nor TransformerLens; `cbinterp.<subpackage>` loads that subpackage the same way.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: module -> the public names it gives `cbinterp` (each also in that module's `__all__`), in the README's order.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "cbinterp.core.codebooks.codebook": ("Codebook", "CodebookConfig"),
    "cbinterp.core.codebooks.attach": (
        "SITE_HOOKS",
        "attach_codebooks",
        "codebooks_bypassed",
        "codebooks_observed",
        "counting_usage",
        "detach_codebooks",
        "get_codebooks",
        "kmeans_init_codebooks",
    ),
    "cbinterp.core.codebooks.interventions": (
        "ablate_codes",
        "force_codes",
        "generate_with_codes",
        "intervene",
        "replace_codes",
        "steering_hooks",
    ),
    "cbinterp.core.training.train": ("TrainConfig", "TrainResult", "train"),
    "cbinterp.core.training.fastpath": ("fast_kernels",),
    "cbinterp.core.training.determinism": ("deterministic_on_cpu",),
    "cbinterp.core.training.distributed": ("CodebookStepSync", "init_from_env", "is_main"),
    "cbinterp.core.training.loggers": ("JSONLLogger", "WandbLogger"),
    "cbinterp.core.storage.io": ("load", "load_codebook", "load_codebooks", "save", "save_codebook", "save_codebooks"),
    "cbinterp.core.storage.manifest": ("ResumeWarning",),
    "cbinterp.core.storage.atomic": ("atomic_dir", "atomic_file"),
    "cbinterp.core.storage.tokenizer": ("attach_tokenizer", "load_tokenizer", "save_tokenizer"),
    "cbinterp.core.codebooks.codes": ("NO_CODE", "dedupe_codes"),
    "cbinterp.codecache.store": ("CodeCache", "cache_codes"),
    "cbinterp.codecache.activation_cache": ("cached_codes",),
    "cbinterp.codecache.queries": (
        "code_contexts",
        "code_fires",
        "code_frequencies",
        "codes_at",
        "codes_for_token",
        "cooccurrence",
        "dead_codes",
        "top_tokens",
    ),
    "cbinterp.codecache.vocab": ("Vocabulary",),
    "cbinterp.codecache.features": ("token_positions",),
    "cbinterp.codecache.documents": ("cache_documents",),
    "cbinterp.metrics.probes": ("probe", "search_codes"),
    "cbinterp.metrics.heldout": ("probe_heldout",),
    "cbinterp.metrics.steering": ("steering_codes", "topic_codes"),
    "cbinterp.metrics.window_codes": (
        "best_window_codes",
        "text_windows",
        "topic_window_codes",
        "window_codes",
        "window_steering_codes",
    ),
    "cbinterp.tasks.source_classifier": ("SourceClassifier",),
    "cbinterp.dictionaries.sae": ("SAEConfig", "SparseAutoencoder", "load_sae", "save_sae"),
    "cbinterp.dictionaries.sae_train": ("SAETrainConfig", "train_sae"),
    "cbinterp.dictionaries.sae_hooks": ("attach_saes", "cache_latents", "detach_saes", "force_latent", "get_saes"),
    "cbinterp.viz.plots": (
        "code_frequency_figure",
        "code_vs_neuron_figure",
        "heldout_probe_figure",
        "precision_recall_figure",
        "probe_figure",
        "state_code_figure",
    ),
    "cbinterp.viz.html": ("CodeContextView", "context_view"),
    "cbinterp.tasks.fsm": ("FSM", "sampled_state_accuracy", "teacher_forced_transition_accuracy"),
    "cbinterp.tasks.corpus": ("load_corpus", "split_halves"),
    "cbinterp.tasks.text": (
        "StreamingTextBatches",
        "TextBatches",
        "iter_texts",
        "pack_documents",
        "tokenize_documents",
        "train_bpe_tokenizer",
    ),
    "cbinterp.recipes.codebook": ("CodebookRecipe", "CodebookSpec", "Phase", "run_recipe"),
    "cbinterp.recipes.fsm": ("FSMRecipe",),
    "cbinterp.recipes.lm": ("LMRecipe", "run_lm"),
    "cbinterp.recipes.finetune": ("FinetuneRecipe", "FinetuneResult", "finetune_codebooks"),
    "cbinterp.pretrained": ("heldout_documents", "list_pretrained", "load_pretrained", "pretrained_card"),
    "cbinterp.models.from_hf": ("SUPPORTED_ARCHITECTURES", "from_hf"),
    "cbinterp.models.to_hf": ("to_hf",),
    "cbinterp.models.hooked_as_bridge": ("bridge_name", "hooked_names"),
    "cbinterp.models.codebook_features": ("from_codebook_features",),
    "cbinterp.core.search.blocks": ("search_block_rows",),
    "cbinterp.core.checks": ("check_token_ids",),
}
_MODULE_OF: dict[str, str] = {name: module for module, names in _EXPORTS.items() for name in names}
#: Subpackages and modules reachable as attributes (`cbinterp.pretrained.DEFAULT_MODEL`) after `import cbinterp`.
_SUBMODULES = ("codecache", "core", "metrics", "models", "pretrained", "recipes", "reporting", "tasks", "viz")

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
