"""Where a training step of the FSM codebook model spends its time, by operator family (torch.profiler, CPU).

The model is train_speed.py's (4 layers, d_model 128, 4 heads, d_mlp 512, rotary; a codebook after every head and
every MLP, 1000 codes, k=1; 64 x 128 tokens; AdamW). Each variant is profiled for a few steps after warmup:
with and without codebooks, and with TransformerLens's op-by-op attention and layer norm or cbinterp's fused kernels
(`cbinterp.core.training.fastpath.fast_kernels`, what `train` uses).

Every operator's own (self) time is given to a family: by the module it ran in (attention, layer norm, MLP
activation, rotary embedding, codebook), or for backward operators by the module of the forward operator they
differentiate (the profiler pairs them by sequence number). "outside operators" is wall time that no operator
accounts for: Python, dispatch, and the profiler's own cost.

    .venv/bin/python benchmarks/train_profile.py          # table + benchmarks/out/train_profile.json
"""

from __future__ import annotations

import collections
import contextlib
import os
import time

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from transformer_lens.components import Attention, LayerNorm, LayerNormPre
from transformer_lens.components.mlps.mlp import MLP

from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.training import fastpath
from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.reporting import environment

if __package__:  # python -m benchmarks.train_profile
    from . import common
else:  # python benchmarks/train_profile.py: this folder is sys.path[0]
    import common
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")
FAMILIES = (
    "matmuls",
    "attention",
    "layer norm",
    "activation",
    "rotary",
    "codebook search",
    "straight-through backward",
    "embedding and loss",
    "optimizer",
    "other operators",
    "outside operators",
)
SCOPE = "cbinterp-family:"
BACKWARD_NAMES = (
    ("AccumulateGrad", "optimizer"),  # adding a parameter's gradient into .grad
    ("LayerNorm", "layer norm"),
    ("Gelu", "activation"),
    ("ScaledDotProduct", "attention"),
    ("Softmax", "attention"),
    ("Mm", "matmuls"),
    ("Gather", "embedding and loss"),
    ("Index", "embedding and loss"),
    ("LogSoftmax", "embedding and loss"),
    ("Embedding", "embedding and loss"),
)


def build(recipe: FSMRecipe, codebooks: bool, n_codes: int, seed: int):
    from transformer_lens import HookedTransformer

    from cbinterp import attach_codebooks

    model = HookedTransformer(recipe.model_config(recipe.fsm(), device="cpu"))
    if codebooks:
        attach_codebooks(model, sites=["attn", "mlp"], n_codes=n_codes, k=1, seed=seed)
    return model.train()


@contextlib.contextmanager
def labelled(model):
    """Open a profiler scope named after the family around every module forward, and around rotary embeddings."""
    handles, patched = [], []

    def family_of(module) -> str | None:
        if isinstance(module, Codebook):
            return "codebook search"
        if isinstance(module, (LayerNorm, LayerNormPre)):
            return "layer norm"
        if isinstance(module, Attention):
            return "attention"
        if isinstance(module, MLP):
            return "activation"  # its matmuls are told apart by operator name
        return None

    for module in model.modules():
        family = family_of(module)
        if family is None:
            continue
        scopes = []

        def pre(mod, args, family=family, scopes=scopes):
            scope = record_function(SCOPE + family)
            scope.__enter__()
            scopes.append(scope)

        def post(mod, args, out, scopes=scopes):
            scopes.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    for module in model.modules():
        if isinstance(module, Attention):
            original = module.apply_rotary

            def rotary(*args, original=original, **kwargs):
                with record_function(SCOPE + "rotary"):
                    return original(*args, **kwargs)

            module.apply_rotary = rotary
            patched.append(module)
    original_rotate = fastpath._rotate

    def rotate(*args, **kwargs):
        with record_function(SCOPE + "rotary"):
            return original_rotate(*args, **kwargs)

    fastpath._rotate = rotate
    try:
        yield
    finally:
        fastpath._rotate = original_rotate
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.apply_rotary


