"""The FSM causal test as the paper measures it: give a model in state a the codes of state b at one position.

    python benchmarks/fsm_intervention.py            # the model of benchmarks/fsm_precision.py (trained if missing)
    python benchmarks/fsm_intervention.py --quick    # its quick model (benchmarks/out/fsm_quick), fewer pairs

State swap (the paper's Fig. 4a). For each pair of states (a, b), a != b, two random walks of the same number of
states end in a and in b. The model reads a's walk; at a's last position only, the codes of the swapped codebooks
are replaced by the codes the model chose at b's last position (a run on b's walk). Measured for no swap, each
single attention layer (all its heads), each single MLP layer, all attention, all MLP and all components:

* `jsd_norm`: the mean Jensen-Shannon divergence between the patched next-token distribution and b's own,
  divided by the same mean without a patch, so that "none" = 1 and a perfect swap = 0 (the paper's measure);
* `success_b`: the share of pairs whose next state, decoded greedily digit by digit with the same single patch
  in place, is a valid successor of b (and `success_a`, of a).

State-plus-digit swap (the paper's Fig. 4b, reported apart). The walks also hold the first digit of a successor
(a > d and b > d'), and the codes at that digit's position are swapped; `success_b` is then the share whose
decoded last digit completes a successor of b that begins with d', and `jsd_norm` as above for the last digit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import cbinterp
from cbinterp.core import tl_compat as tc
from cbinterp.core.codebooks.interventions import intervene, replace_codes
from cbinterp.core.device import default_device
from cbinterp.core.storage.atomic import atomic_file
from cbinterp.models.hooked_as_bridge import hooked_names
from cbinterp.recipes.fsm import FSMRecipe
from cbinterp.reporting import write_json
from cbinterp.tasks.fsm import FSM

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256
#: The paper's normalised JSD to b's distribution (Fig. 4a), for the conditions measured the same way.
PAPER_JSD = {"none": 1.0, "attn_layer_0": 0.86, "mlp_layer_1": 0.71, "all_attn": 0.56, "all_mlp": 0.26, "all": 0.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="fsm_precision.py's --out (default benchmarks/out/fsm, with --quick benchmarks/out/fsm_quick)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default benchmarks/out/fsm_intervention (with --quick benchmarks/out/fsm_intervention_quick)",
    )
    parser.add_argument("--pairs", type=int, default=None, help="(a, b) pairs (default 1000, 400 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled walks")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--quick", action="store_true", help="the quick model and fewer pairs (the test suite)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars while training")
    args = parser.parse_args(argv)
    out_dir = ROOT / "benchmarks" / "out"
    args.source = args.source or out_dir / ("fsm_quick" if args.quick else "fsm")
    args.out = args.out or out_dir / ("fsm_intervention_quick" if args.quick else "fsm_intervention")
    args.pairs = args.pairs or (400 if args.quick else 1000)
    if args.pairs < 1:
        parser.error(f"--pairs must be positive, got {args.pairs}.")
    args.device = args.device or default_device()
    return args


def ensure_model(args: argparse.Namespace) -> None:
    """Train the recipe's model into `--from` when it lacks one (the same recipe as fsm_precision.py's default)."""
    if (args.source / "model" / "config.json").is_file() and (args.source / "fsm.json").is_file():
        return
    if not tc.HAS_HOOKED:  # a saved model (a bridge too) is measured as it is; training one needs a config
        raise SystemExit(tc.no_hooked_message(f"No model in {args.source}: training one", "save one there first"))
    recipe = FSMRecipe.quick() if args.quick else FSMRecipe.paper()
    print(f"training the FSM model into {args.source} (FSMRecipe.{'quick' if args.quick else 'paper'}())", flush=True)
    fsm, result = recipe.run(
        checkpoint_dir=args.source / "checkpoints", device=args.device, progress=not args.no_progress
    )
    fsm.save(args.source / "fsm.json")
    cbinterp.save(result.model, args.source / "model", extra={"recipe": recipe.to_dict()})


# -- measuring -----------------------------------------------------------------------------------------------
def jsd_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits (0 to 1) between rows of two probability tables."""
    m = (p + q) / 2
    kl = lambda x: (torch.xlogy(x, x) - torch.xlogy(x, m)).sum(-1)  # xlogy: 0 log 0 = 0
    return (kl(p) + kl(q)) / (2 * np.log(2))


def normalised_jsd(jsd_by_condition: dict[str, np.ndarray], baseline: str = "none") -> dict[str, float]:
    """Mean JSD per condition divided by the baseline's mean, so that the baseline is 1 (the paper's scale)."""
    base = float(np.mean(jsd_by_condition[baseline]))
    if base <= 0:
        raise ValueError(f"The {baseline!r} condition has zero JSD to the target: nothing to normalise by.")
    return {name: float(np.mean(values)) / base for name, values in jsd_by_condition.items()}


