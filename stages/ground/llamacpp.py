"""llama.cpp's own command-line tools, `llama-imatrix`, `llama-quantize`, `llama-mtmd-cli` and
`llama-server`, compiled from the source that the installed llama-cpp-python vendors (its PyPI source
distribution ships `vendor/llama.cpp/tools/`) and linked to the very shared libraries pip built for
the bindings from it (libllama, libggml, libmtmd and llama.cpp's common library, which pip installs
beside them), so llama.cpp is compiled once and the tools and the library the other stages call run
the same bytes;
and llama.cpp's own converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, with the
`conversion/` package and the `gguf-py/` of the same tree), staged beside them and run only with
that gguf-py, for every architecture modelmake's own converter has no plan for.

`doit tools` builds them once per llama-cpp-python build (about a minute on 2 cores) into
~/.cache/modelmake/llama.cpp/<version>-<machine>-<the libraries' digest>/, or under
$MODELMAKE_TOOLS_DIR, with copies of those libraries;
later builds find them there, and build them again if llama-cpp-python is reinstalled with other
libraries (a CUDA or Metal build, say: the tools then run on it too).
The source distribution comes from PyPI through pip, or from $MODELMAKE_LLAMA_CPP_SDIST (a path to
llama_cpp_python-<version>.tar.gz) on a machine without PyPI.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import blake3

from .device import available_cores
from .errors import BuildError
from .hashing import file_blake3

# llama-mtmd-cli: llama.cpp's multimodal runner, which checks that a vision model's text GGUF and its
# mmproj answer a prompt about an image. llama-server: the engine Docker Model Runner runs; the parity
# check renders chat templates with its Jinja engine and `doit serve` serves a release with it.
TOOLS = ("llama-imatrix", "llama-quantize", "llama-mtmd-cli", "llama-server")
STAMP = "modelmake-tools.json"
# What the converters need of the tree: the scripts, the model classes they register, and their own
# gguf-py (the scripts put it first on sys.path unless NO_LOCAL_GGUF is set, which `convert` clears).
CONVERTER = "convert"  # the folder they are staged in, beside the tools
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
# The top-level CMakeLists.txt the tools are configured with, in place of llama.cpp's own: it builds
# them alone, against the bindings' libraries.
TOOLS_CMAKE = Path(__file__).with_name("llamacpp-tools.cmake")
LIBRARY_SUFFIX = ".dylib" if sys.platform == "darwin" else ".so"


def installed_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise BuildError("llama-cpp-python is not installed: pip install -e . first") from None


def bindings_libraries() -> list[Path]:
    """The shared libraries pip built for the installed llama-cpp-python, under every name they have:
    libllama, libggml*, libmtmd, and libllama-common, which llama.cpp's own install rule puts beside
    them (the bindings do not load it; the tools link to it)."""
    version = installed_version()
    files = [Path(file.locate()) for file in metadata.files("llama-cpp-python") or ()]
    common = next((f for f in files if f.name == f"libllama-common{LIBRARY_SUFFIX}"), None)
    if common is None:
        raise BuildError(f"llama-cpp-python {version} has no libllama-common{LIBRARY_SUFFIX}, which llama.cpp's tools "
                         "link to: install it built from its source distribution, as `pip install -e .` does "
                         f"(pip install --force-reinstall --no-cache-dir llama-cpp-python=={version})")
    return sorted(f for f in files if f.parent == common.parent and f.name.startswith("lib") and LIBRARY_SUFFIX in f.name)


def libraries_digest() -> str:
    """The bindings' libraries, names and bytes, in one blake3: what the tools are linked to."""
    return blake3.blake3("".join(f"{path.name} {file_blake3(path)}\n" for path in bindings_libraries()).encode()).hexdigest()


def tools_dir(version: str) -> Path:
    """Where the tools for this llama-cpp-python and these libraries of it are: one folder for each
    build of the bindings, so two environments with different ones (CPU and CUDA) keep theirs."""
    root = Path(os.environ.get("MODELMAKE_TOOLS_DIR") or Path.home() / ".cache" / "modelmake" / "llama.cpp")
    return root / f"{version}-{platform.machine()}-{libraries_digest()[:12]}"


