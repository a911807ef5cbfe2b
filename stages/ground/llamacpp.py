"""llama.cpp's own command-line tools, `llama-imatrix` and `llama-quantize`, built from the source
that the installed llama-cpp-python vendors (its PyPI source distribution ships
`vendor/llama.cpp/tools/`), so the tools and the library the other stages call cannot drift apart.

`doit tools` builds them once per llama-cpp-python version (about 5 minutes on 2 cores) into
~/.cache/modelmake/llama.cpp/<version>/, or $MODELMAKE_TOOLS_DIR; later builds find them there.
The source distribution comes from PyPI through pip, or from $MODELMAKE_LLAMA_CPP_SDIST (a path to
llama_cpp_python-<version>.tar.gz) on a machine without PyPI. CMAKE_ARGS is passed on as
llama-cpp-python's own build takes it, so a CUDA or Metal install gets tools built the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import BuildError

TOOLS = ("llama-imatrix", "llama-quantize")
STAMP = "modelmake-tools.json"
# As llama-cpp-python configures llama.cpp, less what only a shared library needs; static binaries
# can be moved into the cache folder whole.
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]


def installed_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise BuildError("llama-cpp-python is not installed: pip install -e . first") from None


def tools_dir(version: str) -> Path:
    root = Path(os.environ.get("MODELMAKE_TOOLS_DIR") or Path.home() / ".cache" / "modelmake" / "llama.cpp")
    return root / f"{version}-{platform.machine()}"


@dataclass(frozen=True)
class Tools:
    folder: Path
    stamp: dict  # what they were built from: version, source digest, cmake options

    def path(self, tool: str) -> Path:
        return self.folder / tool

    @property
    def version(self) -> str:
        return f"{self.stamp['llama-cpp-python']} (sdist sha256 {self.stamp['sdist_sha256'][:16]})"


def find() -> Tools:
    """The built tools for the installed llama-cpp-python, or a BuildError saying how to build them."""
    version = installed_version()
    folder = tools_dir(version)
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        stamp = None
    if not stamp or not all((folder / tool).is_file() for tool in TOOLS):
        raise BuildError(f"llama.cpp's {' and '.join(TOOLS)} for llama-cpp-python {version} are not built "
                         f"({folder}): run `doit tools` once (about 5 minutes on 2 cores)")
    return Tools(folder, stamp)


def fingerprint_versions() -> dict[str, str]:
    """For the fingerprint of every task that runs the tools: they are built from the installed
    llama-cpp-python's own source (`find` refuses others), so its version names them, and it is
    known before they are built."""
    return {"llama.cpp tools": f"llama-cpp-python {installed_version()} sdist"}


def run(tool: str, args: list[str], cwd: Path, what: str) -> str:
    """Run one tool; its output, or a BuildError with the end of it."""
    done = subprocess.run([str(find().path(tool)), *args], cwd=cwd, capture_output=True, text=True,
                          errors="replace")
    if done.returncode:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-6:])
        raise BuildError(f"{tool} could not {what} (exit {done.returncode}): {tail}")
    return done.stdout + done.stderr


def _sdist(version: str, into: Path) -> Path:
    given = os.environ.get("MODELMAKE_LLAMA_CPP_SDIST")
    if given:
        return Path(given)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", str(into)]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode or not found:
        raise BuildError(f"could not download llama-cpp-python {version}'s source from PyPI ({done.stderr.strip()[-300:]}); "
                         "on a machine without PyPI set MODELMAKE_LLAMA_CPP_SDIST to its llama_cpp_python-"
                         f"{version}.tar.gz")
    return found[0]


def _run(command: list[str], log: Path) -> None:
    with log.open("a", encoding="utf-8") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise BuildError(f"building llama.cpp's tools failed: {' '.join(command[:3])} …; the log's end:\n"
                             + "\n".join(tail) + f"\n(whole log: {log})")


def build() -> str:
    """Build the tools unless they are built; what it did, in words."""
    version = installed_version()
    folder = tools_dir(version)
    try:
        return f"llama.cpp tools {find().version} are built: {folder}"
    except BuildError:
        pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="modelmake-tools-", dir=folder.parent) as work:
        work = Path(work)
        sdist = _sdist(version, work)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        with tarfile.open(sdist) as archive:
            archive.extractall(work / "src", filter="data")
        source = next((work / "src").glob("*/vendor/llama.cpp"), None)
        if source is None or not (source / "tools" / "imatrix").is_dir():
            raise BuildError(f"{sdist} has no vendor/llama.cpp/tools/imatrix: not llama-cpp-python's source distribution")
        options = CMAKE_OPTIONS + shlex.split(os.environ.get("CMAKE_ARGS", ""))
        log = work / "build.log"
        print(f"building {', '.join(TOOLS)} from llama-cpp-python {version}'s llama.cpp (log: {log}) …", flush=True)
        _run(["cmake", "-S", str(source), "-B", str(work / "build"), *options], log)
        _run(["cmake", "--build", str(work / "build"), "--config", "Release", "-j", str(os.cpu_count() or 1),
              "--target", *TOOLS], log)
        staged = work / "tools"
        staged.mkdir()
        for tool in TOOLS:
            shutil.copy2(work / "build" / "bin" / tool, staged / tool)
        stamp = {"llama-cpp-python": version, "sdist_sha256": digest, "cmake": options}
        (staged / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)  # a half-built folder from a killed run
        staged.rename(folder)  # whole, or not at all
    return f"llama.cpp tools {find().version} built: {folder}"
