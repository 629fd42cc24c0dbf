"""The TokFSM task: random machines, sampling and its per-position annotations, feature labels, the Bayes-optimal
loss and transition accuracy, each checked against a brute-force Python reconstruction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cbinterp.tasks.fsm import (
    FSM,
    sample_from_model,
    sampled_state_accuracy,
    score_sampled_sequences,
)
from cbinterp.tasks.fsm import teacher_forced_transition_accuracy as transition_accuracy

PROPERTY = settings(max_examples=15, deadline=None)

# (n_states, n_edges, base, digits per state): one digit, two digits (base 4 and base 10), three digits
MACHINES = [(7, 3, 10, 1), (12, 3, 4, 2), (100, 10, 10, 2), (20, 3, 3, 3)]


pytestmark = pytest.mark.usefixtures("one_thread")


def decode(fsm: FSM, digits) -> int:
    value = 0
    for d in digits:
        value = value * fsm.base + int(d)
    return value


def encode(fsm: FSM, state: int) -> list[int]:
    out = []
    for _ in range(fsm.digits):
        out.append(state % fsm.base)
        state //= fsm.base
    return out[::-1]


def reference(fsm: FSM, row: list[int]) -> dict:
    """Per-token reconstruction from the tokens alone. `state_in_progress` is None inside a state cut off at the end
    (its digits are not all there); `partial` holds the digits of the current state read so far (inclusive)."""
    d, n = fsm.digits, len(row)
    out = {k: [-1] * n for k in ("state_at", "state_in_progress", "digit_index", "prev_state")}
    out["partial"] = [()] * n
    last_complete = -1
    for p in range(1, n):
        i = (p - 1) % d
        start = p - i
        group = row[start : start + d]
        out["digit_index"][p] = i
        out["partial"][p] = tuple(row[start : p + 1])
        out["state_in_progress"][p] = decode(fsm, group) if len(group) == d else None
        if i == d - 1:
            last_complete = decode(fsm, group)
            out["state_at"][p] = last_complete
        out["prev_state"][p] = last_complete
    return out


# -- FSM.random -----------------------------------------------------------------------------------------------
@PROPERTY
@given(st.data())
def test_random_machine_shape(data):
    n_states = data.draw(st.integers(1, 30))
    n_edges = data.draw(st.integers(1, n_states))
    base = data.draw(st.integers(2, 12))
    seed = data.draw(st.integers(0, 10**6))
    fsm = FSM.random(n_states, n_edges, base, seed)
    assert fsm.successors.shape == (n_states, n_edges)
    for row in fsm.successors:
        assert len(set(row.tolist())) == n_edges
        assert all(0 <= s < n_states for s in row)
    assert fsm.base**fsm.digits >= n_states
    assert fsm.digits == 1 or fsm.base ** (fsm.digits - 1) < n_states  # the fewest digits that fit every state
    assert fsm.bos == base and fsm.vocab_size == base + 1
    twin = FSM.random(n_states, n_edges, base, seed)
    assert np.array_equal(twin.successors, fsm.successors)


def test_random_seed_changes_machine():
    a, b = FSM.random(50, 5, 10, seed=0), FSM.random(50, 5, 10, seed=1)
    assert not np.array_equal(a.successors, b.successors)
    assert np.array_equal(a.successors, FSM.random(50, 5, 10, seed=0).successors)


@pytest.mark.parametrize(
    "args", [dict(n_states=5, n_edges=6), dict(n_states=5, n_edges=0), dict(base=1), dict(n_states=0, n_edges=1)]
)
def test_random_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        FSM.random(**{**dict(n_states=10, n_edges=2, base=10), **args})


def successor_table(fsm, states, nxt):
    n = fsm.n_states
    return [0 <= s < n and 0 <= t < n and t in fsm.successors[s] for s, t in zip(states, nxt)]


def test_is_successor_matches_table():
    fsm = FSM.random(12, 3, 4, seed=5)
    states = np.repeat(np.arange(-1, 12), 15)
    nxt = np.tile(np.arange(-2, 13), 13)
    assert fsm.is_successor(states, nxt).tolist() == successor_table(fsm, states, nxt)
    assert fsm.is_successor(np.array([[0, 1], [2, 3]]), fsm.successors[[0, 1, 2, 3], [0] * 4].reshape(2, 2)).all()


def test_is_successor_out_of_range_state():
    fsm = FSM.random(12, 3, 4, seed=5)
    states, nxt = np.array([12, 40, 3]), np.array([0, 1, fsm.successors[3, 0]])
    assert fsm.is_successor(states, nxt).tolist() == [False, False, True]


def test_constructor_validates_successors():
    with pytest.raises(ValueError, match="shape"):
        FSM(4, 2, 10, 0, np.zeros((4, 3), dtype=int))
    with pytest.raises(ValueError, match="outside"):
        FSM(4, 1, 10, 0, np.array([[0], [1], [2], [4]]))


# -- persistence ----------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    fsm = FSM.random(20, 3, 3, seed=7)
    path = tmp_path / "sub" / "fsm.json"
    fsm.save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"n_states", "n_edges", "base", "seed", "successors"}
    assert data["successors"] == fsm.successors.tolist() and data["seed"] == 7
    loaded = FSM.load(path)
    assert (loaded.n_states, loaded.n_edges, loaded.base, loaded.seed, loaded.digits) == (20, 3, 3, 7, 3)
    assert np.array_equal(loaded.successors, fsm.successors)
    assert torch.equal(loaded.sample(4, 12, 3).tokens, fsm.sample(4, 12, 3).tokens)
    assert [p.name for p in path.parent.iterdir()] == ["fsm.json"]  # no temporary left behind


def test_load_missing_keys(tmp_path):
    path = tmp_path / "fsm.json"
    data = FSM.random(5, 2, 10).to_dict()
    del data["successors"], data["base"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\['base', 'successors'\]"):
        FSM.load(path)


# -- sampling -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_states,n_edges,base,digits", MACHINES)
@pytest.mark.parametrize("seq_len", [2, 14, 16])
def test_sample_matches_brute_force(n_states, n_edges, base, digits, seq_len):
    """Tokens form a valid walk and every annotation agrees with a token-by-token reconstruction."""
    fsm = FSM.random(n_states, n_edges, base, seed=3)
    assert fsm.digits == digits
    data = fsm.sample(6, seq_len, seed=11)
    for field in ("tokens", "state_at", "state_in_progress", "digit_index", "prev_state"):
        tensor = getattr(data, field)
        assert tensor.shape == (6, seq_len) and tensor.dtype == torch.long, field
    assert (data.tokens[:, 0] == base).all()
    assert ((data.tokens[:, 1:] >= 0) & (data.tokens[:, 1:] < base)).all()
    for b in range(6):
        row = data.tokens[b].tolist()
        ref = reference(fsm, row)
        for field in ("state_at", "digit_index", "prev_state"):
            assert getattr(data, field)[b].tolist() == ref[field], (field, row)
        complete = [s for s in ref["state_at"] if s >= 0]
        assert all(0 <= s < n_states for s in complete)
        assert all(fsm.is_successor(a, c) for a, c in zip(complete, complete[1:])), row
        for p in range(seq_len):
            got = int(data.state_in_progress[b, p])
            want = ref["state_in_progress"][p]
            if want is not None:
                assert got == want, (p, row)
            else:  # a state cut off by the end of the sequence: its digits so far, and a valid step of the walk
                assert tuple(encode(fsm, got)[: len(ref["partial"][p])]) == ref["partial"][p]
                prev = ref["prev_state"][p]
                assert fsm.is_successor(prev, got) if prev >= 0 else 0 <= got < n_states


def test_sample_seeding():
    fsm = FSM.random(12, 3, 4, seed=0)
    a, b, c = fsm.sample(8, 16, seed=5), fsm.sample(8, 16, seed=5), fsm.sample(8, 16, seed=6)
    for field in ("tokens", "state_at", "state_in_progress", "digit_index", "prev_state"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.tokens, c.tokens)
    assert torch.equal(fsm.sample(8, 16, np.random.default_rng(5)).tokens, a.tokens)


def test_sample_covers_start_states_and_edges():
    """Start states are drawn from every state and walks use every edge (not, say, only the first successor)."""
    fsm = FSM.random(5, 3, 10, seed=2)
    data = fsm.sample(400, 8, seed=0)
    starts = set(data.state_at[:, 1].tolist())
    assert starts == set(range(5))
    pairs = {(int(a), int(b)) for row in data.state_at[:, 1:] for a, b in zip(row[:-1], row[1:])}
    assert pairs == {(s, int(t)) for s in range(5) for t in fsm.successors[s]}


def test_token_batches():
    fsm = FSM.random(12, 3, 4, seed=0)
    batches = fsm.token_batches(5, 9, seed=1)
    first = batches(3)
    assert first.shape == (5, 9) and first.dtype == torch.long and (first[:, 0] == fsm.bos).all()
    assert torch.equal(batches(3), first)
    assert torch.equal(fsm.token_batches(5, 9, seed=1)(3), first)
    assert not torch.equal(batches(4), first)
    assert not torch.equal(fsm.token_batches(5, 9, seed=2)(3), first)


# -- feature labels -------------------------------------------------------------------------------------------
def spell(fsm: FSM, digits) -> str:
    return ("" if fsm.base <= 10 else ",").join(map(str, digits))


@pytest.mark.parametrize("n_states,n_edges,base,digits", MACHINES + [(150, 4, 12, 3)])
def test_feature_labels(n_states, n_edges, base, digits):
    """Each position's label names the state just completed, or the previous state (or "start") and the digits of
    the next state read so far; one label per such situation."""
    fsm = FSM.random(n_states, n_edges, base, seed=4)
    assert fsm.digits == digits
    data = fsm.sample(10, 15, seed=2)
    labels = fsm.feature_labels(data)
    names = fsm.feature_names()
    assert len(names) == fsm.n_features() and len(set(names)) == len(names)
    assert names[5] == "state 5" and names[n_states - 1] == f"state {n_states - 1}"
    assert labels.shape == data.tokens.shape and (labels < fsm.n_features()).all()
    assert (labels[:, 0] == -1).all() and (labels[:, 1:] >= 0).all()
    meaning: dict[int, set] = {}
    for b in range(10):
        ref = reference(fsm, data.tokens[b].tolist())
        for p in range(1, 15):
            label = int(labels[b, p])
            i, prev = ref["digit_index"][p], ref["prev_state"][p]
            if i == digits - 1:
                assert label == ref["state_at"][p]
                continue
            source = f"state {prev}" if prev >= 0 else "start"
            assert names[label] == f"{source} > {spell(fsm, ref['partial'][p])}", (b, p)
            meaning.setdefault(label, set()).add((prev, ref["partial"][p]))
            if digits == 2:  # the paper's layout: n_states + source * base + first digit, "start" = n_states
                source_id = prev if prev >= 0 else n_states
                assert label == n_states + source_id * base + int(data.tokens[b, p])
    assert all(len(v) == 1 for v in meaning.values()), meaning
    if digits > 1:
        assert any(prev >= 0 for v in meaning.values() for prev, _ in v)  # the test saw state+digit labels
    spd = fsm.state_plus_digit(data)
    has_prev = spd >= 0
    assert torch.equal(has_prev, (labels >= n_states) & (data.prev_state >= 0))
    assert torch.equal(spd[has_prev] + n_states, labels[has_prev])


def test_feature_labels_three_digit_prefixes_differ():
    """With 3-digit states, "state s > 0" (one digit read) and "state s > 00" (two read) are different labels."""
    fsm = FSM(20, 2, 3, 0, np.array([[0, 4]] * 20))  # every state goes to 0 = '000' or 4 = '011'
    data = fsm.sample(8, 16, seed=0)
    labels, names = fsm.feature_labels(data), fsm.feature_names()
    at = {}
    for b in range(8):
        ref = reference(fsm, data.tokens[b].tolist())
        for p in range(4, 16):  # after the first state
            if ref["digit_index"][p] < 2:
                at[ref["partial"][p]] = names[int(labels[b, p])].split(" > ")[1]
    assert at == {(0,): "0", (0, 0): "00", (0, 1): "01"}


def test_feature_labels_one_digit_are_states():
    fsm = FSM.random(7, 3, 10, seed=0)
    data = fsm.sample(5, 10, seed=0)
    assert torch.equal(fsm.feature_labels(data), data.state_at)
    assert fsm.feature_names() == [f"state {s}" for s in range(7)] and fsm.n_features() == 7


# -- optimal loss ---------------------------------------------------------------------------------------------
def brute_force_optimal_loss(fsm: FSM, data) -> float:
    """Mean over positions 0..seq_len-2 of the entropy of the next token, enumerating the states it may belong to."""
    total, count = 0.0, 0
    for row in data.tokens.tolist():
        ref = reference(fsm, row)
        for p in range(len(row) - 1):
            nxt = p + 1
            i = (nxt - 1) % fsm.digits  # which digit of its state the next token is
            seen = tuple(row[nxt - i : nxt])  # the digits of that state already read
            prev = ref["prev_state"][p] if p > 0 else -1
            pool = range(fsm.n_states) if prev < 0 else fsm.successors[prev].tolist()
            cands = [encode(fsm, s) for s in pool]
            nexts = [c[i] for c in cands if tuple(c[:i]) == seen]
            counts = np.bincount(nexts, minlength=fsm.base)
            probs = counts[counts > 0] / counts.sum()
            total += float(-(probs * np.log(probs)).sum())
            count += 1
    return total / count


@pytest.mark.parametrize("n_states,n_edges,base,digits", MACHINES)
def test_optimal_loss_matches_brute_force(n_states, n_edges, base, digits):
    fsm = FSM.random(n_states, n_edges, base, seed=9)
    data = fsm.sample(6, 16, seed=1)
    assert fsm.optimal_loss(data) == pytest.approx(brute_force_optimal_loss(fsm, data), abs=1e-9)


def test_optimal_loss_one_digit_closed_form():
    """One-digit states: the first state is uniform over all states, every later one over n_edges successors."""
    fsm = FSM.random(7, 3, 10, seed=0)
    data = fsm.sample(4, 12, seed=0)
    assert fsm.optimal_loss(data) == pytest.approx((math.log(7) + 10 * math.log(3)) / 11, abs=1e-12)


def test_optimal_loss_is_expected_cross_entropy():
    """On many sequences, the Bayes-optimal predictor's realised cross-entropy averages to `optimal_loss`."""
    fsm = FSM.random(12, 3, 4, seed=0)
    data = fsm.sample(300, 9, seed=0)
    nll = []
    for row in data.tokens.tolist():
        ref = reference(fsm, row)
        for p in range(len(row) - 1):
            i = p % fsm.digits
            seen = tuple(row[p + 1 - i : p + 1])
            prev = ref["prev_state"][p] if p > 0 else -1
            pool = range(fsm.n_states) if prev < 0 else fsm.successors[prev].tolist()
            nexts = [encode(fsm, s)[i] for s in pool if tuple(encode(fsm, s)[:i]) == seen]
            nll.append(-math.log(nexts.count(row[p + 1]) / len(nexts)))
    assert np.mean(nll) == pytest.approx(fsm.optimal_loss(data), abs=0.03)


