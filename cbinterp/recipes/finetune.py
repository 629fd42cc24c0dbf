"""The paper's recipe for a pretrained model in one call: `finetune_codebooks(model, data, FinetuneRecipe(...))`.

Codebooks go in at the chosen sites (by default one per attention head, on its output before W_O, and one after each
MLP), are initialised by k-means on their own inputs (divided by k, so the first outputs have the input's scale for
any k), and are trained end to end with the model (at `codebook_lr * model_lr_factor`, the paper's
`model_lr_factor`) or with the model frozen. The control is the same model fine-tuned without codebooks for the same
steps, on the same batches, with the same schedule; held-out next-token loss and accuracy of the base model, the
codebook model and the control give the gap that Tamkin et al. (2023) report in their Table 2. Every phase runs
through the phase runner (`cbinterp.recipes.codebook.run_recipe`): checkpoints under ``<out_dir>/checkpoints``, and a
rerun resumes exactly where the last one stopped; under torchrun training is data parallel as `cbinterp.train` is.

Text comes from a list of strings, text files or a Hugging Face `datasets` Dataset (`cbinterp.tasks.text.iter_texts`),
packed the way the model was trained: windows start with BOS only when `model.cfg.default_prepend_bos` says so
(TransformerLens sets False for e.g. Pythia). With `streaming`, nothing is tokenised ahead and each rank tokenises only
its rows (`StreamingTextBatches`), for data larger than memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from cbinterp.core.checks import is_int, is_real
from cbinterp.core.codebooks.attach import (
    codebooks_bypassed,
    get_codebooks,
    kmeans_init_codebooks,
    require_hooked_transformer,
    resolve_sites,
)
from cbinterp.core.codebooks.codebook import SIMILARITIES
from cbinterp.core.storage.atomic import atomic_file
from cbinterp.core.tl_compat import Model
from cbinterp.core.training import distributed as dd
from cbinterp.core.training.data import batch_fingerprint
from cbinterp.core.training.train import TrainResult
from cbinterp.recipes.codebook import CodebookRecipe, CodebookSpec, Phase, resumes_codebook_phases, run_recipe
from cbinterp.recipes.evaluate import evaluate
from cbinterp.recipes.flat import FlatRecipe
from cbinterp.reporting import write_json
from cbinterp.tasks.packing import pack_documents, resolve_prepend_bos
from cbinterp.tasks.text_batches import StreamingTextBatches, TextBatches
from cbinterp.tasks.text_sources import TextSource, iter_texts

__all__ = ["RESULTS_FILE", "FinetuneRecipe", "FinetuneResult", "finetune_codebooks"]

RESULTS_FILE = "results.json"
_AT_INIT_FILE = "codebook_at_init.json"
_POSITIVE = ("n_codes", "k", "steps", "batch_size", "kmeans_sequences", "heldout_every", "eval_windows")
_POSITIVE += ("eval_batch_size",)
_NON_NEGATIVE = ("warmup_steps", "kmeans_iters", "checkpoint_every", "seed")


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe(FlatRecipe):
    """Every setting of `finetune_codebooks`, checked on construction. `quick()` is a seconds-long run for tests.

    Attributes:
        sites, layers: where codebooks go (`attach_codebooks`): "attn" (one per head, on its output before W_O),
            "mlp", "resid", hook names or `{layer}` templates; `layers` limits the aliases (default: every layer).
        n_codes, k, loss, similarity: each codebook's codes, codes per position, training loss, code search.
        steps, batch_size, seq_len: the fine-tuning (of the codebook model and, as long, of the control).
        codebook_lr: the codebooks' learning rate; the model's is `codebook_lr * model_lr_factor`.
        freeze_model: train the codebooks only (no control is trained then: the base model is the comparison).
        warmup_steps, schedule, min_lr_ratio, weight_decay: as `TrainConfig`'s.
        kmeans, kmeans_sequences, kmeans_iters: k-means initialisation on this many training windows.
        control: also fine-tune the model without codebooks for the same steps (the paper's comparison).
        heldout_every: without held-out data given, document i is held out when i % heldout_every == 0.
        eval_windows, eval_batch_size: held-out windows evaluated (the first ones of the held-out documents).
        checkpoint_every: steps between checkpoints (with an `out_dir`).
        streaming: read and tokenise the training text lazily (`StreamingTextBatches`) instead of all at once.
        prepend_bos: windows start with BOS (None: the model's `cfg.default_prepend_bos`).
        seed: codebook initialisation, k-means, batch order and training.
    """

    _tuple_settings = ("sites", "layers")  # no annotation: a class constant, not a setting

    sites: tuple[str, ...] = ("attn", "mlp")
    layers: tuple[int, ...] | None = None
    n_codes: int = 1024
    k: int = 8
    loss: str = "aeloss"
    similarity: str = "inner_product"
    steps: int = 500
    batch_size: int = 32
    seq_len: int = 128
    codebook_lr: float = 1e-3
    model_lr_factor: float = 1.0
    freeze_model: bool = False
    warmup_steps: int = 25
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    kmeans: bool = True
    kmeans_sequences: int = 128
    kmeans_iters: int = 10
    control: bool = True
    heldout_every: int = 20
    eval_windows: int = 256
    eval_batch_size: int = 32
    checkpoint_every: int = 100
    streaming: bool = False
    prepend_bos: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_shared(_POSITIVE, _NON_NEGATIVE)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if not is_int(self.seq_len) or self.seq_len < 2:
            raise ValueError(f"FinetuneRecipe.seq_len must be an int >= 2, got {self.seq_len!r}.")
        for name in ("codebook_lr", "model_lr_factor"):
            if not is_real(getattr(self, name)) or getattr(self, name) <= 0:
                hint = " (to keep the model fixed, set freeze_model=True)" if name == "model_lr_factor" else ""
                raise ValueError(f"FinetuneRecipe.{name} must be a number > 0{hint}, got {getattr(self, name)!r}.")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} is more than steps={self.steps}.")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"Unknown similarity {self.similarity!r}; choose one of {SIMILARITIES}.")
        if self.prepend_bos not in (None, True, False):
            raise ValueError(
                f"prepend_bos must be None (the model's convention), True or False, got {self.prepend_bos!r}."
            )

    @classmethod
    def quick(cls, **overrides) -> FinetuneRecipe:
        """A run of seconds (tests, smoke runs): few codes, steps and windows."""
        settings = dict(
            n_codes=64,
            k=4,
            steps=6,
            batch_size=4,
            seq_len=32,
            warmup_steps=1,
            kmeans_sequences=16,
            kmeans_iters=3,
            eval_windows=8,
            eval_batch_size=8,
            checkpoint_every=3,
        )
        return cls(**{**settings, **overrides})

    @property
    def model_lr(self) -> float:
        """The model's own learning rate: `codebook_lr * model_lr_factor`."""
        return self.codebook_lr * self.model_lr_factor

    def codebook_recipe(self, hook_names: list[str]) -> CodebookRecipe:
        """The phases for `run_recipe`: ``codebook`` (the codebook model) and ``control`` (without codebooks).

        The control has the same steps, batches and schedule; both read data stream 0. k-means is
        `finetune_codebooks`' own (see there)."""
        phase = Phase(
            "codebook",
            steps=self.steps,
            lr=self.model_lr,
            stream=0,
            codebook_lr=self.codebook_lr,
            freeze_model=self.freeze_model,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            cap_warmup=False,
            checkpoint_every=self.checkpoint_every,
        )
        spec = CodebookSpec(tuple(hook_names), self.n_codes, self.k, self.loss, self.similarity, kmeans=False)
        trains_control = self.control and not self.freeze_model
        controls = [dataclasses.replace(phase, name="control", codebook_lr=None)] if trains_control else []
        return CodebookRecipe(None, spec, [phase], control=trains_control, seed=self.seed, controls=controls)


@dataclasses.dataclass
class FinetuneResult:
    """What `finetune_codebooks` returns.

    Attributes:
        model: the model with its codebooks, fine-tuned (the model given, changed in place).
        base_model: a copy of the model as it was given.
        control_model: the base model fine-tuned without codebooks for the same steps (None without a control).
        evals: held-out metrics (`evaluate`: loss in nats per predicted token, accuracy, dead codes) of ``base``,
            ``codebook_at_init`` (after k-means, before training), ``codebook``, ``codebook_bypassed`` and
            ``control``.
        comparison: loss differences: ``codebook_minus_control_loss`` (the paper's gap), ``codebook_minus_base_loss``,
            ``control_minus_base_loss``, and the accuracy difference ``codebook_minus_control_accuracy``.
        record: everything as JSON data (also written to ``<out_dir>/results.json``).
    """

    model: Model
    base_model: Model
    control_model: Model | None
    evals: dict[str, Any]
    comparison: dict[str, float | None]
    record: dict[str, Any]

    @property
    def gap(self) -> float | None:
        """Held-out loss of the codebook model minus the control's (the base model's without a control)."""
        key = "codebook_minus_control_loss" if self.control_model is not None else "codebook_minus_base_loss"
        return self.comparison[key]


class _Split:
    """The documents of `source` whose index i is held out (i % every == 0) or not: a view that can be read again."""

    def __init__(self, source: TextSource, text_column: str, every: int, heldout: bool):
        iter_texts(source, text_column)  # refuse a source of the wrong kind now
        if isinstance(source, Iterator):
            raise TypeError(
                "finetune_codebooks reads the data more than once (held-out and training documents, epochs, resumes): "
                "pass a list, a Path, a list of files or a datasets (Iterable)Dataset, not a one-shot iterator."
            )
        self.source, self.text_column, self.every, self.heldout = source, text_column, every, heldout

    def __iter__(self) -> Iterator[dict[str, str]]:
        for i, text in enumerate(iter_texts(self.source, self.text_column)):
            if (i % self.every == 0) == self.heldout:
                yield {"text": text}  # a mapping, so that iter_texts never reads a document as a file name


def _sources(data: TextSource, heldout: TextSource | None, recipe: FinetuneRecipe, text_column: str):
    """(training source, held-out source, their text column)."""
    if heldout is not None:
        return data, heldout, text_column
    train = _Split(data, text_column, recipe.heldout_every, heldout=False)
    return train, _Split(data, text_column, recipe.heldout_every, heldout=True), "text"


#: The held-out windows evaluated are spread over the first `eval_windows * _EVAL_SPREAD` windows of the held-out text.
_EVAL_SPREAD = 16


def _heldout_windows(source, tokenizer, recipe: FinetuneRecipe, bos: bool, column: str) -> Int[Tensor, "rows pos"]:
    """`eval_windows` windows evenly spaced over the first `eval_windows * 16` windows of the held-out text.

    That is the whole of a held-out split of a few thousand windows (not only its first documents), and a bounded read
    of a larger one."""
    packed = pack_documents(source, tokenizer, recipe.seq_len, bos, text_column=column)
    windows = list(itertools.islice(packed, recipe.eval_windows * _EVAL_SPREAD))
    if not windows:
        raise ValueError(
            f"The held-out documents do not fill one window of seq_len={recipe.seq_len} tokens; give more held-out "
            "text (heldout=...), or hold out more documents (lower heldout_every)."
        )
    n = min(recipe.eval_windows, len(windows))
    return torch.stack([windows[i * len(windows) // n] for i in range(n)])


def _kmeans_windows(batches: Callable[[int], Tensor], recipe: FinetuneRecipe) -> Int[Tensor, "rows pos"]:
    """The first `kmeans_sequences` training windows (the first batches, as training will see them)."""
    n_batches = math.ceil(recipe.kmeans_sequences / recipe.batch_size)
    return torch.cat([batches(step) for step in range(n_batches)])[: recipe.kmeans_sequences]


def _hook_names(model: Model, recipe: FinetuneRecipe) -> list[str]:
    return [name for _, name in resolve_sites(model, list(recipe.sites), recipe.layers)]


def finetune_codebooks(
    model: Model,
    data: TextSource,
    recipe: FinetuneRecipe | None = None,
    out_dir: str | Path | None = None,
    *,
    heldout: TextSource | None = None,
    tokenizer=None,
    text_column: str = "text",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune codebooks into the pretrained `model` (in place) and compare it with the control on held-out text.

    The control is the same model fine-tuned without codebooks for the same steps.

    Args:
        data: the training text (`iter_texts`: a list of strings, a ``Path`` to a .txt / .jsonl file, a list of
            files, a ``datasets`` Dataset or IterableDataset); it is read more than once, so no one-shot iterator.
        recipe: the settings (default `FinetuneRecipe()`).
        out_dir: checkpoints go to ``<out_dir>/checkpoints`` (a rerun with the same settings resumes exactly) and the
            record to ``<out_dir>/results.json``; None: nothing is written.
        heldout: the held-out text; None: every `recipe.heldout_every`-th document of `data` is held out (and not
            trained on).
        tokenizer: default `model.tokenizer` (what `cbinterp.models.from_hf` attaches).
        log: where progress lines go (default: print, on rank 0 only).

    Returns:
        A `FinetuneResult`. Under torchrun every rank runs this call with the same arguments and trains its share of
        each batch; every rank evaluates, and rank 0 alone writes.
    """
    require_hooked_transformer(model)
    recipe = FinetuneRecipe() if recipe is None else recipe
    if not isinstance(recipe, FinetuneRecipe):
        raise TypeError(f"recipe must be a FinetuneRecipe, got {type(recipe).__name__}.")
    if get_codebooks(model):
        raise ValueError(
            "The model already has codebooks; fine-tune a model without them (cbinterp.detach_codebooks(model) to "
            "take them off), or train the codebook model further with cbinterp.train."
        )
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "The model has no tokenizer; pass tokenizer=... or load the model with cbinterp.models.from_hf(folder)."
        )
    if log is None:
        log = (lambda message: print(message, flush=True)) if dd.is_main() else (lambda message: None)
    start = time.perf_counter()
    hook_names = _hook_names(model, recipe)
    bos = resolve_prepend_bos(recipe.prepend_bos, model)
    train_source, heldout_source, column = _sources(data, heldout, recipe, text_column)
    if recipe.streaming:
        batches = StreamingTextBatches(
            train_source, tokenizer, recipe.seq_len, recipe.batch_size, model, prepend_bos=bos, text_column=column
        )
    else:
        batches = TextBatches.from_texts(
            train_source,
            tokenizer,
            recipe.seq_len,
            recipe.batch_size,
            seed=recipe.seed,
            model=model,
            text_column=column,
            prepend_bos=bos,
        )
    eval_rows = _heldout_windows(heldout_source, tokenizer, recipe, bos, column)
    heldout_id = batch_fingerprint(eval_rows)
    root = Path(out_dir) if out_dir is not None else None
    ckpt = root / "checkpoints" if root is not None else None
    training = recipe.codebook_recipe(hook_names)
    resuming = resumes_codebook_phases(training, ckpt)  # then the codes come from the checkpoint: no k-means
    evals: dict[str, Any] = {}
    phases: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def evaluated(key: str, target: Model) -> None:
        mark = time.perf_counter()
        evals[key] = evaluate(target, eval_rows, recipe.eval_batch_size)
        timings[f"eval_{key}_s"] = time.perf_counter() - mark
        log(f"held-out {key}: loss {evals[key]['loss']:.4f} nats/token, accuracy {evals[key]['accuracy']:.4f}")

    def trained(name: str, result: TrainResult, seconds: float) -> None:
        losses = result.losses[-20:]
        phases[name] = {
            "steps": result.steps,
            "tokens": result.steps * recipe.batch_size * recipe.seq_len,
            "steps_this_run": result.steps - (result.resumed_from or 0),
            "resumed_from": result.resumed_from,
            "wall_s_this_run": seconds,
            "final_train_loss": sum(losses) / len(losses) if losses else None,
            "train_losses_every_10": result.losses[::10],
        }

    def after_phase(name: str, target: Model) -> None:
        if name != "attached":
            evaluated(name, target)
            if name == "codebook":
                with codebooks_bypassed(target):
                    evaluated("codebook_bypassed", target)
            return
        at_init = ckpt / _AT_INIT_FILE if ckpt is not None else None
        if resuming:  # measured by the run that initialised the codes, when on the same held-out windows
            saved = json.loads(at_init.read_text()) if at_init and at_init.exists() else {}
            evals["codebook_at_init"] = saved.get("eval") if saved.get("heldout") == heldout_id else None
            return
        if recipe.kmeans:
            # here rather than in run_recipe: each codebook is divided by k before the next one's data is read
            mark = time.perf_counter()
            kmeans_init_codebooks(
                target, _kmeans_windows(batches, recipe), iters=recipe.kmeans_iters, seed=recipe.seed, progress=progress
            )
            timings["kmeans_s"] = time.perf_counter() - mark
        evaluated("codebook_at_init", target)
        if at_init is not None and dd.is_main():
            at_init.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(at_init) as tmp:
                tmp.write_text(json.dumps({"heldout": heldout_id, "eval": evals["codebook_at_init"]}))

    evaluated("base", model)
    outcome = run_recipe(
        model,
        lambda stream: batches,
        training,
        checkpoint_dir=ckpt,
        progress=progress,
        log=log,
        after_phase=after_phase,
        on_trained=trained,
    )
    timings["total_s"] = time.perf_counter() - start
    comparison = _comparison(evals)
    record = {
        "recipe": recipe.to_dict(),
        "hook_names": hook_names,
        "prepend_bos": bos,
        "model": {
            "n_layers": model.cfg.n_layers,
            "d_model": model.cfg.d_model,
            "d_vocab": model.cfg.d_vocab,
            "n_parameters": sum(p.numel() for n, p in outcome.warm_model.named_parameters()),
        },
        "data": {
            "streaming": recipe.streaming,
            "train_windows": None if recipe.streaming else batches.n_sequences,
            "tokens_per_step": recipe.batch_size * recipe.seq_len,
            "heldout_windows": int(eval_rows.shape[0]),
            "heldout_predicted_tokens": int(eval_rows.shape[0] * (recipe.seq_len - 1)),
            "heldout_given": heldout is not None,
            "heldout_fingerprint": heldout_id,
        },
        "resumed": resuming,
        "phases": phases,
        "eval": evals,
        "comparison": comparison,
        "timings_s": timings,
        "world_size": dd.world_size(),
    }
    if root is not None and dd.is_main():
        write_json(root / RESULTS_FILE, record)
    for key in ("codebook", "control"):
        if key in evals:
            log(f"{key} minus base: {evals[key]['loss'] - evals['base']['loss']:+.4f} nats/token")
    return FinetuneResult(outcome.model, outcome.warm_model, outcome.control_model, evals, comparison, record)


def _comparison(evals: dict[str, Any]) -> dict[str, float | None]:
    def diff(a: str, b: str, metric: str = "loss") -> float | None:
        if evals.get(a) is None or evals.get(b) is None:
            return None
        return evals[a][metric] - evals[b][metric]

    return {
        "codebook_minus_control_loss": diff("codebook", "control"),
        "codebook_minus_base_loss": diff("codebook", "base"),
        "control_minus_base_loss": diff("control", "base"),
        "codebook_minus_control_accuracy": diff("codebook", "control", "accuracy"),
        "bypassed_minus_codebook_loss": diff("codebook_bypassed", "codebook"),
    }
