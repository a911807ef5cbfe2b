"""Content hashes that decide staleness.

doit's stock checkers look at mtime or md5. modelmake decides by blake3 of the bytes,
and remembers (size, mtime_ns, inode) → blake3 so an unchanged multi-GB file is
stat'ed, not re-read, on every run. A task is also stale when its parameters or
the versions of the tools that produce its bytes change (see `fingerprint`), or when
one of its outputs no longer hashes to what the last run recorded (`outputs_intact`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import blake3
from doit.dependency import FileChangedChecker

_digests: dict[tuple, str] = {}
_rayon_owner: int | None = None  # the process whose blake3 hashing started rayon's thread pool


def _hasher():
    """A blake3 hasher on every core, except in a process forked from one whose hashing already started
    rayon's thread pool (doit -n N checks tasks before it forks its workers): the pool's threads do not
    survive the fork, and the child would wait for them forever. There it hashes on one thread."""
    global _rayon_owner
    if _rayon_owner is None:
        _rayon_owner = os.getpid()
    return blake3.blake3(max_threads=blake3.blake3.AUTO if _rayon_owner == os.getpid() else 1)


def _memo_key(path) -> tuple:
    """The file's identity, not its name: hard links (a GGUF, its copy in a package, its OCI blob) share it."""
    st = os.stat(path)
    return (st.st_dev, *stat_key(st))


def file_blake3(path: str | os.PathLike) -> str:
    """blake3 of a file's bytes, remembered for this process by (device, size, mtime_ns, inode):
    a stage's output is recorded, then checked as the next stage's input, then listed in the
    manifest, and is read once."""
    key = _memo_key(path)
    if key not in _digests:
        # Fixed-size reads, not mmap: hashing a multi-GB shard must not grow the process by its size.
        hasher, buffer = _hasher(), bytearray(16 << 20)
        with open(path, "rb", buffering=0) as f:
            while count := f.readinto(buffer):
                hasher.update(memoryview(buffer)[:count])
        _digests[key] = hasher.hexdigest()
    return _digests[key]


_sha256s: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered like `file_blake3`."""
    key = _memo_key(path)
    if key not in _sha256s:
        with open(path, "rb") as f:
            _sha256s[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _sha256s[key]


def file_digests(path: str | os.PathLike) -> tuple[str, str]:
    """(blake3, sha256) of an output in one read, remembered like `file_blake3`: the manifest, the
    package and the OCI layout all need both, and reading a 14 GB GGUF twice costs seconds each time.
    sha256 runs in a second thread on each chunk while blake3 hashes it, so the pass costs the slower
    of the two, not their sum."""
    key = _memo_key(path)
    if key not in _digests or key not in _sha256s:
        b3, sha = _hasher(), hashlib.sha256()
        buffers, pending = (bytearray(16 << 20), bytearray(16 << 20)), None
        with ThreadPoolExecutor(1) as sha_thread, open(path, "rb", buffering=0) as f:
            for turn in itertools.count():
                buffer = buffers[turn % 2]  # the other one may still be in sha256's hands
                if not (count := f.readinto(buffer)):
                    break
                chunk = memoryview(buffer)[:count]
                if pending:
                    pending.result()
                pending = sha_thread.submit(sha.update, chunk)
                b3.update(chunk)
            if pending:
                pending.result()
        _digests[key], _sha256s[key] = b3.hexdigest(), sha.hexdigest()
    return _digests[key], _sha256s[key]


def remember(path: str | os.PathLike, blake3_hex: str, sha256_hex: str | None = None) -> None:
    """Digests of a file known without reading it (computed while it was written, or restored from
    a verified blob), so it is not read back to hash it."""
    key = _memo_key(path)
    _digests[key] = blake3_hex
    if sha256_hex:
        _sha256s[key] = sha256_hex


class HashingWriter:
    """A write-only file wrapper that hashes (blake3 and sha256) what passes through it. sha256 runs
    in a second thread while the chunk is hashed by blake3 and written (both release the GIL), so a
    multi-GB tar costs about its write, not write + two hashes."""

    def __init__(self, file):
        self.file, self.blake3, self.sha256 = file, _hasher(), hashlib.sha256()
        self._sha_thread = ThreadPoolExecutor(1)

    def write(self, data) -> int:
        pending = self._sha_thread.submit(self.sha256.update, data)
        self.blake3.update(data)
        written = self.file.write(data)
        pending.result()  # the caller may reuse `data`'s buffer once this returns
        return written

    def tell(self) -> int:
        return self.file.tell()


def stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class Blake3Checker(FileChangedChecker):
    """doit file checker: state is [size, mtime_ns, inode, blake3]."""

    def check_modified(self, file_path, file_stat, state):
        if not isinstance(state, list) or len(state) != 4:
            return True  # state from another checker
        if stat_key(file_stat) == state[:3]:
            return False
        if file_stat.st_size != state[0]:
            return True
        return file_blake3(file_path) != state[3]

    def get_state(self, dep, current_state):
        key = stat_key(os.stat(dep))
        if isinstance(current_state, list) and current_state[:3] == key:
            return None  # unchanged: doit keeps the saved state
        return [*key, file_blake3(dep)]


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def tool_versions(*distributions: str) -> dict[str, str]:
    """Installed versions of the packages whose code shapes a stage's bytes.

    Read from package metadata, not by importing, so `doit list` stays instant.
    """
    versions = {}
    for name in distributions:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def fingerprint(params: dict, versions: dict) -> str:
    """One digest for everything, besides input files, that shapes a stage's output."""
    return blake3.blake3(canonical_json({"params": params, "versions": versions}).encode()).hexdigest()


def record_outputs(paths: list[str]) -> dict[str, list]:
    """What `outputs_intact` compares against on the next run. Both digests are taken, while the
    file is fresh in the page cache: the manifest and the package need its sha256 too."""
    return {p: [*stat_key(os.stat(p)), file_digests(p)[0]] for p in paths}


def outputs_intact(task, values) -> bool:
    """doit `uptodate` callable: every output still has the bytes the last run wrote."""
    recorded = values.get("outputs")
    if not recorded:
        return False
    for path, (size, mtime_ns, ino, digest) in recorded.items():
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if stat_key(st) == [size, mtime_ns, ino]:
            continue
        if st.st_size != size or file_blake3(path) != digest:
            return False
    return True


def tree_files(root: Path) -> list[Path]:
    """Every regular file under `root`, sorted, hidden files and folders left out."""
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def expand_files(paths: list[Path]) -> list[Path]:
    """Folders replaced by the files in them."""
    return [f for p in paths for f in (tree_files(p) if p.is_dir() else [p])]


INDEX = "files.b3"


def write_index(folder: Path) -> None:
    """`files.b3`: the blake3 of every file in a folder, in b3sum's format. Later stages depend on
    this one file, so a folder counts as changed exactly when one of its files does."""
    lines = [f"{file_digests(p)[0]}  {p.relative_to(folder).as_posix()}\n" for p in tree_files(folder) if p.name != INDEX]
    (folder / INDEX).write_text("".join(lines), encoding="utf-8")
