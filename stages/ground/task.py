"""One shape for every task of every stage: what it reads, writes, depends on and runs.

Each stage module declares `tasks(build) -> list[Task]` (and its `REVISION` and `TOOLS`);
`stages.graph` only wires those descriptions into doit tasks. The manifest, the lock and the
cache all wrap tasks through this one shape, so none of them needs to know a stage's arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from ..formats import arch, chat, ggufheader
from ..formats.lora import ADAPTER_FILES
from .hashing import INDEX, tree_files
from .spec import AdapterSpec, ModelSpec, Spec, base_config


@dataclass(frozen=True)
class ModelPaths:
    """Where one model's artifacts live; the single source of cache layout."""

    root: Path  # cache/<model>
    base: Path  # the Hugging Face directory the PyTorch stages read
    imported: bool
    adapter: Path | None  # the PEFT adapter folder: trained into the cache, or the user's own
    trained: bool
    # Whose base this is: the model's own name, or for a variant of [models.matrix] that shares its
    # base the matrix's model name; its import, preflight and base GGUF live in cache/<base_name>.
    base_name: str
    shared: Path  # cache/<base_name>
    # Where the files made from the data alone live (the held-out text, the eval prompts, the
    # calibration text, the base's eval): cache/<base_name> when every variant of the matrix reads
    # the same data the same way, else the model's own folder.
    data: Path

    @classmethod
    def of(cls, spec: Spec, model: ModelSpec) -> ModelPaths:
        root = spec.cache / model.name
        base_name = model.matrix_of if model.shares_base else model.name
        shared = spec.cache / base_name
        imported = model.base.kind != "hf_dir"
        base = shared / "base" if imported else model.base.path
        adapter = root / "adapter" if model.train else (model.adapter.path if model.has_adapter else None)
        shares_data = model.shares_base and model.matrix_of in spec.shares_data
        return cls(root, base, imported, adapter, trained=model.train is not None, base_name=base_name, shared=shared,
                   data=shared if shares_data else root)

    @property
    def data_name(self) -> str:
        """The name the data's tasks carry: the matrix's model when its variants share them."""
        return self.data.name

    @property
    def heldout(self) -> Path:
        """The held-out conversations eval scores, as the train stage writes them."""
        return self.data / "eval" / "heldout.jsonl"

    @property
    def prompts(self) -> Path:
        return self.data / "eval" / "prompts.jsonl"

    @property
    def preview(self) -> Path:
        """What the loss sees: the train stage's records as tokenized, loss tokens marked."""
        return self.data / "preview.html"

    @property
    def calibration(self) -> Path:
        """The importance matrix's calibration text: the training set as the train stage formats it."""
        return self.data / "imatrix" / "calibration.txt"

    @property
    def events(self) -> Path:
        """TensorBoard's event files of this model's training runs (report_to): one folder per model
        under cache/tensorboard, so that `tensorboard --logdir cache/tensorboard` shows them side by side."""
        return self.root.parent / "tensorboard" / self.root.name

    @property
    def mlflow_run(self) -> Path:
        """Which MLflow run the track stage recorded this build in (report_to)."""
        return self.root / "mlflow-run.json"

    @property
    def train_work(self) -> Path:
        """The train stage's checkpoints and job files while it runs; removed when it completes."""
        return self.root / "adapter.work"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def preflight(self) -> Path:
        """What llama.cpp's pinned converter said of the base, before anything expensive ran."""
        return self.shared / "preflight.json"

    def gguf(self, stem: str, variant: str) -> Path:
        return self.root / "gguf" / f"{stem}.{variant}.gguf"

    def base_gguf(self, variant: str) -> Path:
        """The base model's GGUF (the yardstick of the fine-tune, and the adapter route's model)."""
        return self.shared / "gguf" / f"{self.base_name}.{variant}.gguf"

    def package(self, variant: str) -> Path:
        return self.root / "package" / variant

    def eval(self, variant: str) -> Path:
        """A variant's eval result; the base's is its matrix's where the variants share their data."""
        return (self.data if variant == "base" else self.root) / "eval" / f"{variant}.json"

    def base_files(self) -> list[Path]:
        return [self.base / INDEX] if self.imported else tree_files(self.base)

    def adapter_files(self) -> list[Path]:
        if self.trained:
            return [self.adapter / name for name in ADAPTER_FILES]
        return tree_files(self.adapter)


