"""Run the model over documents and hand each piece's codes (and hook activations) to a writer.

Codes cross to the host as int32 (every device casts to it) and shrink to their stored dtype there. On CUDA the
device-to-host copies run asynchronously: a piece is handed on ("landed") only after the next one has been queued,
so that copying overlaps the next forward pass.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from cbinterp.codecache.layout import code_dtype, stored_codes
from cbinterp.codecache.writer import Writer
from cbinterp.core.codebooks.naming import codes_hook_name
from cbinterp.core.tl_compat import Model

__all__ = ["CodeRecorder"]


class CodeRecorder:
    """Records the codes of every codebook (and `hooks`' activations) of the pieces given to `record`.

    Activations are kept as `activation_dtype`; each piece lands in `writer` once its host copies are complete."""

    def __init__(
        self,
        model: Model,
        codebooks: dict,
        hooks: list[str],
        activation_dtype: torch.dtype,
        writer: Writer,
    ):
        self.model, self.codebook_names, self.hooks = model, list(codebooks), hooks
        self.activation_dtype, self.writer = activation_dtype, writer
        self.wanted = {codes_hook_name(name) for name in codebooks} | set(hooks)
        self.dtypes = {name: code_dtype(cb.n_codes) for name, cb in codebooks.items()}
        self.device = model.cfg.device
        self._pending: tuple | None = None  # the last piece, whose device-to-host copies may still be running

    def record(self, batch: Int[Tensor, "rows pos"], keep: Bool[Tensor, "rows pos"] | None, first: int) -> None:
        """Run documents `first ..` (`batch`, padding as -1 where `keep` is False) and queue their arrays.

        The piece before is landed."""
        n, seq = batch.shape
        lengths = torch.full((n,), seq, dtype=torch.int64) if keep is None else keep.sum(1).to(torch.int64)
        need_pos = keep is not None and bool((keep != (torch.arange(seq) < lengths[:, None])).any())
        arrays = {"doc_lengths": lengths, "pos": torch.arange(seq, dtype=torch.int32).expand(n, seq).reshape(-1)}
        event = None
        if seq > 0:
            run = batch if keep is None else batch.clamp_min(0)  # padding is run as token 0 and then dropped
            _, cache = self.model.run_with_cache(run.to(self.device), names_filter=lambda name: name in self.wanted)
            arrays["tokens"] = batch.reshape(-1).to(torch.int32).cpu()
            for name in self.codebook_names:
                codes = cache[codes_hook_name(name)]
                arrays[f"codes/{name}"] = _to_host(codes.reshape(n * seq, *codes.shape[2:]).to(torch.int32))
            for hook in self.hooks:
                act = cache[hook]
                arrays[f"act/{hook}"] = _to_host(act.reshape(n * seq, *act.shape[2:]).to(self.activation_dtype))
            del cache
            if torch.device(self.device).type == "cuda":
                event = torch.cuda.Event()
                event.record()
        self.land()
        self._pending = (arrays, first, batch, seq, need_pos, event, keep)

    def land(self) -> None:
        """Hand the queued piece, if any, to the writer (waiting for its host copies)."""
        previous, self._pending = self._pending, None  # cleared first: a failed landing must not be retried
        if previous is None:
            return
        arrays, first, rows, seq, need_pos, event, keep = previous
        if event is not None:
            event.synchronize()
        if keep is not None:  # only now: on CUDA the host copies are complete after the event
            flat = keep.reshape(-1).cpu()
            arrays = {key: (value if key == "doc_lengths" else value[flat]) for key, value in arrays.items()}
        for key in [k for k in arrays if k.startswith("codes/")]:
            arrays[key] = stored_codes(arrays[key], self.dtypes[key.removeprefix("codes/")])
        self.writer.add(first, arrays, rows, seq, need_pos)


def _to_host(t: Tensor) -> Tensor:
    """`t` on the CPU; from CUDA through pinned memory without waiting (synchronise before reading it)."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
