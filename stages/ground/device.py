"""Which torch device `device = "auto"` means on this machine: the spec asks it when it loads (an
option that needs CUDA is refused before anything runs), and the train stage trains on it. torch is imported
only when asked."""

from __future__ import annotations


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
