"""Checkpoints of a training run, for a build killed at any moment to continue where it was.

A checkpoint holds everything the next step depends on: the LoRA weights, the optimizer and
scheduler state, every random generator (torch's, CUDA's, the data order's) and the batches
still to come of the current pass, so a resumed run takes the same steps with the same floats
as one never stopped. Checkpoints live under a folder named by the key of the run's inputs
(base, data, parameters, tool versions): a changed input finds none and starts fresh.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from ..ground.atomic import atomic_dir
from ..ground.units import duration_seconds

STATE = "state.pt"
STEP_FOLDER = re.compile(r"step-([0-9]{8})")


def folder_for(root: Path, key: str) -> Path:
    """The run's checkpoint folder; other runs' folders (stale inputs) go, and so do the half-written
    step folders a killed run left in this one."""
    here = root / key[:16]
    if root.is_dir():
        for other in [*root.iterdir(), *here.glob(".step-*")]:
            if other != here:
                shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink()
    return here


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint: a step folder is renamed into place only once it is whole."""
    steps = sorted(p for p in folder.glob("step-*") if STEP_FOLDER.fullmatch(p.name) and (p / STATE).is_file())
    return steps[-1] if steps else None


def load(checkpoint: Path) -> dict:
    import torch

    return torch.load(checkpoint / STATE, weights_only=False)  # our own file, written by save() below


def save(folder: Path, step: int, state: dict) -> Path:
    """Write step-N atomically, then drop the older ones."""
    import torch

    target = folder / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        torch.save(state, tmp / STATE)
    for older in folder.glob("step-*"):
        if older != target:
            shutil.rmtree(older, ignore_errors=True)
    return target


class Cadence:
    """When to write the next checkpoint: every N steps, or every so much wall time."""

    def __init__(self, every: int | str):
        self.steps, self.seconds = (every, 0) if isinstance(every, int) else (0, duration_seconds(every))
        self.since = time.monotonic()

    def due(self, step: int) -> bool:
        if self.steps:
            return step % self.steps == 0
        if self.seconds and time.monotonic() - self.since >= self.seconds:
            self.since = time.monotonic()
            return True
        return False
