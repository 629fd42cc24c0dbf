"""The paper's Table 1 on the FSM: state accuracy without codebooks and with codebooks of growing k.

    python benchmarks/fsm_precision.py --table1                 # seed 0, from the default run's warm start
    python benchmarks/fsm_precision.py --table1 --seeds 0 1 2   # the spread over seeds
    python benchmarks/fsm_table1.py --seeds 0 1 2              # the same

Every row starts from the same warm-started model (the default recipe's, resumed from `--out`'s checkpoints when
`fsm_precision.py` trained it there already) and trains the codebook phase's steps with the default recipe's
settings; only the codebooks differ. The "no codebook" row is the default run's control (the same extra steps
without codebooks) and the "attention + MLP, k = 1" row is the default run's codebook model, so both are resumed
from the default run. Each row reports the validation loss (the machine's optimal loss beside it), the next-token
accuracy (argmax against the data's next token, every position) and the paper's sampled state accuracy.

Where ours differs from the paper's Table 1: the paper trains each row from scratch with its codebooks for 20k
steps of 512 sequences and uses C = 10k or 20k codes; we warm-start once and train each row's codebooks for the
default recipe's codebook steps with C = 1000 (a CPU budget), k-means initialised (for k > 1 each centroid divided
by k, since the output sums k codes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cbinterp.recipes.codebook import CodebookRecipe
from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.reporting import print_table, write_json
from cbinterp.tasks.fsm import FSM, sampled_state_accuracy

#: The paper's Table 1 (FSM): loss, next-token accuracy (%), state accuracy (%), where the paper gives them.
PAPER_ROWS = {
    "none": {"loss": 1.179, "next_token_accuracy": 46.36, "state_accuracy": 96.77},
    "attn_k1": {"state_accuracy": 96.39},
    "attn_mlp_k1": {"state_accuracy": 63.65},
    "attn_mlp_k4": {"state_accuracy": 80.69},
    "attn_mlp_k16": {"state_accuracy": 91.53},
    "attn_mlp_k128": {"state_accuracy": 95.82},
}
#: Row name -> (codebook sites, k); None: no codebooks (the control).
ROWS = {
    "none": None,
    "attn_k1": (("attn",), 1),
    "attn_mlp_k1": (("attn", "mlp"), 1),
    "attn_mlp_k4": (("attn", "mlp"), 4),
    "attn_mlp_k16": (("attn", "mlp"), 16),
    "attn_mlp_k128": (("attn", "mlp"), 128),
}
LABELS = {
    "none": "no codebook",
    "attn_k1": "attention only, k = 1",
    "attn_mlp_k1": "attention + MLP, k = 1",
    "attn_mlp_k4": "attention + MLP, k = 4",
    "attn_mlp_k16": "attention + MLP, k = 16",
    "attn_mlp_k128": "attention + MLP, k = 128",
}
#: Evaluation streams of this table (training uses 0..3, fsm_precision 10..12).
STREAM_VAL, STREAM_SAMPLE = 20, 21


def row_training(base: CodebookRecipe, row: str) -> CodebookRecipe:
    """The recipe of one row: the default one with that row's codebooks (the default phase names where it is it)."""
    if ROWS[row] is None or row == "attn_mlp_k1":
        return base
    sites, k = ROWS[row]
    spec = dataclasses.replace(base.codebooks, sites=sites, k=k, kmeans_mean_of_k=k > 1)
    phases = [dataclasses.replace(p, name=f"{p.name}_{row}") for p in base.phases]
    return dataclasses.replace(base, codebooks=spec, phases=phases, control=False)


@torch.no_grad()
def row_metrics(model, fsm: FSM, recipe: FSMRecipe, n_sequences: int, device: str) -> dict:
    """Validation loss and next-token accuracy (teacher-forced), and the sampled state accuracy."""
    model.eval()
    data = fsm.sample(512, recipe.seq_len, seed=recipe.data_seed(STREAM_VAL))
    val = data.tokens.to(device)
    losses, hits = [], []
    for rows in val.split(128):
        logits = model(rows)
        losses.append(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten()))
        hits.append((logits[:, :-1].argmax(-1) == rows[:, 1:]).float().mean())
    sampled = sampled_state_accuracy(model, fsm, n_sequences, recipe.seq_len, seed=recipe.data_seed(STREAM_SAMPLE))
    return {
        "loss": float(torch.stack(losses).mean()),
        "optimal_loss": fsm.optimal_loss(data),
        "next_token_accuracy": float(torch.stack(hits).mean()),
        "state_accuracy": sampled["state_accuracy"],
        "valid_next_state_mass": sampled["valid_next_state_mass"],
    }


