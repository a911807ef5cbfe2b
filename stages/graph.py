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
from .hashing import expand_files, fingerprint, outputs_intact, record_outputs, tool_versions, tree_files
from .import_ import INDEX
from .manifest import Producer
from .spec import ModelSpec, Spec

# Bump a stage's revision when its code changes the bytes it writes.
STAGE_REVISIONS = {"import": 1, "convert": 1, "quantize": 1, "manifest": 1}
STAGE_TOOLS = {
    "import": ("transformers", "gguf", "safetensors", "torch", "huggingface-hub"),
    "convert": ("gguf", "safetensors", "torch", "transformers", "tokenizers", "numpy"),
    "quantize": ("llama-cpp-python",),
    "manifest": (),
}


@dataclass(frozen=True)
class ModelPaths:
    """Where one model's artifacts live; the single source of cache layout."""

    root: Path  # cache/<model>
    base: Path  # the Hugging Face directory the PyTorch stages read
    imported: bool

    @classmethod
    def of(cls, spec: Spec, model: ModelSpec) -> ModelPaths:
        root = spec.cache / model.name
        if model.base.kind == "hf_dir":
            return cls(root, model.base.path, imported=False)
        return cls(root, root / "base", imported=True)

    def gguf(self, model: ModelSpec, variant: str) -> Path:
        return self.root / "gguf" / f"{model.name}.{variant}.gguf"

    def base_files(self) -> list[Path]:
        return [self.base / INDEX] if self.imported else tree_files(self.base)


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
          outputs: list[Path], targets: list[Path]) -> dict:
    return {
        "name": name,
        "doc": doc,
        "actions": [(run_stage, [func, kwargs, outputs])],
        "file_dep": [str(p) for p in file_dep],
        "targets": [str(p) for p in targets],
        "uptodate": [config_changed(fingerprint_of), outputs_intact],
        "clean": [(remove, [outputs])],
    }


def _input_name(path: Path, paths: ModelPaths, model: ModelSpec) -> str:
    """How the manifest names an input: by its place in the cache, else as the spec names the base."""
    if path.is_relative_to(paths.root):
        return path.relative_to(paths.root).as_posix()
    if path == model.base.path:
        return model.base.text
    return f"{model.base.text}/{path.relative_to(model.base.path).as_posix()}"  # a file of an hf_dir base


def model_tasks(spec: Spec, model: ModelSpec) -> dict[str, list[dict]]:
    """Every task of one model, by stage, in lifecycle order."""
    from . import convert, import_, manifest, quantize

    paths = ModelPaths.of(spec, model)
    stages: dict[str, list[dict]] = {"import": [], "convert": [], "quantize": [], "manifest": []}
    producers: list[Producer] = []

    def add(stage, name, doc, func, kwargs, params, file_dep, outputs, targets):
        stage_versions = versions(stage)
        stages[stage].append(_task(name, doc, func, kwargs, fingerprint(params, stage_versions),
                                   file_dep, outputs, targets))
        producers.append(Producer(
            task=f"{stage}:{name}", outputs=[p.relative_to(paths.root).as_posix() for p in outputs],
            inputs={_input_name(p, paths, model): str(p) for p in file_dep},
            params=params, versions=stage_versions,
        ))

    if paths.imported:
        add("import", model.name, f"{model.base.text} → Hugging Face folder", import_.run,
            {"base": model.base, "out_dir": paths.base}, {"base": model.base.text},
            [model.base.path] if model.base.kind == "gguf" else [], [paths.base], [paths.base / INDEX])

    converted = paths.gguf(model, model.outtype.upper())
    convert_params = {"outtype": model.outtype, "name": model.name, "pretokenizer": model.pretokenizer}
    add("convert", model.name, f"Hugging Face → GGUF {model.outtype}", convert.run,
        {"model_dir": paths.base, "out_path": converted, **convert_params},
        convert_params, paths.base_files(), [converted], [converted])

    for quant in model.quantize:
        quantized = paths.gguf(model, quant)
        add("quantize", f"{model.name}-{quant}", f"GGUF {model.outtype} → {quant} (llama.cpp)", quantize.run,
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
