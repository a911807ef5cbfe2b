"""When the file system says no: a full disk in the middle of a stage, and what a killed build left.
The full disk is real: the cache is a small tmpfs, mounted in a private mount namespace
(`unshare -rm`), so nothing outside the test sees it."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, doit, write_spec

from stages.ground import atomic

SPEC = '[[models]]\nname = "tiny"\nbase = "tiny"\nquantize = ["Q8_0"]\n[models.eval]\nprompts = false\n'


def doit_on_a_small_disk(spec, cache, megabytes: float) -> tuple[int, str, list[str], str]:
    """`doit` with `cache` on a tmpfs of `megabytes`; then, on that same tmpfs grown to 1 GB, what the
    failed build left behind and a second `doit`. Returns the first build's exit status and output,
    the leftover temp files, and the second build's output."""
    cache.mkdir()
    doit = f'"{sys.executable}" -m doit run -f "{REPO / "dodo.py"}" spec="{spec}"'
    script = (f'mount -t tmpfs -o size={int(megabytes * 1024)}k tmpfs "{cache}" || exit 99\n'
              f'{doit} > "$0.first" 2>&1; echo $? > "$0.status"\n'
              f'find "{cache}" -name ".*.tmp-*" > "$0.left"\n'
              f'mount -o remount,size=1g "{cache}" && {doit} > "$0.second" 2>&1\n')
    logs = cache.parent / "small-disk"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(logs)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 99, proc.stderr  # the small disk was there
    read = lambda suffix: pathlib.Path(f"{logs}.{suffix}").read_text()  # noqa: E731
    return int(read("status")), read("first"), read("left").split(), read("second")


@pytest.fixture
def spec(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    return write_spec(tmp_path, SPEC)


@pytest.mark.slow
def test_a_disk_that_fills_during_convert_fails_the_stage_naming_the_output(spec, tmp_path):
    """The tiny model's F16 GGUF is 13 MB; on a 4 MB disk modelmake's converter runs out mid-write."""
    status, output, left, again = doit_on_a_small_disk(spec, tmp_path / "cache", 4)
    assert status != 0 and "Traceback" not in output, output[-3000:]
    gguf = tmp_path / "cache/tiny/gguf/tiny.F16.gguf"
    assert f"convert:tiny failed: No space left on device on {gguf}. Its unfinished files were removed" in output
    assert "free space on that disk, or give the cache a folder on a larger one" in output
    assert left == []
    assert ".  convert:tiny" in again and "manifest:tiny" in again and "failed" not in again, again[-3000:]


@pytest.mark.slow
def test_a_disk_that_fills_during_llama_quantize_fails_the_stage_and_leaves_no_temp(spec, tmp_path):
    """llama.cpp's quantizer runs out of space writing the Q8_0 GGUF and says only "iostream error":
    the stage fails with its words and says the disk is full; its half-written file is gone."""
    status, output, left, again = doit_on_a_small_disk(spec, tmp_path / "cache", 18)
    assert status != 0 and "Traceback" not in output, output[-3000:]
    assert f"llama.cpp could not quantize {tmp_path / 'cache/tiny/gguf/tiny.F16.gguf'} to Q8_0" in output, output[-3000:]
    assert f"the disk holding {tmp_path / 'cache/tiny/gguf'} is full: free space on it" in output
    assert left == []
    assert "-- convert:tiny" in again and ".  quantize:tiny-Q8_0" in again and "failed" not in again, again[-3000:]


@pytest.mark.slow
def test_the_next_build_sweeps_what_a_killed_one_left(spec, tmp_path):
    """A build killed mid-write (SIGKILL, power loss) leaves `.NAME.tmp-PID` files and folders that
    look unfinished; the next build removes those of processes that are gone and keeps a live one's."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    folder = tmp_path / "cache/tiny/gguf"
    folder.mkdir(parents=True)
    dead_file = folder / f".tiny-F16.gguf.tmp-{gone.pid}"
    dead_file.write_bytes(b"half a GGUF")
    dead_dir = tmp_path / "cache/tiny" / f".adapter.tmp-{gone.pid}"
    (dead_dir / "deep").mkdir(parents=True)
    (dead_dir / "deep/adapter_model.safetensors").write_bytes(b"half")
    live_file = folder / f".other.gguf.tmp-{os.getpid()}"  # this test's own process: still running
    live_file.write_bytes(b"being written")

    result = doit(spec)
    assert f"modelmake: removed 2 unfinished file(s) a killed build left in {tmp_path / 'cache'}" in result.output
    assert not dead_file.exists() and not dead_dir.exists() and live_file.exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name] == [live_file]


def test_the_sweep_knows_the_names_atomic_writes_give():
    for name in (atomic._temp_sibling(REPO / "x.gguf").name, f".adapter.old-{os.getpid()}"):
        assert atomic._IN_PROGRESS.match(name), name
    assert not atomic._IN_PROGRESS.match("model.tmp-12.gguf") and not atomic._IN_PROGRESS.match(".doit.db")
