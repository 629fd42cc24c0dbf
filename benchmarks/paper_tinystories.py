"""The paper's Table 3 on the paper's own model: TinyStories topic steering, forced as the authors' tutorial forced it.

    python benchmarks/paper_tinystories.py --base BASE_FOLDER --codebook CODEBOOK_FOLDER
    python benchmarks/paper_tinystories.py --download   # fetch both from the Hugging Face Hub first (network)

Loads `roneneldan/TinyStories-1Layer-21M` with `taufeeque/TinyStories-1Layer-21M-Codebook` (local folders, or the
local Hugging Face cache, or, only with --download, the Hub) through `cbinterp.models.from_codebook_features`, and
reruns the authors' tutorial (codebook-features 0.1.2, `tutorials/code_intervention.ipynb`): their topic codes, each
written into its head's codebook output at every position (prompt included), the n-th code listed for a head in slot
-n (counted from the last of the k = 8 slots); their four prompts with BOS, 10 samples each, 200 new tokens,
temperature 1; the text decoded after the BOS; success = `re.search(topic.lower(), text.lower())`, averaged over the
four prompts. The unsteered samples serve as every topic's baseline, as in the tutorial.

Beside their figures it prints a fluency measure they did not report: the base model's per-token loss on each
continuation (up to the first end-of-text), and the readable rule of lm_steering.py: a steered sample is readable
when it is not one word repeated and its loss is at most the 95th percentile of the unsteered samples' losses.
Writes `results.json` (settings, per-topic rates, every sample's text) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from cbinterp.core.codebooks.attach import codebooks_bypassed, get_codebooks
from cbinterp.core.codebooks.interventions import intervene
from cbinterp.core.codebooks.naming import codes_hook_name
from cbinterp.models.codebook_features import PLACEMENT_HOOKS, WEIGHT_FILES
from cbinterp.reporting import format_table, write_report
from cbinterp.tasks.lm_features import is_repetitive

if __package__:  # python -m benchmarks.paper_tinystories, or imported by lm_steering
    from . import common
else:  # python benchmarks/paper_tinystories.py: this folder is sys.path[0]
    import common

BASE = "roneneldan/TinyStories-1Layer-21M"
CODEBOOK = "taufeeque/TinyStories-1Layer-21M-Codebook"


def _head(layer: int, head: int, *codes: int) -> list[tuple[int, int, int]]:
    return [(layer, head, code) for code in codes]


#: topic regex -> the tutorial's codes as (layer, head, code), in its order (the order sets the slots).
TOPIC_CODES: dict[str, list[tuple[int, int, int]]] = {
    "dragon": _head(0, 13, 4670, 17640, 19845, 23958, 3410, 19523, 2262, 16060),
    "slide": _head(0, 14, 1331, 22178, 15885, 9524, 15549, 7802, 11942) + _head(0, 1, 4095, 2179, 22425, 10661, 8598),
    "friend": _head(0, 11, 20506, 6103, 15764, 14060, 21005, 16006, 12290, 7404) + _head(0, 13, 2471),
    "flower": _head(0, 13, 23967, 13533, 4175, 6390, 18765, 1775, 7430, 9269),
    "fire": _head(0, 13, 9151, 6389, 16473, 24184, 11224, 16757, 16684, 22825)
    + _head(0, 14, 22980, 6544, 2672, 5791, 22544, 6971, 23452, 708),
    "prince|crown|king|castle": _head(0, 13, 28, 19802, 22851, 8907, 18042, 9619, 15278, 9649)
    + _head(0, 14, 13055, 13575, 9784, 19023, 7704, 6056),
    "baby": _head(0, 13, 66, 657, 9965, 13724, 5276, 11101, 10272)
    + _head(0, 3, 3067, 18686, 430, 12364, 1209, 13863, 15111, 1185),
}
#: The tutorial's prompts (each tokenized with BOS prepended).
PROMPTS = ["", "Once upon a time,", "Once there was a", "A long time ago,"]
SAMPLES, NEW_TOKENS, TEMPERATURE = 10, 200, 1.0
#: The tutorial's saved output (= the paper's Table 3, which writes "princess" for the royalty topic): share of
#: samples mentioning the topic, (unsteered, steered).
PAPER = {
    "dragon": (0.025, 0.65),
    "slide": (0.025, 0.95),
    "friend": (0.425, 0.75),
    "flower": (0.0, 0.90),
    "fire": (0.025, 1.0),
    "prince|crown|king|castle": (0.40, 0.875),
    "baby": (0.0, 0.90),
}
#: Where their `attn_preproj` codebooks sit in a converted model.
HOOK = PLACEMENT_HOOKS["attn_preproj"]


# -- the model ------------------------------------------------------------------------------------------------
def resolve(name_or_path: str, what: str, download: bool = False, cache_dir: str | Path | None = None) -> Path:
    """A local folder for a model: the path itself, else the Hugging Face cache's copy, else (only with `download`)
    the Hub's, by `huggingface_hub.snapshot_download`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:  # a copy fetched earlier needs no network
        return Path(snapshot_download(str(name_or_path), cache_dir=cache_dir, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - not cached, or not a Hub name at all
        cached_error = err
    if not download:
        raise FileNotFoundError(
            f"The {what} {str(name_or_path)!r} is neither a local folder nor in the Hugging Face cache "
            f"({type(cached_error).__name__}). Pass the folder of a local copy (--base / --codebook), or add "
            f"--download to fetch it with huggingface_hub.snapshot_download (needs the network)."
        ) from cached_error
    try:
        return Path(snapshot_download(str(name_or_path), cache_dir=cache_dir))
    except Exception as err:  # noqa: BLE001 - offline, unknown name, no access
        raise RuntimeError(
            f"Could not download the {what} {str(name_or_path)!r} ({type(err).__name__}: {err}). Without the "
            f"network, copy {BASE!r} and {CODEBOOK!r} here and pass their folders as --base and --codebook."
        ) from err


def load(base: Path, codebook: Path, device: str | None = None) -> tuple[HookedTransformer, HookedTransformer | None]:
    """(the codebook model, the base LM that scores fluency, or None when `base` holds only its config)."""
    from cbinterp.models.codebook_features import from_codebook_features
    from cbinterp.models.from_hf import from_hf

    model = from_codebook_features(codebook, base, device=device)
    has_weights = any((base / name).is_file() for name in WEIGHT_FILES)
    return model, (from_hf(base, device=device).eval() if has_weights else None)


def check_codes(model: HookedTransformer, topics: Mapping[str, Sequence[tuple[int, int, int]]]) -> None:
    """Refuse codes the model cannot hold: a layer without an attention-head codebook, a head or code id out of
    range, more codes for one head than its k slots."""
    codebooks = get_codebooks(model)
    for topic, codes in topics.items():
        for layer, head, code in codes:
            name = HOOK.format(layer=layer)
            if name not in codebooks:
                raise ValueError(
                    f"topic {topic!r}: layer {layer} has no per-head codebook at {name} (the model's codebooks: "
                    f"{list(codebooks)}); is this the paper's TinyStories codebook model?"
                )
            cfg = codebooks[name].cfg
            if not (0 <= head < cfg.groups and 0 <= code < cfg.n_codes):
                raise ValueError(
                    f"topic {topic!r}: code {code} of head {head} lies outside {name}'s {cfg.groups} heads x "
                    f"{cfg.n_codes} codes; is this the paper's TinyStories codebook model?"
                )
        for (layer, head), slots in slot_assignments(codes).items():
            k = codebooks[HOOK.format(layer=layer)].cfg.k
            if min(slots) < -k:
                raise ValueError(f"topic {topic!r}: {-min(slots)} codes for head {head} of layer {layer}, k = {k}.")


# -- forcing, as the tutorial did -----------------------------------------------------------------------------
def slot_assignments(codes: Sequence[tuple[int, int, int]]) -> dict[tuple[int, int], dict[int, int]]:
    """(layer, head) -> {slot: code}: the tutorial's slots for a list of (layer, head, code).

    Their `parse_topic_codes_string(..., code_append=False)` gives a run of codes of one head slots -1, -2, ...; a head
    listed again after another starts over at -1, and a later code overwrites an earlier one in the same slot."""
    slots: dict[tuple[int, int], dict[int, int]] = {}
    previous, slot = None, 0
    for layer, head, code in codes:
        slot = slot - 1 if (layer, head) == previous else -1
        slots.setdefault((layer, head), {})[slot] = int(code)
        previous = (layer, head)
    return slots


def forcing_hooks(model: HookedTransformer, codes: Sequence[tuple[int, int, int]]) -> list[tuple[str, object]]:
    """Hooks writing each code into its head's slot (`slot_assignments`) at every position, the prompt's included;
    the head's other slots keep the codebook's own choices."""
    check_codes(model, {"forced": codes})
    by_layer: dict[int, list[tuple[int, int, int]]] = {}
    for (layer, head), slots in slot_assignments(codes).items():
        by_layer.setdefault(layer, []).extend((head, slot, code) for slot, code in slots.items())
    hooks = []
    for layer, writes in sorted(by_layer.items()):
        heads = torch.tensor([w[0] for w in writes])
        slot_index = torch.tensor([w[1] for w in writes])
        ids = torch.tensor([w[2] for w in writes])

        def force(
            codes: Int[Tensor, "batch pos heads k"], hook: HookPoint, heads=heads, slot_index=slot_index, ids=ids
        ) -> Int[Tensor, "batch pos heads k"]:
            out = codes.clone()  # the codebook (or a cache) may hold the tensor it passed
            out[:, :, heads.to(out.device), slot_index.to(out.device)] = ids.to(out.device, out.dtype)
            return out

        hooks.append((codes_hook_name(HOOK.format(layer=layer)), force))
    return hooks


def prompt_tokens(model: HookedTransformer, prompt: str, n: int) -> Int[Tensor, "batch pos"]:
    """`prompt` with BOS prepended, `n` times."""
    if model.tokenizer is None or model.tokenizer.bos_token_id is None:
        raise ValueError("The model needs a tokenizer with a BOS token; pass a base folder that holds the tokenizer.")
    return model.to_tokens(prompt, prepend_bos=True).repeat(n, 1)


@torch.no_grad()
def sample(
    model: HookedTransformer,
    prompt: str,
    codes: Sequence[tuple[int, int, int]],
    n: int,
    new_tokens: int,
    temperature: float,
    seed: int,
) -> Int[Tensor, "batch pos"]:
    """`n` samples of prompt + continuation (BOS first), `codes` forced; `model.generate`'s defaults otherwise (as
    theirs: stop at end-of-text, the finished rows padded with it)."""
    tokens = prompt_tokens(model, prompt, n)
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=True, temperature=temperature, verbose=False)
    with intervene(model, forcing_hooks(model, codes)):
        return model.generate(tokens, **kwargs)


# -- scoring --------------------------------------------------------------------------------------------------
def mentions(topic: str, text: str) -> bool:
    """The tutorial's success rule: the topic, read as a regex, found in the text, both lower-cased."""
    return re.search(topic.lower(), text.lower()) is not None


def topic_rate(topic: str, texts_by_prompt: Mapping[str, Sequence[str]]) -> float:
    """The share of texts mentioning `topic` per prompt, averaged over the prompts."""
    if not texts_by_prompt or any(len(texts) == 0 for texts in texts_by_prompt.values()):
        raise ValueError("topic_rate needs at least one text for every prompt.")
    return float(np.mean([np.mean([mentions(topic, t) for t in texts]) for texts in texts_by_prompt.values()]))


def continuation(ids: Sequence[int], prompt_len: int, eos: int | None) -> list[int]:
    """The generated ids up to (and including) the first end-of-text."""
    new = list(ids[prompt_len:])
    return new[: new.index(eos) + 1] if eos is not None and eos in new else new


@torch.no_grad()
def continuation_loss(
    scorer: HookedTransformer, ids: Int[Tensor, "batch pos"], prompt_len: int, eos: int | None, bypass: bool
) -> list[float]:
    """Each row's mean per-token loss (nats) of its continuation, up to the first end-of-text; NaN when empty."""
    with codebooks_bypassed(scorer) if bypass else contextlib.nullcontext():
        logits = scorer(ids.to(scorer.cfg.device))
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None].to(logp.device))[..., 0][:, prompt_len - 1 :].cpu()
    lengths = [len(continuation(row, prompt_len, eos)) for row in ids.tolist()]
    return [float(nll[r, :n].mean()) if n else float("nan") for r, n in enumerate(lengths)]


