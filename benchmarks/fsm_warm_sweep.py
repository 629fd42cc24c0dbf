"""How fast the FSM model learns the machine without codebooks: state accuracy against steps, tokens and time.

    python benchmarks/fsm_warm_sweep.py --name full --stages 1500:32:128:3e-3
    python benchmarks/fsm_warm_sweep.py --name short_then_full --stages 1000:64:16:3e-3,1000:32:128:1e-3

Each stage is `steps:batch:seq_len:lr` (AdamW, 50 warmup steps at most a tenth of the stage, cosine to a tenth,
weight decay 0.01; a stage's data is its own stream). The model is `FSMRecipe.paper(seed)`'s. Every `--eval-every`
steps it reports the validation loss beside the machine's optimum, the paper's sampled state accuracy (sequences
sampled from BOS at temperature 1 to 128 tokens) and the teacher-forced validity of the greedy next state after 1, 4
and 16 true states; the training seconds exclude evaluation. Writes `<out>/<name>.json` and prints a table. This is
the measurement behind the default recipe's stages (benchmarks/README.md, "Why a short-window stage").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cbinterp.core.training.config import TrainConfig
from cbinterp.core.training.train import train
from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.reporting import print_table, write_json
from cbinterp.tasks.fsm import sampled_state_accuracy, teacher_forced_transition_accuracy

ROOT = Path(__file__).resolve().parents[1]
#: Evaluation streams (the recipe's training uses 0..3).
STREAM_VAL, STREAM_SAMPLE, STREAM_TEACHER = 30, 31, 32


def parse_stage(text: str) -> tuple[int, int, int, float]:
    """`steps:batch:seq_len:lr` -> its four values."""
    try:
        steps, batch, seq_len, lr = text.split(":")
        return int(steps), int(batch), int(seq_len), float(lr)
    except ValueError:
        raise ValueError(f"a stage is steps:batch:seq_len:lr, e.g. 1000:64:16:3e-3; got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the candidate's name (the JSON file's)")
    parser.add_argument("--stages", required=True, help="comma-separated steps:batch:seq_len:lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-states", type=int, default=100, help="the machine's shape (default: the paper's)")
    parser.add_argument("--n-edges", type=int, default=10)
    parser.add_argument("--base", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--sample-sequences", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "fsm_warm_sweep")
    args = parser.parse_args(argv)
    try:
        args.stages = [parse_stage(stage) for stage in args.stages.split(",")]
    except ValueError as error:
        parser.error(f"--stages: {error}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = FSMRecipe.paper(seed=args.seed, n_states=args.n_states, n_edges=args.n_edges, base=args.base)
    fsm = recipe.fsm()
    model = recipe.build_model(fsm, "cpu")
    val = fsm.sample(256, recipe.seq_len, seed=recipe.data_seed(STREAM_VAL))
    optimal = fsm.optimal_loss(val)
    rows: list[dict] = []
    done = {"steps": 0, "tokens": 0, "seconds": 0.0}

    def evaluate(stage_tokens: int, started: float, eval_seconds: list[float]):
        def at(model, step: int) -> dict:
            begin = time.perf_counter()
            with torch.no_grad():
                loss = float(model(val.tokens.to(next(model.parameters()).device), return_type="loss"))
            sampled = sampled_state_accuracy(
                model, fsm, args.sample_sequences, recipe.seq_len, seed=recipe.data_seed(STREAM_SAMPLE)
            )
            teacher = teacher_forced_transition_accuracy(
                model, fsm, 128, recipe.seq_len, cut_states=[1, 4, 16], seed=recipe.data_seed(STREAM_TEACHER)
            )
            row = {
                "step": done["steps"] + step,
                "tokens": done["tokens"] + step * stage_tokens,
                "training_s": done["seconds"] + (begin - started) - eval_seconds[0],
                "loss": loss,
                "optimal_loss": optimal,
                "state_accuracy": sampled["state_accuracy"],
                "teacher_forced": teacher["per_cut"],
            }
            rows.append(row)
            print(row, flush=True)
            eval_seconds[0] += time.perf_counter() - begin
            return {"state_accuracy": row["state_accuracy"]}

        return at

    for i, (steps, batch, seq_len, lr) in enumerate(args.stages):
        cfg = TrainConfig(
            steps=steps,
            lr=lr,
            warmup_steps=min(50, steps // 10),
            eval_every=args.eval_every,
            seed=args.seed + i,
            progress=False,
        )
        started, eval_seconds = time.perf_counter(), [0.0]
        data = fsm.token_batches(batch, seq_len, seed=1000 * args.seed + 100 + i)
        train(model, data, cfg, eval_fn=evaluate(batch * seq_len, started, eval_seconds), resume=False)
        done["seconds"] += time.perf_counter() - started - eval_seconds[0]
        done["steps"] += steps
        done["tokens"] += steps * batch * seq_len
    header = ["step", "tokens", "training s", "loss", "state accuracy", "teacher-forced 1 / 4 / 16"]
    table = [
        [
            r["step"],
            f"{r['tokens'] / 1e6:.2f}M",
            f"{r['training_s']:.0f}",
            f"{r['loss']:.3f}",
            f"{r['state_accuracy']:.3f}",
            " / ".join(f"{r['teacher_forced'][c]:.2f}" for c in (1, 4, 16)),
        ]
        for r in rows
    ]
    print_table(header, table)
    path = write_json(
        args.out / f"{args.name}.json",
        {
            "name": args.name,
            "seed": args.seed,
            "machine": fsm.to_dict() | {"successors": None},
            "stages": args.stages,
            "rows": rows,
        },
    )
    print(f"wrote {path}", flush=True)
    return rows


if __name__ == "__main__":
    main()