def sample_pairs(fsm: FSM, n_pairs: int, max_states: int, rng: np.random.Generator) -> list[dict]:
    """Groups of pairs by walk length: `{"n_states", "walks_a", "walks_b"}`, the walks ending in a and b, a != b."""
    lengths = rng.integers(1, max_states + 1, n_pairs)
    groups = []
    for n_states in np.unique(lengths):
        count = int((lengths == n_states).sum())
        walks_a = fsm.sample_states(count, int(n_states), rng)
        walks_b = fsm.sample_states(count, int(n_states), rng)
        same = walks_a[:, -1] == walks_b[:, -1]
        while same.any():  # redraw b's walk until it ends elsewhere
            walks_b[same] = fsm.sample_states(int(same.sum()), int(n_states), rng)
            same = walks_a[:, -1] == walks_b[:, -1]
        groups.append({"n_states": int(n_states), "walks_a": walks_a, "walks_b": walks_b})
    return groups


@torch.no_grad()
def swap_once(model, fsm: FSM, tokens_a, tokens_b, names: list[str], code_names: set[str], n_digits: int):
    """Patch a's last position with b's codes there (codebooks `names`), then decode `n_digits` digits greedily
    with the same patch. Returns (the patched next-token distribution, b's own, the decoded digits)."""
    logits_b, cache_b = model.run_with_cache(tokens_b, names_filter=code_names.__contains__)
    own_b = logits_b[:, -1].float().softmax(-1)
    last = tokens_a.shape[1] - 1  # an absolute index: longer runs patch the same place
    hooks = [replace_codes(model, name, cache_b[f"{name}.hook_codes"][:, last], positions=last) for name in names]
    digits = tokens_a.new_zeros(len(tokens_a), 0)
    first = None
    with intervene(model, hooks):
        for _ in range(n_digits):
            logits = model(torch.cat([tokens_a, digits], dim=1))[:, -1].float()
            if first is None:
                first = logits.softmax(-1)
            digits = torch.cat([digits, logits[:, : fsm.base].argmax(-1, keepdim=True)], dim=1)
    return first, own_b, digits.cpu().numpy()


def run_conditions(model, fsm: FSM, groups: list[dict], conditions: dict[str, list[str]], device: str) -> dict:
    """Both swaps for every condition: normalised JSD to b, and the share of decoded states valid after b."""
    code_names = {f"{name}.hook_codes" for name in cbinterp.get_codebooks(model)}
    rng = np.random.default_rng(1)
    # with one digit per state, "state, then its first digit" is the next state itself: no state-plus-digit swap
    kinds = ("state", "state_digit") if fsm.digits > 1 else ("state",)
    out = {kind: {c: {"jsd": [], "b": [], "a": []} for c in conditions} for kind in kinds}
    for group in groups:
        for start in range(0, len(group["walks_a"]), BATCH):
            walks_a = group["walks_a"][start : start + BATCH]
            walks_b = group["walks_b"][start : start + BATCH]
            a, b = walks_a[:, -1], walks_b[:, -1]
            tokens_a, tokens_b = fsm.encode(walks_a).to(device), fsm.encode(walks_b).to(device)
            # the state-plus-digit swap: each walk continues with the first digit of one of its successors
            next_a = fsm.successors[a, rng.integers(0, fsm.n_edges, len(a))]
            next_b = fsm.successors[b, rng.integers(0, fsm.n_edges, len(b))]
            lead_a = torch.as_tensor(fsm.state_digits(next_a)[:, :1], device=device)
            lead_b_np = fsm.state_digits(next_b)[:, :1]
            tokens_ad = torch.cat([tokens_a, lead_a], dim=1)
            tokens_bd = torch.cat([tokens_b, torch.as_tensor(lead_b_np, device=device)], dim=1)
            for condition, names in conditions.items():
                first, own_b, digits = swap_once(model, fsm, tokens_a, tokens_b, names, code_names, fsm.digits)
                predicted = fsm.decode_states(digits)
                row = out["state"][condition]
                row["jsd"].append(jsd_bits(first, own_b).cpu().numpy())
                row["b"].append(fsm.is_successor(b, predicted))
                row["a"].append(fsm.is_successor(a, predicted))
                if "state_digit" not in out:
                    continue
                first, own_b, digits = swap_once(model, fsm, tokens_ad, tokens_bd, names, code_names, fsm.digits - 1)
                completed_b = fsm.decode_states(np.concatenate([lead_b_np, digits], axis=1))
                completed_a = fsm.decode_states(np.concatenate([lead_a.cpu().numpy(), digits], axis=1))
                row = out["state_digit"][condition]
                row["jsd"].append(jsd_bits(first, own_b).cpu().numpy())
                row["b"].append(fsm.is_successor(b, completed_b))
                row["a"].append(fsm.is_successor(a, completed_a))
    results = {}
    for kind, rows in out.items():
        jsd = {c: np.concatenate(r["jsd"]) for c, r in rows.items()}
        norm = normalised_jsd(jsd)
        results[kind] = {
            c: {
                "codebooks": conditions[c],
                "jsd_norm": norm[c],
                "jsd_bits": float(np.mean(jsd[c])),
                "success_b": float(np.concatenate(r["b"]).mean()),
                "success_a": float(np.concatenate(r["a"]).mean()),
            }
            for c, r in rows.items()
        }
    return results


