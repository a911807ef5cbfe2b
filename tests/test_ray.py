"""[build] executor = "ray": the graph's tasks on a real Ray cluster of two nodes on this machine
(`ray start`, one CPU each, a logical GPU on the second), files moving through the action cache."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import (FINETUNE_SPEC, REPO, SMOLLM_GGUF, RayCluster, _free_port, doit, finetune_workspace,
                     scratch_folder, write_spec)

from stages.ground import runlog
from stages.ground.store import Store

# One thread here and there (a fact of training: the lock compares what was trained with the same).
# Training asks for the GPU node, and checkpoints every other step of 12 (where a killed run resumes).
SPEC = "threads = 1\n" + FINETUNE_SPEC.replace("max_steps = 2", "max_steps = 12\ncheckpoint_every = 2") + \
    "\n[models.train.resources]\nGPU = 1\n"
ON_THE_CLUSTER = ("import", "train", "adapter", "merge", "convert", "quantize", "eval", "parity", "package")


def ray_spec(address: str, extra: str = "") -> str:
    return SPEC + f'\n[build]\nexecutor = "ray"\naddress = "{address}"\n{extra}'


@pytest.fixture(scope="module")
def cluster(request):
    with RayCluster(scratch_folder(request, "ray-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def builds(request, cluster, tiny_llama):
    """The spec built here (and locked), then on the cluster with `-n 2` in a clone of it: first with the
    training worker killed once its first checkpoint is in the store, then again."""
    folder = scratch_folder(request, "ray-builds")
    local = finetune_workspace(folder / "local", tiny_llama, SPEC)
    doit(local, "lock")
    shutil.copytree(folder / "local", folder / "ray", ignore=shutil.ignore_patterns("cache"))
    spec = write_spec(folder / "ray", ray_spec(cluster.address))
    doit_run = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-n", "2", f"spec={spec}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines, killed = [], None
    for line in doit_run.stdout:
        lines.append(line)
        found = re.match(r"train:m: running on Ray node (\S+) \((\w+)\), pid (\d+)", line)
        if found and killed is None:
            killed = {"ip": found.group(1), "node": found.group(2), "pid": int(found.group(3))}
            kept = folder / "ray/cache/.store/scratch/train-m/m/adapter.work/checkpoints"
            for _ in range(1200):
                if list(kept.glob("*/step-*")):
                    break
                time.sleep(0.02)
            killed["checkpoints"] = sorted(p.name for p in kept.glob("*/step-*"))
            os.kill(killed["pid"], signal.SIGKILL)
    killed_run = {"returncode": doit_run.wait(), "output": "".join(lines), "killed": killed,
                  "store_after_kill": {e.task for _, e in Store(folder / "ray/cache/.store").entries()},
                  "adapter_after_kill": (folder / "ray/cache/m/adapter").exists()}
    rerun = doit(spec, "-n", "2", "check")
    return {"folder": folder, "killed": killed_run, "rerun": rerun, "nodes": cluster.nodes()}


@pytest.mark.slow
def test_a_killed_worker_is_one_clear_error_naming_the_task_and_its_node(builds):
    killed = builds["killed"]
    assert killed["killed"], killed["output"][-3000:]
    assert killed["returncode"] != 0
    who = killed["killed"]
    assert (f"train:m failed on node {who['ip']} ({who['node']}), pid {who['pid']}: the worker process died"
            in killed["output"]), killed["output"][-3000:]
    assert "Traceback" not in killed["output"]
    # Nothing of the killed run reached the store's entries or the cache.
    assert "train:m" not in killed["store_after_kill"]
    assert not killed["adapter_after_kill"]


@pytest.mark.slow
def test_the_next_doit_finishes_with_the_bytes_of_a_local_build(builds):
    folder = builds["folder"]
    assert "models.lock: all" in builds["rerun"].output and "reproduced byte for byte" in builds["rerun"].output
    assert "not compared" not in builds["rerun"].output  # the same threads: every artifact was compared
    assert (folder / "ray/cache/m/SHA256SUMS").read_bytes() == (folder / "local/cache/m/SHA256SUMS").read_bytes()
    assert "train:m" in builds["rerun"].ran  # only what the killed build had not finished
    assert "train:m.preview" not in builds["rerun"].ran
    # The checkpoints were kept in the store, not the killed worker's folder: the run continued from one.
    assert builds["killed"]["killed"]["checkpoints"], "the kill came before the first checkpoint"
    assert "continuing from the checkpoint at step" in builds["rerun"].output
    # The killed worker's work folder was swept; no temporary file is left anywhere in the cache.
    assert not [p for p in (folder / "ray/cache").rglob("*") if ".tmp-" in p.name]
    assert not list((folder / "ray/cache/.store/tmp").glob("ray.*"))


@pytest.mark.slow
def test_run_records_name_the_ray_node_and_worker_of_each_task_and_train_ran_on_the_gpu_node(builds):
    records = runlog.read_records(builds["folder"] / "ray/cache")
    nodes = {node["NodeID"]: node for node in builds["nodes"]}
    ran_there = {task: r for task, r in records.items() if task.split(":")[0] in ON_THE_CLUSTER}
    assert len(ran_there) >= 15
    for task, record in ran_there.items():
        assert record["executor"] == "ray", task
        assert record["node"]["id"] in nodes, task
        assert record["pid"] != os.getpid() and record["worker_wall_s"] <= record["wall_s"]
    assert records["manifest:m"].get("executor") is None  # it reads every artifact: it runs where doit runs
    assert nodes[records["train:m"]["node"]["id"]]["Resources"].get("GPU") == 1


@pytest.mark.slow
def test_workers_that_share_no_folder_with_doit_get_and_give_files_through_the_cache_remote(builds, cluster, registry):
    """Addressed by the node's own IP (not loopback) and without a [cache] store every node mounts, the
    workers are taken to be other machines: inputs go up to the registry, outputs come back from it."""
    folder = builds["folder"] / "remote"
    shutil.copytree(builds["folder"] / "local", folder, ignore=shutil.ignore_patterns("cache"))
    node_ip = builds["nodes"][0]["NodeManagerAddress"]
    assert node_ip != "127.0.0.1"
    spec = write_spec(folder, ray_spec(f"{node_ip}:{cluster.port}",
                                       f'\n[cache]\nremote = "{registry.host}/ray-cache"\npush = true\n'))
    result = doit(spec, "adapter")
    assert result.ran == ["train:m.preview", "train:m", "adapter:m"]
    lora = "cache/m/gguf/m.lora.F16.gguf"
    assert (folder / lora).read_bytes() == (builds["folder"] / "local" / lora).read_bytes()
    worker_store = Store(cluster.folder / "worker-store")
    assert {e.task for _, e in worker_store.entries()} >= {"train:m", "adapter:m", "inputs of train:m"}
    # Without the remote the same cluster is refused before anything is submitted, naming what to share.
    spec.write_text(ray_spec(f"{node_ip}:{cluster.port}"))
    shutil.rmtree(folder / "cache")
    refused = doit(spec, "adapter", check=False)
    assert refused.returncode != 0
    assert (f"the Ray cluster at {node_ip}:{cluster.port} runs tasks on other machines, which cannot read this "
            "machine's action cache") in refused.output
    assert "set [cache] store to a folder every node mounts" in refused.output and "Traceback" not in refused.output


@pytest.mark.slow
def test_two_quantize_tasks_run_at_once_on_different_nodes(cluster, tmp_path):
    """SmolLM2-135M's quantizations take seconds each: long enough to see two at once."""
    shutil.copy(SMOLLM_GGUF, tmp_path / "smollm2.gguf")
    spec = write_spec(tmp_path, '[[models]]\nname = "s"\nbase = "smollm2.gguf"\nquantize = ["Q8_0", "Q4_0"]\n\n'
                                f'[build]\nexecutor = "ray"\naddress = "{cluster.address}"\n')
    doit(spec, "-n", "2", "quantize")
    records = runlog.read_records(tmp_path / "cache")
    first, second = records["quantize:s-Q8_0"], records["quantize:s-Q4_0"]
    assert first["started_at"] < second["started_at"] + second["wall_s"]
    assert second["started_at"] < first["started_at"] + first["wall_s"]
    assert first["node"]["id"] != second["node"]["id"]  # one CPU each: two at once must be on two nodes


