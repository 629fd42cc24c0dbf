"""Reproduce the paper's FSM results: state accuracy with and without codebooks, and codes as classifiers of states.

    python benchmarks/fsm_precision.py                 # the default recipe (FSMRecipe.paper()), one seed
    python benchmarks/fsm_precision.py --seeds 0 1 2   # several seeds, one folder each, plus seeds.json
    python benchmarks/fsm_precision.py --quick         # FSMRecipe.quick(): a small machine and model (tests)

Training is `cbinterp.recipes.fsm.FSMRecipe.run`: a warm start without codebooks, codebooks after every attention
head and every MLP (k-means initialised), training through them, and a control copy of the warm-started model
trained the same extra steps without codebooks. The evaluation, measured as the paper measures it:

* state accuracy: sequences sampled from BOS at temperature 1 to the model's context, the share of valid
  transitions in the model's own output and the mean probability on valid next states, for the warm-started
  model, the control, the codebook model and the codebook model with its codebooks bypassed (the teacher-forced
  transition accuracy is reported beside it, under that name);
* state codes, feature first: for each state, the codes of MLP layers 1..L-1 (pooled, and per layer) with recall
  above 1%, ranked by precision; chosen on one half of the evaluation sequences, scored on the other; beside it,
  the best dimension of the attention and MLP outputs before quantization at the same recall (the paper's
  baseline) and, as an extra, the best MLP hidden unit; the same search for "state s > digit" features.

Interrupted runs resume from the checkpoints under `--out`; a finished run re-evaluates without training.

Under torchrun (`torchrun --nproc_per_node=2 benchmarks/fsm_precision.py --quick`) every rank trains its share of
each batch (data-parallel `cbinterp.train`) and rank 0 alone evaluates and writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import cbinterp
from cbinterp.core import tl_compat as tc
from cbinterp.core.codebooks.attach import codebooks_bypassed, get_codebooks
from cbinterp.core.device import default_device
from cbinterp.core.storage.atomic import atomic_file
from cbinterp.core.training import distributed as dd
from cbinterp.recipes.codebook import phases_summary
from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.reporting import write_json
from cbinterp.tasks.fsm import FSM, sampled_state_accuracy, teacher_forced_transition_accuracy
from cbinterp.tasks.fsm_analysis import (
    MLP_NEURONS,
    SITE_OUTPUTS,
    collect_fsm_activations,
    state_code_headline,
    state_code_report,
)

if __package__:  # python -m benchmarks.fsm_precision
    from . import fsm_table1
else:  # python benchmarks/fsm_precision.py: this folder is sys.path[0]
    import fsm_table1

ROOT = Path(__file__).resolve().parents[1]

#: The paper's figures (Tamkin et al. 2023, FSM section) beside which the same quantities are printed.
PAPER = {
    "state_accuracy_without_codebooks": 0.9677,
    "state_accuracy_with_codebooks": 0.6365,
    "state_code_precision_mean": 0.971,
    "site_outputs_precision_mean": 0.705,
}
#: Data streams of the evaluation (training uses 0..2, see cbinterp.recipes.fsm).
STREAM_EVAL, STREAM_SAMPLE, STREAM_TEACHER = 10, 11, 12
#: The headline keys aggregated over seeds.
SEED_KEYS = [
    "state_accuracy_without_codebooks",
    "state_accuracy_control",
    "state_accuracy_with_codebooks",
    "state_accuracy_bypassed",
    "valid_mass_without_codebooks",
    "valid_mass_control",
    "valid_mass_with_codebooks",
    "valid_mass_bypassed",
    "teacher_forced_with_codebooks",
    "teacher_forced_without_codebooks",
    "state_code_precision_mean",
    "state_code_recall_mean",
    "states_with_own_code",
    "states_with_precise_code",
    "precise_codes_per_state_mean",
    "prev_share_mean",
    "prev_share_baseline_mean",
    "site_outputs_precision_mean",
    "mlp_neurons_precision_mean",
    "state_digit_code_precision_mean",
    "state_digit_code_recall_mean",
    "state_digit_features_with_own_code",
    "state_digit_precise_codes",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="FSMRecipe.quick() instead of FSMRecipe.paper()")
    preset.add_argument(
        "--paper-scale",
        action="store_true",
        help="FSMRecipe.paper_scale(): the paper's schedule (20k steps of 512 sequences; for a GPU)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default: 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default benchmarks/out/fsm (with --quick benchmarks/out/fsm_quick); with several seeds one "
        "folder seed_<s> each",
    )
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--fresh", action="store_true", help="delete earlier checkpoints instead of resuming")
    parser.add_argument("--compile", action="store_true", help="train through torch.compile")
    parser.add_argument("--no-neurons", action="store_true", help="skip the neuron baselines (faster)")
    parser.add_argument("--no-progress", action="store_true")
    group = parser.add_argument_group("recipe overrides (recorded; a resumed run must match)")
    group.add_argument("--codebook-loss", choices=["aeloss", "vqvae"], help="default aeloss (the paper's)")
    group.add_argument("--n-states", type=int, help="states of the machine (default 100; 20 with --quick)")
    group.add_argument("--n-edges", type=int, help="out-edges of each state (default 10; 4 with --quick)")
    group.add_argument("--base", type=int, help="digits per token: a state is written in base BASE (default 10)")
    for name in ("short_steps", "warm_steps", "codebook_steps", "n_codes", "batch", "seq_len"):
        group.add_argument("--" + name.replace("_", "-"), type=int)
    group = parser.add_argument_group("the paper's Table 1 (benchmarks/fsm_table1.py)")
    group.add_argument(
        "--table1",
        action="store_true",
        help="train and score the paper's Table 1 codebook configurations from the default run's warm start",
    )
    group.add_argument("--table1-skip-k128", action="store_true", help="leave out the k = 128 row (the slowest)")
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-positions", type=int, default=None, help="default 100000 (30000 with --quick)")
    group.add_argument("--sample-sequences", type=int, default=500, help="sequences sampled for state accuracy")
    group.add_argument("--min-recall", type=float, default=0.01, help="the paper's recall cut of the code search")
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    args.out = args.out or ROOT / "benchmarks" / "out" / (
        "fsm_quick" if args.quick else "fsm_paper_scale" if args.paper_scale else "fsm"
    )
    args.eval_positions = args.eval_positions or (30_000 if args.quick else 100_000)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds lists a seed twice: {args.seeds}")
    return args


def recipe_of(args: argparse.Namespace, seed: int) -> FSMRecipe:
    """The recipe of one seed: the preset with the command line's overrides."""
    preset = FSMRecipe.quick if args.quick else FSMRecipe.paper_scale if args.paper_scale else FSMRecipe.paper
    recipe = preset(seed=seed)
    names = ("n_states", "n_edges", "base", "batch", "seq_len")
    fields = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    recipe = dataclasses.replace(recipe, **fields) if fields else recipe
    training = recipe.training
    if args.warm_steps is not None:
        training = dataclasses.replace(training, warm=dataclasses.replace(training.warm, steps=args.warm_steps))
    if args.short_steps is not None:
        if not training.pretrain:
            raise SystemExit("--short-steps: this preset has no short-window stage.")
        pretrain = [dataclasses.replace(p, steps=args.short_steps) for p in training.pretrain if args.short_steps]
        training = dataclasses.replace(training, pretrain=pretrain)
    if args.codebook_steps is not None:
        training = dataclasses.replace(
            training, phases=[dataclasses.replace(p, steps=args.codebook_steps) for p in training.phases]
        )
    spec = training.codebooks
    if args.codebook_loss is not None:
        spec = dataclasses.replace(spec, loss=args.codebook_loss)
    if args.n_codes is not None:
        spec = dataclasses.replace(spec, n_codes=args.n_codes)
    return dataclasses.replace(recipe, training=dataclasses.replace(training, codebooks=spec))


