"""Which torch device `device = "auto"` means on this machine: the spec asks it when it loads (an
option that needs CUDA is refused before anything runs), and the train stage trains on it. torch is imported
only when asked. And how many CPU cores "threads = 0" (all of them) means here."""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (`taskset`, a container's cpuset, a test
    worker's core), not the machine's count. llama.cpp and torch threads spin while they wait for
    each other, so more threads than cores slows a build down several times over."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def pick_device(requested: str) -> str:
    """"auto" → cuda, else mps, else cpu; any other name is taken as given."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"
