"""The action cache: outputs kept by action key in a local store and an OCI registry (a real
docker-registry on 127.0.0.1), restored instead of rebuilt, verified before use."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FINETUNE_SPEC, REPO, Registry, doit, finetune_workspace, fresh_clone, scratch_folder

import blake3

from stages.ground import cache, units
from stages.ground.hashing import stat_key
from stages.ground.store import Entry, Store

ACTIONS = ("train:m", "adapter:m", "merge:m", "convert:m-merged", "quantize:m-merged-Q8_0")


def records(spec: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["task"]: json.loads(p.read_text())
            for p in (spec.parent / "cache/.runs").glob("*.json")}


def restored(spec: Path, output: str) -> set[str]:
    """Tasks the last build restored: by their run records, and said in the build's output."""
    found = {task for task, record in records(spec).items() if record.get("restored")}
    assert output.count("restored from ") >= len(found)
    return found


def sums(spec: Path) -> str:
    return (spec.parent / "cache/m/SHA256SUMS").read_text()


def store_is_whole(store: Path) -> int:
    """Every entry names blobs that exist and hold the bytes it says: no half entry. Returns the count."""
    entries = list((store / "entries").glob("*/*.json"))
    for path in entries:
        entry = Entry.model_validate_json(path.read_text())
        for name, stored in entry.files.items():
            blob = Store(store).blob(stored.blake3)
            assert blob.is_file(), f"{path.name}: {name} has no blob"
            assert blake3.blake3(blob.read_bytes()).hexdigest() == stored.blake3, f"{name}: blob altered"
    return len(entries)


def flip_last_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


# ---- the action key (pure) ----

def test_the_action_key_digests_every_fact_and_nothing_else():
    facts = dict(task="quantize:m-Q8_0", inputs={"gguf/m.F16.gguf": "ab" * 32}, params={"type": "Q8_0"},
                 versions={"modelmake": "0.1.0", "stage.quantize": "1"}, platform={"os": "Linux", "arch": "x86_64"},
                 outputs=["m/gguf/m.Q8_0.gguf"])
    key = cache.action_key(**facts)
    assert len(key) == 64 and key == cache.action_key(**facts)
    assert key == cache.action_key(**facts | {"params": {"type": "Q8_0"}, "outputs": list(facts["outputs"])})
    for field, other in [("task", "quantize:m-Q6_K"), ("inputs", {"gguf/m.F16.gguf": "cd" * 32}),
                         ("params", {"type": "Q6_K"}), ("versions", {"modelmake": "0.1.0", "stage.quantize": "2"}),
                         ("platform", {"os": "Darwin", "arch": "arm64"}), ("outputs", ["m/gguf/other.gguf"])]:
        assert cache.action_key(**facts | {field: other}) != key, field


@pytest.mark.parametrize("text, size", [("20GB", 20 * 10**9), ("500 MB", 500 * 10**6), ("1.5GiB", 3 * 2**29),
                                        ("0", 0), ("123", 123)])
def test_sizes_parse(text, size):
    assert units.parse_size(text) == size


def test_a_bad_size_is_a_clear_error():
    with pytest.raises(ValueError, match="is not a size"):
        units.parse_size("20 parsecs")


# ---- the local store ----

def test_a_blob_found_good_again_is_trusted_by_its_new_stat(tmp_path):
    """A blob replaced by equal bytes (another record linked a new inode) is hashed once, then trusted."""
    (tmp_path / "cache/m").mkdir(parents=True)
    output = tmp_path / "cache/m/out.bin"
    output.write_bytes(b"weights" * 1000)
    store = Store(tmp_path / "store")
    entry = store.record("k" * 64, "convert:m", tmp_path / "cache", [output], {})
    blob = store.blob(entry.files["m/out.bin"].blake3)
    copy = tmp_path / "copy"
    copy.write_bytes(blob.read_bytes())
    os.replace(copy, blob)
    assert store.intact(store.lookup(entry.key)) is None
    assert store.lookup(entry.key).files["m/out.bin"].seen == stat_key(blob.stat())
    flip_last_byte(blob)
    assert "no longer hash" in store.intact(store.lookup(entry.key)) and not blob.exists()


