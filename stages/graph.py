"""spec → doit tasks.

Each stage of each model becomes one doit sub-task (`import:NAME`, `convert:NAME`,
`quantize:NAME-Q4_K_M`, `manifest:NAME`). A task is up to date when
- its input files hash (blake3) as they did (`file_dep` + `hashing.Blake3Checker`),
- its parameters and tool versions are unchanged (`config_changed` on a fingerprint),
- its outputs still hash as the last run left them (`hashing.outputs_intact`).
A stale task first looks its action key up in the action cache (`stages.ground.cache`): on a hit its
outputs are restored instead of the stage running; after a run they are recorded there.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from typing import get_args

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from . import (__version__, adapter, convert, evaluate, experiments, import_, manifest, merge, package, parity,
               quantize, serve, track, train)
from .ground import llamacpp, lock, registry, runlog
from .ground.cache import ActionCache, ActionKey, Recipe
from .ground.errors import BuildError
from .ground.hashing import INDEX, expand_files, fingerprint, outputs_intact, record_outputs, tool_versions
from .ground.progress import quiet_library_bars
from .ground.ray_executor import Placement, RayExecutor, ray_options
from .ground.remote import Remote
from .ground.spec import CLUSTER_STAGES, ModelSpec, Spec
from .ground.store import Store, collect_garbage, measure
from .ground.task import ModelBuild, Task
from .ground.units import parse_size
from .manifest import Producer

# The lifecycle, in order: each module declares its tasks (`tasks(build)`), its `REVISION` (bumped
# when its code changes the bytes it writes) and the `TOOLS` whose versions shape those bytes.
STAGE_MODULES = {"import": import_, "train": train, "adapter": adapter, "merge": merge, "convert": convert,
                 "quantize": quantize, "eval": evaluate, "parity": parity, "package": package, "track": track}
# What `doit` builds; push, pull and verify run only when named. `select` chooses among a matrix's
# variants (stages.experiments) before the chosen one is packaged; `track` records the build in
# MLflow after its manifest.
STAGES = (*[s for s in STAGE_MODULES if s not in ("package", "track")], "select", "package", "manifest", "track")
MANIFEST_REVISION = 1


def versions(stage: str) -> dict[str, str]:
    module = STAGE_MODULES.get(stage)
    revision, tools = (module.REVISION, module.TOOLS) if module else (MANIFEST_REVISION, ())
    return {"modelmake": __version__, f"stage.{stage}": str(revision), **tool_versions(*tools)}


def run_stage(func, kwargs: dict, outputs: list[Path], cache: Path, task: str, recipe: Recipe,
              action_cache: ActionCache | None, cluster: tuple[RayExecutor, Placement] | None = None):
    """doit python-action: restore the task's outputs from the action cache, or run the stage (here, or
    on the Ray cluster of `cluster`: its executor and where the task goes) and record them there;
    timed for the report. A BuildError becomes a one-paragraph failure."""
    quiet_library_bars()
    try:
        with runlog.measured(cache, task) as run:
            key = recipe.key() if action_cache else None
            restored = action_cache.restore(recipe, key) if key else None
            if restored:
                run |= restored  # the platform it was built on, for the lock
            elif cluster:
                executor, placement = cluster
                ran = executor.build(recipe, func, kwargs, placement, key)
                run["platform"] |= ran.pop("platform")
                run |= ran  # the node and pid it ran on, its own time and memory
            else:
                run["platform"] |= func(**kwargs) or {}  # a stage may report more of what shaped its bytes
            if key:
                run["action_key"] = key
            recorded = record_outputs([str(f) for f in expand_files(outputs)])  # hashing is part of the task's cost
        if key and not restored:
            action_cache.record(recipe, key, run)
    except BuildError as err:
        runlog.record_failure(cache, task, str(err))
        return TaskFailed(str(err))
    except OSError as err:  # the file system said no; the stage's temporary files are already gone
        runlog.record_failure(cache, task, file_system_refused(task, err))
        return TaskFailed(file_system_refused(task, err))
    return {"outputs": recorded}


def file_system_refused(task: str, err: OSError) -> str:
    """A stage's OSError (a full disk, a read-only or forbidden folder) as a one-paragraph failure."""
    where = f" on {err.filename}" if err.filename else ""
    way_out = {errno.ENOSPC: "free space on that disk, or give the cache a folder on a larger one "
                             "(`cache = \"...\"` in the spec), and run doit again",
               errno.EDQUOT: "free space within your quota, or give the cache a folder elsewhere",
               errno.EROFS: "that file system is read-only: give the cache a writable folder",
               errno.EACCES: "modelmake may not write there: fix the folder's permissions or move the cache",
               errno.EPERM: "modelmake may not write there: fix the folder's permissions or move the cache"}
    return (f"{task} failed: {err.strerror or err}{where}. Its unfinished files were removed and nothing was "
            f"recorded; {way_out.get(err.errno, 'fix the cause and run doit again')}.")


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
    except OSError as err:
        return TaskFailed(file_system_refused(func.__name__, err))


