"""Experiments: a [models.matrix] of variants built from shared stages, in parallel, compared in one
table, the best promoted under the model's own name (tiny models; the whole graph through doit)."""

import csv
import io
import json
import shutil

import pytest
from helpers import doit, finetune_workspace, leftovers, scratch_folder

from stages import convert, experiments

MATRIX = """
[build]
max_parallel_train = 2

[[models]]
name = "m"
base = "tiny.gguf"

[models.quantize]
types = ["Q8_0"]
imatrix = true   # its calibration text is made from the data alone: shared
imatrix_context = 32

[models.train]
dataset = "data.jsonl"
validation = 0.25
max_steps = 2
batch_size = 4

[models.matrix]
"train.lora.r" = [4, 8]
"train.learning_rate" = [1e-3, 1e-2]

[models.select]
metric = "perplexity"
variant = "Q8_0"
"""
VARIANTS = ["m@r4-lr1e-3", "m@r4-lr1e-2", "m@r8-lr1e-3", "m@r8-lr1e-2"]


@pytest.fixture(scope="module")
def matrix_build(request, tiny_llama):
    """The 2x2 matrix built by `doit -n 2`, from a GGUF base (so the import is one of the shared tasks)."""
    folder = scratch_folder(request, "matrix")
    spec = finetune_workspace(folder, tiny_llama, MATRIX)
    convert.run(folder / "tiny", folder / "tiny.gguf", "f32", "tiny")
    return spec, doit(spec, "-n", "2")


def records(spec) -> dict[str, dict]:
    from stages.ground import runlog

    return runlog.read_records(spec.parent / "cache")


@pytest.mark.slow
def test_the_shared_stages_run_once_and_the_variants_at_once(matrix_build):
    spec, run = matrix_build
    listed = doit(spec, command="list").output
    for variant in VARIANTS:
        assert f"train:{variant}" in listed
    ran = run.ran
    assert ran.count("import:m") == 1 and ran.count("convert:m") == 1, ran
    # What is made from the data alone is shared too: one held-out text, one prompts file, one
    # calibration text, one eval of the base before fine-tuning; each variant its own imatrix.
    for shared in ("eval:m.heldout", "eval:m.prompts", "quantize:m.calibration", "eval:m-base", "train:m.preview"):
        assert ran.count(shared) == 1, (shared, ran)
    assert not [t for t in ran if t.startswith(("eval:m@", "quantize:m@", "train:m@")) and t.endswith(
        (".heldout", ".prompts", ".calibration", "-base", ".preview"))], ran
    assert sorted(t for t in ran if t.endswith(".imatrix")) == sorted(f"quantize:{v}-merged.imatrix" for v in VARIANTS)
    assert sorted(t for t in ran if t.startswith("train:m@")) == sorted(f"train:{v}" for v in VARIANTS)
    assert not [t for t in ran if t.startswith("package:m@")], "a variant is not packaged: its matrix's choice is"
    found = records(spec)
    assert "import.m" not in str([r for r in found if r.startswith("import:m@")])
    intervals = sorted((r["started_at"], r["started_at"] + r["wall_s"], task) for task, r in found.items())
    overlapping = [(a[2], b[2]) for a, b in zip(intervals, intervals[1:]) if b[0] < a[1]]
    assert overlapping, f"doit -n 2 runs two tasks at once: {intervals}"
    cache = spec.parent / "cache"
    assert (cache / "m/base").is_dir() and not list(cache.glob("m@*/base")), "one import, in cache/m"
    for variant in VARIANTS:
        manifest = json.loads((cache / variant / "manifest.json").read_text())
        paths = {a["path"] for a in manifest["artifacts"]}
        assert "../m/gguf/m.F16.gguf" in paths and f"gguf/{variant}-merged.Q8_0.gguf" in paths
        assert "../m/imatrix/calibration.txt" in paths and "../m/preview.html" in paths and not (cache / variant / "eval/base.json").exists()
    assert doit(spec, "verify").returncode == 0
    assert leftovers(cache / "m/base") == []


@pytest.mark.slow
def test_a_variant_built_alone_is_the_same_bytes(matrix_build, tmp_path):
    """One combination as a matrix of one: every artifact of its own (adapter, GGUFs) and the shared
    base GGUF are the bytes the 2x2 build made."""
    spec, _ = matrix_build
    shutil.copytree(spec.parent, tmp_path / "alone", ignore=shutil.ignore_patterns("cache", "models.lock"))
    alone = tmp_path / "alone/models.toml"
    alone.write_text(spec.read_text().replace("[4, 8]", "[8]").replace("[1e-3, 1e-2]", "[1e-2]"))
    doit(alone)

    def sums(cache, model):
        lines = (cache / model / "SHA256SUMS").read_text().splitlines()
        return {path: digest for digest, path in (line.split("  ", 1) for line in lines)}

    together, by_itself = sums(spec.parent / "cache", "m@r8-lr1e-2"), sums(tmp_path / "alone/cache", "m@r8-lr1e-2")
    assert together == by_itself and "gguf/m@r8-lr1e-2-merged.Q8_0.gguf" in together and "../m/gguf/m.F16.gguf" in together


