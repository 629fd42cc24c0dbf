"""The paper's codebook language model, trained in three phases from library calls, and its held-out evaluation.

    (a) baseline   a HookedTransformer LM trained from scratch on packed text, without codebooks
    (b) codebook   (a) with codebooks attached at `sites` (by default one per attention head, k = 8 as the paper's
                   TinyStories model), initialised by k-means on their own inputs, then trained end to end with the
                   paper's loss `aeloss` (the codes learn to reconstruct the activation, which gets no gradient from
                   it; the network learns through the codes by the straight-through estimator)
    (c) finetuned  (a) trained for the same number of extra steps as (b), without codebooks, on the same batches
                   with the same learning-rate schedule: the paper's "fine-tuned" row, so that (b) versus (c) has no
                   step-count confound

Every phase is `cbinterp.train` with its own checkpoint folder, so an interrupted run resumes where it stopped.
`evaluate` measures, on packed held-out windows, the mean next-token loss (nats per predicted token), the
next-token accuracy (argmax) and, for a codebook model, which codes fire: a code that no held-out token selects
(in any of its k slots) is dead. `run_lm` runs everything and writes each model as a folder that
`cbinterp.pretrained.load_pretrained` opens: ``model/`` (`cbinterp.save`), ``tokenizer/`` and ``card.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerBase

from cbinterp.core.atomic import atomic_file, recover_dir
from cbinterp.core.attach import attach_codebooks, codebooks_bypassed, get_codebooks, kmeans_init_codebooks
from cbinterp.core.codebook import LOSSES
from cbinterp.core.io import save
from cbinterp.core.train import TrainConfig, TrainResult, is_checkpoint, train
from cbinterp.tasks.text import (
    TextBatches,
    TextSource,
    attach_tokenizer,
    load_tokenizer,
    pack_documents,
    save_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

__all__ = [
    "CARD_FILE",
    "MODEL_DIR",
    "PHASES",
    "TOKENIZER_DIR",
    "LMRecipe",
    "add_codebooks",
    "build_model",
    "default_device",
    "evaluate",
    "finetune_baseline",
    "heldout_sequences",
    "run_lm",
    "train_baseline",
    "train_batches",
    "train_codebook_model",
    "train_config",
    "train_tokenizer",
]

PHASES = ("baseline", "codebook", "finetuned")
MODEL_DIR, TOKENIZER_DIR, CARD_FILE = "model", "tokenizer", "card.json"
CARD_FORMAT = "cbinterp-lm-card"


@dataclasses.dataclass(frozen=True)
class LMRecipe:
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
        object.__setattr__(self, "sites", tuple(self.sites) if not isinstance(self.sites, str) else (self.sites,))
        for name in ("n_layers", "d_model", "n_heads", "d_mlp", "batch_size", "n_codes", "k", "kmeans_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMRecipe.{name} must be a positive int, got {value!r}.")
        for name in ("base_steps", "codebook_steps", "base_warmup", "codebook_warmup", "kmeans_iters", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"LMRecipe.{name} must be an int >= 0, got {value!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}.")
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size must be >= 257 (256 bytes plus <|endoftext|>), got {self.vocab_size}.")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (BOS plus a token), got {self.seq_len}.")
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown codebook loss {self.loss!r}; choose one of {LOSSES}.")
        if not self.sites:
            raise ValueError("LMRecipe.sites is empty: name at least one site ('attn', 'mlp', or a hook name).")
        if self.k > self.n_codes:
            raise ValueError(f"k={self.k} is larger than n_codes={self.n_codes}.")

    @classmethod
    def paper(cls, **overrides) -> "LMRecipe":
        """The default run: the paper's LM setting (attention codebooks, k = 8, aeloss) sized for 30 CPU minutes."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides) -> "LMRecipe":
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

    def replace(self, **changes) -> "LMRecipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["sites"] = list(self.sites)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LMRecipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LMRecipe settings {unknown}; known: {sorted(known)}.")
        return cls(**data)

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per training step (batch_size windows of seq_len tokens, BOS included)."""
        return self.batch_size * self.seq_len

    def model_config(self, d_vocab: int, device: Optional[str] = None) -> HookedTransformerConfig:
        return HookedTransformerConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_model // self.n_heads,
            d_mlp=self.d_mlp,
            n_ctx=self.seq_len,
            d_vocab=d_vocab,
            act_fn=self.act_fn,
            normalization_type="LN",
            positional_embedding_type=self.positional_embedding_type,
            device=device or default_device(),
            seed=self.seed,
        )


def default_device() -> str:
    """ "cuda" when a GPU is present, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- building blocks ------------------------------------------------------------------------------------------


