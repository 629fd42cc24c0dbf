"""One rank of the torch.distributed code-cache tests (tests/codecache/test_distributed.py), run in a spawned process.

Each rank joins a gloo group (file rendezvous), caches the same input into the same folder, and writes what happened
to `<out>/rank<r>.json`: {"ok": true} or {"error": type, "message": ...}. `die_after` makes one rank exit abruptly
(no exception, no goodbye) once it has read that many batches, as a killed or crashed process would.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest beside this file: the tests' tiny model
from conftest import make_model  # noqa: E402

import cbinterp  # noqa: E402

HOOK = "blocks.0.mlp.hook_post"


def cb_model():
    return cbinterp.attach_codebooks(make_model(seed=0), ["attn", "mlp"], n_codes=16, seed=0)


def docs() -> tuple[torch.Tensor, torch.Tensor]:
    """11 documents of up to 8 tokens, right-padded (padding marked -1), one of them empty."""
    tokens = torch.randint(0, 11, (11, 8), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([8, 5, 8, 0, 3, 8, 8, 6, 1, 8, 7])
    mask = torch.arange(8)[None, :] < lengths[:, None]
    tokens = tokens.masked_fill(~mask, -1)  # padding may hold any id: it is never run as itself nor cached
    return tokens, mask


def cache_kwargs() -> dict:
    return dict(batch_size=2, hooks=[HOOK], chunk_tokens=10, progress=False, token_strings=[str(i) for i in range(11)])


def rank_main(rank: int, world: int, rdv: str, directory: str, out: str, die_rank: int, die_after: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rdv}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    tokens, mask = docs()

    def batches():
        for i, start in enumerate(range(0, tokens.shape[0], 2)):
            if rank == die_rank and i == die_after:
                os._exit(17)  # abrupt: what SIGKILL or a segfault leaves
            yield tokens[start : start + 2], mask[start : start + 2]

    try:
        cbinterp.cache_codes(cb_model(), batches(), directory=directory, **cache_kwargs())
        result = {"ok": True}
    except BaseException as err:  # noqa: BLE001 - reported to the test
        result = {"error": type(err).__name__, "message": str(err)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