# -- transition accuracy --------------------------------------------------------------------------------------
class Oracle(nn.Module):
    """Greedy next-digit logits from the machine itself: at the last position, the next digit of the first state
    (in `choose`'s order) that agrees with the digits of the current state read so far. A large logit on BOS checks
    that only digit logits are read."""

    def __init__(self, fsm: FSM, choose):
        super().__init__()
        self.fsm, self.choose = fsm, choose
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, tokens):
        self.calls += 1
        fsm, d = self.fsm, self.fsm.digits
        logits = torch.zeros(*tokens.shape, fsm.vocab_size)
        logits[..., fsm.bos] = 100.0
        for r, row in enumerate(tokens.tolist()):
            body = row[1:]
            n_complete = len(body) // d
            partial = body[n_complete * d :]
            last = decode(fsm, body[(n_complete - 1) * d : n_complete * d]) if n_complete else -1
            target = next(s for s in self.choose(last) if encode(fsm, s)[: len(partial)] == partial)
            logits[r, -1, encode(fsm, target)[len(partial)]] = 1.0
        return logits


def successors_of(fsm):
    return lambda last: fsm.successors[last].tolist() if last >= 0 else list(range(fsm.n_states))


def non_successors_of(fsm):
    return lambda last: [s for s in range(fsm.n_states) if s not in fsm.successors[last]]