def run(
    model: HookedTransformer,
    scorer: HookedTransformer | None = None,
    topics: Mapping[str, Sequence[tuple[int, int, int]]] = TOPIC_CODES,
    prompts: Sequence[str] = PROMPTS,
    samples: int = SAMPLES,
    new_tokens: int = NEW_TOKENS,
    temperature: float = TEMPERATURE,
    seed: int = 0,
) -> dict:
    """Unsteered samples, then every topic's steered ones, scored by the tutorial's rule and for fluency.

    Args:
        scorer: the base LM that scores the continuations' loss; None = `model` with its codebooks bypassed.
        seed: prompt i's samples (unsteered and every topic's) are drawn after `torch.manual_seed(seed + i)`.

    Returns:
        a JSON-able report: settings, per topic the paper's and our rates, the readable rate, losses and texts.
    """
    check_codes(model, topics)
    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    bypass = scorer is None
    scorer = model if scorer is None else scorer

    def condition(codes) -> dict:
        out = {"texts": {}, "loss": {}, "repetitive": {}}
        for i, prompt in enumerate(prompts):
            ids = sample(model, prompt, codes, samples, new_tokens, temperature, seed + i).cpu()
            prompt_len = prompt_tokens(model, prompt, 1).shape[1]
            # as the tutorial: the whole row after the BOS, prompt included
            out["texts"][prompt] = [model.tokenizer.decode(row[1:]) for row in ids.tolist()]
            new_texts = [model.tokenizer.decode(continuation(row, prompt_len, eos)) for row in ids.tolist()]
            out["repetitive"][prompt] = [is_repetitive(t) for t in new_texts]
            out["loss"][prompt] = continuation_loss(scorer, ids, prompt_len, eos, bypass)
        return out

    unsteered = condition([])
    losses = np.array([x for row in unsteered["loss"].values() for x in row], dtype=np.float64)
    cap = float(np.nanquantile(losses, 0.95)) if np.isfinite(losses).any() else float("nan")
    per_topic = {}
    for topic, codes in topics.items():
        steered = condition(codes)
        readable = {  # NaN (an empty continuation) is never within the cap
            p: [not rep and loss <= cap for rep, loss in zip(steered["repetitive"][p], steered["loss"][p])]
            for p in prompts
        }
        mention = {p: [mentions(topic, t) for t in steered["texts"][p]] for p in prompts}
        paper = PAPER.get(topic, (None, None))
        per_topic[topic] = {
            "paper_baseline": paper[0],
            "paper_steered": paper[1],
            "baseline": topic_rate(topic, unsteered["texts"]),
            "steered": topic_rate(topic, steered["texts"]),
            "steered_readable": float(np.mean([np.mean(np.logical_and(mention[p], readable[p])) for p in prompts])),
            "readable_share": float(np.mean([np.mean(readable[p]) for p in prompts])),
            "steered_loss_mean": float(np.nanmean([x for p in prompts for x in steered["loss"][p]])),
            "codes": [list(c) for c in codes],
            "samples": steered,
        }
    return {
        "settings": {
            "prompts": list(prompts),
            "samples_per_prompt": samples,
            "new_tokens": new_tokens,
            "temperature": temperature,
            "seed": seed,
            "loss_scored_by": "codebook model, codebooks bypassed" if bypass else "base model",
            "readable": "not one word repeated, and per-token loss <= the unsteered samples' 95th percentile",
        },
        "unsteered": {"loss_cap": cap, "loss_mean": float(np.nanmean(losses)), "samples": unsteered},
        "topics": per_topic,
    }


