"""Data-parallel training speed: tokens/s of `cbinterp.train` on 1 and 2 ranks (DistributedDataParallel).

The model is the FSM benchmark's (`FSMRecipe.paper()`: 4 layers, d_model 128, 4 heads, d_mlp 512, vocabulary 11) with
a codebook after every head and every MLP (1000 codes, k=1), trained with the same global batch (32 x 128 tokens) on
every world size, so that each rank of N does 1/N of the work. The ranks are started with torch.multiprocessing
(gloo on the CPU, nccl with --device cuda, one GPU per rank), or, under torchrun, the launched ranks are measured:

    .venv/bin/python benchmarks/ddp_speed.py            # 1 and 2 ranks: table + benchmarks/out/ddp_speed.json
    .venv/bin/python benchmarks/ddp_speed.py --device cuda --world-sizes 1 2 4 8
    torchrun --nproc_per_node=2 benchmarks/ddp_speed.py # the launched world size only

On a CPU the ranks share its cores (each gets cores / N threads), so no speed-up is expected there: the point is that
the distributed path runs and what it costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cbinterp import attach_codebooks
from cbinterp.core.training import distributed as dd
from cbinterp.core.training.train import TrainConfig, train
from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.reporting import environment, write_report

ROOT = Path(__file__).resolve().parents[1]

_RECIPE = FSMRecipe.paper()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and 3 steps (a smoke test, not a timing)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 12; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick 1)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 32; --quick 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128; --quick 32")
    parser.add_argument("--n-codes", type=int, default=None, help="default 1000; --quick 64")
    parser.add_argument("--autocast", default=None, choices=["bf16"], help="default: full precision")
    parser.add_argument("--threads-per-rank", type=int, default=None, help="CPU threads per rank (default cores/N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ddp_speed.json")
    args = parser.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (2 if q else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.batch = args.batch or (4 if q else _RECIPE.batch)
    args.seq_len = args.seq_len or (32 if q else _RECIPE.seq_len)
    args.n_codes = args.n_codes or (64 if q else 1000)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def recipe_of(args) -> FSMRecipe:
    if args.quick:
        return FSMRecipe.quick(seed=args.seed, seq_len=args.seq_len, batch=args.batch)
    return dataclasses.replace(_RECIPE, seq_len=args.seq_len, batch=args.batch, seed=args.seed)


class StepTimes:
    """A train logger (log_every=1) that records the global tokens/s of every step."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def log(self, step: int, metrics: dict) -> None:
        self.rates.append(metrics["tokens_per_s"])

    def close(self) -> None:
        pass


def measure(args, device: torch.device) -> dict | None:
    """Train warmup + steps on this rank (all ranks call it); rank 0 returns the timings."""
    recipe = recipe_of(args)
    fsm = recipe.fsm()
    model = recipe.build_model(fsm, device=str(device))
    attach_codebooks(model, sites=["attn", "mlp"], n_codes=args.n_codes, k=1, seed=args.seed)
    times = StepTimes()
    cfg = TrainConfig(
        steps=args.warmup + args.steps,
        lr=1e-3,
        schedule="constant",
        progress=False,
        log_every=1,
        seed=args.seed,
        autocast=args.autocast,
    )
    start = time.perf_counter()
    train(model, recipe.batches(fsm)(0), cfg, loggers=[times])
    wall = time.perf_counter() - start
    if not dd.is_main():
        return None
    timed = times.rates[args.warmup :]
    return {
        "world_size": dd.world_size(),
        "threads_per_rank": torch.get_num_threads(),
        "tokens_per_s": statistics.median(timed),
        "tokens_per_s_per_step": timed,
        "wall_s": wall,
    }


def _rank(rank: int, world: int, args, rendezvous: str, out: str) -> None:
    """One spawned rank: join the group, measure, and (rank 0) write the result."""
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads_per_rank or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        dd.backend_for(device),
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        row = measure(args, device)
        if row is not None:
            Path(out).write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def run_world(args, world: int) -> dict:
    if world == 1:
        torch.set_num_threads(args.threads_per_rank or (os.cpu_count() or 1))
        return measure(args, torch.device(args.device))
    # CUDA needs spawn; on the CPU fork saves each rank the imports (torch gives a forked child a fresh thread pool)
    method = "spawn" if args.device == "cuda" or "fork" not in mp.get_all_start_methods() else "fork"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.start_processes(
            _rank, args=(world, args, os.path.join(tmp, "rendezvous"), out), nprocs=world, start_method=method
        )
        return json.loads(Path(out).read_text())


def report(args, rows: dict[int, dict]) -> dict:
    recipe = recipe_of(args)
    result = {
        "quick": args.quick,
        "device": args.device,
        "machine": environment(),
        "model": {
            "n_layers": recipe.n_layers,
            "d_model": recipe.d_model,
            "n_heads": recipe.n_heads,
            "d_mlp": recipe.d_mlp,
            "n_codes": args.n_codes,
        },
        "global_batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "autocast": args.autocast,
        "results": {str(w): row for w, row in rows.items()},
    }
    base = rows.get(1)
    for row in rows.values():
        row["speedup_over_1_rank"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
    print(f"\n{'ranks':>6}{'threads/rank':>14}{'tokens/s':>12}{'x 1 rank':>10}")
    for w, row in rows.items():
        speed = "" if row["speedup_over_1_rank"] is None else f"{row['speedup_over_1_rank']:.2f}"
        print(f"{w:>6}{row['threads_per_rank']:>14}{row['tokens_per_s']:>12.0f}{speed:>10}")
    if args.quick:
        print("  (--quick: a tiny model and 2 steps, the numbers say nothing about speed)")
    write_report(args.out, result)
    return result


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun: measure the launched ranks only
        device = dd.init_from_env(args.device)
        if device.type == "cpu":
            torch.set_num_threads(args.threads_per_rank or max(1, (os.cpu_count() or 1) // dd.world_size()))
        row = measure(args, device)
        result = report(args, {dd.world_size(): row}) if dd.is_main() else None
        if dist.is_initialized():
            dist.destroy_process_group()
        return result
    return report(args, {w: run_world(args, w) for w in args.world_sizes})


if __name__ == "__main__":
    main()