def check_resumable(out: Path, settings: dict, fresh: bool) -> None:
    """Refuse to continue checkpoints made with another recipe (their continuation would be meaningless)."""
    ckpt = out / "checkpoints"
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    if fresh and ckpt.exists():
        shutil.rmtree(ckpt)
    saved = ckpt / "recipe.json"
    if saved.exists():
        before = json.loads(saved.read_text())
        if before != settings:
            changed = sorted(k for k in set(settings) | set(before) if before.get(k) != settings.get(k))
            raise SystemExit(
                f"{ckpt} holds a run of another recipe (differing: {changed}). Pass --fresh to start over, "
                f"or --out to write elsewhere."
            )
    ckpt.mkdir(parents=True, exist_ok=True)
    with atomic_file(saved) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))


# -- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy_of(model, fsm: FSM, recipe: FSMRecipe, args: argparse.Namespace) -> dict:
    """Loss, the paper's sampled state accuracy (and valid next-state mass), and the teacher-forced accuracy."""
    model.eval()
    val = fsm.sample(256, recipe.seq_len, seed=recipe.data_seed(STREAM_TEACHER))
    loss = float(model(val.tokens.to(args.device), return_type="loss"))
    sampled = sampled_state_accuracy(
        model, fsm, n_sequences=args.sample_sequences, seq_len=recipe.seq_len, seed=recipe.data_seed(STREAM_SAMPLE)
    )
    max_cut = (recipe.seq_len - 1) // fsm.digits - 1
    cuts = sorted({c for c in (1, 2, 4, 8, 16, 32, max_cut) if 1 <= c <= max_cut})  # every cut costs a pass
    teacher = teacher_forced_transition_accuracy(
        model, fsm, n_sequences=256, seq_len=recipe.seq_len, cut_states=cuts, seed=recipe.data_seed(STREAM_TEACHER)
    )
    return {
        "loss": loss,
        "optimal_loss": fsm.optimal_loss(val),
        "state_accuracy": sampled["state_accuracy"],
        "valid_next_state_mass": sampled["valid_next_state_mass"],
        "valid_state_share": sampled["valid_state_share"],
        "sampled_transitions": sampled["n_transitions"],
        "teacher_forced_transition_accuracy": teacher["transition_accuracy"],
    }


