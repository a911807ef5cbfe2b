"""`doit serve`: a built release, served the way Docker Model Runner serves it.

llama-server from the pinned llama.cpp source loads the package's own files (the GGUF, the adapter
route's GGUF LoRA and the chat template it ships) on 127.0.0.1, with the Jinja template engine, and
answers OpenAI-compatible requests until Ctrl-C. `doit serve variant=Q4_K_M model=NAME port=8080`;
by default the first model's first release on port 8080.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from . import package
from .ground import llamacpp
from .ground.errors import BuildError
from .ground.hashing import INDEX
from .ground.spec import Spec
from .ground.task import ModelBuild


def pick(spec: Spec, model_name: str | None, variant: str | None) -> tuple[package.Release, Path]:
    """The release to serve and its package folder; a BuildError naming the choices when it is not built."""
    names = [m.name for m in spec.models]
    model = next((m for m in spec.models if m.name == model_name), None) if model_name else spec.models[0]
    if model is None:
        raise BuildError(f"model={model_name}: the spec has no such model; its models: {', '.join(names)}")
    build = ModelBuild.of(spec, model)
    releases = package.releases(build)
    built = [r.variant for r in releases if (build.paths.package(r.variant) / INDEX).is_file()]
    release = next((r for r in releases if r.variant == (variant or releases[0].variant)), None)
    if release is None or release.variant not in built:
        asked = variant or f"{releases[0].variant} (the first release)"
        choices = f"built: {', '.join(built)}" if built else "none is built yet: run `doit` first"
        raise BuildError(f"doit serve: {model.name} {asked} is not a built release of {spec.source or 'the spec'}; "
                         f"{choices}. Say variant=NAME (and model=NAME)")
    return release, build.paths.package(release.variant)


def release_context(folder: Path) -> int:
    """The context the package's compose.yaml declares (what Docker Model Runner gives the model)."""
    for line in (folder / "compose.yaml").read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("context_size:"):
            return int(line.split(":", 1)[1])
    return package.DEFAULT_CONTEXT


def serve(spec: Spec, model_name: str | None, variant: str | None, port: str) -> str:
    release, folder = pick(spec, model_name, variant)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BuildError(f"port={port}: give a TCP port number, e.g. port=8080")
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", int(port)))
    except OSError:
        raise BuildError(f"doit serve: port {port} on 127.0.0.1 is in use (another server, or another `doit serve`); "
                         "stop it or say port=N for another") from None
    # The package's own files, as it ships them: the adapter route's GGUF LoRA and chat template too.
    template = folder / "chat_template.jinja" if release.lora and (folder / "chat_template.jinja").is_file() else None
    files = {"lora": folder / release.lora.name if release.lora else None, "chat_template": template,
             "mmproj": folder / release.mmproj.name if release.mmproj else None}
    # Ctrl-C and a kill both stop it (set here: a shell's background job starts with SIGINT ignored)
    handlers = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with llamacpp.serving(folder / release.gguf.name, **files, threads=spec.threads, port=int(port),
                              context=release_context(folder)) as server:
            print(f"serving {release.model} {release.variant} ({folder}) at {server.url}/v1 — Ctrl-C stops it\n"
                  f"  curl {server.url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                  f"       -d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'", flush=True)
            server.process.wait()
        raise BuildError(f"llama-server stopped by itself ({llamacpp.exit_words(server.process.returncode)}) while "
                         f"serving {release.model} {release.variant}")
    except KeyboardInterrupt:
        return f"stopped serving {release.model} {release.variant}"
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