@dataclass(frozen=True)
class Tools:
    folder: Path
    stamp: dict  # what they were built from: version, source digest, cmake options

    def path(self, tool: str) -> Path:
        return self.folder / tool

    @property
    def converter(self) -> Path:
        return self.folder / CONVERTER

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
    staged = [*(folder / tool for tool in TOOLS), *(folder / CONVERTER / name for name in CONVERTER_FILES)]
    if not stamp or not all(path.exists() for path in staged):
        raise BuildError(f"llama.cpp's {' and '.join(TOOLS)} and converters for llama-cpp-python {version} are not "
                         f"built ({folder}): run `doit tools` once (about a minute on 2 cores)")
    return Tools(folder, stamp)


def fingerprint_versions() -> dict[str, str]:
    """For the fingerprint of every task that runs the tools: they are built from the installed
    llama-cpp-python's own source (`find` refuses others), so its version names them, and it is
    known before they are built."""
    return {"llama.cpp tools": f"llama-cpp-python {installed_version()} sdist"}


def converter_versions() -> dict[str, str]:
    """For the fingerprint of every task that runs the pinned converters (and gguf-py with them)."""
    return {"llama.cpp converter": f"llama-cpp-python {installed_version()} sdist"}


def exit_words(returncode: int) -> str:
    """A process's exit status in words: a negative one is the signal that ended it (a crash)."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        return f"it crashed: {signal.Signals(-returncode).name}"
    except ValueError:
        return f"it was ended by signal {-returncode}"


def run(tool: str, args: list[str], cwd: Path, what: str) -> str:
    """Run one tool; its output, or a BuildError with the end of it."""
    done = subprocess.run([str(find().path(tool)), *args], cwd=cwd, capture_output=True, text=True,
                          errors="replace")
    if done.returncode:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-6:])
        raise BuildError(f"{tool} could not {what} ({exit_words(done.returncode)}): {tail}")
    return done.stdout + done.stderr


def convert(script: str, args: list[str], what: str) -> str:
    """Run one of the pinned converters (or, with script "-c", code that imports their `conversion`
    package) with the tree's own gguf-py; its output, or a BuildError with the end of it. PYTHONPATH,
    the user's site-packages and NO_LOCAL_GGUF are left out, so neither another llama.cpp checkout nor
    the installed gguf package can stand in for the pinned ones."""
    folder = find().converter
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
    program = ["-c", *args] if script == "-c" else [str(folder / script), *args]
    done = subprocess.run([sys.executable, "-E", "-s", *program], cwd=folder, env=env,
                          capture_output=True, text=True, errors="replace")
    log = done.stdout + done.stderr
    if done.returncode:
        lines = [line for line in log.strip().splitlines() if line.strip()]
        tail = " | ".join(line.strip() for line in lines[-4:])
        raise BuildError(f"llama.cpp's {script} (llama-cpp-python {installed_version()}) could not {what} "
                         f"({exit_words(done.returncode)}): {tail}")
    return log


@dataclass(frozen=True)
class Server:
    """A running llama-server: its base URL and the two calls the parity check and `doit serve` make."""

    url: str
    process: subprocess.Popen | None = None  # `doit serve` waits on it

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt a chat completion of `messages` starts from: the chat template through llama.cpp's
        Jinja engine, with the generation prompt (llama-server's /apply-template)."""
        return self.post("/apply-template", {"messages": messages})["prompt"]

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        """A greedy chat completion (temperature 0) through the OpenAI-compatible API, as clients call it."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 0}
        return self.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def tokenize(self, text: str) -> list[int]:
        """As a chat completion tokenizes its prompt: special tokens parsed, BOS added where the GGUF says."""
        return self.post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]


def server_command(model: Path, *, lora: Path | None = None, chat_template: Path | None = None,
                   mmproj: Path | None = None, port: int, host: str = "127.0.0.1", context: int = 4096,
                   threads: int = 0, flash_attention: bool | None = None) -> list[str]:
    """llama-server as Docker Model Runner runs it: the Jinja template engine, the GGUF's own chat
    template unless the package brings one (DMR passes the artifact's template layer the same way).
    `flash_attention` None leaves llama-server's default (auto: on where the backend has it)."""
    command = [str(find().path("llama-server")), "--model", str(model), "--host", host, "--port", str(port),
               "--ctx-size", str(context), "--jinja", "--no-webui"]
    if flash_attention is not None:
        command += ["--flash-attn", "on" if flash_attention else "off"]
    command += ["--threads", str(threads or available_cores())]  # llama.cpp's own default ignores CPU affinity
    for flag, path in (("--lora", lora), ("--chat-template-file", chat_template), ("--mmproj", mmproj)):
        if path:
            command += [flag, str(path)]
    return command


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    """Until llama-server answers /health with 200 (the model is loaded); a BuildError with the end
    of its log when it exits first or takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = " | ".join(log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-4:])
            raise BuildError(f"llama-server stopped before it was ready ({exit_words(process.returncode)}): {tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise BuildError(f"llama-server did not load its model within {timeout:.0f} s (log: {log})")


@contextlib.contextmanager
def serving(model: Path, *, lora: Path | None = None, chat_template: Path | None = None, mmproj: Path | None = None,
            threads: int = 0, context: int = 4096, flash_attention: bool | None = None, port: int | None = None):
    """A llama-server on a loopback port (default: a free one) for the length of the `with`, stopped
    after it; its own output goes to a log whose end a failed start shows."""
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="modelmake-server-") as work:
        log = Path(work) / "llama-server.log"
        with log.open("w", encoding="utf-8") as out:
            process = subprocess.Popen(server_command(model, lora=lora, chat_template=chat_template, mmproj=mmproj,
                                                      port=port, threads=threads, context=context,
                                                      flash_attention=flash_attention),
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_ready(process, url, log)
            yield Server(url, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def captured_llama_log():
    """Collect llama.cpp's log (a line per tensor) instead of printing it; yields the lines."""
    import llama_cpp
    import llama_cpp._logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))


