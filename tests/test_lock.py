"""models.lock, `doit lock` and `doit check`: a committed lock proves in a fresh clone that the spec
rebuilds the same bytes, and when it does not, names the first task upstream that differs and why."""

import json
import os
import shutil

import pytest
import yaml
from helpers import FINETUNE_SPEC, REPO, doit, finetune_workspace, fresh_clone, scratch_folder

from stages.ground import lock


@pytest.fixture(scope="module")
def locked(request, tiny_llama):
    folder = scratch_folder(request, "locked")
    spec = finetune_workspace(folder, tiny_llama)
    first = doit(spec, "lock")
    return {"folder": folder, "spec": spec, "lock": folder / "models.lock", "output": first.output,
            "text": (folder / "models.lock").read_text()}


@pytest.mark.slow
def test_lock_records_every_artifact_task_with_its_facts_and_no_host_paths(locked):
    data = json.loads(locked["text"])
    assert data["format"] == lock.FORMAT and data["spec"] == "models.toml"
    tasks = data["models"]["m"]["tasks"]
    assert sorted(tasks) == ["adapter:m", "convert:m", "convert:m-merged", "merge:m", "package:m-Q8_0",
                             "package:m-lora", "quantize:m-merged-Q8_0", "train:m", "train:m.preview"]
    train = tasks["train:m"]
    assert train["params"]["lora"]["r"] == 8 and train["versions"]["stage.train"]
    assert {"data.jsonl", "tiny/config.json", "tiny/model.safetensors", "tiny/tokenizer.json"} <= set(train["inputs"])
    assert train["platform"]["device"] == "cpu" and train["platform"]["dtype"] == "float32"
    assert "CPU" in train["bound"]
    assert train["outputs"]["adapter/adapter_model.safetensors"]["size"] > 0
    quantize = tasks["quantize:m-merged-Q8_0"]
    assert set(quantize["platform"]) == {"os", "arch"} and "bound" not in quantize
    sums = (locked["folder"] / "cache/m/SHA256SUMS").read_text()
    for task in tasks.values():  # every locked output is what SHA256SUMS says
        for path, facts in task["outputs"].items():
            assert f"{facts['sha256']}  {path}\n" in sums
    assert not any("eval/" in path or "train_log" in path for task in tasks.values() for path in task["outputs"])
    # What eval measured, as facts (no speeds: they differ from run to run).
    result = json.loads((locked["folder"] / "cache/m/eval/Q8_0.json").read_text())
    metrics = data["models"]["m"]["metrics"]
    assert set(metrics) == {"base", "F16", "Q8_0", "lora"}
    assert metrics["Q8_0"]["perplexity"] == float(f"{result['quality']['perplexity']:.6g}")
    assert metrics["Q8_0"]["kl"] == float(f"{result['quality']['kl_divergence']:.6g}")
    assert not [name for figures in metrics.values() for name in figures if name.endswith("_tps")]
    assert str(locked["folder"]) not in locked["text"] and os.environ.get("USER", "root") not in locked["text"]


@pytest.mark.slow
def test_a_clean_clone_passes_check(locked, tmp_path):
    spec = fresh_clone(locked["folder"], tmp_path / "clone")
    result = doit(spec, "check")
    assert "train:m" in result.ran, "the clone had no cache: it built"
    assert "reproduced byte for byte" in result.output and "models.lock" in result.output


@pytest.mark.slow
def test_lock_twice_is_byte_identical_and_spec_comments_and_order_do_not_matter(locked, tmp_path):
    result = doit(locked["spec"], "lock")
    assert result.ran == ["lock"] and "unchanged" in result.output
    assert locked["lock"].read_text() == locked["text"]
    reordered = tmp_path / "reordered"
    shutil.copytree(locked["folder"], reordered, ignore=shutil.ignore_patterns("cache", "models.lock"))
    (reordered / "models.toml").write_text(
        "# the same spec, reworded\n[[models]]\nquantize = [\"Q8_0\"]   # release\nbase = \"tiny\"\nname = \"m\"\n\n"
        "[models.train.lora]\nr = 8\n\n[models.train]\nbatch_size = 4\nmax_steps = 2\nvalidation = 0.25\n"
        "dataset = \"data.jsonl\"\n")
    doit(reordered / "models.toml", "lock")
    assert (reordered / "models.lock").read_text() == locked["text"]


