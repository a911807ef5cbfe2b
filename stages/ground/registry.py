"""Registry transfer with skopeo, and the checks around it that make a digest mean something.

skopeo (containers/image) speaks the distribution protocol, auth, retries and TLS; we only
decide what to copy where and then check, with our own hashes, that the bytes are the ones we
built: after a push the registry's manifest digest must equal the local one, and a pull is
verified blob by blob before it is renamed into place.

Credentials never come from the spec: `MODELMAKE_REGISTRY_USER` / `MODELMAKE_REGISTRY_PASSWORD`,
else the docker config file (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, which
`docker login` writes), else none.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..formats import oci
from .errors import BuildError
from .hashing import file_sha256

RETRIES = 2  # skopeo waits 1 s, then 2 s: a registry that is down fails in about 3 s


def reference(registry: str, tag_template: str, model: str, variant: str) -> str:
    """`host[:port]/namespace/<repository>:<tag>`; OCI repository names are lowercase."""
    repository, _, tag = tag_template.format(model=model, variant=variant).rpartition(":")
    if repository != repository.lower():
        raise BuildError(f"repository {repository!r} (from [package] tag) has capitals, which registries refuse; "
                         "use a lowercase model name or write the repository in the tag template")
    return f"{registry}/{repository}:{tag}"


def split_reference(ref: str) -> tuple[str, str, str]:
    """(host, repository, tag or digest) of `host[:port]/repo[:tag|@sha256:…]`."""
    host, slash, rest = ref.partition("/")
    if not slash or not ("." in host or ":" in host or host == "localhost"):
        raise BuildError(f"{ref!r} names no registry host: write it as host[:port]/repository:tag")
    if "@" in rest:
        repository, _, digest = rest.partition("@")
        return host, repository, digest
    repository, colon, tag = rest.rpartition(":")
    return (host, repository, tag) if colon else (host, rest, "latest")


def default_tls_verify(host: str) -> bool:
    """As Docker: registries on loopback are plain HTTP, others TLS-verified."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return False
    try:
        return not ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return True


@contextmanager
def auth_file(host: str):
    """An authfile for skopeo, or None to let skopeo look in its default places."""
    user, password = os.environ.get("MODELMAKE_REGISTRY_USER"), os.environ.get("MODELMAKE_REGISTRY_PASSWORD")
    if user and password:
        with tempfile.TemporaryDirectory(prefix="modelmake-auth-") as folder:
            path = Path(folder) / "auth.json"
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            path.touch(mode=0o600)
            path.write_text(json.dumps({"auths": {host: {"auth": token}}}), encoding="utf-8")
            yield path
        return
    docker_config = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    yield docker_config if docker_config.is_file() else None


def classify(stderr: str) -> tuple[str, str]:
    """(kind, detail) of skopeo's last error line; kind is one of auth, unreachable, damaged,
    missing, plain-http or other."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    detail = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", lines[-1] if lines else "no output")
    lowered = detail.lower()
    for kind, signs in (("auth", ("unauthorized", "authentication required", "denied")),
                        ("unreachable", ("connection refused", "no such host", "i/o timeout")),
                        ("damaged", ("digest did not match",)),
                        ("missing", ("manifest unknown", "name unknown", "not found")),
                        ("plain-http", ("http response to https client",))):
        if any(sign in lowered for sign in signs):
            return kind, detail
    return "other", detail


def _explain(kind: str, detail: str, ref: str) -> str:
    """What went wrong with `ref`, and what to do about the usual cases."""
    return {
        "auth": f"the registry refused the credentials for {ref}: set MODELMAKE_REGISTRY_USER and "
                f"MODELMAKE_REGISTRY_PASSWORD, or `docker login` to it ({detail})",
        "unreachable": f"cannot reach the registry of {ref} after {RETRIES + 1} tries: is it running, and is the "
                       f"address right? ({detail})",
        "damaged": f"a blob of {ref} does not have the digest its manifest names: the registry's copy is damaged ({detail})",
        "missing": f"{ref} is not in the registry: check the repository and tag ({detail})",
        "plain-http": f"{ref}: the registry speaks plain HTTP; set [package] tls_verify = false ({detail})",
    }.get(kind, f"skopeo failed for {ref}: {detail}")


class SkopeoError(BuildError):
    """A skopeo failure, with its kind (see `classify`) for callers that degrade instead of failing."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def skopeo(*args: str, ref: str) -> bytes:
    if shutil.which("skopeo") is None:
        raise SkopeoError("skopeo is not installed: `apt-get install skopeo` (Debian/Ubuntu) or see containers/skopeo",
                          "no-skopeo")
    result = subprocess.run(["skopeo", *args], capture_output=True)
    if result.returncode != 0:
        kind, detail = classify(result.stderr.decode(errors="replace"))
        raise SkopeoError(_explain(kind, detail, ref), kind)
    return result.stdout