def prompt_tokens(llm, text: str) -> list[int]:
    """A rendered prompt's tokens as llama-server's chat completion makes them: special tokens parsed, and
    one BOS first where the GGUF asks for it (a template that writes BOS itself does not get a second:
    llama.cpp strips it from the rendered text before adding its own)."""
    import llama_cpp

    vocab = llm._model.vocab
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    bos = llama_cpp.llama_vocab_bos(vocab)
    if llama_cpp.llama_vocab_get_add_bos(vocab) and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


def end_of_generation(model: Path) -> dict[int, str]:
    """The tokens llama.cpp ends generation at (its EOG set: EOS, EOT and the end-of-turn tokens it
    knows by name), as {id: text}, read from the GGUF's vocabulary alone."""
    import llama_cpp

    with captured_llama_log():
        llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    try:
        vocab = llm._model.vocab
        return {token: llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")
                for token in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, token)}
    finally:
        llm.close()


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


def _stage_converter(source: Path, into: Path) -> None:
    into.mkdir()
    for name in CONVERTER_FILES:
        copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
        copy(source / name, into / name)


def build() -> str:
    """Build the tools and stage the converters unless that is done; what it did, in words."""
    try:
        tools = find()
        return f"llama.cpp tools {tools.version} are built: {tools.folder}"
    except BuildError:
        pass
    version = installed_version()
    libraries = bindings_libraries()
    folder = tools_dir(version)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="modelmake-tools-", dir=folder.parent) as work:
        work = Path(work)
        sdist = _sdist(version, work)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        with tarfile.open(sdist) as archive:
            archive.extractall(work / "src", filter="data")
        source = next((work / "src").glob("*/vendor/llama.cpp"), None)
        if source is None or not all((source / "tools" / name).is_dir() for name in ("imatrix", "quantize", "server", "mtmd")) \
                or not all((source / name).exists() for name in CONVERTER_FILES):
            raise BuildError(f"{sdist} has no vendor/llama.cpp/tools/ or converters: not llama-cpp-python's source "
                             "distribution")
        shutil.copyfile(TOOLS_CMAKE, source / "CMakeLists.txt")
        log = work / "build.log"
        print(f"building {', '.join(TOOLS)} from llama-cpp-python {version}'s llama.cpp, linked to its libraries "
              f"in {libraries[0].parent} (log: {log}) …", flush=True)
        _run(["cmake", "-S", str(source), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
              f"-DBINDINGS_LIB={libraries[0].parent}"], log)
        _run(["cmake", "--build", str(work / "build"), "--config", "Release", "-j", str(os.cpu_count() or 1),
              "--target", *TOOLS], log)
        staged = work / "tools"
        staged.mkdir()
        for tool in TOOLS:
            shutil.copy2(work / "build" / "bin" / tool, staged / tool)
        for library in libraries:  # found beside the tools (their rpath), as the bindings find theirs
            shutil.copy2(library, staged / library.name)
        _stage_converter(source, staged / CONVERTER)
        stamp = {"llama-cpp-python": version, "sdist_sha256": digest, "libraries_blake3": libraries_digest(),
                 "libraries": str(libraries[0].parent)}
        (staged / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)  # a half-built folder from a killed run
        staged.rename(folder)  # whole, or not at all
    return f"llama.cpp tools {find().version} built: {folder}"
