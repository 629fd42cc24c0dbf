"""HookedTransformer against TransformerBridge on the same weights: logits and codes, across the two TransformerLens.

Under transformer-lens 3.x (`HookedTransformer`) it writes the fixture: for each tiny architecture of
`tests/bridge_models.py` (GPT-NeoX, GPT-2, Llama), its Hugging Face folder and, converted by `cbinterp.from_hf` with
codebooks attached, the logits, codes and codebooks on fixed tokens. Under transformer-lens 4.x it boots a bridge from
each folder (as it is, and in TransformerLens's compatibility mode with and without its weight processing), attaches
the same codebooks and compares, printing a table (`--json PATH` writes it too). `tests/core/test_bridge_parity.py`
asserts what holds.

It also checks the other direction, a folder saved from a HookedTransformer loaded on transformer-lens 4 (where
`cbinterp.load` rebuilds it as a Phi bridge, `cbinterp.models.hooked_as_bridge`): under 3.x it saves a tiny codebook
model (codebooks after the heads, after each MLP, on the residual stream) with its logits and codes, and records what
the shipped models give on a held-out window; under 4.x it loads them all and compares.

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


#: The saved-HookedTransformer part of the fixture, and the codebook sites of its tiny model.
HOOKED = "hooked"
HOOKED_SITES = ("attn", "mlp", "blocks.{layer}.hook_resid_pre", "blocks.0.hook_resid_mid")
SHIPPED = ("english-codebook", "english-baseline")
WINDOW = 64


def shipped_window() -> torch.Tensor:
    """`(1, WINDOW)` tokens: the start of the first held-out document of the shipped models' corpus."""
    from cbinterp.pretrained import heldout_documents, load_pretrained

    tokenizer = load_pretrained(SHIPPED[0], device="cpu").tokenizer
    ids = tokenizer(heldout_documents(SHIPPED[0])[0].text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id, *ids[: WINDOW - 1]]])


def summary(model, tokens: torch.Tensor, names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Logits and codes of `model` on `tokens`, codebooks under their saved names (`names`: {on model: saved})."""
    names = names or {name: name for name in cbinterp.get_codebooks(model)}
    got = logits_and_codes(model, tokens)
    return {"logits": got["logits"], **{f"codes.{names[k[6:]]}": v for k, v in got.items() if k.startswith("codes.")}}


def shipped_summary(model, tokens: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
    """A shipped model's log-probabilities of the window's next tokens, its greedy tokens and its codes (smaller than
    its whole logits)."""
    got = summary(model, tokens, names)
    log_probs = got.pop("logits").log_softmax(-1)
    got["next_log_prob"] = log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    got["greedy"] = log_probs.argmax(-1)
    return got


def write_hooked(out: Path) -> None:
    """The saved-HookedTransformer part (transformer-lens 3.x): a tiny saved codebook model, and the results."""
    from cbinterp.pretrained import load_pretrained
    from cbinterp.recipes.gpt import gpt_config

    out.mkdir(parents=True)
    torch.manual_seed(SEED)
    model = tc.build_hooked(gpt_config(2, 16, 2, 32, 16, 20, seed=SEED, device="cpu"))
    cbinterp.attach_codebooks(model, list(HOOKED_SITES), n_codes=N_CODES, k=K, seed=SEED)
    cbinterp.save(model, out / "tiny")
    tokens = torch.randint(0, 20, (4, 16), generator=torch.Generator().manual_seed(SEED))
    tensors = {"tokens": tokens, **summary(model.eval(), tokens)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "tiny_expected.safetensors")
    window = shipped_window()
    tensors = {"tokens": window}
    for name in SHIPPED:
        got = shipped_summary(load_pretrained(name, device="cpu"), window)
        tensors.update({f"{name}.{k}": v for k, v in got.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "shipped_expected.safetensors")


def compare_hooked(folder: Path) -> dict:
    """Transformer-lens 4: the saved HookedTransformers of the fixture loaded (as bridges) against their results."""
    from cbinterp.models.hooked_as_bridge import hooked_names
    from cbinterp.pretrained import load_pretrained

    def diff(got: dict, want: dict, prefix: str = "") -> dict:
        codes = [k for k in want if k.startswith(prefix + "codes.")]
        out = {
            "same_codebooks": sorted(f"{prefix}codes.{k[6:]}" for k in got if k.startswith("codes.")) == sorted(codes),
            "code_agreement_min": min(
                ((got[k[len(prefix) :]] == want[k]).float().mean().item() for k in codes), default=1.0
            ),
        }
        for key in ("logits", "next_log_prob"):
            if prefix + key in want:
                out[f"max_abs_{key}_diff"] = (got[key] - want[prefix + key]).abs().max().item()
        if prefix + "greedy" in want:
            out["greedy_agreement"] = (got["greedy"] == want[prefix + "greedy"]).float().mean().item()
        return out

    results = {}
    want = load_file(folder / "tiny_expected.safetensors")
    model = cbinterp.load(folder / "tiny", device="cpu")
    results["tiny"] = diff(summary(model, want["tokens"], hooked_names(model)), want) | {"class": type(model).__name__}
    want = load_file(folder / "shipped_expected.safetensors")
    for name in SHIPPED:
        model = load_pretrained(name, device="cpu")
        got = shipped_summary(model, want["tokens"], hooked_names(model))
        results[name] = diff(got, want, f"{name}.") | {"class": type(model).__name__}
    return results


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
        write_hooked(tmp / HOOKED)
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
    hooked = compare_hooked(args.fixture / HOOKED)
    print(f"HookedTransformer (transformer-lens 3.9) against TransformerBridge (transformer-lens {tc.TL_VERSION})")
    print(f"{'arch':6} {'mode':21} {'max |dlogit|':>13} {'max |dlogprob|':>15} {'codes agree (min/mean)':>23}")
    for arch, by_mode in results.items():
        for mode, r in by_mode.items():
            agree = f"{r['code_agreement_min']:.4f} / {r['code_agreement_mean']:.4f}"
            print(f"{arch:6} {mode:21} {r['max_abs_logit_diff']:13.2e} {r['max_abs_log_prob_diff']:15.2e} {agree:>23}")
    print("\nSaved from a HookedTransformer (3.9), loaded on transformer-lens 4 (rebuilt as a Phi bridge)")
    for name, r in hooked.items():
        figures = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
        print(f"{name:17} {figures}")
    if args.json is not None:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        record = {"transformer_lens": tc.TL_VERSION, "results": results, "saved_hooked": hooked}
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, args.json)
    return results | {HOOKED: hooked}


if __name__ == "__main__":
    main()