def run_check(func, kwargs: dict):
    """doit python-action for a check before a stage (a quality gate): silent, or fail in one paragraph."""
    try:
        func(**kwargs)
    except BuildError as err:
        return TaskFailed(str(err))


def placement(stage: str, task: Task, build: ModelBuild) -> Placement:
    """Where a task of `stage` goes on a Ray cluster: what it asks of a node (the spec's resources for the
    stage, else one CPU, and for training one GPU per process on cuda), on how many nodes (a training
    run's `nodes`), and the work it keeps between attempts (its checkpoints)."""
    train = build.model.train
    if stage == "train" and train is not None and task.name == build.model.name:
        request = train.resources if train.resources is not None else \
            build.spec.build.resources.get("train", {"GPU": train.processes} if train.device == "cuda" else {})
        return Placement(ray_options(request), train.nodes, tuple(task.scratch))
    return Placement(ray_options(build.spec.build.resources.get(stage, {})))


def doit_task(stage: str, task: Task, build: ModelBuild, action_cache: ActionCache | None,
              executor: RayExecutor | None = None) -> dict:
    """A stage's task description → the doit task; every stage is wrapped the same way."""
    outputs, name = task.outputs, f"{stage}:{task.name}"
    cache = build.spec.cache
    task_versions = versions(stage) | task.versions
    recipe = Recipe(name, {build.input_name(p): p for p in task.inputs}, task.params, task_versions,
                    tuple(task.written), cache)
    wired = {
        "name": task.name,
        "doc": task.doc,
        "actions": [*((run_check, [check, kwargs]) for check, kwargs in task.checks),
                    (run_stage, [task.action, task.kwargs, outputs, cache, name, recipe,
                                 action_cache if task.cacheable else None,
                                 (executor, placement(stage, task, build)) if executor else None])],
        "file_dep": [str(p) for p in task.inputs],
        "targets": [str(p) for p in task.targets or outputs],
        "uptodate": [config_changed(fingerprint(task.params, task_versions)), outputs_intact],
        "clean": [(remove, [task.written + task.scratch])],
        "meta": {"action key": ActionKey(recipe)},
    }
    if task.after:
        wired["task_dep"] = list(task.after)
    if executor:  # doit's threads would each swap sys.stdout for a capturing copy, and Ray's log lines,
        wired["io"] = {"capture": False}  # printed from its own thread, would land in several of them
    return wired


def producer(stage: str, task: Task, build: ModelBuild) -> Producer:
    """What the manifest records of an artifact task: inputs named as on every machine."""
    # A matrix variant's shared artifacts (its base's import and GGUF) are named from its own folder: ../<model>/…
    return Producer(task=f"{stage}:{task.name}", outputs=[Path(os.path.relpath(p, build.paths.root)).as_posix()
                                                          for p in task.outputs],
                    inputs={build.input_name(p): str(p) for p in task.inputs}, params=task.params,
                    versions=versions(stage) | task.versions)


