"""One build at a time per cache: a second `doit` waits for the first (or fails at once with
wait=no), each task runs once, and what only reads needs no lock."""

import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import REPO, doit, write_spec

from stages.ground import buildlock

SPEC = '[[models]]\nname = "tiny"\nbase = "tiny"\nquantize = ["Q8_0"]\n'
TASKS = ["convert:tiny", "quantize:tiny-Q8_0", "eval:tiny-F16", "eval:tiny-Q8_0", "parity:tiny-Q8_0",
         "package:tiny-Q8_0", "manifest:tiny", "report"]


@pytest.fixture
def spec(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    return write_spec(tmp_path, SPEC)


def start_doit(spec, log, *args):
    return subprocess.Popen([sys.executable, "-m", "doit", "run", "-f", str(REPO / "dodo.py"), *args, f"spec={spec}"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


def ran(output: str) -> list[str]:
    return [line[3:].strip() for line in output.splitlines() if line.startswith(".  ")]


@pytest.mark.slow
def test_two_builds_started_together_run_each_task_once(spec, tmp_path):
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    handles = [open(log, "w") for log in logs]
    builds = [start_doit(spec, handle) for handle in handles]
    assert [build.wait(timeout=300) for build in builds] == [0, 0]
    for handle in handles:
        handle.close()
    outputs = [log.read_text() for log in logs]
    waited = [out for out in outputs if "another build is using" in out]
    assert len(waited) == 1, outputs
    assert "waiting for it to finish" in waited[0] and "the other build finished after" in waited[0]
    assert sorted(ran(outputs[0]) + ran(outputs[1])) == sorted(TASKS), "every task ran exactly once"
    assert ran(waited[0]) == [], "the build that waited found everything up to date"
    assert "1 artifacts match" not in doit(spec, "verify").output  # verify passes (raises otherwise)


@pytest.mark.slow
def test_wait_no_fails_at_once_and_reading_needs_no_lock(spec, tmp_path):
    doit(spec)
    cache = tmp_path / "cache"
    held = buildlock.acquire(cache, wait=False)  # this test process is "the other build"
    try:
        started = time.perf_counter()
        refused = doit(spec, "wait=no", check=False)
        assert refused.returncode != 0 and time.perf_counter() - started < 30
        assert f"another build is using {cache} (pid {os.getpid()} on " in refused.output
        assert "wait=no" in refused.output and "Traceback" not in refused.output
        assert refused.ran == []

        assert doit(spec, command="list").returncode == 0
        assert doit(spec, "convert:tiny", command="info").returncode == 0
        assert "artifacts match manifest.json and SHA256SUMS" in doit(spec, "verify").output

        log = tmp_path / "waiting.log"
        with open(log, "w") as handle:
            waiting = start_doit(spec, handle, "quantize:tiny-Q8_0")
            deadline = time.monotonic() + 60
            while "waiting for it to finish" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "waiting for it to finish" in log.read_text() and waiting.poll() is None
            buildlock.release(held)
            held = None
            assert waiting.wait(timeout=120) == 0
        assert "the other build finished after" in log.read_text()
    finally:
        if held:
            buildlock.release(held)

    bad = doit(spec, "wait=maybe", check=False)
    assert bad.returncode != 0 and "wait=maybe: say wait=no" in bad.output


@pytest.mark.slow
def test_a_killed_build_leaves_the_cache_unlocked(spec, tmp_path):
    """The lock is the kernel's (flock): it goes with its process, however that process dies."""
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:
        victim = start_doit(spec, handle)
        deadline = time.monotonic() + 60
        while not (tmp_path / "cache" / buildlock.LOCK_FILE).is_file() or \
                str(victim.pid) not in (tmp_path / "cache" / buildlock.LOCK_FILE).read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        victim.kill()
        victim.wait()
    result = doit(spec, "wait=no")
    assert "another build" not in result.output and "manifest:tiny" in result.ran


def test_training_slots_let_only_so_many_run_at_once(tmp_path):
    """[build] max_parallel_train: under `doit -n N` a training waits for a free slot (a file lock each,
    so it holds across doit's worker processes), and says once that it waits."""
    import threading
    import time

    from stages.ground.buildlock import slot

    events, said = [], []

    def train(name: str, count: int):
        with slot(tmp_path, count, "train", say=said.append):
            events.append((name, "start", time.monotonic()))
            time.sleep(0.6)
            events.append((name, "end", time.monotonic()))

    for count, overlapping in ((1, False), (2, True)):
        events.clear()
        said.clear()
        runs = [threading.Thread(target=train, args=(name, count)) for name in ("a", "b")]
        for run in runs:
            run.start()
            time.sleep(0.1)
        for run in runs:
            run.join()
        first_end = min(t for _, what, t in events if what == "end")
        last_start = max(t for _, what, t in events if what == "start")
        assert (last_start < first_end) is overlapping, (count, events)
        assert said == ([] if overlapping else
                        ["modelmake: 1 train task already running; waiting for one to finish ([build] max_parallel_train = 1)"])
