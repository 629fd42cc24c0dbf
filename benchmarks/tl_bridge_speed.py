"""Training-step time of one model as a HookedTransformer (transformer-lens 3.x) and as a TransformerBridge (4.x).

The model is a small GPT-2 (4 layers, d_model 128, 4 heads, d_mlp 512, vocabulary 512, 128 positions), written once
as a Hugging Face folder under `--out` and read by both environments: `from_hf` turns it into a HookedTransformer
under transformer-lens 3, `TransformerBridge.boot_transformers` boots it under 4. Codebooks after every attention
head and every MLP (1,000 codes, k = 1); batches of 16 x 128 tokens; a step is `cbinterp.train`'s: forward with the
loss, backward, fused AdamW (`make_optimizer`), inside `training_codebooks` and, where they apply, the fused kernels
(`fast_kernels`: a HookedTransformer's attention and layer norms; a bridge runs Hugging Face's eager layers and has
none). Each environment times its variants interleaved (median of `--repeats` after `--warmup`) and writes
`<out>/tl<major>.json`; the run that finds the other environment's file prints and writes `<out>/merged.json`.

    .venv/bin/python benchmarks/tl_bridge_speed.py        # transformer-lens 3.9: the HookedTransformer rows
    .venv-tl4/bin/python benchmarks/tl_bridge_speed.py    # transformer-lens 4.3: the bridge rows, then the table
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

import cbinterp
from cbinterp.core import tl_compat as tc
from cbinterp.core.codebooks.attach import training_codebooks
from cbinterp.core.training.config import TrainConfig
from cbinterp.core.training.fastpath import fast_kernels
from cbinterp.core.training.optim import make_optimizer
from cbinterp.reporting import environment, write_json

if __package__:  # python -m benchmarks.tl_bridge_speed
    from . import common
else:  # python benchmarks/tl_bridge_speed.py: this folder is sys.path[0]
    import common

SHAPE = dict(n_layer=4, n_embd=128, n_head=4, n_inner=512, vocab_size=512, n_positions=128)


def hf_folder(out: Path, seed: int) -> Path:
    """The GPT-2's Hugging Face folder under `out`, written once (atomically) so that both environments read it."""
    import transformers

    folder = out / f"gpt2-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tmp = out / f".{folder.name}.tmp"
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def build(folder: Path, codebooks: bool, args):
    """This environment's model of `folder`: a HookedTransformer (transformer-lens 3) or a bridge (4)."""
    if tc.HAS_HOOKED:
        model = cbinterp.from_hf(folder, device="cpu")
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = tc.TransformerBridge.boot_transformers(str(folder), device="cpu")
    if codebooks:
        cbinterp.attach_codebooks(model, sites=["attn", "mlp"], n_codes=args.n_codes, k=1, seed=args.seed)
    return model.train()


def stepper(model, tokens: torch.Tensor, fused: bool = True) -> Callable[[], None]:
    """One step as `cbinterp.train` takes it; `fused`: with the fused kernels where the model has layers for them."""
    optimizer = make_optimizer(model, TrainConfig(steps=1, lr=1e-3))

    def step() -> None:
        with fast_kernels(model, enabled=fused), training_codebooks(model):
            loss = model(tokens, return_type="loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def measure(args, folder: Path) -> dict:
    """This environment's rows: `{variant: {median_s, min_s, tokens_per_s, times_s}}` and what ran them."""
    torch.manual_seed(args.seed)
    tokens = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq_len))
    kind = "hooked" if tc.HAS_HOOKED else "bridge"
    load_before = os.getloadavg()
    fns = {}
    with_cb = build(folder, True, args)
    fns[kind] = stepper(with_cb, tokens)
    if tc.HAS_HOOKED:  # the fused kernels' share: the same HookedTransformer on TransformerLens's own layers
        fns[f"{kind}_tl_kernels"] = stepper(build(folder, True, args), tokens, fused=False)
    fns[f"{kind}_no_codebooks"] = stepper(build(folder, False, args), tokens)
    times = common.time_interleaved(fns, args.warmup, args.repeats, torch.device("cpu"))
    n_tokens = args.batch * args.seq_len
    rows = common.step_rows(times, n_tokens)
    return {
        "transformer_lens": tc.TL_VERSION,
        "class": type(with_cb).__name__,
        "fast_kernel_layers": _switched(with_cb),
        "rows": rows,
        "environment": environment("cpu", load_before),
    }


def _switched(model) -> int:
    with fast_kernels(model) as n:
        return n


def table(merged: dict) -> str:
    lines = [
        f"{'variant':28} {'transformer-lens':>16} {'median ms':>10} {'min ms':>8} {'tokens/s':>9}",
    ]
    for part in merged["runs"].values():
        for name, row in part["rows"].items():
            lines.append(
                f"{name:28} {part['transformer_lens']:>16} {common.ms(row['median_s']):>10} "
                f"{common.ms(row['min_s']):>8} {row['tokens_per_s']:9.0f}"
            )
    ratio = merged.get("bridge_over_hooked")
    if ratio is not None:
        lines.append(f"bridge step time / HookedTransformer step time (medians, with codebooks): {ratio:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser("tl_bridge_speed", __doc__, batch=16, seq_len=128, n_codes=1000, warmup=2, repeats=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: more fight on a shared CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny batches: a smoke test, not a measurement")
    parser.set_defaults(out=str(common.OUT / "tl_bridge_speed"))
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.n_codes, args.warmup, args.repeats = 2, 16, 32, 1, 2
    common.set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    part = measure(args, hf_folder(out, args.seed))
    part["settings"] = common.settings(args, "batch", "seq_len", "n_codes", "warmup", "repeats", "seed", "threads")
    mine, other = f"tl{tc.TL_MAJOR}", f"tl{3 if tc.TL_MAJOR >= 4 else 4}"
    write_json(out / f"{mine}.json", part)
    runs = {mine: part}
    if (out / f"{other}.json").is_file():
        theirs = json.loads((out / f"{other}.json").read_text())
        if theirs.get("settings") == part["settings"]:
            runs[other] = theirs
        else:
            print(f"{out / f'{other}.json'} was measured with other settings; not merged.")
    runs = dict(sorted(runs.items()))
    merged = {"runs": runs, "model": SHAPE}
    hooked, bridge = runs.get("tl3", {}).get("rows", {}), runs.get("tl4", {}).get("rows", {})
    if "hooked" in hooked and "bridge" in bridge:
        merged["bridge_over_hooked"] = bridge["bridge"]["median_s"] / hooked["hooked"]["median_s"]
        write_json(out / "merged.json", merged)
    print(table(merged))
    return merged


if __name__ == "__main__":
    main()
