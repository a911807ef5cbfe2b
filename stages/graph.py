"""spec → doit tasks.

Each stage of each model becomes one doit sub-task (`import:NAME`, `convert:NAME`,
`quantize:NAME-Q4_K_M`, `manifest:NAME`). A task is up to date when
- its input files hash (blake3) as they did (`file_dep` + `hashing.Blake3Checker`),
- its parameters and tool versions are unchanged (`config_changed` on a fingerprint),
- its outputs still hash as the last run left them (`hashing.outputs_intact`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from . import __version__, registry
from .errors import BuildError
from .hashing import INDEX, expand_files, fingerprint, outputs_intact, record_outputs, tool_versions, tree_files
from .lora import ADAPTER_FILES
from .manifest import Producer
from .spec import AdapterSpec, ModelSpec, Spec

# Bump a stage's revision when its code changes the bytes it writes.
STAGE_REVISIONS = {"import": 1, "train": 1, "adapter": 1, "merge": 2, "convert": 1, "quantize": 1, "package": 1,
                   "manifest": 1}
STAGE_TOOLS = {
    "import": ("transformers", "gguf", "safetensors", "torch", "huggingface-hub"),
    "train": ("torch", "transformers", "peft", "safetensors", "tokenizers"),
    "adapter": ("gguf", "safetensors", "torch", "numpy"),
    "merge": ("safetensors", "torch"),
    "convert": ("gguf", "safetensors", "torch", "transformers", "tokenizers", "numpy"),
    "quantize": ("llama-cpp-python",),
    "package": ("gguf",),
    "manifest": (),
}
STAGES = tuple(STAGE_REVISIONS)  # what `doit` builds; push, pull and verify run only when named


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

    def package(self, variant: str) -> Path:
        return self.root / "package" / variant

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


def run_action(func, kwargs: dict):
    """doit python-action for push, pull and verify: print what it did, or fail in one paragraph."""
    try:
        print(func(**kwargs))
    except BuildError as err:
        return TaskFailed(str(err))


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
    from . import adapter, convert, import_, manifest, merge, package, quantize, train

    paths = ModelPaths.of(spec, model)
    stages: dict[str, list[dict]] = {stage: [] for stage in (*STAGES, "push", "verify")}
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

    # The releases: every quantized variant (or the converted GGUF when there are none), and with a
    # LoRA the adapter route too: base GGUF + GGUF LoRA, for Ollama's ADAPTER and llama.cpp --lora.
    releases = [(variant, paths.gguf(release, variant), None) for variant in model.quantize or [model.outtype.upper()]]
    if paths.adapter:
        releases.append(("lora", paths.gguf(model.name, model.outtype.upper()), lora_gguf))
    source_date_epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or "0")
    for variant, model_gguf, lora in releases:
        ref = _docker_reference(spec, model.name, variant)
        folder = paths.package(variant)
        options = model.package
        add("package", f"{model.name}-{variant}", f"{variant} → OCI artifact, Modelfile, compose.yaml", package.run,
            {"release": package.Release(model.name, variant, model_gguf, lora, ref), "options": options,
             "out_dir": folder, "source_date_epoch": source_date_epoch},
            {"variant": variant, "reference": ref, "source_date_epoch": source_date_epoch,
             **options.model_dump(mode="json", exclude={"license"})},
            [model_gguf] + ([lora] if lora else []) + ([options.license] if options.license else []),
            [folder], [folder / INDEX])
        if spec.package.registry:
            stages["push"].append({
                "name": f"{model.name}-{variant}",
                "doc": f"{folder.relative_to(spec.cache)}/oci → {ref}",
                "actions": [(run_action, [registry.push, {"layout": folder / "oci", "tag": variant, "ref": ref,
                                                          "tls_verify": spec.package.tls_verify}])],
                "file_dep": [str(folder / INDEX)],
                "uptodate": [False],  # an explicit request: always ask the registry
                "verbosity": 2,
            })

    built = [target for stage in STAGES for task in stages[stage] for target in task["targets"]]
    manifest_files = [paths.root / "manifest.json", paths.root / "SHA256SUMS"]
    described = [p.model_dump(exclude={"inputs"}) | {"inputs": sorted(p.inputs)} for p in producers]
    stages["manifest"].append(_task(
        model.name, "manifest.json + SHA256SUMS of every artifact", manifest.run,
        {"model": model.name, "model_dir": paths.root, "producers": producers},
        fingerprint({"producers": described}, versions("manifest")),
        [Path(p) for p in built], manifest_files, manifest_files,
    ))
    stages["verify"].append({
        "name": model.name,
        "doc": "re-hash every artifact against manifest.json and SHA256SUMS",
        "actions": [(run_action, [_verified, {"model_dir": paths.root}])],
        "uptodate": [False],
        "verbosity": 2,
    })
    return stages


def _docker_reference(spec: Spec, model: str, variant: str) -> str:
    if spec.package.registry:
        return registry.reference(spec.package.registry, spec.package.tag, model, variant)
    return spec.package.tag.format(model=model, variant=variant)


def _verified(model_dir: Path) -> str:
    from .manifest import verify
    return f"{model_dir.name}: {verify(model_dir)} artifacts match manifest.json and SHA256SUMS"


def _pull_action(ref: str, dest: str, tls_verify: bool | None, cache: Path):
    """doit fills `ref` and `dest` from `doit pull --ref … --dest …`."""
    return run_action(_pulled, {"ref": ref, "dest": dest, "tls_verify": tls_verify, "cache": cache})


def _pulled(ref: str, dest: str, tls_verify: bool | None, cache: Path) -> str:
    if not ref:
        raise BuildError("pull needs a reference: doit pull --ref host[:port]/repository:tag (or @sha256:…)")
    host, repository, tag = registry.split_reference(ref)
    target = Path(dest) if dest else cache / "pulled" / host.replace(":", "_") / repository / tag.replace(":", "_")
    digest = registry.pull(ref=ref, dest=target, tls_verify=tls_verify)
    return f"{ref} → {target} (manifest {digest}, every blob verified)"


def pull_task(spec: Spec) -> dict:
    return {
        "doc": "fetch a model artifact from a registry, verify every blob, then write it",
        "actions": [(_pull_action, [], {"tls_verify": spec.package.tls_verify, "cache": spec.cache})],
        "params": [
            {"name": "ref", "long": "ref", "default": "", "help": "host[:port]/repository:tag or …@sha256:…"},
            {"name": "dest", "long": "dest", "default": "", "help": "folder to write (default cache/pulled/…)"},
        ],
        "uptodate": [False],
        "verbosity": 2,
    }


def _no_registry(source: Path) -> str:
    raise BuildError(f"{source}: no registry to push to: add [package] registry = \"host[:port]/namespace\"")


def tasks(spec: Spec) -> dict[str, list[dict]]:
    """stage → the doit sub-task dicts of every model, for dodo.py's `task_<stage>` creators."""
    merged: dict[str, list[dict]] = {}
    for model in spec.models:
        for stage, stage_tasks in model_tasks(spec, model).items():
            merged.setdefault(stage, []).extend(stage_tasks)
    if not spec.package.registry:  # `doit push` says what is missing instead of "unknown task"
        merged["push"] = [{"name": "no-registry", "doc": "[package] registry is not set",
                           "actions": [(run_action, [_no_registry, {"source": spec.source}])], "uptodate": [False]}]
    return merged
