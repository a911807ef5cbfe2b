"""modelmake: a declarative build system for language-model artifacts.

The folders are the architecture, and imports only point down it:
- `stages/graph.py` stands on top: it wires every stage's task descriptions into doit tasks, and
  adds the commands that are not stages (report, lock, check, tools, cache-push, cache-gc, pull);
- `stages/` itself holds the lifecycle, one module per stage: `import_`, `train`, `adapter`,
  `merge`, `convert`, `quantize`, `evaluate`, `package`, `manifest`, `report`;
- `stages/training/` what the train stage runs on (memory estimate, checkpoints, several processes);
- `stages/formats/` the formats they read and write: architectures, tokenizers, Hugging Face
  folders, PEFT adapters, datasets, GGUF headers, manifests, OCI layouts, Ollama Modelfiles;
- `stages/ground/` what every stage stands on: the spec, the task description, hashing, atomic
  writes, run records, the lock, the action cache and the registry transfers it shares through.
  It imports no stage.

`models.toml` is read by `stages.ground.spec`, turned into doit tasks by `stages.graph`, and each
task runs one stage module.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that wait for work spin only briefly, then sleep. torch's and llama.cpp's (ggml's barrier
# between two operations is an OpenMP barrier) share one OpenMP runtime in a process, and want opposite
# things of a long wait: spinning costs two torch trainings on 2 cores 3.4x their time alone instead of
# 2x, and sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes llama.cpp's generation 3.5x slower (a token
# of SmolLM2-135M crosses hundreds of barriers). A thousand spins keeps both (bench/contention.py,
# BENCHMARKS.md). GOMP_SPINCOUNT is GNU libgomp's (torch and llama.cpp on Linux); KMP_BLOCKTIME is
# LLVM's libomp's (torch on macOS, where llama.cpp does not use OpenMP). OpenMP reads them when it
# loads, so they are set here, before any stage imports torch or llama.cpp; the tools inherit them.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
os.environ.setdefault("KMP_BLOCKTIME", "0")
