"""The paper's codebook language model, trained in three phases from library calls, and its held-out evaluation.

    (a) baseline   a HookedTransformer LM trained from scratch on packed text, without codebooks
    (b) codebook   (a) with codebooks attached at `sites` (by default one per attention head, k = 8 as the paper's
                   TinyStories model), initialised by k-means on their own inputs, then trained end to end with the
                   paper's loss `aeloss` (the codes learn to reconstruct the activation, which gets no gradient from
                   it; the network learns through the codes by the straight-through estimator)
    (c) finetuned  (a) trained for the same number of extra steps as (b), without codebooks, on the same batches
                   with the same learning-rate schedule: the paper's "fine-tuned" row, so that (b) versus (c) has no
                   step-count confound

`run_lm` trains the phases through the phase runner, `cbinterp.recipes.codebook.run_recipe` (the FSM model's
runner too), with the phases of `LMRecipe.codebook_recipe()`: (a) is its warm start, (b) its codebook phase, (c) its
control. Every phase has its own checkpoint folder, so an interrupted run resumes where it stopped.

`evaluate` measures, on packed held-out windows, the mean next-token loss (nats per predicted token), the
next-token accuracy (argmax) and, for a codebook model, which codes fire: a code that no held-out token selects
(in any of its k slots) is dead. `run_lm` runs everything and writes each model as a folder that
`cbinterp.pretrained.load_pretrained` opens: ``model/`` (`cbinterp.save`), ``tokenizer/`` and ``card.json``.

The parts live in one module per job, all re-exported here: `lm_recipe` (`LMRecipe`, `train_config`), `lm_phases`
(tokenizer, model, batches, codebooks, each phase on its own), `evaluate` (held-out metrics) and `model_card` (the
model folder and its card).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cbinterp.core.codebooks.attach import codebooks_bypassed
from cbinterp.core.storage.atomic import atomic_file, recover_dir
from cbinterp.core.tl_compat import Model
from cbinterp.core.training.train import TrainResult
from cbinterp.recipes.codebook import resumes_codebook_phases, run_recipe
from cbinterp.recipes.evaluate import evaluate, heldout_sequences
from cbinterp.recipes.lm_phases import (
    add_codebooks,
    batch_source,
    build_model,
    finetune_baseline,
    kmeans_tokens,
    train_baseline,
    train_batches,
    train_codebook_model,
    train_tokenizer,
)
from cbinterp.recipes.lm_recipe import PHASES, LMRecipe, default_device, train_config
from cbinterp.recipes.model_card import CARD_FILE, CARD_FORMAT, MODEL_DIR, TOKENIZER_DIR, lm_card, write_model_folder
from cbinterp.tasks.text import load_tokenizer, tokenizer_fingerprint

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "MODEL_DIR",
    "PHASES",
    "TOKENIZER_DIR",
    "LMRecipe",
    "add_codebooks",
    "batch_source",
    "build_model",
    "default_device",
    "evaluate",
    "finetune_baseline",
    "heldout_sequences",
    "kmeans_tokens",
    "run_lm",
    "train_baseline",
    "train_batches",
    "train_codebook_model",
    "train_config",
    "train_tokenizer",
    "write_model_folder",
]


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


def run_lm(
    recipe: LMRecipe,
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    out: str | Path,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    card_extra: dict | None = None,
    names: dict[str, str] | None = None,
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
    training = recipe.codebook_recipe()
    init_path = ckpt / "codebook_init.json"
    resuming = resumes_codebook_phases(training, ckpt)  # then the codes come from the checkpoint: no k-means

    def trained(phase: str, result: TrainResult, seconds: float) -> None:
        record = _phase_record(result, recipe, seconds, result.steps)
        record["load_average_1min_at_end"] = os.getloadavg()[0]  # other jobs on the machine slow the run down
        phases[phase] = _kept_record(ckpt / f"{phase}.json", record)
        timings[f"{phase}_train_s"] = seconds
        record, letter = phases[phase], "abc"[PHASES.index(phase)]
        if record["trained_by_earlier_run"]:
            log(f"  ({letter}) trained by an earlier run in {record['wall_s_this_run']:.0f} s")
        elif record["tokens_per_s"]:
            log(f"  ({letter}) {record['tokens_per_s']:,.0f} tokens/s")

    def evaluated(key: str, phase_model: Model) -> None:
        mark = time.perf_counter()
        evals[key] = evaluate(phase_model, heldout, recipe.eval_batch_size)
        timings[f"eval_{key}_s"] = time.perf_counter() - mark
        log(f"  held-out {key}: loss {evals[key]['loss']:.4f} nats/token, accuracy {evals[key]['accuracy']:.4f}")

    def after_phase(phase: str, phase_model: Model) -> None:
        if phase == "attached":  # the codebook model before training, on part of the held-out windows
            if not resuming:
                at_init = evaluate(phase_model, heldout[: 4 * recipe.eval_batch_size], recipe.eval_batch_size)
                with atomic_file(init_path) as tmp:
                    tmp.write_text(json.dumps(at_init))
            return
        if phase == "codebook":
            evals["codebook_at_init"] = json.loads(init_path.read_text()) if init_path.exists() else None
        evaluated(phase, phase_model)
        if phase == "codebook":
            with codebooks_bypassed(phase_model):
                evaluated("codebook_bypassed", phase_model)

    trainings = run_recipe(
        model,
        batch_source(batches, recipe),
        training,
        kmeans_tokens=kmeans_tokens(batches, recipe),
        checkpoint_dir=ckpt,
        progress=progress,
        log=log,
        after_phase=after_phase,
        on_trained=trained,
    )
    timings["total_s"] = time.perf_counter() - start

    models = {"baseline": trainings.warm_model, "codebook": trainings.model, "finetuned": trainings.control_model}
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
        checked = None if check is None else evaluate(phase_model, check, count_codes=False)
        card = lm_card(
            phase,
            phase_model,
            name=names[phase],
            recipe=recipe.to_dict(),
            evals=evals,
            phases=phases,
            check=None if checked is None else {"n_documents": len(check_texts), **checked},
            data=data,
            names=names,
            extra=card_extra,
        )
        results.setdefault("cards", {})[phase] = card
        write_model_folder(phase_model, tokenizer, out / phase, card)
    return results