def conditions_of(model) -> dict[str, list[str]]:
    codebooks = list(cbinterp.get_codebooks(model))
    attn = [n for n in codebooks if n.endswith("attn.hook_z")]
    mlp = [n for n in codebooks if n.endswith("hook_mlp_out")]
    saved = hooked_names(model)  # a model saved from a HookedTransformer and loaded on TransformerLens 4 moves names
    layer = lambda name: int(saved[name].split(".")[1])
    conditions = {"none": []}
    conditions |= {f"attn_layer_{layer(n)}": [n] for n in attn}
    conditions |= {f"mlp_layer_{layer(n)}": [n] for n in mlp}
    conditions |= {"all_attn": attn, "all_mlp": mlp, "all": codebooks}
    return conditions


# -- the run -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    ensure_model(args)
    model = cbinterp.load(args.source / "model", device=args.device).eval()
    fsm = FSM.load(args.source / "fsm.json")
    if not any(n.endswith("hook_mlp_out") for n in cbinterp.get_codebooks(model)):
        raise SystemExit(f"The model at {args.source / 'model'} has no MLP codebooks; train it with fsm_precision.py.")
    max_states = (model.cfg.n_ctx - 1) // fsm.digits - 1  # room for the next state's digits
    if max_states < 1:
        raise SystemExit(f"The model's context ({model.cfg.n_ctx}) is too short for a state and its successor.")
    groups = sample_pairs(fsm, args.pairs, max_states, np.random.default_rng(args.seed))
    settings = {
        "from": str(args.source),
        "pairs": args.pairs,
        "seed": args.seed,
        "device": args.device,
        "quick": args.quick,
        "max_states": max_states,
        "n_states": fsm.n_states,
        "n_edges": fsm.n_edges,
        "patched": "a's last position only, with b's codes at b's last position",
    }
    print("settings:", json.dumps(settings), flush=True)
    measured = run_conditions(model, fsm, groups, conditions_of(model), args.device)
    results = {
        "settings": settings,
        "paper_jsd_norm": PAPER_JSD,
        "state_swap": measured["state"],
        "state_digit_swap": measured.get("state_digit"),  # None for a machine of one digit per state
        "timings_s": {"total_s": time.perf_counter() - start},
    }
    report(results)
    write_json(args.out / "results.json", results, indent=1)
    figure = swap_figure(results, title=f"FSM ({fsm.n_states} states): a's last position given b's codes")
    with atomic_file(args.out / "figure.html") as tmp:
        figure.write_html(tmp, include_plotlyjs="cdn")
    print(f"wrote {args.out}/results.json, figure.html", flush=True)
    return results


def report(results: dict) -> None:
    for kind, title in (("state_swap", "state swap (Fig. 4a)"), ("state_digit_swap", "state-plus-digit swap (4b)")):
        if results[kind] is None:
            print(f"\n{title}: none (one digit per state)")
            continue
        print(f"\n{title}")
        print(f"{'condition':<16}{'JSD to b, normalised':>22}{'paper':>8}{'successor of b':>16}{'of a':>8}")
        for name, row in results[kind].items():
            paper = PAPER_JSD.get(name) if kind == "state_swap" else None
            print(
                f"{name:<16}{row['jsd_norm']:>22.3f}{'' if paper is None else f'{paper:.2f}':>8}"
                f"{row['success_b']:>16.3f}{row['success_a']:>8.3f}"
            )


def swap_figure(results: dict, title: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("state swap", "state-plus-digit swap"))
    for col, kind in enumerate(("state_swap", "state_digit_swap"), start=1):
        rows = results[kind] or {}
        names = list(rows)
        fig.add_trace(
            go.Bar(x=names, y=[r["jsd_norm"] for r in rows.values()], name="JSD to b (none = 1)", showlegend=col == 1),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Bar(x=names, y=[r["success_b"] for r in rows.values()], name="successor of b", showlegend=col == 1),
            row=1,
            col=col,
        )
    fig.update_layout(title=title, barmode="group", height=450, width=1200)
    return fig


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
