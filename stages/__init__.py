"""modelmake: a declarative build system for language-model artifacts.

`models.toml` is read by `stages.spec`, turned into doit tasks by `stages.graph`,
and each task runs one stage module (`import_`, `convert`, `quantize`, ...).
"""

__version__ = "0.1.0"
