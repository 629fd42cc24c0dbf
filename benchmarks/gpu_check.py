"""One short run on a CUDA machine that settles the GPU path: codes, caching, training, search, recipe, NCCL.

Sections (each bounded in time; `--budget-s` for all of them, default 450 s, under 8 minutes on one modern GPU):

* a. codes: every codebook's ids on CUDA against the CPU's, same weights, same inputs (each codebook's own input,
  read on the CPU); flips are counted with the CPU score gap of each; a flip wider than a near tie fails.
* b. cache: `cache_codes` against a plain forward (codebooks in place, nothing kept), tokens/s ratio, and the bytes
  per code kept (fails above 2).
* c. train: a training step with codebooks against the same model without them, fp32 and bf16 autocast, tokens/s
  ratio (fails on a non-finite loss).
* d. search: the search alone at each shape's largest codebook: CPU-sized blocks (the old rule), one matmul + top-k
  (what `search_block_rows` gives where it fits), and that compiled with `torch.compile`; fails if the ids differ
  beyond near ties.
* e. recipe: the FSM default recipe's first N steps of each phase at the paper's batch (512 x 128), tokens/s.
* f. nccl: a one-rank NCCL `cbinterp.train` call (fails if it does not finish with finite losses).

Shapes: "fsm" is the FSM model (`FSMRecipe.paper()`: 4 layers, d_model 128, 4 heads, 1000 codes, k=1, after every
head and every MLP); "lm" is a TinyStories-1Layer-like model (1 layer, d_model 1024, 16 heads, vocabulary 50257)
with 10k codes, k=8, after every head and the MLP, on 8 x 1024 tokens. Speed ratios are reported, not checked.

    python benchmarks/gpu_check.py --out gpu_check_out           # on the GPU machine: table + results.json
    python benchmarks/gpu_check.py --device cpu --quick --out d  # the plumbing on a CPU (NOT a GPU measurement)

Without a CUDA device (and without `--device cpu`) it prints why, writes results.json saying so and exits 0.
It exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from transformer_lens import HookedTransformer

from cbinterp import attach_codebooks, cache_codes, get_codebooks
from cbinterp.core.codebooks.attach import training_codebooks
from cbinterp.core.search import fused_search
from cbinterp.core.search.blocks import CPU_BLOCK_SCORES, search_block_rows
from cbinterp.core.training.fastpath import fast_kernels
from cbinterp.core.training.train import TrainConfig, train
from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.recipes.gpt import gpt_config
from cbinterp.reporting import environment, write_json, write_report

SECTIONS = ("a", "b", "c", "d", "e", "f")
NEAR_TIE = 1e-4  # a flip is a near tie when the CPU scores of the two choices differ by <= this x max(1, |best|)
MAX_FLIP_RATE = 1e-3
MAX_GAPS = 1000  # flips whose gap is measured (one score row each)


@dataclasses.dataclass
class Shape:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    n_codes: int
    k: int
    batch: int
    seq_len: int
    rotary: bool = True

    def model(self, device: str, seed: int = 0, codebooks: bool = True) -> HookedTransformer:
        """The model on `device`, the same weights for the same seed on every device (built on the CPU first)."""
        torch.manual_seed(seed)
        shape = (self.n_layers, self.d_model, self.n_heads, self.d_mlp, self.seq_len, self.d_vocab)
        positions = "rotary" if self.rotary else "standard"
        model = HookedTransformer(gpt_config(*shape, seed=seed, device="cpu", positional_embedding_type=positions))
        if codebooks:
            attach_codebooks(model, ["attn", "mlp"], n_codes=self.n_codes, k=self.k, seed=seed)
        return model.to(device, print_details=False) if device != "cpu" else model

    def tokens(self, seed: int = 0, batch: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.d_vocab, (batch or self.batch, self.seq_len), generator=generator)


def shapes(quick: bool) -> list[Shape]:
    p = FSMRecipe.paper()
    if quick:
        return [Shape("fsm", 2, 64, 4, 256, 11, 200, 1, 8, 32), Shape("lm", 1, 128, 16, 512, 512, 500, 8, 2, 64, False)]
    return [
        Shape("fsm", p.n_layers, p.d_model, p.n_heads, p.d_mlp, p.fsm().vocab_size, 1000, 1, 64, p.seq_len),
        Shape("lm", 1, 1024, 16, 4096, 50257, 10_000, 8, 8, 1024, False),
    ]


class Clock:
    """The run's time budget: sections ask how much is left and stop their timing loops at their own deadline."""

    def __init__(self, budget_s: float, quick: bool = False):
        self.end = time.perf_counter() + budget_s
        self.quick = quick

    def rounds(self, n: int) -> int:
        """Timing rounds: `n`, or 1 in a quick run (which measures nothing)."""
        return 1 if self.quick else n

    def left(self) -> float:
        return self.end - time.perf_counter()

    def deadline(self, share: float) -> float:
        return time.perf_counter() + max(0.0, self.left()) * share


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], object]], device, deadline: float, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up call each, then rounds in rotating order, up to
    `repeats` rounds, and no new round after `deadline` (at least one)."""
    for fn in fns.values():
        fn()
    sync(device)
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return {name: statistics.median(t) for name, t in times.items()}


# -- a. codes on CUDA against the CPU ----------------------------------------------------------------------------
def codebook_inputs(model: HookedTransformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each codebook's input on these tokens (read with the codebooks in place), by codebook name."""
    names = list(get_codebooks(model))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(".hook_input"))
    return {name: cache[name + ".hook_input"] for name in names}


