"""spec → doit tasks.

Each stage of each model becomes one doit sub-task (`import:NAME`, `convert:NAME`,
`quantize:NAME-Q4_K_M`, `manifest:NAME`). A task is up to date when
- its input files hash (blake3) as they did (`file_dep` + `hashing.Blake3Checker`),
- its parameters and tool versions are unchanged (`config_changed` on a fingerprint),
- its outputs still hash as the last run left them (`hashing.outputs_intact`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from . import __version__, registry, runlog
from .errors import BuildError
from .hashing import INDEX, expand_files, fingerprint, outputs_intact, record_outputs, tool_versions, tree_files
from .lora import ADAPTER_FILES
from .manifest import Producer
from .spec import AdapterSpec, ModelSpec, Spec

# Bump a stage's revision when its code changes the bytes it writes.
STAGE_REVISIONS = {"import": 2, "train": 1, "adapter": 1, "merge": 2, "convert": 1, "quantize": 1, "eval": 1,
                   "package": 1, "manifest": 1}
STAGE_TOOLS = {
    "import": ("transformers", "gguf", "safetensors", "torch", "huggingface-hub"),
    "train": ("torch", "transformers", "peft", "safetensors", "tokenizers"),
    "adapter": ("gguf", "safetensors", "torch", "numpy"),
    "merge": ("safetensors", "torch"),
    "convert": ("gguf", "safetensors", "torch", "transformers", "tokenizers", "numpy"),
    "quantize": ("llama-cpp-python",),
    "eval": ("llama-cpp-python", "numpy", "transformers", "tokenizers"),
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

    def eval(self, variant: str) -> Path:
        return self.root / "eval" / f"{variant}.json"

    def base_files(self) -> list[Path]:
        return [self.base / INDEX] if self.imported else tree_files(self.base)

    def adapter_files(self) -> list[Path]:
        if self.trained:
            return [self.adapter / name for name in ADAPTER_FILES]
        return tree_files(self.adapter)


def versions(stage: str) -> dict[str, str]:
    return {"modelmake": __version__, f"stage.{stage}": str(STAGE_REVISIONS[stage]), **tool_versions(*STAGE_TOOLS[stage])}


def run_stage(func, kwargs: dict, outputs: list[Path], cache: Path, task: str):
    """doit python-action: run one stage, timed for the report; a BuildError becomes a one-paragraph failure."""
    try:
        with runlog.measured(cache, task):
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


def _task(stage: str, name: str, doc: str, func, kwargs: dict, fingerprint_of: str, file_dep: list[Path],
          outputs: list[Path], targets: list[Path], cache: Path, clean: list[Path] | None = None) -> dict:
    return {
        "name": name,
        "doc": doc,
        "actions": [(run_stage, [func, kwargs, outputs, cache, f"{stage}:{name}"])],
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
    from . import adapter, convert, evaluate, import_, manifest, merge, package, quantize, train

    paths = ModelPaths.of(spec, model)
    stages: dict[str, list[dict]] = {stage: [] for stage in (*STAGES, "push", "verify")}
    producers: list[Producer] = []
    built: list[Path] = []  # every artifact task's targets: what the manifest waits for

    def add(stage, name, doc, func, kwargs, params, file_dep, outputs, targets, clean=None, artifact=True):
        """One task; an artifact's outputs go into the manifest (eval results, being timings, do not)."""
        stage_versions = versions(stage)
        stages[stage].append(_task(stage, name, doc, func, kwargs, fingerprint(params, stage_versions),
                                   file_dep, outputs, targets, spec.cache, clean))
        if not artifact:
            return stages[stage][-1]
        built.extend(targets)
        producers.append(Producer(
            task=f"{stage}:{name}", outputs=[p.relative_to(paths.root).as_posix() for p in outputs],
            inputs={_input_name(p, spec, paths, model): str(p) for p in file_dep},
            params=params, versions=stage_versions,
        ))
        return stages[stage][-1]

    if paths.imported:
        add("import", model.name, f"{model.base.text} → Hugging Face folder", import_.run,
            {"base": model.base, "out_dir": paths.base}, {"base": model.base.text},
            [model.base.path] if model.base.kind == "gguf" else [], [paths.base], [paths.base / INDEX])

    if model.train:
        add("train", model.name, "LoRA fine-tune (PyTorch + PEFT)", train.run,
            {"base_dir": paths.base, "out_dir": paths.adapter, "spec": model.train, "model_name": model.name,
             "threads": spec.threads},
            model.train.params(), paths.base_files() + model.train.data_files, paths.adapter_files(),
            paths.adapter_files(), clean=[paths.adapter])

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
        out = paths.gguf(stem, model.outtype.upper())
        if model.convert:  # the spec's own converter; its script is an input like the weights
            spec_dir = spec.source.parent if spec.source else Path.cwd()
            add("convert", stem, f"Hugging Face → GGUF {model.outtype} (external converter)",
                convert.run_external, {"command": model.convert.command, "model_dir": folder, "out_path": out,
                                       "outtype": model.outtype, "cwd": spec_dir},
                {"command": model.convert.command, "outtype": model.outtype},
                folder_files + model.convert.input_files(spec_dir), [out], [out])
            continue
        add("convert", stem, f"Hugging Face → GGUF {model.outtype}", convert.run,
            {"model_dir": folder, "out_path": out, "name": stem, **convert_params},
            convert_params | {"name": stem}, folder_files, [out], [out])

    converted = paths.gguf(release, model.outtype.upper())
    for quant in model.quantize:
        quantized = paths.gguf(release, quant)
        add("quantize", f"{release}-{quant}", f"GGUF {model.outtype} → {quant} (llama.cpp)", quantize.run,
            {"in_path": converted, "out_path": quantized, "quant_type": quant, "threads": spec.threads},
            {"type": quant}, [converted], [quantized], [quantized])

    evals = _eval_tasks(spec, model, paths, release, lora_gguf if paths.adapter else None, add)

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
        gate = model.eval.gate.get(variant)
        task = add("package", f"{model.name}-{variant}", f"{variant} → OCI artifact, Modelfile, compose.yaml",
                   package.run, {"release": package.Release(model.name, variant, model_gguf, lora, ref),
                                 "options": options, "out_dir": folder, "source_date_epoch": source_date_epoch},
                   {"variant": variant, "reference": ref, "source_date_epoch": source_date_epoch,
                    **options.model_dump(mode="json", exclude={"license"}),
                    **({"gate": gate.model_dump(exclude_none=True)} if gate else {})},
                   [model_gguf] + ([lora] if lora else []) + ([options.license] if options.license else []),
                   [folder], [folder / INDEX])
        # Measured before it ships; a variant that misses its gate is not packaged.
        task["task_dep"] = [f"eval:{evals[variant]}"]
        if gate:
            task["actions"].insert(0, (run_action, [evaluate.check_gate, {
                "result_path": paths.eval(variant), "variant": variant, "gate": gate}]))
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

    manifest_files = [paths.root / "manifest.json", paths.root / "SHA256SUMS"]
    described = [p.model_dump(exclude={"inputs"}) | {"inputs": sorted(p.inputs)} for p in producers]
    stages["manifest"].append(_task(
        "manifest", model.name, "manifest.json + SHA256SUMS of every artifact", manifest.run,
        {"model": model.name, "model_dir": paths.root, "producers": producers},
        fingerprint({"producers": described}, versions("manifest")),
        built, manifest_files, manifest_files, spec.cache,
    ))
    stages["verify"].append({
        "name": model.name,
        "doc": "re-hash every artifact against manifest.json and SHA256SUMS",
        "actions": [(run_action, [_verified, {"model_dir": paths.root}])],
        "uptodate": [False],
        "verbosity": 2,
    })
    return stages


