"""Forward+backward speed of one `Codebook`, against its floor and against the authors' library.

For the paper's FSM shapes -- the MLP codebook (input 64x128x128, 1000 codes, k=1) and the per-head attention
codebook (4 heads x 32 dims, groups=4, input 64x128x4x32) -- this times

* ours: one training-mode forward+backward of `cbinterp.Codebook` (default settings: inner-product similarity,
  usage statistics on), and the same with `normalize_input=True` ("ours+LN": the authors' layer always
  layer-normalises its input first); and "ours, matmul search" (`use_fused_search` off: the search as one matmul
  then top-k, as before the fused kernel of `cbinterp.core.search.fused_search`);
* the floor: the bare similarity matmul + top-k on the same data and codes, nothing else;
* the reference: `codebook-features` 0.1.2 (`models.CodebookLayer` / `models.GroupCodebookLayer` with
  `InnerProductSnapFunction`, loss "aeloss"), forward+backward, run by benchmarks/_reference_codebook.py with the
  Python of its own old-stack virtual environment (`--setup-reference` builds it).

Each timing is the median of `--repeats` single steps after `--warmup` steps. The floor, ours and the reference
(a long-lived subprocess that times one step of its own on request) take turns step by step, in rotating order,
so that load from other processes on the machine hits them alike. Threads are left at torch's default.

    .venv/bin/python benchmarks/codebook_speed.py                 # table + benchmarks/out/codebook_speed.json
    .venv/bin/python benchmarks/codebook_speed.py --setup-reference   # first build /tmp/refvenv if needed
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.device import default_device
from cbinterp.reporting import environment, print_table

if __package__:  # python -m benchmarks.codebook_speed
    from . import common
else:  # python benchmarks/codebook_speed.py: this folder is sys.path[0]
    import common

REFERENCE_SCRIPT = common.REFERENCE_DIR / "time_codebook.py"
TARGETS = {"ours_over_floor": 1.5, "ours_over_reference": 0.5}

#: name -> (input shape, code dim, groups)
SHAPES = {
    "mlp": ((64, 128, 128), 128, 1),
    "attn": ((64, 128, 4, 32), 32, 4),
}
QUICK_SHAPES = {  # a few positions only: checks that everything runs, not a measurement
    "mlp": ((2, 16, 128), 128, 1),
    "attn": ((2, 16, 4, 32), 32, 4),
}


def measure(
    shape: tuple[int, ...],
    dim: int,
    groups: int,
    n_codes: int,
    k: int,
    seed: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    reference: common.ReferenceRunner | None = None,
) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    x = torch.randn(shape, device=device).requires_grad_()
    grad = torch.randn(shape, device=device)
    plain = Codebook(dim, n_codes, k=k, groups=groups, seed=seed, device=device).train()
    with_ln = Codebook(dim, n_codes, k=k, groups=groups, seed=seed, normalize_input=True, device=device).train()
    matmul = Codebook(dim, n_codes, k=k, groups=groups, seed=seed, device=device).train()
    matmul.use_fused_search = False  # the search as one matmul then top-k: what the fused kernel saves
    for cb in (plain, with_ln, matmul):
        cb.in_train_loop = True  # a training step as inside `train`: usage statistics on

    def step(codebook: Codebook) -> Callable[[], None]:
        def run() -> None:
            codebook(x).backward(grad)
            x.grad = None
            codebook.weight.grad = None

        return run

    # The floor: similarity matmul + top-k on the same data and the same (unit-norm) codes, nothing more.
    codes = torch.nn.functional.normalize(plain.weight.detach(), dim=-1)  # (groups, n_codes, dim)
    data = x.detach().reshape(-1, groups, dim)

    def floor() -> None:
        if groups == 1:
            scores = data[:, 0] @ codes[0].T
        else:
            scores = torch.bmm(data.transpose(0, 1), codes.transpose(1, 2))
        scores.topk(k, dim=-1)

    fns: dict[str, Callable[[], float | None]] = {
        "floor": floor,
        "ours": step(plain),
        "ours_ln": step(with_ln),
        "ours_matmul_search": step(matmul),
    }
    if reference is not None:
        fns["reference"] = reference.step
    return common.time_interleaved(fns, warmup, repeats, device)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser("codebook_speed", __doc__, warmup=3, repeats=30, seed=0, n_codes=1000, k=1)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    common.add_reference_options(parser)
    parser.add_argument("--quick", action="store_true", help="tiny inputs: a smoke test, not a measurement")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    reference_python, reference_note = common.resolve_reference(args)
    print(f"reference: {reference_note}")
    load_before = os.getloadavg()

    results = {}
    for name in args.shapes:
        shape, dim, groups = shapes[name]
        print(f"timing {name} {tuple(shape)} ...", flush=True)
        reference, reference_error = None, None
        if reference_python is not None:
            try:
                reference = common.ReferenceRunner(
                    [
                        str(reference_python),
                        str(REFERENCE_SCRIPT),
                        "--serve",
                        "--shape",
                        name,
                        *common.as_flags(args, "n_codes", "k", "warmup", "seed", "device"),
                        "--input-shape",
                        *map(str, shape),
                    ]
                )
            except (RuntimeError, OSError, json.JSONDecodeError) as err:
                reference_error = str(err)
                print(f"  reference failed to start: {err}")
        try:
            times = measure(
                shape, dim, groups, args.n_codes, args.k, args.seed, args.warmup, args.repeats, device, reference
            )
        finally:
            if reference is not None:
                reference.close()
        row = {
            "input_shape": list(shape),
            "dim": dim,
            "groups": groups,
            "n_codes": args.n_codes,
            "k": args.k,
            **{f"{key}_s": statistics.median(value) for key, value in times.items()},
            **{f"{key}_min_s": min(value) for key, value in times.items()},
            "times_s": times,
        }
        if reference is not None:
            row["reference_layer"] = reference.meta
        if reference_error is not None:
            row["reference_error"] = reference_error
        row["ours_over_floor"] = common.ratio(row["ours_s"], row["floor_s"])
        row["ours_ln_over_floor"] = common.ratio(row["ours_ln_s"], row["floor_s"])
        row["ours_over_reference"] = common.ratio(row["ours_s"], row.get("reference_s"))
        row["ours_ln_over_reference"] = common.ratio(row["ours_ln_s"], row.get("reference_s"))
        row["ours_matmul_search_over_reference"] = common.ratio(row["ours_matmul_search_s"], row.get("reference_s"))
        results[name] = row

    header = [
        "shape",
        "input",
        "ours ms",
        "ours+LN ms",
        "matmul search ms",
        "floor ms",
        "reference ms",
        "ours/floor",
        "ours/reference",
        "ours+LN/reference",
    ]
    rows = []
    for name, row in results.items():
        fmt = lambda r: "-" if r is None else f"{r:.2f}"
        rows.append(
            [
                name,
                "x".join(map(str, row["input_shape"])),
                common.ms(row["ours_s"]),
                common.ms(row["ours_ln_s"]),
                common.ms(row["ours_matmul_search_s"]),
                common.ms(row["floor_s"]),
                common.ms(row.get("reference_s")),
                fmt(row["ours_over_floor"]),
                fmt(row["ours_over_reference"]),
                fmt(row["ours_ln_over_reference"]),
            ]
        )
    print_table(header, rows, left=2)
    print(
        f"\ntargets: ours/floor <= {TARGETS['ours_over_floor']}, ours/reference <= {TARGETS['ours_over_reference']}; "
        f"median of {args.repeats} steps after {args.warmup} warmup, device {device}, {torch.get_num_threads()} "
        "threads, "
        f"load average {load_before[0]:.2f} at start"
    )
    if args.quick:
        print("  (--quick: tiny inputs, the ratios below say nothing about speed)")
    for name, row in results.items():
        for key, target in TARGETS.items():
            if row[key] is not None:
                print(
                    f"  {name} {key.replace('_over_', '/')}: {row[key]:.2f} "
                    f"{'meets' if row[key] <= target else 'MISSES'} <= {target}"
                )

    report = {
        "benchmark": "codebook_speed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
        **environment(device, load_average_start=load_before),
        **common.settings(args, "seed", "warmup", "repeats", "quick"),
        "statistic": "median seconds per forward+backward step",
        "floor": "unit-norm codes; x @ codes.T (one bmm over groups when grouped), then topk(k); no chunking",
        "reference": reference_note,
        "targets": TARGETS,
        "results": results,
    }
    return common.finish(args.out, report)


if __name__ == "__main__":
    main()