def model_tasks(spec: Spec, model: ModelSpec, action_cache: ActionCache | None,
                executor: RayExecutor | None = None) -> dict[str, list[dict]]:
    """Every task of one model, by stage, in lifecycle order: each stage's own, then the manifest
    over every artifact, and the push and verify tasks that run only when named."""
    build = ModelBuild.of(spec, model)
    wired: dict[str, list[dict]] = {stage: [] for stage in (*STAGES, "push", "verify")}
    producers: list[Producer] = []
    built: list[Path] = []  # every artifact task's targets: what the manifest waits for
    for stage, module in STAGE_MODULES.items():
        for task in module.tasks(build):
            wired[stage].append(doit_task(stage, task, build, action_cache,
                                          executor if stage in get_args(CLUSTER_STAGES) else None))
            if task.artifact:
                built.extend(task.targets or task.outputs)
                producers.append(producer(stage, task, build))

    if not model.matrix_of:  # a variant's releases are not pushed; its matrix's chosen one is
        wired["push"] += push_tasks(spec, build, package.releases(build))
    wired["manifest"].append(manifest_task(build, producers, built, action_cache))
    wired["verify"].append(verify_task(build))
    return wired


def push_tasks(spec: Spec, build: ModelBuild, releases: list[package.Release]) -> list[dict]:
    if not spec.package.registry:
        return []
    found = []
    for release in releases:
        folder = build.paths.package(release.variant)
        found.append({
            "name": f"{release.model}-{release.variant}",
            "doc": f"{folder.relative_to(spec.cache)}/oci → {release.reference}",
            "actions": [(run_action, [registry.push, {"layout": folder / "oci", "tag": release.variant,
                                                      "ref": release.reference, "tls_verify": spec.package.tls_verify}])],
            "file_dep": [str(folder / INDEX)],
            "uptodate": [False],  # an explicit request: always ask the registry
            "verbosity": 2,
        })
    return found


def manifest_task(build: ModelBuild, producers: list[Producer], built: list[Path],
                  action_cache: ActionCache | None) -> dict:
    paths, name = build.paths, build.model.name
    described = [p.model_dump(exclude={"inputs"}) | {"inputs": sorted(p.inputs)} for p in producers]
    return doit_task("manifest", Task(
        name, "manifest.json + SHA256SUMS of every artifact", manifest.run,
        {"model": name, "model_dir": paths.root, "producers": producers},
        {"producers": described}, inputs=built, outputs=[paths.root / "manifest.json", paths.root / "SHA256SUMS"]),
        build, action_cache)


def verify_task(build: ModelBuild) -> dict:
    return {
        "name": build.model.name,
        "doc": "re-hash every artifact against manifest.json and SHA256SUMS",
        "actions": [(run_action, [_verified, {"model_dir": build.paths.root}])],
        "uptodate": [False],
        "verbosity": 2,
    }


