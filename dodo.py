"""modelmake: `doit` builds every model of models.toml; `doit spec=PATH` builds another spec;
`doit serve variant=Q4_K_M` serves a built release with llama-server;
`doit cache=off` runs every stale task instead of restoring it from the action cache; `doit wait=no`
fails at once, instead of waiting, when another build is using the same cache.

The graph lives in stages.graph; this file only loads the spec and hands its tasks to doit,
one `task_<stage>` per stage, in the order of the lifecycle.
"""

import sys

from doit import get_var

from stages import graph
from stages.ground import buildlock
from stages.ground.errors import BuildError
from stages.ground.hashing import Blake3Checker
from stages.ground.spec import load_spec

try:
    SPEC = load_spec(get_var("spec", "models.toml"))
    if get_var("cache", "on") not in ("on", "off"):
        raise BuildError(f"cache={get_var('cache')}: say cache=off to build without the action cache (default on)")
    if get_var("wait", "yes") not in ("yes", "no"):
        raise BuildError(f"wait={get_var('wait')}: say wait=no to fail when another build holds the cache "
                         "(default yes: wait for it)")
    TASKS = graph.tasks(SPEC, use_cache=get_var("cache", "on") == "on")
except BuildError as err:
    sys.exit(f"modelmake: {err}")
SPEC.cache.mkdir(parents=True, exist_ok=True)

DOIT_CONFIG = {
    "dep_file": str(SPEC.cache / ".doit.db"),
    "backend": "sqlite3",
    "check_file_uptodate": Blake3Checker,
    "reporter": buildlock.reporter(SPEC.cache, wait=get_var("wait", "yes") == "yes"),  # one build per cache
    "verbosity": 2,
    "subtasks": True,  # `doit list` shows convert:NAME, quantize:NAME-Q4_K_M, …
    "sort": "definition",
    # `-n N` under the Ray executor: threads that each wait for a task on the cluster (a process runner
    # would fork the Ray driver, which Ray does not support).
    "par_type": "thread" if SPEC.build.executor == "ray" else "process",
    # A variant of a [models.matrix] that fails does not stop the others (the build still exits non-zero).
    "continue": bool(SPEC.matrices),
    # `doit` alone builds and reports; push, pull and verify run only when named.
    "default_tasks": [*graph.STAGES, "report"],
}


def task_import():
    """bring a GGUF or hub base into the cache as a Hugging Face folder"""
    yield from TASKS["import"]


def task_train():
    """LoRA fine-tune on the spec's dataset (PyTorch + PEFT)"""
    yield from TASKS["train"]


def task_adapter():
    """PEFT adapter → GGUF LoRA for llama.cpp / Ollama ADAPTER"""
    yield from TASKS["adapter"]


def task_merge():
    """LoRA folded into the base weights, streamed shard by shard"""
    yield from TASKS["merge"]


def task_convert():
    """Hugging Face safetensors → GGUF (gguf-py)"""
    yield from TASKS["convert"]


def task_quantize():
    """GGUF → llama.cpp quant types (llama.cpp's quantizer)"""
    yield from TASKS["quantize"]


def task_eval():
    """perplexity, KL against F16, speed and size of every GGUF variant (llama.cpp)"""
    yield from TASKS["eval"]


def task_parity():
    """training format = served format: each release's prompt tokens through llama-server and Ollama's engine"""
    yield from TASKS["parity"]


def task_select():
    """[models.select]: the variant of a [models.matrix] whose releases ship under the model's name"""
    yield from TASKS["select"]


def task_package():
    """released GGUF → OCI artifact (Docker Model Runner), Ollama Modelfile, compose.yaml"""
    yield from TASKS["package"]


def task_manifest():
    """checksums of every artifact: manifest.json, SHA256SUMS"""
    yield from TASKS["manifest"]


def task_track():
    """report_to = ["mlflow"]: the build's record in MLflow (parameters, losses, eval figures, digests)"""
    yield from TASKS["track"]


def task_report():
    """REPORT.md + report.html: what each variant costs, the fine-tune's effect, build times, the graph"""
    return TASKS["report"][0]


def task_lock():
    """write models.lock (<spec stem>.lock) from the build, building what is stale first"""
    return graph.lock_task(SPEC, DOIT_CONFIG["default_tasks"])


def task_check():
    """build what is stale, then compare every artifact with the committed lock (CI's reproducibility check)"""
    yield from graph.check_tasks(SPEC, DOIT_CONFIG["default_tasks"])


def task_push():
    """push every package to the registry of [package], and check the digest it serves"""
    yield from TASKS["push"]


def task_verify():
    """re-hash every artifact against manifest.json and SHA256SUMS"""
    yield from TASKS["verify"]


def task_serve():
    """doit serve variant=Q4_K_M [model=NAME port=8080]: serve a built release with llama-server until Ctrl-C"""
    return graph.serve_task(SPEC, get_var("model"), get_var("variant"), get_var("port", "8080"))


def task_compare():
    """doit compare [model=NAME sort=COLUMN columns=A,B format=table|csv|json]: every variant of a [models.matrix], side by side"""
    return graph.compare_task(SPEC, get_var("model"), get_var("sort", ""), get_var("columns", ""),
                              get_var("format", "table"))


def task_tools():
    """build llama.cpp's quantize, imatrix, server and mtmd tools from llama-cpp-python's source, linked to its libraries, once"""
    return graph.tools_task()


def task_cache_push():
    """upload every task output this checkout has built to the [cache] remote"""
    return graph.cache_push_task(SPEC)


def task_cache_gc():
    """doit cache-gc --keep-size 20GB: drop least recently used cache entries (never this build's)"""
    return graph.cache_gc_task(SPEC)


def task_pull():
    """doit pull --ref host[:port]/repository:tag: fetch, verify every blob, then write"""
    return graph.pull_task(SPEC)


# A stage no model of this spec uses stays out of `doit list`.
for _stage, _tasks in TASKS.items():
    if not _tasks:
        del globals()[f"task_{_stage}"]
        if _stage in DOIT_CONFIG["default_tasks"]:
            DOIT_CONFIG["default_tasks"].remove(_stage)
if not SPEC.matrices:  # `doit compare` compares the variants of a [models.matrix]
    del globals()["task_compare"]
