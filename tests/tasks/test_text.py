"""cbinterp.tasks.text: documents, the byte-level BPE tokenizer, packing, batches and whole-document rows."""

from __future__ import annotations

import itertools
import json
import math
import socket
from pathlib import Path

import pytest
import torch

from cbinterp.tasks.bpe import _reservoir_sample
from cbinterp.tasks.text import (
    END_OF_TEXT,
    TextBatches,
    attach_tokenizer,
    iter_texts,
    load_tokenizer,
    pack_documents,
    save_tokenizer,
    tokenize_documents,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from cbinterp.tasks.toytext import generate_corpus

UNICODE = [
    "Café crème, naïve façade, Ærø, Straße.",
    "東京で寿司を食べました。你好，世界！",
    "Emoji: 🙂🦄👩‍👩‍👧 and flags 🇫🇷.",
    "Decomposed e\u0301 and NFC \u00e9 stay distinct; tabs\tand\r\nnewlines; spaces  before , and .",
]
NEVER_SEEN = "ᚠᚢᚦ 𝔘𝔫𝔦 ☃ \x00\x7f ꙮ"  # characters absent from the training corpus


@pytest.fixture(autouse=True)
def no_network(monkeypatch, one_thread):
    """Any attempt to reach a hub (or anything else) over the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_corpus(200, seed=0) + UNICODE


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe_tokenizer(corpus, vocab_size=400)


@pytest.fixture
def tiny(make_tiny_model, tok):
    return make_tiny_model(n_layers=1, d_vocab=len(tok), n_ctx=32)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def stream(tokenizer, docs: list[str]) -> list[int]:
    """The packing contract written out plainly: non-empty documents joined by <|endoftext|>."""
    out: list[int] = []
    for doc in (d for d in docs if d):
        if out:
            out.append(tokenizer.eos_token_id)
        out.extend(ids(tokenizer, doc))
    return out


# -- iter_texts -----------------------------------------------------------------------------------------------


def test_iter_texts_reads_strings_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first file\nwith two lines", encoding="utf-8")
    rows = [{"text": "row one", "id": 1}, {"text": "row two ü"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(iter_texts(["x", "y"])) == ["x", "y"]
    got = list(iter_texts([tmp_path / "a.txt", str(tmp_path / "b.jsonl"), "plain doc", {"text": "mapped"}]))
    assert got == ["first file\nwith two lines", "row one", "row two ü", "plain doc", "mapped"]
    assert list(iter_texts(tmp_path / "b.jsonl")) == ["row one", "row two ü"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "other column"}), encoding="utf-8")
    assert list(iter_texts([tmp_path / "c.jsonl"], text_column="body")) == ["other column"]
    assert list(iter_texts(x for x in ["lazy", "gen"])) == ["lazy", "gen"]


def test_iter_texts_rejects_bad_items_with_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="single str"):
        iter_texts("one document")
    with pytest.raises(TypeError, match=r"item 1 is a int; expected a str document"):
        list(iter_texts(["ok", 3]))
    with pytest.raises(TypeError, match=r"datasets.Dataset"):
        iter_texts(42)
    (tmp_path / "t.csv").write_text("a,b")
    with pytest.raises(TypeError, match=r"expected a \.txt file"):
        list(iter_texts([tmp_path / "t.csv"]))
    with pytest.raises(FileNotFoundError, match="looks like a file path"):
        list(iter_texts(["missing/corpus.txt"]))
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match=r"c.jsonl:1: expected an object with field 'text'"):
        list(iter_texts([tmp_path / "c.jsonl"]))
    assert list(iter_texts(["I read notes.txt"])) == ["I read notes.txt"]  # a sentence, not a path


def test_iter_texts_reads_a_hugging_face_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta", "gamma"], "label": [0, 1, 0]})
    assert list(iter_texts(ds)) == ["alpha", "beta", "gamma"]
    assert list(iter_texts(ds.to_iterable_dataset())) == ["alpha", "beta", "gamma"]
    with pytest.raises(ValueError, match=r"no column 'body'.*\['text', 'label'\]"):
        iter_texts(ds, text_column="body")
    with pytest.raises(TypeError, match="pick one split"):
        iter_texts(datasets.DatasetDict({"train": ds}))


# -- tokenizer ------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_any_unicode(tok):
    assert tok.bos_token == tok.eos_token == tok.pad_token == END_OF_TEXT and tok.bos_token_id == 0
    for text in UNICODE + [NEVER_SEEN, " leading space", "", "a literal <|endoftext|> in text"]:
        encoded = ids(tok, text)
        assert tok.decode(encoded) == text, text
    unseen = ids(tok, NEVER_SEEN)
    assert unseen and tok.bos_token_id not in unseen and tok.unk_token_id is None  # bytes, no unknown token
    assert tok.bos_token_id not in ids(tok, f"a {END_OF_TEXT} b")  # document text never makes the special id


def test_training_is_deterministic_and_depends_on_the_texts(corpus, tok):
    again = train_bpe_tokenizer(list(corpus), vocab_size=400)
    assert again.get_vocab() == tok.get_vocab()
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # merges too, in order
    other = train_bpe_tokenizer(generate_corpus(200, seed=1), vocab_size=400)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    assert len(tok) == 400 and max(tok.get_vocab().values()) == 399


def test_reservoir_sample_is_seeded_uniform_size_and_in_order():
    docs = [f"doc {i}" for i in range(100)]
    sample = _reservoir_sample(iter(docs), 10, seed=3)
    assert len(sample) == 10 and sample == _reservoir_sample(iter(docs), 10, seed=3)
    assert sample != _reservoir_sample(iter(docs), 10, seed=4)
    assert sample == sorted(sample, key=docs.index)
    assert _reservoir_sample(iter(docs[:4]), 10, seed=0) == docs[:4]


def test_save_and_load_give_identical_ids(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(path)
    texts = UNICODE + [NEVER_SEEN, "In May 2024, Bob visited the harbour."]
    assert [ids(loaded, t) for t in texts] == [ids(tok, t) for t in texts]
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    trained_into = train_bpe_tokenizer(generate_corpus(30), vocab_size=300, directory=tmp_path / "t2")
    assert Path(trained_into.name_or_path) == (tmp_path / "t2").resolve() and (tmp_path / "t2/tokenizer.json").is_file()
    with pytest.raises(FileNotFoundError, match="No tokenizer at"):
        load_tokenizer(tmp_path / "nowhere")


def test_tokenizer_training_rejects_bad_settings():
    with pytest.raises(ValueError, match="the corpus is empty"):
        train_bpe_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_bpe_tokenizer(["text"], vocab_size=100)


# -- attach_tokenizer -----------------------------------------------------------------------------------------


def test_attach_tokenizer_makes_a_config_model_speak_text(tiny, tok):
    text = "In May 2024, Bob visited the harbour."
    attach_tokenizer(tiny, tok)
    tokens = tiny.to_tokens(text)
    assert tokens[0, 0].item() == tok.bos_token_id and tokens[0, 1:].tolist() == ids(tok, text)
    assert tiny.to_tokens(text, prepend_bos=False)[0].tolist() == ids(tok, text)
    assert tiny.to_string(tokens[0, 1:]) == text
    assert tiny.to_str_tokens(text)[0] == END_OF_TEXT and "".join(tiny.to_str_tokens(text)[1:]) == text
    assert tiny.tokenizer.name_or_path.startswith("cbinterp-tokenizer:")  # not a path, not a Hub id
    assert ids(tok, "x") == tok("x")["input_ids"]  # the caller's tokenizer still adds no BOS
    out = tiny.generate(text, max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False)
    assert isinstance(out, str) and out.startswith(text) and out != text
    generated = tiny.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False, stop_at_eos=False)
    assert generated.shape == (1, tokens.shape[1] + 6) and torch.equal(generated[:, : tokens.shape[1]], tokens)


def test_attach_tokenizer_refuses_a_vocabulary_larger_than_the_model(make_tiny_model, tok):
    small = make_tiny_model(n_layers=1, d_vocab=len(tok) - 1, n_ctx=32)
    with pytest.raises(ValueError, match=rf"{len(tok)} token ids but the model's cfg.d_vocab is {len(tok) - 1}"):
        attach_tokenizer(small, tok)
    with pytest.raises(TypeError, match="HookedTransformer"):
        attach_tokenizer(torch.nn.Linear(2, 2), tok)


# -- pack_documents -------------------------------------------------------------------------------------------


def test_windows_are_the_joined_stream_cut_with_bos_first(tok, corpus):
    docs = corpus[:40] + ["", f"text with a literal {END_OF_TEXT} inside"] + corpus[40:60]
    seq_len = 16
    windows = list(pack_documents(docs, tok, seq_len, docs_per_batch=7))
    expected = stream(tok, docs)
    assert len(expected) % (seq_len - 1) != 0  # so the tail really is partial
    assert len(windows) == len(expected) // (seq_len - 1)  # the partial tail is dropped, nothing more
    packed = torch.stack(windows)
    assert packed.dtype == torch.int64 and packed.shape == (len(windows), seq_len)
    assert torch.all(packed[:, 0] == tok.bos_token_id)
    assert packed[:, 1:].reshape(-1).tolist() == expected[: len(windows) * (seq_len - 1)]
    # separators only between documents: one fewer than the non-empty documents in the stream, never doubled
    text_part = packed[:, 1:].reshape(-1)
    n_docs_in = sum(1 for d in docs if d)
    assert (torch.tensor(expected) == tok.eos_token_id).sum() == n_docs_in - 1
    assert not torch.any((text_part[1:] == tok.eos_token_id) & (text_part[:-1] == tok.eos_token_id))
    assert [w.tolist() for w in pack_documents(docs, tok, seq_len)] == packed.tolist()  # deterministic


def test_windows_without_bos_and_bad_lengths(tok, corpus):
    plain = torch.stack(list(pack_documents(corpus[:30], tok, 12, bos=False)))
    expected = stream(tok, corpus[:30])
    assert plain.reshape(-1).tolist() == expected[: len(plain) * 12] and len(plain) == len(expected) // 12
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        pack_documents(corpus, tok, 1)


def test_packing_streams_and_pulls_only_what_it_needs(tok):
    pulled = []

    def documents():
        for i in itertools.count():
            if i == 200:
                raise RuntimeError("the corpus was read past what the first windows need")
            pulled.append(i)
            yield f"Document number {i} says hello."

    windows = pack_documents(documents(), tok, 16, docs_per_batch=4)
    assert pulled == []  # nothing is read before a window is asked for
    first = list(itertools.islice(windows, 3))
    assert len(first) == 3 and len(pulled) <= 8  # three windows of 15 tokens need about 5 documents


# -- TextBatches ----------------------------------------------------------------------------------------------


def test_text_batches_are_seeded_and_pure_functions_of_step(tok, corpus):
    batches = TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4, seed=0)
    assert batches.sequences.dtype == torch.int32 and batches(0).dtype == torch.int64
    assert batches(0).shape == (4, 16) and torch.all(batches(0)[:, 0] == tok.bos_token_id)
    same = TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4, seed=0)
    other = TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4, seed=1)
    steps = range(12)
    assert all(torch.equal(batches(s), same(s)) for s in steps)
    assert not all(torch.equal(batches(s), other(s)) for s in steps)
    late = [batches(s) for s in (50, 3, 7)]  # any order of calls, any cache state
    resumed = TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4, seed=0)
    assert all(torch.equal(b, resumed(s)) for b, s in zip(late, (50, 3, 7)))


def test_every_sequence_is_seen_once_per_epoch():
    n = 10
    sequences = torch.arange(n).unsqueeze(1).repeat(1, 3)
    batches = TextBatches(sequences, batch_size=3, seed=5)
    seen = torch.cat([batches(s)[:, 0] for s in range(7)])  # 21 positions: two epochs and one more
    first, second = seen[:n], seen[n : 2 * n]
    assert sorted(first.tolist()) == list(range(n)) and sorted(second.tolist()) == list(range(n))
    assert not torch.equal(first, second) and batches.epoch_of(3) == 0 and batches.epoch_of(4) == 1
    assert batches.steps_per_epoch == pytest.approx(n / 3)


def test_text_batches_check_the_model_and_the_corpus(tok, corpus, tiny):
    def never_read():
        raise AssertionError("the corpus was read before seq_len was checked")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match=r"seq_len=64 is longer than the model's context \(cfg.n_ctx=32\)"):
        TextBatches.from_texts(never_read(), tok, seq_len=64, batch_size=2, model=tiny)
    with pytest.raises(ValueError, match="the corpus is empty"):
        TextBatches.from_texts(["tiny"], tok, seq_len=16, batch_size=2)
    with pytest.raises(ValueError, match="the corpus is empty"):
        TextBatches(torch.zeros(0, 8, dtype=torch.long), batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        TextBatches(torch.zeros(4, 8, dtype=torch.long), batch_size=0)
    too_big = TextBatches(torch.full((4, 8), len(tok)), batch_size=2)
    with pytest.raises(ValueError, match=r"Token id 400 does not fit the model's vocabulary \(cfg.d_vocab=400\)"):
        too_big.check_model(tiny)
    TextBatches.from_texts(corpus, tok, seq_len=32, batch_size=2, model=tiny)  # fits: no error


def test_text_batches_drive_train(tok, corpus, tiny):
    from cbinterp.core.training.train import TrainConfig, train

    batches = TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4, seed=0, model=tiny)
    result = train(tiny, batches, TrainConfig(steps=3, progress=False, log_every=1))
    assert result.steps == 3 and all(math.isfinite(loss) for loss in result.losses)


def test_text_batches_follow_the_models_bos_convention(tok, corpus, tiny):
    plain = TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4)  # no model: BOS first, as always
    assert torch.equal(plain.sequences.long(), torch.stack(list(pack_documents(corpus, tok, 16))))
    assert torch.equal(
        TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4, model=tiny).sequences, plain.sequences
    )
    tiny.cfg.default_prepend_bos = False  # as TransformerLens sets for Pythia
    no_bos = TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4, model=tiny)
    assert torch.equal(no_bos.sequences.long(), torch.stack(list(pack_documents(corpus, tok, 16, bos=False))))
    forced = TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4, model=tiny, prepend_bos=True)
    assert torch.equal(forced.sequences, plain.sequences)
    with pytest.raises(ValueError, match="prepend_bos must be None"):
        TextBatches.from_texts(corpus, tok, seq_len=16, batch_size=4, prepend_bos="yes")


class CountingTokenizer:
    """A tokenizer that records every document it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.seen.extend(texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_streaming_batches_are_lanes_of_packed_documents(tok, corpus):
    from cbinterp.tasks.text_batches import StreamingTextBatches

    batches = StreamingTextBatches(corpus, tok, seq_len=16, batch_size=4, docs_per_batch=7)
    lanes = [list(pack_documents(corpus[j::4], tok, 16)) for j in range(4)]  # document i goes to lane i % 4
    n_first_pass = min(len(lane) for lane in lanes)
    for step in range(n_first_pass):
        assert torch.equal(batches(step), torch.stack([lane[step] for lane in lanes])), step
    late = [batches(s) for s in (n_first_pass + 40, 3, 0, n_first_pass + 40)]  # past an epoch, then back
    again = StreamingTextBatches(corpus, tok, seq_len=16, batch_size=4)
    assert all(torch.equal(b, again(s)) for b, s in zip(late, (n_first_pass + 40, 3, 0, n_first_pass + 40)))
    assert late[0].dtype == torch.int64 and late[0].shape == (4, 16) and torch.all(late[0][:, 0] == tok.bos_token_id)
    no_bos = StreamingTextBatches(corpus, tok, seq_len=16, batch_size=4, prepend_bos=False)
    assert torch.equal(no_bos(2)[1], list(pack_documents(corpus[1::4], tok, 16, bos=False))[2])


def test_streaming_ranks_tokenise_only_their_rows_and_make_the_same_global_batch(tok, corpus):
    from cbinterp.tasks.text_batches import StreamingTextBatches

    whole = StreamingTextBatches(corpus, tok, seq_len=16, batch_size=4)
    counting = [CountingTokenizer(tok) for _ in range(2)]
    ranks = [StreamingTextBatches(corpus, counting[r], seq_len=16, batch_size=4) for r in range(2)]
    for step in range(6):
        rows = [ranks[r](step, r, 2) for r in range(2)]
        assert rows[0].shape == (2, 16) and torch.equal(torch.cat(rows), whole(step))
    for r in range(2):  # rank r encodes documents of lanes 2r, 2r + 1 only: i % 4 in {2r, 2r + 1}
        assert counting[r].seen and set(counting[r].seen) <= {d for i, d in enumerate(corpus) if i % 4 // 2 == r}
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        whole(0, 0, 3)


def test_streaming_batches_refuse_bad_sources_and_drive_train(tok, corpus, tiny):
    from cbinterp.core.training.train import TrainConfig, train
    from cbinterp.tasks.text_batches import StreamingTextBatches

    with pytest.raises(TypeError, match="one-shot iterator"):
        StreamingTextBatches(iter(corpus), tok, seq_len=16, batch_size=4)
    with pytest.raises(ValueError, match="lane 3 of 4 got no tokens"):
        StreamingTextBatches(corpus[:3], tok, seq_len=16, batch_size=4)(0)
    with pytest.raises(ValueError, match="corpus is empty"):
        StreamingTextBatches([], tok, seq_len=16, batch_size=4)(0)
    with pytest.raises(ValueError, match="longer than the model's context"):
        StreamingTextBatches(corpus, tok, seq_len=64, batch_size=4, model=tiny)
    tiny.cfg.default_prepend_bos = False
    batches = StreamingTextBatches(corpus, tok, seq_len=16, batch_size=4, model=tiny)
    assert not batches.bos
    result = train(tiny, batches, TrainConfig(steps=3, progress=False, log_every=1))
    assert result.steps == 3 and all(math.isfinite(loss) for loss in result.losses)


# -- tokenize_documents ---------------------------------------------------------------------------------------


def test_tokenize_documents_keeps_whole_documents(tok, corpus, tiny):
    docs = corpus[:5] + ["", UNICODE[1]]
    seq_len = 16
    out = tokenize_documents(docs, tok, seq_len)
    assert out.tokens.shape[1] == seq_len and out.tokens.dtype == torch.int64 and out.mask.dtype == torch.bool
    assert torch.all(out.tokens[:, 0] == tok.bos_token_id) and torch.all(out.mask[:, 0])
    assert out.n_docs == len(docs) and torch.all(out.doc_index[1:] >= out.doc_index[:-1])
    for i, doc in enumerate(docs):
        rows = out.doc_index == i
        assert rows.sum() == max(1, math.ceil(len(ids(tok, doc)) / (seq_len - 1)))
        assert out.document(i).tolist() == ids(tok, doc) and tok.decode(out.document(i)) == doc
        assert out.mask[rows].sum() == len(ids(tok, doc)) + rows.sum()  # text plus one BOS per row
    assert torch.all(out.tokens[~out.mask] == tok.pad_token_id)
    last = out.doc_index == 0
    assert not out.mask[last][-1, -1] or len(ids(tok, docs[0])) % (seq_len - 1) == 0  # padding at the end
    assert torch.equal(tokenize_documents(docs, tok, seq_len, model=tiny).tokens, out.tokens)
    with pytest.raises(ValueError, match="longer than the model's context"):
        tokenize_documents(docs, tok, 33, model=tiny)
    with pytest.raises(ValueError, match="the corpus is empty"):
        tokenize_documents([], tok, seq_len)