def train_tokenizer(
    recipe: LMRecipe, train_texts: TextSource, directory: Optional[Union[str, Path]] = None
) -> PreTrainedTokenizerBase:
    """A byte-level BPE of `recipe.vocab_size` tokens trained on `train_texts` (the training split only)."""
    return train_bpe_tokenizer(train_texts, recipe.vocab_size, seed=recipe.seed, directory=directory)


def build_model(recipe: LMRecipe, tokenizer: PreTrainedTokenizerBase, device: Optional[str] = None):
    """A freshly initialised (seeded) HookedTransformer for `recipe`, with `tokenizer` attached."""
    d_vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    torch.manual_seed(recipe.seed)
    model = HookedTransformer(recipe.model_config(d_vocab, device))
    return attach_tokenizer(model, tokenizer)


def train_batches(
    recipe: LMRecipe, texts: TextSource, tokenizer: PreTrainedTokenizerBase, model: Optional[HookedTransformer] = None
) -> TextBatches:
    """The training windows (BOS + seq_len - 1 tokens, documents joined by <|endoftext|>), seeded batches."""
    return TextBatches.from_texts(texts, tokenizer, recipe.seq_len, recipe.batch_size, seed=recipe.seed, model=model)


def heldout_sequences(
    texts: TextSource, tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> Int[Tensor, "n_seq seq_len"]:
    """Held-out text packed the way training text is (`pack_documents`), for `evaluate`."""
    rows = list(pack_documents(texts, tokenizer, seq_len))
    if not rows:
        raise ValueError(f"The held-out text does not fill one window of {seq_len} tokens; add documents.")
    return torch.stack(rows)


def train_config(
    recipe: LMRecipe, phase: str, checkpoint_dir: Optional[Union[str, Path]] = None, progress: bool = True
) -> TrainConfig:
    """The `TrainConfig` of `phase` ("baseline", "codebook" or "finetuned"); (b) and (c) share theirs."""
    if phase not in PHASES:
        raise ValueError(f"Unknown phase {phase!r}; phases are {PHASES}.")
    first = phase == "baseline"
    return TrainConfig(
        steps=recipe.base_steps if first else recipe.codebook_steps,
        lr=recipe.base_lr if first else recipe.codebook_lr,
        warmup_steps=recipe.base_warmup if first else recipe.codebook_warmup,
        weight_decay=recipe.weight_decay,
        checkpoint_every=recipe.checkpoint_every if checkpoint_dir is not None else 0,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        seed=recipe.seed + PHASES.index(phase),
        log_every=10,
        progress=progress,
    )


def _continued(batches: Callable[[int], Tensor], start: int) -> Callable[[int], Tensor]:
    """The batches that follow the first `start` ones: (b) and (c) continue the stream where (a) stopped."""
    return lambda step: batches(start + step)


def train_baseline(
    model: HookedTransformer,
    batches: TextBatches,
    recipe: LMRecipe,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> TrainResult:
    """Phase (a): train `model` (no codebooks) for `recipe.base_steps` on batches 0 .. base_steps - 1."""
    if get_codebooks(model):
        raise ValueError("train_baseline trains a model without codebooks; this one has some.")
    return train(model, batches, train_config(recipe, "baseline", checkpoint_dir, progress))


def kmeans_tokens(batches: TextBatches, recipe: LMRecipe) -> Int[Tensor, "n seq_len"]:
    """`recipe.kmeans_sequences` training windows (a seeded sample) on which the codebooks are initialised."""
    generator = torch.Generator().manual_seed(recipe.seed + 17)
    pick = torch.randperm(batches.n_sequences, generator=generator)[: recipe.kmeans_sequences]
    return batches.sequences[pick].long()


def add_codebooks(
    model: HookedTransformer, recipe: LMRecipe, init_tokens: Optional[Tensor] = None, progress: bool = False
) -> HookedTransformer:
    """Attach the recipe's codebooks; with `init_tokens`, initialise them by k-means on their inputs there."""
    attach_codebooks(model, sites=list(recipe.sites), n_codes=recipe.n_codes, k=recipe.k, seed=recipe.seed,
                     loss=recipe.loss)  # fmt: skip
    if init_tokens is not None:
        kmeans_init_codebooks(model, init_tokens, iters=recipe.kmeans_iters, seed=recipe.seed, progress=progress)
        if recipe.kmeans_mean_of_k and recipe.k > 1:
            with torch.no_grad():
                for codebook in get_codebooks(model).values():
                    codebook.weight.div_(codebook.k)
    return model


def _has_checkpoint(checkpoint_dir: Optional[Union[str, Path]]) -> bool:
    return checkpoint_dir is not None and is_checkpoint(recover_dir(Path(checkpoint_dir)))


def train_codebook_model(
    model: HookedTransformer,
    batches: TextBatches,
    recipe: LMRecipe,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
    on_init: Optional[Callable[[HookedTransformer], None]] = None,
) -> TrainResult:
    """Phase (b): attach codebooks to the trained baseline `model` (in place), k-means initialise them (unless a
    checkpoint is resumed: it holds the codes), then train end to end for `recipe.codebook_steps` on the batches
    after (a)'s. `on_init(model)` is called after initialisation, before training (e.g. to evaluate it)."""
    resuming = _has_checkpoint(checkpoint_dir)
    add_codebooks(model, recipe, None if resuming else kmeans_tokens(batches, recipe), progress=progress)
    if on_init is not None and not resuming:
        on_init(model)
    cfg = train_config(recipe, "codebook", checkpoint_dir, progress)
    return train(model, _continued(batches, recipe.base_steps), cfg)


def finetune_baseline(
    model: HookedTransformer,
    batches: TextBatches,
    recipe: LMRecipe,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> TrainResult:
    """Phase (c): train the baseline `model` (no codebooks) as long as (b), on (b)'s batches and schedule."""
    if get_codebooks(model):
        raise ValueError("finetune_baseline trains a model without codebooks; this one has some.")
    cfg = train_config(recipe, "finetuned", checkpoint_dir, progress)
    return train(model, _continued(batches, recipe.base_steps), cfg)


# -- evaluation -----------------------------------------------------------------------------------------------


def _count_codes(counts: Tensor, codes: Tensor, hook) -> None:
    groups, n_codes = counts.shape
    flat = codes.reshape(-1, groups, codes.shape[-1]) if groups > 1 else codes.reshape(-1, 1, codes.shape[-1])
    flat = flat + torch.arange(groups, device=codes.device).view(1, groups, 1) * n_codes
    flat = flat[flat >= 0] if bool((codes < 0).any()) else flat.flatten()
    counts += torch.bincount(flat, minlength=groups * n_codes).view(groups, n_codes).to(counts.device)


@torch.no_grad()
def evaluate(
    model: HookedTransformer,
    sequences: Int[Tensor, "n_seq seq_len"],
    batch_size: int = 64,
    count_codes: bool = True,
) -> dict[str, Any]:
    """Held-out metrics of `model` on `sequences` (rows that start with BOS, e.g. from `heldout_sequences`).

    Returns ``loss`` (mean cross-entropy in nats over every predicted position: each token after the first of a
    row, the document separators included), ``accuracy`` (share of those positions where the argmax is the next
    token), ``n_tokens`` (predicted positions) and, for a model with active codebooks and `count_codes`,
    ``codebooks``: per codebook the number of held-out positions, how many of its codes (per head for attention
    codebooks) fired at least once, and the dead fraction.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    codebooks = {name: cb for name, cb in get_codebooks(model).items() if not cb.bypass} if count_codes else {}
    counts = {name: torch.zeros(cb.cfg.groups, cb.n_codes, dtype=torch.long) for name, cb in codebooks.items()}
    hooks = [(f"{name}.hook_codes", partial(_count_codes, counts[name])) for name in codebooks]
    total, correct, n = 0.0, 0, 0
    try:
        for batch in torch.as_tensor(sequences).long().split(batch_size):
            batch = batch.to(device)
            logits = model.run_with_hooks(batch, fwd_hooks=hooks) if hooks else model(batch)
            logits, targets = logits[:, :-1].float(), batch[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            n += targets.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate needs sequences of at least 2 tokens.")
    out: dict[str, Any] = {"loss": total / n, "accuracy": correct / n, "n_tokens": n}
    if codebooks:
        out["codebooks"] = {name: _dead_summary(c, codebooks[name]) for name, c in counts.items()}
        dead = sum(s["n_dead"] for s in out["codebooks"].values())
        out["dead_fraction"] = dead / sum(s["n_codes_total"] for s in out["codebooks"].values())
    return out


def _dead_summary(counts: Tensor, codebook) -> dict:
    alive = (counts > 0).sum(-1)
    total = counts.numel()
    summary = {
        "n_codes_total": total,
        "n_dead": int(total - alive.sum()),
        "dead_fraction": float(1 - alive.sum() / total),
        "k": codebook.k,
    }
    if codebook.grouped:
        summary["dead_fraction_per_head"] = [float(1 - a / counts.shape[1]) for a in alive.tolist()]
    return summary


# -- the whole run --------------------------------------------------------------------------------------------


def _phase_record(result: TrainResult, recipe: LMRecipe, wall_s: float, steps_total: int) -> dict:
    new_steps = result.steps - (result.resumed_from or 0)
    return {
        "steps": steps_total,
        "tokens": steps_total * recipe.tokens_per_step,
        "steps_this_run": new_steps,
        "resumed_from": result.resumed_from,
        "wall_s_this_run": wall_s,
        "tokens_per_s": (new_steps * recipe.tokens_per_step / wall_s) if new_steps and wall_s > 0 else None,
        "final_train_loss": sum(result.losses[-20:]) / max(1, len(result.losses[-20:])) if result.losses else None,
        "train_losses_every_10": result.losses[::10],
        "trained_by_earlier_run": False,
    }


def _kept_record(path: Path, record: dict) -> dict:
    """The record of a phase finished by an earlier run (its timing), else `record`, which is stored."""
    if record["steps_this_run"] == 0 and path.exists():
        return json.loads(path.read_text()) | {"trained_by_earlier_run": True}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


def write_model_folder(
    model: HookedTransformer, tokenizer: PreTrainedTokenizerBase, directory: Union[str, Path], card: dict
) -> Path:
    """Write ``model/``, ``tokenizer/`` and ``card.json`` into `directory` (each atomically)."""
    directory = Path(directory)
    save(model, directory / MODEL_DIR, extra={"card": card.get("name"), "recipe": card.get("recipe")})
    save_tokenizer(tokenizer, directory / TOKENIZER_DIR)
    with atomic_file(directory / CARD_FILE) as tmp:
        tmp.write_text(json.dumps(card, indent=1, sort_keys=True))
    return directory


def run_lm(
    recipe: LMRecipe,
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    out: Union[str, Path],
    device: Optional[str] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    card_extra: Optional[dict] = None,
    names: Optional[dict[str, str]] = None,
    n_check_documents: int = 8,
) -> dict[str, Any]:
    """Run phases (a), (b), (c) and evaluate them on `heldout_texts`; resumable from ``out/checkpoints``.

    Writes ``out/tokenizer`` (trained on `train_texts` only) and a loadable folder per model, ``out/<phase>``
    (``model/``, ``tokenizer/``, ``card.json``). The card holds `card_extra`, the recipe, the model's held-out
    metrics, token counts and timings, and the loss on the first `n_check_documents` held-out documents (so that
    a loaded model can be checked against it). Returns every number as a JSON-safe dict. `names` maps phases to
    the names written in the cards (default ``cbinterp-lm-<phase>``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or default_device()
    names = {phase: f"cbinterp-lm-{phase}" for phase in PHASES} | (names or {})
    ckpt = out / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    mark = time.perf_counter()
    tokenizer_dir = out / TOKENIZER_DIR
    if (recover_dir(tokenizer_dir) / "tokenizer.json").exists():
        tokenizer = load_tokenizer(tokenizer_dir)
        log(f"tokenizer: reused {tokenizer_dir}")
    else:
        tokenizer = train_tokenizer(recipe, list(train_texts), directory=tokenizer_dir)
        log(f"tokenizer: trained a {len(tokenizer)}-token byte-level BPE on the training split")
    timings["tokenizer_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    model = build_model(recipe, tokenizer, device)
    batches = train_batches(recipe, list(train_texts), tokenizer, model)
    heldout = heldout_sequences(list(heldout_texts), tokenizer, recipe.seq_len)
    check_texts = list(heldout_texts)[:n_check_documents]
    check = heldout_sequences(check_texts, tokenizer, recipe.seq_len) if check_texts else None
    timings["tokenize_s"] = time.perf_counter() - mark
    data = {
        "train_documents": len(train_texts),
        "heldout_documents": len(heldout_texts),
        "train_chars": sum(map(len, train_texts)),
        "heldout_chars": sum(map(len, heldout_texts)),
        "train_windows": batches.n_sequences,
        "train_tokens": batches.n_sequences * recipe.seq_len,
        "heldout_windows": int(heldout.shape[0]),
        "heldout_predicted_tokens": int(heldout.shape[0] * (recipe.seq_len - 1)),
        "epochs_a": recipe.base_steps * recipe.batch_size / batches.n_sequences,
        "epochs_total": (recipe.base_steps + recipe.codebook_steps) * recipe.batch_size / batches.n_sequences,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
    }
    log(
        f"data: {data['train_windows']} training windows of {recipe.seq_len} tokens "
        f"({data['train_tokens']:,} tokens, {data['train_chars'] / max(1, data['train_tokens']):.2f} chars/token), "
        f"{data['heldout_windows']} held-out windows; (a) sees {data['epochs_a']:.2f} epochs"
    )

    phases: dict[str, dict] = {}
    evals: dict[str, dict] = {}

    def run_phase(phase: str, fn, phase_model, **kwargs) -> None:
        mark = time.perf_counter()
        log(f"phase ({'abc'[PHASES.index(phase)]}) {phase}: {train_config(recipe, phase).steps} steps")
        result = fn(phase_model, batches, recipe, checkpoint_dir=ckpt / phase, progress=progress, **kwargs)
        record = _phase_record(result, recipe, time.perf_counter() - mark, result.steps)
        record["load_average_1min_at_end"] = os.getloadavg()[0]  # other jobs on the machine slow the run down
        phases[phase] = _kept_record(ckpt / f"{phase}.json", record)
        timings[f"{phase}_train_s"] = time.perf_counter() - mark
        rate = phases[phase]["tokens_per_s"]
        log(f"  trained in {phases[phase]['wall_s_this_run']:.0f} s" + (f", {rate:,.0f} tokens/s" if rate else ""))

    def evaluated(key: str, phase_model) -> dict:
        mark = time.perf_counter()
        evals[key] = evaluate(phase_model, heldout, recipe.eval_batch_size)
        timings[f"eval_{key}_s"] = time.perf_counter() - mark
        log(f"  held-out {key}: loss {evals[key]['loss']:.4f} nats/token, accuracy {evals[key]['accuracy']:.4f}")
        return evals[key]

    run_phase("baseline", train_baseline, model)
    evaluated("baseline", model)
    baseline = copy.deepcopy(model)  # becomes (c)
    models = {"baseline": copy.deepcopy(model)}

    init_path = ckpt / "codebook_init.json"

    def at_init(m: HookedTransformer) -> None:
        result = evaluate(m, heldout[: 4 * recipe.eval_batch_size], recipe.eval_batch_size)
        with atomic_file(init_path) as tmp:
            tmp.write_text(json.dumps(result))

    run_phase("codebook", train_codebook_model, model, on_init=at_init)
    evals["codebook_at_init"] = json.loads(init_path.read_text()) if init_path.exists() else None
    evaluated("codebook", model)
    with codebooks_bypassed(model):
        evaluated("codebook_bypassed", model)
    codebook_model = model

    run_phase("finetuned", finetune_baseline, baseline)
    evaluated("finetuned", baseline)
    timings["total_s"] = time.perf_counter() - start

    models |= {"codebook": codebook_model, "finetuned": baseline}
    results = {
        "recipe": recipe.to_dict(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "data": data,
        "phases": phases,
        "eval": evals,
        "timings_s": timings,
        "comparison": {
            "codebook_minus_finetuned_loss": evals["codebook"]["loss"] - evals["finetuned"]["loss"],
            "codebook_minus_baseline_loss": evals["codebook"]["loss"] - evals["baseline"]["loss"],
            "bypassed_minus_codebook_loss": evals["codebook_bypassed"]["loss"] - evals["codebook"]["loss"],
        },
    }
    for phase, phase_model in models.items():
        card = {
            "format": CARD_FORMAT,
            "name": names[phase],
            "phase": phase,
            "description": _DESCRIPTIONS[phase],
            "recipe": recipe.to_dict(),
            "has_codebooks": bool(get_codebooks(phase_model)),
            "codebooks": {n: dataclasses.asdict(cb.cfg) for n, cb in get_codebooks(phase_model).items()},
            "n_parameters": sum(p.numel() for p in phase_model.parameters()),
            "heldout": {k: v for k, v in evals[phase].items() if k != "codebooks"},
            "heldout_codebooks": evals[phase].get("codebooks"),
            "heldout_bypassed": {k: v for k, v in evals["codebook_bypassed"].items()} if phase == "codebook" else None,
            "check": None
            if check is None
            else {"n_documents": len(check_texts), **evaluate(phase_model, check, count_codes=False)},
            "training_tokens": {p: phases[p]["tokens"] for p in _lineage(phase)},
            "training_steps": {p: phases[p]["steps"] for p in _lineage(phase)},
            "wall_s": {p: phases[p]["wall_s_this_run"] for p in _lineage(phase)},
            "data": data,
            "names": names,
            **(card_extra or {}),
        }
        results.setdefault("cards", {})[phase] = card
        write_model_folder(phase_model, tokenizer, out / phase, card)
    return results


_DESCRIPTIONS = {
    "baseline": "(a) the language model trained from scratch without codebooks",
    "codebook": "(b) (a) with codebooks attached, k-means initialised and trained end to end with aeloss",
    "finetuned": "(c) (a) trained as many further steps as (b), without codebooks",
}


def _lineage(phase: str) -> tuple[str, ...]:
    return ("baseline",) if phase == "baseline" else ("baseline", phase)
