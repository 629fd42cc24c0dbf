"""Topic steering of a codebook language model: force topic codes during generation, count topic mentions.

    python benchmarks/lm_steering.py                      # the shipped DEFAULT_MODEL, every topic
    python benchmarks/lm_steering.py --model PATH --quick # a few short samples (tests)
    python benchmarks/lm_steering.py --sources            # only source steering (the five corpus sources)
    python benchmarks/lm_steering.py --paper-tinystories --base PATH --codebook PATH
                                      # the paper's Table 3 on the paper's model (benchmarks/paper_tinystories.py)

Topic codes are found from data, on held-out half A only (text the model never trained on): for every codebook and
head, the code that best detects the topic's words (the regex of `cbinterp.tasks.lm_features.TOPICS`), or the token
just before a topic word, by the paper's search (recall > 1% on half A, most precise). Steering forces, in every
codebook, each head's topic code in n_slots of its k slots (`generate_with_codes`: from the prompt's last position
on, at every generated position; the codebook keeps its own best k - n_slots codes). Which codes (word / before_word)
and how many slots are chosen per topic on dev seeds, and the chosen setting is scored on other seeds. Samples:
every prompt x seed x row, temperature 1, `--new-tokens` new tokens, the same seeds for the unsteered and every
steered condition. A sample "mentions the topic" when its continuation (prompt excluded) matches the topic regex.

Source steering (`--sources`; after the topics by default) asks the same of the corpus's five sources, judged by a
source classifier blind to the codes (`SourceClassifier`: naive Bayes over words and word pairs, trained on the
training split only, settings `CLASSIFIER` chosen on a split of the training documents; its accuracy is reported on
held-out windows as long as the samples). Codes per source, on half A: each head's codes ranked by the window-level
rule's score (`cbinterp.metrics.window_codes`, the source's windows against every other source's), by difference
(active_in - active_out) and by ratio (active_in / (active_in + active_out), codes active on >= `--min-in` of a
source window's tokens); candidates: each head's best code in n_slots slots ("best") or its n_slots best codes
("top"), for both scores ("-ratio"); the one with the highest dev-seed readable rate is scored on the other seeds.
"prompted" (the ceiling) continues `--source-prompt-tokens` tokens of the source's own half-A text. Target: readable
>= 80% on >= 4 of 5 sources (`SOURCE_TARGET`).

Steered text must still be text: the baseline (no-codebook) model's per-token loss on every continuation is
measured, and a sample is "readable" when it is not one word repeated (`is_repetitive`) and its loss is at most
the 95th percentile of the unsteered samples' losses. The headline rate counts readable samples that mention the
topic. Writes `results.json` (settings, per-topic rates, codes, the dev sweep, all samples) and `figure.html`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cbinterp.codecache.documents import cache_documents
from cbinterp.codecache.features import token_positions
from cbinterp.codecache.vocab import Vocabulary
from cbinterp.core.codebooks.attach import codebooks_bypassed, get_codebooks
from cbinterp.core.codebooks.interventions import generate_with_codes
from cbinterp.metrics.steering import steering_codes, topic_codes
from cbinterp.metrics.window_codes import (
    best_window_codes,
    text_windows,
    topic_window_codes,
    window_codes,
    window_steering_codes,
)
from cbinterp.reporting import Timer, save_figure, write_json
from cbinterp.tasks.lm_features import (
    TOPIC_PROMPTS,
    TOPICS,
    is_repetitive,
    mentions_topic,
    topic_regex,
)
from cbinterp.tasks.source_classifier import SourceClassifier, word_windows
from cbinterp.tasks.text import tokenize_documents, tokenizer_fingerprint

if __package__:  # python -m benchmarks.lm_steering
    from . import common
else:  # python benchmarks/lm_steering.py: this folder is sys.path[0]
    import common

#: Neutral openings without a topic word. One word each, so that they tokenize to the same length and every seed's
#: samples of all prompts come from one batched generate call.
PROMPTS = ["The", "It", "He", "She", "In", "When", "There", "After"]
#: Which tokens a topic code must detect: the topic words themselves, or the token just before one (a code that
#: fires where the model is about to write a topic word).
TARGETS = ("word", "before_word")


PAPER = {
    "tinystories_one_code": {"dragon": [0.025, 0.65], "fire": [0.025, 1.0], "flower": [0.0, 0.9]},
    "wikitext_all_codes": {"football": [0.075, 0.95]},
    "note": "Tamkin et al. 2023, quoted (not measured here): share of samples mentioning the topic, unsteered -> "
    "steered; TinyStories one-layer model with one code forced, WikiText model with all of the topic's codes forced",
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
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--rows", type=int, default=3, help="samples per prompt and seed (dev seeds: 2)")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument(
        "--n-slots",
        type=int,
        nargs="*",
        default=None,
        help="strengths to try: slots of k the topic code takes (default: 1, 2, k/2, k); one is chosen per "
        "topic on the dev seeds",
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
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: more fight on a shared CPU)")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--sources", action="store_true", help="only source steering (default: topics, then sources)")
    part.add_argument("--no-sources", action="store_true", help="only topic steering")
    p.add_argument("--window", type=int, default=128, help="tokens per window of the window-level rule")
    p.add_argument(
        "--min-in",
        type=float,
        default=0.02,
        help="source codes ranked by ratio: the least share of a source window's tokens a code must be active on",
    )
    p.add_argument(
        "--source-prompt-tokens", type=int, default=16, help="tokens of the source's own text in a 'prompted' sample"
    )
    p.add_argument("--min-matches", type=int, default=3, help="topic regex matches that make a window topical")
    p.add_argument(
        "--min-active",
        type=float,
        nargs="+",
        default=[0.5, 0.3],
        help="window-level rule: shares of a group window's tokens a code must be active on (each is counted)",
    )
    p.add_argument(
        "--max-elsewhere", type=float, default=0.05, help="window-level rule: the most it may be active elsewhere"
    )
    args = p.parse_args(argv)
    args.model = args.model or common.default_model()
    if args.out is None:
        args.out = common.OUT / ("lm_steering_quick" if args.quick else "lm_steering")
    if args.quick:
        args.topics = args.topics or ["war", "religion"]
        args.n_prompts, args.seeds, args.rows, args.new_tokens = min(args.n_prompts, 2), args.seeds[:1], 2, 12
        args.dev_seeds = args.dev_seeds[:1]
        args.max_chars = args.max_chars or 20000
        args.window = min(args.window, 32)
    args.topics = [] if args.sources else args.topics or list(TOPICS)
    for t in args.topics:
        topic_regex(t)  # KeyError lists the known topics
    return args


def default_baseline(model: str) -> str:
    """The shipped baseline for the shipped model; `<run>/baseline` for a `lm_train.py` run's codebook model; else
    "bypass" (the codebook model with its codebooks bypassed)."""
    if model == common.default_model():
        return common.baseline_name()
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
def generate(model, prompts, seeds, rows, new_tokens, codes=None, n_slots=None, hooks=()):
    """`rows` samples of every prompt (a string, or token ids starting with BOS) for every seed: dicts with prompt,
    seed, ids (prompt + new tokens) and prompt_len. Prompts of the same token length share one generate call per
    seed (seeded by the seed and the length), so a condition costs a few calls whatever the number of prompts.
    Steered by forcing `codes` (`generate_with_codes`) or by other forward `hooks` (e.g. SAE latents forced)."""
    groups: dict[int, list[tuple[str, Tensor]]] = {}
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = model.to_tokens(prompt)[0]
        else:  # token ids (BOS first): recorded as the text after the BOS
            ids = torch.as_tensor(prompt, dtype=torch.long)
            prompt = model.to_string(ids[1:])
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
                with model.hooks(fwd_hooks=list(hooks)):
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


def judge(samples, topic, vocab, eos: int) -> dict:
    """Which continuations hit `topic`: a topic name (its regex matches) or a function of the list of texts that
    returns one bool per text (e.g. "the source classifier reads it as the Bible")."""
    texts = [vocab.text(continuation(s, eos)) for s in samples]
    if callable(topic):
        mention = np.array(topic(texts), dtype=bool).reshape(len(texts))
    else:
        regex = topic_regex(topic)
        mention = np.array([mentions_topic(t, regex) for t in texts], dtype=bool)
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


def summary(samples, topic, vocab, eos, baseline, bypass, loss_cap: float) -> tuple[dict, dict]:
    """(JSON-able rates and loss of a condition, the judged texts). A sample is "readable" when it is not one word
    repeated and the baseline's mean loss on it is at most `loss_cap` (the 95th percentile of the unsteered
    samples'); `rate_readable`, the headline rate, counts the readable samples that mention the topic."""
    judged = judge(samples, topic, vocab, eos)
    loss, each = baseline_loss(baseline, samples, eos, bypass)
    each_np = np.array(each, dtype=np.float64)
    high = ~(each_np <= loss_cap)  # NaN (empty continuation) counts as unreadable
    readable = ~np.array(judged["repetitive"], dtype=bool) & ~high
    mention = np.array(judged["mention"], dtype=bool)
    out = {key: judged[key] for key in ("n", "rate", "rate_excluding_repetitive", "repetitive_share")}
    out["rate_readable"] = float((mention & readable).mean()) if len(samples) else 0.0
    out["high_loss_share"] = float(high.mean()) if len(samples) else 0.0
    out["baseline_loss"] = loss
    out["mean_new_tokens"] = float(np.mean([len(continuation(x, eos)) for x in samples])) if samples else 0.0
    judged["loss"] = each
    judged["readable"] = readable.tolist()
    return out, judged


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--paper-tinystories" in argv:  # the paper's own model and protocol, with options of its own
        if __package__:
            from . import paper_tinystories
        else:
            import paper_tinystories
        argv.remove("--paper-tinystories")
        return paper_tinystories.main(argv)
    args = parse_args(argv)
    common.set_threads(args.threads)
    timer = Timer()
    model = common.load_model(args.model)
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    vocab = Vocabulary(tokenizer)
    bypass = False
    base_label = args.baseline or default_baseline(args.model)
    if base_label == "bypass":
        baseline, bypass = model, True
    else:
        baseline = common.load_model(base_label)
        if get_codebooks(baseline):
            raise SystemExit(f"--baseline {base_label} has codebooks; give the no-codebook baseline LM (or 'bypass').")
        if tokenizer_fingerprint(baseline.tokenizer) != tokenizer_fingerprint(tokenizer):
            raise SystemExit(f"--baseline {base_label} has another tokenizer than --model {args.model}.")
    half_a, half_b = common.heldout_halves(args.model)
    texts_a, sources_a = heldout_texts(half_a, args.max_chars)
    docs = tokenize_documents(texts_a, tokenizer, model.cfg.n_ctx, model)
    cache = cache_documents(model, docs, batch_size=16)
    timer.mark("cache")
    k = {name: cb.k for name, cb in get_codebooks(model).items()}
    found = {t: find_topic_codes(cache, t, tokenizer, args.min_recall, args.min_fires) for t in args.topics}
    timer.mark("find_codes")
    ctx = steering_context(args, model, baseline, bypass, cache, min(k.values()))
    strengths, gen, dev, unsteered, loss_cap = ctx.strengths, ctx.gen, ctx.dev, ctx.unsteered, ctx.loss_cap
    prompts, new_tokens = gen["prompts"], gen["new_tokens"]
    timer.mark("generate_unsteered")
    per_topic = {}
    for topic in args.topics:
        un, _ = summary(unsteered, topic, vocab, eos, baseline, bypass, loss_cap)
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
        entry["paper_rule"] = paper_rule_topic(ctx, topic)
        timer.mark(f"paper_rule_{topic}")
        # the ceiling: what the model does with the topic in its context (a topic sentence as the prompt)
        topic_prompt = TOPIC_PROMPTS[topic]
        room = model.cfg.n_ctx - len(model.to_tokens(topic_prompt)[0])
        prompted = generate(model, [topic_prompt], args.seeds, len(prompts) * args.rows, min(new_tokens, room))
        entry["prompted"], _ = summary(prompted, topic, vocab, eos, baseline, bypass, loss_cap)
        candidates = [(t, n) for t in args.targets if found[topic][t]["force"] for n in strengths]
        if not candidates:
            print(f"{topic}: no codebook has a topic code on half A; not steered")
            continue
        # which codes (target) and how strong (n_slots): chosen on the dev seeds, other samples than those scored
        sweep = {}
        for target, n in candidates:
            codes = found[topic][target]["force"]
            samples = generate(model, seeds=args.dev_seeds, codes=codes, n_slots={c: n for c in codes}, **dev)
            sweep[(target, n)], _ = summary(samples, topic, vocab, eos, baseline, bypass, loss_cap)
        target, chosen = max(candidates, key=lambda c: (sweep[c]["rate_readable"], -c[1]))
        codes = found[topic][target]["force"]
        entry["dev_sweep"] = {f"{t}/{n}": v for (t, n), v in sweep.items()}
        entry["target"], entry["n_slots"], entry["steered_codebooks"] = target, chosen, sorted(codes)
        samples = generate(model, seeds=args.seeds, codes=codes, n_slots={c: chosen for c in codes}, **gen)
        entry["steered"], judged = summary(samples, topic, vocab, eos, baseline, bypass, loss_cap)
        entry["met"] = bool(
            un["rate"] < TARGET["unsteered_below"] and entry["steered"]["rate_readable"] >= TARGET["steered_at_least"]
        )
        entry["samples"] = [
            {"prompt": x["prompt"], "seed": x["seed"], "text": t, "mention": m, "repetitive": r, "loss": lo}
            for x, t, m, r, lo in zip(samples, judged["texts"], judged["mention"], judged["repetitive"], judged["loss"])
        ]
        timer.mark(f"steer_{topic}")
        print_topic(topic, entry, judged)
    sources = None
    if not args.no_sources:
        sources = run_sources(
            ctx, [sources_a[d] for d in text_windows(cache, args.window)[1].tolist()], half_a + half_b
        )
        timer.mark("sources")
    met = [t for t, e in per_topic.items() if e.get("met")]
    un_all, un_judged = summary(unsteered, lambda texts: [False] * len(texts), vocab, eos, baseline, bypass, loss_cap)
    headline = {
        "topics": len(args.topics),
        "topics_meeting_target": met,
        "n_meeting_target": len(met),
        "target": TARGET,
        "meets_target": len(met) >= TARGET["topics"],
        "unsteered_baseline_loss": un_all["baseline_loss"],
        "unsteered_repetitive_share": un_all["repetitive_share"],
        "loss_cap": loss_cap,
        "strengths_tried": strengths,
        "targets_tried": args.targets,
        "k": k,
        "samples_per_condition": len(unsteered),
        "dev_samples_per_condition": len(prompts) * len(args.dev_seeds) * min(args.rows, 2),
        "new_tokens": new_tokens,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    figures = []
    if per_topic:
        print_table(per_topic, headline, base_label)
        print_paper_rule(per_topic, args)
        fig = steering_figure(per_topic, f"Topic steering ({args.model}), n={len(unsteered)} samples per condition")
        figures = save_figure(fig, args.out, "figure")
    if sources is not None:
        print_sources(sources, headline)
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
            "strength_rule": "per topic, the (target, n_slots) with the highest dev-seed readable rate (ties: fewer "
            "slots); scored on the other seeds",
            "readable": "not one word repeated, and baseline per-token loss <= the 95th percentile of the unsteered "
            "samples' (loss_cap)",
            "min_recall": args.min_recall,
            "min_fires": args.min_fires,
            "code_search_tokens": cache.n_tokens,
            "topics": {t: TOPICS[t] for t in args.topics},
            "topic_prompts": {t: TOPIC_PROMPTS[t] for t in args.topics},
            "window_rule": WINDOW_RULE,
            "window": args.window,
            "min_matches": args.min_matches,
            "min_active": args.min_active,
            "max_elsewhere": args.max_elsewhere,
            "min_in": args.min_in,
            "source_prompt_tokens": args.source_prompt_tokens,
        },
        "headline": headline,
        "paper": PAPER,
        "topics": per_topic,
        "sources": sources,
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


