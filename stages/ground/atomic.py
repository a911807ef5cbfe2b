"""Write outputs beside their final place, then rename: a crash never leaves a file
or folder that looks finished."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

from .errors import BuildError

# What _temp_sibling and atomic_dir name their work in progress: `.NAME.tmp-PID`, `.NAME.old-PID`.
_IN_PROGRESS = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with _explained(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _explained(path: Path):
    """A failure while writing `path`, said so that its reader knows what to do: an OSError names
    the output, and a full disk is named as the cause even where the writer did not say so."""
    try:
        yield
    except OSError as err:
        named = _named(err, path)
        if named is err:
            raise
        raise named from err
    except BuildError as err:  # a tool that died writing here: it seldom says that the disk was full
        if _disk_full(path):
            raise BuildError(f"{err} — the disk holding {path.parent} is full: free space on it, or give the cache a "
                             "folder on a larger one, and run doit again") from None
        raise


def _disk_full(path: Path) -> bool:
    """Whether the file system `path` is written on has (nearly) no room left: checked while a
    failed write's temporary file still holds its space."""
    return shutil.disk_usage(path.parent).free < 1 << 20


def _named(err: OSError, path: Path) -> OSError:
    """The error, naming the output it was writing: a write to an open file fails without a file name,
    and numpy's `tofile` (which gguf-py writes tensors with) reports a full disk only as a short
    write ("N requested and 0 written"), with no errno; the disk is then still full, which tells."""
    if err.errno is None and _disk_full(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if err.errno is not None and err.filename is None:
        err.filename = str(path)
    return err


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (no second copy of a multi-GB GGUF), else a copy.
    Safe because modelmake never rewrites a file in place: outputs are renamed in."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a fresh temporary folder; on success it takes the place of `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _explained(path):
            yield tmp
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (what left a temporary file or folder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep(folder: Path) -> list[Path]:
    """Remove the temporary files and folders that builds killed mid-write (SIGKILL, power loss, a
    closed laptop) left under `folder`, and return them; those of a process still running stay.
    Call it holding the cache's build lock, when no other build can be writing there."""
    swept = []
    for parent, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            match = _IN_PROGRESS.match(name)
            if match and not process_alive(int(match.group(1))):
                path = Path(parent) / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() \
                    else path.unlink(missing_ok=True)
                swept.append(path)
        dirs[:] = [d for d in dirs if not _IN_PROGRESS.match(d)]  # not into what was just removed
    return swept
