"""The action cache's remote: entries as OCI artifacts in a registry (GHCR, Harbor, ECR, Zot,
Docker's distribution), so a fresh clone, a CI runner or a teammate restores what another
machine built.

One entry is one OCI image manifest tagged with its action key under `[cache] remote`
(`host[:port]/repository`): a config blob `application/vnd.modelmake.cache.entry.v1+json` that is
the entry itself (task, key, each file's path, size, blake3 and sha256, the run's platform), and
one layer `application/vnd.modelmake.cache.file.v1` per distinct file, titled with its path.
skopeo moves the bytes (as for `doit push`); a pulled entry is checked before anything is
restored: every blob's size and sha256 against the manifest, the config's key against the tag,
and each file's blake3 against the config.

A remote that is down, refuses the credentials or has no skopeo costs one warning line and is
left alone for the rest of the process; a damaged entry is skipped with a warning naming it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from . import registry
from ..formats import oci
from .errors import BuildError
from .hashing import file_blake3
from .store import Entry, Store, entry_sha256s, warn

ENTRY_CONFIG = "application/vnd.modelmake.cache.entry.v1+json"
FILE_LAYER = "application/vnd.modelmake.cache.file.v1"
UNUSABLE = ("auth", "unreachable", "plain-http", "no-skopeo")  # failures that no other entry would escape

_unusable: dict[str, str] = {}  # repository → why this process no longer asks it


def entry_config(entry: Entry) -> dict:
    """The config blob: the entry without the local stat facts."""
    return entry.model_dump(mode="json", exclude_none=True, exclude={"files": {"__all__": {"seen"}}})


def entry_layers(entry: Entry, store: Store) -> list[oci.Layer]:
    """One layer per distinct file (a GGUF and its copy in a package are one blob), in path order."""
    layers: dict[str, oci.Layer] = {}
    for path, f in sorted(entry.files.items()):
        layers.setdefault(f.sha256, oci.Layer(store.blob(f.blake3), FILE_LAYER, path, f"sha256:{f.sha256}", f.size))
    return list(layers.values())


def entry_from_layout(layout: Path, key: str) -> Entry:
    """The entry a pulled layout holds, once every blob is checked; a ValueError says what is wrong."""
    try:
        _, manifest = registry.verify_layout(layout)
    except BuildError as err:
        raise ValueError(str(err)) from None
    if manifest["config"].get("mediaType") != ENTRY_CONFIG:
        raise ValueError(f"its config is {manifest['config'].get('mediaType')}, not a modelmake cache entry")
    try:
        entry = Entry.model_validate_json(oci.blob_path(layout, manifest["config"]["digest"]).read_bytes())
    except ValidationError as err:
        raise ValueError(f"its config is not a cache entry ({err.errors()[0]['msg']})") from None
    if entry.key != key:
        raise ValueError(f"it holds the entry of key {entry.key[:16]}…")
    layers = {layer["digest"] for layer in manifest["layers"]}
    for path, f in entry.files.items():
        if f"sha256:{f.sha256}" not in layers:
            raise ValueError(f"{path} has no layer")
        if file_blake3(oci.blob_path(layout, f"sha256:{f.sha256}")) != f.blake3:
            raise ValueError(f"{path} does not hash to the blake3 its config names")
    return entry


@dataclass(frozen=True)
class Remote:
    repository: str  # host[:port]/repository
    push: bool
    tls_verify: bool | None

    def ref(self, key: str) -> str:
        return f"{self.repository}:{key}"

    @property
    def usable(self) -> bool:
        return self.repository not in _unusable

    def give_up(self, err: registry.SkopeoError) -> None:
        _unusable[self.repository] = str(err)
        warn(f"cache remote {self.repository}: {err}. Building without it for the rest of this build.")

    def fetch(self, key: str, task: str, store: Store) -> Entry | None:
        """The entry of `key` from the registry, verified and put into the local store; None on a miss,
        a damaged entry (warned) or a remote that cannot be used (warned once)."""
        if not self.usable:
            return None
        ref, host = self.ref(key), self.repository.split("/", 1)[0]
        work = store.work_dir("pull")
        try:
            started = time.perf_counter()
            with registry.auth_file(host) as authfile:
                registry.skopeo("copy", "--quiet", f"--retry-times={registry.RETRIES}",
                                *registry.transport_flags("src-", host, self.tls_verify, authfile),
                                f"docker://{ref}", f"oci:{work / 'oci'}:entry", ref=ref)
            entry = entry_from_layout(work / "oci", key)
            seconds = time.perf_counter() - started
            files = {path: f.model_copy(update={"seen": store.place(oci.blob_path(work / "oci", f"sha256:{f.sha256}"),
                                                                     f.blake3)})
                     for path, f in entry.files.items()}
            entry = store.write_entry(entry.model_copy(update={"files": files}))
            print(f"pulled {task} from {self.repository}: {entry.size / 1e6:,.1f} MB in {seconds:.2f} s "
                  f"({entry.size / 1e6 / max(seconds, 1e-6):,.0f} MB/s), every blob verified")
            return entry
        except registry.SkopeoError as err:
            if err.kind == "missing":
                return None
            if err.kind in UNUSABLE:
                self.give_up(err)
            else:
                warn(f"cache entry {task} (key {key[:16]}…) at {ref} could not be pulled ({err}); building it here")
            return None
        except ValueError as err:
            warn(f"cache entry {task} (key {key[:16]}…) at {ref} is damaged: {err}; building it here")
            return None
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def upload(self, entry: Entry, store: Store) -> str:
        """Push one entry; return its `repository@sha256:…`. Raises registry.SkopeoError or BuildError."""
        entry = store.write_entry(entry_sha256s(entry, store))  # keep the sha256s for the next push
        work = store.work_dir("push")
        try:
            started = time.perf_counter()
            oci.write_layout(work / "oci", entry_layers(entry, store), entry_config(entry), entry.key, ENTRY_CONFIG)
            pushed = registry.push(layout=work / "oci", tag=entry.key, ref=self.ref(entry.key),
                                   tls_verify=self.tls_verify)
            seconds = time.perf_counter() - started
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"pushed {entry.task} to {self.repository}: {entry.size / 1e6:,.1f} MB in {seconds:.2f} s "
              f"(tag {entry.key[:16]}…)")
        return pushed

    def upload_or_warn(self, entry: Entry, store: Store) -> None:
        """During a build: a failed push costs a warning, never the build."""
        if not self.usable:
            return
        try:
            self.upload(entry, store)
        except registry.SkopeoError as err:
            if err.kind in UNUSABLE:
                self.give_up(err)
            else:
                warn(f"cache entry {entry.task} (key {entry.key[:16]}…) was not pushed to {self.repository}: {err}")
        except BuildError as err:
            warn(f"cache entry {entry.task} (key {entry.key[:16]}…) was not pushed to {self.repository}: {err}")