def promotion_tasks(spec: Spec, matrix_model: str, variants: list[ModelSpec],
                    action_cache: ActionCache | None) -> dict[str, list[dict]]:
    """[models.select]: `select:<model>` chooses a variant by its eval figures; `package:<model>-<release>`
    packages the chosen variant's release under the model's own name (every variant's files are its
    inputs, since any may win); its manifest holds the choice and the packages, and they are pushed."""
    builds = [ModelBuild.of(spec, v) for v in variants]
    chosen = variants[0].select
    promoted = ModelBuild.of(spec, variants[0].model_copy(update={"name": matrix_model, "matrix_of": None,
                                                                  "varied": {}, "select": None}))
    selection = promoted.paths.root / "selected.json"
    results = {b.model.name: b.paths.eval(chosen.variant) for b in builds}
    select = Task(matrix_model, f"choose the variant with the {'highest' if chosen.maximizes else 'lowest'} "
                  f"{chosen.metric} of {chosen.variant}", experiments.select,
                  {"select_spec": chosen, "results": results, "out_path": selection, "model": matrix_model},
                  {"select": chosen.model_dump(mode="json")}, inputs=list(results.values()), outputs=[selection])
    wired = {"select": [doit_task("select", select, promoted, action_cache)], "package": [], "push": []}
    producers, built = [producer("select", select, promoted)], [selection]
    by_release: dict[str, dict[str, Task]] = {}
    for build in builds:
        for task in package.release_tasks(build):
            by_release.setdefault(task.kwargs["release"].variant, {})[build.model.name] = task
    releases = []
    for release_name, per_variant in by_release.items():
        if len(per_variant) < len(builds):
            continue  # a release only some variants make (a matrix over quantize) cannot be chosen among all
        out_dir = promoted.paths.package(release_name)
        choices, inputs, after = {}, [selection], [f"select:{matrix_model}"]
        for variant, task in per_variant.items():
            release = dataclasses.replace(task.kwargs["release"], model=matrix_model,
                                          reference=package.docker_reference(spec, matrix_model, release_name))
            choices[variant] = (task.action, task.kwargs | {"release": release, "out_dir": out_dir}, task.checks)
            inputs += [p for p in task.inputs if p not in inputs]
            after += task.after
        releases.append(release)
        promote = Task(f"{matrix_model}-{release_name}", f"{release_name} of the chosen variant → OCI artifact, "
                       "Modelfile, compose.yaml", experiments.run_promoted, {"choices": choices, "selection": selection},
                       {"choices": {v: t.params for v, t in per_variant.items()}, "reference": release.reference},
                       inputs=inputs, outputs=[out_dir], targets=[out_dir / INDEX], after=after)
        wired["package"].append(doit_task("package", promote, promoted, action_cache))
        producers.append(producer("package", promote, promoted))
        built.append(out_dir / INDEX)
    wired["push"] = push_tasks(spec, promoted, releases)
    wired["manifest"] = [manifest_task(promoted, producers, built, action_cache)]
    wired["verify"] = [verify_task(promoted)]
    return wired


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


def compare_task(spec: Spec, model: str | None, sort: str, columns: str, form: str) -> dict:
    """`doit compare`: reads what the build left; builds nothing."""
    return {
        "actions": [(run_action, [experiments.compare, {"spec": spec, "model": model, "columns": columns, "sort": sort,
                                                        "form": form}])],
        "uptodate": [False],
        "verbosity": 2,
    }


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


def _report_action(models, nodes, spec_name: str, cache: Path, out_dir: Path, store: Store, spec: Spec):
    from . import report

    try:
        report.run(models, nodes, spec_name, cache, out_dir, report.store_words(measure(store)),
                   [experiments.for_report(spec, name) for name in spec.matrices], _metrics_moved(spec))
    except BuildError as err:
        return TaskFailed(str(err))
    return {"outputs": record_outputs([str(out_dir / "REPORT.md"), str(out_dir / "report.html")])}


def _metrics_moved(spec: Spec) -> list[str] | None:
    """How each eval figure moved against the committed lock; None without a lock to compare with."""
    path = lock.lock_path(spec) if spec.source else None
    if path is None or not path.is_file():
        return None
    try:
        return lock.metric_changes(lock.read_for(spec), lock.built(spec))
    except (BuildError, OSError, ValueError):  # a lock of another spec, a model not built: nothing to say
        return None


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
        build = ModelBuild.of(spec, model)
        paths = build.paths
        _, source = evaluate.eval_text(build)
        models.append(report.ModelInputs(
            model.name, paths.root, model.variants,
            paths.adapter / "train_log.jsonl" if paths.trained else None, source,
            {v: g.model_dump(exclude_none=True) for v, g in model.eval.gate.items()},
            [r.variant for r in package.releases(build)], {v: paths.eval(v) for v in model.variants},
            paths.preview if paths.trained else None))
        file_dep += [paths.eval(v) for v in model.variants] + [paths.root / "manifest.json"]
        file_dep += [paths.root / "parity" / f"{r.variant}.json" for r in package.releases(build)]
    file_dep += [spec.cache / name / "manifest.json" for name in spec.promoted]
    nodes = report.graph_nodes(all_tasks, STAGES)
    out_dir = spec.cache / "report"
    outputs = [out_dir / "REPORT.md", out_dir / "report.html"]
    return {
        "doc": "REPORT.md and report.html: eval tables, fine-tune before/after, loss curve, build times, task graph",
        "actions": [(_report_action, [models, nodes, spec.source.stem if spec.source else "spec", spec.cache, out_dir,
                                      action_cache(spec).store, spec])],
        "file_dep": [str(p) for p in file_dep],
        "targets": [str(p) for p in outputs],
        "uptodate": [config_changed(fingerprint({"models": [repr(m) for m in models]}, {"modelmake": __version__})),
                     outputs_intact, (_runs_unchanged, [], {"cache": spec.cache})],
        "clean": [(remove, [[out_dir]])],
    }