def mlp_codebooks(model) -> dict[int, str]:
    return {int(name.split(".")[1]): name for name in get_codebooks(model) if name.endswith("hook_mlp_out")}


def code_search(model, fsm: FSM, recipe: FSMRecipe, args: argparse.Namespace) -> dict:
    """The feature-first state (and state+digit) code search and the neuron baselines."""
    acts = collect_fsm_activations(
        model,
        fsm,
        n_positions=args.eval_positions,
        seq_len=recipe.seq_len,
        seed=recipe.data_seed(STREAM_EVAL),
        progress=not args.no_progress,
        neurons=not args.no_neurons,
    )
    mlp = mlp_codebooks(model)
    pooled_layers = [layer for layer in sorted(mlp) if layer >= 1] or sorted(mlp)  # the paper: MLP layers 1-3
    pooled = [mlp[layer] for layer in pooled_layers]
    states = state_code_report(model, fsm, acts, pooled, "state", args.min_recall, neurons=not args.no_neurons)
    per_layer = {}
    for layer, name in sorted(mlp.items()):
        table = state_code_report(model, fsm, acts, [name], "state", args.min_recall, neurons=False)
        per_layer[f"mlp_layer_{layer}"] = state_code_headline(table)
    # with one digit per state, "state, then its first digit" is the next state itself: no such features
    digits = None
    if fsm.digits > 1:
        digits = state_code_report(model, fsm, acts, pooled, "state+digit", args.min_recall, neurons=False)
    return {
        "pooled_layers": pooled_layers,
        "eval_positions": acts.n_positions,
        "states": states,
        "state_headline": state_code_headline(states),
        "per_layer": per_layer,
        "state_digit": digits,
        "state_digit_headline": state_code_headline(digits) if digits is not None else {},
    }


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    start = time.perf_counter()
    recipe = recipe_of(args, seed)
    settings = recipe.to_dict()
    print("recipe:", json.dumps(settings), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if dd.is_main():
        check_resumable(out, settings, args.fresh)
    dd.barrier("the check of the output folder", 0)
    fsm, result = recipe.run(
        checkpoint_dir=out / "checkpoints", device=args.device, progress=not args.no_progress, compile=args.compile
    )
    if not dd.is_main():  # the other ranks only train: rank 0 evaluates the (identical) models and writes
        return {}
    training_s = time.perf_counter() - start
    fsm.save(out / "fsm.json")
    extra = {"benchmark": "fsm_precision", "recipe": settings}
    cbinterp.save(result.model, out / "model", extra=extra)
    cbinterp.save(result.warm_model, out / "model_warm", extra=extra)
    if result.control_model is not None:
        cbinterp.save(result.control_model, out / "model_control", extra=extra)

    models = {"without_codebooks": result.warm_model, "control": result.control_model, "with_codebooks": result.model}
    accuracy = {name: accuracy_of(m, fsm, recipe, args) for name, m in models.items() if m is not None}
    with codebooks_bypassed(result.model):
        accuracy["bypassed"] = accuracy_of(result.model, fsm, recipe, args)
    for name, row in accuracy.items():
        print(f"{name:>18}: {fmt(row)}", flush=True)
    eval_acc_s = time.perf_counter() - start - training_s

    search = code_search(result.model, fsm, recipe, args)
    sh, dh = search["state_headline"], search["state_digit_headline"]
    headline = {
        f"state_accuracy_{name}": accuracy[key]["state_accuracy"]
        for name, key in [
            ("without_codebooks", "without_codebooks"),
            ("control", "control"),
            ("with_codebooks", "with_codebooks"),
            ("bypassed", "bypassed"),
        ]
        if key in accuracy
    }
    headline |= {f"valid_mass_{name}": accuracy[name]["valid_next_state_mass"] for name in accuracy}
    headline |= {
        "valid_mass_without_codebooks": accuracy["without_codebooks"]["valid_next_state_mass"],
        "valid_mass_with_codebooks": accuracy["with_codebooks"]["valid_next_state_mass"],
        "teacher_forced_with_codebooks": accuracy["with_codebooks"]["teacher_forced_transition_accuracy"],
        "teacher_forced_without_codebooks": accuracy["without_codebooks"]["teacher_forced_transition_accuracy"],
        "state_code_precision_mean": sh["best_code_precision_mean"],
        "state_code_recall_mean": sh["best_code_recall_mean"],
        "states_with_own_code": sh["features_with_own_code"],
        "states_with_precise_code": sh["features_with_precise_code"],
        "precise_codes_per_state_mean": sh["precise_codes_per_feature_mean"],
        "prev_share_mean": sh.get("prev_share_mean"),
        "prev_share_baseline_mean": sh.get("prev_share_baseline_mean"),
        "site_outputs_precision_mean": sh.get(f"{SITE_OUTPUTS}_precision_mean"),
        "site_outputs_recall_mean": sh.get(f"{SITE_OUTPUTS}_recall_mean"),
        "mlp_neurons_precision_mean": sh.get(f"{MLP_NEURONS}_precision_mean"),
        "mlp_neurons_recall_mean": sh.get(f"{MLP_NEURONS}_recall_mean"),
        "state_digit_features": dh.get("n_features"),
        "state_digit_code_precision_mean": dh.get("best_code_precision_mean"),
        "state_digit_code_recall_mean": dh.get("best_code_recall_mean"),
        "state_digit_features_with_own_code": dh.get("features_with_own_code"),
        "state_digit_precise_codes": None
        if search["state_digit"] is None
        else int(search["state_digit"]["n_precise_codes"].sum()),
    }
    timings = {"training_s": training_s, "accuracy_s": eval_acc_s, "total_s": time.perf_counter() - start}
    results = {
        "seed": seed,
        "recipe": settings,
        "device": args.device,
        "phases": phases_summary(recipe.training, recipe.phase_tokens_per_step),
        "tokens": result.tokens,
        "phase_seconds": result.seconds,
        "kmeans_initialised_this_run": result.kmeans_initialised,
        "paper": PAPER,
        "headline": headline,
        "accuracy": accuracy,
        "code_search": {
            "pooled_mlp_layers": search["pooled_layers"],
            "eval_positions": search["eval_positions"],
            "min_recall": args.min_recall,
            "split": "sequences with even index select codes and neurons, odd ones score them",
            "state_headline": sh,
            "per_mlp_layer": search["per_layer"],
            "state_digit_headline": dh,
            "states": _records(search["states"]),
        },
        "losses": result.losses,
        "timings_s": timings,
    }
    report(results, search)
    write_json(out / "results.json", results, indent=1)
    try:
        from cbinterp.viz.plots import state_code_figure

        figure = state_code_figure(search["states"], title=f"FSM ({fsm.n_states} states), seed {seed}: state codes")
        with atomic_file(out / "figure.html") as tmp:
            figure.write_html(tmp, include_plotlyjs="cdn")
    except ImportError:
        pass
    print(f"wrote {out}/results.json, figure.html, model/, model_warm/, model_control/, fsm.json", flush=True)
    return results


def fmt(row: dict) -> str:
    return (
        f"loss {row['loss']:.4f} (optimal {row['optimal_loss']:.4f}), sampled state accuracy "
        f"{row['state_accuracy']:.4f}, valid next-state mass {row['valid_next_state_mass']:.4f}, "
        f"teacher-forced transition accuracy {row['teacher_forced_transition_accuracy']:.4f}"
    )


def report(results: dict, search: dict) -> None:
    h = results["headline"]
    print("\nphases (tokens):", ", ".join(f"{k} {v:,}" for k, v in results["tokens"].items()))
    print("\nsame quantities as the paper:")
    rows = [
        ("state accuracy, without codebooks", "state_accuracy_without_codebooks", "0.9677"),
        ("state accuracy, with codebooks", "state_accuracy_with_codebooks", "0.6365"),
        (
            f"mean precision of each state's best code (MLP layers {search['pooled_layers']}, recall > 1%)",
            "state_code_precision_mean",
            "0.971",
        ),
        (
            "best attn/MLP output dimension at that code's recall, mean precision",
            "site_outputs_precision_mean",
            "0.705",
        ),
    ]
    for label, key, paper in rows:
        value = h.get(key)
        print(f"  {label:<92} {_f(value):>8}   paper {paper}")
    print("ours (no paper figure):")
    for key in [k for k in SEED_KEYS if k not in PAPER] + ["site_outputs_recall_mean", "state_digit_features"]:
        print(f"  {key:<60} {_f(h.get(key)):>8}")
    print("per MLP layer (state codes): layer, best-code precision mean, recall mean, states with own code")
    for name, row in search["per_layer"].items():
        print(
            f"  {name}: {row['best_code_precision_mean']:.3f} {row['best_code_recall_mean']:.3f} "
            f"{row['features_with_own_code']}"
        )
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items()), flush=True)


