"""The local store of the action cache (`<cache>/.store`, or `[cache] store`):

    blobs/<b3[:2]>/<b3>             each file once, named by the blake3 of its bytes; a hard link
                                    to the output where the file system allows, so it costs no space
    entries/<key[:2]>/<key>.json    what one key produced: path (under the cache folder) → blake3 and
                                    size, and the facts of the run that made it (platform, wall time)
    tmp/                            work in progress (pulls, pushes), never read as an entry

An entry is written after all its blobs, by rename: a killed build can leave blobs that no entry
names (`doit cache-gc` removes them), never an entry whose blobs are missing. A blob is trusted
while it has the size, mtime and inode it had when its digest was last taken (as doit trusts
file_dep); otherwise it is hashed again, and an entry whose bytes no longer match is discarded.
An entry's file mtime is when it was last used: `cache-gc` drops the least recently used first.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .atomic import atomic_dir, atomic_file, link_or_copy, process_alive
from .hashing import file_blake3, file_sha256, remember, stat_key

FORMAT = 1  # of entries and of the action keys that name them


class StoredFile(BaseModel):
    blake3: str
    size: int
    sha256: str | None = None  # known once the file went to or came from a registry
    seen: list[int] | None = None  # the blob's [size, mtime_ns, inode] when its digest was last taken (local)


class Entry(BaseModel):
    format: int = FORMAT
    key: str
    task: str
    files: dict[str, StoredFile]  # path relative to the cache folder
    run: dict  # the run that made it: platform, wall_s, peak_rss_mb

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())


def warn(message: str) -> None:
    print(f"modelmake: warning: {message}", file=sys.stderr, flush=True)


def megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


@dataclass(frozen=True)
class Store:
    root: Path

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest

    def entry_path(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / f"{key}.json"

    def work_dir(self, purpose: str) -> Path:
        """A fresh folder under tmp/ named by process, so `cache-gc` can tell abandoned ones."""
        folder = self.root / "tmp" / f"{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder

    def lookup(self, key: str) -> Entry | None:
        path = self.entry_path(key)
        try:
            return Entry.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError):
            warn(f"cache entry {path} is unreadable; discarding it")
            self.discard(key)
            return None

    def discard(self, key: str) -> None:
        self.entry_path(key).unlink(missing_ok=True)

    def intact(self, entry: Entry) -> str | None:
        """None if every blob still holds its bytes, else what is wrong (and the damaged blob is removed,
        so the next record puts good bytes in its place). A blob hashed again and found good has its
        new stat written into the entry, so the next restore trusts it without reading it."""
        seen = {}
        for path, stored in sorted(entry.files.items()):
            blob = self.blob(stored.blake3)
            try:
                st = os.stat(blob)
            except FileNotFoundError:
                return f"{path}: its blob is missing"
            if stored.seen == stat_key(st):
                continue
            if st.st_size != stored.size or file_blake3(blob) != stored.blake3:
                blob.unlink(missing_ok=True)
                return f"{path}: its blob's bytes no longer hash to {stored.blake3[:16]}…"
            seen[path] = stored.model_copy(update={"seen": stat_key(st)})
        if seen:
            self.write_entry(entry.model_copy(update={"files": entry.files | seen}))
        return None

    def place(self, source: Path, digest: str) -> list[int]:
        """Make `source` (whose blake3 is `digest`) the blob for `digest`; return the blob's stat.
        A hard link replaces whatever was there, so a damaged old blob never survives a record."""
        blob = self.blob(digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if blob.exists() and os.path.samefile(blob, source):
            return stat_key(os.stat(blob))
        tmp = blob.with_name(f".{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.link(source, tmp)
        except OSError:  # another file system: copy, unless a good copy is already there
            if blob.exists() and file_blake3(blob) == digest:
                return stat_key(os.stat(blob))
            shutil.copyfile(source, tmp)
        os.replace(tmp, blob)
        # Another thread may have placed the same file meanwhile: renaming a hard link onto another link
        # of the same file does nothing (POSIX), and would leave the temporary name behind.
        tmp.unlink(missing_ok=True)
        return stat_key(os.stat(blob))

    def record(self, key: str, task: str, cache_dir: Path, files: list[Path], run: dict) -> Entry:
        return self.record_named(key, task, {path.relative_to(cache_dir).as_posix(): path for path in files}, run)

    def record_named(self, key: str, task: str, files: dict[str, Path], run: dict) -> Entry:
        """An entry of `files` (the name each has in the entry → the file), every one placed as a blob."""
        stored = {}
        for name, path in files.items():
            digest = file_blake3(path)
            stored[name] = StoredFile(blake3=digest, size=os.path.getsize(path), seen=self.place(path, digest))
        return self.write_entry(Entry(key=key, task=task, files=stored, run=run))

    def write_entry(self, entry: Entry) -> Entry:
        with atomic_file(self.entry_path(entry.key)) as tmp:
            tmp.write_text(entry.model_dump_json(indent=1, exclude_none=True) + "\n", encoding="utf-8")
        return entry

    def restore(self, entry: Entry, written: tuple[Path, ...], cache_dir: Path) -> None:
        """Put the entry's files in place, each folder and file renamed in whole, as the stage would;
        their digests are known (the blobs were verified), so later tasks do not hash them again."""
        for target in written:
            rel = target.relative_to(cache_dir).as_posix()
            inside = {path: f for path, f in entry.files.items() if path.startswith(rel + "/")}
            if inside:
                with atomic_dir(target) as tmp:
                    for path, stored in inside.items():
                        placed = tmp / path[len(rel) + 1:]
                        placed.parent.mkdir(parents=True, exist_ok=True)
                        link_or_copy(self.blob(stored.blake3), placed)
            elif rel in entry.files:
                with atomic_file(target) as tmp:
                    link_or_copy(self.blob(entry.files[rel].blake3), tmp)
        for path, stored in entry.files.items():
            remember(cache_dir / path, stored.blake3, stored.sha256)
        os.utime(self.entry_path(entry.key))  # used now: the last to go in `cache-gc`

    def entries(self) -> list[tuple[float, Entry]]:
        """(last used, entry) of every readable entry, least recently used first."""
        found = []
        for path in (self.root / "entries").glob("*/*.json"):
            try:
                found.append((path.stat().st_mtime, Entry.model_validate_json(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, ValidationError):
                continue
        return sorted(found, key=lambda pair: pair[0])

    def blobs(self) -> list[Path]:
        return [p for p in (self.root / "blobs").glob("*/*") if not p.name.startswith(".")]


def entry_sha256s(entry: Entry, store: Store) -> Entry:
    """The entry with every file's sha256 (what a registry names blobs by), from the local blobs."""
    files = {path: f.model_copy(update={"sha256": f.sha256 or file_sha256(store.blob(f.blake3))})
             for path, f in entry.files.items()}
    return entry.model_copy(update={"files": files})


