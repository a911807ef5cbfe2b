"""OCI image layouts holding Docker Model Runner model artifacts, and deterministic tars of them.

Formats, from Docker's model-spec (github.com/docker/model-spec) and the OCI image spec:
an image manifest whose config blob is `application/vnd.docker.ai.model.config.v0.1+json`
and whose layers are single uncompressed files, told apart by media type. Clients find the
model by the GGUF layer's media type.

Everything here is a pure function of the files' bytes and `created`: JSON with sorted keys,
no clock, no host, no user, so the same inputs give the same digests on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..ground.atomic import link_or_copy

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MODEL_CONFIG = "application/vnd.docker.ai.model.config.v0.1+json"
GGUF = "application/vnd.docker.ai.gguf.v3"
GGUF_LORA = "application/vnd.docker.ai.gguf.v3.lora"
LICENSE = "application/vnd.docker.ai.license"
CHAT_TEMPLATE = "application/vnd.docker.ai.chat.template.jinja"
# A vision model's projector GGUF, as Docker's model-runner code names it (`MediaTypeMultimodalProjector`)
# and passes it to llama.cpp's --mmproj; model-spec's text spells it application/vnd.docker.ai.gguf.v3.mmproj,
# which no client reads yet.
MMPROJ = "application/vnd.docker.ai.mmproj"

TITLE = "org.opencontainers.image.title"  # the file name a layer is written back to
REF_NAME = "org.opencontainers.image.ref.name"  # the tag inside an OCI layout's index.json


@dataclass(frozen=True)
class Layer:
    """One file of the artifact: its bytes live at `path`, its name inside the artifact is `title`."""

    path: Path
    media_type: str
    title: str
    digest: str  # sha256:<hex>
    size: int


def json_bytes(value) -> bytes:
    """The one JSON encoding of every blob we write: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def created_at(environ=os.environ) -> str:
    """RFC 3339 time of `SOURCE_DATE_EPOCH` (the reproducible-builds convention), else the epoch."""
    seconds = int(environ.get("SOURCE_DATE_EPOCH", "0") or "0")
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def descriptor(media_type: str, digest: str, size: int, annotations: dict | None = None) -> dict:
    described = {"mediaType": media_type, "digest": digest, "size": size}
    return described | ({"annotations": annotations} if annotations else {})


def layer_descriptor(layer: Layer) -> dict:
    return descriptor(layer.media_type, layer.digest, layer.size, {TITLE: layer.title})


def model_config(gguf_facts: dict, layers: list[Layer], created: str) -> dict:
    """The model config blob. `gguf_facts` holds architecture, parameter_count, quantization and the
    GGUF's scalar metadata. Both the model-spec's `files` and the `rootfs.diff_ids` that Docker's
    model-distribution code reads are written: layers are uncompressed, so a diffID is the digest."""
    return {
        "config": {
            "format": "gguf",
            "format_version": "3",
            "architecture": gguf_facts["architecture"],
            "parameters": gguf_facts["parameter_count"],
            "quantization": gguf_facts["quantization"],
            "size": str(sum(layer.size for layer in layers if layer.media_type in (GGUF, GGUF_LORA))),
            "gguf": gguf_facts,
        },
        "descriptor": {"createdAt": created},
        "files": [{"diffID": layer.digest, "type": layer.media_type} for layer in layers],
        "rootfs": {"type": "rootfs", "diff_ids": [layer.digest for layer in layers]},
    }


def image_manifest(config_blob: bytes, layers: list[Layer], config_type: str = MODEL_CONFIG) -> dict:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config_type, sha256_digest(config_blob), len(config_blob)),
        "layers": [layer_descriptor(layer) for layer in layers],
    }


def image_index(manifest_blob: bytes, tag: str) -> dict:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [descriptor(OCI_MANIFEST, sha256_digest(manifest_blob), len(manifest_blob), {REF_NAME: tag})],
    }


def parameter_count_text(count: int) -> str:
    """As Docker writes it: "1.10 B", "134.52 M"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)


# ---- I/O: a layout on disk, and a tar of it ----

def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def _place_blob(layout: Path, digest: str, source: Path) -> None:
    target = blob_path(layout, digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    link_or_copy(source, target)


def _write_blob(layout: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    target = blob_path(layout, digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return digest


def write_layout(layout: Path, layers: list[Layer], config: dict, tag: str, config_type: str = MODEL_CONFIG) -> str:
    """Write an OCI image layout into the empty folder `layout`; return the manifest digest."""
    layout.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        _place_blob(layout, layer.digest, layer.path)
    config_blob = json_bytes(config)
    _write_blob(layout, config_blob)
    manifest_blob = json_bytes(image_manifest(config_blob, layers, config_type))
    manifest_digest = _write_blob(layout, manifest_blob)
    (layout / "index.json").write_bytes(json_bytes(image_index(manifest_blob, tag)))
    (layout / "oci-layout").write_bytes(json_bytes({"imageLayoutVersion": "1.0.0"}))
    return manifest_digest


def read_layout(layout: Path) -> tuple[str, dict]:
    """(manifest digest, manifest) of a layout holding one manifest."""
    index = json.loads((layout / "index.json").read_bytes())
    manifests = index.get("manifests", [])
    if len(manifests) != 1:
        raise ValueError(f"{layout / 'index.json'}: expected one manifest, found {len(manifests)}")
    digest = manifests[0]["digest"]
    return digest, json.loads(blob_path(layout, digest).read_bytes())


def write_tar(layout: Path, out, mtime: int) -> None:
    """A tar of the layout that depends only on its bytes: sorted entries, fixed mtime, uid/gid 0,
    no owner names. PAX, so a blob over 8 GiB (a 7B model in F16) still fits."""
    paths = sorted(layout.rglob("*"), key=lambda p: p.relative_to(layout).as_posix())
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.copybufsize = 4 << 20  # tarfile's 16 KiB default makes large blobs CPU-bound
        for path in paths:
            info = tarfile.TarInfo(path.relative_to(layout).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = path.stat().st_size, 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