def lock_task(spec: Spec, build: list[str]) -> dict:
    return {
        "doc": f"write {lock.lock_path(spec).name} from the build (what is stale is built first); commit it",
        "actions": [(run_action, [lock.write_from_build, {"spec": spec}])],
        "task_dep": list(build),
        "uptodate": [False],
        "verbosity": 2,
    }


def check_tasks(spec: Spec, build: list[str]) -> list[dict]:
    """`doit check`; a lock that is missing, malformed, foreign or too new fails before the build
    (`_check-lock`, private: doit list leaves it out), not after hours of it."""
    return [{
        "basename": "_check-lock",
        "doc": f"read {lock.lock_path(spec).name} before building",
        "actions": [(run_check, [lock.read_for, {"spec": spec}])],
        "uptodate": [False],
    }, {
        "basename": "check",
        "doc": f"build what is stale, then compare every artifact with {lock.lock_path(spec).name} (CI's check)",
        "actions": [(run_action, [lock.check, {"spec": spec}])],
        "task_dep": ["_check-lock", *build],
        "uptodate": [False],
        "verbosity": 2,
    }]


def action_cache(spec: Spec) -> ActionCache:
    """The spec's [cache]: the local store, and the registry behind it if one is named."""
    options = spec.cache_options
    remote = Remote(options.remote, options.push, options.tls_verify) if options.remote else None
    return ActionCache(Store(options.store or spec.cache / ".store"), remote)


def ray_executor(spec: Spec) -> RayExecutor:
    """[build] executor = "ray": tasks run on the cluster, files travel through the spec's action cache."""
    transport = action_cache(spec)
    return RayExecutor(spec.build.address, transport.store, transport.remote, spec.cache_options.store is not None,
                       spec.source.parent if spec.source else None)


def _built_keys(spec: Spec) -> dict[str, str]:
    """task → the action key its last run (or restore) had: what this checkout's build uses."""
    return {task: record["action_key"] for task, record in runlog.read_records(spec.cache).items()
            if "action_key" in record}


def _cache_push(spec: Spec) -> str:
    cache = action_cache(spec)
    if cache.remote is None:
        raise BuildError(f"{spec.source}: no remote to push the cache to: add [cache] remote = \"host[:port]/repository\"")
    pushed, absent = 0, []
    for task, key in sorted(_built_keys(spec).items()):
        entry = cache.store.lookup(key)
        if entry is None:
            absent.append(task)
            continue
        cache.remote.upload(entry, cache.store)
        pushed += 1
    note = f"; not in the local store (built with `cache=off`, or collected): {', '.join(absent)}" if absent else ""
    return f"{pushed} cache entries pushed to {cache.remote.repository}{note}"


def _tools_built() -> bool:
    try:
        llamacpp.find()
    except BuildError:
        return False
    return True


def tools_task() -> dict:
    """Part of setup; the tasks that run a tool or a converter wait for it, so a first `doit` builds
    the tools too."""
    return {
        "doc": "build llama.cpp's llama-imatrix, llama-quantize, llama-mtmd-cli and llama-server from llama-cpp-python's "
               "own source, linked to its libraries, and stage its converters (once)",
        "actions": [(run_action, [llamacpp.build, {}])],
        "uptodate": [_tools_built],
        "verbosity": 2,
    }