@pytest.fixture(scope="module")
def switched(request, tiny_llama):
    """r = 8, then r = 16, then r = 8 again, in one workspace with its local store."""
    folder = scratch_folder(request, "switch")
    spec = finetune_workspace(folder, tiny_llama)
    first = doit(spec, "lock")
    first_sums = sums(spec)
    spec.write_text(FINETUNE_SPEC.replace("r = 8", "r = 16"))
    second = doit(spec)
    spec.write_text(FINETUNE_SPEC)
    third = doit(spec)
    return {"spec": spec, "first": first, "second": second, "third": third, "first_sums": first_sums,
            "third_restored": restored(spec, third.output), "third_records": records(spec)}


@pytest.mark.slow
def test_switching_back_restores_instead_of_building(switched):
    assert set(ACTIONS) <= set(switched["first"].ran) and set(ACTIONS) <= set(switched["second"].ran)
    assert set(ACTIONS) <= switched["third_restored"], switched["third"].output[-3000:]
    assert "restored from the local store" in switched["third"].output
    assert sums(switched["spec"]) == switched["first_sums"], "byte-identical to the first build"
    train = switched["third_records"]["train:m"]
    assert train["restored"] == "the local store" and train["platform"]["device"] == "cpu"
    assert "train m: device" not in switched["third"].output, "the train stage itself did not run"


@pytest.mark.slow
def test_a_restored_build_satisfies_the_lock(switched):
    result = doit(switched["spec"], "check")
    assert "reproduced byte for byte" in result.output


@pytest.mark.slow
def test_doit_info_prints_the_action_key(switched):
    result = doit(switched["spec"], "train:m", command="info")
    key = switched["third_records"]["train:m"]["action_key"]
    assert "action key" in result.output and key in result.output


@pytest.mark.slow
def test_the_report_says_what_was_restored_and_how_large_the_store_is(switched):
    doit(switched["spec"], "report")
    text = (switched["spec"].parent / "cache/report/REPORT.md").read_text()
    assert "| `train:m` | restored from the local store |" in text
    assert "The action cache holds " in text and "entries" in text


@pytest.mark.slow
def test_a_damaged_store_entry_is_discarded_and_the_task_built(switched):
    spec = switched["spec"]
    store = Store(spec.parent / "cache/.store")
    spec.write_text(FINETUNE_SPEC.replace("r = 8", "r = 16"))
    doit(spec)  # the r = 8 adapter's blob is now in the store alone, no output links it
    key = switched["third_records"]["train:m"]["action_key"]
    entry = store.lookup(key)
    weights = store.blob(entry.files["m/adapter/adapter_model.safetensors"].blake3)
    assert weights.stat().st_nlink == 1
    flip_last_byte(weights)
    spec.write_text(FINETUNE_SPEC)
    result = doit(spec)
    assert "cache entry train:m" in result.output and "damaged" in result.output
    assert "train:m" not in restored(spec, result.output), "built, not restored"
    assert "train m: device" in result.output
    assert sums(spec) == switched["first_sums"], "rebuilt to the locked bytes"
    assert store_is_whole(store.root) > 0


@pytest.mark.slow
def test_cache_off_builds_and_records_nothing(switched, tmp_path):
    spec = finetune_workspace(tmp_path, Path(switched["spec"].parent / "tiny"))
    result = doit(spec, "cache=off")
    assert set(ACTIONS) <= set(result.ran) and not (tmp_path / "cache/.store").exists()
    assert sums(spec) == switched["first_sums"]


