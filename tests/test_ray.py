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

# Training asks for the GPU node.
# One thread here and there (a fact of training: the lock compares what was trained with the same).
SPEC = "threads = 1\n" + FINETUNE_SPEC + "\n[models.train.resources]\nGPU = 1\n"
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
    training worker killed as it starts, then again."""
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
