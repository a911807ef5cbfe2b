"""Run records: when each task last ran, how long it took and the memory it peaked at.

One small JSON per task under cache/.runs/, written when the task succeeds; the report reads
them. Every record names the build (the doit process) it came from, so the report can tell the
tasks that ran in the last build from those that were up to date.

Memory is recorded twice, because the resident size alone misleads: a stage that memory-maps a
7B model's shards (convert, quantize, eval) shows their pages as resident, though the kernel can
drop them at any time and no other process is short of memory for them. `peak_anon_mb` is the
memory the task itself allocated (heap, tensors, buffers), the figure that decides whether a build
fits a machine; `peak_file_mb` the file pages it had mapped; `peak_rss_mb` their peak sum (VmHWM).
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import resource
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .atomic import atomic_file

BUILD = datetime.now(timezone.utc).isoformat(timespec="seconds")  # this doit process


def record_path(cache: Path, task: str) -> Path:
    stage, _, name = task.partition(":")
    return cache / ".runs" / f"{stage}.{name}.json"


def _reset_peak() -> bool:
    """Linux can restart a process's peak-memory counter (VmHWM); elsewhere the peak is the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _resident_kb() -> tuple[int, int] | None:
    """(anonymous, file-backed) resident kB of this process, or None where /proc does not tell."""
    try:
        status = Path("/proc/self/status").read_text()
        return (int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)),
                int(re.search(r"RssFile:\s+(\d+) kB", status).group(1)))
    except (OSError, AttributeError):
        return None


class ResidentPeaks:
    """Peak anonymous and file-backed resident memory while a task runs. Linux keeps a peak only of
    their sum (VmHWM), so both are sampled, every 20 ms from a thread: a peak shorter than that can
    be missed, which the sum's exact peak bounds."""

    INTERVAL_S = 0.02

    def __init__(self):
        self.anon_kb = self.file_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def _sample(self) -> bool:
        resident = _resident_kb()
        if resident:
            self.anon_kb, self.file_kb = max(self.anon_kb, resident[0]), max(self.file_kb, resident[1])
        return resident is not None

    def _sample_until_stopped(self) -> None:
        while self._sample() and not self._stop.wait(self.INTERVAL_S):
            pass

    def __enter__(self) -> ResidentPeaks:
        if self._sample():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()

    def record(self) -> dict[str, float]:
        if not self.anon_kb:
            return {}
        return {"peak_anon_mb": round(self.anon_kb / 1024, 1), "peak_file_mb": round(self.file_kb / 1024, 1)}


def platform_facts() -> dict[str, str]:
    """Where a task runs, as far as it can change bytes everywhere: the OS and the CPU architecture."""
    return {"os": platform.system(), "arch": platform.machine()}


@contextlib.contextmanager
def peak_memory():
    """The block's peak memory in this process: the yielded dict is filled as the block ends."""
    per_task = _reset_peak()
    found: dict = {}
    with ResidentPeaks() as peaks:
        yield found
    found |= {"peak_rss_mb": round(_peak_mb(), 1), "peak_of": "task" if per_task else "process", **peaks.record()}


@contextlib.contextmanager
def measured(cache: Path, task: str):
    """Time the block and take its peak memory; write the record only if it succeeds. The block
    adds to the yielded run what else shaped its bytes (run["platform"]: train's device and dtype)
    or that it restored its outputs from the action cache; on exit the run holds the whole record.
    What the block set itself wins: a task run elsewhere (a Ray worker) brings its own peak memory."""
    started, started_at = time.perf_counter(), time.time()
    run = {"platform": platform_facts()}
    with peak_memory() as memory:
        yield run
    here = {"task": task, "build": BUILD, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "started_at": round(started_at, 3),  # seconds since the epoch: when tasks of `doit -n N` overlapped
            "wall_s": round(time.perf_counter() - started, 3), **memory}
    run |= {key: value for key, value in here.items() if key not in run}
    path = record_path(cache, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(run, sort_keys=True) + "\n", encoding="utf-8")
    failure_path(cache, task).unlink(missing_ok=True)


def failure_path(cache: Path, task: str) -> Path:
    return record_path(cache, task).parent / "failed" / record_path(cache, task).name


def record_failure(cache: Path, task: str, error: str) -> None:
    """A task's last failure, kept until it succeeds: what `doit compare` shows for a failed variant.
    Best effort: a disk too full to take it must not hide the failure itself."""
    path = failure_path(cache, task)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"task": task, "error": error, "build": BUILD}) + "\n", encoding="utf-8")
    except OSError:
        pass


def read_failures(cache: Path) -> dict[str, str]:
    """task → the error of its last run, for the tasks whose last run failed."""
    found = {}
    for path in sorted((cache / ".runs" / "failed").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        found[record["task"]] = record["error"]
    return found


def read_records(cache: Path) -> dict[str, dict]:
    """task → its last record."""
    records = {}
    for path in sorted((cache / ".runs").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        records[record["task"]] = record
    return records