def _eval_text(spec: Spec, model: ModelSpec, paths: ModelPaths) -> tuple[Path | None, str | None]:
    """(the held-out text eval reads, how reports name it): the spec's file, else the train stage's
    validation records (written to eval/heldout.jsonl), else none."""
    if model.eval.text:
        return model.eval.text, _input_name(model.eval.text, spec, paths, model)
    if model.train and model.train.validation:
        validation = model.train.validation
        source = (_input_name(validation, spec, paths, model) if isinstance(validation, Path) else
                  f"{_input_name(model.train.dataset, spec, paths, model)} (validation split)")
        return paths.root / "eval" / "heldout.jsonl", source
    return None, None


def _eval_tasks(spec: Spec, model: ModelSpec, paths: ModelPaths, release: str, lora_gguf: Path | None, add) -> dict:
    """eval:<model>-<variant> for every variant (and the held-out conversations they read); returns
    variant → task name."""
    from . import evaluate

    text, source = _eval_text(spec, model, paths)
    text_deps = [text] if text else []
    if text and not model.eval.text:
        add("eval", f"{model.name}.heldout", "the held-out conversations, as the train stage writes them",
            evaluate.write_heldout, {"train": model.train, "base_dir": paths.base, "out_path": text},
            {key: value for key, value in model.train.params().items()
             if key in ("validation", "template", "system", "seed")},
            paths.base_files() + model.train.data_files, [text], [text], artifact=False)

    outtype = model.outtype.upper()
    yardstick = evaluate.Subject(paths.gguf(release, outtype))
    subjects = {outtype: (yardstick, None)}
    subjects |= {quant: (evaluate.Subject(paths.gguf(release, quant)), yardstick) for quant in model.quantize}
    if lora_gguf:
        base = paths.gguf(model.name, outtype)
        subjects |= {"base": (evaluate.Subject(base), None), "lora": (evaluate.Subject(base, lora_gguf), yardstick)}
    names = {}
    options = model.eval.model_dump(mode="json", exclude={"text", "gate"})
    for variant, (subject, reference) in subjects.items():
        names[variant] = f"{model.name}-{variant}"
        job = evaluate.Job(model.name, variant, subject, reference, text, source or "")
        compared = f", against {reference.model.name}" if reference else ""
        add("eval", names[variant], f"perplexity, KL, speed with llama.cpp{compared}", evaluate.run,
            {"job": job, "spec": model.eval, "out_path": paths.eval(variant), "model_root": paths.root,
             "threads": spec.threads},
            {"variant": variant, "text": source, "threads": spec.threads, **options},
            subject.files() + (reference.files() if reference else []) + text_deps,
            [paths.eval(variant)], [paths.eval(variant)], artifact=False)
    return names


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


