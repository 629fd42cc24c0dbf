"""Topic steering of a codebook language model: force topic codes during generation, count topic mentions.

    python benchmarks/lm_steering.py                      # the shipped DEFAULT_MODEL, every topic
    python benchmarks/lm_steering.py --model PATH --quick # a few short samples (tests)

Topic codes are found from data, on held-out half A only (text the model never trained on, and not the text the
samples are judged by): for every codebook and head, the code that best detects the topic's words (the regex of
`cbinterp.tasks.lm_features.TOPICS`) by the paper's search — recall > 1% on half A, most precise. Steering forces,
in every codebook, each head's topic code in `--n-slots` of its k slots (`generate_with_codes`: from the prompt's
last position on, at every generated position; the codebook keeps its own best k - n_slots codes). Samples: every
prompt x seed x row, temperature 1, `--new-tokens` new tokens, with the same seeds for the unsteered and every
steered condition. A sample "mentions the topic" when its continuation (prompt excluded) matches the topic regex.

Also measured: the baseline (no-codebook) model's mean per-token loss on the continuations, and the share of
samples that are one word repeated (`is_repetitive`); a repetitive sample never counts as a mention in the
headline rate. Writes `results.json` (settings, per-topic rates, codes, all samples) and `figure.html`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lm_common import (  # noqa: E402
    OUT,
    Timer,
    baseline_name,
    default_model,
    heldout_halves,
    load_model,
    save_figure,
    set_threads,
    take_chars,
    write_json,
)

from cbinterp.codecache.documents import cache_documents  # noqa: E402
from cbinterp.codecache.features import token_positions  # noqa: E402
from cbinterp.codecache.vocab import Vocabulary  # noqa: E402
from cbinterp.core.attach import codebooks_bypassed, get_codebooks  # noqa: E402
from cbinterp.core.interventions import generate_with_codes  # noqa: E402
from cbinterp.metrics.steering import steering_codes, topic_codes  # noqa: E402
from cbinterp.tasks.lm_features import TOPICS, is_repetitive, mentions_topic, topic_regex  # noqa: E402
from cbinterp.tasks.text import tokenize_documents, tokenizer_fingerprint  # noqa: E402

#: Neutral openings without a topic word. One word each, so that they tokenize to the same length and every seed's
#: samples of all prompts come from one batched generate call.
PROMPTS = ["The", "It", "He", "She", "In", "When", "There", "After"]
#: Which tokens a topic code must detect: the topic words themselves, or the token just before one (a code that
#: fires where the model is about to write a topic word).
TARGETS = ("word", "before_word")


PAPER = {
    "tinystories_one_code": {"dragon": [0.025, 0.65], "fire": [0.025, 1.0], "flower": [0.0, 0.9]},
    "wikitext_all_codes": {"football": [0.075, 0.95]},
    "note": "Tamkin et al. 2023 as quoted in issue 15: share of samples mentioning the topic, unsteered -> steered; "
    "TinyStories one-layer model with one code forced, WikiText model with all of the topic's codes forced",
}
TARGET = {"unsteered_below": 0.10, "steered_at_least": 0.60, "topics": 5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pretrained name or model folder (default: DEFAULT_MODEL)")
    p.add_argument(
        "--baseline",
        default=None,
        help="no-codebook LM (name or folder) that scores the samples' loss (default: the registry's baseline; "
        "'bypass' = the codebook model with its codebooks bypassed)",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="two topics, few short samples (for tests)")
    p.add_argument("--topics", nargs="*", default=None, help=f"default: all of {list(TOPICS)}")
    p.add_argument("--n-prompts", type=int, default=len(PROMPTS))
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--rows", type=int, default=2, help="samples per (prompt, seed) generate call")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument(
        "--n-slots",
        type=int,
        nargs="*",
        default=None,
        help="strengths to try: slots of k the topic code takes (default: 1, k/2, k); one is chosen per topic on the "
        "dev seeds",
    )
    p.add_argument("--dev-seeds", type=int, nargs="*", default=[100], help="seeds that choose the strength")
    p.add_argument(
        "--targets",
        nargs="*",
        default=list(TARGETS),
        choices=TARGETS,
        help="which topic codes to try: those of the topic words, of the token before one (chosen on the dev seeds)",
    )
    p.add_argument("--min-recall", type=float, default=0.01)
    p.add_argument("--min-fires", type=int, default=5, help="a topic code must fire this often on half A")
    p.add_argument("--max-chars", type=int, default=None, help="characters of half A to find codes on")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    args.model = args.model or default_model()
    if args.out is None:
        args.out = OUT / ("lm_steering_quick" if args.quick else "lm_steering")
    if args.quick:
        args.topics = args.topics or ["war", "religion"]
        args.n_prompts, args.seeds, args.rows, args.new_tokens = min(args.n_prompts, 2), args.seeds[:1], 2, 12
        args.dev_seeds = args.dev_seeds[:1]
        args.max_chars = args.max_chars or 20000
    args.topics = args.topics or list(TOPICS)
    for t in args.topics:
        topic_regex(t)  # KeyError lists the known topics
    return args


def default_baseline(model: str) -> str:
    """The shipped baseline for the shipped model; `<run>/baseline` for a `lm_train.py` run's codebook model; else
    "bypass" (the codebook model with its codebooks bypassed)."""
    if model == default_model():
        return baseline_name()
    path = Path(model)
    for candidate in (path / "baseline", path.parent / "baseline"):
        if (candidate / "model").is_dir():
            return str(candidate)
    return "bypass"


def before(mask: Tensor, cache) -> Tensor:
    """The tokens whose next token (in the same document) is in `mask`."""
    doc, pos = cache.doc, cache.pos
    out = torch.zeros_like(mask)
    same = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
    out[:-1] = mask[1:] & same
    return out


def find_topic_codes(cache, topic: str, tokenizer, min_recall: float, min_fires: int) -> dict:
    """Per target (`TARGETS`): `topic_codes` for one topic on half A as JSON-able rows, and the codes to force."""
    words = token_positions(cache, tokenizer, TOPICS[topic])
    out = {"n_topic_tokens": int(words.sum())}
    for target, mask in (("word", words), ("before_word", before(words, cache))):
        table = topic_codes(cache, mask, min_recall=min_recall, min_fires=min_fires)
        rows = table[["codebook", "head", "code", "n_fires", "precision", "recall"]].to_dict(orient="records")
        out[target] = {"per_head": rows, "force": steering_codes(table, cache)}
    return out


@torch.no_grad()
def generate(model, prompts, seeds, rows, new_tokens, codes=None, n_slots=None):
    """`rows` samples of every prompt for every seed: dicts with prompt, seed, ids (prompt + new tokens) and
    prompt_len. Prompts of the same token length share one generate call per seed (seeded by the seed and the
    length), so a condition costs a few calls whatever the number of prompts."""
    groups: dict[int, list[tuple[str, Tensor]]] = {}
    for prompt in prompts:
        ids = model.to_tokens(prompt)[0]
        groups.setdefault(len(ids), []).append((prompt, ids))
    samples = []
    kwargs = dict(max_new_tokens=new_tokens, do_sample=True, temperature=1.0, stop_at_eos=True, verbose=False)
    for seed in seeds:
        for length, members in sorted(groups.items()):
            tokens = torch.stack([ids for _, ids in members]).repeat_interleave(rows, dim=0)
            torch.manual_seed(1_000 * seed + length)
            if codes:
                out = generate_with_codes(model, tokens, codes, n_slots=n_slots, **kwargs)
            else:
                out = model.generate(tokens, **kwargs)
            for i, (prompt, _) in enumerate(members):
                for r in range(rows):
                    ids = out[i * rows + r].tolist()
                    samples.append({"prompt": prompt, "seed": seed, "row": r, "ids": ids, "prompt_len": length})
    return samples


def continuation(sample, eos: int) -> list[int]:
    """The generated ids up to (and including) the first end-of-text."""
    ids = sample["ids"][sample["prompt_len"] :]
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def baseline_loss(baseline, samples, eos: int, bypass: bool) -> tuple[float, list[float]]:
    """The baseline's mean per-token loss (nats) on the continuations (up to and including the first end-of-text),
    token-weighted over all samples; and each sample's mean (NaN for an empty continuation)."""
    total, count = 0.0, 0
    per_sample = [float("nan")] * len(samples)
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        shapes.setdefault((s["prompt_len"], len(s["ids"])), []).append(i)
    for (prompt_len, _), members in shapes.items():
        ids = torch.tensor([samples[i]["ids"] for i in members])
        if bypass:
            with codebooks_bypassed(baseline):
                logits = baseline(ids)
        else:
            logits = baseline(ids)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0][:, prompt_len - 1 :]  # predictions of the new tokens
        for row, i in enumerate(members):
            n = len(continuation(samples[i], eos))
            if n:
                total += float(nll[row, :n].sum())
                count += n
                per_sample[i] = float(nll[row, :n].mean())
    return (total / count if count else float("nan")), per_sample


