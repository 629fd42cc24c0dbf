"""Render the FSM tables of benchmarks/README.md from a `fsm_precision.py` run, or check the file against it.

    python tools/results_tables.py benchmarks/out/fsm/seed_0/results.json --seeds benchmarks/out/fsm/seeds.json
    python tools/results_tables.py benchmarks/out/fsm/seed_0/results.json --check benchmarks/README.md
    python tools/results_tables.py benchmarks/out/fsm/seed_0/results.json --seeds benchmarks/out/fsm/seeds.json \
        --snapshot tests/fixtures/fsm_default_run   # what the tests check benchmarks/README.md against

`results.json` is one seed's run (its `headline`, `accuracy`, `code_search`, `phases`, `recipe` and `paper`);
`seeds.json` (written by `--seeds 0 1 2`) fills the "seeds 0-2" column with mean ± standard deviation. The two
tables are "Same quantities as the paper" and "Ours"; `--check` finds each in the markdown file by its header
row and compares every cell rendered here with the row of the same label there (exit 1 on a difference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PAPER_HEADER = ["", "seed 0", "seeds 0-2", "paper"]
OURS_HEADER = ["", "seed 0", "seeds 0-2"]
#: Mass and teacher-forced rows: one value per model, in this order.
MODELS = ["without_codebooks", "control", "with_codebooks", "bypassed"]


def _f(value: float | None, digits: int = 3) -> str:
    """`value` to `digits` places; "n/a" where the run measured nothing (e.g. no code passed the search)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _spread(stat: dict | None, digits: int = 3, full: bool = False) -> str:
    """`mean ± sd`, or `mean ± sd [min, max]` with `full`; empty when not aggregated."""
    if stat is None:
        return ""
    text = f"{_f(stat['mean'], digits)} ± {_f(stat['std'], digits)}"
    return text + f" [{_f(stat['min'], digits)}, {_f(stat['max'], digits)}]" if full else text


