"""The settings of the codebook language model's three phases (`LMRecipe`) and each phase's training settings.

`LMRecipe.codebook_recipe()` states the phases in the terms of the phase runner (`cbinterp.recipes.codebook`):
(a) ``baseline`` is the warm start, (b) ``codebook`` the one codebook phase and (c) ``finetuned`` its control, which
trains a copy of (a) on (b)'s batches with (b)'s schedule.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cbinterp.core import tl_compat as tc
from cbinterp.core.device import default_device
from cbinterp.core.training.train import TrainConfig
from cbinterp.recipes.codebook import CodebookRecipe, CodebookSpec, Phase
from cbinterp.recipes.flat import FlatRecipe
from cbinterp.recipes.gpt import gpt_config

__all__ = ["PHASES", "STREAM_BASELINE", "STREAM_CONTINUED", "LMRecipe", "default_device", "train_config"]

PHASES = ("baseline", "codebook", "finetuned")
#: Data streams of the phase runner: (a) reads the training batches from the first; (b) and (c) both read the
#: batches that follow (a)'s, as one uninterrupted run would.
STREAM_BASELINE, STREAM_CONTINUED = 0, 1


@dataclasses.dataclass(frozen=True)
class LMRecipe(FlatRecipe):
    """Every setting of the three phases. `paper()` is the default run, `quick()` a seconds-long one for tests.

    The model is a GPT-style HookedTransformer (pre-LayerNorm, GELU, rotary positions, d_head = d_model / n_heads)
    with context `seq_len`. Phases (b) and (c) both run `codebook_steps` steps at `codebook_lr`.
    """

    # model
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    act_fn: str = "gelu"
    positional_embedding_type: str = "rotary"
    vocab_size: int = 4096
    # data
    seq_len: int = 128
    batch_size: int = 32
    # (a)
    base_steps: int = 600
    base_lr: float = 3e-3
    base_warmup: int = 60
    # (b) and (c)
    codebook_steps: int = 250
    codebook_lr: float = 1e-3
    codebook_warmup: int = 25
    # codebooks
    sites: tuple[str, ...] = ("attn",)
    n_codes: int = 1024
    k: int = 8
    loss: str = "aeloss"
    kmeans_sequences: int = 256
    kmeans_iters: int = 10
    #: After k-means, divide the codes by k: k-means centroids approximate the activation one at a time, but the
    #: forward pass sums k of them, so undivided the first output is about k times too large. The selection does
    #: not change (inner-product similarity scores x . c / |c|).
    kmeans_mean_of_k: bool = True
    # training and evaluation
    weight_decay: float = 0.01
    checkpoint_every: int = 200
    eval_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_shared(
            ("n_layers", "d_model", "n_heads", "d_mlp", "batch_size", "n_codes", "k", "kmeans_sequences"),
            ("base_steps", "codebook_steps", "base_warmup", "codebook_warmup", "kmeans_iters", "seed"),
        )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}.")
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size must be >= 257 (256 bytes plus <|endoftext|>), got {self.vocab_size}.")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (BOS plus a token), got {self.seq_len}.")

    @classmethod
    def paper(cls, **overrides) -> LMRecipe:
        """The default run: the paper's LM setting (attention codebooks, k = 8, aeloss) sized for 30 CPU minutes."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides) -> LMRecipe:
        """A run of seconds on a few hundred thousand characters, for tests and smoke runs."""
        settings = dict(
            n_layers=1,
            d_model=64,
            n_heads=4,
            d_mlp=256,
            vocab_size=512,
            seq_len=64,
            batch_size=16,
            base_steps=120,
            base_warmup=10,
            codebook_steps=40,
            codebook_warmup=5,
            n_codes=64,
            k=4,
            kmeans_sequences=64,
            kmeans_iters=5,
            checkpoint_every=40,
        )
        return cls(**{**settings, **overrides})

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per training step (batch_size windows of seq_len tokens, BOS included)."""
        return self.batch_size * self.seq_len

    def codebook_recipe(self) -> CodebookRecipe:
        """The three phases as the phase runner's recipe (`run_recipe`).

        (a) is the warm start on stream `STREAM_BASELINE`, (b) the codebook phase and (c) its control, both on
        `STREAM_CONTINUED`."""

        def phase(name: str, stream: int) -> Phase:
            first = name == "baseline"
            return Phase(
                name,
                steps=self.base_steps if first else self.codebook_steps,
                lr=self.base_lr if first else self.codebook_lr,
                stream=stream,
                warmup_steps=self.base_warmup if first else self.codebook_warmup,
                cap_warmup=False,
                weight_decay=self.weight_decay,
                checkpoint_every=self.checkpoint_every,
                seed=self.seed + PHASES.index(name),  # each phase its own seed, as before the phase runner
            )

        shared = ("sites", "n_codes", "k", "loss", "kmeans_iters", "kmeans_mean_of_k")  # CodebookSpec's names too
        spec = CodebookSpec(**{name: getattr(self, name) for name in shared})  # with k-means, its default
        return CodebookRecipe(
            warm=phase("baseline", STREAM_BASELINE),
            codebooks=spec,
            phases=[phase("codebook", STREAM_CONTINUED)],
            controls=[phase("finetuned", STREAM_CONTINUED)],
            seed=self.seed,
        )

    def model_config(self, d_vocab: int, device: str | None = None) -> tc.HookedTransformerConfig:
        """The transformer's config for a vocabulary of `d_vocab` ids (on `device`, default: cuda when present)."""
        shape = (self.n_layers, self.d_model, self.n_heads, self.d_mlp, self.seq_len, d_vocab)
        settings = dict(act_fn=self.act_fn, positional_embedding_type=self.positional_embedding_type)
        return gpt_config(*shape, seed=self.seed, device=device, **settings)


def train_config(
    recipe: LMRecipe, phase: str, checkpoint_dir: str | Path | None = None, progress: bool = True
) -> TrainConfig:
    """The `TrainConfig` of `phase` ("baseline", "codebook" or "finetuned"); (b) and (c) differ only in the seed.

    `checkpoint_dir` is the phase's own folder (`run_lm` uses ``<out>/checkpoints/<phase>``)."""
    if phase not in PHASES:
        raise ValueError(f"Unknown phase {phase!r}; phases are {PHASES}.")
    spec = {p.name: p for p in recipe.codebook_recipe().all_phases()}[phase]
    cfg = spec.train_config(recipe.seed, None, progress, compile=False)
    if checkpoint_dir is None:
        return cfg
    return dataclasses.replace(cfg, checkpoint_every=spec.checkpoint_every, checkpoint_dir=str(checkpoint_dir))
