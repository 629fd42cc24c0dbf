"""Fine-tune codebooks into a pretrained model read from a local Hugging Face folder (the paper's recipe, Table 2's
protocol): the codebook model against the same model fine-tuned without codebooks for the same steps, on held-out
text.

    python benchmarks/finetune_pretrained.py --model FOLDER --data corpus           # the shipped corpus' splits
    python benchmarks/finetune_pretrained.py --model FOLDER --data notes.jsonl      # a .txt / .jsonl file
    python benchmarks/finetune_pretrained.py --model FOLDER --data DATASET_FOLDER   # datasets' save_to_disk folder
    python benchmarks/finetune_pretrained.py --model FOLDER --data corpus --quick   # seconds (the test suite)

Every step is a library call: `cbinterp.models.from_hf` (offline), then
`cbinterp.recipes.finetune.finetune_codebooks`. Held-out text is `--heldout`, the corpus' held-out split for
`--data corpus`, else every `--heldout-every`-th document of `--data`. For a folder written by `cbinterp.models.to_hf`
(a sequential model exported as Phi layers, half of whose sublayers are zeros) the sites are limited to the
sublayers that compute something. An interrupted run resumes from `<out>/checkpoints`. Writes `<out>/results.json`
and, with `--save`, the codebook model to `<out>/codebook-model` (`cbinterp.load` opens it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from cbinterp.core.device import default_device  # noqa: E402
from cbinterp.core.storage.io import save  # noqa: E402
from cbinterp.models import from_hf  # noqa: E402
from cbinterp.models.from_hf import EXPORT_FILE  # noqa: E402
from cbinterp.recipes.finetune import RESULTS_FILE, FinetuneRecipe, finetune_codebooks  # noqa: E402
from cbinterp.reporting import environment, print_table, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK_CHARS = {"train": 200_000, "heldout": 20_000}
#: The site alias each sublayer of a `to_hf` export stands for, by what the layer "holds".
EXPORT_PARTS = {"attention": "attn", "MLP": "mlp"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a local Hugging Face model folder")
    parser.add_argument(
        "--data",
        required=True,
        help="'corpus' (the shipped corpus), a .txt/.jsonl file or a folder written by datasets' save_to_disk",
    )
    parser.add_argument("--heldout", default=None, help="held-out text, as --data (default: see the module doc)")
    parser.add_argument("--split", default="train", help="the split of a DatasetDict folder (default train)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--quick", action="store_true", help="FinetuneRecipe.quick() on a slice of the data (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/out/finetune (--quick: _quick)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier checkpoints under --out first")
    parser.add_argument("--save", action="store_true", help="write the codebook model to <out>/codebook-model")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    group = parser.add_argument_group("recipe (defaults: FinetuneRecipe(), or .quick() with --quick)")
    for field in dataclasses.fields(FinetuneRecipe):
        flag = "--" + field.name.replace("_", "-")
        if field.name in ("sites", "layers"):
            group.add_argument(flag, nargs="+", type=int if field.name == "layers" else str, default=None)
        elif field.type in ("int", "float", "str"):
            group.add_argument(flag, type={"int": int, "float": float, "str": str}[field.type], default=None)
        elif field.type in ("bool", "bool | None"):
            group.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    args = parser.parse_args(argv)
    args.overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneRecipe) if getattr(args, f.name) is not None
    }
    try:
        args.recipe = (FinetuneRecipe.quick if args.quick else FinetuneRecipe)(**args.overrides)
    except ValueError as err:
        parser.error(str(err))
    if not args.model.is_dir():
        parser.error(f"--model {args.model}: no such folder; give a local Hugging Face model folder.")
    args.device = args.device or default_device()
    args.out = args.out or ROOT / "benchmarks" / "out" / ("finetune_quick" if args.quick else "finetune")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _slice(texts: list[str], max_chars: int) -> list[str]:
    """Whole documents, taken every few so that the slice spans the corpus, until `max_chars`."""
    total = sum(map(len, texts))
    step = max(1, total // max(1, max_chars) // 2)
    kept, size = [], 0
    for text in texts[::step]:
        if size >= max_chars:
            break
        kept.append(text)
        size += len(text)
    return kept


def load_source(spec: str, args: argparse.Namespace):
    """A text source for `finetune_codebooks`: a file as a Path (read lazily), a datasets folder as its Dataset."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if args.split not in data:
                raise SystemExit(f"{path} has splits {sorted(data)}; pick one with --split.")
            data = data[args.split]
        return data
    raise SystemExit(f"--data/--heldout {spec!r}: no such file or folder (or give 'corpus').")


