"""modelmake: a declarative build system for language-model artifacts.

The folders are the architecture:
- `stages/` itself holds the lifecycle, one module per stage: `import_`, `train`, `adapter`,
  `merge`, `convert`, `quantize`, `evaluate`, `package`, `manifest`, `report`;
- `stages/formats/` the formats they read and write: architectures, tokenizers, Hugging Face
  folders, PEFT adapters, datasets, GGUF headers, OCI layouts, Ollama Modelfiles;
- `stages/build/` the build machinery around every stage: the spec, the task description,
  the doit graph, hashing, atomic writes, run records, the lock, the action cache and the
  registry transfers it shares through.

`models.toml` is read by `stages.build.spec`, turned into doit tasks by `stages.build.graph`,
and each task runs one stage module.
"""

__version__ = "0.1.0"
