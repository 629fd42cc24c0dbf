"""Training speed (tokens/s) of the FSM codebook model, against the authors' library on the same machine.

The model is the FSM benchmark's: 4 layers, d_model 128, 4 heads, d_mlp 512, rotary, vocabulary 11, with a
codebook after every attention head and every MLP (1000 codes, k=1), trained on batches of 64 x 128 tokens with
AdamW. Timed side by side, one step of each in turn (rotating order, so that load hits all alike):

* ours: `attach_codebooks` on a HookedTransformer, eager, stepped as `cbinterp.train` steps it: fused attention
  and layer norm (`cbinterp.core.training.fastpath.fast_kernels`) and fused AdamW;
* ours_matmul_search: ours with the nearest-code search as one matmul then a max (`Codebook.use_fused_search`
  off), so that the fused search kernel (`cbinterp.core.search.fused_search`) shows on its own;
* ours_compiled: the same through `torch.compile` (compile time reported separately, not in the step time);
* ours_tl_kernels: TransformerLens's own op-by-op attention and layer norm, default AdamW (cbinterp before the
  fused kernels), and ours_tl_kernels_fused_adamw: the same with fused AdamW, so that each change shows on its own;
* no_codebooks: the bare HookedTransformer stepped as ours (what the codebooks cost), no_codebooks_tl_kernels and
  no_codebooks_compiled (each codebook variant is compared with the model without codebooks run the same way);
* reference: `codebook-features` 0.1.2 on the equivalent GPT-NeoX, run by benchmarks/_reference_train.py in its
  own old-stack venv (`--setup-reference` builds it).

The roofline is the step's matmul work (forward and backward of the model, forward of the code similarities;
`step_flops`) at the fp32 matmul rate measured at the start of the run.

    .venv/bin/python benchmarks/train_speed.py            # table + benchmarks/out/train_speed.json
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import torch
from transformer_lens import HookedTransformer

from cbinterp import attach_codebooks, get_codebooks
from cbinterp.core.device import default_device
from cbinterp.core.training.fastpath import fast_kernels
from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.reporting import environment

if __package__:  # python -m benchmarks.train_speed
    from . import common
else:  # python benchmarks/train_speed.py: this folder is sys.path[0]
    import common

REFERENCE_SCRIPT = common.REFERENCE_DIR / "time_train.py"
TARGET_OVER_REFERENCE = 1.5  # tokens/s of ours over the reference's: the floor; the goal is 2x
TARGET_OVER_NO_CODEBOOKS = 0.8  # tokens/s of ours over the same model without codebooks
_RECIPE = FSMRecipe.paper()  # the FSM model's shape, written once in cbinterp.recipes.fsm
MODEL = dict(
    n_layers=_RECIPE.n_layers,
    d_model=_RECIPE.d_model,
    n_heads=_RECIPE.n_heads,
    d_mlp=_RECIPE.d_mlp,
    vocab=_RECIPE.fsm().vocab_size,
)


def build(args, codebooks: bool) -> HookedTransformer:
    recipe = dataclasses.replace(_RECIPE, seq_len=args.seq_len, seed=args.seed)
    model = HookedTransformer(recipe.model_config(recipe.fsm(), device=str(args.device)))
    if codebooks:
        attach_codebooks(model, sites=["attn", "mlp"], n_codes=args.n_codes, k=1, seed=args.seed)
    return model.train()


def stepper(model, forward, tokens, fused: bool = True) -> Callable[[], None]:
    """One training step; `fused`: fused kernels and fused AdamW as `cbinterp.train` uses them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True if fused else None)

    def step() -> None:
        with fast_kernels(model, enabled=fused):
            loss = forward(tokens, return_type="loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def tl_kernels_fused_adamw(model, tokens) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step() -> None:
        loss = model(tokens, return_type="loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_flops(batch: int, seq_len: int, n_codes: int, codebooks: bool) -> float:
    """Matmul FLOPs of one step: 3x the forward's (forward + backward) for the model, 1x for the code search."""
    d, d_mlp, layers, vocab = MODEL["d_model"], MODEL["d_mlp"], MODEL["n_layers"], MODEL["vocab"]
    per_token = layers * (8 * d * d + 4 * d * d_mlp + 4 * seq_len * d) + 2 * d * vocab
    codes = layers * 2 * (2 * d * n_codes) if codebooks else 0  # every head (d in all) and the MLP (d)
    return batch * seq_len * (3 * per_token + codes)


def matmul_rate(device: torch.device, n: int = 1024, repeats: int = 20) -> float:
    """fp32 matmul FLOP/s on this device now (best of three timings)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(3):
        common.sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        common.sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser("train_speed", __doc__, batch=64, seq_len=128, n_codes=1000, warmup=2, repeats=10, seed=0)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (saves ~1 minute)")
    common.add_reference_options(parser)
    parser.add_argument(
        "--quick", action="store_true", help="tiny batches, no compile: a smoke test, not a measurement"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.n_codes, args.warmup, args.repeats, args.no_compile = 4, 16, 64, 1, 2, True
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tokens = torch.randint(0, MODEL["vocab"], (args.batch, args.seq_len), device=device)
    load_before = os.getloadavg()

    peak = matmul_rate(device)
    fns: dict[str, Callable[[], float | None]] = {}
    ours = build(args, codebooks=True)
    fns["ours"] = stepper(ours, ours, tokens)
    matmul_search = build(args, codebooks=True)
    for codebook in get_codebooks(matmul_search).values():
        codebook.use_fused_search = False  # this model's codebooks only (the class default stays on)
    fns["ours_matmul_search"] = stepper(matmul_search, matmul_search, tokens)
    before = build(args, codebooks=True)
    fns["ours_tl_kernels"] = stepper(before, before, tokens, fused=False)
    before_adamw = build(args, codebooks=True)
    fns["ours_tl_kernels_fused_adamw"] = tl_kernels_fused_adamw(before_adamw, tokens)
    compile_s = {}
    plain = build(args, codebooks=False)
    fns["no_codebooks"] = stepper(plain, plain, tokens)
    plain_tl = build(args, codebooks=False)
    fns["no_codebooks_tl_kernels"] = stepper(plain_tl, plain_tl, tokens, fused=False)
    if not args.no_compile:
        for name, codebooks in (("ours_compiled", True), ("no_codebooks_compiled", False)):
            compiled_model = build(args, codebooks=codebooks)
            fns[name] = stepper(compiled_model, torch.compile(compiled_model), tokens)
            start = time.perf_counter()
            fns[name]()  # the first steps compile
            fns[name]()
            common.sync(device)
            compile_s[name] = time.perf_counter() - start
            print(f"torch.compile of {name} took {compile_s[name]:.0f} s (first two steps)", flush=True)

    reference_python, reference_note = common.resolve_reference(args)
    print(f"reference: {reference_note}", flush=True)
    reference = None
    if reference_python is not None:
        reference = common.ReferenceRunner(
            [
                str(reference_python),
                str(REFERENCE_SCRIPT),
                "--serve",
                *common.as_flags(args, "batch", "seq_len", "n_codes", "warmup", "seed", "device"),
                *[f"--{k.replace('_', '-')}={v}" for k, v in MODEL.items()],
            ]
        )
        fns["reference"] = reference.step
    try:
        times = common.time_interleaved(fns, args.warmup, args.repeats, device)
    finally:
        if reference is not None:
            reference.close()

    n_tokens = args.batch * args.seq_len
    rows = common.step_rows(times, n_tokens)
    ref_tps = rows.get("reference", {}).get("tokens_per_s")
    for name, row in rows.items():
        row["over_reference"] = None if ref_tps is None else row["tokens_per_s"] / ref_tps
        flops = step_flops(args.batch, args.seq_len, args.n_codes, codebooks=not name.startswith("no_codebooks"))
        row["roofline_tokens_per_s"] = n_tokens * peak / flops
        row["roofline_fraction"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
    pairs = (
        ("ours", "no_codebooks"),
        ("ours_matmul_search", "no_codebooks"),
        ("ours_compiled", "no_codebooks_compiled"),
    )
    for name, plain_name in pairs:
        if name in rows:  # each against the model without codebooks run the same way
            rows[name]["over_no_codebooks"] = rows[name]["tokens_per_s"] / rows[plain_name]["tokens_per_s"]

    print(f"\n{'variant':<30}{'ms/step':>10}{'tokens/s':>12}{'x reference':>13}{'of roofline':>13}")
    for name, row in rows.items():
        over = "-" if row["over_reference"] is None else f"{row['over_reference']:.2f}"
        roof = f"{row['roofline_fraction']:.0%}"
        print(f"{name:<30}{row['median_s'] * 1e3:>10.0f}{row['tokens_per_s']:>12.0f}{over:>13}{roof:>13}")
    print(
        f"\nbatch {args.batch} x {args.seq_len} tokens, median of {args.repeats} steps after {args.warmup} warmup, "
        f"device {device}, {torch.get_num_threads()} threads, load average {load_before[0]:.2f} at start; "
        f"fp32 matmul {peak / 1e9:.0f} GFLOP/s"
    )
    for name in ("ours", "ours_compiled"):
        if name in rows and not args.quick:
            ratio = rows[name]["over_no_codebooks"]
            verdict = "meets" if ratio >= TARGET_OVER_NO_CODEBOOKS else "MISSES"
            target = TARGET_OVER_NO_CODEBOOKS
            print(f"  {name} at {ratio:.2f}x the model without codebooks run alike (target >= {target}) {verdict}")
    if args.quick:
        print("  (--quick: tiny batches, the numbers say nothing about speed)")
    elif ref_tps is not None:
        for name in ("ours", "ours_compiled"):
            if name in rows:
                over = rows[name]["over_reference"]
                verdict = "meets" if over >= TARGET_OVER_REFERENCE else "MISSES"
                print(f"  {name} at {over:.2f}x the reference (target >= {TARGET_OVER_REFERENCE}x, goal 2x) {verdict}")

    report = {
        "benchmark": "train_speed",
        "model": MODEL,
        **common.settings(args, "batch", "seq_len", "n_codes"),
        **environment(device, load_average_start=load_before),
        **common.settings(args, "warmup", "repeats", "quick"),
        "compile_s": compile_s,
        "reference": reference_note,
        "reference_meta": None if reference is None else reference.meta,
        "target_over_reference": TARGET_OVER_REFERENCE,
        "target_over_no_codebooks": TARGET_OVER_NO_CODEBOOKS,
        "matmul_flops_per_s": peak,
        "results": rows,
    }
    return common.finish(args.out, report)


if __name__ == "__main__":
    main()