@pytest.mark.slow
def test_compare_is_the_eval_results(matrix_build):
    spec, _ = matrix_build
    cache = spec.parent / "cache"
    table = _json_block(doit(spec, "compare", "format=json").output)
    assert [row["variant"] for row in table] == VARIANTS
    for row in table:
        result = json.loads((cache / row["variant"] / "eval/Q8_0.json").read_text())
        assert row["Q8_0.perplexity"] == result["quality"]["perplexity"]
        assert row["Q8_0.kl"] == result["quality"]["kl_divergence"]
        assert row["Q8_0.exact_match"] == result["accuracy"]["exact_match"]
        assert row["Q8_0.size_mb"] == round(result["size_bytes"] / 1e6, 2)
        lora = json.loads((cache / row["variant"] / "eval/lora.json").read_text())  # the adapter route is a release too
        assert row["lora.perplexity"] == lora["quality"]["perplexity"] and row["lora.kl"] == lora["quality"]["kl_divergence"]
        log = [json.loads(line) for line in (cache / row["variant"] / "adapter/train_log.jsonl").read_text().splitlines()]
        assert row["train_loss"] == log[-1]["train_loss"]
        assert row["train.lora.r"] == int(row["variant"].split("@r")[1].split("-")[0]) and row["status"] == "ok"

    by_perplexity = _json_block(doit(spec, "compare", "format=json", "sort=Q8_0.perplexity",
                                     "columns=perplexity,Q8_0.kl").output)
    figures = [row["Q8_0.perplexity"] for row in by_perplexity]
    assert figures == sorted(figures) and set(by_perplexity[0]) == {"variant", "train.lora.r", "train.learning_rate",
                                                                    "Q8_0.perplexity", "lora.perplexity", "Q8_0.kl",
                                                                    "status"}
    ambiguous = doit(spec, "compare", "sort=perplexity", check=False)
    assert ambiguous.returncode != 0 and "sort=perplexity is ambiguous: say which release's" in ambiguous.output
    descending = _json_block(doit(spec, "compare", "format=json", "sort=-Q8_0.perplexity").output)
    assert [row["Q8_0.perplexity"] for row in descending] == sorted(figures, reverse=True)
    text = doit(spec, "compare", "format=csv", "columns=Q8_0.chrf").output
    rows = list(csv.DictReader(io.StringIO(text[text.index("variant,"):])))
    assert [r["variant"] for r in rows] == VARIANTS and all(r["Q8_0.chrf"] for r in rows)
    wrong = doit(spec, "compare", "columns=nonsense", check=False)
    assert wrong.returncode != 0 and "no column 'nonsense'; the columns are" in wrong.output
    assert "Traceback" not in wrong.output


@pytest.mark.slow
def test_the_best_variant_ships_under_the_model_name_and_the_lock_records_it(matrix_build):
    spec, _ = matrix_build
    cache = spec.parent / "cache"
    figures = {v: json.loads((cache / v / "eval/Q8_0.json").read_text())["quality"]["perplexity"] for v in VARIANTS}
    best = min(figures.values())
    expected = next(v for v in VARIANTS if figures[v] == best)  # ties: the first in matrix order
    chosen = json.loads((cache / "m/selected.json").read_text())
    assert chosen["winner"] == expected and chosen["figures"] == figures and chosen["maximize"] is False
    package = cache / "m/package/Q8_0"
    shipped = next(package.glob("*.gguf"))
    assert shipped.read_bytes() == (cache / expected / "gguf" / f"{expected}-merged.Q8_0.gguf").read_bytes()
    assert "m:Q8_0" in (package / "compose.yaml").read_text() or "m" in (package / "Modelfile").read_text()
    assert (cache / "m/package/lora").is_dir()
    manifest = {a["path"] for a in json.loads((cache / "m/manifest.json").read_text())["artifacts"]}
    assert "selected.json" in manifest and any(p.startswith("package/Q8_0/") for p in manifest)
    report = (cache / "report/REPORT.md").read_text()
    assert "## Experiment: m" in report and f"Promoted: **{expected}**, the lowest perplexity of Q8_0" in report
    assert (cache / "report/m-loss-curves.png").is_file()

    doit(spec, "lock")
    lock = (spec.parent / "models.lock").read_text()
    assert '"m"' in lock and "selected.json" in lock and all(f'"{v}"' in lock for v in VARIANTS)
    assert doit(spec, "check").returncode == 0

    # The other way round: the highest perplexity wins, and `doit check` says the choice changed.
    spec.write_text(spec.read_text().replace('metric = "perplexity"', 'metric = "perplexity"\nmaximize = true'))
    checked = doit(spec, "check", check=False)
    assert checked.returncode != 0 and "selected.json" in checked.output, checked.output[-2000:]
    worst = next(v for v in VARIANTS if figures[v] == max(figures.values()))
    assert json.loads((cache / "m/selected.json").read_text())["winner"] == worst
    spec.write_text(spec.read_text().replace('\nmaximize = true', ''))
    doit(spec)