@pytest.mark.slow
def test_cache_gc_keeps_the_current_build_and_drops_the_rest(switched):
    spec = switched["spec"]
    store = spec.parent / "cache/.store"
    before = store_is_whole(store)
    current = {r["action_key"] for r in records(spec).values() if "action_key" in r}
    result = doit(spec, "cache-gc", "--keep-size", "0")
    assert "dropped" in result.output and "the current build's" in result.output
    left = {p.stem for p in (store / "entries").glob("*/*.json")}
    assert left == current & left and current <= left, "exactly the current build's entries stay"
    assert store_is_whole(store) < before
    assert all(blob.stat().st_nlink > 1 for blob in Store(store).blobs()), "no blob only the store kept"
    bad = doit(spec, "cache-gc", "--keep-size", "lots", check=False)
    assert bad.returncode != 0 and "is not a size" in bad.output and "Traceback" not in bad.output


# ---- the remote: a real registry ----

def remote_spec(host: str, push: bool = True, spec: str = FINETUNE_SPEC) -> str:
    return spec + f'\n[cache]\nremote = "{host}/modelmake-cache"\npush = {"true" if push else "false"}\n'


@pytest.fixture(scope="module")
def pushed(request, tiny_llama):
    """A tiny fine-tuned model built once with push = true to its own registry."""
    folder = scratch_folder(request, "pushed")
    with Registry(scratch_folder(request, "cache-registry")) as running:
        spec = finetune_workspace(folder, tiny_llama, remote_spec(running.host))
        result = doit(spec)
        yield {"folder": folder, "spec": spec, "registry": running, "output": result.output, "sums": sums(spec)}


@pytest.mark.slow
def test_a_second_machine_restores_everything_from_the_registry(pushed, tmp_path):
    assert pushed["output"].count("pushed ") >= len(ACTIONS)
    spec = fresh_clone(pushed["folder"], tmp_path / "second")
    result = doit(spec)
    assert set(ACTIONS) | {"convert:m", "package:m-Q8_0", "manifest:m"} <= restored(spec, result.output)
    assert f"restored from registry {pushed['registry'].host}/modelmake-cache" in result.output
    assert "pulled train:m from" in result.output and "MB/s" in result.output
    assert sums(spec) == pushed["sums"]
    assert "warning" not in result.output
    assert "restored from registry" in (spec.parent / "cache/report/REPORT.md").read_text()


