"""Ollama's template engine, Go's text/template, as the parity check runs it: the small Go program in
gotemplate/ renders a Modelfile TEMPLATE over the messages Ollama would give it. It is built once per
version of that program into ~/.cache/modelmake/gotemplate/ (or $MODELMAKE_TOOLS_DIR) with the Go
toolchain on PATH; without Go the check says so and checks the other engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import BuildError

SOURCE = Path(__file__).parent / "gotemplate"


def messages_as_ollama_sends(messages: list[dict], system: str | None) -> list[dict]:
    """What Ollama puts in .Messages: the Modelfile's SYSTEM first when the request brings no system turn."""
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def renderer_path() -> Path | None:
    """The built renderer, built now if Go is installed and it is not; None without Go."""
    digest = hashlib.sha256(b"".join((SOURCE / name).read_bytes() for name in ("go.mod", "render.go"))).hexdigest()[:16]
    root = Path(os.environ.get("MODELMAKE_TOOLS_DIR") or Path.home() / ".cache" / "modelmake")
    binary = root / "gotemplate" / digest / "render"
    if binary.is_file():
        return binary
    if not shutil.which("go"):
        return None
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as work:
        env = os.environ | {"GOFLAGS": "-mod=mod", "GO111MODULE": "on", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
        done = subprocess.run(["go", "build", "-o", str(Path(work) / "render"), "."], cwd=SOURCE, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise BuildError(f"could not build Ollama's template renderer with Go ({done.stderr.strip()[-300:]})")
        (Path(work) / "render").rename(binary)  # whole, or not at all
    return binary


def render(binary: Path, template: str, messages: list[dict]) -> str:
    """The text Ollama's engine writes for `messages` (already as Ollama sends them) with `template`."""
    with tempfile.NamedTemporaryFile("w", suffix=".tmpl", encoding="utf-8") as file:
        file.write(template)
        file.flush()
        done = subprocess.run([str(binary), file.name], input=json.dumps(messages), capture_output=True, text=True)
    if done.returncode:
        raise BuildError(f"Ollama's template engine refused the Modelfile TEMPLATE: {done.stderr.strip()[-300:]}")
    return done.stdout
