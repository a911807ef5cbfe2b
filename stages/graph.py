"""spec → doit tasks.

Each stage of each model becomes one doit sub-task (`import:NAME`, `convert:NAME`,
`quantize:NAME-Q4_K_M`, `manifest:NAME`). A task is up to date when
- its input files hash (blake3) as they did (`file_dep` + `hashing.Blake3Checker`),
- its parameters and tool versions are unchanged (`config_changed` on a fingerprint),
- its outputs still hash as the last run left them (`hashing.outputs_intact`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from . import __version__
from .errors import BuildError
from .hashing import INDEX, expand_files, fingerprint, outputs_intact, record_outputs, tool_versions, tree_files
from .lora import ADAPTER_FILES
from .manifest import Producer
from .spec import AdapterSpec, ModelSpec, Spec

# Bump a stage's revision when its code changes the bytes it writes.
STAGE_REVISIONS = {"import": 1, "train": 1, "adapter": 1, "merge": 2, "convert": 1, "quantize": 1, "manifest": 1}
STAGE_TOOLS = {
    "import": ("transformers", "gguf", "safetensors", "torch", "huggingface-hub"),
    "train": ("torch", "transformers", "peft", "safetensors", "tokenizers"),
    "adapter": ("gguf", "safetensors", "torch", "numpy"),
    "merge": ("safetensors", "torch"),
    "convert": ("gguf", "safetensors", "torch", "transformers", "tokenizers", "numpy"),
    "quantize": ("llama-cpp-python",),
    "manifest": (),
}
STAGES = tuple(STAGE_REVISIONS)


@dataclass(frozen=True)
class ModelPaths:
    """Where one model's artifacts live; the single source of cache layout."""

    root: Path  # cache/<model>
    base: Path  # the Hugging Face directory the PyTorch stages read
    imported: bool
    adapter: Path | None  # the PEFT adapter folder: trained into the cache, or the user's own
    trained: bool

    @classmethod
    def of(cls, spec: Spec, model: ModelSpec) -> ModelPaths:
        root = spec.cache / model.name
        imported = model.base.kind != "hf_dir"
        base = root / "base" if imported else model.base.path
        adapter = root / "adapter" if model.train else (model.adapter.path if model.has_adapter else None)
        return cls(root, base, imported, adapter, trained=model.train is not None)

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    def gguf(self, stem: str, variant: str) -> Path:
        return self.root / "gguf" / f"{stem}.{variant}.gguf"

    def base_files(self) -> list[Path]:
        return [self.base / INDEX] if self.imported else tree_files(self.base)

    def adapter_files(self) -> list[Path]:
        if self.trained:
            return [self.adapter / name for name in ADAPTER_FILES]
        return tree_files(self.adapter)


def versions(stage: str) -> dict[str, str]:
    return {"modelmake": __version__, f"stage.{stage}": str(STAGE_REVISIONS[stage]), **tool_versions(*STAGE_TOOLS[stage])}


def run_stage(func, kwargs: dict, outputs: list[Path]):
    """doit python-action: run one stage; a BuildError becomes a one-paragraph failure."""
    try:
        func(**kwargs)
    except BuildError as err:
        return TaskFailed(str(err))
    return {"outputs": record_outputs([str(f) for f in expand_files(outputs)])}


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _task(name: str, doc: str, func, kwargs: dict, fingerprint_of: str, file_dep: list[Path],
          outputs: list[Path], targets: list[Path], clean: list[Path] | None = None) -> dict:
    return {
        "name": name,
        "doc": doc,
        "actions": [(run_stage, [func, kwargs, outputs])],
        "file_dep": [str(p) for p in file_dep],
        "targets": [str(p) for p in targets],
        "uptodate": [config_changed(fingerprint_of), outputs_intact],
        "clean": [(remove, [clean or outputs])],
    }


def _input_name(path: Path, spec: Spec, paths: ModelPaths, model: ModelSpec) -> str:
    """How the manifest names an input: the same on every machine, never a host path."""
    if path.is_relative_to(paths.root):
        return path.relative_to(paths.root).as_posix()
    if path == model.base.path:
        return model.base.text
    if path.is_relative_to(model.base.path):  # a file of an hf_dir base
        return f"{model.base.text}/{path.relative_to(model.base.path).as_posix()}"
    if path.is_relative_to(spec.source.parent):
        return path.relative_to(spec.source.parent).as_posix()
    return path.name