@pytest.mark.parametrize("n_states,n_edges,base", [(12, 3, 4), (20, 3, 3), (7, 3, 10)])
def test_transition_accuracy_oracle(n_states, n_edges, base):
    fsm = FSM.random(n_states, n_edges, base, seed=1)
    seq_len = 1 + 4 * fsm.digits
    good = transition_accuracy(Oracle(fsm, successors_of(fsm)), fsm, n_sequences=10, seq_len=seq_len, batch_size=4)
    assert good["per_cut"] == {1: 1.0, 2: 1.0, 3: 1.0}
    assert good["transition_accuracy"] == 1.0 and good["first_transition_accuracy"] == 1.0
    bad = transition_accuracy(Oracle(fsm, non_successors_of(fsm)), fsm, n_sequences=10, seq_len=seq_len, batch_size=4)
    assert bad["per_cut"] == {1: 0.0, 2: 0.0, 3: 0.0} and bad["transition_accuracy"] == 0.0


def test_transition_accuracy_partial_oracle():
    """A model right only after even states scores, per cut, the share of prefixes that end in an even state."""
    fsm = FSM.random(12, 3, 4, seed=2)
    good, bad = successors_of(fsm), non_successors_of(fsm)
    model = Oracle(fsm, lambda last: good(last) if last % 2 == 0 else bad(last))
    cuts, n = [2, 1, 4], 13
    result = transition_accuracy(model, fsm, n_sequences=n, seq_len=9, cut_states=cuts, seed=3, batch_size=5)
    data = fsm.sample(n, 1 + (max(cuts) + 1) * fsm.digits, 3)  # the sequences transition_accuracy draws
    expected = {c: float((data.state_at[:, c * fsm.digits] % 2 == 0).double().mean()) for c in cuts}
    assert result["per_cut"] == pytest.approx(expected)
    assert 0 < min(expected.values()) and max(expected.values()) < 1  # a mix, so the test can tell cuts apart
    assert result["transition_accuracy"] == pytest.approx(np.mean(list(expected.values())))
    assert result["first_transition_accuracy"] == pytest.approx(expected[1])
    assert model.calls == len(cuts) * math.ceil(n / 5) * fsm.digits
    no_first = transition_accuracy(model, fsm, n_sequences=n, seq_len=9, cut_states=[2], seed=3)
    assert no_first["first_transition_accuracy"] is None