def load_data(args: argparse.Namespace) -> tuple[object, object | None, dict]:
    """(training text, held-out text or None, a description of them)."""
    if args.data == "corpus":
        from cbinterp.tasks.corpus import corpus_stats, load_corpus

        train = [d.text for d in load_corpus(split="train")]
        heldout = [d.text for d in load_corpus(split="heldout")]
        info = {"name": "english corpus (cbinterp.tasks.corpus)", "sha256": corpus_stats()["sha256"]}
        if args.quick:
            train, heldout = _slice(train, QUICK_CHARS["train"]), _slice(heldout, QUICK_CHARS["heldout"])
            info["slice_chars"] = QUICK_CHARS
        info |= {"train_documents": len(train), "heldout_documents": len(heldout)}
        return train, heldout, info
    train = load_source(args.data, args)
    heldout = load_source(args.heldout, args) if args.heldout else None
    return train, heldout, {"name": args.data, "heldout": args.heldout}


def export_sites(folder: Path, recipe: FinetuneRecipe) -> FinetuneRecipe:
    """For a `to_hf` export: the recipe's site aliases at the layers whose sublayer computes something (the other
    half are zeros); hook names and templates are kept as given, and other folders keep the recipe."""
    record = folder / EXPORT_FILE
    if not record.is_file() or recipe.layers is not None:
        return recipe
    layout = json.loads(record.read_text())["layers"]
    sites = []
    for site in recipe.sites:
        parts = [part for part, alias in EXPORT_PARTS.items() if alias == site]
        if not parts:
            sites.append(site)
            continue
        for i, layer in enumerate(layout):
            if any(layer["holds"].startswith(p) or f"and {p}" in layer["holds"] for p in parts):
                sites.append(f"blocks.{i}.{'attn.hook_z' if site == 'attn' else 'hook_mlp_out'}")
    return recipe.replace(sites=tuple(sites))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh and (args.out / "checkpoints").exists():
        shutil.rmtree(args.out / "checkpoints")
    load = os.getloadavg()
    start = time.perf_counter()
    model = from_hf(args.model, device=args.device)
    recipe = export_sites(args.model, args.recipe)
    train, heldout, data_info = load_data(args)
    result = finetune_codebooks(
        model, train, recipe, args.out, heldout=heldout, text_column=args.text_column, progress=not args.no_progress
    )
    if args.save:
        save(result.model, args.out / "codebook-model", extra={"finetune": result.record["recipe"]})
    evals = result.evals
    rows = [
        [key, f"{evals[key]['loss']:.4f}", f"{evals[key]['accuracy']:.4f}"]
        for key in ("base", "codebook_at_init", "codebook", "codebook_bypassed", "control")
        if evals.get(key)
    ]
    print_table(["model", "held-out loss (nats/token)", "accuracy"], rows)
    report = {
        "benchmark": "finetune_pretrained",
        "command": "python benchmarks/finetune_pretrained.py " + " ".join(args.argv),
        "model_folder": str(args.model),
        "corpus": data_info,
        **result.record,
        "wall_s": time.perf_counter() - start,
        **environment(args.device, load_average_start=load),
    }
    write_report(args.out / RESULTS_FILE, report)
    return report


if __name__ == "__main__":
    main()
