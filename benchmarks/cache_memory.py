"""Peak memory of a code cache on disk: caching it, and reopening it for a typical query, now and before.

The model is cache_speed.py's (the FSM benchmark's shape, a codebook after every attention head and every MLP,
1000 codes, built by the child with the cbinterp it measures) and also stores one hook's activations. Each
measurement runs in a fresh subprocess and reports its peak resident memory (`resource.getrusage` max RSS) above
what the imports took: caching the documents to a folder, and opening that folder and running `code_frequencies`,
`top_tokens` and `code_contexts` for one code. The old path is the same child run against another commit of
cbinterp (`--baseline main`, exported with `git archive` into a temporary folder: the repository is only read),
which writes and reads its own cache. Each child runs in the folder that holds the cbinterp it measures, which
`python -c` puts first on its import path.

    .venv/bin/python benchmarks/cache_memory.py            # table + benchmarks/out/cache_memory.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from cbinterp.reporting import environment

if __package__:  # python -m benchmarks.cache_memory
    from . import common
else:  # python benchmarks/cache_memory.py: this folder is sys.path[0]
    import common

ROOT = common.ROOT

#: The child: imports cbinterp from its working folder, then caches or queries, and prints one JSON line. It builds
#: cache_speed.py's model itself from the library's public names (importing cache_speed would import the benchmark's
#: own dependencies from the cbinterp measured, which an older commit may not have).
CHILD = r"""
import dataclasses, json, resource, sys, time
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(1)
import cbinterp
from cbinterp import CodeCache, attach_codebooks, cache_codes, code_contexts, code_frequencies, top_tokens
from cbinterp.recipes.fsm import FSMRecipe
from transformer_lens import HookedTransformer

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def build(m):  # as cache_speed.build
    recipe = dataclasses.replace(
        FSMRecipe.paper(), n_layers=m["n_layers"], d_model=m["d_model"], d_mlp=4 * m["d_model"],
        seq_len=m["seq_len"], seed=m["seed"],
    )
    model = HookedTransformer(recipe.model_config(recipe.fsm(), device=m["device"]))
    return attach_codebooks(model, ["attn", "mlp"], n_codes=m["n_codes"], k=m["k"], seed=m["seed"]).eval()

if args["op"] == "cache":
    model = build(args["model"])
    tokens = torch.randint(0, 11, (args["docs"], args["seq_len"]), generator=torch.Generator().manual_seed(0))
    base = rss_mb()
    start = time.perf_counter()
    cache_codes(model, tokens, batch_size=args["batch"], hooks=args["hooks"], directory=args["dir"], progress=False)
    seconds = time.perf_counter() - start
else:
    base = rss_mb()
    start = time.perf_counter()
    cache = CodeCache.open(args["dir"])
    name = cache.codebook_names[-1]
    freq = code_frequencies(cache, name)
    code = int(freq.argmax())
    top = top_tokens(cache, name, code)
    contexts = code_contexts(cache, name, code, [str(i) for i in range(11)], window=8)
    seconds = time.perf_counter() - start
    args["answer"] = [int(freq.sum()), top["token"].tolist(), [(c["doc"], c["pos"]) for c in contexts]]
print(json.dumps({"peak_mb": peak_mb(), "imports_mb": base, "over_imports_mb": peak_mb() - base,
                  "seconds": seconds, "answer": args.get("answer")}))
"""


def child(lib: Path, args: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], cwd=lib, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({args['op']} with {lib}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def export(ref: str, into: Path) -> Path:
    """cbinterp at git `ref`, exported (read-only use of the repository) into `into`."""
    archive = into / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", ref, "cbinterp"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    return into / "src"


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser("cache_memory", __doc__, docs=8192, seq_len=64, batch=64)
    parser.add_argument("--hook", default="blocks.0.hook_mlp_out", help="a hook whose activations are stored too")
    parser.add_argument("--baseline", default="main", help="git ref of the old path; '' to skip it")
    parser.add_argument("--quick", action="store_true", help="a tiny run: checks that it works, not a measurement")
    args = parser.parse_args(argv)
    model = dict(n_layers=4, d_model=128, seq_len=args.seq_len, seed=0, n_codes=1000, k=1, device="cpu")
    if args.quick:
        args.docs, args.seq_len, args.batch = 64, 16, 16
        model.update(n_layers=1, d_model=32, seq_len=16, n_codes=64)
    shared = dict(docs=args.docs, seq_len=args.seq_len, batch=args.batch, hooks=[args.hook] if args.hook else [])
    shared["model"] = model
    load_before = os.getloadavg()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        libs = {"now": ROOT}
        if args.baseline:
            try:
                libs["before"] = export(args.baseline, tmp)
            except (OSError, subprocess.CalledProcessError) as err:  # no git, or no such ref (a shallow clone)
                print(f"baseline {args.baseline!r} skipped: cannot export it from git ({err})")
        for label, lib in libs.items():
            directory = str(tmp / f"cache_{label}")
            cached = child(lib, {**shared, "op": "cache", "dir": directory})
            disk = sum(p.stat().st_size for p in Path(directory).iterdir())
            queried = child(lib, {**shared, "op": "query", "dir": directory})
            rows[label] = {"cache": cached, "query": queried, "disk_mb": disk / 2**20}
    n_tokens = args.docs * args.seq_len
    print(
        f"\n{'path':<8}{'disk MB':>9}{'cache peak MB':>15}{'(+imports)':>12}{'open+query MB':>15}{'(+imports)':>12}"
        f"{'query s':>9}"
    )
    for label, row in rows.items():
        c, q = row["cache"], row["query"]
        print(
            f"{label:<8}{row['disk_mb']:>9.1f}{c['over_imports_mb']:>15.1f}{c['peak_mb']:>12.1f}"
            f"{q['over_imports_mb']:>15.1f}{q['peak_mb']:>12.1f}{q['seconds']:>9.2f}"
        )
    same = len({json.dumps(r["query"]["answer"]) for r in rows.values()}) == 1
    print(
        f"\n{n_tokens} tokens ({args.docs} x {args.seq_len}), hook {args.hook or 'none'}; MB above the imports "
        f"(absolute peak in brackets); both paths give the same answers: {same}"
    )
    if args.quick:
        print("  (--quick: a tiny run, the numbers say nothing about memory)")
    report = {
        "benchmark": "cache_memory",
        "n_tokens": n_tokens,
        **common.settings(args, "docs", "seq_len", "hook", "baseline", "quick"),
        **environment(load_average_start=load_before),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": rows,
        "same_answers": same,
    }
    return common.finish(args.out, report)


if __name__ == "__main__":
    main()