def classify(events) -> tuple[dict[str, float], dict[str, float]]:
    """Self time (s) per family, and per operator name for the operators in no family ("other operators")."""

    def ancestor(e, prefix: str):
        """`e` or the nearest event around it whose name starts with `prefix` (None if none does)."""
        node = e
        while node is not None and not node.name.startswith(prefix):
            node = node.cpu_parent
        return node

    def scope_of(e) -> str | None:
        scope = ancestor(e, SCOPE)
        return None if scope is None else scope.name[len(SCOPE) :]

    def backward_root(e):
        return ancestor(e, "autograd::engine::evaluate_function")

    def in_optimizer(e) -> bool:
        return ancestor(e, "Optimizer.") is not None

    forward_family = {}  # sequence number of a forward operator -> the family it ran in
    for e in events:
        if e.sequence_nr >= 0 and backward_root(e) is None:
            forward_family.setdefault(e.sequence_nr, (scope_of(e), e.name))
    totals = collections.defaultdict(float)
    unplaced = collections.defaultdict(float)
    for e in events:
        if e.name.startswith(SCOPE) or e.self_cpu_time_total <= 0:
            continue
        seconds = e.self_cpu_time_total / 1e6
        root = backward_root(e)
        if in_optimizer(e) or e.name.startswith("Optimizer."):
            family = "optimizer"
        elif root is not None:
            if "StraightThrough" in root.name:
                family = "straight-through backward"
            else:
                scope, forward_name = forward_family.get(root.sequence_nr, (None, ""))
                family = _family(scope, e.name if e.name in MATMULS else forward_name)
                if family == "other operators":  # not paired with a forward: the node's name says what it is
                    family = next((f for key, f in BACKWARD_NAMES if key in root.name), family)
        else:
            family = _family(scope_of(e), e.name)
        totals[family] += seconds
        if family == "other operators":
            unplaced[root.name if root is not None else e.name] += seconds
    return dict(totals), dict(unplaced)


def _family(scope: str | None, op: str) -> str:
    if op in MATMULS and scope != "codebook search":
        return "matmuls"
    if scope is not None:
        return scope
    loss_ops = ("aten::log_softmax", "aten::_log_softmax", "aten::gather", "aten::embedding", "aten::index")
    return "embedding and loss" if op in loss_ops else "other operators"


def profile_variant(recipe, codebooks: bool, fused: bool, args) -> dict:
    torch.manual_seed(args.seed)
    model = build(recipe, codebooks, args.n_codes, args.seed)
    tokens = torch.randint(0, recipe.fsm().vocab_size, (args.batch, recipe.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with fastpath.fast_kernels(model, enabled=fused):
            loss = model(tokens, return_type="loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall_unprofiled = (time.perf_counter() - start) / args.steps
    with labelled(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - start) / args.steps
    totals, unplaced = classify(prof.events())
    totals = {k: v / args.steps for k, v in totals.items()}
    top_unplaced = sorted(unplaced.items(), key=lambda kv: -kv[1])[:8]
    totals["outside operators"] = max(0.0, wall - sum(totals.values()))
    return {
        "codebooks": codebooks,
        "fused_kernels": fused,
        "step_s": wall_unprofiled,
        "profiled_step_s": wall,
        "family_s": {f: totals.get(f, 0.0) for f in FAMILIES},
        "family_share": {f: totals.get(f, 0.0) / wall for f in FAMILIES},
        "other_operators_s": {name: seconds / args.steps for name, seconds in top_unplaced},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser("train_profile", __doc__, batch=64, n_codes=1000, warmup=2, steps=3, seed=0)
    parser.add_argument("--quick", action="store_true", help="a tiny model and batch: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    recipe = FSMRecipe.paper()
    if args.quick:
        recipe = FSMRecipe.quick(seq_len=16)
        args.batch, args.n_codes, args.warmup, args.steps = 4, 32, 1, 1
    rows = [profile_variant(recipe, cb, fused, args) for cb in (False, True) for fused in (False, True)]

    names = [
        ("no codebooks" if not r["codebooks"] else "codebooks") + (", fused" if r["fused_kernels"] else ", TL")
        for r in rows
    ]
    threads = torch.get_num_threads()
    print(f"\nshare of a profiled training step (batch {args.batch} x {recipe.seq_len}, {threads} threads)")
    print(f"{'family':<28}" + "".join(f"{n:>22}" for n in names))
    for family in FAMILIES:
        print(f"{family:<28}" + "".join(f"{r['family_share'][family]:>21.1%} " for r in rows))
    print(f"{'step (ms, unprofiled)':<28}" + "".join(f"{r['step_s'] * 1e3:>21.0f} " for r in rows))
    report = {
        "benchmark": "train_profile",
        "batch": args.batch,
        "seq_len": recipe.seq_len,
        "n_codes": args.n_codes,
        **environment(load_average_start=load_before),
        "quick": args.quick,
        "variants": dict(zip(names, rows)),
    }
    return common.finish(args.out, report)


if __name__ == "__main__":
    main()
