"""models.toml validation: each bad input is one clear sentence naming file and field."""

import os
import subprocess
import sys
import re

import pytest
from helpers import REPO, SMOLLM_GGUF, doit, write_spec

from stages.ground.errors import BuildError
from stages.ground.spec import QUANT_TYPES, load_spec


def test_default_spec_resolves_the_embedded_model():
    spec = load_spec(REPO / "models.toml")
    (model,) = spec.models
    assert model.base.kind == "gguf"
    assert model.base.path == SMOLLM_GGUF.resolve()
    assert model.outtype == "f16"
    assert model.quantize == ["Q4_K_M", "Q8_0"]
    assert model.train.dataset == REPO / "data" / "demo.jsonl" and model.train.lora.r == 8
    assert spec.cache == REPO / "cache"


def test_quant_type_numbers_are_llama_cpps():
    import llama_cpp

    for name, ftype in QUANT_TYPES.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}") == ftype, name


def test_quant_names_are_normalised_and_paths_resolved_from_the_spec_folder(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"")
    spec = load_spec(write_spec(tmp_path, 'cache = "out"\n[[models]]\nname = "m"\nbase = "models/m.gguf"\n'
                                          'quantize = ["q4_k_m"]\nouttype = "F16"\n'))
    assert spec.models[0].quantize == ["Q4_K_M"]
    assert spec.models[0].base.path == tmp_path / "models" / "m.gguf"
    assert spec.cache == tmp_path / "out"


@pytest.mark.parametrize("text, expected", [
    ('[[models]]\nname = "m"\nbase = "x.gguf"\nquantise = ["Q4_K_M"]\n',
     "unknown key 'models[0].quantise': did you mean 'quantize'?"),
    ('cahce = "c"\n[[models]]\nname = "m"\nbase = "x.gguf"\n', "unknown key 'cahce': did you mean 'cache'?"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\nquantize = ["Q4_K_X"]\n',
     "models[0].quantize: unknown quant type 'Q4_K_X'. Did you mean 'Q4_K_S'? Valid types: Q4_0,"),
    ('[[models]]\nname = "m"\nbase = "nowhere.gguf"\n', "nowhere.gguf does not exist"),
    ('[[models]]\nname = "m"\nbase = "hf:HuggingFaceTB/SmolLM2-135M"\n', "has no revision: pin one"),
    ('[[models]]\nname = "m"\nbase = "pkg:no_such_package/m.gguf"\n', "'no_such_package' is not installed"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\nouttype = "q4"\n', "models[0].outtype: Input should be 'f32', 'f16'"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[[models]]\nname = "m"\nbase = "x.gguf"\n', "repeated: m"),
    ('models = []\n', "models: List should have at least 1 item"),
    ('[[models]]\nname = "Demo"\nbase = "x.gguf"\n[[models]]\nname = "demo"\nbase = "x.gguf"\n',
     "model names 'Demo' and 'demo' differ only in case: they would share one cache folder on macOS and Windows"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.convert]\nengine = "llamacpp"\n',
     "models[0].convert.engine: Input should be 'auto', 'native' or 'llama.cpp'"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.convert]\nengine = "llama.cpp"\ncommand = ["c", "{out}"]\n',
     "engine = \"llama.cpp\" and command name two converters; keep one"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.train]\ndataset = "none.jsonl"\n',
     "models[0].train.dataset: dataset"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.train]\ndataset = "x.gguf"\n[models.train.lora]\nrank = 4\n',
     "unknown key 'models[0].train.lora.rank': did you mean 'r'? valid keys here are r, alpha, dropout,"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.train]\ndataset = "x.gguf"\nlearning_rat = 1e-4\n',
     "unknown key 'models[0].train.learning_rat': did you mean 'learning_rate'?"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.train]\ndataset = "x.gguf"\nvalidation = 1.5\n',
     "a validation fraction is at least 0 and below 1"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.adapter]\nouttype = "f16"\n',
     "[models.adapter] needs a path to a PEFT adapter folder, or a [models.train] table"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\nouttype = "q8_0"\nquantize = ["Q4_K_M", "Q8_0"]\n',
     "quantize lists Q8_0, which is the outtype: convert already writes it; drop it from quantize"),
    # a model may not share a folder modelmake keeps in the cache, whatever the case (macOS folds it)
    ('[[models]]\nname = "report"\nbase = "x.gguf"\n',
     "models[0].name: 'report' is the name of a folder modelmake keeps in the cache (cache/report: the build "
     "report); give the model another name, e.g. 'report-model'"),
    ('[[models]]\nname = "Pulled"\nbase = "x.gguf"\n', "(cache/pulled: what `doit pull` fetched)"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.merge]\nkeep_hf = false\n',
     "[models.merge] is for a model with an adapter ([models.train] or adapter.path); this one has none"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.merge]\nkeep = false\n',
     "unknown key 'models[0].merge.keep': did you mean 'keep_hf'?"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[build]\nexecutor = "slurm"\n',
     "build.executor: Input should be 'local' or 'ray'"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[build.resources]\nquantise = { CPU = 2 }\n',
     "build.resources.quantise.[key]: Input should be 'import', 'train',"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[build.resources]\nquantize = { memory = "much" }\n',
     "build.resources: 'much' is not a size"),
    ('[[models]]\nname = "m"\nbase = "x.gguf"\n[models.train]\ndataset = "x.gguf"\n[models.train.resources]\nGPU = -2\n',
     "models[0].train.resources: GPU = -2: a resource is a number of units, 0 or more"),
])
def test_bad_spec_is_one_clear_sentence(tmp_path, text, expected):
    (tmp_path / "x.gguf").write_bytes(b"")
    path = write_spec(tmp_path, text)
    with pytest.raises(BuildError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)


