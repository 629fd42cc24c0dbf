"""What caching codes costs: `cache_codes` against the plain forward pass of the same model over the same tokens.

The model is the FSM benchmark's shape (4 layers, d_model 128, 4 heads, d_mlp 512, vocabulary 11) with a codebook
after every attention head and every MLP (1000 codes, k=1). Timed in alternating rounds, so that load hits both
alike: the plain forward pass under `torch.no_grad()` (codebooks in place, nothing kept), `cache_codes` in memory,
and `cache_codes` streaming to a temporary directory. Targets: at most 10% more wall time than
the plain pass, and at most 2*k bytes per token per codebook (per head for per-head codebooks).

    .venv/bin/python benchmarks/cache_speed.py     # table + benchmarks/out/cache_speed.json
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from cbinterp import attach_codebooks, cache_codes, get_codebooks
from cbinterp.core.device import default_device
from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.reporting import environment

if __package__:  # python -m benchmarks.cache_speed
    from . import common
else:  # python benchmarks/cache_speed.py: this folder is sys.path[0]
    import common

TARGETS = {"cached_over_plain": 1.10, "bytes_per_token_per_codebook_over_k": 2}


def build(args) -> HookedTransformer:
    recipe = dataclasses.replace(  # the FSM model's shape (cbinterp.recipes.fsm), at these sizes
        FSMRecipe.paper(),
        n_layers=args.n_layers,
        d_model=args.d_model,
        d_mlp=4 * args.d_model,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    model = HookedTransformer(recipe.model_config(recipe.fsm(), device=str(args.device)))
    return attach_codebooks(model, ["attn", "mlp"], n_codes=args.n_codes, k=args.k, seed=args.seed).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(
        "cache_speed",
        __doc__,
        docs=2048,
        seq_len=64,
        batch=64,
        n_layers=4,
        d_model=128,
        n_codes=1000,
        k=1,
        rounds=3,
        seed=0,
    )
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--quick", action="store_true", help="a tiny run: checks that it works, not a measurement")
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.seq_len, args.batch, args.n_layers, args.d_model, args.n_codes, args.rounds = (
            16,
            16,
            8,
            1,
            32,
            64,
            1,
        )
    device = torch.device(args.device)
    model = build(args)
    tokens = torch.randint(0, 11, (args.docs, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    load_before = os.getloadavg()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def plain() -> None:
        for start in range(0, args.docs, args.batch):
            model(tokens[start : start + args.batch].to(device))

    def cached() -> object:
        return cache_codes(model, tokens, batch_size=args.batch, progress=False)

    def on_disk() -> object:
        with tempfile.TemporaryDirectory() as directory:
            return cache_codes(
                model, tokens, batch_size=args.batch, directory=Path(directory) / "cache", progress=False
            )

    fns = {"plain": plain, "cached": cached, "cached_to_disk": on_disk}
    plain()  # warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    result = None
    for r in range(args.rounds):
        names = list(fns)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            out = fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            if name == "cached":
                result = out
    medians = {name: statistics.median(t) for name, t in times.items()}
    codebooks = get_codebooks(model)
    storage = {
        name: {
            "bytes_per_token": result.bytes_per_token(name),
            "per_codebook_slot_over_k": result.bytes_per_token(name) / (cb.cfg.groups * args.k),
        }
        for name, cb in codebooks.items()
    }
    ratios = {
        "cached_over_plain": medians["cached"] / medians["plain"],
        "cached_to_disk_over_plain": medians["cached_to_disk"] / medians["plain"],
    }
    worst_bytes = max(s["per_codebook_slot_over_k"] for s in storage.values())

    n_tokens = args.docs * args.seq_len
    print(f"\n{'variant':<16}{'seconds':>10}{'tokens/s':>12}{'x plain':>9}")
    for name, seconds in medians.items():
        print(f"{name:<16}{seconds:>10.2f}{n_tokens / seconds:>12.0f}{seconds / medians['plain']:>9.2f}")
    print(
        f"\n{n_tokens} tokens ({args.docs} x {args.seq_len}), batch {args.batch}, median of {args.rounds} rounds, "
        f"device {device}, {torch.get_num_threads()} threads, load average {load_before[0]:.2f} at start"
    )
    print(
        f"storage: at most {worst_bytes:g} bytes per token per codebook (per head) per k "
        f"({args.n_codes} codes: {result.storage_dtype(next(iter(codebooks)))})"
    )
    if args.quick:
        print("  (--quick: a tiny run, the ratios say nothing about speed)")
    print(
        f"  target cached/plain <= {TARGETS['cached_over_plain']}: {ratios['cached_over_plain']:.2f} "
        f"{'meets' if ratios['cached_over_plain'] <= TARGETS['cached_over_plain'] else 'MISSES'}; "
        f"bytes <= 2k: {'meets' if worst_bytes <= 2 else 'MISSES'}"
    )
    report = {
        "benchmark": "cache_speed",
        "n_tokens": n_tokens,
        **common.settings(args, "docs", "seq_len", "batch", "n_codes", "k", "rounds", "quick"),
        **environment(device, load_average_start=load_before),
        "targets": TARGETS,
        "seconds": medians,
        "times_s": times,
        "ratios": ratios,
        "storage": storage,
    }
    return common.finish(args.out, report)


if __name__ == "__main__":
    main()