# -- the paper's state accuracy: sequences the model samples itself --------------------------------------------
class Uniform(nn.Module):
    """Every next token equally likely (BOS included)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.dummy = vocab, nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab)


class Consistent(nn.Module):
    """Uniform over the digits that continue some state in `choose(last complete state)`, -inf elsewhere."""

    def __init__(self, fsm: FSM, choose):
        super().__init__()
        self.fsm, self.choose, self.dummy = fsm, choose, nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        fsm, d = self.fsm, self.fsm.digits
        logits = torch.full((*tokens.shape, fsm.vocab_size), -1e9)
        for r, row in enumerate(tokens.tolist()):
            body = row[1:]
            n_complete = len(body) // d
            partial = body[n_complete * d :]
            last = decode(fsm, body[(n_complete - 1) * d : n_complete * d]) if n_complete else -1
            allowed = {
                encode(fsm, s)[len(partial)] for s in self.choose(last) if encode(fsm, s)[: len(partial)] == partial
            }
            logits[r, -1, sorted(allowed)] = 0.0
        return logits


def test_sampled_state_accuracy_of_models_whose_answers_are_known():
    fsm = FSM.random(12, 3, 4, seed=0)  # two digits per state, ids 0..15 of which 12 are states, vocab 5
    good = sampled_state_accuracy(Consistent(fsm, successors_of(fsm)), fsm, n_sequences=12, seq_len=17, seed=1)
    assert good["state_accuracy"] == 1.0 and good["valid_next_state_mass"] == pytest.approx(1.0)
    assert good["n_transitions"] == 12 * 7 and good["valid_state_share"] == 1.0
    bad = sampled_state_accuracy(Consistent(fsm, non_successors_of(fsm)), fsm, n_sequences=12, seq_len=17, seed=1)
    assert bad["state_accuracy"] == 0.0 and bad["valid_next_state_mass"] == pytest.approx(0.0, abs=1e-6)
    # Uniform over 5 tokens: a group is a state with chance 12/25, the next one a successor with chance 3/25.
    uniform = sampled_state_accuracy(Uniform(fsm.vocab_size), fsm, n_sequences=600, seq_len=33, seed=2)
    assert uniform["state_accuracy"] == pytest.approx(12 / 25 * 3 / 25, abs=0.012)
    assert uniform["valid_state_share"] == pytest.approx(12 / 25, abs=0.02)
    assert uniform["valid_next_state_mass"] == pytest.approx(3 / 25, abs=0.012)


def test_score_sampled_sequences_by_hand():
    fsm = FSM(3, 1, 10, 0, np.array([[1], [2], [0]]))  # 0 -> 1 -> 2 -> 0, one digit per state
    bos = fsm.bos
    tokens = torch.tensor([[bos, 0, 1, 2, 0], [bos, 0, 2, bos, 1], [bos, 5, 0, 1, 1]])
    out = score_sampled_sequences(fsm, tokens)
    # row 0: 3 of 3 valid; row 1: 0->2 no, 2->BOS no, BOS->1 no; row 2: 5 is no state, 0->1 yes, 1->1 no
    assert out["state_accuracy"] == pytest.approx(4 / 9)
    assert out["valid_state_share"] == pytest.approx(10 / 12)
    probs = torch.zeros(3, 4, fsm.vocab_size)
    probs[..., 1] = 0.25  # a quarter on digit 1 everywhere, the rest on digit 2
    probs[..., 2] = 0.75
    out = score_sampled_sequences(fsm, tokens, probs)
    # valid next state: after 0 it is 1 (mass 0.25), after 1 it is 2 (0.75), after 2 it is 0 (0); sources that are
    # states: row 0: 0, 1, 2; row 1: 0, 2; row 2: 0, 1
    assert out["valid_next_state_mass"] == pytest.approx(np.mean([0.25, 0.75, 0, 0.25, 0, 0.25, 0.75]))


def test_sampling_with_the_kv_cache_matches_the_full_forward_pass(make_tiny_model):
    model = make_tiny_model(seed=3, d_vocab=5)

    class Full(nn.Module):  # not a HookedTransformer: runs the whole prefix every step
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, tokens):
            return model(tokens)

    cached_tokens, cached_probs = sample_from_model(model, 6, 12, bos=4, seed=5, batch_size=4)
    full_tokens, full_probs = sample_from_model(Full(), 6, 12, bos=4, seed=5, batch_size=4)
    assert torch.equal(cached_tokens, full_tokens) and cached_tokens.shape == (6, 12)
    assert torch.allclose(cached_probs, full_probs, atol=1e-5)
    assert (cached_tokens[:, 0] == 4).all()
    with pytest.raises(ValueError, match="temperature"):
        sample_from_model(model, 2, 5, bos=4, temperature=0)
