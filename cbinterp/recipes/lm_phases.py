"""The parts of the codebook language model's run, one library call each.

Tokenizer, model, batches, codebooks, and each phase trained on its own. `run_lm` runs the phases through the phase
runner, `run_recipe`, instead; both take their settings from `LMRecipe.codebook_recipe()`, so they train the same
models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from cbinterp.core import tl_compat as tc
from cbinterp.core.codebooks.attach import attach_codebooks, get_codebooks, kmeans_init_codebooks
from cbinterp.core.storage.atomic import recover_dir
from cbinterp.core.tl_compat import Model
from cbinterp.core.training.train import TrainResult, is_checkpoint, train
from cbinterp.recipes.codebook import BatchSource
from cbinterp.recipes.lm_recipe import STREAM_BASELINE, STREAM_CONTINUED, LMRecipe, train_config
from cbinterp.tasks.text import TextBatches, TextSource, attach_tokenizer, train_bpe_tokenizer

__all__ = [
    "add_codebooks",
    "batch_source",
    "build_model",
    "finetune_baseline",
    "kmeans_tokens",
    "train_baseline",
    "train_batches",
    "train_codebook_model",
    "train_tokenizer",
]


def train_tokenizer(
    recipe: LMRecipe, train_texts: TextSource, directory: str | Path | None = None
) -> PreTrainedTokenizerBase:
    """A byte-level BPE of `recipe.vocab_size` tokens trained on `train_texts` (the training split only)."""
    return train_bpe_tokenizer(train_texts, recipe.vocab_size, seed=recipe.seed, directory=directory)


def build_model(recipe: LMRecipe, tokenizer: PreTrainedTokenizerBase, device: str | None = None):
    """A freshly initialised (seeded) HookedTransformer for `recipe`, with `tokenizer` attached."""
    d_vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    torch.manual_seed(recipe.seed)
    model = tc.build_hooked(recipe.model_config(d_vocab, device))
    return attach_tokenizer(model, tokenizer)


def train_batches(
    recipe: LMRecipe, texts: TextSource, tokenizer: PreTrainedTokenizerBase, model: Model | None = None
) -> TextBatches:
    """The training windows (BOS + seq_len - 1 tokens, documents joined by <|endoftext|>), seeded batches."""
    return TextBatches.from_texts(texts, tokenizer, recipe.seq_len, recipe.batch_size, seed=recipe.seed, model=model)


def _continued(batches: Callable[[int], Tensor], start: int) -> Callable[[int], Tensor]:
    """The batches that follow the first `start` ones."""
    return lambda step: batches(start + step)


def batch_source(batches: TextBatches, recipe: LMRecipe) -> BatchSource:
    """The phase runner's data streams: `STREAM_BASELINE` starts at batch 0, `STREAM_CONTINUED` where (a) stopped."""
    starts = {STREAM_BASELINE: 0, STREAM_CONTINUED: recipe.base_steps}

    def stream(index: int) -> Callable[[int], Tensor]:
        if index not in starts:
            raise ValueError(f"The LM recipe has data streams {sorted(starts)}, not {index}.")
        return _continued(batches, starts[index])

    return stream


def kmeans_tokens(batches: TextBatches, recipe: LMRecipe) -> Int[Tensor, "rows pos"]:
    """`recipe.kmeans_sequences` training windows (a seeded sample) on which the codebooks are initialised."""
    generator = torch.Generator().manual_seed(recipe.seed + 17)
    pick = torch.randperm(batches.n_sequences, generator=generator)[: recipe.kmeans_sequences]
    return batches.sequences[pick].long()


def add_codebooks(model: Model, recipe: LMRecipe, init_tokens: Tensor | None = None, progress: bool = False) -> Model:
    """Attach the recipe's codebooks; with `init_tokens`, initialise them by k-means on their inputs there."""
    spec = recipe.codebook_recipe().codebooks
    attach_codebooks(model, sites=list(spec.sites), n_codes=spec.n_codes, k=spec.k, seed=recipe.seed,
                     loss=spec.loss, similarity=spec.similarity)  # fmt: skip
    if init_tokens is not None:
        # raw centroids, divided once all are fitted: the codes the shipped models were trained from
        kmeans_init_codebooks(model, init_tokens, iters=spec.kmeans_iters, seed=recipe.seed, progress=progress,
                              mean_of_k=False)  # fmt: skip
        if spec.kmeans_mean_of_k:
            with torch.no_grad():
                for codebook in get_codebooks(model).values():
                    codebook.weight.div_(codebook.k)
    return model


def train_baseline(
    model: Model,
    batches: TextBatches,
    recipe: LMRecipe,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Phase (a): train `model` (no codebooks) for `recipe.base_steps` on batches 0 .. base_steps - 1."""
    return _train_phase(model, batches, recipe, "baseline", checkpoint_dir, progress, plain="train_baseline")


def train_codebook_model(
    model: Model,
    batches: TextBatches,
    recipe: LMRecipe,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_init: Callable[[Model], None] | None = None,
) -> TrainResult:
    """Phase (b): attach codebooks to the trained baseline `model` (in place), initialise them, train end to end.

    The codebooks are k-means initialised (unless a checkpoint is resumed: it holds the codes), then trained for
    `recipe.codebook_steps` on the batches after (a)'s. `on_init(model)` is called after initialisation, before
    training (e.g. to evaluate it)."""
    resuming = checkpoint_dir is not None and is_checkpoint(recover_dir(Path(checkpoint_dir)))
    add_codebooks(model, recipe, None if resuming else kmeans_tokens(batches, recipe), progress=progress)
    if on_init is not None and not resuming:
        on_init(model)
    return _train_phase(model, batches, recipe, "codebook", checkpoint_dir, progress)


def finetune_baseline(
    model: Model,
    batches: TextBatches,
    recipe: LMRecipe,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Phase (c): train the baseline `model` (no codebooks) as long as (b), on (b)'s batches and schedule."""
    return _train_phase(model, batches, recipe, "finetuned", checkpoint_dir, progress, plain="finetune_baseline")


def _train_phase(
    model: Model,
    batches: TextBatches,
    recipe: LMRecipe,
    phase: str,
    checkpoint_dir: str | Path | None,
    progress: bool,
    plain: str | None = None,
) -> TrainResult:
    """Train `model` as `phase` of `recipe`, on that phase's data stream and with its `train_config`.

    `plain`: the public caller's name, for the phases that train a model without codebooks (checked)."""
    if plain is not None and get_codebooks(model):
        raise ValueError(f"{plain} trains a model without codebooks; this one has some.")
    stream = {spec.name: spec.stream for spec in recipe.codebook_recipe().all_phases()}[phase]
    return train(model, batch_source(batches, recipe)(stream), train_config(recipe, phase, checkpoint_dir, progress))