def test_toml_syntax_error_through_doit_names_line_and_column(tmp_path):
    path = write_spec(tmp_path, '[[models]]\nname = "m"\nbase = \n')
    result = doit(path, command="list", check=False)
    assert result.returncode != 0
    assert f"modelmake: {path}: invalid TOML" in result.output
    assert "(at line 3, column 8)" in result.output
    assert "Traceback" not in result.output


def test_missing_spec_file(tmp_path):
    result = doit(tmp_path / "none.toml", command="list", check=False)
    assert result.returncode != 0
    assert "none.toml not found" in result.output and "Traceback" not in result.output


def test_doit_list_reads_like_the_lifecycle(tmp_path):
    path = write_spec(tmp_path, f'[[models]]\nname = "demo"\nbase = "{SMOLLM_GGUF}"\nquantize = ["Q4_K_M", "Q8_0"]\n')
    listed = [line.split()[0] for line in doit(path, command="list").output.splitlines()]
    assert listed == ["import", "import:demo", "convert", "convert:demo", "quantize", "quantize:demo-Q4_K_M",
                      "quantize:demo-Q8_0", "eval", "eval:demo-F16", "eval:demo-Q4_K_M", "eval:demo-Q8_0",
                      "parity", "parity:demo-Q4_K_M", "parity:demo-Q8_0",
                      "package", "package:demo-Q4_K_M", "package:demo-Q8_0", "manifest", "manifest:demo", "report",
                      "lock", "check", "push", "push:no-registry", "verify", "verify:demo", "serve", "tools", "cache-push",
                      "cache-gc", "pull"]
    info = doit(path, "convert:demo", command="info", check=False).output  # exits 1: not built yet
    assert "demo.F16.gguf" in info and "files.b3" in info
    assert "'action key': (not yet known: input base/files.b3 is not built)" in info