@pytest.mark.slow
def test_a_request_no_node_can_meet_is_refused_naming_what_the_nodes_have(cluster, tmp_path, tiny_llama):
    spec = finetune_workspace(tmp_path, tiny_llama, ray_spec(cluster.address, "[build.resources]\nconvert = { CPU = 8 }\n"))
    result = doit(spec, "convert", check=False)
    assert result.returncode != 0
    assert "convert:m asks for CPU 8, which no node of the Ray cluster at" in result.output
    assert "GPU 1" in result.output  # what the nodes offer
    assert "Traceback" not in result.output


def test_an_unreachable_cluster_fails_at_once_naming_its_address(tmp_path, tiny_llama):
    address = f"127.0.0.1:{_free_port()}"
    spec = finetune_workspace(tmp_path, tiny_llama, ray_spec(address))
    started = time.monotonic()
    result = doit(spec, "-n", "2", check=False)
    assert result.returncode != 0
    assert f"the Ray cluster at {address} cannot be reached" in result.output
    assert "Traceback" not in result.output
    assert time.monotonic() - started < 60  # not Ray's own minutes of retries
    assert not list((tmp_path / "cache").glob("*/adapter"))


# ---- the pure parts, without a cluster ----

def test_resources_in_rays_names_become_rays_options():
    from stages.ground.ray_executor import node_offers, nodes_that_fit, ray_options

    options = ray_options({"CPU": 2, "GPU": 1, "memory": "40GB", "accelerator_type": "H100", "trainer": 1})
    assert options == {"num_cpus": 2, "num_gpus": 1, "memory": 40 * 10**9, "accelerator_type": "H100",
                       "resources": {"trainer": 1}}
    assert node_offers(options) == {"CPU": 2, "GPU": 1, "memory": 40 * 10**9, "trainer": 1,
                                    "accelerator_type:H100": 0.001}
    big = {"Alive": True, "Resources": {"CPU": 8, "GPU": 2, "memory": 80e9, "trainer": 1, "accelerator_type:H100": 1}}
    small = {"Alive": True, "Resources": {"CPU": 8, "GPU": 2, "memory": 80e9, "trainer": 1}}  # another accelerator
    dead = {**big, "Alive": False}
    assert nodes_that_fit(options, [small, dead, big]) == [big]
    assert nodes_that_fit(ray_options({}), [small]) == [small]  # one CPU, Ray's default


