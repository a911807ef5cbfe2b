"""The build manifest: every artifact of a model with its size, blake3 and sha256, and
the inputs, parameters and tool versions that produced it; plus `SHA256SUMS`.

Paths inside are relative to the model's cache folder, and inputs are named as the
spec names them, so the manifest is byte-identical on any machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel

from .atomic import atomic_file
from .hashing import expand_files, file_blake3, file_sha256


class Producer(BaseModel):
    """What one task was given: the graph knows this before anything runs."""

    task: str
    outputs: list[str]  # paths relative to the model folder
    inputs: dict[str, str]  # input name (as the spec or cache names it) → path to hash
    params: dict
    versions: dict[str, str]


class Artifact(BaseModel):
    path: str
    size: int
    blake3: str
    sha256: str
    task: str
    inputs: dict[str, str]  # input name → blake3
    params: dict
    versions: dict[str, str]


class Manifest(BaseModel):
    model: str
    artifacts: list[Artifact]


def manifest_json(manifest: Manifest) -> str:
    return json.dumps(manifest.model_dump(), indent=2, sort_keys=True) + "\n"


def sha256sums(artifacts: list[Artifact]) -> str:
    """`sha256sum -c` format: digest, two spaces, path."""
    return "".join(f"{a.sha256}  {a.path}\n" for a in sorted(artifacts, key=lambda a: a.path))


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