def _f(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.3f}"


def aggregate(per_seed: list[dict]) -> dict:
    """Mean, standard deviation (n-1), min and max of each headline figure over seeds."""
    out = {}
    for key in SEED_KEYS:
        values = [r["headline"].get(key) for r in per_seed]
        values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not values:
            continue
        out[key] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "min": float(np.min(values)),
            "max": float(np.max(values)),
            "n": len(values),
        }
    return out


def run(args: argparse.Namespace) -> dict:
    if len(args.seeds) == 1:
        return run_seed(args, args.seeds[0], args.out)
    per_seed = [run_seed(args, seed, args.out / f"seed_{seed}") for seed in args.seeds]
    if not dd.is_main():
        return {}
    summary = {"seeds": args.seeds, "aggregate": aggregate(per_seed), "per_seed": [r["headline"] for r in per_seed]}
    write_json(args.out / "seeds.json", summary, indent=1)
    print(f"\nover seeds {args.seeds} (mean ± std [min, max]):")
    for key, s in summary["aggregate"].items():
        print(f"  {key:<40} {s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]")
    print(f"wrote {args.out}/seeds.json", flush=True)
    return summary


def _records(table) -> list[dict]:
    """Rows as dicts, with NaN ("not measured") as null: JSON has no NaN."""
    return table.astype(object).where(table.notna(), None).to_dict(orient="records")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not tc.HAS_HOOKED:
        what, instead = "fsm_precision.py trains from a config and", "measure a saved model with fsm_intervention.py"
        raise SystemExit(tc.no_hooked_message(what, instead + " --from DIR (DIR/model, DIR/fsm.json)"))
    if "WORLD_SIZE" in os.environ:  # launched by torchrun: join its process group, one device per rank
        args.device = str(dd.init_from_env(args.device))
    if args.table1:
        if "WORLD_SIZE" in os.environ:
            raise SystemExit("--table1 runs in one process; start it with python, not torchrun.")
        return fsm_table1.main(args, recipe_of, check_resumable)
    return run(args)


if __name__ == "__main__":
    main()