@pytest.mark.parametrize("request_, expected", [
    ({"GPU": -1}, "GPU = -1: a resource is a number of units, 0 or more"),
    ({"memory": "lots"}, "'lots' is not a size"),
    ({"accelerator_type": 3}, "accelerator_type = 3: give the accelerator's name"),
    ({"CPU": True}, "CPU = True: a resource is a number"),
])
def test_a_resource_ray_cannot_take_is_refused(request_, expected):
    from stages.ground.ray_executor import ray_options

    with pytest.raises(ValueError, match=re.escape(expected)):
        ray_options(request_)


def test_a_stages_arguments_are_moved_into_the_workers_folder(tmp_path):
    from dataclasses import dataclass
    from pathlib import Path

    from stages.ground.ray_executor import moved
    from stages.ground.spec import AdapterSpec

    @dataclass(frozen=True)
    class Release:
        gguf: Path
        lora: Path | None

    cache, work = tmp_path / "cache", Path("/w")
    roots = {str(cache): work / "cache", str(tmp_path / "spec"): work / "spec"}
    args = {"out": cache / "m/gguf/x.gguf", "names": {str(tmp_path / "spec/data.jsonl"): "data.jsonl"},
            "release": Release(cache / "m/a.gguf", None), "tools": Path("/usr/bin/llama-quantize"),
            "files": [cache / "m/b", (cache / "m/c", 3)], "cached": str(cache), "other": str(cache) + "-x",
            "adapter": AdapterSpec(path=None, outtype="f32")}
    assert moved(args, roots) == {
        "out": work / "cache/m/gguf/x.gguf", "names": {"/w/spec/data.jsonl": "data.jsonl"},
        "release": Release(work / "cache/m/a.gguf", None), "tools": Path("/usr/bin/llama-quantize"),
        "files": [work / "cache/m/b", (work / "cache/m/c", 3)], "cached": "/w/cache", "other": str(cache) + "-x",
        "adapter": AdapterSpec(path=None, outtype="f32")}


