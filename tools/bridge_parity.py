"""HookedTransformer against TransformerBridge on the same weights: logits and codes, across the two TransformerLens.

Under transformer-lens 3.x (`HookedTransformer`) it writes the fixture: for each tiny architecture of
`tests/bridge_models.py` (GPT-NeoX, GPT-2, Llama), its Hugging Face folder and, converted by `cbinterp.from_hf` with
codebooks attached, the logits, codes and codebooks on fixed tokens. Under transformer-lens 4.x it boots a bridge from
each folder (as it is, and in TransformerLens's compatibility mode with and without its weight processing), attaches
the same codebooks and compares, printing a table (`--json PATH` writes it too). `tests/core/test_bridge_parity.py`
asserts what holds.

    .venv/bin/python tools/bridge_parity.py                 # TL 3.9: (re)write tests/fixtures/bridge_parity
    /tmp/cbinterp-tl4/bin/python tools/bridge_parity.py     # TL 4.3: compare and print
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # bridge_models: the tiny architectures the tests boot

import cbinterp  # noqa: E402
from cbinterp.core import tl_compat as tc  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "bridge_parity"
#: The codebooks of the comparison: one per head after attention, one after each MLP.
SITES, N_CODES, K, SEED = ("attn", "mlp"), 16, 2, 0
#: The bridge's modes: as booted; compatibility mode with HookedTransformer's default weight processing (fold the
#: layer norms, centre the writing weights and the unembedding, fold the value biases); compatibility mode without it.
MODES = ("plain", "compat", "compat_no_processing")


def fixed_tokens() -> torch.Tensor:
    from bridge_models import N_CTX, VOCAB

    return torch.randint(0, VOCAB, (4, N_CTX), generator=torch.Generator().manual_seed(SEED))


def logits_and_codes(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """`logits` and `codes.<site>` (every codebook's code ids) of `model` on `tokens`."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(".hook_codes"))
    out = {"logits": logits.float()}
    for name in cbinterp.get_codebooks(model):
        out[f"codes.{name}"] = cache[f"{name}.hook_codes"]
    return out


def with_codebooks(model):
    return cbinterp.attach_codebooks(model, list(SITES), n_codes=N_CODES, k=K, seed=SEED)


def write(out: Path) -> None:
    """Write the fixture (transformer-lens 3.x): the folders and the HookedTransformer's results on them."""
    from bridge_models import ARCHITECTURES, save_hf_folder

    tokens = fixed_tokens()
    tmp = Path(tempfile.mkdtemp(prefix=".bridge-parity-", dir=out.parent))
    try:
        for arch in ARCHITECTURES:
            folder = save_hf_folder(arch, tmp / arch, seed=SEED)
            model = with_codebooks(cbinterp.from_hf(folder, device="cpu"))
            tensors = {"tokens": tokens, **logits_and_codes(model, tokens)}
            for name, cb in cbinterp.get_codebooks(model).items():
                tensors[f"codebook.{name}"] = cb.weight.detach().clone()
            save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "expected.safetensors")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # the whole fixture or none of it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def boot(folder: Path, mode: str):
    """The bridge of `folder` in `mode` (one of `MODES`), with the fixture's codebooks attached."""
    from bridge_models import boot as boot_folder

    bridge = boot_folder(folder)
    if mode == "compat":
        bridge.enable_compatibility_mode(disable_warnings=True)
    elif mode == "compat_no_processing":
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    elif mode != "plain":
        raise ValueError(f"Unknown mode {mode!r}; one of {MODES}.")
    return with_codebooks(bridge)


def compare(folder: Path, mode: str) -> dict:
    """The bridge of `folder` in `mode` against the stored HookedTransformer results."""
    want = load_file(folder / "expected.safetensors")
    model = boot(folder, mode)
    same_codebooks = all(
        torch.equal(cb.weight.detach(), want[f"codebook.{name}"]) for name, cb in cbinterp.get_codebooks(model).items()
    )
    got = logits_and_codes(model, want["tokens"])
    agree = {
        key.removeprefix("codes."): (got[key] == want[key]).float().mean().item()
        for key in want
        if key.startswith("codes.")
    }
    log_probs = got["logits"].log_softmax(-1) - want["logits"].log_softmax(-1)
    return {
        "same_codebooks": same_codebooks,
        "max_abs_logit_diff": (got["logits"] - want["logits"]).abs().max().item(),
        "max_abs_log_prob_diff": log_probs.abs().max().item(),
        "code_agreement_min": min(agree.values()),
        "code_agreement_mean": sum(agree.values()) / len(agree),
        "code_agreement": agree,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--json", type=Path, default=None, help="also write the comparison here (transformer-lens 4)")
    args = parser.parse_args(argv)
    if tc.HAS_HOOKED:
        write(args.fixture)
        print(f"wrote {args.fixture} (transformer-lens {tc.TL_VERSION})")
        return {}
    if not args.fixture.is_dir():
        raise SystemExit(f"No fixture at {args.fixture}: write it first with this script under transformer-lens 3.x.")
    results = {
        arch.name: {mode: compare(arch, mode) for mode in MODES}
        for arch in sorted(args.fixture.iterdir())
        if (arch / "expected.safetensors").is_file()
    }
    print(f"HookedTransformer (transformer-lens 3.9) against TransformerBridge (transformer-lens {tc.TL_VERSION})")
    print(f"{'arch':6} {'mode':21} {'max |dlogit|':>13} {'max |dlogprob|':>15} {'codes agree (min/mean)':>23}")
    for arch, by_mode in results.items():
        for mode, r in by_mode.items():
            agree = f"{r['code_agreement_min']:.4f} / {r['code_agreement_mean']:.4f}"
            print(f"{arch:6} {mode:21} {r['max_abs_logit_diff']:13.2e} {r['max_abs_log_prob_diff']:15.2e} {agree:>23}")
    if args.json is not None:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps({"transformer_lens": tc.TL_VERSION, "results": results}, indent=2))
        os.replace(tmp, args.json)
    return results


if __name__ == "__main__":
    main()
