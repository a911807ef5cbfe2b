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

# OpenMP threads (torch's) that wait for work sleep instead of spinning. Spinning gains about 1% alone
# and loses 2x once anything else runs beside it (`doit -n 2`, an experiment's variants, another build):
# two 2-thread trainings on 2 cores took 3.0 s a step each spinning, 1.4 s sleeping (BENCHMARKS.md).
# OpenMP reads this when torch loads it, so it is set here, before any stage imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