@pytest.mark.slow
def test_changing_one_value_rebuilds_only_its_variants(matrix_build):
    spec, _ = matrix_build
    spec.write_text(spec.read_text().replace('"train.learning_rate" = [1e-3, 1e-2]', '"train.learning_rate" = [1e-3, 3e-2]'))
    try:
        ran = doit(spec).ran
        assert sorted(t for t in ran if t.startswith("train:m@")) == ["train:m@r4-lr0.03", "train:m@r8-lr0.03"]
        assert "import:m" not in ran and "convert:m" not in ran
        assert not [t for t in ran if "lr1e-3" in t], "the variants it does not touch are up to date"
    finally:
        spec.write_text(spec.read_text().replace('[1e-3, 3e-2]', '[1e-3, 1e-2]'))
        doit(spec)


@pytest.mark.slow
def test_doit_clean_empties_a_matrix_and_the_store_restores_it(matrix_build):
    spec, _ = matrix_build
    cache = spec.parent / "cache"
    before = {v: (cache / v / "SHA256SUMS").read_text() for v in [*VARIANTS, "m"]}
    doit(spec, command="clean")
    for folder in [*VARIANTS, "m"]:
        assert not list((cache / folder).rglob("*.gguf")) and not (cache / folder / "manifest.json").exists(), folder
    assert not (cache / "m/selected.json").exists() and not (cache / "m/base").exists()
    doit(spec)
    found = records(spec)
    assert all(found[f"train:{v}"].get("restored") for v in VARIANTS), "restored from the store, not trained again"
    assert {v: (cache / v / "SHA256SUMS").read_text() for v in [*VARIANTS, "m"]} == before


@pytest.mark.slow
def test_a_failing_variant_does_not_stop_the_others(tmp_path, tiny_llama):
    spec = finetune_workspace(tmp_path, tiny_llama, MATRIX.replace('"train.lora.r" = [4, 8]\n', "").replace(
        "[1e-3, 1e-2]", "[1e-3, 1e9]").replace('base = "tiny.gguf"', 'base = "tiny"'))
    run = doit(spec, check=False)
    assert run.returncode != 0
    assert "manifest:m@lr1e-3" in run.ran and "manifest:m@lr1e9" not in run.ran
    # The choice is made among every variant or not at all (README, Experiments).
    assert "select:m" not in run.ran and not (tmp_path / "cache/m/selected.json").exists()
    assert "Traceback" not in run.output
    rows = {row["variant"]: row for row in _json_block(doit(spec, "compare", "format=json").output)}
    assert rows["m@lr1e-3"]["status"] == "ok"
    # Two steps at a learning rate of 1e9 leave weights beyond float16's range: the F16 conversion says so.
    assert rows["m@lr1e9"]["status"].startswith("failed: ") and "beyond float16's largest" in rows["m@lr1e9"]["status"]
    assert rows["m@lr1e9"]["Q8_0.perplexity"] is None


def _json_block(output: str):
    """The JSON doit compare printed (doit's own lines around it left out)."""
    start = output.index("[")
    return json.loads(output[start:output.rindex("]") + 1])


def test_ties_go_to_the_first_variant_in_matrix_order():
    assert experiments.choose({"a": 0.5, "b": 0.9, "c": 0.9}, maximize=True) == "b"
    assert experiments.choose({"a": 0.5, "b": 0.5, "c": None}, maximize=False) == "a"
    with pytest.raises(Exception, match="no variant has the figure"):
        experiments.choose({"a": None}, maximize=True)


def test_a_table_sorts_selects_and_renders():
    rows = [experiments.Row("m@r4", {"r": 4}, {"Q8_0.perplexity": 3.0, "Q8_0.kl": 0.1}, None),
            experiments.Row("m@r8", {"r": 8}, {"Q8_0.perplexity": 2.0, "Q8_0.kl": None}, None),
            experiments.Row("m@r16", {"r": 16}, {}, "train:m@r16 failed: loss is NaN")]
    header, body = experiments.table(rows, ["perplexity"], "perplexity")
    assert header == ["variant", "r", "Q8_0.perplexity", "status"]
    assert [r[0] for r in body] == ["m@r8", "m@r4", "m@r16"] and body[2][-1].startswith("failed: ")
    text = experiments.render(header, body, "table")
    assert text.splitlines()[0].split() == header and "-" in text.splitlines()[3]
    assert list(csv.reader(io.StringIO(experiments.render(header, body, "csv"))))[1] == ["m@r8", "8", "2.0", "ok"]
    with pytest.raises(Exception, match=r"no column 'q4'"):
        experiments.table(rows, ["q4"])
