"""Importance-matrix quants with llama.cpp's own llama-imatrix and llama-quantize (built by `doit
tools` from llama-cpp-python's source), and the promise that the quantize stage writes exactly what
llama-quantize writes."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from gguf import GGUFReader
from helpers import doit, write_spec

from stages import evaluate, quantize
from stages.ground import llamacpp
from stages.ground.errors import BuildError


def _field(path, key):
    field = GGUFReader(path).get_field(key)
    return None if field is None else field.contents()


def _llama_quantize(*args, cwd):
    subprocess.run([str(llamacpp.find().path("llama-quantize")), *map(str, args)], cwd=cwd, check=True,
                   capture_output=True)


@pytest.mark.slow
def test_the_default_build_quantizes_with_an_imatrix_over_the_training_set(default_build):
    cache = default_build["cache"]
    calibration = (cache / "imatrix/calibration.txt").read_text()
    assert calibration.count("<|im_start|>assistant\n") == 245, "the 245 training conversations, chat-formatted"
    imatrix = cache / "imatrix/smollm2-demo-merged.imatrix.gguf"
    assert _field(imatrix, "general.type") == "imatrix"
    q4 = cache / "gguf/smollm2-demo-merged.Q4_K_M.gguf"
    # names, never host paths: the bytes are the same on every machine
    assert _field(q4, "quantize.imatrix.file") == "smollm2-demo-merged.imatrix.gguf"
    assert _field(q4, "quantize.imatrix.dataset") == "calibration.txt"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert "imatrix/smollm2-demo-merged.imatrix.gguf" in {a["path"] for a in manifest["artifacts"]}


@pytest.mark.slow
def test_an_iq_type_without_a_matrix_is_llama_quantizes_bytes_too(tmp_path, smollm_tokenizer):
    """IQ4_XS needs no matrix. Rows of 256 (the real model's width is covered by the cases below) are
    wide enough that llama.cpp quantizes the weights as IQ4_XS instead of falling back to another type."""
    from helpers import make_tiny_model

    from stages import convert

    model = make_tiny_model(tmp_path / "model", "llama", smollm_tokenizer, hidden_size=256, intermediate_size=512)
    f16 = tmp_path / "m.f16.gguf"
    convert.run(model, f16, "f16", "tiny")
    quantize.run(f16, tmp_path / "stage.gguf", "IQ4_XS")
    _llama_quantize(f16, tmp_path / "tool.gguf", "IQ4_XS", cwd=tmp_path)
    assert (tmp_path / "stage.gguf").read_bytes() == (tmp_path / "tool.gguf").read_bytes()
    assert _field(tmp_path / "stage.gguf", "general.file_type") == 30
    assert "IQ4_XS" in {t.tensor_type.name for t in GGUFReader(tmp_path / "stage.gguf").tensors}


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0"])
def test_the_quantize_stage_writes_what_llama_quantize_writes(default_build, tmp_path, quant):
    f16 = default_build["cache"] / "gguf/smollm2-demo-merged.F16.gguf"
    quantize.run(f16, tmp_path / "stage.gguf", quant)
    _llama_quantize(f16, tmp_path / "tool.gguf", quant, cwd=tmp_path)
    assert (tmp_path / "stage.gguf").read_bytes() == (tmp_path / "tool.gguf").read_bytes()
    if quant == "Q4_K_M":  # what the default build made to compare with its imatrix Q4_K_M
        built = default_build["cache"] / "gguf/smollm2-demo-merged.Q4_K_M-no-imatrix.gguf"
        assert built.read_bytes() == (tmp_path / "tool.gguf").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0"])  # and IQ3_XXS below, quantized once for both checks
def test_with_an_imatrix_too(default_build, tmp_path, quant, monkeypatch):
    cache = default_build["cache"]
    f16, imatrix = cache / "gguf/smollm2-demo-merged.F16.gguf", cache / "imatrix/smollm2-demo-merged.imatrix.gguf"
    monkeypatch.chdir(cache)  # paths relative to where the caller stands, not to where the tool runs
    quantize.run_with_imatrix(Path(os.path.relpath(f16)), Path(os.path.relpath(tmp_path / "stage.gguf")), quant,
                              Path(os.path.relpath(imatrix)))
    _llama_quantize("--imatrix", imatrix.name, f16, tmp_path / "tool.gguf", quant, cwd=imatrix.parent)
    assert (tmp_path / "stage.gguf").read_bytes() == (tmp_path / "tool.gguf").read_bytes()
    if quant == "Q4_K_M":
        assert (tmp_path / "stage.gguf").read_bytes() == (cache / "gguf/smollm2-demo-merged.Q4_K_M.gguf").read_bytes()


@pytest.mark.slow
def test_q4_k_m_with_and_without_the_imatrix_are_measured_and_the_report_shows_both(default_build):
    """The default spec makes Q4_K_M again without the matrix (compare_without_imatrix) and measures both.
    Which one is closer to F16 is the measurement's to say, not this test's: the fine-tune's bytes depend
    on the CPU's float kernels, and so does the matrix's gain (KL 0.1175 → 0.0990 on the machine that
    recorded the first lock, 0.1083 → 0.1128 with top-1 86.0% → 91.0% on an AVX2-only EPYC; BENCHMARKS.md)."""
    cache = default_build["cache"]
    with_matrix, without = (json.loads((cache / f"eval/{v}.json").read_text())["quality"]
                            for v in ("Q4_K_M", "Q4_K_M-no-imatrix"))
    plain, weighted = (cache / f"gguf/smollm2-demo-merged.{v}.gguf" for v in ("Q4_K_M-no-imatrix", "Q4_K_M"))
    assert _field(plain, "quantize.imatrix.file") is None and _field(plain, "general.file_type") == 15
    assert _field(weighted, "quantize.imatrix.file") and _field(weighted, "general.file_type") == 15
    assert plain.read_bytes() != weighted.read_bytes(), "the matrix chose other roundings"
    assert with_matrix["kl_divergence"] != without["kl_divergence"]
    report = (default_build["folder"] / "cache/report/REPORT.md").read_text()
    section = report[report.index("### What the importance matrix buys"):report.index("### Since the previous build")]
    assert (f"| Q4_K_M | 105.5 MB → 105.5 MB | {without['kl_divergence']:.5f} → {with_matrix['kl_divergence']:.5f} | "
            f"{without['top1_agreement']:.1%} → {with_matrix['top1_agreement']:.1%} |") in section
    manifest = {a["path"] for a in json.loads((cache / "manifest.json").read_text())["artifacts"]}
    assert "gguf/smollm2-demo-merged.Q4_K_M-no-imatrix.gguf" in manifest, "checksummed like every artifact"
    assert not (cache / "package/Q4_K_M-no-imatrix").exists(), "measured, never released"


@pytest.mark.slow
def test_an_iq_type_made_with_the_matrix_is_llama_quantizes_and_loads_and_answers(default_build, tmp_path):
    cache = default_build["cache"]
    f16, imatrix = cache / "gguf/smollm2-demo-merged.F16.gguf", cache / "imatrix/smollm2-demo-merged.imatrix.gguf"
    iq = tmp_path / "m.IQ3_XXS.gguf"
    quantize.run_with_imatrix(f16, iq, "IQ3_XXS", imatrix)
    _llama_quantize("--imatrix", imatrix.name, f16, tmp_path / "tool.gguf", "IQ3_XXS", cwd=imatrix.parent)
    assert iq.read_bytes() == (tmp_path / "tool.gguf").read_bytes()
    assert _field(iq, "general.file_type") == 23
    prompts = tmp_path / "prompts.jsonl"  # the first 9 of the build's 27 prompts: it answers, the point here
    prompts.write_text("".join((cache / "eval/prompts.jsonl").read_text().splitlines(keepends=True)[:9]))
    job = evaluate.Job("m", "IQ3_XXS", evaluate.Subject(iq), None, None, "", prompts)
    scores = evaluate.answer_accuracy(job, evaluate.EvalSpec(), 0)
    assert scores["prompts"] == 9 and sum(bool(a["answer"].strip()) for a in scores["answers"]) >= 7


@pytest.mark.slow
def test_calibration_text_too_short_is_a_clear_error(default_build, tmp_path):
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(BuildError, match="short.txt is too short for chunks of 512 tokens: give more text"):
        quantize.make_imatrix(default_build["cache"] / "gguf/smollm2-demo-merged.F16.gguf", tmp_path / "short.txt",
                              tmp_path / "out.imatrix.gguf", 512)
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize("table, message", [
    ('quantize = ["IQ3_XXS"]', "quantize: IQ3_XXS need an importance matrix: write the quant types as "
                               "[models.quantize] types = [...] with imatrix = true"),
    ('[models.quantize]\ntypes = ["Q4_K_M"]\nimatrix = true', "quantize.imatrix = true calibrates on the training "
                                                              "set, and this model has no [models.train]"),
    ('[models.quantize]\ntypes = ["Q4_K_M"]\nimatrix = "calib.bin"', "is not UTF-8 text"),
    ('[models.quantize]\ntypes = ["Q4_K_M"]\nimatrixx = true', "unknown key 'models[0].quantize.imatrixx': did you "
                                                               "mean 'imatrix'?"),
    ('[models.quantize]\ntypes = ["Q4_K_M"]\ncompare_without_imatrix = ["Q4_K_M"]',
     "compare_without_imatrix measures what the importance matrix buys, and this model has none: set imatrix = true"),
    ('[models.quantize]\ntypes = ["Q4_K_M"]\nimatrix = "calib.txt"\ncompare_without_imatrix = ["Q5_K_M"]',
     "compare_without_imatrix: 'Q5_K_M' is not one of quantize.types (Q4_K_M)"),
    ('[models.quantize]\ntypes = ["IQ3_XXS"]\nimatrix = "calib.txt"\ncompare_without_imatrix = ["iq3_xxs"]',
     "compare_without_imatrix: IQ3_XXS is not made without an importance matrix"),
    ('[models.quantize]\ntypes = ["Q4_K_M"]\nimatrix = "calib.txt"\ncompare_without_imatrix = ["Q4_K_M"]\n'
     '[models.eval]\ntext = "calib.txt"\n[models.eval.gate.Q4_K_M-no-imatrix]\nmax_kl = 0.1',
     "eval.gate.Q4_K_M-no-imatrix: Q4_K_M-no-imatrix is measured for comparison and never released"),
])
def test_imatrix_spec_errors_say_what_to_do(tmp_path, tiny_llama, table, message):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "calib.bin").write_bytes(bytes(range(256)))
    (tmp_path / "calib.txt").write_text("Calibration text.\n")
    spec = write_spec(tmp_path, f'[[models]]\nname = "tiny"\nbase = "tiny"\n{table}\n')
    result = doit(spec, "list", check=False)
    assert result.returncode != 0 and message in result.output and "Traceback" not in result.output


def test_tools_are_found_only_for_the_installed_llama_cpp_python(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELMAKE_TOOLS_DIR", str(tmp_path))
    with pytest.raises(BuildError, match=r"are not built .*: run `doit tools` once"):
        llamacpp.find()


def test_built_tools_name_their_source():
    tools = llamacpp.find()
    assert tools.stamp["llama-cpp-python"] == llamacpp.installed_version()
    assert len(tools.stamp["sdist_sha256"]) == 64


def test_the_tools_run_the_libraries_pip_built_for_the_bindings(tmp_path, tiny_llama):
    """llama.cpp is compiled once: the tools are linked to the libraries of the installed
    llama-cpp-python, copied beside them byte for byte, and it is those copies they load."""
    import shutil

    from stages import convert

    tools, libraries = llamacpp.find(), llamacpp.bindings_libraries()
    assert {"libllama", "libllama-common", "libggml", "libggml-base", "libggml-cpu", "libmtmd"} \
        <= {library.name.split(".")[0] for library in libraries}
    for library in libraries:
        assert (tools.folder / library.name).read_bytes() == library.read_bytes(), library.name
    assert tools.stamp["libraries_blake3"] == llamacpp.libraries_digest()
    # Moved whole, they still run: they look for their libraries beside themselves.
    moved = tmp_path / "tools"
    shutil.copytree(tools.folder, moved)
    f16 = tmp_path / "m.f16.gguf"
    convert.run(tiny_llama, f16, "f16", "tiny")
    _llama_quantize_with(moved, f16, tmp_path / "m.Q8_0.gguf", "Q8_0")
    quantize.run(f16, tmp_path / "stage.gguf", "Q8_0")  # the bindings' own libllama
    assert (tmp_path / "m.Q8_0.gguf").read_bytes() == (tmp_path / "stage.gguf").read_bytes()
    # And it is libllama beside them that they run, not a llama.cpp of their own: broken, they cannot start.
    for copy in moved.glob("libllama.*"):
        copy.write_bytes(b"")
    done = subprocess.run([str(moved / "llama-quantize"), str(f16), str(tmp_path / "again.gguf"), "Q8_0"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "libllama" in done.stderr, done.stderr
    assert not (tmp_path / "again.gguf").exists()


def _llama_quantize_with(folder, *args):
    done = subprocess.run([str(folder / "llama-quantize"), *map(str, args)], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"]})  # no LD_LIBRARY_PATH to find libraries by
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_changed_calibration_text_recomputes_the_matrix_and_quantizes_again(tmp_path, tiny_llama):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "tiny")
    calibration = tmp_path / "calib.txt"
    calibration.write_text(" ".join(f"word{i}" for i in range(400)))
    spec = write_spec(tmp_path, '[[models]]\nname = "tiny"\nbase = "tiny"\n[models.quantize]\ntypes = ["Q4_0", "Q8_0"]\n'
                                'imatrix = "calib.txt"\nimatrix_context = 64\n')
    first = doit(spec)
    assert {"quantize:tiny.imatrix", "quantize:tiny-Q4_0", "quantize:tiny-Q8_0"} <= set(first.ran)
    calibration.write_text(calibration.read_text())  # touched, the same bytes: nothing to do
    assert doit(spec).ran == []
    q8 = (tmp_path / "cache/tiny/gguf/tiny.Q8_0.gguf").read_bytes()
    calibration.write_text(" ".join(f"other{i}" for i in range(400)))
    again = doit(spec).ran
    assert sorted(again[:3]) == ["quantize:tiny-Q4_0", "quantize:tiny-Q8_0", "quantize:tiny.imatrix"], again
    assert not any(t.startswith(("import:", "convert:")) for t in again), "upstream of the matrix stays"
    # Q4_0 weighs its rounding by the matrix: new bytes, measured and packaged again. Q8_0 does not use
    # it: quantized again to the same bytes, so what reads it is up to date.
    assert {"eval:tiny-Q4_0", "package:tiny-Q4_0"} <= set(again) and "eval:tiny-Q8_0" not in again
    assert (tmp_path / "cache/tiny/gguf/tiny.Q8_0.gguf").read_bytes() == q8
