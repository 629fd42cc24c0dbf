"""How often bf16 autocast changes the chosen (top-1) code, with the code search in float32 (cbinterp's) or in bf16.

The model is the FSM benchmark's shape (`FSMRecipe.paper()`: 4 layers, d_model 128, 4 heads, d_mlp 512) with a
codebook after every head and every MLP (1000 codes, k=1), k-means initialised on FSM sequences (so that codes sit
where the activations are; the weights are untrained). One forward in float32 gives the reference codes; then the
same tokens under `torch.autocast(bfloat16)`:

* "fp32 search": as `train(autocast="bf16")` runs, the model in bf16 and the codebooks' similarity and top-k in
  float32. Codes change only because the codebook's input (computed upstream in bf16) changed.
* "bf16 search": the similarity matmul in bf16 too (what autocast does to an unprotected search).
* "bf16 search, fp32 input": the float32 input of each codebook, searched in bf16: the search's own share.

    .venv/bin/python benchmarks/autocast_codes.py        # table + benchmarks/out/autocast_codes.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path

import torch

from cbinterp import attach_codebooks, get_codebooks, kmeans_init_codebooks
from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.codebooks.naming import CODES_SUFFIX, INPUT_SUFFIX
from cbinterp.recipes.fsm import FSMRecipe

if __package__:  # python -m benchmarks.autocast_codes
    from . import common
else:  # python benchmarks/autocast_codes.py: this folder is sys.path[0]
    import common

ROOT = common.ROOT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sequences and codes (a smoke test)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sequences", type=int, default=None, help="default 64 (--quick 8)")
    parser.add_argument("--n-codes", type=int, default=None, help="default 1000 (--quick 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "autocast_codes.json")
    args = parser.parse_args(argv)
    args.sequences = args.sequences or (8 if args.quick else 64)
    args.n_codes = args.n_codes or (64 if args.quick else 1000)
    return args


@contextlib.contextmanager
def bf16_search():
    """The codebooks' search left to autocast (bf16 matmul), as without cbinterp's float32 search."""
    real = Codebook._search_fp32
    Codebook._search_fp32 = lambda self, xg: self._search(xg)
    try:
        yield
    finally:
        Codebook._search_fp32 = real


def codes_and_inputs(model, tokens, autocast: bool) -> tuple[dict, dict]:
    names = list(get_codebooks(model))
    hooks = [n + CODES_SUFFIX for n in names] + [n + INPUT_SUFFIX for n in names]
    ctx = torch.autocast(tokens.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    return {n: cache[n + CODES_SUFFIX][..., 0] for n in names}, {n: cache[n + INPUT_SUFFIX] for n in names}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    recipe = FSMRecipe.quick(seed=args.seed) if args.quick else FSMRecipe.paper(seed=args.seed)
    recipe = dataclasses.replace(recipe, seed=args.seed)
    fsm = recipe.fsm()
    model = recipe.build_model(fsm, device=args.device).eval()
    attach_codebooks(model, ["attn", "mlp"], n_codes=args.n_codes, k=1, seed=args.seed)
    kmeans_tokens = fsm.sample(args.sequences, recipe.seq_len, seed=recipe.data_seed(2)).tokens.to(args.device)
    kmeans_init_codebooks(model, kmeans_tokens, iters=5, seed=args.seed, progress=False)
    tokens = fsm.sample(args.sequences, recipe.seq_len, seed=recipe.data_seed(7)).tokens.to(args.device)

    ref, inputs = codes_and_inputs(model, tokens, autocast=False)
    fp32_search, _ = codes_and_inputs(model, tokens, autocast=True)
    with bf16_search():
        bf16, _ = codes_and_inputs(model, tokens, autocast=True)
    rows = {}
    codebooks = get_codebooks(model)
    for name, cb in codebooks.items():
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16), torch.no_grad():
            own = cb._search(cb._as_groups(inputs[name]))[0][..., 0]  # bf16 search of the fp32 input
        own = own if cb.grouped else own.squeeze(-1)
        rows[name] = {
            "positions": int(ref[name].numel()),
            "fp32_search": float((fp32_search[name] != ref[name]).float().mean()),
            "bf16_search": float((bf16[name] != ref[name]).float().mean()),
            "bf16_search_fp32_input": float((own != ref[name]).float().mean()),
        }
    keys = ("fp32_search", "bf16_search", "bf16_search_fp32_input")
    total = sum(r["positions"] for r in rows.values())
    overall = {k: sum(r[k] * r["positions"] for r in rows.values()) / total for k in keys}
    print(f"\ntop-1 code changed by bf16 autocast (share of positions; {args.sequences} x {recipe.seq_len} tokens)")
    print(f"{'codebook':<28}{'fp32 search':>13}{'bf16 search':>13}{'bf16 srch, fp32 in':>20}")
    for name, r in {**rows, "all": overall}.items():
        print(f"{name:<28}{r['fp32_search']:>13.2%}{r['bf16_search']:>13.2%}{r['bf16_search_fp32_input']:>20.2%}")
    result = {
        "quick": args.quick,
        "device": args.device,
        "sequences": args.sequences,
        "seq_len": recipe.seq_len,
        "n_codes": args.n_codes,
        "weights": "untrained model, k-means initialised codebooks",
        "per_codebook": rows,
        "overall": overall,
    }
    return common.finish(args.out, result)


if __name__ == "__main__":
    main()
