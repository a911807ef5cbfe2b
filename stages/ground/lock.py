"""`models.lock`: the build's artifacts and what produced them, committed beside the spec so a
fresh clone or a CI runner can prove that it rebuilds the same bytes (`doit check`), and say why
when it does not.

Per model and per artifact task the lock keeps the outputs (path relative to the model's cache
folder, size, sha256) and the facts of its action key as the manifest records them: input names
with their blake3, resolved parameters, tool versions with the stage revision, and the platform
the task ran on (OS, CPU architecture; for train the torch device, dtype and CPU kernels).
No host path, time or user name goes in, and the JSON is sorted: the same build gives the
same file on any machine.

Pure functions (`from_manifests`, `lock_json`, `compare`) are apart from the I/O that drives them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from . import runlog
from ..formats import metrics
from ..formats.manifest import Manifest
from .atomic import atomic_file
from .errors import BuildError
from .spec import Spec
from .task import ModelPaths

FORMAT = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LockedFile(_Strict):
    size: int
    sha256: str


class LockedTask(_Strict):
    inputs: dict[str, str]  # input name → blake3
    params: dict
    versions: dict[str, str]  # tools, modelmake and `stage.<stage>` (the stage revision)
    platform: dict[str, str]
    # Why the bytes depend on more than the recorded inputs (training on CUDA, resuming): the
    # task's downstream is compared only where the platform is the same, and never after a resume.
    bound: str | None = None
    outputs: dict[str, LockedFile]  # path relative to the model's cache folder


class LockedModel(_Strict):
    tasks: dict[str, LockedTask]
    # What eval measured of each variant (perplexity, exact match, …; never speeds), so that `doit check`
    # and the report say how a change moved them. Facts, not artifacts: a change here fails nothing.
    metrics: dict[str, dict[str, float]] = {}


class Lock(_Strict):
    format: int
    spec: str  # the spec file's name: a lock is for one spec
    models: dict[str, LockedModel]


# ---- the lock from a build (pure) ----

def bound_reason(platform: dict[str, str]) -> str | None:
    """Why a task's bytes are tied to where it ran, from the facts its run recorded."""
    if platform.get("resumed") == "true":
        return "resumed from an earlier build's adapter (resume = true), so its bytes depend on build history"
    device = platform.get("device")
    if device and device != "cpu":
        return f"trained on {device} ({platform.get('dtype', '?')}), whose kernels are not bit-reproducible elsewhere"
    if device == "cpu":
        return (f"trained on CPU with {platform.get('cpu_kernels', '?')} kernels and {platform.get('threads', '?')} "
                "threads, whose float sums differ with either")
    return None


def locked_model(manifest: Manifest, platforms: dict[str, dict[str, str]],
                 metrics: dict[str, dict[str, float]] | None = None) -> LockedModel:
    """Group a model's manifest by task; `platforms` holds each task's recorded platform facts,
    `metrics` each variant's stable eval figures."""
    tasks: dict[str, dict] = {}
    for artifact in manifest.artifacts:
        task = tasks.setdefault(artifact.task, {
            "inputs": artifact.inputs, "params": artifact.params, "versions": artifact.versions,
            "platform": platforms.get(artifact.task, {}), "bound": bound_reason(platforms.get(artifact.task, {})),
            "outputs": {}})
        task["outputs"][artifact.path] = LockedFile(size=artifact.size, sha256=artifact.sha256)
    return LockedModel(tasks={name: LockedTask(**task) for name, task in sorted(tasks.items())},
                       metrics=dict(sorted((metrics or {}).items())))


def lock_json(lock: Lock) -> str:
    return json.dumps(lock.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True,
                      ensure_ascii=False) + "\n"


# ---- comparing a build with its lock (pure) ----