def serve_task(spec: Spec, model: str | None, variant: str | None, port: str) -> dict:
    return {
        "basename": "serve",
        "doc": "serve a built release with llama-server, as Docker Model Runner does: doit serve variant=Q4_K_M",
        "actions": [(run_action, [serve.serve, {"spec": spec, "model_name": model, "variant": variant, "port": port}])],
        "uptodate": [False],
        "verbosity": 2,
    }


def cache_push_task(spec: Spec) -> dict:
    return {
        "basename": "cache-push",
        "doc": "upload every task output this checkout has built to the [cache] remote",
        "actions": [(run_action, [_cache_push, {"spec": spec}])],
        "uptodate": [False],
        "verbosity": 2,
    }


def _cache_gc(keep_size: str, spec: Spec) -> str:
    try:
        limit = parse_size(keep_size)
    except ValueError as err:
        raise BuildError(f"doit cache-gc --keep-size: {err}") from None
    store = action_cache(spec).store
    return collect_garbage(store, limit, set(_built_keys(spec).values()))


def _cache_gc_action(keep_size: str, spec: Spec):
    return run_action(_cache_gc, {"keep_size": keep_size, "spec": spec})


def cache_gc_task(spec: Spec) -> dict:
    return {
        "basename": "cache-gc",
        "doc": "shrink the local action cache to --keep-size (least recently used first, never this build's)",
        "actions": [(_cache_gc_action, [], {"spec": spec})],
        "params": [{"name": "keep_size", "long": "keep-size", "default": "20GB",
                    "help": "the most the store may keep, e.g. 20GB, 500MB, 0 (default 20GB)"}],
        "uptodate": [False],
        "verbosity": 2,
    }


def _identity(task: dict) -> tuple:
    """What makes two declarations of one task the same task: its files, and its parameters and
    versions (the fingerprint `config_changed` holds)."""
    fingerprints = [u.config for u in task.get("uptodate", []) if isinstance(u, config_changed)]
    return tuple(task.get("file_dep", [])), tuple(task.get("targets", [])), tuple(fingerprints)


def tasks(spec: Spec, use_cache: bool = True) -> dict[str, list[dict]]:
    """stage → the doit sub-task dicts of every model, for dodo.py's `task_<stage>` creators;
    `use_cache=False` (`doit cache=off`) runs every stale task instead of restoring it."""
    merged: dict[str, list[dict]] = {}
    cache = action_cache(spec) if use_cache else None
    executor = ray_executor(spec) if spec.build.executor == "ray" else None
    seen: dict[str, tuple] = {}
    for model in spec.models:
        for stage, stage_tasks in model_tasks(spec, model, cache, executor).items():
            merged.setdefault(stage, [])
            for task in stage_tasks:
                # The variants of a matrix declare the tasks they share (the base's import, preflight and
                # GGUF) under one name: the first declaration stands for all of them.
                name, same = f"{stage}:{task['name']}", _identity(task)
                if name in seen:
                    if seen[name] != same:
                        raise BuildError(f"{name} is declared twice with different inputs or parameters "
                                         f"(model {model.name}); this is a modelmake bug, please report it")
                    continue
                seen[name] = same
                merged[stage].append(task)
    for matrix_model in spec.promoted:
        for stage, stage_tasks in promotion_tasks(spec, matrix_model, spec.matrices[matrix_model], cache).items():
            merged.setdefault(stage, []).extend(stage_tasks)
    merged["report"] = [_report_task(spec, merged)]  # one task, not sub-tasks: dodo.py returns it as is
    if not spec.package.registry:  # `doit push` says what is missing instead of "unknown task"
        merged["push"] = [{"name": "no-registry", "doc": "[package] registry is not set",
                           "actions": [(run_action, [_no_registry, {"source": spec.source}])], "uptodate": [False]}]
    return merged
