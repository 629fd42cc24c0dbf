"""The same seed gives the same result on the same CPU, whatever the number of torch threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["deterministic_on_cpu"]


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device | str) -> Iterator[None]:
    """Within the block, torch's deterministic kernels on a CPU (the previous setting is put back after).

    With two or more threads some CPU backward kernels add up their parts in whatever order the threads finish, so two
    runs of the same seed drift apart by rounding (measured: the FSM model's weights differ after 8 steps at 2
    threads, and match at 1). Their deterministic forms cost nothing measurable here. On an accelerator nothing
    changes: there they can need settings (e.g. CUBLAS_WORKSPACE_CONFIG) that only the user can make.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