@pytest.mark.slow
def test_a_changed_parameter_names_train_as_the_first_difference(locked, tmp_path):
    spec = fresh_clone(locked["folder"], tmp_path / "clone")
    spec.write_text(FINETUNE_SPEC.replace("r = 8", "r = 16"))
    result = doit(spec, "check", check=False)
    assert result.returncode != 0
    paragraphs = [p for p in result.output.split("\n\n") if "First difference upstream" in p]
    artifacts = {p.split(" (from ")[0].strip().split()[-1] for p in paragraphs}
    assert {"m/adapter/adapter_model.safetensors", "m/gguf/m.lora.F16.gguf", "m/gguf/m-merged.Q8_0.gguf",
            "m/package/Q8_0/m-merged.Q8_0.gguf"} <= artifacts
    assert "m/gguf/m.F16.gguf" not in artifacts, "the base's GGUF is upstream of train: unchanged"
    for paragraph in paragraphs:
        assert "First difference upstream: train:m: parameter lora.r: 8 → 16" in paragraph, paragraph
        assert "run `doit lock`" in paragraph
    assert "Traceback" not in result.output
    # How the figures moved, in `doit check` and at the top of the report.
    moved = next(line for line in result.output.splitlines() if line.startswith("metrics against models.lock: "))
    assert "m Q8_0 perplexity " in moved and "m lora perplexity " in moved and "m base " not in moved, moved
    report = (spec.parent / "cache/report/REPORT.md").read_text()
    assert "Against models.lock: m " in report and "m Q8_0 perplexity " in report


@pytest.mark.slow
def test_a_different_tool_version_names_the_tool_and_both_versions(locked, tmp_path):
    spec = fresh_clone(locked["folder"], tmp_path / "clone")
    data = json.loads((spec.parent / "models.lock").read_text())
    quantize = data["models"]["m"]["tasks"]["quantize:m-merged-Q8_0"]
    real = quantize["versions"]["llama-cpp-python"]
    quantize["versions"]["llama-cpp-python"] = "0.0.1"
    quantize["outputs"]["gguf/m-merged.Q8_0.gguf"]["sha256"] = "0" * 64  # as an older llama.cpp wrote it
    (spec.parent / "models.lock").write_text(json.dumps(data, indent=2))
    result = doit(spec, "check", check=False)
    assert result.returncode != 0
    assert ("m/gguf/m-merged.Q8_0.gguf (from quantize:m-merged-Q8_0) has sha256" in result.output
            and f"First difference upstream: quantize:m-merged-Q8_0: llama-cpp-python version 0.0.1 → {real}"
            in result.output)


@pytest.mark.slow
def test_nondeterministic_bytes_are_named_with_both_digests(locked, tmp_path):
    """A package built with another SOURCE_DATE_EPOCH while the lock records the same inputs: the bytes
    differ though nothing recorded does."""
    spec = fresh_clone(locked["folder"], tmp_path / "clone")
    doit(spec, "lock", env=os.environ | {"SOURCE_DATE_EPOCH": "86400"})
    data = json.loads((spec.parent / "models.lock").read_text())
    for name, task in data["models"]["m"]["tasks"].items():
        if name.startswith("package:"):
            task["params"]["source_date_epoch"] = 0
    (spec.parent / "models.lock").write_text(json.dumps(data, indent=2))
    result = doit(spec, "check", check=False)
    assert result.returncode != 0
    assert "package:m-Q8_0, not deterministic on this platform" in result.output
    tar = [p for p in result.output.split("\n\n") if "/m-Q8_0.oci.tar (from package:m-Q8_0)" in p]
    assert tar and "sha256" in tar[0] and "train:m" not in tar[0]
    locked_sha = data["models"]["m"]["tasks"]["package:m-Q8_0"]["outputs"]["package/Q8_0/m-Q8_0.oci.tar"]["sha256"]
    now_sha = [line.split()[0] for line in (spec.parent / "cache/m/SHA256SUMS").read_text().splitlines()
               if line.endswith("package/Q8_0/m-Q8_0.oci.tar")][0]
    assert locked_sha != now_sha and f"{locked_sha}" in result.output and now_sha in result.output


@pytest.mark.slow
def test_training_on_another_platform_is_not_compared_and_says_so(locked, tmp_path):
    spec = fresh_clone(locked["folder"], tmp_path / "clone")
    data = json.loads((spec.parent / "models.lock").read_text())
    train = data["models"]["m"]["tasks"]["train:m"]
    train["platform"] |= {"device": "cuda", "dtype": "bfloat16"}
    train["bound"] = "trained on cuda (bfloat16)"
    train["outputs"]["adapter/adapter_model.safetensors"]["sha256"] = "1" * 64  # a GPU's bytes
    (spec.parent / "models.lock").write_text(json.dumps(data, indent=2))
    result = doit(spec, "check")
    assert "not compared, as they come from or after train:m: trained on cuda (bfloat16)" in result.output
    assert "device cuda" in result.output and "device cpu" in result.output
    assert "reproduced byte for byte" in result.output, "the base's own artifacts are still compared"


