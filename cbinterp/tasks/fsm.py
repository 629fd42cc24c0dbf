"""The TokFSM task: sequences from a random finite state machine, each state written as base-`base` digits."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from cbinterp.core import tl_compat as tc
from cbinterp.core.storage.atomic import atomic_file

__all__ = [
    "FSM",
    "FSMBatch",
    "sample_from_model",
    "sampled_state_accuracy",
    "score_sampled_sequences",
    "teacher_forced_transition_accuracy",
]


@dataclasses.dataclass(frozen=True)
class FSMBatch:
    """Token sequences with, at every position, what the machine was doing there (-1 where not applicable)."""

    tokens: Int[Tensor, "batch pos"]
    state_at: Int[Tensor, "batch pos"]  # the state whose last digit is read here
    state_in_progress: Int[Tensor, "batch pos"]  # the state whose digits are being read here
    digit_index: Int[Tensor, "batch pos"]  # which digit of that state sits here
    prev_state: Int[Tensor, "batch pos"]  # the last complete state before this position


class FSM:
    """A random finite state machine with uniform transitions over `n_edges` distinct successors per state.

    Tokens 0..base-1 are digits, token `base` is BOS; a state s is written as its `digits` base-`base` digits,
    most significant first.
    """

    def __init__(self, n_states: int, n_edges: int, base: int, seed: int, successors: np.ndarray):
        successors = np.asarray(successors, dtype=np.int64)
        if successors.shape != (n_states, n_edges):
            raise ValueError(
                f"successors must have shape (n_states={n_states}, n_edges={n_edges}), got {successors.shape}."
            )
        if successors.min() < 0 or successors.max() >= n_states:
            raise ValueError("successors holds a state id outside [0, n_states).")
        self.n_states, self.n_edges, self.base, self.seed = n_states, n_edges, base, seed
        self.successors = successors
        self.digits = max(1, math.ceil(math.log(n_states, base) - 1e-9))
        self.bos = base
        self.vocab_size = base + 1
        self._succ_mask = np.zeros((n_states, n_states), dtype=bool)
        np.put_along_axis(self._succ_mask, successors, True, axis=1)

    @classmethod
    def random(cls, n_states: int = 100, n_edges: int = 10, base: int = 10, seed: int = 0) -> FSM:
        """A machine whose every state has `n_edges` distinct successors drawn uniformly (self-loops allowed)."""
        if n_states < 1 or base < 2:
            raise ValueError(f"Need n_states >= 1 and base >= 2, got n_states={n_states}, base={base}.")
        if not 1 <= n_edges <= n_states:
            raise ValueError(f"n_edges must be in [1, n_states={n_states}], got {n_edges}.")
        rng = np.random.default_rng(seed)
        successors = np.argsort(rng.random((n_states, n_states)), axis=1)[:, :n_edges]
        return cls(n_states, n_edges, base, seed, np.sort(successors, axis=1))

    # -- persistence -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The machine as plain JSON-ready data (`from_dict` reads it back)."""
        return {
            "n_states": self.n_states,
            "n_edges": self.n_edges,
            "base": self.base,
            "seed": self.seed,
            "successors": self.successors.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> FSM:
        """The machine that `to_dict` wrote; missing keys are refused by name."""
        missing = {"n_states", "n_edges", "base", "seed", "successors"} - set(data)
        if missing:
            raise ValueError(f"FSM JSON lacks the keys {sorted(missing)}.")
        return cls(data["n_states"], data["n_edges"], data["base"], data["seed"], np.array(data["successors"]))

    def save(self, path: str | os.PathLike) -> None:
        """Write the machine to `path` as JSON (atomically)."""
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FSM:
        """The machine that `save` wrote to `path`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    # -- tokens ------------------------------------------------------------------------------------------
    def state_digits(self, states: np.ndarray | Tensor) -> np.ndarray:
        """Digits of each state, most significant first: shape `states.shape + (digits,)`."""
        states = np.asarray(states)
        powers = self.base ** np.arange(self.digits - 1, -1, -1)
        return (states[..., None] // powers) % self.base

    def encode(self, walks: np.ndarray) -> Tensor:
        """Token sequences of walks `(batch, n_states)`: BOS, then each state's digits."""
        walks = np.asarray(walks)
        body = self.state_digits(walks).reshape(len(walks), -1)
        return torch.as_tensor(np.concatenate([np.full((len(walks), 1), self.bos), body], axis=1), dtype=torch.long)

    def decode_states(self, digits: np.ndarray | Tensor) -> np.ndarray:
        """State ids of digit groups `(..., digits)` (most significant first).

        -1 where a token is not a digit or the number is not a state."""
        digits = np.asarray(digits)
        is_digit = ((digits >= 0) & (digits < self.base)).all(-1)
        ids = (np.clip(digits, 0, self.base - 1) * self.base ** np.arange(self.digits - 1, -1, -1)).sum(-1)
        return np.where(is_digit & (ids < self.n_states), ids, -1)

    def is_successor(self, state: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """Whether `nxt` is a valid successor of `state` (elementwise; out-of-range ids count as invalid)."""
        state, nxt = np.asarray(state), np.asarray(nxt)
        ok = (nxt >= 0) & (nxt < self.n_states) & (state >= 0) & (state < self.n_states)
        return ok & self._succ_mask[np.clip(state, 0, self.n_states - 1), np.clip(nxt, 0, self.n_states - 1)]

    def sample_states(self, batch: int, n_steps: int, rng: np.random.Generator) -> np.ndarray:
        """Random walks `(batch, n_steps)` from uniformly drawn start states."""
        states = np.empty((batch, n_steps), dtype=np.int64)
        states[:, 0] = rng.integers(0, self.n_states, batch)
        edges = rng.integers(0, self.n_edges, (batch, n_steps))
        for t in range(1, n_steps):  # a Markov chain: vectorised over the batch, sequential in time
            states[:, t] = self.successors[states[:, t - 1], edges[:, t]]
        return states

    def sample(self, batch: int, seq_len: int, seed: int | np.random.Generator = 0) -> FSMBatch:
        """`batch` sequences of `seq_len` tokens: BOS, then a random walk's states digit by digit.

        The last state may be cut off."""
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (BOS and one digit), got {seq_len}.")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        n_steps = math.ceil((seq_len - 1) / self.digits)
        states = self.sample_states(batch, n_steps, rng)
        body = self.state_digits(states).reshape(batch, -1)[:, : seq_len - 1]
        tokens = np.concatenate([np.full((batch, 1), self.bos), body], axis=1)
        pos = np.arange(seq_len - 1)
        digit_index = np.concatenate([[-1], pos % self.digits])
        step = pos // self.digits
        in_progress = np.concatenate([np.full((batch, 1), -1), states[:, step]], axis=1)
        is_last = digit_index == self.digits - 1
        state_at = np.where(is_last[None], in_progress, -1)
        prev_step = np.concatenate([[-1], step - 1])
        prev = np.where(prev_step[None] >= 0, states[:, np.clip(prev_step, 0, None)], -1)
        prev_state = np.where(is_last[None], in_progress, prev)
        as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long)
        return FSMBatch(
            as_t(tokens),
            as_t(state_at),
            as_t(in_progress),
            as_t(np.broadcast_to(digit_index, tokens.shape)),
            as_t(prev_state),
        )

    def token_batches(self, batch: int, seq_len: int, seed: int = 0):
        """A step-indexed batch function for `cbinterp.train`: `fn(step)` gives the same tokens for the same step."""

        def batch_at(step: int) -> Tensor:
            return self.sample(batch, seq_len, np.random.default_rng([seed, step])).tokens

        return batch_at

    # -- features ----------------------------------------------------------------------------------------
    @property
    def prefix_width(self) -> int:
        """Number of distinct partial states (the first 1..digits-1 digits of a state): base for two digits."""
        return sum(self.base**j for j in range(1, self.digits))

    def _prefix_ids(self, data: FSMBatch) -> tuple[Tensor, Tensor]:
        """(inside, prefix): where a state is being read but not yet complete, and which digits were read so far.

        Prefixes are numbered 0..prefix_width-1 (one-digit prefixes first, then two-digit ones, ...)."""
        inside = (data.digit_index >= 0) & (data.digit_index < self.digits - 1)
        digits = torch.as_tensor(self.state_digits(data.state_in_progress.clamp_min(0).numpy()))
        value = torch.zeros_like(data.tokens)
        offset = torch.zeros_like(data.tokens)
        for j in range(self.digits - 1):
            read = data.digit_index >= j
            value = torch.where(read, value * self.base + digits[..., j], value)
            if j:
                offset = torch.where(read, offset + self.base**j, offset)
        return inside, offset + value

    def state_plus_digit(self, data: FSMBatch) -> Int[Tensor, "batch pos"]:
        """Feature id of "state s, then the next state's digits so far" inside the next state, else -1.

        Inside means all but the next state's last digit. For two-digit states the id is `s * base + first digit`."""
        inside, prefix = self._prefix_ids(data)
        return torch.where(inside & (data.prev_state >= 0), data.prev_state * self.prefix_width + prefix, -1)

    def n_features(self) -> int:
        """Number of features in `feature_labels`."""
        return self.n_states + (self.n_states + 1) * self.prefix_width

    def feature_labels(self, data: FSMBatch) -> Int[Tensor, "batch pos"]:
        """One feature id per position (-1 for none, i.e. BOS), the paper's FSM features in one label space.

        Ids `0..n_states-1`: "state s", true where the last digit of s is read. Then
        `n_states + s * prefix_width + prefix`: "state s followed by digits p", true inside the next state
        (`state_plus_digit`); the first state of a sequence, which follows no state, counts as following a
        pseudo-state `s = n_states`, "start".
        """
        inside, prefix = self._prefix_ids(data)
        source = torch.where(data.prev_state >= 0, data.prev_state, self.n_states)
        following = self.n_states + source * self.prefix_width + prefix
        return torch.where(data.state_at >= 0, data.state_at, torch.where(inside, following, -1))

    def feature_names(self) -> list[str]:
        """Readable names of the `feature_labels` ids.

        "state 42", "state 42 > 7" (the next state begins with 7) and "start > 7" (the first state begins with 7)."""
        sep = "" if self.base <= 10 else ","
        prefixes = [
            sep.join(map(str, p))
            for length in range(1, self.digits)
            for p in itertools.product(range(self.base), repeat=length)
        ]
        sources = [f"state {s}" for s in range(self.n_states)] + ["start"]
        return [f"state {s}" for s in range(self.n_states)] + [f"{src} > {p}" for src in sources for p in prefixes]

    # -- the best possible loss ---------------------------------------------------------------------------
    def optimal_loss(self, data: FSMBatch) -> float:
        """Cross-entropy (nats/token) of the Bayes-optimal predictor that knows the machine, on `data`.

        On `data`'s next-token targets, the same positions `HookedTransformer(..., return_type="loss")` averages."""
        ent = self._next_token_entropy(data)
        return float(ent[:, :-1].mean())

    def _next_token_entropy(self, data: FSMBatch) -> np.ndarray:
        """Entropy of the next token at every position, given the true history."""
        d, base = self.digits, self.base
        # table[j][source + 1, prefix]: entropy of digit j of the next state, given its first j digits
        # (as a number) and the state it leaves (-1: the start, drawn uniformly).
        candidates = [self.state_digits(np.arange(self.n_states))] + list(self.state_digits(self.successors))
        table = [np.zeros((self.n_states + 1, base**j)) for j in range(d)]
        for src, cands in enumerate(candidates):
            for j in range(d):
                prefixes = (cands[:, :j] * base ** np.arange(j - 1, -1, -1)).sum(1) if j else np.zeros(len(cands), int)
                for prefix in np.unique(prefixes):
                    probs = np.bincount(cands[prefixes == prefix, j], minlength=base) / (prefixes == prefix).sum()
                    probs = probs[probs > 0]
                    table[j][src, prefix] = -(probs * np.log(probs)).sum()
        di, prev = data.digit_index.numpy(), data.prev_state.numpy()
        n_known = np.where((di == d - 1) | (di == -1), 0, di + 1)
        digits = self.state_digits(np.clip(data.state_in_progress.numpy(), 0, None))
        ent = np.zeros(di.shape)
        for j in range(d):
            prefix = (digits[..., :j] * base ** np.arange(j - 1, -1, -1)).sum(-1) if j else np.zeros(di.shape, int)
            ent = np.where(n_known == j, table[j][prev + 1, prefix], ent)
        return ent


@torch.no_grad()
def sample_from_model(
    model,
    n_sequences: int,
    seq_len: int,
    bos: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 500,
) -> tuple[Int[Tensor, "rows pos"], Float[Tensor, "rows pos-1 vocab"]]:
    """Sequences sampled from `model`, starting from BOS, to `seq_len` tokens, at `temperature`.

    Returns the tokens `(n, seq_len)` (BOS first) and, for each position but the last, the distribution the next
    token was drawn from `(n, seq_len - 1, vocab)`. A HookedTransformer runs with its key-value cache (one new
    position per step); any other callable `model(tokens) -> logits` is run on the whole prefix each step.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (sampling), got {temperature}.")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}.")
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    all_tokens, all_probs = [], []
    for start in range(0, n_sequences, batch_size):
        n = min(batch_size, n_sequences - start)
        tokens = torch.full((n, 1), bos, dtype=torch.long, device=device)
        # A bridge (or any other callable model) runs whole prefixes: its key-value cache is not this one.
        cached = tc.HAS_HOOKED and isinstance(model, tc.HookedTransformer)
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, device, n) if cached else None
        step = lambda new, kv=kv: model(new, past_kv_cache=kv, attention_mask=torch.ones_like(new))  # no padding
        logits = step(tokens) if cached else model(tokens)
        probs_seq = []
        for t in range(seq_len - 1):
            probs = (logits[:, -1].float() / temperature).softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
            probs_seq.append(probs.cpu())
            tokens = torch.cat([tokens, nxt], dim=1)
            if t < seq_len - 2:
                logits = step(nxt) if cached else model(tokens)
        all_tokens.append(tokens.cpu())
        all_probs.append(torch.stack(probs_seq, dim=1))
    return torch.cat(all_tokens), torch.cat(all_probs)


def score_sampled_sequences(fsm: FSM, tokens: Tensor, probs: Tensor | None = None) -> dict:
    """The paper's state accuracy of sequences a model wrote itself (BOS, then states digit by digit).

    The body after BOS is read as consecutive states of `fsm.digits` tokens (a trailing partial state is dropped);
    a group holding a non-digit token or an id >= n_states is no state. Returns:

    * `state_accuracy`: the share of transitions (consecutive groups) that are valid edges of the machine; a
      transition from or to a group that is no state counts as invalid;
    * `valid_state_share`: the share of groups that are states;
    * `valid_next_state_mass` (with `probs`, the sampling distributions from `sample_from_model`): the mean
      probability the model gives to valid next states at each transition whose source is a state. With the
      earlier digits of the next state as sampled, it is the last digit's mass on digits that complete a
      successor: an unbiased estimate of the whole next state's valid mass, because the earlier digits were
      drawn from the same distribution (exact for one-digit states);
    * `n_transitions`, `n_sequences`.
    """
    d, base = fsm.digits, fsm.base
    body = tokens[:, 1:]
    n_groups = body.shape[1] // d
    if n_groups < 2:
        raise ValueError(f"Sequences of {tokens.shape[1]} tokens hold fewer than two states of {d} digits.")
    groups = body[:, : n_groups * d].reshape(len(tokens), n_groups, d).numpy()
    ids = fsm.decode_states(groups)
    valid = fsm.is_successor(ids[:, :-1], ids[:, 1:])
    out = {
        "state_accuracy": float(valid.mean()),
        "valid_state_share": float((ids >= 0).mean()),
        "n_transitions": int(valid.size),
        "n_sequences": int(len(tokens)),
    }
    if probs is not None:
        # probs[:, j] is the distribution of token j + 1, i.e. of body position j; the next state of transition i
        # (group i + 1) ends at body position (i + 1) * d + d - 1.
        src = ids[:, :-1]
        last = np.arange(n_groups - 1) * d + 2 * d - 1  # probs index of each next state's last digit
        p_last = probs[:, last, :base].numpy()  # (n, transitions, base)
        prefix = groups[:, 1:, : d - 1]  # the next state's earlier digits, as sampled
        prefix_ok = (prefix < base).all(-1)
        prefix_val = (np.clip(prefix, 0, base - 1) * base ** np.arange(d - 2, -1, -1)).sum(-1)  # 0 for one digit
        candidates = prefix_val[..., None] * base + np.arange(base)  # (n, transitions, base) state ids
        ok = fsm.is_successor(np.broadcast_to(src[..., None], candidates.shape), candidates)
        ok &= prefix_ok[..., None] & (candidates < fsm.n_states)
        mass = (p_last * ok).sum(-1)
        out["valid_next_state_mass"] = float(mass[src >= 0].mean()) if (src >= 0).any() else 0.0
    return out


@torch.no_grad()
def sampled_state_accuracy(
    model,
    fsm: FSM,
    n_sequences: int = 500,
    seq_len: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 500,
) -> dict:
    """The paper's state accuracy, on `n_sequences` sampled from BOS at `temperature`.

    Sampled to `seq_len` tokens (default: the model's context) and scored by `score_sampled_sequences` (share of
    valid transitions, valid next-state mass)."""
    seq_len = seq_len or model.cfg.n_ctx
    tokens, probs = sample_from_model(model, n_sequences, seq_len, fsm.bos, temperature, seed, batch_size)
    return score_sampled_sequences(fsm, tokens, probs) | {"seq_len": seq_len, "temperature": temperature}


@torch.no_grad()
def teacher_forced_transition_accuracy(
    model,
    fsm: FSM,
    n_sequences: int = 256,
    seq_len: int = 64,
    cut_states: Sequence[int] | None = None,
    seed: int = 12345,
    batch_size: int = 256,
) -> dict:
    """Teacher-forced: how often the greedily decoded next state after a true walk is a valid successor.

    The next state is decoded digit by digit after a walk from the data. Not the paper's state accuracy
    (`sampled_state_accuracy`); every prefix is true data.

    Prefixes end right after a complete state; `cut_states` says after how many states (default: every
    count that fits in `seq_len`). Returns the overall rate, the first-transition rate (after one state)
    and the rate per cut.
    """
    device = next(model.parameters()).device
    max_states = (seq_len - 1) // fsm.digits - 1
    cuts = list(cut_states) if cut_states is not None else list(range(1, max_states + 1))
    data = fsm.sample(n_sequences, 1 + (max(cuts) + 1) * fsm.digits, seed)
    per_cut = {}
    for cut in cuts:
        end = 1 + cut * fsm.digits
        correct = []
        for start in range(0, n_sequences, batch_size):
            prefix = data.tokens[start : start + batch_size, :end].to(device)
            for _ in range(fsm.digits):
                next_digit = model(prefix)[:, -1, : fsm.base].argmax(-1, keepdim=True)
                prefix = torch.cat([prefix, next_digit], dim=1)
            guess = prefix[:, end:].cpu().numpy()
            predicted = (guess * fsm.base ** np.arange(fsm.digits - 1, -1, -1)).sum(-1)
            current = data.state_at[start : start + batch_size, end - 1].numpy()
            correct.append(fsm.is_successor(current, predicted))
        per_cut[cut] = float(np.concatenate(correct).mean())
    return {
        "transition_accuracy": float(np.mean(list(per_cut.values()))),
        "first_transition_accuracy": per_cut.get(1, float("nan")) if 1 in per_cut else None,
        "per_cut": per_cut,
    }
