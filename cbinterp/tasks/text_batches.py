"""Resumable training batches of packed windows, in memory or streamed.

`TextBatches` shuffles (seeded) a corpus tokenised in memory; `StreamingTextBatches` reads lazily, each rank
tokenising only its own rows."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from cbinterp.core.tl_compat import Model
from cbinterp.tasks.packing import (
    DOCS_PER_BATCH,
    Packer,
    _check_seq_len,
    _encode_batches,
    _separator_id,
    _special_ids,
    check_model,
    pack_documents,
    resolve_prepend_bos,
)
from cbinterp.tasks.text_sources import TextSource, iter_texts

__all__ = ["StreamingTextBatches", "TextBatches"]


class TextBatches:
    """Seeded, resumable batches of packed sequences for `cbinterp.train`: ``batches(step) -> (batch, seq_len)``.

    The sequences are visited epoch by epoch, each epoch in its own order, a permutation drawn from
    ``(seed, epoch)``. Batch `step` holds positions ``step * batch_size ...`` of the endless run of epochs, so a
    batch may span the end of one epoch and the start of the next, every sequence is seen exactly once per epoch,
    and step -> batch is a pure function: resuming at any step gives the batches of an uninterrupted run.
    Sequences are stored as int32 and handed out as int64 on the CPU (`train` moves them to the model's device).
    """

    def __init__(
        self,
        sequences: Int[Tensor, "rows pos"],
        batch_size: int,
        seed: int = 0,
        model: Model | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
        sequences = torch.as_tensor(sequences)
        if sequences.dim() != 2 or sequences.dtype.is_floating_point or sequences.dtype == torch.bool:
            got = f"{sequences.dtype} {tuple(sequences.shape)}"
            raise ValueError(f"Expected int token ids of shape (n_seq, seq_len), got {got}.")
        if sequences.shape[0] == 0 or sequences.shape[1] == 0:
            raise ValueError("TextBatches: the corpus is empty: it did not fill one window. Add text or lower seq_len.")
        if sequences.min() < 0 or sequences.max() > torch.iinfo(torch.int32).max:
            raise ValueError("Token ids must lie in 0 .. 2**31 - 1.")
        self.sequences = sequences.to(torch.int32).contiguous()  # int32 halves the memory of int64 ids
        self.batch_size = batch_size
        self.seed = seed
        self._perm: tuple[int, Tensor] = (-1, torch.empty(0, dtype=torch.long))
        if model is not None:
            self.check_model(model)

    @classmethod
    def from_texts(
        cls,
        texts: TextSource,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        model: Model | None = None,
        *,
        text_column: str = "text",
        docs_per_batch: int = DOCS_PER_BATCH,
        prepend_bos: bool | None = None,
    ) -> TextBatches:
        """Pack `texts` with `pack_documents` and batch them; the whole corpus is tokenised into memory.

        For a corpus larger than that, or one rank's share of it, use `StreamingTextBatches`.

        Args:
            prepend_bos: start every window with BOS (None: as `model.cfg.default_prepend_bos` when a model is
                given, else True). Without BOS a window is `seq_len` tokens of the stream.
        """
        bos = resolve_prepend_bos(prepend_bos, model)
        _check_seq_len(seq_len, bos)
        if model is not None:
            check_model(model, seq_len)  # before tokenising a whole corpus
        windows = pack_documents(texts, tokenizer, seq_len, bos, text_column=text_column, docs_per_batch=docs_per_batch)
        rows = [window.to(torch.int32) for window in windows]
        if not rows:
            what = f"BOS plus {seq_len - 1} tokens" if bos else f"{seq_len} tokens"
            raise ValueError(
                f"TextBatches: the corpus is empty: its tokens did not fill one window of seq_len={seq_len} "
                f"({what}). Add text or lower seq_len."
            )
        return cls(torch.stack(rows), batch_size, seed, model)

    @property
    def n_sequences(self) -> int:
        """The number of packed sequences."""
        return int(self.sequences.shape[0])

    @property
    def seq_len(self) -> int:
        """The length of every sequence, in tokens."""
        return int(self.sequences.shape[1])

    @property
    def steps_per_epoch(self) -> float:
        """Batches per pass over the data (fractional when batch_size does not divide the number of sequences)."""
        return self.n_sequences / self.batch_size

    def epoch_of(self, step: int) -> int:
        """The epoch that the first sequence of batch `step` belongs to."""
        return (_check_step(step) * self.batch_size) // self.n_sequences

    def permutation(self, epoch: int) -> Int[Tensor, " rows"]:
        """The order of the sequences in `epoch`: a pure function of (seed, epoch)."""
        if self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, torch.from_numpy(rng.permutation(self.n_sequences)))
        return self._perm[1]

    def indices(self, step: int) -> Int[Tensor, " batch"]:
        """Which sequences batch `step` holds."""
        start = _check_step(step) * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        epochs, offsets = positions // self.n_sequences, positions % self.n_sequences
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in torch.unique(epochs).tolist():
            here = epochs == epoch
            out[here] = self.permutation(epoch)[offsets[here]]
        return out

    def __call__(self, step: int) -> Int[Tensor, "batch pos"]:
        """The batch of step `step` (see `indices`)."""
        return self.sequences[self.indices(step)].long()

    def check_model(self, model: Model) -> None:
        """Raise ValueError if the sequences are longer than `model.cfg.n_ctx` or hold ids >= `cfg.d_vocab`."""
        check_model(model, self.seq_len, int(self.sequences.max()))

    def __repr__(self) -> str:
        return (
            f"TextBatches(n_sequences={self.n_sequences}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, seed={self.seed})"
        )


class StreamingTextBatches:
    """Batches of packed windows read lazily from `texts`: ``batches(step) -> (batch_size, pos)`` int64.

    ``batches(step, rank, world_size)`` gives this rank's rows, which is what `train` asks for under torchrun.

    Documents are dealt to `batch_size` lanes in turn (document i of the source to lane ``i % batch_size``); each
    lane packs its documents as `pack_documents` does (EOS between documents, BOS first in every window when
    `prepend_bos`), and row j of batch `step` is window `step` of lane j. When the source runs out it is read again
    from the start (the next epoch), each lane going on where it stopped. Hence:

    - memory: a few documents per lane, never the corpus (a Hugging Face ``IterableDataset`` streams from disk);
    - under torchrun, rank r reads the documents' text but tokenises only the documents of its lanes (its rows
      ``r * b .. (r + 1) * b - 1`` of the global batch), and the global batch of a step is the same for any number
      of ranks, so a checkpoint resumes with any number;
    - step -> batch is a pure function of the source: consecutive steps cost one batch each, while an earlier step
      than the last reads the source again from the start (resuming at step s tokenises the first s batches'
      documents again; that is the price of holding nothing).

    Windows come in corpus order within each lane: shuffle the documents beforehand (e.g. ``dataset.shuffle(seed)``)
    when their order is not already random. The source must be readable more than once (a list, files, a ``Path``,
    a ``datasets`` Dataset or IterableDataset): a one-shot iterator is refused.

    Args:
        prepend_bos: start every window with BOS (None: `model.cfg.default_prepend_bos` when a model is given,
            else True).
        text_column, docs_per_batch: as in `pack_documents`.
    """

    def __init__(
        self,
        texts: TextSource,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        batch_size: int,
        model: Model | None = None,
        *,
        prepend_bos: bool | None = None,
        text_column: str = "text",
        docs_per_batch: int = DOCS_PER_BATCH,
    ):
        if isinstance(texts, Iterator):
            raise TypeError(
                "StreamingTextBatches reads its source again for each epoch and on resume, so it cannot take a "
                "one-shot iterator or generator; pass a list, a Path, a list of files or a datasets (Iterable)Dataset."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        if not isinstance(docs_per_batch, int) or docs_per_batch < 1:
            raise ValueError(f"docs_per_batch must be an int >= 1, got {docs_per_batch!r}.")
        self.bos = resolve_prepend_bos(prepend_bos, model)
        _check_seq_len(seq_len, self.bos)
        if model is not None:
            check_model(model, seq_len)
        iter_texts(texts, text_column)  # refuses a source of the wrong kind now, not at the first batch
        self.texts, self.tokenizer, self.text_column = texts, tokenizer, text_column
        self.seq_len, self.batch_size, self.docs_per_batch = seq_len, batch_size, docs_per_batch
        self._head = np.array([_special_ids(tokenizer)[0]] if self.bos else [], dtype=np.int64)
        self._separator = _separator_id(tokenizer)
        self._reader: tuple[range, Iterator[Tensor]] | None = None
        self._next_step = 0
        self._last: tuple[range, int, Tensor] | None = None

    def lanes(self, rank: int = 0, world_size: int = 1) -> range:
        """The lanes (rows of the global batch) that rank `rank` of `world_size` trains on."""
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0 .. world_size - 1, got rank={rank!r}, world_size={world_size!r}.")
        if self.batch_size % world_size:
            raise ValueError(
                f"batch_size={self.batch_size} does not split evenly over {world_size} ranks; use a multiple of "
                f"{world_size}."
            )
        per = self.batch_size // world_size
        return range(rank * per, (rank + 1) * per)

    def __call__(self, step: int, rank: int = 0, world_size: int = 1) -> Int[Tensor, "rows pos"]:
        """The rows of batch `step` that lanes of `rank` (of `world_size`) hold."""
        step, lanes = _check_step(step), self.lanes(rank, world_size)
        if self._last is not None and self._last[:2] == (lanes, step):
            return self._last[2]
        if self._reader is None or self._reader[0] != lanes or self._next_step > step:
            self._reader, self._next_step = (lanes, self._read(lanes)), 0
        while self._next_step <= step:
            batch = next(self._reader[1])
            self._next_step += 1
        self._last = (lanes, step, batch)
        return batch

    def _documents(self) -> Iterator[tuple[int, int, str]]:
        """(epoch, index in the source, text) of every document, the source read again and again."""
        for epoch in itertools.count():
            n = -1
            for n, text in enumerate(iter_texts(self.texts, self.text_column)):
                yield epoch, n, text
            if n < 0:
                raise ValueError("StreamingTextBatches: the corpus is empty (no documents). Check the source.")

    def _read(self, lanes: range) -> Iterator[Tensor]:
        """The batches of `lanes`, step after step."""
        size = self.seq_len - len(self._head)
        packers = {j: Packer(size, self._separator) for j in lanes}
        ready: dict[int, deque] = {j: deque() for j in lanes}
        documents, epoch, fed = self._documents(), 0, set()
        while True:
            while not all(ready.values()):
                chunk = list(itertools.islice(documents, self.docs_per_batch))
                for chunk_epoch, part in itertools.groupby(chunk, key=lambda doc: doc[0]):
                    if chunk_epoch != epoch:  # a pass ended: a waiting lane that got nothing in it never will
                        self._check_fed(lanes, ready, fed)
                        epoch, fed = chunk_epoch, set()
                    mine = [(n % self.batch_size, text) for _, n, text in part if n % self.batch_size in packers]
                    encoded = _encode_batches(iter([text for _, text in mine]), self.tokenizer, max(1, len(mine)))
                    for (lane, _), ids in zip(mine, encoded):
                        if ids:
                            fed.add(lane)
                        ready[lane].extend(packers[lane].add(ids))
            rows = [np.concatenate([self._head, ready[j].popleft()]) for j in lanes]
            yield torch.from_numpy(np.stack(rows))

    def _check_fed(self, lanes: range, ready: dict[int, deque], fed: set[int]) -> None:
        starving = [j for j in lanes if not ready[j] and j not in fed]
        if starving:
            raise ValueError(
                f"StreamingTextBatches: lane {starving[0]} of {self.batch_size} got no tokens in a whole pass over "
                f"the corpus (document i goes to lane i % batch_size): the corpus has too few non-empty documents "
                f"for batch_size={self.batch_size}. Add documents or lower batch_size."
            )

    def __repr__(self) -> str:
        return f"StreamingTextBatches(seq_len={self.seq_len}, batch_size={self.batch_size}, prepend_bos={self.bos})"


def _check_step(step: int) -> int:
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}.")
    return int(step)
