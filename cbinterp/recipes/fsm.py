"""The FSM model of the paper as one recipe: the machine, the transformer, its data and its training phases.

recipe = FSMRecipe.paper()           # the default run of benchmarks/fsm_precision.py
recipe = FSMRecipe.quick()           # a small machine and model (tests, tutorial)
fsm, result = recipe.run(checkpoint_dir="out/checkpoints")
result.model, result.warm_model, result.control_model
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from cbinterp.core import tl_compat as tc
from cbinterp.core.tl_compat import Model
from cbinterp.recipes.codebook import CodebookRecipe, CodebookSpec, Phase, RecipeResult, run_recipe
from cbinterp.recipes.gpt import gpt_config
from cbinterp.tasks.fsm import FSM

__all__ = ["FSMRecipe"]

#: Data streams: each phase reads its own (k-means reads STREAM_KMEANS, evaluation should use others).
STREAM_WARM, STREAM_CODEBOOKS, STREAM_KMEANS, STREAM_SHORT = 0, 1, 2, 3


@dataclasses.dataclass
class FSMRecipe:
    """Machine, model shape, data shape and training of the FSM codebook model.

    `seed` seeds all of them (the machine, the weights, the codebooks and the data), so that seeds differ in
    everything."""

    n_states: int = 100
    n_edges: int = 10
    base: int = 10
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    seq_len: int = 128
    batch: int = 32
    #: The shape of the short-window stage's batches (stream STREAM_SHORT), which runs before the warm start.
    short_seq_len: int = 16
    short_batch: int = 64
    kmeans_sequences: int = 512
    training: CodebookRecipe = dataclasses.field(default_factory=lambda: FSMRecipe.paper_training())
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of n_heads {self.n_heads}.")
        if self.training.seed != self.seed:
            self.training = dataclasses.replace(self.training, seed=self.seed)

    # -- presets ----------------------------------------------------------------------------------------
    @staticmethod
    def paper_training(
        warm_steps: int = 2000,
        codebook_steps: int = 150,
        loss: str = "aeloss",
        n_codes: int = 1000,
        short_steps: int = 1000,
    ) -> CodebookRecipe:
        """The default training: short windows, a warm start, codebooks after every head and every MLP, end to end.

        The short-window stage (`short_steps` steps of `short_batch` x `short_seq_len` tokens) teaches the machine's
        transition table: in windows of a few states there is little to copy from the context, so the model must
        hold the table in its weights; the warm start then trains every position of the full context. 1000 codes,
        k=1, aeloss, k-means initialised; end to end, the model trains at a tenth of the codebooks' learning rate.
        `short_steps=0` leaves the short stage out."""
        short = [Phase("short", steps=short_steps, lr=3e-3, stream=STREAM_SHORT)] if short_steps else []
        return CodebookRecipe(
            pretrain=short,
            warm=Phase("warm", steps=warm_steps, lr=1e-3 if short else 3e-3, stream=STREAM_WARM),
            codebooks=CodebookSpec(sites=("attn", "mlp"), n_codes=n_codes, k=1, loss=loss),
            phases=[Phase("codebooks", steps=codebook_steps, lr=1e-4, codebook_lr=1e-3, stream=STREAM_CODEBOOKS)],
        )

    @classmethod
    def paper(cls, seed: int = 0, **overrides) -> FSMRecipe:
        """The paper's FSM (100 states, 10 edges, two digits per state), 4 layers x d_model 128, context 128."""
        return cls(seed=seed, **overrides)

    @classmethod
    def paper_scale(cls, seed: int = 0, **overrides) -> FSMRecipe:
        """The paper's own schedule for the model without codebooks: 20k steps of 512 sequences at a constant 1e-3.

        For a GPU (hours on a CPU). The codebook phase then trains 2000 steps of 512 sequences with the default
        recipe's learning rates; the paper instead trained each codebook model from scratch for 20k steps."""
        training = CodebookRecipe(
            warm=Phase(
                "warm",
                steps=20_000,
                lr=1e-3,
                stream=STREAM_WARM,
                warmup_steps=0,
                schedule="constant",
                weight_decay=0.0,
                checkpoint_every=500,
            ),
            codebooks=CodebookSpec(sites=("attn", "mlp"), n_codes=1000, k=1, loss="aeloss"),
            phases=[
                Phase("codebooks", steps=2000, lr=1e-4, codebook_lr=1e-3, stream=STREAM_CODEBOOKS, checkpoint_every=500)
            ],
        )
        return cls(seed=seed, **{"batch": 512, "kmeans_sequences": 1024, "training": training, **overrides})

    @classmethod
    def quick(cls, seed: int = 0, **overrides) -> FSMRecipe:
        """A 20-state machine and a 2-layer model, about 30 s on two CPU cores."""
        settings = dict(
            n_states=20,
            n_edges=4,
            n_layers=2,
            d_model=64,
            n_heads=4,
            d_mlp=256,
            seq_len=64,
            batch=64,
            kmeans_sequences=256,
            training=cls.paper_training(warm_steps=200, codebook_steps=150, n_codes=200, short_steps=0),
        )
        return cls(seed=seed, **{**settings, **overrides})

    # -- parts --------------------------------------------------------------------------------------------
    def fsm(self) -> FSM:
        """The recipe's random FSM (fixed by `n_states`, `n_edges`, `base` and `seed`)."""
        return FSM.random(self.n_states, self.n_edges, self.base, self.seed)

    def model_config(self, fsm: FSM, device: str | None = None) -> tc.HookedTransformerConfig:
        """The transformer's config for sequences of `fsm` (on `device`, default: cuda when present)."""
        shape = (self.n_layers, self.d_model, self.n_heads, self.d_mlp, self.seq_len, fsm.vocab_size)
        return gpt_config(*shape, seed=self.seed, device=device)

    def build_model(self, fsm: FSM, device: str | None = None) -> Model:
        """A freshly initialised transformer (seeded by `seed`) for sequences of `fsm`."""
        torch.manual_seed(self.seed)
        return tc.build_hooked(self.model_config(fsm, device))

    def batches(self, fsm: FSM) -> Callable[[int], Callable[[int], Tensor]]:
        """`batches(stream)(step)`: `batch` sequences of `seq_len` tokens, fixed by (seed, stream, step).

        Stream STREAM_SHORT gives `short_batch` sequences of `short_seq_len` tokens instead."""
        return lambda stream: fsm.token_batches(*self.batch_shape(stream), seed=self.data_seed(stream))

    def batch_shape(self, stream: int) -> tuple[int, int]:
        """`(sequences, tokens)` of one batch of data stream `stream`."""
        return (self.short_batch, self.short_seq_len) if stream == STREAM_SHORT else (self.batch, self.seq_len)

    def data_seed(self, stream: int) -> int:
        """The seed of data stream `stream` (warm start, codebooks, k-means ...) of this recipe's seed."""
        return 1000 * self.seed + stream

    def kmeans_tokens(self, fsm: FSM) -> Tensor:
        """`(kmeans_sequences, seq_len)` sampled tokens that initialise the codebooks by k-means."""
        return fsm.sample(self.kmeans_sequences, self.seq_len, self.data_seed(STREAM_KMEANS)).tokens

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per training step (`batch` sequences of `seq_len`) outside the short-window stage."""
        return self.batch * self.seq_len

    def phase_tokens_per_step(self, phase: Phase) -> int:
        """Input tokens per step of `phase` (by the shape of its stream)."""
        sequences, tokens = self.batch_shape(phase.stream)
        return sequences * tokens

    def run(
        self,
        checkpoint_dir: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
        compile: bool = False,
        **kwargs,
    ) -> tuple[FSM, RecipeResult]:
        """Build the machine and the model and train them through `training` (resuming from `checkpoint_dir`)."""
        fsm = self.fsm()
        model = self.build_model(fsm, device)
        result = run_recipe(
            model,
            self.batches(fsm),
            self.training,
            kmeans_tokens=self.kmeans_tokens(fsm),
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            compile=compile,
            **kwargs,
        )
        return fsm, result

    # -- records ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The recipe as plain JSON-ready data (`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FSMRecipe:
        """The recipe that `to_dict` wrote."""
        data = dict(data)
        training = CodebookRecipe.from_dict(data.pop("training"))
        return cls(**data, training=training)
