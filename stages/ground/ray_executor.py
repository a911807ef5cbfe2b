"""`[build] executor = "ray"`: each stale task's action runs on a Ray cluster; doit stays the scheduler.

doit decides what is stale, in what order, and (with `-n N`, its thread runner) how many at once;
Ray decides where. The doit side of a task (`RayExecutor.run`):
1. checks that some node of the cluster has what the stage asks for (its resources, in Ray's names),
   so an impossible request fails at once instead of waiting forever;
2. files the task's inputs in the action cache's store by content (an entry of their own, hard links,
   no copy) and, when the store is not shared with the workers, uploads them to the `[cache] remote`;
3. submits one Ray task and waits for it.
The worker (`_on_worker`) says where it runs (node, pid), takes the inputs from the store by
digest into a work folder of its own, runs the stage there with every path moved into that folder,
records the outputs into the store under the task's key and returns only their digests and facts.
The doit side then restores the outputs as it restores a cache hit: no tensor passes through
Ray's object store, and a worker that dies leaves blobs no entry names, never a half entry.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable

import blake3
from pydantic import BaseModel

from .atomic import link_or_copy, process_alive
from .cache import Recipe
from .errors import BuildError
from .hashing import INDEX, canonical_json, expand_files, file_blake3
from .remote import Remote
from .store import Entry, Store

# Ray's own names for what a task asks of a node; any other name is a custom resource of the cluster.
RAY_OPTION_NAMES = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory", "accelerator_type": "accelerator_type"}


def ray_options(request: dict) -> dict:
    """`{CPU = 2, GPU = 1, memory = "40GB", accelerator_type = "H100", <custom> = 1}` (as the spec
    writes a stage's resources) → the keyword arguments of Ray's `.options()`. Pure; raises
    ValueError naming what is wrong."""
    from .units import parse_size

    options: dict = {}
    for name, value in request.items():
        if name == "accelerator_type":
            if not isinstance(value, str) or not value:
                raise ValueError(f"accelerator_type = {value!r}: give the accelerator's name as Ray knows it, e.g. \"H100\"")
            options["accelerator_type"] = value
        elif name == "memory":
            size = parse_size(value) if isinstance(value, str) else value
            if not isinstance(size, (int, float)) or size <= 0:
                raise ValueError(f"memory = {value!r}: write a size, e.g. \"40GB\"")
            options["memory"] = int(size)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} = {value!r}: a resource is a number of units, 0 or more (e.g. {name} = 1)")
            if name in RAY_OPTION_NAMES:
                options[RAY_OPTION_NAMES[name]] = value
            else:
                options.setdefault("resources", {})[name] = value
    return options


def node_offers(options: dict) -> dict[str, float]:
    """What a node must offer, in the names `ray.nodes()` reports, to take a task of these options."""
    needs = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0), "memory": options.get("memory", 0),
             **options.get("resources", {})}
    if "accelerator_type" in options:
        needs[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return {name: amount for name, amount in needs.items() if amount}


def nodes_that_fit(options: dict, nodes: list[dict]) -> list[dict]:
    """The alive nodes (as `ray.nodes()` lists them) with every resource the task asks for."""
    needs = node_offers(options)
    return [node for node in nodes if node.get("Alive")
            and all(node.get("Resources", {}).get(name, 0) >= amount for name, amount in needs.items())]


def _address_parts(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BuildError(f"Ray address {address!r} is not host:port (a head node's GCS port, e.g. 10.0.0.5:6379, "
                         "or ray://host:10001 for Ray Client)")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


# ---- paths: a stage's arguments name files of the doit machine; the worker has its own folder ----

def moved(value, roots: dict[str, Path]):
    """`value` (a stage's arguments: paths, strings, lists, dicts, dataclasses, pydantic models) with
    every path under one of `roots` (old folder → new folder) moved under the new one."""
    if isinstance(value, PurePath):
        for old, new in roots.items():
            if value.is_relative_to(old):
                return new / value.relative_to(old)
        return value
    if isinstance(value, str):
        for old, new in roots.items():
            if value == old or value.startswith(old + os.sep):
                return str(new) + value[len(old):]
        return value
    if isinstance(value, dict):
        return {moved(k, roots): moved(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(moved(v, roots) for v in value)
    if isinstance(value, BaseModel):
        return value.model_copy(update={name: moved(getattr(value, name), roots) for name in type(value).model_fields})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: moved(getattr(value, f.name), roots)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def input_files(inputs: list[Path]) -> list[Path]:
    """A task's input files, with each folder it names by its index (files.b3) expanded to every file."""
    found: dict[Path, None] = {}
    for path in inputs:
        found[path] = None
        if path.name == INDEX:
            for line in path.read_text(encoding="utf-8").splitlines():
                found[path.parent / line.split("  ", 1)[1]] = None
    return list(found)


def roots_of(files: list[Path], cache_dir: Path, spec_dir: Path | None) -> dict[Path, str]:
    """Where each folder of the doit machine goes in a worker's work folder: the cache to cache/,
    the spec's folder to spec/, and the folder of any other input (a base in site-packages) to in<N>/."""
    roots = {cache_dir: "cache", **({spec_dir: "spec"} if spec_dir else {})}
    for path in files:
        if not any(path.is_relative_to(root) for root in roots):
            roots[path.parent] = f"in{len(roots)}"
    return roots


@dataclass(frozen=True)
class Placement:
    """Where a task goes: what it asks of a node (Ray's `.options()`), on how many nodes at once, and
    the work folders it keeps between attempts (train's checkpoints), relative to the cache."""

    options: dict
    nodes: int = 1
    scratch: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Shipment:
    """One task as a worker receives it (pickled by Ray: small, no file contents)."""

    task: str
    func: Callable
    kwargs: dict
    roots: dict[str, str]  # a folder of the doit machine → its name in the work folder
    inputs_key: str  # the store entry holding the input files, named under the work folder
    written: tuple[str, ...]  # what the task writes, relative to the cache folder
    key: str  # the entry the outputs are recorded under
    store: str  # the store the worker uses: the shared one, or its own in front of the remote
    remote: Remote | None  # where inputs and outputs travel when the store is not shared
    version: str  # modelmake's version on the doit side: a worker must run the same
    cpus: float  # the CPUs Ray gave the task: what `threads = 0` means on the worker
    # Work folders kept in the store between attempts, so a killed run resumes wherever it lands next.
    scratch: tuple[str, ...] = ()
    # One of several nodes of one training run: {"nodes", "node_rank", "run_id", "endpoint"} (None: alone).
    gang: dict | None = None


def _work_folder(store: Store) -> Path:
    """A work folder under the store (so its outputs become blobs by hard link), named by host and pid."""
    host = socket.gethostname().replace("-", "_")
    for old in (store.root / "tmp").glob(f"ray.{host}-*-*"):  # what killed workers of this host left
        pid = old.name.split("-")[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return store.work_dir(f"ray.{host}")


def _free_port(ip: str) -> int:
    with socket.socket() as probe:
        probe.bind((ip, 0))
        return probe.getsockname()[1]


def _on_worker(shipment: Shipment):
    """The Ray task (a generator): first where it runs, then the outcome (facts, or the error)."""
    import ray

    from .. import __version__
    from .runlog import peak_memory

    ip = ray.util.get_node_ip_address()
    gang = dict(shipment.gang) if shipment.gang else None
    if gang and gang["endpoint"] is None:  # the first node of the run: the others meet it here
        gang["endpoint"] = f"{ip}:{_free_port(ip)}"
    yield {"node_id": ray.get_runtime_context().get_node_id(), "ip": ip, "host": socket.gethostname(),
           "pid": os.getpid(), **({"endpoint": gang["endpoint"]} if gang else {})}
    if shipment.version != __version__:
        yield {"error": f"{shipment.task}: the Ray worker runs modelmake {__version__}, this build {shipment.version}; "
                        "install the same version on every node of the cluster"}
        return
    store = Store(Path(shipment.store if shipment.remote is None else
                       os.environ.get("MODELMAKE_WORKER_STORE", shipment.store)).expanduser())
    work = _work_folder(store)
    cache_dir = next(old for old, name in shipment.roots.items() if name == "cache")
    kept = store.root / "scratch" / shipment.task.replace(":", "-")
    roots = {**{os.path.join(cache_dir, rel): kept / rel for rel in shipment.scratch},  # before the cache's own root
             **{old: work / name for old, name in shipment.roots.items()}}
    try:
        entry = store.lookup(shipment.inputs_key)
        if entry is None and shipment.remote is not None:
            entry = shipment.remote.fetch(shipment.inputs_key, f"inputs of {shipment.task}", store)
        if entry is None:
            raise BuildError(f"{shipment.task}: its inputs (entry {shipment.inputs_key[:16]}…) are in neither {store.root} "
                             "nor the cache remote, as seen from this worker: give every node the same [cache] store "
                             "(a shared folder) or a [cache] remote")
        damage = store.intact(entry)
        if damage:
            raise BuildError(f"{shipment.task}: an input changed while the build ran ({damage}); run doit again")
        for path, stored in entry.files.items():
            placed = work / path
            placed.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(store.blob(stored.blake3), placed)
        started = time.perf_counter()
        kwargs = moved(shipment.kwargs, roots)
        if kwargs.get("threads") == 0:  # "all cores": on a shared node, the CPUs the task was given
            kwargs["threads"] = max(1, int(shipment.cpus))
        if gang:
            kwargs["gang"] = gang
        with peak_memory() as memory:
            platform = shipment.func(**kwargs) or {}
        facts = {"platform": platform, "worker_wall_s": round(time.perf_counter() - started, 3), **memory}
        written = [work / "cache" / rel for rel in shipment.written]
        if gang and not all(path.exists() for path in written):  # the run's main process was on another node
            yield {"facts": facts, "recorded": False, "gang": True}
            return
        recorded = store.record(shipment.key, shipment.task, work / "cache", expand_files(written), facts)
        if shipment.remote is not None:
            shipment.remote.upload(recorded, store)
        yield {"facts": facts, "recorded": True}
    except BuildError as err:
        yield {"error": _back_home(str(err), roots), "failed_at": time.time(), **({"gang": True} if gang else {})}
    except OSError as err:
        yield {"oserror": [err.errno, err.strerror, _back_home(str(err.filename), roots) if err.filename else None]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _back_home(text: str, roots: dict[str, Path]) -> str:
    """A worker's message with its work folder's paths named as the doit machine knows them."""
    for old, new in roots.items():
        text = text.replace(str(new), old)
    return text


# ---- the doit side ----

# A worker's own store where it does not share the build's: files come and go through the remote.
# Read on the worker: MODELMAKE_WORKER_STORE (set where the node's `ray start` runs) puts it elsewhere.
WORKER_STORE = "~/.cache/modelmake/ray-store"


class RayExecutor:
    """One per build: connects to the cluster on the first task and submits every task after it."""

    def __init__(self, address: str | None, store: Store, remote: Remote | None, store_named: bool,
                 spec_dir: Path | None):
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
        self.store, self.remote, self.spec_dir = store, remote, spec_dir
        # Whether the workers read and write this build's store: a local Ray, a cluster on this machine
        # (a loopback address), or a [cache] store the spec names (a folder every node mounts).
        self.shared = self.address is None or store_named or _loopback(_address_parts(self.address)[0])
        self._lock = threading.Lock()
        self._connected = False
        self._failure: BuildError | None = None

    @property
    def where(self) -> str:
        return f"the Ray cluster at {self.address}" if self.address else "a local Ray started for this build"

    def connect(self) -> None:
        """Once per build; a cluster that cannot be reached fails every later task at once too."""
        with self._lock:
            if self._failure:
                raise self._failure
            if self._connected:
                return
            try:
                self._connect()
            except BuildError as err:
                self._failure = err
                raise
            self._connected = True

    def _connect(self) -> None:
        try:
            import ray
        except ImportError:
            raise BuildError("[build] executor = \"ray\" needs Ray: pip install -e '.[ray]' (on this machine and every "
                             "node of the cluster)") from None
        if self.address:
            host, port = _address_parts(self.address)
            try:  # ray.init retries an unreachable address for minutes before it says so
                socket.create_connection((host, port), timeout=5).close()
            except OSError as err:
                raise BuildError(f"the Ray cluster at {self.address} cannot be reached ({err.strerror or err}): start it "
                                 f"(`ray start --head --port={port}` on {host}) or fix [build] address (or RAY_ADDRESS)") from None
            if not (self.shared or (self.remote and self.remote.push)):
                raise BuildError(f"the Ray cluster at {self.address} runs tasks on other machines, which cannot read "
                                 f"this machine's action cache ({self.store.root}): set [cache] store to a folder every "
                                 "node mounts (NFS, a shared disk), or [cache] remote with push = true")
        # log_to_driver: the workers' progress lines print here, prefixed with their task and pid. doit
        # runs tasks in threads, where Ray cannot (and need not) set its SIGTERM handler: it says so.
        said = logging.getLogger("ray._private.worker")
        level = said.level
        said.setLevel(logging.ERROR)
        try:
            ray.init(address=self.address or "local", log_to_driver=True, include_dashboard=False,
                     configure_logging=False, namespace="modelmake")
        finally:
            said.setLevel(level)

    def build(self, recipe: Recipe, func: Callable, kwargs: dict, placement: Placement, key: str | None) -> dict:
        """Run a task on the cluster and put its outputs in place, as a cache hit is restored; return the
        run's facts. Without a key (`cache=off`, or a task whose outputs depend on more than its inputs)
        the outputs travel under a one-off key, dropped once they are in place."""
        one_off = key is None
        key = key or f"once-{uuid.uuid4().hex}"
        facts = self.run(recipe.task, func, kwargs, list(recipe.inputs.values()), recipe.written, recipe.cache_dir,
                         key, placement)
        entry = self.store.lookup(key)
        if entry is None and self.remote is not None:
            entry = self.remote.fetch(key, recipe.task, self.store)
        if entry is None:
            raise BuildError(f"{recipe.task} ran on the cluster, but its outputs (entry {key[:16]}…) reached neither "
                             f"{self.store.root} nor the cache remote; run doit again")
        self.store.restore(entry, recipe.written, recipe.cache_dir)
        if one_off:
            self.store.discard(key)
        return facts

    def run(self, task: str, func: Callable, kwargs: dict, inputs: list[Path], written: tuple[Path, ...],
            cache_dir: Path, key: str, placement: Placement) -> dict:
        """Run one task on the cluster (on `placement.nodes` nodes at once for a training run across
        nodes); return its run facts (where, how long, its memory), the outputs recorded in the store
        under `key`. Raises BuildError (or the stage's OSError) on failure."""
        from .. import __version__

        self.connect()
        import ray

        options = placement.options
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        fitting = nodes_that_fit(options, nodes)
        if len(fitting) < placement.nodes:
            offered = "; ".join(f"{n.get('NodeManagerAddress')}: " + ", ".join(
                f"{k} {v:g}" for k, v in sorted(n.get("Resources", {}).items()) if not k.startswith("node:"))
                for n in nodes)
            asked = ", ".join(f"{k} {v:g}" for k, v in node_offers(options).items())
            short = (f"{asked}, which no node of {self.where} has" if placement.nodes == 1 else
                     f"{asked} on each of {placement.nodes} nodes, and {len(fitting)} of {self.where} have it")
            raise BuildError(f"{task} asks for {short} ({offered}). Change the stage's resources ([models.train] "
                             "resources or nodes, [build.resources]) or add such nodes")
        files = input_files(inputs)
        roots = roots_of(files, cache_dir, self.spec_dir)
        inputs_entry = self._file_inputs(task, files, roots)
        shipment = Shipment(task, func, kwargs, {str(k): v for k, v in roots.items()}, inputs_entry.key,
                            tuple(p.relative_to(cache_dir).as_posix() for p in written), key,
                            str(self.store.root) if self.shared else WORKER_STORE,
                            None if self.shared else self.remote, __version__, options.get("num_cpus", 1),
                            tuple(p.relative_to(cache_dir).as_posix() for p in placement.scratch))
        # No retries: Ray's default retries a lost task three times (and one killed for memory without end).
        submit = dict(max_retries=0, retry_exceptions=False, name=task, **options)
        if placement.nodes == 1:
            member = _Member(task, _remote_worker().options(**submit).remote(shipment))
            where, result = member.started(), member.finished()
            return _facts(task, where, result)
        return self._run_gang(task, submit, shipment, placement.nodes, node_offers(options))

    def _run_gang(self, task: str, submit: dict, shipment: Shipment, nodes: int, bundle: dict) -> dict:
        """One task on `nodes` nodes, one Ray task on each (a placement group spreads them): the first
        says where the others meet (its IP and a free port: the c10d rendezvous), then they all run."""
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([bundle] * nodes, strategy="STRICT_SPREAD", name=task)
        try:
            if not group.wait(timeout_seconds=120):
                raise BuildError(f"{task} waited 2 minutes for {nodes} nodes of {self.where} with "
                                 f"{', '.join(f'{k} {v:g}' for k, v in bundle.items())} free each; other work holds them")
            run_id = f"modelmake-{uuid.uuid4().hex[:12]}"
            members = []
            for rank in range(nodes):
                gang = {"nodes": nodes, "node_rank": rank, "run_id": run_id,
                        "endpoint": members[0].where["endpoint"] if members else None}
                on_its_node = _remote_worker().options(**submit, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank))
                members.append(_Member(task, on_its_node.remote(dataclasses.replace(shipment, gang=gang)), rank))
                members[-1].started()
            outcomes = _gang_outcomes(members)
        finally:
            remove_placement_group(group)
        failed = [(member, what) for member, what in outcomes if _failure_rank(what) is not None]
        if failed:  # the root cause, not the nodes that failed because it did
            member, what = min(failed, key=lambda f: _failure_rank(f[1]))
            if not isinstance(what, dict):
                raise BuildError(died(task, member.where, what)) from None
            _facts(task, member.where, what)  # raises the member's error, named with its node
        main = [(member, what) for member, what in outcomes if what.get("recorded")]
        if not main:
            raise BuildError(f"{task}: none of its {nodes} nodes wrote the outputs; this is a modelmake bug, please report it")
        member, what = main[0]
        return _facts(task, member.where, what) | {"nodes": [_node(m.where) for m, _ in outcomes]}

    def _file_inputs(self, task: str, files: list[Path], roots: dict[Path, str]) -> Entry:
        """The input files as one entry of the store, named as the worker lays them out."""
        named = {}
        for path in files:
            root = next(r for r in roots if path.is_relative_to(r))
            named[f"{roots[root]}/{path.relative_to(root).as_posix()}"] = path
        key = blake3.blake3(canonical_json({"inputs of": task, "files": {n: file_blake3(p) for n, p in named.items()}})
                            .encode()).hexdigest()
        entry = self.store.record_named(key, f"inputs of {task}", named, {})
        if not self.shared:
            self.remote.upload(entry, self.store)
        return entry


@functools.cache
def _remote_worker():
    """`_on_worker` as a Ray remote function: made once, so Ray exports its definition once per build."""
    import ray

    return ray.remote(_on_worker)


class _Member:
    """One Ray task of a build's task (of several for training across nodes): where it runs, then how it ended."""

    def __init__(self, task: str, outcome, node_rank: int | None = None):
        self.task, self.outcome, self.node_rank, self.where = task, outcome, node_rank, {}
        self.cancelled = False  # by _gang_outcomes, because another node of its run failed

    def started(self) -> dict:
        """Its first word: where it runs (printed)."""
        self.where = self.finished()
        part = "" if self.node_rank is None else f" (node {self.node_rank} of the run)"
        print(f"{self.task}: running on Ray {_node_words(self.where)}{part}", flush=True)
        return self.where

    def finished(self) -> dict:
        """Its next word; a lost worker raised as one paragraph."""
        what = _outcome(self)
        if not isinstance(what, dict):
            raise BuildError(died(self.task, self.where, what)) from None
        return what


def _outcome(member: _Member):
    """The worker's last word (a dict), or the Ray error that took it (a lost worker or node)."""
    import ray

    try:
        return ray.get(next(member.outcome))
    except StopIteration:  # the generator closed without its last word: cancelled (or lost) mid-task
        return CANCELLED if member.cancelled else ray.exceptions.WorkerCrashedError()
    except ray.exceptions.RayError as err:
        if member.cancelled or isinstance(err, ray.exceptions.TaskCancelledError):  # however the interrupt ended it
            return CANCELLED
        if isinstance(err, ray.exceptions.RayTaskError):  # the stage's own bug: its traceback is the report
            raise
        return err


# How long the other nodes of a run may take to see that one failed (their collectives break) before
# they are stopped: an agent whose peer died before the process group formed would wait for it for minutes.
GANG_GRACE_S = 5
CANCELLED = "cancelled: another node of the run failed"


def _gang_outcomes(members: list[_Member]) -> list[tuple[_Member, object]]:
    """Every member's outcome, waited for together. Once one fails, the others get GANG_GRACE_S to fail
    too (their collectives break), then are stopped: Ray ends their workers and the training processes
    those started (an agent whose peer died before the process group formed would wait for minutes)."""
    import ray

    pending = {member.outcome: member for member in members}
    outcomes, stop_at = {}, None
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for outcome in ready:
            member = pending.pop(outcome)
            outcomes[member] = _outcome(member)
            if stop_at is None and _failure_rank(outcomes[member]) is not None:
                stop_at = time.monotonic() + GANG_GRACE_S
        if stop_at is not None and time.monotonic() > stop_at:
            for outcome, member in pending.items():
                if not member.cancelled:
                    member.cancelled = True
                    ray.cancel(outcome, force=True)
    return [(member, outcomes[member]) for member in members]


def _failure_rank(what) -> tuple | None:
    """None for a member that succeeded; else how likely it is the cause: a worker lost, then a process
    killed by a signal, then the earliest error; a member cancelled because of another's failure last."""
    if isinstance(what, dict):
        if "facts" in what:
            return None
        return (1 if "died of" in str(what.get("error")) else 2, what.get("failed_at", 0))
    return (3 if what is CANCELLED else 0, 0)


def _node_words(where: dict, pid: bool = True) -> str:
    return f"node {where['ip']} ({where['node_id'][:8]})" + (f", pid {where['pid']}" if pid else "")


def _node(where: dict) -> dict:
    return {"id": where["node_id"], "ip": where["ip"], "host": where["host"], "pid": where["pid"]}


def _facts(task: str, where: dict, result: dict) -> dict:
    """A worker's outcome as the run record's facts; its failure raised as the stage's own would be."""
    if "oserror" in result:
        number, text, filename = result["oserror"]
        raise OSError(number or errno.EIO, text, filename)
    if "error" in result:
        gang = "" if "gang" not in result else f"{task} failed on {_node_words(where, pid=False)}: "
        raise BuildError(gang + result["error"])
    node = _node(where)
    return {**result["facts"], "executor": "ray", "node": {k: node[k] for k in ("id", "ip", "host")}, "pid": where["pid"]}


def died(task: str, where: dict, err: Exception) -> str:
    """A worker lost mid-task (killed, out of memory, its node gone) as one paragraph."""
    import ray

    node = _node_words(where) if where else "a node of the cluster"
    if isinstance(err, ray.exceptions.OutOfMemoryError):
        cause = "Ray killed it: its node ran out of memory. Ask for more with the stage's resources (memory = \"…\")"
    elif isinstance(err, ray.exceptions.NodeDiedError):
        cause = "its node left the cluster"
    elif isinstance(err, ray.exceptions.WorkerCrashedError):
        cause = "the worker process died (killed by a signal, or it crashed; its node's Ray logs say which)"
    else:
        cause = str(err).strip().splitlines()[0]
    return (f"{task} failed on {node}: {cause}. Nothing it wrote was recorded; run doit again to rerun what is missing.")