def compare_codes(ids: torch.Tensor, other_ids: torch.Tensor, scores_at: Callable[..., torch.Tensor]) -> dict:
    """Positions whose id sets differ (over the last axis), and for each the gap between the scores of the choices
    that differ, `scores_at(*position)` giving a position's scores of every code, relative to max(1, |score|)."""
    differ = (ids.sort(-1).values != other_ids.sort(-1).values).any(-1)
    flips = differ.nonzero().tolist()
    gaps = []
    for index in flips[:MAX_GAPS]:
        s = scores_at(*index).double().cpu()
        a, b = ids[tuple(index)].tolist(), other_ids[tuple(index)].tolist()
        only_a, only_b = [i for i in a if i not in b], [i for i in b if i not in a]
        gap = max(abs(float(s[i]) - float(s[j])) for i, j in zip(only_a, only_b))
        gaps.append(gap / max(1.0, float(s.abs().max())))
    return {
        "positions": int(differ.numel()),
        "flips": len(flips),
        "max_relative_gap": max(gaps, default=0.0),
        "gaps": sorted(gaps, reverse=True)[:20],
    }


def section_a(shape: Shape, device: torch.device, clock: Clock) -> tuple[dict, list[str]]:
    cpu_model = shape.model("cpu").eval()
    other = copy.deepcopy(cpu_model).to(device, print_details=False) if device.type != "cpu" else cpu_model
    tokens = shape.tokens(seed=1, batch=max(1, shape.batch // 2))
    inputs = codebook_inputs(cpu_model, tokens)
    rows, failures = {}, []
    theirs = get_codebooks(other)
    for name, cb in get_codebooks(cpu_model).items():
        x = inputs[name]
        ids = cb.encode(x)
        other_ids = theirs[name].encode(x.to(device)).cpu()
        if not cb.grouped:
            ids, other_ids, x = ids.unsqueeze(-2), other_ids.unsqueeze(-2), x.unsqueeze(-2)

        def scores_at(b, p, g, cb=cb, x=x):
            with torch.no_grad():
                s = cb.scores(x[b, p] if cb.grouped else x[b, p, 0])
            return s[g] if cb.grouped else s

        row = compare_codes(ids, other_ids, scores_at)
        rows[name] = row
        if row["max_relative_gap"] > NEAR_TIE or row["flips"] > MAX_FLIP_RATE * row["positions"]:
            failures.append(f"{shape.name} {name}: {row['flips']} flips, widest gap {row['max_relative_gap']:.2e}")
    flips = sum(r["flips"] for r in rows.values())
    return {"codebooks": rows, "flips": flips, "positions": sum(r["positions"] for r in rows.values())}, failures


# -- b. cache_codes against a plain forward ----------------------------------------------------------------------
def section_b(shape: Shape, device: torch.device, clock: Clock) -> tuple[dict, list[str]]:
    model = shape.model(str(device)).eval()
    tokens = shape.tokens(seed=2, batch=shape.batch * 4)

    @torch.no_grad()
    def plain() -> None:
        for start in range(0, tokens.shape[0], shape.batch):
            model(tokens[start : start + shape.batch].to(device))

    result = {}

    def cached() -> None:
        result["cache"] = cache_codes(model, tokens, batch_size=shape.batch, progress=False)

    seconds = timed({"plain": plain, "cached": cached}, device, clock.deadline(0.2), repeats=clock.rounds(5))
    cache = result["cache"]
    per_code = {
        name: cache.bytes_per_token(name) / (cb.cfg.groups * cb.cfg.k) for name, cb in get_codebooks(model).items()
    }
    n = tokens.numel()
    row = {
        "tokens": n,
        "plain_tokens_per_s": n / seconds["plain"],
        "cached_tokens_per_s": n / seconds["cached"],
        "cached_over_plain_time": seconds["cached"] / seconds["plain"],
        "bytes_per_code": max(per_code.values()),
    }
    failures = [f"{shape.name}: {row['bytes_per_code']} bytes per code (> 2)"] if row["bytes_per_code"] > 2 else []
    return row, failures


# -- c. a training step, with and without codebooks ---------------------------------------------------------------
def stepper(model: HookedTransformer, tokens: torch.Tensor, bf16: bool, losses: list) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=tokens.device.type == "cuda")
    autocast = torch.autocast(tokens.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:  # as `train` steps: fused kernels, codebooks in their training mode (no per-forward sync)
        with training_codebooks(model), fast_kernels(model), autocast:
            loss = model(tokens, return_type="loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    return step


def section_c(shape: Shape, device: torch.device, clock: Clock) -> tuple[dict, list[str]]:
    tokens = shape.tokens(seed=3).to(device)
    row, failures = {}, []
    for precision in ("fp32", "bf16"):
        losses: list = []
        with_cb = shape.model(str(device)).train()
        without = shape.model(str(device), codebooks=False).train()
        fns = {
            "codebooks": stepper(with_cb, tokens, precision == "bf16", losses),
            "no_codebooks": stepper(without, tokens, precision == "bf16", losses),
        }
        seconds = timed(fns, device, clock.deadline(0.15), repeats=clock.rounds(10))
        del with_cb, without, fns
        finite = all(math.isfinite(float(loss)) for loss in losses)
        row[precision] = {
            "codebooks_tokens_per_s": tokens.numel() / seconds["codebooks"],
            "no_codebooks_tokens_per_s": tokens.numel() / seconds["no_codebooks"],
            "ratio": seconds["no_codebooks"] / seconds["codebooks"],
            "losses_finite": finite,
        }
        if not finite:
            failures.append(f"{shape.name} {precision}: a non-finite training loss")
        empty_cache(device)
    return row, failures


# -- d. the search alone ---------------------------------------------------------------------------------------
def section_d(shape: Shape, device: torch.device, clock: Clock, compile_: bool) -> tuple[dict, list[str]]:
    groups, dim = shape.n_heads, shape.d_model // shape.n_heads  # the attention codebooks: the largest search
    n = shape.batch * shape.seq_len
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(n, groups, dim, generator=generator).to(device)
    w = torch.nn.functional.normalize(torch.randn(groups, shape.n_codes, dim, generator=generator), dim=-1).to(device)
    k = shape.k
    chunk_rows = search_block_rows(n, groups, shape.n_codes, k, x.dtype, "cpu", cpu_block_scores=CPU_BLOCK_SCORES)
    fns = {
        "chunked": lambda: fused_search.matmul_search(x, w, None, k, block_rows=chunk_rows),
        "one_block": lambda: fused_search.matmul_search(x, w, None, k, block_rows=n),
    }
    row: dict = {"rows": n, "groups": groups, "n_codes": shape.n_codes, "k": k, "chunk_rows": chunk_rows}
    if device.type == "cuda":
        from cbinterp.core.search.blocks import block_rows_for

        row["rule_rows"] = block_rows_for(x, w, k)
    if compile_ and clock.left() > 120:
        compiled = torch.compile(lambda a, b: fused_search.matmul_search(a, b, None, k, block_rows=n))
        start = time.perf_counter()
        compiled(x, w)
        sync(device)
        row["compile_s"] = time.perf_counter() - start
        fns["compiled"] = lambda: compiled(x, w)
    else:
        row["compiled"] = "skipped (--no-compile or under 120 s of budget left)"
    seconds = timed(fns, device, clock.deadline(0.3), repeats=clock.rounds(10))
    row["seconds"] = seconds
    row["one_block_speedup_over_chunked"] = seconds["chunked"] / seconds["one_block"]
    if "compiled" in seconds:
        row["compiled_speedup_over_one_block"] = seconds["one_block"] / seconds["compiled"]
    reference, _ = fns["one_block"]()
    failures = []
    for name, fn in fns.items():
        ids, _ = fn()
        diff = compare_codes(reference.cpu(), ids.cpu(), lambda g, i: w[g] @ x[i, g])
        row[f"{name}_flips"] = diff["flips"]
        if diff["max_relative_gap"] > NEAR_TIE:
            failures.append(f"{shape.name} search {name}: ids differ beyond near ties ({diff['max_relative_gap']:.2e})")
    return row, failures


# -- e. the FSM default recipe -----------------------------------------------------------------------------------
def section_e(device: torch.device, steps: int, quick: bool) -> tuple[dict, list[str]]:
    make = FSMRecipe.quick if quick else FSMRecipe.paper
    base = make()
    training = dataclasses.replace(
        FSMRecipe.paper_training(warm_steps=steps, codebook_steps=steps, n_codes=base.training.codebooks.n_codes),
        control=False,
    )
    sizes = dict(batch=8, seq_len=32, kmeans_sequences=8) if quick else dict(batch=512)  # the paper's 512 x 128
    recipe = make(training=training, **sizes)
    _, result = recipe.run(device=str(device), progress=False, log=lambda message: None)
    row = {
        "batch": recipe.batch,
        "seq_len": recipe.seq_len,
        "steps_per_phase": steps,
        "tokens_per_s": {p: result.tokens[p] / result.seconds[p] for p in result.seconds if p in result.tokens},
        "seconds": result.seconds,
        "final_losses": {p: float(v[-1]) for p, v in result.losses.items() if v},
    }
    bad = [p for p, v in row["final_losses"].items() if not math.isfinite(v)]
    return row, [f"recipe phase {p}: non-finite loss" for p in bad]


# -- f. one-rank NCCL train --------------------------------------------------------------------------------------
def section_f(shape: Shape, device: torch.device, steps: int) -> tuple[dict, list[str]]:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return {"skipped": "a process group is already initialised"}, []
    model = shape.model(str(device))
    tokens = shape.tokens(seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            backend,
            init_method=f"file://{tmp}/rendezvous",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=300),
        )
        try:
            start = time.perf_counter()
            cfg = TrainConfig(steps=steps, lr=1e-4, progress=False, log_every=1, seed=0)
            result = train(model, lambda step: tokens, cfg)
            seconds = time.perf_counter() - start
        finally:
            dist.destroy_process_group()
    losses = [float(v) for v in result.losses]
    finite = len(losses) == steps and all(math.isfinite(v) for v in losses)
    row = {"backend": backend, "steps": steps, "seconds": seconds, "final_loss": losses[-1] if losses else None}
    return row, [] if finite else [f"nccl train: {len(losses)} of {steps} losses, finite: {finite}"]


# -- the run -----------------------------------------------------------------------------------------------------
def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_section(name: str, fn: Callable[[], tuple[dict, list[str]]], results: dict, failed: list[str]) -> None:
    start = time.perf_counter()
    try:
        row, failures = fn()
        status = "fail" if failures else "ok"
    except Exception as err:  # noqa: BLE001 - a section that breaks is a failed check; the others still run
        row, failures, status = (
            {"error": traceback.format_exc(limit=8)},
            [f"{name}: {type(err).__name__}: {err}"],
            "error",
        )
    row["status"], row["wall_s"] = status, time.perf_counter() - start
    results[name] = row
    failed.extend(failures)
    print(f"  {name:<10} {status:<6} {row['wall_s']:6.1f} s" + (f"  {failures}" if failures else ""), flush=True)


def summary_lines(results: dict) -> list[str]:
    lines = [f"{'check':<12}{'status':<8}{'what':<60}"]
    for key, row in results["sections"].items():
        what = ""
        if key.startswith("a_"):
            what = f"{row.get('flips')} flips in {row.get('positions')} positions"
        elif key.startswith("b_"):
            what = f"cached/plain time {row.get('cached_over_plain_time', 0):.2f}, {row.get('bytes_per_code')} B/code"
        elif key.startswith("c_"):
            what = ", ".join(f"{p} with/without {row[p]['ratio']:.2f}" for p in ("fp32", "bf16") if p in row)
        elif key.startswith("d_"):
            what = f"one block {row.get('one_block_speedup_over_chunked', 0):.1f}x chunked"
            if "compiled_speedup_over_one_block" in row:
                what += f", compiled {row['compiled_speedup_over_one_block']:.2f}x one block"
        elif key == "e":
            what = ", ".join(f"{p} {v:,.0f} tok/s" for p, v in row.get("tokens_per_s", {}).items())
        elif key.startswith("f"):
            what = f"{row.get('backend')} {row.get('steps')} steps, loss {row.get('final_loss')}"
        lines.append(f"{key:<12}{row['status']:<8}{what:<60}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for results.json")
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu: a dry run of the plumbing")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks that it runs, measures nothing")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time for all sections together")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="which sections, e.g. a,b,d")
    parser.add_argument("--steps", type=int, default=None, help="recipe steps per phase (e) and NCCL steps (f)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile in section d")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {','.join(SECTIONS)}")
    device = torch.device(args.device)
    dry_run = device.type != "cuda"
    results: dict = {
        "benchmark": "gpu_check",
        **environment(device),
        "dry_run": dry_run,
        "quick": args.quick or dry_run,
        "budget_s": args.budget_s,
    }
    out = args.out / "results.json"
    if device.type == "cuda" and not torch.cuda.is_available():
        results["skipped"] = "no CUDA device: nothing measured (pass --device cpu for a dry run of the plumbing)"
        print(f"SKIPPED: {results['skipped']}")
        write_json(out, results)
        return 0
    if dry_run:
        print(f"DRY RUN on {device}: tiny shapes, checks the plumbing only; NOT a GPU measurement.")
    else:
        props = torch.cuda.get_device_properties(device)
        results["gpu"] = {"name": props.name, "memory_gib": props.total_memory / 2**30}
        results["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        print(f"GPU check on {props.name} ({props.total_memory / 2**30:.0f} GiB), budget {args.budget_s:.0f} s")
    quick = args.quick or dry_run
    steps = args.steps or (2 if quick else 30)
    clock = Clock(args.budget_s, quick)
    found: dict = {}
    failed: list[str] = []
    for shape in shapes(quick):
        for key, fn in (
            ("a", lambda s=shape: section_a(s, device, clock)),
            ("b", lambda s=shape: section_b(s, device, clock)),
            ("c", lambda s=shape: section_c(s, device, clock)),
            ("d", lambda s=shape: section_d(s, device, clock, not args.no_compile)),
        ):
            if key in sections:
                run_section(f"{key}_{shape.name}", fn, found, failed)
                empty_cache(device)
    fsm = shapes(quick)[0]
    if "e" in sections:
        run_section("e", lambda: section_e(device, steps, quick), found, failed)
    if "f" in sections:
        run_section("f", lambda: section_f(fsm, device, steps), found, failed)
    results["sections"] = found
    results["failed"] = failed
    results["over_budget_s"] = max(0.0, -clock.left())
    print("\n" + "\n".join(summary_lines(results)))
    if dry_run:
        print("(dry run: the numbers above are not GPU measurements)")
    print(f"{'FAILED: ' + '; '.join(failed) if failed else 'all checks passed'}")
    write_report(out, results, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
