"""Rank, world size and the few collectives `cache_codes` needs, from any initialised `torch.distributed` group."""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from cbinterp.core import distributed as dd


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size; (0, 1) without an initialised process group (or a group of one)."""
    return dd.rank(), dd.world_size()


def broadcast_from_zero(value):
    """`value` of rank 0, on every rank (any picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_all(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    out: list[Optional[object]] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    dist.barrier()