def _flat(value, prefix: str = "") -> dict[str, object]:
    """Nested parameters as dotted keys, so a difference names `lora.r`, not the whole table."""
    if isinstance(value, dict) and value:
        return {k: v for key, inner in value.items() for k, v in _flat(inner, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _changes(old: dict, new: dict, describe) -> list[str]:
    return [describe(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def _value(value) -> str:
    return "(none)" if value is None else json.dumps(value, ensure_ascii=False)


def task_differences(locked: LockedTask, built: LockedTask) -> list[str]:
    """What differs between the facts a task was locked with and this build's, in words."""
    def digest(d):
        return f"{d[:12]}…" if d else "(absent)"

    found = _changes(locked.inputs, built.inputs, lambda k, a, b: f"input {k}: blake3 {digest(a)} → {digest(b)}")
    found += _changes(_flat(locked.params), _flat(built.params),
                      lambda k, a, b: f"parameter {k}: {_value(a)} → {_value(b)}")
    found += _changes(locked.versions, built.versions,
                      lambda k, a, b: f"stage revision {a} → {b}" if k.startswith("stage.")
                      else f"{k} version {a or '(none)'} → {b or '(none)'}")
    found += _changes(locked.platform, built.platform, lambda k, a, b: f"platform {k}: {a or '(none)'} → {b or '(none)'}")
    return found


def _producers(model: LockedModel) -> dict[str, str]:
    """output path → the task that writes it: how the lock knows which task feeds which."""
    return {path: name for name, task in model.tasks.items() for path in task.outputs}


def _upstream(name: str, model: LockedModel, producers: dict[str, str]) -> list[str]:
    return sorted({producers[i] for i in model.tasks[name].inputs if i in producers and producers[i] != name})


def _differing_outputs(locked: LockedTask, built: LockedTask) -> list[str]:
    return sorted(p for p in locked.outputs.keys() | built.outputs.keys() if locked.outputs.get(p) != built.outputs.get(p))


class Finding(BaseModel):
    """The outcome of `doit check`: failures (a paragraph each), notes (what was not compared, and why)."""

    failures: list[str] = []
    notes: list[str] = []
    compared: int = 0


def compare(locked: Lock, built: Lock, lock_name: str) -> Finding:
    finding = Finding()
    todo = f"If the change is intended, run `doit lock` and commit {lock_name}."
    for model_name in sorted(built.models.keys() - locked.models.keys()):
        finding.failures.append(f"model {model_name} is built by the spec but not in {lock_name}. {todo}")
    for model_name in sorted(locked.models.keys() & built.models.keys()):
        _compare_model(model_name, locked.models[model_name], built.models[model_name], lock_name, todo, finding)
    moved = metric_changes(locked, built)
    if moved:
        finding.notes.append(f"metrics against {lock_name}: " + "; ".join(moved))
    return finding


def metric_changes(locked: Lock, built: Lock) -> list[str]:
    """How each recorded eval figure moved, in words: "m Q4_K_M exact_match 0.84 → 0.79"."""
    found = []
    for model_name in sorted(locked.models.keys() & built.models.keys()):
        was, now = locked.models[model_name].metrics, built.models[model_name].metrics
        for variant in sorted(was.keys() & now.keys()):
            for name in sorted(was[variant].keys() & now[variant].keys()):
                if was[variant][name] != now[variant][name]:
                    found.append(f"{model_name} {variant} {name} {was[variant][name]:g} → {now[variant][name]:g}")
    return found


def _compare_model(model_name: str, locked: LockedModel, built: LockedModel, lock_name: str, todo: str,
                   finding: Finding) -> None:
    producers = _producers(locked) | _producers(built)
    for name in sorted(built.tasks.keys() - locked.tasks.keys()):
        finding.failures.append(f"{model_name}: task {name} writes {', '.join(sorted(built.tasks[name].outputs))}, "
                                f"which {lock_name} does not name (a task added to the spec). {todo}")
    for name in sorted(locked.tasks.keys() - built.tasks.keys()):
        finding.failures.append(f"{model_name}: task {name} is in {lock_name} but this spec no longer builds it. {todo}")
    common = locked.tasks.keys() & built.tasks.keys()

    def ancestors(name: str, seen: set[str]) -> set[str]:
        for up in _upstream(name, locked if name in locked.tasks else built, producers):
            if up not in seen:
                seen.add(up)
                ancestors(up, seen)
        return seen

    def origin(name: str) -> tuple[str, list[str]]:
        """The first task upstream (this one included) where something differs, and what."""
        for up in _upstream(name, locked, producers):
            if up in common and _differing_outputs(locked.tasks[up], built.tasks[up]):
                return origin(up)
        return name, task_differences(locked.tasks[name], built.tasks[name])

    def nondeterministic(name: str, path: str) -> str:
        was, now = locked.tasks[name].outputs.get(path), built.tasks[name].outputs.get(path)
        return (f"{name}, not deterministic on this platform: every input, parameter, version and platform fact "
                f"it records is equal, yet {path} has sha256 {was.sha256 if was else '(absent)'} in the lock and "
                f"{now.sha256 if now else '(absent)'} now")

    skipped: dict[str, list[str]] = {}  # the bound task's reason → artifacts not compared
    for name in sorted(common):
        lock_task, built_task = locked.tasks[name], built.tasks[name]
        binding = next((b for b in sorted(ancestors(name, {name}))
                        if b in common and _not_comparable(locked.tasks[b], built.tasks[b])), None)
        if binding:
            reason = _not_comparable(locked.tasks[binding], built.tasks[binding])
            skipped.setdefault(f"{binding}: {reason}", []).extend(sorted(lock_task.outputs))
            continue
        differing = _differing_outputs(lock_task, built_task)
        finding.compared += len(lock_task.outputs)
        if not differing:
            differences = task_differences(lock_task, built_task)
            if differences:
                finding.notes.append(f"{model_name}: {name} reproduced its bytes, though its recorded facts changed "
                                     f"({'; '.join(differences)}); `doit lock` records them.")
            continue
        first, differences = origin(name)
        for path in differing:
            was, now = lock_task.outputs.get(path), built_task.outputs.get(path)
            what = ("is not written any more" if now is None else "is new" if was is None else
                    f"has sha256 {now.sha256[:16]}…, the lock {was.sha256[:16]}…")
            cause = (f"{first}: {'; '.join(differences)}" if differences else
                     nondeterministic(first, path if first == name else _differing_outputs(
                         locked.tasks[first], built.tasks[first])[0]))
            finding.failures.append(f"{model_name}/{path} (from {name}) {what}. First difference upstream: {cause}. "
                                    f"{todo}")
    for reason, paths in skipped.items():
        finding.notes.append(f"{model_name}: {len(paths)} artifact(s) not compared, as they come from or after {reason}.")


def _not_comparable(locked: LockedTask, built: LockedTask) -> str | None:
    """Why a bound task's outputs (and everything after them) cannot be held to the lock here."""
    for task in (locked, built):
        if task.platform.get("resumed") == "true":
            return task.bound
    if (locked.bound or built.bound) and locked.platform != built.platform:
        here = ", ".join(f"{k} {v}" for k, v in sorted(built.platform.items()))
        there = ", ".join(f"{k} {v}" for k, v in sorted(locked.platform.items()))
        return f"{locked.bound or built.bound}; locked on {there}, here {here}"
    return None


# ---- reading and writing ----

def read(path: Path, spec_name: str, model_names: list[str]) -> Lock:
    """Read a lock; a missing, malformed, foreign or too new one is a BuildError naming the file."""
    if not path.is_file():
        raise BuildError(f"{path} does not exist: run `doit lock` to write it from a build, then commit it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BuildError(f"{path} is not a valid lock ({err}); restore it from version control or "
                         "write it again with `doit lock`") from None
    if isinstance(data, dict) and isinstance(data.get("format"), int) and data["format"] > FORMAT:
        raise BuildError(f"{path} was written by a newer modelmake (lock format {data['format']}; this one reads "
                         f"format {FORMAT}): upgrade modelmake, or write it again with `doit lock`")
    try:
        lock = Lock.model_validate(data)
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}" for e in err.errors()[:3])
        raise BuildError(f"{path} is not a valid lock ({where}); restore it from version control or "
                         "write it again with `doit lock`") from None
    if lock.spec != spec_name:
        raise BuildError(f"{path} is the lock of {lock.spec}, not of {spec_name}; each spec has its own "
                         f"<spec>.lock: run `doit lock` for {spec_name}")
    foreign = sorted(set(lock.models) - set(model_names))
    if foreign:
        raise BuildError(f"{path} locks model(s) {', '.join(foreign)}, which {spec_name} does not define (its "
                         f"models: {', '.join(model_names)}); run `doit lock` if they were removed on purpose")
    return lock


def write(path: Path, lock: Lock) -> bool:
    """Write the lock atomically; returns whether its bytes changed."""
    text = lock_json(lock)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return True


# ---- `doit lock` and `doit check` ----

def lock_path(spec: Spec) -> Path:
    """`<spec stem>.lock` beside the spec: models.toml → models.lock."""
    return spec.source.with_suffix(".lock")


def built(spec: Spec) -> Lock:
    """This build as a lock: read from each model's manifest.json and the run records, so no
    artifact is hashed again (the manifest took its digests when the build wrote them)."""
    platforms = {task: record.get("platform") or runlog.platform_facts()
                 for task, record in runlog.read_records(spec.cache).items()}
    results = {m.name: {v: ModelPaths.of(spec, m).eval(v) for v in m.variants} for m in spec.models}
    models = {}
    for name in spec.manifest_names:  # a promoted matrix model has no eval of its own: its choice is in selected.json
        manifest = Manifest.model_validate_json((spec.cache / name / "manifest.json").read_text(encoding="utf-8"))
        models[name] = locked_model(manifest, platforms, eval_metrics(results.get(name, {})))
    return Lock(format=FORMAT, spec=spec.source.name, models=models)


def eval_metrics(results: dict[str, Path]) -> dict[str, dict[str, float]]:
    """variant → its stable eval figures, from its eval result (a variant not measured has none)."""
    found = {}
    for variant, path in sorted(results.items()):
        figures = metrics.stable_figures(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None
        if figures:
            found[variant] = figures
    return found


def write_from_build(spec: Spec) -> str:
    path, current = lock_path(spec), built(spec)
    changed = write(path, current)
    artifacts = sum(len(t.outputs) for m in current.models.values() for t in m.tasks.values())
    return (f"{path.name}: {'written' if changed else 'unchanged'}, {artifacts} artifacts of "
            f"{sum(len(m.tasks) for m in current.models.values())} tasks; commit it beside {spec.source.name}")


def read_for(spec: Spec) -> Lock:
    """The spec's committed lock, or the BuildError that says what is wrong with it."""
    return read(lock_path(spec), spec.source.name, spec.manifest_names)


def check(spec: Spec) -> str:
    """Compare the build with the committed lock; a BuildError with a paragraph per differing artifact."""
    path = lock_path(spec)
    locked = read_for(spec)
    finding = compare(locked, built(spec), path.name)
    for note in finding.notes:
        print(note)
    if finding.failures:
        raise BuildError(f"{path}: {len(finding.failures)} artifact(s) not reproduced.\n\n"
                         + "\n\n".join(finding.failures))
    return f"{path.name}: all {finding.compared} compared artifacts reproduced byte for byte"