def table(report: dict) -> str:
    """The printed table: topic, the paper's rates, ours, and our readable steered rate (all in %)."""

    def pct(x) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    rows = [
        [t, pct(e["paper_baseline"]), pct(e["paper_steered"]), pct(e["baseline"]), pct(e["steered"])]
        + [pct(e["steered_readable"])]
        for t, e in report["topics"].items()
    ]
    header = ["topic", "paper baseline", "paper steered", "ours baseline", "ours steered", "readable"]
    return format_table(header, rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=BASE, help=f"the base model's folder (or Hub name; default {BASE})")
    p.add_argument(
        "--codebook", default=CODEBOOK, help=f"the codebook model's folder (or Hub name; default {CODEBOOK})"
    )
    p.add_argument("--download", action="store_true", help="fetch Hub names not in the local cache (network)")
    p.add_argument("--topics", nargs="*", default=None, help=f"default: all of {list(TOPIC_CODES)}")
    p.add_argument("--samples", type=int, default=SAMPLES, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: TransformerLens' choice (CUDA when present)")
    p.add_argument("--out", type=Path, default=common.OUT / "paper_tinystories")
    args = p.parse_args(argv)
    unknown = [t for t in args.topics or [] if t not in TOPIC_CODES]
    if unknown:
        p.error(f"unknown topics {unknown}; the tutorial's topics are {list(TOPIC_CODES)}")
    if args.samples < 1 or args.new_tokens < 1:
        p.error("--samples and --new-tokens must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        base = resolve(args.base, "base model", args.download)
        codebook = resolve(args.codebook, "codebook model", args.download)
    except (FileNotFoundError, RuntimeError) as err:  # the message names the fix; a traceback would bury it
        raise SystemExit(f"error: {err}") from err
    model, scorer = load(base, codebook, args.device)
    topics = {t: TOPIC_CODES[t] for t in args.topics or TOPIC_CODES}
    report = run(model, scorer, topics, samples=args.samples, new_tokens=args.new_tokens, seed=args.seed)
    report["settings"].update(base=str(base), codebook=str(codebook))
    print(table(report))
    print(
        f"rates in % of samples mentioning the topic, averaged over the {len(PROMPTS)} prompts; paper = the authors' "
        "tutorial output. readable = steered samples that mention the topic, are not one word repeated and have a "
        f"per-token loss ({report['settings']['loss_scored_by']}) <= {report['unsteered']['loss_cap']:.2f} nats, "
        "the unsteered samples' 95th percentile."
    )
    write_report(args.out / "results.json", report)
    return report


if __name__ == "__main__":
    main()
