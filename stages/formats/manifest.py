"""`manifest.json` and `SHA256SUMS`: every artifact of a model with its size, blake3 and sha256, and
the inputs, parameters and tool versions that produced it.

Paths inside are relative to the model's cache folder, and inputs are named as the spec names them,
so the manifest is byte-identical on any machine. The manifest stage writes these files; the lock
reads them.
"""

from __future__ import annotations

import json

from pydantic import BaseModel


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
