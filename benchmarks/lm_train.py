"""Train the codebook language model on the shipped English corpus: (a) baseline, (b) codebooks, (c) fine-tuned.

    python benchmarks/lm_train.py            # the full run (cbinterp.recipes.lm.LMRecipe.paper()), <= 30 CPU minutes
    python benchmarks/lm_train.py --ship     # ... and copy (b) and (a) into cbinterp/assets/models/
    python benchmarks/lm_train.py --quick    # a seconds-long run on a slice of the corpus (the test suite)

The recipe (`cbinterp.recipes.lm`, every step a library call): a byte-level BPE tokenizer trained on the training
split; (a) a HookedTransformer trained from scratch; (b) (a) with a codebook after every attention head (k = 8),
k-means initialised, trained end to end with aeloss; (c) (a) trained as many further steps without codebooks, on
the same batches. Held-out loss (nats/token) and next-token accuracy of (a), (b), (c) and of (b) with its codebooks
bypassed, and the dead-code fraction of each codebook over the held-out tokens. Interrupted runs resume from the
checkpoints under `--out`. Writes `<out>/results.json` and one loadable folder per model (`<out>/codebook`,
`<out>/baseline`, `<out>/finetuned`: `cbinterp.load_pretrained(path)` opens them).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from cbinterp.core import tl_compat as tc  # noqa: E402
from cbinterp.core.storage.atomic import atomic_dir, atomic_file  # noqa: E402
from cbinterp.pretrained import BASELINE_MODEL, DEFAULT_MODEL, MODELS_DIR  # noqa: E402
from cbinterp.recipes.lm import PHASES, LMRecipe, default_device, run_lm  # noqa: E402
from cbinterp.reporting import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The paper's TinyStories figures (Tamkin et al. 2023, one-layer model, attention codebooks, k = 8).
PAPER = {"finetuned_loss": 1.57, "codebook_loss": 1.66, "codebook_minus_finetuned_loss": 0.09}
TARGET_GAP = 0.10  # the target: (b) held-out loss <= (c) + 0.10 nats
QUICK_CHARS = {"train": 400_000, "heldout": 40_000}
SHIP = {"codebook": DEFAULT_MODEL, "baseline": BASELINE_MODEL}
SHIP_LIMIT_BYTES = 8 * 2**20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="LMRecipe.quick() on a slice of the corpus (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/out/lm (--quick: lm_quick)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--fresh", action="store_true", help="delete earlier checkpoints under --out first")
    parser.add_argument("--ship", action="store_true", help=f"copy (b) and (a) into {MODELS_DIR.relative_to(ROOT)}")
    parser.add_argument(
        "--corpus",
        choices=["english", "toytext"],
        default="english",
        help="english: the shipped corpus (cbinterp.tasks.corpus); toytext: generated, for development",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    group = parser.add_argument_group("recipe (defaults: LMRecipe.paper(), or .quick() with --quick)")
    for field in dataclasses.fields(LMRecipe):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "sites":
            group.add_argument(flag, nargs="+", default=None)
        elif field.type in ("int", "float", "str"):
            group.add_argument(flag, type={"int": int, "float": float, "str": str}[field.type], default=None)
        elif field.type == "bool":
            group.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    args = parser.parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(LMRecipe) if getattr(args, f.name) is not None
    }
    try:
        args.recipe = (LMRecipe.quick if args.quick else LMRecipe.paper)(**overrides)
    except ValueError as err:
        parser.error(str(err))
    if args.ship and args.quick:
        parser.error("--ship ships the full run's models; drop --quick.")
    if args.ship and args.corpus != "english":
        parser.error("--ship ships models trained on the English corpus; drop --corpus toytext.")
    args.device = args.device or default_device()
    args.out = args.out or ROOT / "benchmarks" / "out" / ("lm_quick" if args.quick else "lm")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def load_texts(args) -> tuple[list[str], list[str], dict]:
    """Training and held-out texts and a description of the corpus (its sha256 for the English one)."""
    if args.corpus == "toytext":
        from cbinterp.tasks.toytext import generate_corpus

        docs = generate_corpus(2000 if args.quick else 40_000, seed=0)
        cut = len(docs) * 19 // 20
        return (
            docs[:cut],
            docs[cut:],
            {"name": "toytext", "n_documents": len(docs), "heldout_documents": len(docs) - cut},
        )
    try:
        from cbinterp.tasks import corpus as corpus_module
    except ImportError as err:
        raise SystemExit(f"The English corpus is not installed ({err}); pass --corpus toytext to develop.") from err
    train_docs = corpus_module.load_corpus(split="train")
    heldout_docs = corpus_module.load_corpus(split="heldout")
    manifest = json.loads((corpus_module.CORPUS_DIR / corpus_module.MANIFEST_FILE).read_text())
    info = {
        "name": "english",
        "file": manifest.get("file"),
        "sha256": manifest.get("sha256"),
        "heldout_fraction": manifest.get("heldout_fraction", corpus_module.DEFAULT_HELDOUT_FRACTION),
        "sources": sorted(manifest.get("sources", {})),
        "train_documents": len(train_docs),
        "heldout_documents": len(heldout_docs),
        "heldout_ids_first": [d.id for d in heldout_docs[:8]],
    }
    if args.quick:  # a slice with every source in it, taken in corpus order
        train_docs = _slice(train_docs, QUICK_CHARS["train"])
        heldout_docs = _slice(heldout_docs, QUICK_CHARS["heldout"])
        info["slice"] = {"train_documents": len(train_docs), "heldout_documents": len(heldout_docs), **QUICK_CHARS}
    return [d.text for d in train_docs], [d.text for d in heldout_docs], info


def _slice(docs: list, max_chars: int) -> list:
    """Documents taken source by source in turn (each in corpus order) until `max_chars`; order kept."""
    by_source: dict[str, list] = {}
    for doc in docs:
        by_source.setdefault(doc.source, []).append(doc)
    queues = [iter(group) for group in by_source.values()]
    kept, total = [], 0
    while queues and total < max_chars:
        for queue in list(queues):
            doc = next(queue, None)
            if doc is None:
                queues.remove(queue)
                continue
            kept.append(doc)
            total += len(doc.text)
    ids = {d.id for d in kept}
    return [d for d in docs if d.id in ids]


def settings_of(args) -> dict:
    """What a resumed run must share with the run it continues."""
    return {"recipe": args.recipe.to_dict(), "corpus": args.corpus, "quick": args.quick}


def check_resumable(out: Path, settings: dict, fresh: bool) -> None:
    """Refuse to continue checkpoints made with other settings (delete them with --fresh)."""
    if fresh:
        for name in ("checkpoints", "tokenizer"):
            shutil.rmtree(out / name, ignore_errors=True)
    saved = out / "checkpoints" / "settings.json"
    if saved.exists():
        before = json.loads(saved.read_text())
        if before != settings:
            flat_before, flat_now = {**before, **before.get("recipe", {})}, {**settings, **settings["recipe"]}
            changed = sorted(k for k in flat_now if k != "recipe" and flat_before.get(k) != flat_now[k])
            raise SystemExit(
                f"{out / 'checkpoints'} holds a run with other settings (differing: {changed}). Pass --fresh to "
                f"start over, or --out to write elsewhere."
            )
    saved.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(saved) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))


def run(args) -> dict:
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_of(args)
    print("settings:", json.dumps(settings["recipe"] | {"device": args.device, "corpus": args.corpus}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    check_resumable(args.out, settings, args.fresh)
    mark = time.perf_counter()
    train_texts, heldout_texts, corpus = load_texts(args)
    load_s = time.perf_counter() - mark
    command = "python benchmarks/lm_train.py" + "".join(f" {a}" for a in args.argv)
    suffix = "-quick" if args.quick else ("" if args.corpus == "english" else f"-{args.corpus}")
    names = {
        "codebook": DEFAULT_MODEL + suffix,
        "baseline": BASELINE_MODEL + suffix,
        "finetuned": "english-finetuned" + suffix,
    }
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    card_extra = {"corpus": corpus, "command": command, "created": created, "paper": PAPER}
    results = run_lm(
        args.recipe,
        train_texts,
        heldout_texts,
        args.out,
        device=args.device,
        progress=not args.no_progress,
        card_extra=card_extra,
        names=names,
    )
    results["timings_s"]["corpus_load_s"] = load_s
    results["timings_s"]["script_total_s"] = time.perf_counter() - start
    results |= {"settings": settings, "corpus": corpus, "command": command, "created": created, "paper": PAPER,
                "target": {"codebook_minus_finetuned_loss_at_most": TARGET_GAP}}  # fmt: skip
    gap = results["comparison"]["codebook_minus_finetuned_loss"]
    results["target"]["met"] = gap <= TARGET_GAP
    report(results)
    write_json(args.out / "results.json", results, indent=1)
    print(f"wrote {args.out}/results.json and model folders {', '.join(str(args.out / p) for p in PHASES)}")
    if args.ship:
        ship(args.out)
    return results


def report(results: dict) -> None:
    ev, phases = results["eval"], results["phases"]
    base = phases["baseline"]["steps"]
    rows = [
        ("(a) baseline", ev["baseline"], base, None),
        ("(b) codebooks", ev["codebook"], base + phases["codebook"]["steps"], PAPER["codebook_loss"]),
        ("(b) codebooks bypassed", ev["codebook_bypassed"], None, None),
        ("(c) fine-tuned baseline", ev["finetuned"], base + phases["finetuned"]["steps"], PAPER["finetuned_loss"]),
    ]
    print(f"\nHeld-out, {ev['baseline']['n_tokens']:,} predicted tokens (paper: TinyStories, another data set)")
    print(f"  {'model':<28} {'loss nats/tok':>13} {'accuracy':>10} {'steps':>7}   paper loss")
    for label, e, steps, paper in rows:
        print(
            f"  {label:<28} {e['loss']:>10.4f} {e['accuracy']:>13.4f} {steps if steps is not None else '':>7}"
            f"   {paper if paper is not None else ''}"
        )
    gap = results["comparison"]["codebook_minus_finetuned_loss"]
    print(
        f"  (b) - (c): {gap:+.4f} nats (target <= +{TARGET_GAP}: {'met' if gap <= TARGET_GAP else 'NOT MET'}; "
        f"paper +{PAPER['codebook_minus_finetuned_loss']:.2f} on TinyStories)"
    )
    if ev.get("codebook_at_init"):
        print(f"  (b) right after k-means, before training: loss {ev['codebook_at_init']['loss']:.4f} (first windows)")
    for name, summary in ev["codebook"].get("codebooks", {}).items():
        per_head = summary.get("dead_fraction_per_head")
        heads = f" (per head: {', '.join(f'{x:.3f}' for x in per_head)})" if per_head else ""
        print(f"  dead codes {name}: {summary['dead_fraction']:.3f} of {summary['n_codes_total']}{heads}")
    print("\nphase            steps    tokens        wall s   tokens/s")
    for phase in PHASES:
        p = phases[phase]
        rate = f"{p['tokens_per_s']:,.0f}" if p["tokens_per_s"] else "(resumed)"
        print(f"  {phase:<14} {p['steps']:>5} {p['tokens']:>10,} {p['wall_s_this_run']:>10.0f}   {rate}")
    t = results["timings_s"]
    print("timings: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ship(out: Path) -> None:
    """Copy the codebook model (b) and the baseline (a) into the package's assets, each folder atomically."""
    for phase, name in SHIP.items():
        source = out / phase
        size = _folder_bytes(source)
        if size > SHIP_LIMIT_BYTES:
            print(f"warning: {source} is {size / 2**20:.1f} MiB, over the {SHIP_LIMIT_BYTES / 2**20:.0f} MiB budget")
        with atomic_dir(MODELS_DIR / name) as tmp:
            shutil.copytree(source / "model", tmp / "model")  # holds the tokenizer, checksummed: the one loaded
            shutil.copy2(source / "card.json", tmp / "card.json")
        print(f"shipped {source} -> {MODELS_DIR / name} ({size / 2**20:.2f} MiB)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not tc.HAS_HOOKED:
        what, instead = "lm_train.py trains from a config and", "measure a saved model with lm_probes.py --model DIR"
        raise SystemExit(tc.no_hooked_message(what, instead))
    return run(args)


if __name__ == "__main__":
    main()