# ---- housekeeping ----


@dataclass
class StoreSize:
    entries: int
    blobs: int
    size: int  # bytes of every blob
    own: int  # bytes of blobs no output in any cache folder links to: what the store alone costs


def measure(store: Store) -> StoreSize:
    blobs = store.blobs()
    stats = [b.stat() for b in blobs]
    return StoreSize(entries=len(list((store.root / "entries").glob("*/*.json"))), blobs=len(blobs),
                     size=sum(s.st_size for s in stats), own=sum(s.st_size for s in stats if s.st_nlink == 1))


def collect_garbage(store: Store, keep_size: int, protected: set[str]) -> str:
    """Drop least recently used entries until the blobs they keep fit in `keep_size` bytes, never
    one in `protected` (the current build's keys); then every blob no entry names, and abandoned
    work folders."""
    entries = store.entries()
    refs: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for _, entry in entries:
        for f in entry.files.values():
            refs[f.blake3] = refs.get(f.blake3, 0) + 1
            sizes[f.blake3] = f.size
    total = sum(sizes.values())
    dropped = 0
    for _, entry in entries:
        if total <= keep_size:
            break
        if entry.key in protected:
            continue
        store.discard(entry.key)
        dropped += 1
        for f in entry.files.values():
            refs[f.blake3] -= 1
            if refs[f.blake3] == 0:
                total -= sizes[f.blake3]
    freed = 0
    for blob in store.blobs():
        if refs.get(blob.name, 0) == 0:
            freed += blob.stat().st_size
            blob.unlink()
    for folder in (store.root / "tmp").glob("*-*-*"):
        if not process_alive(int(folder.name.split("-")[1])):
            shutil.rmtree(folder, ignore_errors=True)
    kept = len(entries) - dropped
    note = "" if total <= keep_size else (f"; still over {megabytes(keep_size)}: the current build's "
                                          f"{len(protected & {e.key for _, e in entries})} entries are kept whatever their size")
    return (f"{store.root}: dropped {dropped} of {len(entries)} entries (least recently used first), removed "
            f"{megabytes(freed)} of blobs; {kept} entries, {megabytes(total)} kept{note}")