@dataclass(frozen=True)
class ModelBuild:
    """One model of a spec, with where its artifacts go: what every stage's `tasks` is given."""

    spec: Spec
    model: ModelSpec
    paths: ModelPaths

    @classmethod
    def of(cls, spec: Spec, model: ModelSpec) -> ModelBuild:
        return cls(spec, model, ModelPaths.of(spec, model))

    @cached_property
    def base_config(self) -> dict:
        """The base's config.json as far as it is here when the graph is made ({} when it is not yet)."""
        return base_config(self.model.base)

    @cached_property
    def trained_context(self) -> int | None:
        """How many tokens the base was trained to attend over, from its config or GGUF header (no
        weights read); None where that is not known when the graph is made (a hub base not fetched)."""
        config = self.base_config
        found = config.get("text_config", config).get("max_position_embeddings") or config.get("max_position_embeddings")
        if found is None and self.model.base.kind == "gguf":
            found = ggufheader.context_length(self.model.base.path)
        return found if isinstance(found, int) else None

    @cached_property
    def base_pretokenizer(self) -> str | None:
        """The BPE pre-tokenizer a GGUF base names (tokenizer.ggml.pre): how llama.cpp splits its text,
        kept when its import is converted back. Probing the imported tokenizer could miss it: llama.cpp's
        probe hashes count the BOS a tokenizer adds, and a GGUF may add one its model's table did not."""
        base = self.model.base
        if base.kind != "gguf" or not base.path.is_file():
            return None
        found = ggufheader.scalars(base.path).get("tokenizer.ggml.pre")
        return found if isinstance(found, str) and found != "default" else None

    @cached_property
    def base_has_chat_template(self) -> bool | None:
        """Whether the base brings a chat template (tokenizer_config.json, chat_template.jinja or the
        GGUF's tokenizer.chat_template); None where that is not known when the graph is made."""
        base = self.model.base
        if base.kind == "gguf":
            return "tokenizer.chat_template" in ggufheader.scalars(base.path) if base.path.is_file() else None
        if base.kind == "hf_dir":
            return (base.path / "chat_template.jinja").is_file() or (base.path / "chat_template.json").is_file() or \
                "chat_template" in _json_or_empty(base.path / "tokenizer_config.json")
        return None

    @property
    def training_template(self) -> str | None:
        """The chat template a trained release must carry when it is not the base's own: the format the
        train stage wrote (template = "alpaca"), so runtimes prompt the model as it was trained."""
        train = self.model.train
        return chat.ALPACA_JINJA if train and train.template == "alpaca" else None

    def context(self, tokens: int) -> int:
        """A window of `tokens` (a default setting), no longer than the base was trained for."""
        return min(tokens, self.trained_context or tokens)

    @cached_property
    def converter(self) -> str:
        """Which converter writes this model's GGUFs: "command" (the spec's own), "llama.cpp" (the
        pinned convert_hf_to_gguf.py) or "native" (modelmake's). By default the pinned one takes every
        architecture modelmake has no plan for; a hub base not fetched yet counts as native until it is."""
        convert = self.model.convert
        if convert and convert.command:
            return "command"
        if convert and convert.engine != "auto":
            return convert.engine
        names = self.base_config.get("architectures") or []
        return "llama.cpp" if names and not arch.has_plan(names) else "native"

    @property
    def after_preflight(self) -> list[str]:
        """For the tasks that need the pinned converter to take the base (train, adapter, convert):
        the preflight runs first, so an unsupported model fails before any of them starts."""
        return [f"import:{self.paths.base_name}.preflight"] if self.converter == "llama.cpp" else []

    @property
    def keeps_merged_hf(self) -> bool:
        """Whether the merged model is written as a Hugging Face folder: the pinned converter reads
        only those, so it is kept for that engine even with `[models.merge] keep_hf = false`."""
        return bool(self.paths.adapter) and (self.model.keep_merged_hf or self.converter == "llama.cpp")

    @property
    def vision(self) -> bool:
        """A vision-language checkpoint (text model and vision tower in one)."""
        return "vision_config" in self.base_config

    @property
    def mmproj(self) -> Path | None:
        """A vision model's vision tower and projector as llama.cpp loads them (`--mmproj`), shipped
        beside every release of its text model. A LoRA trained on text leaves it as the base has it."""
        return self.paths.base_gguf(f"mmproj.{self.mmproj_outtype.upper()}") if self.vision else None

    @property
    def mmproj_outtype(self) -> str:
        # What llama.cpp's vision encoders run on every backend: f16 (f32 for an f32 build); never quantized.
        return "f32" if self.model.outtype == "f32" else "f16"

    @property
    def adapter_options(self) -> AdapterSpec:
        return self.model.adapter or AdapterSpec()

    @property
    def release(self) -> str:
        """The stem of the GGUFs that are released: the merged model's when there is an adapter."""
        return f"{self.model.name}-merged" if self.paths.adapter else self.model.name

    @property
    def lora_gguf(self) -> Path | None:
        if not self.paths.adapter:
            return None
        return self.paths.gguf(self.model.name, f"lora.{self.adapter_options.outtype.upper()}")

    def input_name(self, path: Path) -> str:
        """How the manifest and the lock name an input: the same on every machine, never a host path."""
        base = self.model.base
        if path.is_relative_to(self.paths.root):
            return path.relative_to(self.paths.root).as_posix()
        if path.is_relative_to(self.spec.cache):  # a matrix's shared base, or a variant's file: ../<folder>/…
            return Path(os.path.relpath(path, self.paths.root)).as_posix()
        if path == base.path:
            return base.text
        if path.is_relative_to(base.path):  # a file of an hf_dir base
            return f"{base.text}/{path.relative_to(base.path).as_posix()}"
        if self.spec.source and path.is_relative_to(self.spec.source.parent):
            return path.relative_to(self.spec.source.parent).as_posix()
        return path.name


