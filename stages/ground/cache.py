"""The action cache: every task's finished outputs kept under its action key, so a stale task whose
key was seen before (a parameter switched back, a fresh clone, a teammate's build) is restored
instead of run, as Bazel's action cache and DVC's run-cache do.

The **action key** of a task is the blake3 of the canonical JSON of
`{"format", "task", "inputs": {name: blake3}, "params", "versions", "platform", "outputs"}`:
its input files by content (named as the manifest and the lock name them, never by host path),
its parameters as the spec resolves them, the versions of modelmake, the stage revision and
the tools that shape its bytes, the OS and CPU architecture, and where its outputs go. The same
task on the same inputs has the same key on every machine of that platform (`action_key`, pure).

The files themselves live in the local store (`store`); a registry can stand behind it (`remote`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import blake3

from .hashing import canonical_json, expand_files, file_blake3
from .remote import Remote
from .runlog import platform_facts
from .store import FORMAT, Store, megabytes, warn


def action_key(task: str, inputs: dict[str, str], params: dict, versions: dict[str, str],
               platform: dict[str, str], outputs: list[str]) -> str:
    """The digest of everything that decides a task's outputs (see the module's doc)."""
    recipe = {"format": FORMAT, "task": task, "inputs": inputs, "params": params, "versions": versions,
              "platform": platform, "outputs": sorted(outputs)}
    return blake3.blake3(canonical_json(recipe).encode()).hexdigest()


@dataclass(frozen=True)
class Recipe:
    """One task as the cache sees it: what its key digests and what it writes."""

    task: str  # `stage:name`
    inputs: dict[str, Path]  # input name (the same on every machine) → the file
    params: dict
    versions: dict[str, str]
    written: tuple[Path, ...]  # the files and folders the task writes (a folder is replaced whole)
    cache_dir: Path

    def key(self) -> str:
        inputs = {name: file_blake3(path) for name, path in sorted(self.inputs.items())}
        outputs = [p.relative_to(self.cache_dir).as_posix() for p in self.written]
        return action_key(self.task, inputs, self.params, self.versions, platform_facts(), outputs)

    def files(self) -> list[Path]:
        return expand_files(list(self.written))


class ActionKey:
    """What `doit info TASK` prints under meta: the key this task would look up now."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def __repr__(self) -> str:
        missing = [name for name, path in self.recipe.inputs.items() if not path.is_file()]
        if missing:
            return f"(not yet known: input {missing[0]} is not built)"
        return self.recipe.key()


# ---- the cache a build uses: the local store, and a registry behind it ----

@dataclass(frozen=True)
class ActionCache:
    store: Store
    remote: Remote | None = None

    def restore(self, recipe: Recipe, key: str) -> dict | None:
        """Restore the outputs of `key` if it was built before (here, else in the remote); return the
        run facts to record, or None to run the task."""
        entry, where = self.store.lookup(key), "the local store"
        if entry:
            damage = self.store.intact(entry)
            if damage:
                warn(f"cache entry {entry.task} (key {key[:16]}…) in {self.store.root} is damaged ({damage}); "
                     "discarding it and building")
                self.store.discard(key)
                entry = None
        if entry is None and self.remote is not None:
            entry, where = self.remote.fetch(key, recipe.task, self.store), f"registry {self.remote.repository}"
        if entry is None:
            return None
        started = time.perf_counter()
        try:
            self.store.restore(entry, recipe.written, recipe.cache_dir)
        except OSError as err:  # a full disk, a store on a read-only mount: build instead
            warn(f"could not restore {entry.task} from {where} ({err}); building it")
            return None
        print(f"restored from {where} (action key {key[:16]}…, {len(entry.files)} files, {megabytes(entry.size)}, "
              f"built in {entry.run.get('wall_s', 0):,.1f} s on {entry.run.get('platform', {}).get('os', '?')})")
        return {"platform": entry.run.get("platform", {}), "restored": where, "built_wall_s": entry.run.get("wall_s"),
                "restore_s": round(time.perf_counter() - started, 3)}

    def record(self, recipe: Recipe, key: str, run: dict) -> None:
        facts = {k: run[k] for k in ("platform", "wall_s", "peak_rss_mb") if k in run}
        try:
            entry = self.store.record(key, recipe.task, recipe.cache_dir, recipe.files(), facts)
        except OSError as err:  # the build succeeded; only its reuse is lost
            warn(f"could not record {recipe.task} in {self.store.root} ({err})")
            return
        if self.remote is not None and self.remote.push:
            self.remote.upload_or_warn(entry, self.store)