@pytest.mark.parametrize("dtype, expected", [("float16", "f16"), ("bfloat16", "bf16"), ("float32", "bf16")])
def test_auto_outtype_is_llama_cpps_choice_from_the_first_tensor(dtype, expected, tiny_llama, tmp_path):
    """llama.cpp's converter: f16 if the first tensor is float16, else bf16. The file names carry it."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=getattr(torch, dtype)).save_pretrained(tmp_path / "model")
    spec = load_spec(write_spec(tmp_path, '[[models]]\nname = "m"\nbase = "model"\nouttype = "auto"\n'))
    assert spec.models[0].outtype == expected
    assert spec.models[0].variants == [expected.upper()]


def test_auto_outtype_for_gguf_and_uncached_hub_bases(tmp_path):
    gguf_spec = load_spec(write_spec(tmp_path, f'[[models]]\nname = "m"\nbase = "{SMOLLM_GGUF}"\nouttype = "AUTO"\n'))
    assert gguf_spec.models[0].outtype == "bf16"  # imported as float32, which is not float16
    with pytest.raises(BuildError) as err:
        load_spec(write_spec(tmp_path, '[[models]]\nname = "m"\nbase = "hf:nobody/no-such-model@0123abc"\n'
                                       'outtype = "auto"\n'))
    assert "outtype" in str(err.value) and "has no safetensors weights here yet" in str(err.value)
    assert 'set outtype = "f16" or "bf16"' in str(err.value)


@pytest.mark.parametrize("text, key", [('cache = "."\n', "cache"), ('cache = ".."\n', "cache"),
                                       ('[cache]\ndir = "."\n', "cache.dir")])
def test_cache_may_not_be_the_spec_folder_or_above_it(tmp_path, text, key):
    """`doit clean` removes cache/<model>: with the cache in the spec's folder that could be a user's folder."""
    (tmp_path / "x.gguf").write_bytes(b"")
    path = write_spec(tmp_path, text + '[[models]]\nname = "m"\nbase = "x.gguf"\n')
    with pytest.raises(BuildError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: {key} = ")
    assert "`doit clean` removes them" in str(err.value) and 'e.g. cache = "cache"' in str(err.value)
    result = doit(path, command="list", check=False)
    assert result.returncode != 0 and "Traceback" not in result.output


def test_a_spec_and_a_dataset_that_start_with_a_byte_order_mark_are_read(tmp_path):
    """Windows editors write a UTF-8 BOM; it is not part of the first key or record."""
    from stages.formats.dataset import read_jsonl

    records = '{"instruction": "Say 1.", "output": "Answer: 1."}\n{"instruction": "Say 2.", "output": "Answer: 2."}\n'
    (tmp_path / "plain.jsonl").write_text(records, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text("\ufeff" + records, encoding="utf-8")
    plain, bom = read_jsonl(tmp_path / "plain.jsonl"), read_jsonl(tmp_path / "bom.jsonl")
    assert [e.messages for e in bom] == [e.messages for e in plain] and len(bom) == 2
    (tmp_path / "x.gguf").write_bytes(b"")
    spec = write_spec(tmp_path, '\ufeffcache = "out"\n[[models]]\nname = "m"\nbase = "x.gguf"\n')
    assert load_spec(spec).cache == tmp_path / "out"


@pytest.mark.parametrize("setting, expected", [
    ('[models.train]\ndataset = "folder"\n', "models[0].train.dataset: dataset {d}/folder is a folder, not a file"),
    ('[models.package]\nlicense = "folder"\n', "license file {d}/folder is a folder, not a file"),
    ('[models.eval]\nprompts = "folder"\n', "eval prompts file {d}/folder is a folder, not a file"),
    ('[models.adapter]\npath = "x.gguf"\n', "adapter folder {d}/x.gguf is a file, not a folder"),
])
def test_a_file_where_a_folder_is_expected_and_the_reverse_are_named(tmp_path, setting, expected):
    (tmp_path / "x.gguf").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    path = write_spec(tmp_path, f'[[models]]\nname = "m"\nbase = "x.gguf"\n{setting}')
    with pytest.raises(BuildError, match=re.escape(expected.format(d=tmp_path))):
        load_spec(path)


@pytest.mark.parametrize("cache", ["taken.txt", "taken.txt/below"])
def test_a_cache_folder_that_is_a_file_is_refused_before_anything_runs(tmp_path, cache):
    (tmp_path / "x.gguf").write_bytes(b"")
    (tmp_path / "taken.txt").write_text("mine")
    path = write_spec(tmp_path, f'cache = "{cache}"\n[[models]]\nname = "m"\nbase = "x.gguf"\n')
    result = doit(path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert f"cache = '{cache}' needs a folder at {tmp_path / 'taken.txt'}, and that is a file" in result.output
    assert (tmp_path / "taken.txt").read_text() == "mine"


def test_a_spec_that_is_not_utf8_or_is_a_folder_is_named(tmp_path):
    path = tmp_path / "models.toml"
    path.write_bytes('[[models]]\nname = "café"\nbase = "x.gguf"\n'.encode("latin-1"))
    result = doit(path, command="list", check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert f"{path}: not UTF-8 text (line 2: byte 0xe9 at offset 22): TOML files are UTF-8" in result.output
    with pytest.raises(BuildError, match="is a folder: pass the models.toml inside it"):
        load_spec(tmp_path)


def test_more_threads_than_cores_are_clamped_with_a_note(tmp_path, capsys):
    (tmp_path / "x.gguf").write_bytes(b"")
    path = write_spec(tmp_path, 'threads = 100000\n[[models]]\nname = "m"\nbase = "x.gguf"\n')
    cores = len(os.sched_getaffinity(0))  # the cores this process may use (a test worker's may be one)
    assert load_spec(path).threads == cores
    assert f"threads = 100000 is more than the {cores} cores this build may use; using {cores}" in capsys.readouterr().err


def test_threads_follow_the_cpu_affinity_not_the_machine(tmp_path):
    """`taskset -c 0 doit` (or a container's cpuset) gives a build one core: threads = 0 means one thread,
    and a larger setting is clamped to it, so llama.cpp's and torch's spinning threads never outnumber it."""
    (tmp_path / "x.gguf").write_bytes(b"")
    path = write_spec(tmp_path, 'threads = 2\n[[models]]\nname = "m"\nbase = "x.gguf"\n')
    probe = ("import sys; from stages.ground.spec import load_spec; from stages.ground.device import available_cores; "
             "print(available_cores(), load_spec(sys.argv[1]).threads)")
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", probe, str(path)], capture_output=True,
                            text=True, cwd=REPO, check=True)
    assert result.stdout.split() == ["1", "1"] and "using 1" in result.stderr


@pytest.mark.parametrize("name, setting, content, expected", [
    ("data.jsonl", '[models.train]\ndataset = "data.jsonl"\n',
     b'{"instruction": "Say 1.", "output": "1"}\n{"instruction": "Say 2.", "output": \n', "data.jsonl:2: not valid JSON"),
    ("data.jsonl", '[models.train]\ndataset = "data.jsonl"\n',
     '{"instruction": "Say 1.", "output": "1"}\n{"instruction": "Dis «2».", "output": "2"}\n'.encode("latin-1"),
     "data.jsonl:2: not UTF-8 text (byte 0xab): save the dataset as UTF-8"),
    ("prompts.jsonl", '[models.eval]\nprompts = "prompts.jsonl"\n',
     b'{"prompt": "Hi?", "answer": "Hello."}\n{"prompt": "Where?"}\n', "prompts.jsonl:2: the record has no \"answer\" string"),
])
def test_a_bad_record_in_a_file_the_spec_names_fails_before_anything_runs(tmp_path, name, setting, content, expected):
    """Found when doit reads the spec, not after the hours of training and quantizing before the stage that reads it."""
    (tmp_path / name).write_bytes(content)
    path = write_spec(tmp_path, f'[[models]]\nname = "m"\nbase = "{SMOLLM_GGUF}"\n{setting}')
    result = doit(path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert f"modelmake: {tmp_path / expected}" in result.output
    assert not (tmp_path / "cache/m").exists()


@pytest.mark.parametrize("setting, table_key", [
    ("[models.eval]\ncontext = 16384\n", "[models.eval] context = 16384"),
    ('[models.quantize]\ntypes = ["Q4_K_M"]\nimatrix_context = 9000\n', "[models.quantize] imatrix_context = 9000"),
    ("[models.package]\ncontext_size = 100000\n", "[models.package] context_size = 100000"),
    ('[models.train]\ndataset = "data.jsonl"\nmax_seq_len = 8193\n', "[models.train] max_seq_len = 8193"),
])
def test_a_context_longer_than_the_base_was_trained_on_is_refused_when_the_spec_loads(tmp_path, setting, table_key):
    """SmolLM2 was trained on 8192 tokens: a longer window would run llama.cpp and transformers past
    the positions it knows. Refused before anything runs, naming the setting and the limit."""
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 4)
    path = write_spec(tmp_path, f'[[models]]\nname = "m"\nbase = "{SMOLLM_GGUF}"\n{setting}')
    result = doit(path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert f"model 'm': {table_key} is longer than the 8192 tokens its base {SMOLLM_GGUF} was trained on; " \
           "use at most 8192" in result.output, result.output[-2000:]
    assert not (tmp_path / "cache/m").exists()


def test_default_windows_shrink_to_a_short_trained_context(tiny_llama):
    """The default eval and imatrix windows (512) are cut to a base trained on 256 tokens, not refused."""
    from stages.ground.spec import Spec
    from stages.ground.task import ModelBuild

    spec = Spec.model_validate({"models": [{"name": "t", "base": str(tiny_llama)}]}, context={"spec_dir": tiny_llama})
    build = ModelBuild.of(spec, spec.models[0])
    assert build.trained_context == 256
    assert build.context(spec.models[0].eval.context) == 256 and build.context(128) == 128


MATRIX_MODEL = f"""
[[models]]
name = "demo"
base = "{SMOLLM_GGUF}"
quantize = ["Q8_0"]

[models.train]
dataset = "d.jsonl"
validation = 0.5
"""


def _matrix_spec(tmp_path, matrix: str, extra: str = ""):
    (tmp_path / "d.jsonl").write_text("".join('{"instruction": "Say %d.", "output": "%d"}\n' % (i, i) for i in range(4)))
    return write_spec(tmp_path, MATRIX_MODEL + extra + "\n[models.matrix]\n" + matrix)


def test_a_matrix_is_a_model_per_combination_with_a_readable_name(tmp_path):
    spec = load_spec(_matrix_spec(tmp_path, '"train.lora.r" = [8, 32]\n"train.learning_rate" = [1e-4, 3e-4]\n'
                                            '"train.lora.dropout" = [0.05]\n'))
    assert [m.name for m in spec.models] == ["demo@r8-lr1e-4-drop0.05", "demo@r8-lr3e-4-drop0.05",
                                             "demo@r32-lr1e-4-drop0.05", "demo@r32-lr3e-4-drop0.05"]
    last = spec.models[-1]
    assert (last.train.lora.r, last.train.learning_rate, last.train.lora.dropout) == (32, 3e-4, 0.05)
    assert last.matrix_of == "demo" and last.varied == {"train.lora.r": 32, "train.learning_rate": 3e-4,
                                                        "train.lora.dropout": 0.05}
    assert last.shares_base and list(spec.matrices) == ["demo"]
    listed = doit(tmp_path / "models.toml", command="list").output
    assert listed.count("import:demo ") == 1 and "train:demo@r32-lr3e-4-drop0.05" in listed
    assert "package:demo@" not in listed, "a variant is not packaged without [models.select]"


def test_a_matrix_over_the_base_s_conversion_shares_nothing(tmp_path):
    spec = load_spec(_matrix_spec(tmp_path, '"outtype" = ["f16", "bf16"]\n'))
    assert [m.name for m in spec.models] == ["demo@outtypef16", "demo@outtypebf16"]
    assert not any(m.shares_base for m in spec.models)


@pytest.mark.parametrize("matrix, shared", [
    ('"train.lora.r" = [8, 32]\n', True),
    ('"train.seed" = [0, 1]\n', False),  # another held-out split
    ('"train.validation" = [0.25, 0.5]\n', False),
    ('"eval.max_prompts" = [2, 4]\n', False),
])
def test_what_is_made_from_the_data_alone_is_shared_while_the_variants_read_it_alike(tmp_path, matrix, shared):
    from stages.ground.task import ModelPaths

    spec = load_spec(_matrix_spec(tmp_path, matrix))
    for model in spec.models:
        paths = ModelPaths.of(spec, model)
        assert paths.data == (spec.cache / "demo" if shared else paths.root)
        assert paths.heldout == paths.data / "eval/heldout.jsonl" and paths.eval("base") == paths.data / "eval/base.json"
        assert paths.eval("Q8_0") == paths.root / "eval/Q8_0.json"


@pytest.mark.parametrize("matrix, extra, expected", [
    ('"train.lora.r" = [8, -1]\n', "",
     r"model demo@r-1 \(\[models.matrix\] train.lora.r = -1\): train.lora.r: Input should be greater than or equal to 1"),
    ('"train.lora.rank" = [8, 16]\n', "",
     r"model 'demo' \(every variant of its \[models.matrix\]\): unknown key 'train.lora.rank': did you mean 'r'\?"),
    ('"train.lora.r" = 8\n', "", r"\[models.matrix\] 'train.lora.r' must list the values to try"),
    ('"train.lora.r" = [8, 8]\n', "", r"\[models.matrix\] 'train.lora.r' lists 8 more than once"),
    ('"train.dataset.x" = [1]\n', "", r"key 'train.dataset.x' goes through 'train.dataset', which is a value"),
    ('"name" = ["a", "b"]\n', "", r"\[models.matrix\] cannot vary 'name'"),
    ('"train.lora.r" = [8]\n', '\n[models.select]\nvariant = "Q4_K_M"\n',
     r"select.variant = 'Q4_K_M' is not a release of this model; its releases are Q8_0, lora"),
])
def test_a_bad_matrix_names_the_key_and_the_combination(tmp_path, matrix, extra, expected):
    with pytest.raises(BuildError, match=expected):
        load_spec(_matrix_spec(tmp_path, matrix, extra))


def test_select_needs_a_matrix_and_at_only_separates_variants(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(BuildError, match=r"\[models.select\] chooses among the variants of a \[models.matrix\]"):
        load_spec(write_spec(tmp_path, MATRIX_MODEL + '\n[models.select]\nvariant = "Q8_0"\n'))
    with pytest.raises(BuildError, match=r"name 'de@mo': '@' separates a matrix variant's values"):
        load_spec(write_spec(tmp_path, MATRIX_MODEL.replace('name = "demo"', 'name = "de@mo"')))


def test_matrix_labels():
    from stages.ground.matrix import label_value

    assert [label_value(v) for v in (1e-4, 3e-4, 0.05, 2, 1e5, True, "data/mix-a.jsonl", ["Q4_K_M", "Q5_K_M"])] == \
        ["1e-4", "3e-4", "0.05", "2", "1e5", "on", "mix-a", "Q4_K_M+Q5_K_M"]