def model_tasks(spec: Spec, model: ModelSpec) -> dict[str, list[dict]]:
    """Every task of one model, by stage, in lifecycle order."""
    from . import adapter, convert, import_, manifest, merge, quantize, train

    paths = ModelPaths.of(spec, model)
    stages: dict[str, list[dict]] = {stage: [] for stage in STAGES}
    producers: list[Producer] = []

    def add(stage, name, doc, func, kwargs, params, file_dep, outputs, targets, clean=None):
        stage_versions = versions(stage)
        stages[stage].append(_task(name, doc, func, kwargs, fingerprint(params, stage_versions),
                                   file_dep, outputs, targets, clean))
        producers.append(Producer(
            task=f"{stage}:{name}", outputs=[p.relative_to(paths.root).as_posix() for p in outputs],
            inputs={_input_name(p, spec, paths, model): str(p) for p in file_dep},
            params=params, versions=stage_versions,
        ))

    if paths.imported:
        add("import", model.name, f"{model.base.text} → Hugging Face folder", import_.run,
            {"base": model.base, "out_dir": paths.base}, {"base": model.base.text},
            [model.base.path] if model.base.kind == "gguf" else [], [paths.base], [paths.base / INDEX])

    if model.train:
        data_files = [model.train.dataset] + ([model.train.validation] if isinstance(model.train.validation, Path) else [])
        add("train", model.name, "LoRA fine-tune (PyTorch + PEFT)", train.run,
            {"base_dir": paths.base, "out_dir": paths.adapter, "spec": model.train, "model_name": model.name,
             "threads": spec.threads},
            model.train.params(), paths.base_files() + data_files, paths.adapter_files(), paths.adapter_files(),
            clean=[paths.adapter])

    release = model.name
    if paths.adapter:
        options = model.adapter or AdapterSpec()
        lora_gguf = paths.gguf(model.name, f"lora.{options.outtype.upper()}")
        add("adapter", model.name, f"PEFT adapter → GGUF LoRA {options.outtype}", adapter.run,
            {"adapter_dir": paths.adapter, "base_dir": paths.base, "out_path": lora_gguf,
             "outtype": options.outtype, "name": model.name, "allow_pickle": options.allow_pickle},
            {"outtype": options.outtype, "name": model.name}, paths.adapter_files() + paths.base_files(),
            [lora_gguf], [lora_gguf])
        add("merge", model.name, "LoRA folded into the base weights → Hugging Face folder", merge.run,
            {"adapter_dir": paths.adapter, "base_dir": paths.base, "out_dir": paths.merged,
             "allow_pickle": options.allow_pickle},
            {}, paths.adapter_files() + paths.base_files(), [paths.merged], [paths.merged / INDEX])
        release = f"{model.name}-merged"

    convert_params = {"outtype": model.outtype, "pretokenizer": model.pretokenizer}
    sources = [(model.name, paths.base, paths.base_files())]
    if paths.adapter:
        sources.append((release, paths.merged, [paths.merged / INDEX]))
    for stem, folder, folder_files in sources:
        add("convert", stem, f"Hugging Face → GGUF {model.outtype}", convert.run,
            {"model_dir": folder, "out_path": paths.gguf(stem, model.outtype.upper()), "name": stem, **convert_params},
            convert_params | {"name": stem}, folder_files, [paths.gguf(stem, model.outtype.upper())],
            [paths.gguf(stem, model.outtype.upper())])

    converted = paths.gguf(release, model.outtype.upper())
    for quant in model.quantize:
        quantized = paths.gguf(release, quant)
        add("quantize", f"{release}-{quant}", f"GGUF {model.outtype} → {quant} (llama.cpp)", quantize.run,
            {"in_path": converted, "out_path": quantized, "quant_type": quant, "threads": spec.threads},
            {"type": quant}, [converted], [quantized], [quantized])

    built = [target for stage_tasks in stages.values() for task in stage_tasks for target in task["targets"]]
    manifest_files = [paths.root / "manifest.json", paths.root / "SHA256SUMS"]
    described = [p.model_dump(exclude={"inputs"}) | {"inputs": sorted(p.inputs)} for p in producers]
    stages["manifest"].append(_task(
        model.name, "manifest.json + SHA256SUMS of every artifact", manifest.run,
        {"model": model.name, "model_dir": paths.root, "producers": producers},
        fingerprint({"producers": described}, versions("manifest")),
        [Path(p) for p in built], manifest_files, manifest_files,
    ))
    return stages


def tasks(spec: Spec) -> dict[str, list[dict]]:
    """stage → the doit sub-task dicts of every model, for dodo.py's `task_<stage>` creators."""
    merged: dict[str, list[dict]] = {}
    for model in spec.models:
        for stage, stage_tasks in model_tasks(spec, model).items():
            merged.setdefault(stage, []).extend(stage_tasks)
    return merged
