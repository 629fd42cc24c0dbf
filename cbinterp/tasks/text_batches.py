"""Seeded, resumable training batches of packed windows: `TextBatches`."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from cbinterp.tasks.packing import DOCS_PER_BATCH, _check_seq_len, check_model, pack_documents
from cbinterp.tasks.text_sources import TextSource

__all__ = ["TextBatches"]


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
        model: HookedTransformer | None = None,
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
        model: HookedTransformer | None = None,
        *,
        text_column: str = "text",
        docs_per_batch: int = DOCS_PER_BATCH,
    ) -> TextBatches:
        """Pack `texts` with `pack_documents` (BOS first in every window) and batch them."""
        _check_seq_len(seq_len, True)
        if model is not None:
            check_model(model, seq_len)  # before tokenising a whole corpus
        windows = pack_documents(texts, tokenizer, seq_len, text_column=text_column, docs_per_batch=docs_per_batch)
        rows = [window.to(torch.int32) for window in windows]
        if not rows:
            raise ValueError(
                f"TextBatches: the corpus is empty: its tokens did not fill one window of seq_len={seq_len} "
                f"(BOS plus {seq_len - 1} tokens). Add text or lower seq_len."
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

    def check_model(self, model: HookedTransformer) -> None:
        """Raise ValueError if the sequences are longer than `model.cfg.n_ctx` or hold ids >= `cfg.d_vocab`."""
        check_model(model, self.seq_len, int(self.sequences.max()))

    def __repr__(self) -> str:
        return (
            f"TextBatches(n_sequences={self.n_sequences}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, seed={self.seed})"
        )


def _check_step(step: int) -> int:
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}.")
    return int(step)
