"""The pieces every stage leans on: the blake3 checker, atomic writes, and hub import."""

import os
import shutil

import pytest
from helpers import doit, write_spec

from stages.build.atomic import atomic_dir, atomic_file
from stages.build.hashing import Blake3Checker, file_blake3, outputs_intact, record_outputs


def test_blake3_is_the_reference_digest(tmp_path):
    import blake3

    path = tmp_path / "f"
    path.write_bytes(os.urandom(3_000_000))
    assert file_blake3(path) == blake3.blake3(path.read_bytes()).hexdigest()


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
