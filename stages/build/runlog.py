"""Run records: when each task last ran, how long it took and the memory it peaked at.

One small JSON per task under cache/.runs/, written when the task succeeds; the report reads
them. Every record names the build (the doit process) it came from, so the report can tell the
tasks that ran in the last build from those that were up to date.
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import resource
import sys
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


def platform_facts() -> dict[str, str]:
    """Where a task runs, as far as it can change bytes everywhere: the OS and the CPU architecture."""
    return {"os": platform.system(), "arch": platform.machine()}


@contextlib.contextmanager
def measured(cache: Path, task: str):
    """Time the block and take its peak memory; write the record only if it succeeds. The block
    adds to the yielded run what else shaped its bytes (run["platform"]: train's device and dtype)
    or that it restored its outputs from the action cache; on exit the run holds the whole record."""
    per_task = _reset_peak()
    started = time.perf_counter()
    run = {"platform": platform_facts()}
    yield run
    run |= {"task": task, "build": BUILD, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - started, 3), "peak_rss_mb": round(_peak_mb(), 1),
            "peak_of": "task" if per_task else "process"}
    path = record_path(cache, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(run, sort_keys=True) + "\n", encoding="utf-8")


def read_records(cache: Path) -> dict[str, dict]:
    """task → its last record."""
    records = {}
    for path in sorted((cache / ".runs").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        records[record["task"]] = record
    return records