def test_a_folders_index_ships_every_file_it_names(tmp_path):
    from stages.ground.hashing import write_index
    from stages.ground.ray_executor import input_files, roots_of

    base = tmp_path / "cache/m/base"
    (base / "sub").mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"w")
    (base / "sub/tokenizer.json").write_text("{}")
    write_index(base)
    data = tmp_path / "elsewhere/data.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    files = input_files([base / "files.b3", data])
    assert sorted(files) == sorted([base / "files.b3", base / "model.safetensors", base / "sub/tokenizer.json", data])
    assert roots_of(files, tmp_path / "cache", tmp_path / "spec") == {
        tmp_path / "cache": "cache", tmp_path / "spec": "spec", tmp_path / "elsewhere": "in2"}


def _rank_of(worker_pid: int) -> int | None:
    """The training process (`python -m stages.train`) an elastic agent in Ray worker `worker_pid` started."""
    from pathlib import Path

    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = int(re.search(r"PPid:\s+(\d+)", status.read_text()).group(1))
            command = (status.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, AttributeError):
            continue
        if parent == worker_pid and b"stages.train" in command:
            return int(status.parent.name)
    return None


@pytest.mark.slow
def test_one_training_run_over_two_nodes_trains_what_two_processes_train_here(cluster, tmp_path, tiny_llama):
    """nodes = 2, processes = 1: an elastic agent on each node, gloo between them; a rank killed on the
    second node is named with its node, and the next doit trains the same adapter as processes = 2 here."""
    train = FINETUNE_SPEC.replace("batch_size = 4", "batch_size = 4\nmax_seq_len = 64")
    local = finetune_workspace(tmp_path / "local", tiny_llama, "threads = 1\n" + train.replace("max_steps = 2", "max_steps = 2\nprocesses = 2"))
    doit(local, "train")
    shutil.copytree(tmp_path / "local", tmp_path / "spread", ignore=shutil.ignore_patterns("cache"))
    spec = write_spec(tmp_path / "spread", "threads = 1\n" + train.replace("max_steps = 2", "max_steps = 2\nnodes = 2") +
                      f'\n[build]\nexecutor = "ray"\naddress = "{cluster.address}"\n')
    doit_run = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "train", f"spec={spec}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines, second = [], None
    for line in doit_run.stdout:
        lines.append(line)
        found = re.match(r"train:m: running on Ray node (\S+) \((\w+)\), pid (\d+) \(node 1 of the run\)", line)
        if found:
            second = {"ip": found.group(1), "node": found.group(2), "pid": int(found.group(3))}
            for _ in range(600):
                rank = _rank_of(second["pid"])
                if rank:
                    os.kill(rank, signal.SIGKILL)
                    break
                time.sleep(0.05)
    output = "".join(lines)
    assert doit_run.wait() != 0
    assert second, output[-3000:]
    assert f"train:m failed on node {second['ip']} ({second['node']}): training failed in rank" in output, output[-3000:]
    assert "the process died of SIGKILL" in output and "Traceback" not in output
    assert not (tmp_path / "spread/cache/m/adapter").exists()

    again = doit(spec, "train")
    assert "train:m" in again.ran
    weights = "cache/m/adapter/adapter_model.safetensors"
    assert (tmp_path / "spread" / weights).read_bytes() == (tmp_path / "local" / weights).read_bytes()
    record = runlog.read_records(tmp_path / "spread/cache")["train:m"]
    assert len({node["id"] for node in record["nodes"]}) == 2
    assert record["platform"]["processes"] == "2"