@pytest.mark.parametrize("mangle, expected", [
    (lambda text: text[: len(text) // 2], "is not a valid lock"),
    (lambda text: text.replace('"m": {', '"other": {', 1), "locks model(s) other, which models.toml does not define"),
    (lambda text: text.replace(f'"format": {lock.FORMAT}', '"format": 99'), "written by a newer modelmake (lock format 99"),
    (lambda text: text.replace('"spec": "models.toml"', '"spec": "other.toml"'), "is the lock of other.toml"),
    (None, "does not exist: run `doit lock`"),
])
@pytest.mark.slow
def test_bad_locks_are_clear_errors(locked, tmp_path, mangle, expected):
    spec = fresh_clone(locked["folder"], tmp_path / "clone")
    if mangle:
        (spec.parent / "models.lock").write_text(mangle(locked["text"]))
    else:
        (spec.parent / "models.lock").unlink()
    result = doit(spec, "check", check=False)
    assert result.returncode != 0 and expected in result.output and "Traceback" not in result.output
    assert str(spec.parent / "models.lock") in result.output
    assert result.ran == [], "refused before building anything (doit does not print its private _check-lock)"


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [block.split("```")[0].strip() for block in text.split("```sh\n")[1:3]]


@pytest.mark.parametrize("recipe", ["github-actions.yml", "gitlab-ci.yml"])
def test_ci_recipes_parse_and_run_the_readmes_commands(recipe):
    data = yaml.safe_load((REPO / "examples/ci" / recipe).read_text())
    if recipe.startswith("github"):
        steps = data["jobs"]["check"]["steps"]
        commands = [step["run"] for step in steps if "run" in step]
        uploaded = next(step["with"]["path"] for step in steps if step.get("uses", "").startswith("actions/upload"))
    else:
        job = data["modelmake-check"]
        commands, uploaded = job["script"], "\n".join(job["artifacts"]["paths"])
        assert job["artifacts"]["when"] == "always"
    setup = _readme_commands()[0]
    assert setup.endswith(" && doit"), "the README's first command sets up and builds"
    assert any(setup.removesuffix(" && doit") in command for command in commands)
    assert any("doit check" in command and "pipefail" in command for command in commands)
    assert "check.log" in uploaded and "cache/report/" in uploaded


def test_the_default_specs_lock_is_committed_and_names_its_spec():
    data = json.loads((REPO / "models.lock").read_text())
    assert data["spec"] == "models.toml" and list(data["models"]) == ["smollm2-demo"]
    assert "train:smollm2-demo" in data["models"]["smollm2-demo"]["tasks"]


@pytest.mark.slow
def test_a_clean_build_of_the_default_spec_reproduces_the_committed_lock(default_build):
    """CI's reproducibility check: the repo's models.toml, built from an empty cache on this machine
    (conftest.default_build), against the committed models.lock, byte for byte. A change that alters
    an artifact fails here until `doit lock` records it on purpose."""
    locked = json.loads((REPO / "models.lock").read_text())
    artifacts = sum(len(task["outputs"]) for model in locked["models"].values() for task in model["tasks"].values())
    result = doit(default_build["spec"], "check", check=False)
    assert result.returncode == 0, result.output[-4000:]
    assert f"models.lock: all {artifacts} compared artifacts reproduced byte for byte" in result.output


def test_check_says_how_each_metric_moved_against_the_lock():
    """DVC's `metrics diff`: a PR that changes the data shows "Q4_K_M exact_match 0.84 → 0.79"; the
    figures are notes, not failures (the artifacts' bytes are what `doit check` holds to the lock)."""
    def built(metrics):
        return lock.Lock(format=lock.FORMAT, spec="models.toml",
                         models={"m": lock.LockedModel(tasks={}, metrics=metrics)})

    was = built({"Q4_K_M": {"exact_match": 0.84, "perplexity": 12.5}, "lora": {"chrf": 40.0}})
    now = built({"Q4_K_M": {"exact_match": 0.79, "perplexity": 12.5}, "lora": {"chrf": 41.5}})
    assert lock.metric_changes(was, now) == ["m Q4_K_M exact_match 0.84 → 0.79", "m lora chrf 40 → 41.5"]
    finding = lock.compare(was, now, "models.lock")
    assert finding.failures == [] and finding.notes == [
        "metrics against models.lock: m Q4_K_M exact_match 0.84 → 0.79; m lora chrf 40 → 41.5"]
    assert lock.compare(was, was, "models.lock").notes == []