@dataclass
class Task:
    """What one task of a stage reads, writes and runs; `stages.graph` makes it a doit task.

    It is up to date while its inputs hash as they did, its params and the stage's versions are
    unchanged, and its outputs still hash as the last run left them.
    """

    name: str  # the part after `<stage>:` in `doit list`
    doc: str
    action: Callable[..., object]  # the stage's work: action(**kwargs); it may return facts for the run record
    kwargs: dict
    params: dict  # everything besides input files that shapes the outputs, as the spec resolves it
    inputs: list[Path]  # files whose bytes it reads
    outputs: list[Path]  # files or folders it writes (a folder counts by the files in it)
    targets: list[Path] | None = None  # the files later tasks depend on; default: the outputs
    artifact: bool = True  # False for results that hold timings (eval): not in the manifest or the lock
    after: list[str] = field(default_factory=list)  # tasks that must run first though no file links them
    checks: list[tuple[Callable[..., object], dict]] = field(default_factory=list)  # run before the action
    clean: list[Path] | None = None  # what `doit clean` removes; default: the outputs
    cacheable: bool = True  # False where the outputs depend on more than the recorded inputs (resume)
    scratch: list[Path] = field(default_factory=list)  # work files a killed run leaves: `doit clean` removes them too
    versions: dict[str, str] = field(default_factory=dict)  # of engines it runs beyond its stage's TOOLS

    @property
    def written(self) -> list[Path]:
        """Everything the task writes: what `doit clean` removes and the action cache keeps."""
        return self.clean or self.outputs


def _json_or_empty(path: Path) -> dict:
    import json

    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
