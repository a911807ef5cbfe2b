"""One build at a time per cache.

Two `doit` processes on one cache would both find the same tasks stale and both build them, each
renaming its outputs over the other's and saving its own view of doit's state. So a build takes an
exclusive lock on `cache/.build.lock` before doit checks any task, and holds it until doit has saved
its state; a second build waits for it (saying which process holds it) or, with `doit wait=no`,
fails at once. What only reads (`doit list`, `doit info`, `doit verify`, `doit push`) takes no lock.

The lock is an advisory `flock`, so the kernel releases it when its process dies, however it dies:
a build killed with SIGKILL never leaves a cache locked. The file itself stays, holding who has it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from doit.exceptions import InvalidTask
from doit.reporter import ConsoleReporter

from . import atomic

try:
    import fcntl
except ImportError:  # Windows: no flock; builds there are not guarded
    fcntl = None

LOCK_FILE = ".build.lock"
READ_ONLY = frozenset({"verify", "push", "pull", "cache-push", "serve"})  # tasks that write nothing the build reads


class CacheBusy(Exception):
    """Another process holds the cache and the caller asked not to wait."""


def holder_words(text: str) -> str:
    """What the lock file says of the process that holds it, in words."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written who it is"


def acquire(cache: Path, wait: bool, say=lambda line: print(line, file=sys.stderr, flush=True)):
    """Hold the cache's build lock; returns the open lock file (closing it releases the lock)."""
    cache.mkdir(parents=True, exist_ok=True)
    lock = open(cache / LOCK_FILE, "a+", encoding="utf-8")
    if fcntl is None:
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = holder_words(lock.read())
        if not wait:
            lock.close()
            raise CacheBusy(f"another build is using {cache} ({holder}); wait for it, or run without wait=no "
                            "to wait until it finishes") from None
        say(f"modelmake: another build is using {cache} ({holder}); waiting for it to finish "
            "(`doit wait=no` fails at once instead)")
        started = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        say(f"modelmake: the other build finished after {time.monotonic() - started:.0f} s; building")
    lock.truncate(0)
    lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join(["doit", *sys.argv[1:]])}))
    lock.flush()
    return lock


@contextlib.contextmanager
def slot(folder: Path, count: int, what: str, say=lambda line: print(line, file=sys.stderr, flush=True)):
    """Hold one of `count` slots for `what` (a file lock each, in `folder`): under `doit -n N` at most
    `count` such tasks run at once, across every process of this cache. Waits for a free one."""
    if fcntl is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"{what}-{i}.lock", "a+", encoding="utf-8") for i in range(count)]
    held, started = None, time.monotonic()
    try:
        while held is None:
            for handle in handles:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = handle
                    break
                except BlockingIOError:
                    continue
            if held is None:
                if started is not None:
                    say(f"modelmake: {count} {what} task{'s' if count > 1 else ''} already running; waiting for one "
                        f"to finish ([build] max_parallel_{what} = {count})")
                    started = None
                time.sleep(0.5)
        yield
    finally:
        for handle in handles:
            handle.close()  # closing releases the lock


def release(lock) -> None:
    if fcntl is not None:
        lock.truncate(0)
        fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()


def needs_lock(selected_tasks: list[str]) -> bool:
    return any(name.partition(":")[0] not in READ_ONLY for name in selected_tasks)


def reporter(cache: Path, wait: bool) -> type[ConsoleReporter]:
    """doit's console reporter, holding the cache's lock from before the first task is checked
    (`initialize`) until after doit has saved its state (`complete_run`): doit calls both around
    every run, in that order, and reads its state lazily, so a build that waited sees the other's."""

    class BuildLockReporter(ConsoleReporter):
        def initialize(self, tasks, selected_tasks):
            super().initialize(tasks, selected_tasks)
            self.lock = None
            if needs_lock(selected_tasks or []):
                try:
                    self.lock = acquire(cache, wait)
                except CacheBusy as err:
                    raise InvalidTask(f"modelmake: {err}") from None
                swept = atomic.sweep(cache)  # what a killed build left half-written
                if swept:
                    self.write(f"modelmake: removed {len(swept)} unfinished file(s) a killed build left in {cache}\n")

        def complete_run(self):
            if getattr(self, "lock", None):
                release(self.lock)
                self.lock = None
            super().complete_run()

    return BuildLockReporter