@pytest.mark.slow
def test_a_tampered_remote_blob_is_refused_and_the_task_built(pushed, tmp_path):
    quantized = next(line.split()[0] for line in pushed["sums"].splitlines() if line.endswith("m-merged.Q8_0.gguf"))
    blob = pushed["registry"].blob_data(f"sha256:{quantized}")
    original = blob.read_bytes()
    try:
        flip_last_byte(blob)
        spec = fresh_clone(pushed["folder"], tmp_path / "tampered")
        result = doit(spec)
    finally:
        blob.write_bytes(original)
    assert "cache entry quantize:m-merged-Q8_0" in result.output, result.output[-3000:]
    assert "quantize:m-merged-Q8_0" not in restored(spec, result.output)
    assert "train:m" in restored(spec, result.output), "the other entries still came from the registry"
    assert sums(spec) == pushed["sums"], "built locally, to the right bytes"
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_registry_that_is_down_costs_one_warning(pushed, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    spec = fresh_clone(pushed["folder"], tmp_path / "down", remote_spec(closed))
    result = doit(spec)
    warnings = [line for line in result.output.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "cache remote" in warnings[0] and "cannot reach" in warnings[0], warnings
    assert sums(spec) == pushed["sums"] and "Traceback" not in result.output


@pytest.mark.slow
def test_a_wrong_password_costs_one_warning(tmp_path, tiny_llama):
    with Registry(tmp_path / "auth-registry", users={"ci": "right"}) as running:
        spec = finetune_workspace(tmp_path / "w", tiny_llama, remote_spec(running.host))
        env = os.environ | {"MODELMAKE_REGISTRY_USER": "ci", "MODELMAKE_REGISTRY_PASSWORD": "wrong"}
        result = doit(spec, env=env)
        warnings = [line for line in result.output.splitlines() if "warning:" in line]
        assert len(warnings) == 1 and "refused the credentials" in warnings[0], warnings
        assert "Traceback" not in result.output
        right = env | {"MODELMAKE_REGISTRY_PASSWORD": "right"}
        pushed = doit(spec, "cache-push", env=right)
        assert "cache entries pushed to" in pushed.output and "warning" not in pushed.output
        second = fresh_clone(tmp_path / "w", tmp_path / "w2")
        assert "train:m" in restored(second, doit(second, env=right).output)


def _kill_when(command: list[str], appears: str, folder: Path) -> bool:
    """Run `command` in its own process group and SIGKILL the group once `folder` has a path matching
    `appears`; True if it was killed before it finished."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        if any(folder.glob(appears)):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.wait()
    return False


def _doit_command(spec: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "doit", "run", "-f", str(REPO / "dodo.py"), *args, f"spec={spec}"]


@pytest.mark.slow
def test_kill_9_during_a_restore_leaves_no_half_entry(pushed, tmp_path):
    spec = fresh_clone(pushed["folder"], tmp_path / "killed")
    store = spec.parent / "cache/.store"
    killed = _kill_when(_doit_command(spec), "tmp/pull-*/oci/blobs/sha256/*", store)
    assert killed, "the build finished before a pull was under way"
    store_is_whole(store)
    result = doit(spec)
    assert sums(spec) == pushed["sums"]
    assert store_is_whole(store) > 0 and "Traceback" not in result.output


@pytest.mark.slow
def test_kill_9_during_a_cache_push_leaves_no_half_entry(pushed, tmp_path):
    with Registry(tmp_path / "fresh-registry") as fresh:
        spec = fresh_clone(pushed["folder"], tmp_path / "pusher", remote_spec(fresh.host, push=False))
        doit(spec)
        store = spec.parent / "cache/.store"
        killed = _kill_when(_doit_command(spec, "cache-push"), "tmp/push-*/oci/index.json", store)
        assert killed, "the push finished before it could be interrupted"
        store_is_whole(store)
        assert "cache entries pushed" in doit(spec, "cache-push").output
        second = fresh_clone(spec.parent, tmp_path / "after-push")
        result = doit(second)
        assert set(ACTIONS) <= restored(second, result.output)
        assert sums(second) == pushed["sums"]


# ---- the spec ----

@pytest.mark.parametrize("table, expected", [
    ('[cache]\nremot = "127.0.0.1:5000/c"\n', "unknown key 'cache.remot': did you mean 'remote'?"),
    ('[cache]\npush = true\n', "push = true needs remote"),
    ('[cache]\nremote = "Registry.example.com/c"\n', "cache.remote: String should match pattern"),
])
def test_bad_cache_tables_are_clear_errors(tmp_path, tiny_llama, table, expected):
    spec = finetune_workspace(tmp_path, tiny_llama, '[[models]]\nname = "m"\nbase = "tiny"\n' + table)
    result = doit(spec, check=False)
    assert result.returncode != 0 and expected in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_checkouts_on_one_machine_share_a_store(tmp_path, tiny_llama):
    """[cache] store names one folder for several checkouts; [cache] dir names the output folder."""
    text = ('[[models]]\nname = "m"\nbase = "tiny"\nquantize = ["Q8_0"]\n\n[cache]\ndir = "out"\n'
            f'store = "{tmp_path / "shared-store"}"\n')
    first = finetune_workspace(tmp_path / "one", tiny_llama, text)
    doit(first)
    assert (tmp_path / "one/out/m/SHA256SUMS").is_file() and store_is_whole(tmp_path / "shared-store") > 0
    second = finetune_workspace(tmp_path / "two", tiny_llama, text)
    result = doit(second)
    assert "quantize:m-Q8_0" in result.ran and "restored from the local store" in result.output
    assert {"convert:m", "quantize:m-Q8_0", "package:m-Q8_0"} <= {
        json.loads(p.read_text())["task"] for p in (tmp_path / "two/out/.runs").glob("*.json")
        if json.loads(p.read_text()).get("restored")}
    assert (tmp_path / "two/out/m/SHA256SUMS").read_text() == (tmp_path / "one/out/m/SHA256SUMS").read_text()
