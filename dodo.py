"""modelmake: `doit` builds every model of models.toml; `doit spec=PATH` builds another spec.

The graph lives in stages.graph; this file only loads the spec and hands its tasks to doit,
one `task_<stage>` per stage, in the order of the lifecycle.
"""

import sys

from doit import get_var

from stages import graph
from stages.errors import BuildError
from stages.hashing import Blake3Checker
from stages.spec import load_spec

try:
    SPEC = load_spec(get_var("spec", "models.toml"))
except BuildError as err:
    sys.exit(f"modelmake: {err}")
SPEC.cache.mkdir(parents=True, exist_ok=True)

DOIT_CONFIG = {
    "dep_file": str(SPEC.cache / ".doit.db"),
    "backend": "sqlite3",
    "check_file_uptodate": Blake3Checker,
    "verbosity": 2,
    "subtasks": True,  # `doit list` shows convert:NAME, quantize:NAME-Q4_K_M, …
    "sort": "definition",
}
TASKS = graph.tasks(SPEC)


def task_import():
    """bring a GGUF or hub base into the cache as a Hugging Face folder"""
    yield from TASKS["import"]


def task_convert():
    """Hugging Face safetensors → GGUF (gguf-py)"""
    yield from TASKS["convert"]


def task_quantize():
    """GGUF → llama.cpp quant types (llama.cpp's quantizer)"""
    yield from TASKS["quantize"]


def task_manifest():
    """checksums of every artifact: manifest.json, SHA256SUMS"""
    yield from TASKS["manifest"]
