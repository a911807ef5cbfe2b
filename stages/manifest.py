"""The manifest stage: every artifact of a model with its size, blake3 and sha256, and the inputs,
parameters and tool versions that produced it (`manifest.json`); plus `SHA256SUMS`. What those
files hold is `formats.manifest`; this module collects it and checks files against it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from .formats.manifest import Artifact, Manifest, manifest_json, sha256sums
from .ground.atomic import atomic_file
from .ground.errors import BuildError
from .ground.hashing import expand_files, file_blake3, file_sha256


class Producer(BaseModel):
    """What one task was given: the graph knows this before anything runs."""

    task: str
    outputs: list[str]  # paths relative to the model folder
    inputs: dict[str, str]  # input name (as the spec or cache names it) → path to hash
    params: dict
    versions: dict[str, str]


def collect(model_dir: Path, producers: list[Producer]) -> list[Artifact]:
    artifacts = []
    for producer in producers:
        inputs = {name: file_blake3(path) for name, path in sorted(producer.inputs.items())}
        for path in expand_files([model_dir / rel for rel in producer.outputs]):
            artifacts.append(Artifact(
                path=path.relative_to(model_dir).as_posix(), size=os.path.getsize(path), blake3=file_blake3(path), sha256=file_sha256(path),
                task=producer.task, inputs=inputs, params=producer.params, versions=producer.versions,
            ))
    return sorted(artifacts, key=lambda a: a.path)


def run(model: str, model_dir: Path, producers: list[Producer]) -> None:
    artifacts = collect(model_dir, producers)
    with atomic_file(model_dir / "manifest.json") as tmp:
        tmp.write_text(manifest_json(Manifest(model=model, artifacts=artifacts)), encoding="utf-8")
    with atomic_file(model_dir / "SHA256SUMS") as tmp:
        tmp.write_text(sha256sums(artifacts), encoding="utf-8")


def verify(model_dir: Path) -> int:
    """Re-hash every artifact against manifest.json and SHA256SUMS; name every file that differs."""
    manifest_path, sums_path = model_dir / "manifest.json", model_dir / "SHA256SUMS"
    if not manifest_path.is_file() or not sums_path.is_file():
        raise BuildError(f"{model_dir} has no manifest.json or SHA256SUMS: build it first with `doit`")
    manifest = Manifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
    listed = dict(line.split("  ", 1)[::-1] for line in sums_path.read_text(encoding="utf-8").splitlines() if line)
    problems = []
    for artifact in manifest.artifacts:
        path = model_dir / artifact.path
        if not path.is_file():
            problems.append(f"{artifact.path}: missing")
            continue
        if listed.pop(artifact.path, None) != artifact.sha256:
            problems.append(f"{artifact.path}: SHA256SUMS and manifest.json disagree")
        if path.stat().st_size != artifact.size or file_sha256(path) != artifact.sha256 \
                or file_blake3(path) != artifact.blake3:
            problems.append(f"{artifact.path}: bytes differ from the build's (sha256 now {file_sha256(path)[:16]}…)")
    problems += [f"{path}: in SHA256SUMS but not in manifest.json" for path in listed]
    if problems:
        raise BuildError(f"{model_dir.name}: {len(problems)} artifact(s) fail verification: " + "; ".join(problems)
                         + ". Rebuild with `doit` (it replaces damaged outputs).")
    return len(manifest.artifacts)