def _report_action(models, nodes, spec_name: str, cache: Path, out_dir: Path):
    from . import report

    try:
        report.run(models, nodes, spec_name, cache, out_dir)
    except BuildError as err:
        return TaskFailed(str(err))
    return {"outputs": record_outputs([str(out_dir / "REPORT.md"), str(out_dir / "report.html")])}


def _runs_unchanged(task, values, cache: Path) -> bool:
    """doit `uptodate` callable: no task has run since the report was written."""
    seen = json.dumps({name: r["finished"] for name, r in sorted(runlog.read_records(cache).items())})
    task.value_savers.append(lambda: {"runs": seen})
    return values.get("runs") == seen


def _report_task(spec: Spec, all_tasks: dict[str, list[dict]]) -> dict:
    """One report per spec, from the eval results, manifests and train logs in the cache."""
    from . import report

    models, file_dep = [], []
    for model in spec.models:
        paths = ModelPaths.of(spec, model)
        _, source = _eval_text(spec, model, paths)
        models.append(report.ModelInputs(
            model.name, paths.root, model.variants,
            paths.adapter / "train_log.jsonl" if paths.trained else None, source,
            {v: g.model_dump(exclude_none=True) for v, g in model.eval.gate.items()}))
        file_dep += [paths.eval(v) for v in model.variants] + [paths.root / "manifest.json"]
    nodes = report.graph_nodes(all_tasks, STAGES)
    out_dir = spec.cache / "report"
    outputs = [out_dir / "REPORT.md", out_dir / "report.html"]
    return {
        "doc": "REPORT.md and report.html: eval tables, fine-tune before/after, loss curve, build times, task graph",
        "actions": [(_report_action, [models, nodes, spec.source.stem if spec.source else "spec", spec.cache, out_dir])],
        "file_dep": [str(p) for p in file_dep],
        "targets": [str(p) for p in outputs],
        "uptodate": [config_changed(fingerprint({"models": [repr(m) for m in models]}, {"modelmake": __version__})),
                     outputs_intact, (_runs_unchanged, [], {"cache": spec.cache})],
        "clean": [(remove, [[out_dir]])],
    }


def tasks(spec: Spec) -> dict[str, list[dict]]:
    """stage → the doit sub-task dicts of every model, for dodo.py's `task_<stage>` creators."""
    merged: dict[str, list[dict]] = {}
    for model in spec.models:
        for stage, stage_tasks in model_tasks(spec, model).items():
            merged.setdefault(stage, []).extend(stage_tasks)
    merged["report"] = [_report_task(spec, merged)]  # one task, not sub-tasks: dodo.py returns it as is
    if not spec.package.registry:  # `doit push` says what is missing instead of "unknown task"
        merged["push"] = [{"name": "no-registry", "doc": "[package] registry is not set",
                           "actions": [(run_action, [_no_registry, {"source": spec.source}])], "uptodate": [False]}]
    return merged