def run_seed(args: argparse.Namespace, recipe: FSMRecipe, out: Path, rows: list[str]) -> dict:
    """Every row of one seed's `recipe`, resumed from (and checkpointed under) `out/checkpoints`."""
    seed, results = recipe.seed, {}
    # the rows the default run trains too come last: by then a default run beside this one has trained them
    for row in sorted(rows, key=lambda row: row_training(recipe.training, row) is recipe.training):
        start = time.perf_counter()
        training = row_training(recipe.training, row)
        _, result = dataclasses.replace(recipe, training=training).run(
            checkpoint_dir=out / "checkpoints", device=args.device, progress=not args.no_progress
        )
        model = result.control_model if ROWS[row] is None else result.model
        results[row] = row_metrics(model, recipe.fsm(), recipe, args.sample_sequences, args.device)
        results[row]["seconds"] = time.perf_counter() - start
        results[row]["codes"] = None if ROWS[row] is None else recipe.training.codebooks.n_codes
        print(f"seed {seed} {LABELS[row]}: {json.dumps(results[row])}", flush=True)
    return {row: results[row] for row in rows}


def aggregate(per_seed: dict[int, dict], rows: list[str]) -> dict:
    """Per row and measure: mean and standard deviation (n-1) over seeds."""
    out = {}
    for row in rows:
        out[row] = {}
        for key in ("loss", "next_token_accuracy", "state_accuracy", "valid_next_state_mass"):
            values = np.array([per_seed[s][row][key] for s in per_seed])
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out[row][key] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
    return out


def report(summary: dict, rows: list[str]) -> None:
    """The table beside the paper's rows (percentages as the paper prints them)."""

    def cell(row: str, key: str, scale: float = 1.0) -> str:
        s = summary[row][key]
        return f"{scale * s['mean']:.2f} ± {scale * s['std']:.2f}"

    def paper(row: str, key: str) -> str:
        value = PAPER_ROWS.get(row, {}).get(key)
        return "-" if value is None else f"{value}"

    header = ["codebooks", "loss", "paper", "next-token acc %", "paper", "state acc %", "paper"]
    table = [
        [
            LABELS[row],
            cell(row, "loss"),
            paper(row, "loss"),
            cell(row, "next_token_accuracy", 100),
            paper(row, "next_token_accuracy"),
            cell(row, "state_accuracy", 100),
            paper(row, "state_accuracy"),
        ]
        for row in rows
    ]
    print_table(header, table)


def main(
    args: argparse.Namespace,
    recipe_of: Callable[[argparse.Namespace, int], FSMRecipe],
    check_resumable: Callable[[Path, dict, bool], None],
) -> dict:
    """Run the table for `args.seeds` and write `table1.json` under `args.out`.

    Args:
        recipe_of, check_resumable: `fsm_precision`'s: the recipe of a seed, and the check that a folder's
            checkpoints were made by that recipe (the default run's folder is reused)."""
    rows = [row for row in ROWS if row != "attn_mlp_k128" or not args.table1_skip_k128]
    per_seed = {}
    for seed in args.seeds:
        out = args.out if len(args.seeds) == 1 else args.out / f"seed_{seed}"
        recipe = recipe_of(args, seed)
        check_resumable(out, recipe.to_dict(), args.fresh)
        per_seed[seed] = run_seed(args, recipe, out, rows)
    summary = aggregate(per_seed, rows)
    report(summary, rows)
    write_json(
        args.out / "table1.json",
        {"seeds": args.seeds, "rows": rows, "paper": PAPER_ROWS, "aggregate": summary, "per_seed": per_seed},
        indent=1,
    )
    print(f"wrote {args.out}/table1.json", flush=True)
    return summary


if __name__ == "__main__":  # the same as fsm_precision.py --table1, with its options
    import sys

    if __package__:
        from . import fsm_precision
    else:
        import fsm_precision
    fsm_precision.main(["--table1", *sys.argv[1:]])