def steering_context(args, model, baseline, bypass: bool, cache, k: int) -> SimpleNamespace:
    """What every steered condition of `model` shares: the strengths to try (n_slots, of `k` slots), the prompts
    and generation settings (`gen`, and `dev` for the dev seeds), the unsteered samples and the loss cap (the 95th
    percentile of their per-sample baseline loss); `cache` (half A's codes) is where codes are chosen."""
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_id
    default = [1, 2, k // 2, k]
    strengths = sorted({min(max(1, n), k) for n in (args.n_slots or default)})
    prompts = PROMPTS[: args.n_prompts]
    longest = max(len(model.to_tokens(p)[0]) for p in prompts)
    new_tokens = min(args.new_tokens, model.cfg.n_ctx - longest)  # prompt + continuation must fit the context
    gen = dict(prompts=prompts, rows=args.rows, new_tokens=new_tokens)
    dev = dict(prompts=prompts, rows=min(args.rows, 2), new_tokens=new_tokens)
    unsteered = generate(model, seeds=args.seeds, **gen)
    _, unsteered_losses = baseline_loss(baseline, unsteered, eos, bypass)
    loss_cap = float(np.nanquantile(np.array(unsteered_losses, dtype=np.float64), 0.95))
    return SimpleNamespace(
        args=args, model=model, baseline=baseline, bypass=bypass, vocab=Vocabulary(tokenizer), eos=eos,
        loss_cap=loss_cap, cache=cache, tokenizer=tokenizer, strengths=strengths, gen=gen, dev=dev,
        unsteered=unsteered, force=forced_codes,
    )  # fmt: skip


#: The window-level code selection, as settings record it (`cbinterp.metrics.window_codes`).
WINDOW_RULE = (
    "text cut into windows of `window` tokens of one document; a code's activity in a window = the share of its "
    "tokens on which the code is among its head's k codes; active_in / active_out = its mean activity over the "
    "group's windows / the other windows (topics: topical = >= min_matches regex matches, other = no match; "
    "sources: the source's windows against every other source's); a code passes when active_in >= min_active and "
    "active_out <= max_elsewhere; steering candidates, ranked by active_in - active_out: each head's best code in "
    "n_slots slots ('best'), or its n_slots best codes, one slot each ('top'); which, and n_slots, chosen on the dev "
    "seeds"
)
#: Source steering's target: readable samples classified as the source.
SOURCE_TARGET = {"readable_at_least": 0.80, "sources": 4}
#: How source codes are ranked (`window_codes`' score); both give candidates, the dev seeds choose.
SOURCE_SCORES = ("difference", "ratio")
#: The source classifier's settings, chosen on the training split alone (every fifth training document, by a hash
#: of its id, held out of fitting; 65-word windows): word pairs raised macro accuracy from 0.937 to 0.946; with
#: them, min_count 2 / alpha 0.1 beat min_count 5 (0.944) and alpha 0.01 (0.917) or 1 (0.857).
CLASSIFIER = {"bigrams": True, "min_count": 2, "alpha": 0.1}


def heldout_texts(docs, max_chars: int | None) -> tuple[list[str], list[str]]:
    """The texts of `docs` and their sources: all, or about `max_chars` characters shared evenly by the sources
    (`common.take_chars` within each)."""
    if max_chars is None:
        return [d.text for d in docs], [d.source for d in docs]
    by_source: dict[str, list] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    texts, sources = [], []
    for source, group in by_source.items():
        part = common.take_chars(group, max(1, max_chars // len(by_source)))
        texts += part
        sources += [source] * len(part)
    return texts, sources


def code_rows(best) -> list[dict]:
    """JSON-able rows (codebook, head, code, active_in, active_out) of a `best_window_codes` table."""
    return best[["codebook", "head", "code", "active_in", "active_out"]].to_dict(orient="records")


def n_passing(table, min_active: float, max_elsewhere: float) -> int:
    if table.empty:
        return 0
    return int(((table["active_in"] >= min_active) & (table["active_out"] <= max_elsewhere)).sum())


def window_candidates(table, cache, strengths, suffix: str = "") -> dict[tuple[str, int], dict]:
    """(kind, n_slots) -> codes to force, from a `window_codes` table: each head's best code in n_slots slots
    ("best"), or its n_slots best codes, one slot each ("top", n_slots >= 2); `suffix` is appended to the kinds."""
    out = {}
    one = steering_codes(best_window_codes(table, cache), cache)
    for n in strengths:
        if one:
            out[("best" + suffix, n)] = one
        if n >= 2:
            top = window_steering_codes(best_window_codes(table, cache, per_head=n), cache)
            if top:
                out[("top" + suffix, n)] = top
    return out


def forced_codes(codes: dict, n_slots: int) -> dict:
    """`generate`'s arguments that force `codes` (codebook -> ids) in `n_slots` slots of every codebook."""
    return {"codes": codes, "n_slots": {c: n_slots for c in codes}}


def sweep_and_score(ctx, candidates: dict, hit) -> dict:
    """Force each candidate ((kind, n_slots) -> codes) on the dev seeds, keep the one with the highest readable hit
    rate (ties: fewer slots, then "best"), and score it on the scoring seeds. `hit` is a topic name or a function
    of the texts."""
    args, judge_args = ctx.args, (ctx.vocab, ctx.eos, ctx.baseline, ctx.bypass, ctx.loss_cap)
    force = getattr(ctx, "force", forced_codes)
    sweep = {}
    for (kind, n), codes in candidates.items():
        samples = generate(ctx.model, seeds=args.dev_seeds, **force(codes, n), **ctx.dev)
        sweep[(kind, n)], _ = summary(samples, hit, *judge_args)
    kind, chosen = max(sweep, key=lambda c: (sweep[c]["rate_readable"], -c[1], c[0].startswith("best")))
    codes = candidates[(kind, chosen)]
    samples = generate(ctx.model, seeds=args.seeds, **force(codes, chosen), **ctx.gen)
    steered, judged = summary(samples, hit, *judge_args)
    return {
        "kind": kind,
        "n_slots": chosen,
        "forced": {name: ids.tolist() for name, ids in codes.items()},
        "dev_sweep": {
            f"{k}/{n}": {"rate": v["rate"], "rate_readable": v["rate_readable"]} for (k, n), v in sweep.items()
        },
        "steered": steered,
        "samples": [
            {"prompt": x["prompt"], "seed": x["seed"], "text": t, "hit": m, "readable": r, "loss": lo}
            for x, t, m, r, lo in zip(samples, judged["texts"], judged["mention"], judged["readable"], judged["loss"])
        ],
    }


def paper_rule_topic(ctx, topic: str) -> dict:
    """The paper's window-level rule for one topic on half A: how many codes pass each `--min-active`, and the
    steering that each head's best candidate gives (passing or not)."""
    args = ctx.args
    table, counts = topic_window_codes(
        ctx.cache,
        TOPICS[topic],
        ctx.tokenizer,
        window=args.window,
        min_matches=args.min_matches,
        min_active=args.min_active[0],
        max_elsewhere=args.max_elsewhere,
    )
    out = {"windows": counts, "n_pass": {str(t): n_passing(table, t, args.max_elsewhere) for t in args.min_active}}
    out["best"], out["steered"] = [], None
    if table.empty:
        return out
    out["best"] = code_rows(best_window_codes(table, ctx.cache))
    candidates = window_candidates(table, ctx.cache, ctx.strengths)
    if candidates:
        out.update(sweep_and_score(ctx, candidates, topic))
    return out


def run_sources(ctx, window_source: list[str], heldout_docs) -> dict:
    """Source steering: per corpus source, each head's window-level codes of its half-A windows against the other
    sources' (`window_codes`, ranked by difference and by ratio), the candidate (score, best / top, n_slots) chosen
    on the dev seeds; a sample hits when the source classifier (`SourceClassifier` over words and word pairs,
    trained on the training split, blind to the codes) reads its continuation as that source. "prompted" is the
    ceiling: continuations of the source's own half-A text."""
    from cbinterp.tasks.corpus import load_corpus

    args, cache = ctx.args, ctx.cache
    train = load_corpus(split="train")
    if args.quick:
        train = train[::10]
    clf = SourceClassifier.fit([d.text for d in train], [d.source for d in train], **CLASSIFIER)
    un_texts = [ctx.vocab.text(continuation(s, ctx.eos)) for s in ctx.unsteered]
    n_words = max(5, int(np.median([len(t.split()) for t in un_texts])))
    pieces, labels = [], []
    for d in heldout_docs:
        w = word_windows(d.text, n_words)
        pieces += w
        labels += [d.source] * len(w)
    accuracy = clf.accuracy(pieces, labels)
    accuracy["n_words"] = n_words
    windows, _ = text_windows(cache, args.window)
    window_source = np.array(window_source)
    judge_args = (ctx.vocab, ctx.eos, ctx.baseline, ctx.bypass, ctx.loss_cap)
    per_source = {}
    for source in sorted(set(window_source) & set(clf.labels)):
        in_group = torch.from_numpy(window_source == source)
        tables = {
            score: window_codes(
                cache,
                windows,
                in_group,
                min_active=args.min_active[0],
                max_elsewhere=args.max_elsewhere,
                score=score,
                min_in=args.min_in if score == "ratio" else 0.0,
            )
            for score in SOURCE_SCORES
        }
        candidates = {}
        for score, table in tables.items():
            candidates.update(window_candidates(table, cache, ctx.strengths, "" if score == "difference" else "-ratio"))

        def hit(texts, source=source):
            return [label == source for label in clf.predict(texts)]

        un, _ = summary(ctx.unsteered, hit, *judge_args)
        prompts = source_prompts(cache, windows, in_group, len(ctx.gen["prompts"]) * ctx.gen["rows"], ctx)
        prompted = generate(ctx.model, prompts, args.seeds, 1, ctx.gen["new_tokens"])
        table = tables["difference"]
        entry = {
            "unsteered": un,
            "prompted": summary(prompted, hit, *judge_args)[0],
            "windows": int(in_group.sum()),
            "n_pass": {str(t): n_passing(table, t, args.max_elsewhere) for t in args.min_active},
            "best": code_rows(best_window_codes(table, cache)),
            "best_ratio": code_rows(best_window_codes(tables["ratio"], cache)),
            "steered": None,
            "met": False,
        }
        if candidates:
            entry.update(sweep_and_score(ctx, candidates, hit))
            entry["met"] = entry["steered"]["rate_readable"] >= SOURCE_TARGET["readable_at_least"]
            entry["labels_of_steered"] = dict(Counter(clf.predict([x["text"] for x in entry["samples"]])))
        per_source[source] = entry
    met = [s for s, e in per_source.items() if e["met"]]
    return {
        "classifier": {
            "kind": "naive Bayes over word and word-pair counts (SourceClassifier), uniform priors",
            "settings": CLASSIFIER,
            "train_documents": len(train),
            "heldout_accuracy": accuracy,
        },
        "target": SOURCE_TARGET,
        "sources_meeting_target": met,
        "meets_target": len(met) >= SOURCE_TARGET["sources"],
        "per_source": per_source,
    }


def source_prompts(cache, windows, in_group, n: int, ctx) -> list[Tensor]:
    """`n` prompts of the group's own text: BOS and the first `--source-prompt-tokens` tokens of windows spread
    evenly over the group's windows (repeated when it has fewer than `n`)."""
    want = min(ctx.args.source_prompt_tokens, ctx.model.cfg.n_ctx - 1 - ctx.gen["new_tokens"])
    bos = ctx.tokenizer.bos_token_id
    tokens = cache.tokens
    group = torch.nonzero(in_group).flatten().tolist()
    out = []
    for i in np.linspace(0, len(group) - 1, n).round().astype(int):
        ids = tokens[windows == group[i]].long()
        ids = ids[ids != bos][:want]  # a row's BOS may fall inside a window
        out.append(torch.cat([torch.tensor([bos]), ids]))
    shortest = min(len(x) for x in out)
    return [x[:shortest] for x in out]  # one length: one generate call per seed


def _codes_text(forced: dict) -> str:
    """Forced codes as "L<layer>h<head>:<codes>", e.g. "L1h2:578,335" (no h for a codebook without heads)."""
    out = []
    for name, ids in forced.items():
        layer = name.split(".")[1] if name.startswith("blocks.") else name
        per_head = bool(ids) and isinstance(ids[0], list)
        for h, codes in enumerate(ids if per_head else [ids]):
            out.append(f"L{layer}{f'h{h}' if per_head else ''}:{','.join(str(c) for c in codes)}")
    return " ".join(out)


def print_paper_rule(per_topic, args) -> None:
    thresholds = "/".join(f"{t:g}" for t in args.min_active)
    print(
        f"\nThe paper's window-level rule on half A (windows of {args.window} tokens; topical = {args.min_matches}+ "
        f"matches, elsewhere = none; passes = active on >= {thresholds} of a topical window's tokens on average, "
        f"<= {args.max_elsewhere:g} elsewhere); steered = each head's best candidate forced"
    )
    print(f"{'topic':<10} {'topical':>7} {'pass':>9} {'unsteered':>9} {'steered':>8} {'readable':>8} {'slots':>8}")
    for topic, e in per_topic.items():
        r = e["paper_rule"]
        passes = "/".join(str(r["n_pass"][str(t)]) for t in args.min_active)
        s = r["steered"]
        rates = f"{s['rate']:>8.0%} {s['rate_readable']:>8.0%} {r['kind'] + ' x' + str(r['n_slots']):>8}" if s else ""
        print(f"{topic:<10} {r['windows']['topical']:>7} {passes:>9} {e['unsteered']['rate']:>9.0%} {rates}")


def print_sources(sources, headline) -> None:
    acc = sources["classifier"]["heldout_accuracy"]
    per = ", ".join(f"{k} {v:.2f}" for k, v in acc["per_label"].items())
    print(
        f"\nSource steering: share of samples the source classifier reads as the source (n = "
        f"{headline['samples_per_condition']} per condition). Classifier accuracy on held-out windows of "
        f"{acc['n_words']} words: {acc['overall']:.3f} (macro {acc['macro']:.3f}; {per})"
    )
    head = (
        f"{'source':<10} {'windows':>7} {'pass':>7} {'unsteered':>9} {'prompted':>8} {'steered':>8} {'readable':>8} "
        f"{'slots':>12}  codes"
    )
    print(head)
    print("-" * len(head))
    for source, e in sources["per_source"].items():
        passes = "/".join(str(v) for v in e["n_pass"].values())
        s = e["steered"]
        rates = f"{s['rate']:>8.0%} {s['rate_readable']:>8.0%} {e['kind'] + ' x' + str(e['n_slots']):>12}" if s else ""
        codes = _codes_text(e["forced"]) if s else "(no codes)"
        print(
            f"{source:<10} {e['windows']:>7} {passes:>7} {e['unsteered']['rate']:>9.0%} {e['prompted']['rate']:>8.0%} "
            f"{rates}  {codes}"
        )
    print(
        "prompted = continuations of 16 tokens of the source's own half-A text (the ceiling: what the model writes "
        "with the source in its context); steered samples read as: "
        + "; ".join(
            f"{src} -> {', '.join(f'{k} {v}' for k, v in sorted(e['labels_of_steered'].items()))}"
            for src, e in sources["per_source"].items()
            if e.get("labels_of_steered")
        )
    )
    print(
        f"Target: readable >= {SOURCE_TARGET['readable_at_least']:.0%} on >= {SOURCE_TARGET['sources']} sources: "
        f"{len(sources['sources_meeting_target'])} met ({', '.join(sources['sources_meeting_target'])})"
    )


def print_topic(topic, entry, steer) -> None:
    s = entry["steered"]
    print(
        f"\n== {topic}: unsteered {entry['unsteered']['rate']:.0%} -> steered {s['rate']:.0%}, readable "
        f"{s['rate_readable']:.0%} ({s['repetitive_share']:.0%} repetitive, {s['high_loss_share']:.0%} above the loss "
        f"cap); codes of the {entry['target']!r} tokens in {entry['n_slots']} slot(s) of "
        f"{len(entry['steered_codebooks'])} codebook(s); dev sweep (readable rate) "
        + ", ".join(f"{n}: {v['rate_readable']:.0%}" for n, v in entry["dev_sweep"].items())
    )
    for text, mention, readable in list(zip(steer["texts"], steer["mention"], steer["readable"]))[:3]:
        print(f"   [{'x' if mention else ' '}{'' if readable else ' unreadable'}] {text[:160]!r}")


def print_table(per_topic, headline, base_label) -> None:
    print(
        f"\nShare of samples mentioning the topic (n = {headline['samples_per_condition']} per condition); "
        f"steered = the topic code of every head in n_slots of k={sorted(set(headline['k'].values()))} slots; codes "
        f"(of the topic 'word' or the token 'before_word') and n_slots ({headline['strengths_tried']}) chosen per "
        f"topic on dev seeds; loss = {base_label}, nats per new token"
    )
    head = (
        f"{'topic':<10} {'unsteered':>9} {'prompted':>8} {'steered':>8} {'readable':>8} {'repet.':>7} {'>cap':>5} "
        f"{'codes':>18} "
        f"{'loss un':>8} {'loss st':>8}  target"
    )
    print(head)
    print("-" * len(head))
    for topic, e in per_topic.items():
        s = e.get("steered")
        if s is None:
            print(f"{topic:<10} {e['unsteered']['rate']:>9.0%} {e['prompted']['rate']:>8.0%}  (no topic code)")
            continue
        print(
            f"{topic:<10} {e['unsteered']['rate']:>9.0%} {e['prompted']['rate']:>8.0%} {s['rate']:>8.0%} "
            f"{s['rate_readable']:>8.0%} "
            f"{s['repetitive_share']:>7.0%} {s['high_loss_share']:>5.0%} {e['target'] + ' x' + str(e['n_slots']):>18} "
            f"{e['unsteered']['baseline_loss']:>8.2f} {s['baseline_loss']:>8.2f}  {'met' if e['met'] else '-'}"
        )
    print("-" * len(head))
    print(
        f"unsteered samples: {headline['unsteered_repetitive_share']:.0%} repetitive; loss cap (95th percentile of "
        f"their per-sample loss) {headline['loss_cap']:.2f}"
    )
    print(
        "prompted = the same number of samples continuing a topic sentence (TOPIC_PROMPTS; the prompt itself is not "
        "counted): what the model does with the topic in its context"
    )
    print(
        "readable = mentions in samples that are not one word repeated and whose baseline loss is within the cap "
        f"(the headline rate). Target: unsteered < 10% and readable >= 60% on >= 5 topics: "
        f"{headline['n_meeting_target']} met ({', '.join(headline['topics_meeting_target'])})"
    )


def steering_figure(per_topic, title):
    import plotly.graph_objects as go

    topics = [t for t, e in per_topic.items() if e.get("steered")]
    fig = go.Figure()
    fig.add_bar(name="unsteered", x=topics, y=[per_topic[t]["unsteered"]["rate"] for t in topics])
    fig.add_bar(name="topic sentence as prompt", x=topics, y=[per_topic[t]["prompted"]["rate"] for t in topics])
    fig.add_bar(
        name="steered (readable samples only)",
        x=topics,
        y=[per_topic[t]["steered"]["rate_readable"] for t in topics],
        text=[f"loss {per_topic[t]['steered']['baseline_loss']:.2f}" for t in topics],
    )
    fig.update_layout(
        title=title, barmode="group", yaxis_title="share of samples mentioning the topic", yaxis_range=[0, 1.05]
    )
    return fig


if __name__ == "__main__":
    main()
