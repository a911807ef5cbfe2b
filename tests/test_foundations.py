"""The pieces every stage leans on: the blake3 checker, digests taken once, atomic writes, the
run records' memory figures, and hub import."""

import os
import shutil

import pytest
from helpers import doit, write_spec

from stages.ground.atomic import atomic_dir, atomic_file
from stages.ground.hashing import Blake3Checker, HashingWriter, file_blake3, file_digests, outputs_intact, record_outputs


def test_blake3_is_the_reference_digest(tmp_path):
    import blake3

    path = tmp_path / "f"
    path.write_bytes(os.urandom(3_000_000))
    assert file_blake3(path) == blake3.blake3(path.read_bytes()).hexdigest()


def test_one_pass_gives_both_reference_digests(tmp_path):
    import hashlib

    import blake3

    path = tmp_path / "f"
    data = os.urandom(40_000_000)  # over two 16 MiB chunks, and not a whole number of them
    path.write_bytes(data)
    assert file_digests(path) == (blake3.blake3(data).hexdigest(), hashlib.sha256(data).hexdigest())
    with open(tmp_path / "g", "wb") as f:
        writer = HashingWriter(f)
        for start in range(0, len(data), 5_000_000):
            writer.write(data[start:start + 5_000_000])
    assert (writer.blake3.hexdigest(), writer.sha256.hexdigest()) == file_digests(path)


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_an_output_is_read_once_in_a_build(tmp_path):
    """A stage's outputs are hashed when the task records them; the manifest (size, blake3 and
    sha256 of every artifact) and the package's OCI digests then reuse those digests."""
    from stages import manifest

    folder = tmp_path / "m"
    (folder / "gguf").mkdir(parents=True)
    artifact = folder / "gguf" / "m.F16.gguf"
    artifact.write_bytes(os.urandom(64 << 20))
    before = _bytes_read()
    record_outputs([str(artifact)])
    assert _bytes_read() - before >= 64 << 20
    before = _bytes_read()
    (listed,) = manifest.collect(folder, [manifest.Producer(task="convert:m", outputs=["gguf/m.F16.gguf"], inputs={},
                                                            params={}, versions={})])
    assert _bytes_read() - before < 1 << 20, "the manifest read the artifact again"
    assert (listed.blake3, listed.sha256) == file_digests(artifact)


def test_run_records_tell_allocated_memory_from_mapped_file_pages(tmp_path):
    """A task that maps a big file (convert, quantize and eval read models through mmap) must not be
    reported as using that much memory; one that allocates it must."""
    import json
    import mmap
    import time

    import numpy as np

    from stages.ground import runlog

    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(256 << 20))
    with runlog.measured(tmp_path, "convert:mapped"), open(big, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert np.frombuffer(mapped, dtype=np.uint8)[::4096].sum() >= 0  # touch every page
        time.sleep(0.1)  # the peaks are sampled every 20 ms
        del mapped
    with runlog.measured(tmp_path, "convert:allocated"):
        held = np.ones(256 << 20, dtype=np.uint8)
        assert held.sum() == 256 << 20
        time.sleep(0.1)
        del held
    mapped_run, allocated_run = (json.loads(runlog.record_path(tmp_path, t).read_text())
                                 for t in ("convert:mapped", "convert:allocated"))
    assert mapped_run["peak_file_mb"] >= 250 and mapped_run["peak_rss_mb"] >= 250
    assert mapped_run["peak_anon_mb"] < allocated_run["peak_anon_mb"] - 200
    assert allocated_run["peak_anon_mb"] >= 256 and allocated_run["peak_file_mb"] < mapped_run["peak_file_mb"] - 200


def test_checker_trusts_stat_then_content(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    checker = Blake3Checker()
    state = checker.get_state(str(path), None)
    assert checker.get_state(str(path), state) is None, "unchanged stat: state kept, file not re-read"
    assert not checker.check_modified(str(path), os.stat(path), state)

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5))
    assert not checker.check_modified(str(path), os.stat(path), state), "touched, same bytes"

    path.write_bytes(b"b" * 1000)
    assert checker.check_modified(str(path), os.stat(path), state), "same size, other bytes"
    path.write_bytes(b"a" * 999)
    assert checker.check_modified(str(path), os.stat(path), state), "other size"
    assert checker.check_modified(str(path), os.stat(path), ["md5", 1, 2]), "state of another checker"


def test_outputs_intact_notices_damage_and_loss(tmp_path):
    path = tmp_path / "out.gguf"
    path.write_bytes(b"x" * 100)
    values = {"outputs": record_outputs([str(path)])}
    assert outputs_intact(None, values)
    path.write_bytes(b"y" * 100)
    assert not outputs_intact(None, values)
    path.unlink()
    assert not outputs_intact(None, values)
    assert not outputs_intact(None, {}), "never built"


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "base"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("new")
            raise KeyboardInterrupt
    assert (target / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["base"]


def _populate_hub_cache(hub: os.PathLike, repo_id: str, model_dir, commit: str) -> None:
    """Lay a model out as huggingface_hub's cache does after a download (refs + snapshot)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)


@pytest.mark.slow
def test_hub_base_imports_from_the_hub_cache(tmp_path, tiny_llama):
    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _populate_hub_cache(hub, "acme/tiny-llama", tiny_llama, commit)
    spec = write_spec(tmp_path / "w", '[[models]]\nname = "tiny"\nbase = "hf:acme/tiny-llama@main"\n'
                                      '[[models]]\nname = "absent"\nbase = "hf:acme/absent@main"\n')
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    assert doit(spec, "convert:tiny", env=env).ran == ["import:tiny", "convert:tiny"]
    base = tmp_path / "w/cache/tiny/base"
    assert (base / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()
    assert "config.json" in (base / "files.b3").read_text()
    assert (tmp_path / "w/cache/tiny/gguf/tiny.F16.gguf").is_file()

    result = doit(spec, "import:absent", env=env, check=False)
    assert result.returncode != 0
    assert "hf:acme/absent@main is not in the local Hugging Face cache" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "w/cache/absent/base").exists()


def test_a_process_forked_after_hashing_on_every_core_still_hashes(tmp_path):
    """doit -n N checks tasks (hashing their files on rayon's threads) before it forks its workers; the
    pool's threads do not survive a fork, so a worker hashing on them would wait forever."""
    import signal
    import time

    import blake3

    from stages.ground import hashing

    data = bytes(range(256)) * (64 << 12)  # 64 MiB: large enough for blake3 to use its threads
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "b.bin").write_bytes(data[::-1])
    assert hashing.file_blake3(tmp_path / "a.bin") == blake3.blake3(data).hexdigest()
    child = os.fork()
    if child == 0:  # the worker: exits 0 if its hash is right
        os._exit(0 if hashing.file_blake3(tmp_path / "b.bin") == blake3.blake3(data[::-1]).hexdigest() else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        pytest.fail("the forked process hung hashing a file")
    assert os.waitstatus_to_exitcode(status) == 0