def _layers(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 1 else ", ".join(map(str, layers))


def paper_table(results: dict, seeds: dict | None = None) -> list[list[str | None]]:
    """Rows (label, seed 0, seeds 0-2, paper) of "Same quantities as the paper"; None where seeds.json is absent."""
    head, search, paper = results["headline"], results["code_search"], results["paper"]
    agg = seeds["aggregate"] if seeds else None
    recall = f"{search['min_recall']:.0%}"
    labels = {
        "state_accuracy_without_codebooks": "state accuracy without codebooks (the warm-started model)",
        "state_accuracy_with_codebooks": "state accuracy with codebooks",
        "state_code_precision_mean": f"mean precision of each state's best code (MLP layers "
        f"{_layers(search['pooled_mlp_layers'])} pooled, recall > {recall}, held-out half)",
        "site_outputs_precision_mean": "best dimension of the attention and MLP outputs before quantization, at "
        "that code's recall, mean precision (held-out half)",
    }
    return [
        [label, _f(head[key]), _spread(agg.get(key), full=True) if agg else None, repr(paper[key])]
        for key, label in labels.items()
    ]


def ours_table(results: dict, seeds: dict | None = None) -> list[list[str | None]]:
    """Rows (label, seed 0, seeds 0-2) of "Ours"; the seeds cell is None where seeds.json is absent."""
    head, acc, search = results["headline"], results["accuracy"], results["code_search"]
    state, digit = search["state_headline"], search["state_digit_headline"]
    agg = seeds["aggregate"] if seeds else {}
    n_states = results["recipe"]["n_states"]
    control_steps = sum(p["steps"] for p in results["phases"] if p["phase"].startswith("control_"))
    layers = search["per_mlp_layer"]
    layer_ids = ", ".join(name.removeprefix("mlp_layer_") for name in layers)

    def mean(key: str) -> str:
        return _f(agg[key]["mean"]) if key in agg else ""

    rows = [
        (
            f"state accuracy of the control (warm start + the same {control_steps} steps without codebooks)",
            _f(head["state_accuracy_control"]),
            _spread(agg.get("state_accuracy_control")),
        ),
        (
            "state accuracy of the codebook model with its codebooks bypassed",
            _f(head["state_accuracy_bypassed"]),
            _spread(agg.get("state_accuracy_bypassed")),
        ),
        (
            "valid next-state mass: without codebooks / control / with codebooks / bypassed",
            " / ".join(_f(head[f"valid_mass_{m}"]) for m in MODELS),
            " / ".join(mean(f"valid_mass_{m}") for m in MODELS) if agg else "",
        ),
        (
            "teacher-forced transition accuracy, without / with codebooks (not the paper's measure)",
            f"{_f(head['teacher_forced_without_codebooks'])} / {_f(head['teacher_forced_with_codebooks'])}",
            f"{mean('teacher_forced_without_codebooks')} / {mean('teacher_forced_with_codebooks')}" if agg else "",
        ),
        (
            f"loss without codebooks / control / with codebooks / bypassed (optimal "
            f"{_f(acc['with_codebooks']['optimal_loss'])})",
            " / ".join(_f(acc[m]["loss"]) for m in MODELS),
            "",
        ),
        (
            "mean recall of each state's best code",
            _f(head["state_code_recall_mean"]),
            _spread(agg.get("state_code_recall_mean")),
        ),
        (
            "states with a code of precision >= 0.9 and recall >= 0.5",
            f"{head['states_with_own_code']} of {n_states}",
            _spread(agg.get("states_with_own_code"), 1),
        ),
        (
            "states with some code of precision >= 0.9 (any recall above 1%)",
            f"{head['states_with_precise_code']} of {n_states}",
            _spread(agg.get("states_with_precise_code"), 1),
        ),
        (
            "codes of precision >= 0.9 per state (mean); share of a state's positions where one of them fires",
            f"{_f(head['precise_codes_per_state_mean'], 2)}; {_f(state['precise_union_recall_mean'])}",
            _spread(agg.get("precise_codes_per_state_mean"), 2),
        ),
        (
            "share of a state code's firing that one previous state explains (`prev_share`), mean; the same among "
            "all of the state's positions",
            f"{_f(head['prev_share_mean'])}; {_f(head['prev_share_baseline_mean'])}",
            f"{_spread(agg.get('prev_share_mean'))}; {_spread(agg.get('prev_share_baseline_mean'))}" if agg else "",
        ),
        (
            "best MLP hidden unit at the best code's recall, mean precision (extra baseline)",
            _f(head["mlp_neurons_precision_mean"]),
            _spread(agg.get("mlp_neurons_precision_mean")),
        ),
        (
            f"per MLP layer alone, mean precision / recall of each state's best code: layer {layer_ids}",
            ", ".join(
                f"{_f(r['best_code_precision_mean'])} / {_f(r['best_code_recall_mean'])}" for r in layers.values()
            ),
            "",
        ),
        ("state-plus-digit features that occur", str(digit["n_features"]), ""),
        (
            "state-plus-digit: mean precision / recall of each feature's best code; features with a code of "
            "precision >= 0.9 and recall >= 0.5",
            f"{_f(head['state_digit_code_precision_mean'])} / {_f(head['state_digit_code_recall_mean'])}; "
            f"{head['state_digit_features_with_own_code']} of {digit['n_features']}",
            f"{_spread(agg.get('state_digit_code_precision_mean'))} / "
            f"{_spread(agg.get('state_digit_code_recall_mean'))}; "
            f"{_spread(agg.get('state_digit_features_with_own_code'), 0)}"
            if agg
            else "",
        ),
        (
            "state-plus-digit codes of precision >= 0.9 (chosen on one half)",
            str(head["state_digit_precise_codes"]),
            f"{_spread(agg.get('state_digit_precise_codes'), 0)} (the paper reports 686 state-plus-digit codes; its "
            "counting rule is not given, so this is not put beside it)"
            if agg
            else "",
        ),
    ]
    return [[label, seed0, spread if seeds else None] for label, seed0, spread in rows]


def _line(cells: list[str | None]) -> str:
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def _kept(header: list[str], rows: list[list[str | None]]) -> list[int]:
    """The columns a table shows: the label and every column that is not None in every row."""
    return [i for i in range(len(header)) if i == 0 or any(row[i] is not None for row in rows)]


def markdown(header: list[str], rows: list[list[str | None]]) -> str:
    """A markdown table; a column that is None in every row is left out."""
    keep = _kept(header, rows)
    lines = [_line([cells[i] for i in keep]) for cells in (header, *rows)]
    return "\n".join([lines[0], "|" + "---|" * len(keep), *lines[1:]])


def tables_in(text: str) -> dict[tuple[str, ...], dict[str, list[str]]]:
    """The markdown tables of a text by header row: {header cells: {first cell: cells}}."""
    tables: dict[tuple[str, ...], dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines() + [""]:
        if not raw.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in raw.strip().strip("|").split("|")]
        if current is None:
            current = tables.setdefault(tuple(cells), {})
        elif not set("".join(cells)) <= set("-: "):
            current[cells[0]] = cells
    return tables


def check(text: str, results: dict, seeds: dict | None = None) -> list[str]:
    """Every difference between the tables rendered from the run and those in `text`, one line each."""
    found = tables_in(text)
    problems = []
    for full_header, full_rows in (
        (PAPER_HEADER, paper_table(results, seeds)),
        (OURS_HEADER, ours_table(results, seeds)),
    ):
        # the full table (as in benchmarks/README.md, its seeds column unchecked without seeds.json), or the columns
        # `markdown` renders from this run alone
        keep = _kept(full_header, full_rows)
        if tuple(full_header) in found or tuple(full_header[i] for i in keep) not in found:
            keep = list(range(len(full_header)))
        header = [full_header[i] for i in keep]
        table = found.get(tuple(header))
        if table is None:
            problems.append(f"no table with the header {_line(header)!r}")
            continue
        for row in ([cells[i] for i in keep] for cells in full_rows):
            there = table.get(row[0])
            if there is None:
                problems.append(f"no row {row[0]!r}")
                continue
            for column, (ours, theirs) in enumerate(zip(row[1:], there[1:]), start=1):
                if ours is not None and ours != theirs:
                    problems.append(
                        f"{row[0]!r}, column {header[column]!r}: the run gives {ours!r}, the file {theirs!r}"
                    )
    return problems


def snapshot(results: dict, seeds: dict | None) -> tuple[dict, dict | None]:
    """The run without what the tables never read (per-state rows, loss curves): small enough to commit."""
    results = json.loads(json.dumps(results))
    results.pop("losses", None)
    results.get("code_search", {}).pop("states", None)
    seeds = None if seeds is None else {key: seeds[key] for key in ("seeds", "aggregate") if key in seeds}
    return results, seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a run's results.json (fsm_precision.py)")
    parser.add_argument("--seeds", type=Path, help="seeds.json of `fsm_precision.py --seeds ...`")
    parser.add_argument("--check", type=Path, metavar="MARKDOWN", help="compare with this file instead of printing")
    parser.add_argument("--snapshot", type=Path, metavar="DIR", help="write the run's table inputs there instead")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    seeds = json.loads(args.seeds.read_text(encoding="utf-8")) if args.seeds else None
    if args.snapshot is not None:
        small, small_seeds = snapshot(results, seeds)
        args.snapshot.mkdir(parents=True, exist_ok=True)
        for name, data in (("results.json", small), ("seeds.json", small_seeds)):
            if data is not None:
                (args.snapshot / name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {args.snapshot}")
        return 0
    if args.check is None:
        print(
            markdown(PAPER_HEADER, paper_table(results, seeds))
            + "\n\n"
            + markdown(OURS_HEADER, ours_table(results, seeds))
        )
        return 0
    problems = check(args.check.read_text(encoding="utf-8"), results, seeds)
    for problem in problems:
        print(problem)
    print(f"{args.check}: {'differs from' if problems else 'matches'} {args.results}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
