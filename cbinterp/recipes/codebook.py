"""The codebook training recipe as data: warm start without codebooks, attach, k-means, train through them.

Any HookedTransformer and any batch source work: `run_recipe(model, batches, recipe, kmeans_tokens)`, where
`batches(stream)` returns a step-indexed batch function (`fn(step) -> tokens`) for data stream `stream` (each
phase names its stream, so phases see different data and a resumed phase sees the same data again).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from cbinterp.core.codebooks.attach import (
    attach_codebooks,
    get_codebooks,
    kmeans_init_codebooks,
    require_hooked_transformer,
)
from cbinterp.core.storage.atomic import recover_dir
from cbinterp.core.tl_compat import Model
from cbinterp.core.training import distributed as dd
from cbinterp.core.training.train import TRAINER_FILE, TrainConfig, TrainResult, train

#: `batches(stream)` -> `fn(step) -> tokens`: the data of one phase, the same tokens for the same step.
BatchSource = Callable[[int], Callable[[int], Tensor]]


@dataclasses.dataclass
class Phase:
    """One training phase: `steps` steps of `train` with these settings, on data stream `stream`."""

    name: str
    steps: int
    lr: float
    stream: int
    codebook_lr: float | None = None  # None: the model's lr
    freeze_model: bool = False  # train the codebooks only
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    cap_warmup: bool = True  # warm up for at most a tenth of the steps; False: `warmup_steps` as given
    checkpoint_every: int = 50
    seed: int | None = None  # None: the recipe's seed

    def train_config(self, seed: int, checkpoint_dir: Path | None, progress: bool, compile: bool) -> TrainConfig:
        """This phase's `TrainConfig`; `seed` is the recipe's (used unless the phase has its own)."""
        return TrainConfig(
            steps=self.steps,
            lr=self.lr,
            codebook_lr=self.codebook_lr,
            freeze_model=self.freeze_model,
            warmup_steps=min(self.warmup_steps, self.steps // 10) if self.cap_warmup else self.warmup_steps,
            schedule=self.schedule,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            checkpoint_every=self.checkpoint_every if checkpoint_dir is not None else 0,
            checkpoint_dir=str(checkpoint_dir / self.name) if checkpoint_dir is not None else None,
            compile=compile,
            seed=seed if self.seed is None else self.seed,
            progress=progress,
        )


@dataclasses.dataclass
class CodebookSpec:
    """Where the codebooks go and how they are built (`attach_codebooks` arguments) and initialised."""

    sites: tuple[str, ...] = ("attn", "mlp")
    n_codes: int = 1000
    k: int = 1
    loss: str = "aeloss"  # the paper's: the input gets no gradient from the reconstruction loss
    similarity: str = "inner_product"
    kmeans: bool = True
    kmeans_iters: int = 10
    #: After k-means, divide the codes by k: each centroid approximates the input alone, but the output sums k
    #: codes. The selection does not change (inner-product similarity scores x . c / |c|).
    kmeans_mean_of_k: bool = False


@dataclasses.dataclass
class CodebookRecipe:
    """Warm start (`warm`), then codebooks, then `phases` with the codebooks in place; optionally a control model.

    `warm` trains without codebooks (None: the model is already trained); `pretrain` phases, also without codebooks,
    run before it (e.g. a stage on shorter windows, each phase reading its own stream). With `control`, a copy of the
    warm-started
    model is trained without codebooks through every phase that trains the model (same steps, lr, data), so that
    "with codebooks" can be compared with a model that saw the same extra training; `controls` names the control's
    phases instead when they need names or settings of their own."""

    warm: Phase | None
    codebooks: CodebookSpec
    phases: list[Phase]
    control: bool = True
    seed: int = 0
    controls: list[Phase] | None = None  # None: each model-training phase, renamed control_<name>
    pretrain: list[Phase] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        names = [p.name for p in self.all_phases()]
        if len(set(names)) != len(names):
            raise ValueError(f"Phase names must be unique, got {names}.")
        if any(p.freeze_model for p in self.warm_phases()):
            raise ValueError("The warm phases train a model without codebooks; they cannot freeze the model.")
        if any(p.freeze_model for p in self.controls or []):
            raise ValueError("The control phases train a model without codebooks; they cannot freeze the model.")

    def warm_phases(self) -> list[Phase]:
        """The phases without codebooks, in the order they run: `pretrain`, then `warm`."""
        return list(self.pretrain) + ([self.warm] if self.warm else [])

    def all_phases(self) -> list[Phase]:
        """Every phase in the order they run: the warm start, the codebook phases, then the control's."""
        return self.warm_phases() + list(self.phases) + self.control_phases()

    def control_phases(self) -> list[Phase]:
        """The control model's phases.

        `controls`, or each codebook phase that trains the model, renamed `control_<name>`."""
        if not self.control:
            return []
        if self.controls is not None:
            return list(self.controls)
        return [dataclasses.replace(p, name=f"control_{p.name}") for p in self.phases if not p.freeze_model]

    def to_dict(self) -> dict:
        """The recipe as plain JSON-ready data (`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CodebookRecipe:
        """The recipe that `to_dict` wrote."""
        warm = Phase(**data["warm"]) if data.get("warm") else None
        spec = CodebookSpec(**{**data["codebooks"], "sites": tuple(data["codebooks"]["sites"])})
        phases = [Phase(**p) for p in data["phases"]]
        controls = [Phase(**p) for p in data["controls"]] if data.get("controls") is not None else None
        pretrain = [Phase(**p) for p in data.get("pretrain", [])]
        return cls(warm, spec, phases, data.get("control", True), data.get("seed", 0), controls, pretrain)


@dataclasses.dataclass
class RecipeResult:
    """The trained models and what each phase did.

    `warm_model` is a copy of the model after the warm start, `control_model` that copy trained further without
    codebooks (None without `recipe.control`)."""

    model: Model
    warm_model: Model
    control_model: Model | None
    losses: dict[str, list[float]]
    steps: dict[str, int]
    tokens: dict[str, int]
    seconds: dict[str, float]
    kmeans_initialised: bool


def run_recipe(
    model: Model,
    batches: BatchSource,
    recipe: CodebookRecipe,
    kmeans_tokens: Tensor | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    compile: bool = False,
    log: Callable[[str], None] | None = None,
    after_phase: Callable[[str, Model], None] | None = None,
    on_trained: Callable[[str, TrainResult, float], None] | None = None,
) -> RecipeResult:
    """Run `recipe` on `model` (changed in place: it ends with codebooks, trained).

    Args:
        batches: `batches(stream)(step) -> tokens`.
        kmeans_tokens: the tokens whose activations initialise the codebooks (required when
            `recipe.codebooks.kmeans`); skipped when resuming a codebook phase, whose checkpoint holds the codes.
        checkpoint_dir: each phase checkpoints under `<dir>/<phase name>` and resumes from there.
        after_phase: called as `after_phase(name, model)` after each phase (e.g. to evaluate), and as
            `after_phase("attached", model)` once the codebooks are attached and initialised.
        on_trained: called as `on_trained(name, train_result, seconds)` as soon as a phase's training ends, before
            `after_phase` (e.g. to record how many steps this run took and how long).
    """
    require_hooked_transformer(model)
    if log is None:  # under torchrun, rank 0 alone reports
        log = (lambda message: print(message, flush=True)) if dd.is_main() else (lambda message: None)
    spec = recipe.codebooks
    if spec.kmeans and kmeans_tokens is None:
        raise ValueError("recipe.codebooks.kmeans is set: pass kmeans_tokens (the tokens k-means reads).")
    root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    losses, steps, tokens, seconds = {}, {}, {}, {}

    def run_phase(phase: Phase, target: Model) -> None:
        start = time.perf_counter()
        fn = batches(phase.stream)
        result = train(target, fn, phase.train_config(recipe.seed, root, progress, compile))
        losses[phase.name], steps[phase.name] = result.losses, phase.steps
        tokens[phase.name] = phase.steps * int(fn(0).numel())
        seconds[phase.name] = time.perf_counter() - start
        log(f"phase {phase.name}: {phase.steps} steps, {tokens[phase.name]:,} tokens, {seconds[phase.name]:.0f} s")
        if on_trained is not None:
            on_trained(phase.name, result, seconds[phase.name])
        if after_phase is not None:
            after_phase(phase.name, target)

    for phase in recipe.warm_phases():
        run_phase(phase, model)
    warm_model = copy.deepcopy(model)
    attach_codebooks(
        model,
        sites=list(spec.sites),
        n_codes=spec.n_codes,
        k=spec.k,
        seed=recipe.seed,
        loss=spec.loss,
        similarity=spec.similarity,
    )
    resuming = resumes_codebook_phases(recipe, root)  # a resumed run loads its codes from the checkpoint
    kmeans_done = False
    if spec.kmeans and not resuming:
        start = time.perf_counter()
        # raw centroids, divided once all are fitted: the codes the shipped models were trained from
        kmeans_init_codebooks(
            model, kmeans_tokens, iters=spec.kmeans_iters, seed=recipe.seed, progress=progress, mean_of_k=False
        )
        if spec.kmeans_mean_of_k:
            with torch.no_grad():
                for codebook in get_codebooks(model).values():
                    codebook.weight.div_(codebook.k)
        seconds["kmeans"] = time.perf_counter() - start
        tokens["kmeans"] = int(kmeans_tokens.numel())
        kmeans_done = True
    if after_phase is not None:
        after_phase("attached", model)
    for phase in recipe.phases:
        run_phase(phase, model)
    control_model = None
    if recipe.control:
        control_model = copy.deepcopy(warm_model)
        for phase in recipe.control_phases():
            run_phase(phase, control_model)
    return RecipeResult(model, warm_model, control_model, losses, steps, tokens, seconds, kmeans_done)


def resumes_codebook_phases(recipe: CodebookRecipe, checkpoint_dir: str | Path | None) -> bool:
    """Whether `run_recipe` with this `checkpoint_dir` resumes a codebook phase (and so skips k-means)."""
    if checkpoint_dir is None:
        return False
    return any((recover_dir(Path(checkpoint_dir) / p.name) / TRAINER_FILE).exists() for p in recipe.phases)


def phases_summary(recipe: CodebookRecipe, tokens_per_step: int | Callable[[Phase], int]) -> list[dict]:
    """Per phase: name, steps, tokens, lr, codebook lr, frozen model (for reports).

    Args:
        tokens_per_step: the tokens of one step, or `tokens_per_step(phase)` where phases read batches of other
            shapes."""
    per_step = tokens_per_step if callable(tokens_per_step) else lambda phase: tokens_per_step
    return [
        {
            "phase": p.name,
            "steps": p.steps,
            "tokens": p.steps * per_step(p),
            "lr": p.lr,
            "codebook_lr": p.codebook_lr,
            "freeze_model": p.freeze_model,
        }
        for p in recipe.all_phases()
    ]


__all__: Sequence[str] = [
    "BatchSource",
    "CodebookRecipe",
    "CodebookSpec",
    "Phase",
    "RecipeResult",
    "resumes_codebook_phases",
    "run_recipe",
]