def transport_flags(side: str, host: str, tls_verify: bool | None, authfile: Path | None) -> list[str]:
    verify = default_tls_verify(host) if tls_verify is None else tls_verify
    flags = [f"--{side}tls-verify={'true' if verify else 'false'}"]
    return flags + ([f"--{side}authfile={authfile}"] if authfile else [])


def push(*, layout: Path, tag: str, ref: str, tls_verify: bool | None) -> str:
    """Copy the layout's `tag` to `ref`; return `repository@sha256:…` once the registry's manifest
    digest is checked to be the local one."""
    local_digest, _ = oci.read_layout(layout)
    host, repository, _ = split_reference(ref)
    with auth_file(host) as authfile, tempfile.TemporaryDirectory(prefix="modelmake-push-") as work:
        digest_file = Path(work) / "digest"
        skopeo("copy", "--quiet", f"--retry-times={RETRIES}", f"--digestfile={digest_file}",
               *transport_flags("dest-", host, tls_verify, authfile), f"oci:{layout}:{tag}", f"docker://{ref}", ref=ref)
        pushed = digest_file.read_text().strip()
        raw = skopeo("inspect", "--raw", f"--retry-times={RETRIES}",
                     *transport_flags("", host, tls_verify, authfile), f"docker://{ref}", ref=ref)
    served = oci.sha256_digest(raw)
    if not pushed == served == local_digest:
        raise BuildError(f"{ref}: the registry holds manifest {served} (push reported {pushed}), "
                         f"but the package's manifest is {local_digest}")
    return f"{host}/{repository}@{local_digest}"


def verify_layout(layout: Path) -> tuple[str, dict]:
    """Every blob the manifest names exists, has its size, and hashes to its digest."""
    digest, manifest = oci.read_layout(layout)
    wanted = [(digest, None), (manifest["config"]["digest"], manifest["config"]["size"])]
    wanted += [(layer["digest"], layer["size"]) for layer in manifest["layers"]]
    for blob_digest, size in wanted:
        path = oci.blob_path(layout, blob_digest)
        if not path.is_file():
            raise BuildError(f"{layout}: blob {blob_digest} is missing")
        if size is not None and path.stat().st_size != size:
            raise BuildError(f"{layout}: blob {blob_digest} has {path.stat().st_size} bytes, the manifest says {size}")
        actual = "sha256:" + file_sha256(path)
        if actual != blob_digest:
            raise BuildError(f"{layout}: blob {blob_digest} hashes to {actual}: it was altered")
    return digest, manifest


def _title(layer: dict) -> str | None:
    """The layer's file name, if it is a plain one: a pulled artifact must not write outside its folder."""
    title = layer.get("annotations", {}).get(oci.TITLE)
    if title and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", title):
        return title
    return None


def pull(*, ref: str, dest: Path, tls_verify: bool | None) -> str:
    """Fetch `ref` into `dest/oci` and its layers into `dest/<title>`; return the manifest digest.
    Everything lands in a temporary sibling first and is renamed into place only once every blob
    is verified, so a damaged or interrupted pull leaves nothing behind."""
    host, _, _ = split_reference(ref)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.pull-", dir=dest.parent) as work:
        staged = Path(work) / "pulled"
        layout = staged / "oci"
        staged.mkdir()
        with auth_file(host) as authfile:
            skopeo("copy", "--quiet", f"--retry-times={RETRIES}", *transport_flags("src-", host, tls_verify, authfile),
                   f"docker://{ref}", f"oci:{layout}:pulled", ref=ref)
        digest, manifest = verify_layout(layout)
        if not any(layer["mediaType"] == oci.GGUF for layer in manifest["layers"]):
            raise BuildError(f"{ref} holds no GGUF layer ({oci.GGUF}): it is not a GGUF model artifact")
        for layer in manifest["layers"]:
            if title := _title(layer):
                os.link(oci.blob_path(layout, layer["digest"]), staged / title)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)
    return digest