def judge(samples, topic: str, vocab, eos: int) -> dict:
    regex = topic_regex(topic)
    texts = [vocab.text(continuation(s, eos)) for s in samples]
    mention = np.array([mentions_topic(t, regex) for t in texts])
    repetitive = np.array([is_repetitive(t) for t in texts])
    return {
        "n": len(texts),
        "rate": float(mention.mean()),
        "rate_excluding_repetitive": float((mention & ~repetitive).mean()),
        "repetitive_share": float(repetitive.mean()),
        "texts": texts,
        "mention": mention.tolist(),
        "repetitive": repetitive.tolist(),
    }


def summary(samples, topic, vocab, eos, baseline, bypass) -> tuple[dict, dict]:
    """(JSON-able rates and loss of a condition, the judged texts)."""
    judged = judge(samples, topic, vocab, eos)
    loss, each = baseline_loss(baseline, samples, eos, bypass)
    out = {key: judged[key] for key in ("n", "rate", "rate_excluding_repetitive", "repetitive_share")}
    out["baseline_loss"] = loss
    out["mean_new_tokens"] = float(np.mean([len(continuation(x, eos)) for x in samples])) if samples else 0.0
    judged["loss"] = each
    return out, judged


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    timer = Timer()
    model = load_model(args.model)
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    vocab = Vocabulary(tokenizer)
    bypass = False
    base_label = args.baseline or default_baseline(args.model)
    if base_label == "bypass":
        baseline, bypass = model, True
    else:
        baseline = load_model(base_label)
        if get_codebooks(baseline):
            raise SystemExit(f"--baseline {base_label} has codebooks; give the no-codebook baseline LM (or 'bypass').")
        if tokenizer_fingerprint(baseline.tokenizer) != tokenizer_fingerprint(tokenizer):
            raise SystemExit(f"--baseline {base_label} has another tokenizer than --model {args.model}.")
    half_a, _ = heldout_halves(args.model)
    texts_a = take_chars(half_a, args.max_chars)
    docs = tokenize_documents(texts_a, tokenizer, model.cfg.n_ctx, model)
    cache = cache_documents(model, docs, batch_size=16)
    timer.mark("cache")
    k = {name: cb.k for name, cb in get_codebooks(model).items()}
    k_min = min(k.values())
    strengths = sorted({min(max(1, n), k_min) for n in (args.n_slots or [1, k_min // 2, k_min])})
    found = {t: find_topic_codes(cache, t, tokenizer, args.min_recall, args.min_fires) for t in args.topics}
    timer.mark("find_codes")
    prompts = PROMPTS[: args.n_prompts]
    longest = max(len(model.to_tokens(p)[0]) for p in prompts)
    new_tokens = min(args.new_tokens, model.cfg.n_ctx - longest)  # prompt + continuation must fit the context
    gen = dict(prompts=prompts, rows=args.rows, new_tokens=new_tokens)
    dev = dict(prompts=prompts, rows=args.rows, new_tokens=new_tokens)
    unsteered = generate(model, seeds=args.seeds, **gen)
    timer.mark("generate_unsteered")
    per_topic = {}
    for topic in args.topics:
        un, _ = summary(unsteered, topic, vocab, eos, baseline, bypass)
        entry = {
            "unsteered": un,
            "codes": {
                "n_topic_tokens": found[topic]["n_topic_tokens"],
                **{t: found[topic][t]["per_head"] for t in args.targets},
            },
            "steered_codebooks": [],
            "steered": None,
            "met": False,
        }
        per_topic[topic] = entry
        candidates = [(t, n) for t in args.targets if found[topic][t]["force"] for n in strengths]
        if not candidates:
            print(f"{topic}: no codebook has a topic code on half A; not steered")
            continue
        # which codes (target) and how strong (n_slots): chosen on the dev seeds, other samples than those scored
        sweep = {}
        for target, n in candidates:
            codes = found[topic][target]["force"]
            samples = generate(model, seeds=args.dev_seeds, codes=codes, n_slots={c: n for c in codes}, **dev)
            sweep[(target, n)], _ = summary(samples, topic, vocab, eos, baseline, bypass)
        target, chosen = max(candidates, key=lambda c: (sweep[c]["rate_excluding_repetitive"], -c[1]))
        codes = found[topic][target]["force"]
        entry["dev_sweep"] = {f"{t}/{n}": v for (t, n), v in sweep.items()}
        entry["target"], entry["n_slots"], entry["steered_codebooks"] = target, chosen, sorted(codes)
        samples = generate(model, seeds=args.seeds, codes=codes, n_slots={c: chosen for c in codes}, **gen)
        entry["steered"], judged = summary(samples, topic, vocab, eos, baseline, bypass)
        entry["met"] = bool(
            un["rate"] < TARGET["unsteered_below"]
            and entry["steered"]["rate_excluding_repetitive"] >= TARGET["steered_at_least"]
        )
        entry["samples"] = [
            {"prompt": x["prompt"], "seed": x["seed"], "text": t, "mention": m, "repetitive": r, "loss": lo}
            for x, t, m, r, lo in zip(samples, judged["texts"], judged["mention"], judged["repetitive"], judged["loss"])
        ]
        timer.mark(f"steer_{topic}")
        print_topic(topic, entry, judged)
    met = [t for t, e in per_topic.items() if e.get("met")]
    un_all, un_judged = summary(unsteered, args.topics[0], vocab, eos, baseline, bypass)
    headline = {
        "topics": len(args.topics),
        "topics_meeting_target": met,
        "n_meeting_target": len(met),
        "target": TARGET,
        "meets_target": len(met) >= TARGET["topics"],
        "unsteered_baseline_loss": un_all["baseline_loss"],
        "unsteered_repetitive_share": un_all["repetitive_share"],
        "strengths_tried": strengths,
        "targets_tried": args.targets,
        "k": k,
        "samples_per_condition": len(unsteered),
        "dev_samples_per_condition": len(prompts) * len(args.dev_seeds) * args.rows,
        "new_tokens": new_tokens,
    }
    print_table(per_topic, headline, base_label)
    fig = steering_figure(per_topic, f"Topic steering ({args.model}), n={len(unsteered)} samples per condition")
    args.out.mkdir(parents=True, exist_ok=True)
    figures = save_figure(fig, args.out, "figure")
    results = {
        "settings": {
            "model": str(args.model),
            "baseline": base_label,
            "quick": args.quick,
            "prompts": prompts,
            "seeds": args.seeds,
            "dev_seeds": args.dev_seeds,
            "rows_per_prompt_and_seed": args.rows,
            "new_tokens": new_tokens,
            "temperature": 1.0,
            "strengths_tried": strengths,
            "targets_tried": args.targets,
            "strength_rule": "per topic, the (target, n_slots) with the highest dev-seed rate excluding repetitive "
            "samples (ties: fewer slots); scored on the other seeds",
            "min_recall": args.min_recall,
            "min_fires": args.min_fires,
            "code_search_tokens": cache.n_tokens,
            "topics": {t: TOPICS[t] for t in args.topics},
        },
        "headline": headline,
        "paper": PAPER,
        "topics": per_topic,
        "unsteered_samples": [
            {"prompt": x["prompt"], "seed": x["seed"], "text": t, "loss": lo}
            for x, t, lo in zip(unsteered, un_judged["texts"], un_judged["loss"])
        ],
        "files": {"figure": figures},
        "timings_s": timer.marks,
    }
    write_json(args.out / "results.json", results)
    print(f"wrote {args.out / 'results.json'}, {', '.join(figures)}")
    return results


def print_topic(topic, entry, steer) -> None:
    s = entry["steered"]
    print(
        f"\n== {topic}: unsteered {entry['unsteered']['rate']:.0%} -> steered {s['rate']:.0%} "
        f"({s['rate_excluding_repetitive']:.0%} without repetitive samples; {s['repetitive_share']:.0%} repetitive); "
        f"codes of the {entry['target']!r} tokens in n_slots {entry['n_slots']} of {len(entry['steered_codebooks'])} "
        "codebook(s); dev sweep "
        + ", ".join(f"{n}: {v['rate_excluding_repetitive']:.0%}" for n, v in entry["dev_sweep"].items())
    )
    for text, mention in list(zip(steer["texts"], steer["mention"]))[:3]:
        print(f"   [{'x' if mention else ' '}] {text[:160]!r}")


def print_table(per_topic, headline, base_label) -> None:
    print(
        f"\nShare of samples mentioning the topic (n = {headline['samples_per_condition']} per condition); "
        f"steered = the topic code of every head in n_slots of k={sorted(set(headline['k'].values()))} slots; codes "
        f"(of the topic 'word' or the token 'before_word') and n_slots ({headline['strengths_tried']}) chosen per "
        f"topic on dev seeds; loss = {base_label}, nats per new token"
    )
    head = (
        f"{'topic':<10} {'unsteered':>9} {'steered':>8} {'steered*':>8} {'repet.':>7} {'codes':>18} {'loss un':>8} "
        f"{'loss st':>8}  target"
    )
    print(head)
    print("-" * len(head))
    for topic, e in per_topic.items():
        s = e.get("steered")
        if s is None:
            print(f"{topic:<10} {e['unsteered']['rate']:>9.0%}  (no topic code)")
            continue
        print(
            f"{topic:<10} {e['unsteered']['rate']:>9.0%} {s['rate']:>8.0%} {s['rate_excluding_repetitive']:>8.0%} "
            f"{s['repetitive_share']:>7.0%} {e['target'] + ' x' + str(e['n_slots']):>18} "
            f"{e['unsteered']['baseline_loss']:>8.2f} "
            f"{s['baseline_loss']:>8.2f}  "
            f"{'met' if e['met'] else '-'}"
        )
    print("-" * len(head))
    print(f"unsteered samples: {headline['unsteered_repetitive_share']:.0%} repetitive")
    print(
        "steered* = mentions in samples that are not one word repeated (the headline rate). Target: unsteered < 10% "
        f"and steered* >= 60% on >= 5 topics: {headline['n_meeting_target']} met "
        f"({', '.join(headline['topics_meeting_target'])})"
    )


def steering_figure(per_topic, title):
    import plotly.graph_objects as go

    topics = [t for t, e in per_topic.items() if e.get("steered")]
    fig = go.Figure()
    fig.add_bar(name="unsteered", x=topics, y=[per_topic[t]["unsteered"]["rate"] for t in topics])
    fig.add_bar(
        name="steered (repetitive samples excluded)",
        x=topics,
        y=[per_topic[t]["steered"]["rate_excluding_repetitive"] for t in topics],
        text=[f"loss {per_topic[t]['steered']['baseline_loss']:.2f}" for t in topics],
    )
    fig.update_layout(
        title=title, barmode="group", yaxis_title="share of samples mentioning the topic", yaxis_range=[0, 1.05]
    )
    return fig


if __name__ == "__main__":
    main()
