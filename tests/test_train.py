"""train: PEFT LoRA training, on the real SmolLM2 and on tiny models, and its place in the graph."""

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import REPO, doit, leftovers, write_spec

from stages import train
from stages.formats import lora
from stages.ground.device import pick_device
from stages.ground.spec import TrainSpec

DEMO = REPO / "data" / "demo.jsonl"


def train_spec(**fields) -> TrainSpec:
    return TrainSpec.model_validate({"dataset": str(DEMO), **fields})


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / train.LOG).read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(default_build):
    """The default spec's fine-tune of the real SmolLM2 on the demo data (62 steps, validated every 10),
    as the tests' default build trained it (conftest.default_build)."""
    return default_build["cache"] / "adapter"


@pytest.mark.slow
def test_validation_loss_falls_on_the_demo_data(trained):
    log = read_log(trained)
    val = [row["val_loss"] for row in log if "val_loss" in row]
    assert [row["step"] for row in log if "val_loss" in row] == [0, 10, 20, 30, 40, 50, 60, 62]
    assert val[-1] < 0.8 * val[0], f"validation loss {val}"
    steps = [row for row in log if row["step"] > 0]
    assert len(steps) == 62
    assert all(row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0 and row["learning_rate"] >= 0 for row in steps)
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-demo" and config["r"] == 8
    assert sorted(p.name for p in trained.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", train.LOG]


@pytest.mark.slow
def test_resume_continues_from_the_previous_adapter(trained, default_build, tmp_path, capsys):
    out = tmp_path / "adapter"
    shutil.copytree(trained, out)
    train.run(default_build["cache"] / "base", out, train_spec(max_steps=2, resume=True), "smollm2-demo", threads=2)
    assert "resuming from the previous adapter" in capsys.readouterr().out
    # same adapter, same held-out records (the default spec's split): the resumed run starts where the last one ended
    assert read_log(out)[0]["val_loss"] == pytest.approx(read_log(trained)[-1]["val_loss"], abs=1e-5)


def test_cpu_training_is_deterministic(tiny_llama, tmp_path):
    spec = train_spec(max_steps=3, batch_size=4, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    for name in ("one", "two"):
        train.run(tiny_llama, tmp_path / name, spec, "tiny", threads=2)
    for name in lora.ADAPTER_FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_the_best_validation_loss_is_tracked():
    best, improved = train.track_best(None, 0, 3.0)
    assert best is None and not improved, "step 0, the base before any update, is not a candidate"
    best, improved = train.track_best(best, 1, 2.0)
    assert improved and best == {"step": 1, "val_loss": 2.0, "since": 0}
    best, improved = train.track_best(best, 2, 2.0)
    assert not improved and best["since"] == 1 and best["step"] == 1, "equal is not better"
    best, improved = train.track_best(best, 3, 1.5)
    assert improved and best["since"] == 0 and best["step"] == 3


@pytest.mark.slow
def test_early_stopping_keeps_the_best_step_and_is_the_run_cut_there(tiny_llama, tmp_path):
    """A constant, too high learning rate: the validation loss stops falling, patience ends the run,
    and keep = "best" saves the adapter of the lowest validation loss. With a constant schedule a run
    that simply ends at that step trains the same weights, so the two adapters are the same bytes."""
    options = dict(max_steps=40, batch_size=4, learning_rate=0.05, schedule="constant", eval_every=1, validation=0.25)
    stopped = train_spec(**options, early_stopping_patience=2, keep="best")
    train.run(tiny_llama, tmp_path / "stopped", stopped, "tiny", threads=2)
    log = read_log(tmp_path / "stopped")
    last = log[-1]
    assert last["stopped"].startswith("early: no lower validation loss in 2 evaluations") and last["step"] < 40
    validated = {r["step"]: r["val_loss"] for r in log if "val_loss" in r and r["step"] > 0}
    best = min(validated, key=lambda step: (validated[step], step))
    assert last.get("kept_step", last["step"]) == best and last["step"] == best + 2
    cut = train_spec(**options | {"max_steps": best})
    train.run(tiny_llama, tmp_path / "cut", cut, "tiny", threads=2)
    assert (tmp_path / "stopped" / lora.WEIGHTS).read_bytes() == (tmp_path / "cut" / lora.WEIGHTS).read_bytes()
    with pytest.raises(Exception, match="follow the validation loss, and no record is held out"):
        train_spec(validation=0, keep="best")
    assert "keep" not in train_spec().params() and train_spec(keep="best").params()["keep"] == "best"


def test_loss_is_on_the_answer_only(smollm_tokenizer):
    from transformers import AutoTokenizer

    from stages.formats.dataset import Example

    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer)
    example = Example(({"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Answer: Lima."}), "x:1")
    for template, answer in (("chat", "Answer: Lima.<|im_end|>\n"), ("alpaca", "Answer: Lima.<|im_end|>")):
        encoded = train.encode(example, tokenizer, template, None)
        answer_ids = [t for t, label in zip(encoded.ids, encoded.labels) if label != train.IGNORE]
        assert tokenizer.decode(answer_ids) == answer
        assert encoded.labels[: len(encoded.ids) - len(answer_ids)] == [train.IGNORE] * (len(encoded.ids) - len(answer_ids))
    chat = tokenizer.decode(train.encode(example, tokenizer, "chat", "Be terse.").ids)
    assert chat.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nCapital of Peru?")


SAME_CONVERSATIONS = {  # one system + two-turn conversation and one single-turn one, in every format
    "messages": [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of Peru?"},
                               {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"},
                               {"role": "assistant", "content": "Santiago."}]},
                 {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}],
    "sharegpt": [{"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "Capital of Peru?"},
                                    {"from": "gpt", "value": "Lima."}, {"from": "human", "value": "And Chile?"},
                                    {"from": "gpt", "value": "Santiago."}]},
                 {"conversations": [{"from": "user", "value": "2 + 2?"}, {"from": "assistant", "value": "4"}]}],
    "prompt_completion": [{"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of Peru?"},
                                      {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"}],
                           "completion": [{"role": "assistant", "content": "Santiago."}]},
                          {"prompt": "2 + 2?", "completion": "4"}],
}


@pytest.mark.parametrize("form", sorted(SAME_CONVERSATIONS))
def test_every_dataset_format_trains_on_the_same_tokens(form, smollm_tokenizer, tmp_path):
    """Each format, read from its file (detected, and named), gives the conversations of the messages
    format and so the same training rows: the same tokens, and loss on the same ones."""
    from transformers import AutoTokenizer

    from stages.formats import dataset

    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer)
    rows = {}
    for name in ("messages", form):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in SAME_CONVERSATIONS[name]))
        for named in ("auto", name):
            examples = dataset.read_jsonl(path, named)
            rows[name, named] = [(r.ids, r.labels) for r in (train.encode(e, tokenizer, "chat", None) for e in examples)]
    assert rows["messages", "auto"] == rows[form, "auto"] == rows[form, form]
    answer = [t for t, label in zip(*rows[form, "auto"][0]) if label != train.IGNORE]
    assert tokenizer.decode(answer) == "Santiago.<|im_end|>\n"
    alpaca = dataset.to_messages({"instruction": "Add.", "input": "2 and 2", "output": "4"}, "x:1")
    assert alpaca == ({"role": "user", "content": "Add.\n\n2 and 2"}, {"role": "assistant", "content": "4"})


def test_the_loss_preview_shows_what_training_sees_before_it_trains(tiny_llama, tmp_path):
    spec = workspace(tmp_path, tiny_llama, GOOD)
    ran = doit(spec, "train:m.preview").ran
    assert ran == ["train:m.preview"], "the preview is a task of its own, before training"
    page = (tmp_path / "cache/m/preview.html").read_text()
    assert "data.jsonl (training)" in page and "data.jsonl (validation)" in page and str(tmp_path) not in page
    first = page.index('<div class="record">')
    record = page[first:page.index("</div>", first)]
    marked = "".join(re.findall(r'<span class="t loss[^"]*">(.*?)</span>', record)).replace('<span class="nl">↵</span>', "")
    assert marked.startswith("Answer: ") and "Say" not in marked, "loss on the answer, not the prompt"
    share = re.search(r"carry loss \(<b>([0-9.]+)%</b>\)", page)
    assert share and 0 < float(share.group(1)) < 100


def test_a_template_that_writes_only_the_answer_is_refused_before_training(tiny_llama, tmp_path):
    spec = workspace(tmp_path, tiny_llama, GOOD)
    (tmp_path / "tiny/chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}")
    run = doit(spec, check=False)
    assert run.returncode != 0 and "Traceback" not in run.output
    assert "data.jsonl (training): every token of 6 records carries loss, though only the answers should" in run.output
    assert "train:m" not in run.ran and not (tmp_path / "cache/m/adapter").exists()


def test_a_source_without_loss_tokens_is_a_problem():
    from stages.formats import preview

    silent = preview.Source("d.jsonl (training)", 3, 30, 0, [])
    assert "no token of 3 records carries loss" in preview.problem(silent, answers_only=True)
    every = preview.Source("d.jsonl (training)", 3, 30, 30, [])
    assert preview.problem(every, answers_only=False) is None and preview.problem(every, answers_only=True)
    assert preview.problem(preview.Source("d", 3, 30, 10, []), answers_only=True) is None
    page = preview.render("t", [preview.Source("d", 1, 3, 1, [("d:1", [("<s>", False), ("a<b\n", True)])])])
    assert '<span class="t special">&lt;s&gt;</span>' in page and "a&lt;b" in page


def test_a_mix_gives_each_source_its_share_of_an_epoch():
    from stages.formats import dataset

    assert dataset.shares([0.5, 0.3, 0.2], 10) == [5, 3, 2]
    assert dataset.shares([1, 1, 1], 10) == [4, 3, 3], "largest remainder; ties to the earlier source"
    small = [dataset.Example((), f"b:{i}") for i in range(3)]
    big = [dataset.Example((), f"a:{i}") for i in range(30)]
    mixed = dataset.mix([big, small], [0.5, 0.5], seed=0)
    assert len(mixed) == 33 and sum(e.where.startswith("b:") for e in mixed) == 16  # 16.5 rounds to 16, a's 16.5 to 17
    uses = [sum(e.where == f"b:{i}" for e in mixed) for i in range(3)]
    assert max(uses) - min(uses) <= 1, "a small source is repeated in whole passes"
    taken_from_a = [e.where for e in mixed if e.where.startswith("a:")]
    assert len(set(taken_from_a)) == len(taken_from_a) == 17, "a large one is sampled without repeats"
    assert dataset.mix([big, small], [0.5, 0.5], seed=0) == mixed != dataset.mix([big, small], [0.5, 0.5], seed=1)


@pytest.mark.parametrize("table, expected", [
    ('dataset = "data.jsonl"\ndatasets = [{path = "data.jsonl"}]\n', "name the training data once"),
    ('datasets = []\n', "name the training data once"),
    ('datasets = [{path = "data.jsonl"}]\nvalidation = "data.jsonl"\n', "a validation file belongs to its source"),
    ('datasets = [{path = "data.jsonl"}, {path = "data.jsonl", weight = 2}]\n', "names the same file twice"),
    ('datasets = [{path = "data.jsonl", weight = 0}]\n', "weight"),
    ('datasets = [{path = "data.jsonl", weight = inf}]\n', "weight"),
    ('datasets = [{path = "missing.jsonl"}]\n', "missing.jsonl does not exist"),
    ('datasets = [{path = "data.jsonl", wieght = 2}]\n', "wieght"),
])
def test_a_bad_mix_is_refused_when_the_spec_loads(tmp_path, table, expected):
    from stages.ground.spec import load_spec

    (tmp_path / "data.jsonl").write_text(GOOD)
    (tmp_path / "tiny").mkdir()
    with pytest.raises(Exception) as err:
        load_spec(write_spec(tmp_path, f'[[models]]\nname = "m"\nbase = "tiny"\n[models.train]\n{table}'))
    assert expected in str(err.value)


def _source(name: str, count: int) -> str:
    return "".join(json.dumps({"instruction": f"{name} question {i}?", "input": "", "output": f"Answer: {name}{i}."}) + "\n"
                   for i in range(count))


MIX = """
[[models]]
name = "m"
base = "tiny"
quantize = ["Q8_0"]

[models.train]
max_steps = 30
batch_size = 4
max_seq_len = 64
validation = 0.1

[[models.train.datasets]]
path = "a.jsonl"
weight = 0.5

[[models.train.datasets]]
path = "b.jsonl"
weight = 0.3

[[models.train.datasets]]
path = "c.jsonl"
weight = 0.2
"""


@pytest.mark.slow
def test_a_weighted_mix_trains_on_its_shares(tiny_llama, tmp_path):
    """Three sources at 0.5/0.3/0.2 over 30 steps of 4 rows (1.67 epochs of 72 records): the rows the
    steps took match the weights within 0.05 (a whole epoch matches them to a record); the preview
    shows every source; changing one weight retrains."""
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    for name, count in (("a", 40), ("b", 10), ("c", 30)):
        (tmp_path / f"{name}.jsonl").write_text(_source(name, count))
    spec = write_spec(tmp_path, MIX)
    run = doit(spec, "train:m")
    assert "mix of 72 training records: a.jsonl 50.0% (36 records), b.jsonl 30.6% (22 records), c.jsonl 19.4% (14 records)" \
        in run.output
    log = read_log(tmp_path / "cache/m/adapter")
    assert log[0]["mix"] == {"a.jsonl": 36, "b.jsonl": 22, "c.jsonl": 14}
    taken = log[-1]["mix_trained"]
    assert sum(taken.values()) == 120
    for name, weight in (("a.jsonl", 0.5), ("b.jsonl", 0.3), ("c.jsonl", 0.2)):
        assert abs(taken[name] / 120 - weight) < 0.05, taken
    page = (tmp_path / "cache/m/preview.html").read_text()
    for name in ("a.jsonl (training)", "b.jsonl (training)", "c.jsonl (training)", "b.jsonl (validation)"):
        assert name in page
    before = (tmp_path / "cache/m/adapter" / lora.WEIGHTS).read_bytes()
    assert doit(spec, "train:m").ran == [], "the same spec: up to date"
    spec.write_text(MIX.replace("weight = 0.3", "weight = 0.4"))
    assert "train:m" in doit(spec, "train:m").ran, "a changed weight retrains"
    assert (tmp_path / "cache/m/adapter" / lora.WEIGHTS).read_bytes() != before
    spec.write_text(MIX)  # the same mix again: the same adapter bytes (restored by its key; test_cpu_training_is_
    doit(spec, "train:m")  # deterministic and the mix's own test show a retrain would write them too)
    assert (tmp_path / "cache/m/adapter" / lora.WEIGHTS).read_bytes() == before


def test_naming_the_format_does_not_change_the_train_key():
    assert train_spec(format="alpaca").params() == train_spec().params()


def test_packing_fills_rows_to_max_len():
    rows = [train.Encoded([1] * 5, [1] * 5), train.Encoded([2] * 7, [train.IGNORE] * 7)]
    packed = train.make_rows(rows, 4, packing=True)
    assert [len(r.ids) for r in packed] == [4, 4, 4]
    assert packed[1].ids == [1, 2, 2, 2] and packed[1].labels == [1, train.IGNORE, train.IGNORE, train.IGNORE]


SPEC = """
[[models]]
name = "m"
base = "tiny"
quantize = ["Q8_0"]

[models.train]
dataset = "data.jsonl"
validation = 0.25
max_steps = 2
batch_size = 4
"""


def workspace(tmp_path, tiny_llama, data: str, extra: str = "") -> Path:
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "data.jsonl").write_text(data)
    return write_spec(tmp_path, SPEC + extra)


GOOD = "".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"Answer: {i}."}) + "\n" for i in range(8))


@pytest.mark.parametrize("data, extra, expected", [
    (GOOD.splitlines()[0] + "\n{not json\n", "", "data.jsonl:2: not valid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "Say hi."}\n', "", "data.jsonl:2: missing 'output' (a string)"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "", "data.jsonl:1: the last turn must be the assistant's answer"),
    ("\n\n", "", "data.jsonl is empty: add JSONL records"),
    (GOOD.splitlines()[0] + '\n{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n',
     "", "data.jsonl:2: sharegpt record ({\"conversations\": [{\"from\", \"value\"}, ...]}) in a file of alpaca "
     "records, as its first record (" ),
    (GOOD, 'format = "sharegpt"\n', "data.jsonl:1: alpaca record ({\"instruction\", \"input\", \"output\"}) in a file of sharegpt records, as the spec's format says"),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]}\n', "",
     "data.jsonl:1: conversations[1] needs \"from\" (human, user, gpt"),
    ('{"question": "hi", "answer": "yo"}\n', "", "data.jsonl:1: not a record of a known format (keys: answer, question)"),
    ('{"prompt": "hi", "completion": ["yo"]}\n', "", "'prompt' and 'completion' must both be strings, or both lists"),
    pytest.param(GOOD, "max_seq_len = 8\n", "every training record is longer than max_seq_len = 8 tokens",
                 marks=pytest.mark.slow),  # found once training has loaded the model
    pytest.param(GOOD, '[models.train.lora]\ntarget_modules = ["q_proj", "qkv_proj"]\n',
                 "lora.target_modules qkv_proj are not in", marks=pytest.mark.slow),
])
def test_bad_training_input_fails_cleanly(tiny_llama, tmp_path, data, extra, expected):
    result = doit(workspace(tmp_path, tiny_llama, data, extra), check=False)
    assert result.returncode != 0
    assert expected in result.output, result.output[-2000:]
    assert "Traceback" not in result.output
    assert not (tmp_path / "cache/m/adapter").exists() and leftovers(tmp_path / "cache") == []


@pytest.mark.slow
def test_unknown_target_module_lists_the_real_ones(tiny_llama, tmp_path):
    spec = workspace(tmp_path, tiny_llama, GOOD, '[models.train.lora]\ntarget_modules = ["qkv_proj"]\n')
    output = doit(spec, check=False).output
    assert "its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in output


@pytest.mark.slow
def test_changing_lora_settings_reruns_train_and_what_follows_only(tiny_llama, tmp_path):
    spec = workspace(tmp_path, tiny_llama, GOOD)
    assert doit(spec).ran == ["train:m.preview", "train:m", "adapter:m", "merge:m", "convert:m", "convert:m-merged",
                              "quantize:m-merged-Q8_0", "eval:m.heldout", "eval:m.prompts", "eval:m-F16", "eval:m-Q8_0", "eval:m-base",
                              "eval:m-lora", "parity:m-Q8_0", "parity:m-lora", "package:m-Q8_0", "package:m-lora",
                              "manifest:m", "report"]
    spec.write_text(SPEC + "[models.train.lora]\nr = 4\n")
    assert doit(spec).ran == ["train:m", "adapter:m", "merge:m", "convert:m-merged", "quantize:m-merged-Q8_0",
                              "eval:m-F16", "eval:m-Q8_0", "eval:m-lora", "parity:m-Q8_0", "parity:m-lora",
                              "package:m-Q8_0", "package:m-lora", "manifest:m", "report"]
    with open(tmp_path / "data.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "Say 99.", "output": "Answer: 99."}) + "\n")
    assert doit(spec).ran[:2] == ["train:m.preview", "train:m"], "a changed dataset retrains"
    assert doit(spec).ran == []
    sums = (tmp_path / "cache/m/SHA256SUMS").read_text()
    assert "adapter/adapter_model.safetensors" in sums and "train_log" not in sums


def test_device_and_dtype_choice():
    import torch

    assert pick_device("cpu") == "cpu" and pick_device("mps") == "mps"
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert pick_device("auto") == "cpu"
    assert train.pick_dtype("auto", "cpu") is torch.float32
    assert train.pick_dtype("auto", "mps") is torch.float16
    assert train.pick_dtype("bfloat16", "cpu") is torch.bfloat16


def test_a_diverging_run_stops_at_that_step_with_the_loss_and_what_to_try(tiny_llama, tmp_path):
    """An absurd learning rate blows the loss up within a few steps: training stops there, naming the
    step, the loss and the setting to change, instead of writing an adapter of NaNs that llama.cpp's
    quantizer would reject at the end of the build."""
    from stages.ground.errors import BuildError

    with pytest.raises(BuildError) as err:
        train.run(tiny_llama, tmp_path / "adapter", train_spec(max_steps=20, batch_size=4, learning_rate=1e30), "tiny",
                  threads=2)
    message = str(err.value)
    assert message.startswith("train tiny: the loss is ") and "training diverged" in message, message
    step = int(message.split(" at step ")[1].split(" ")[0])
    assert 1 < step < 20 and "lower learning_rate in [models.train] (now 1e+30" in message
    assert "add warmup_steps" in message
    assert not (tmp_path / "adapter").exists() and list(tmp_path.iterdir()) == []


def test_a_base_or_adapter_holding_nan_is_refused_where_it_enters(tiny_llama, tmp_path):
    """Broken weights are named (file and tensor) by the stage that first reads them: train and convert
    for a base, every stage that loads an adapter for an adapter."""
    import torch
    from safetensors.torch import load_file, save_file

    from stages import convert
    from stages.ground.errors import BuildError

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    weights = load_file(base / "model.safetensors")
    poisoned = "model.layers.1.mlp.up_proj.weight"
    weights[poisoned][3, 5] = float("nan")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuildError) as err:
        train.run(base, tmp_path / "adapter", train_spec(max_steps=1), "tiny", threads=2)
    assert f"{base}: tensor '{poisoned}' holds NaN or infinite values" in str(err.value)
    with pytest.raises(BuildError) as err:
        convert.run(base, tmp_path / "m.gguf", "f16", "tiny")
    assert f"{base / 'model.safetensors'}: tensor '{poisoned}' holds NaN or infinite values" in str(err.value)
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "adapter").exists()

    adapter = tmp_path / "good-adapter"
    train.run(tiny_llama, adapter, train_spec(max_steps=1), "tiny", threads=2)
    tensors = load_file(adapter / lora.WEIGHTS)
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("inf")
    save_file(tensors, adapter / lora.WEIGHTS)
    with pytest.raises(BuildError) as err:
        lora.load(adapter)
    assert f"{adapter}: tensor '{name}' holds NaN or infinite values" in str(err.value)
    assert "train it again with a lower learning rate" in str(err.value)
    assert torch.isinf(load_file(adapter / lora.WEIGHTS)[name]).any()  # refused, not repaired


def test_a_base_without_a_chat_template_gets_a_clear_choice(tiny_llama, tmp_path):
    """A GGUF from outside (a Gemma 3 270M, say) may bring no chat template: template = "chat" is refused
    when the spec loads, naming the way out, and template = "alpaca" makes a graph that trains."""
    from transformers import AutoTokenizer

    from stages import convert
    from stages.ground.errors import BuildError

    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    convert.run(bare, tmp_path / "bare.gguf", "f16", "bare")
    (tmp_path / "data.jsonl").write_text(GOOD)
    spec = '[[models]]\nname = "m"\nbase = "bare.gguf"\n[models.train]\ndataset = "data.jsonl"\nmax_steps = 1\n'
    refused = doit(write_spec(tmp_path, spec), command="list", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.output
    assert f"model 'm': its base bare.gguf has no chat template, and [models.train] template = \"chat\"" in refused.output
    assert 'set template = "alpaca" in [models.train]' in refused.output
    assert "train:m" in doit(write_spec(tmp_path, spec + 'template = "alpaca"\n'), command="list").output

    tokenizer = AutoTokenizer.from_pretrained(bare)  # the same refusal where the graph could not look (a hub base)
    example = GOOD.splitlines()[0]
    from stages.formats.dataset import Example, to_messages

    with pytest.raises(BuildError) as err:
        train.encode(Example(to_messages(json.loads(example), "x:1"), "x:1"), tokenizer, "chat", None)
    assert "has no chat template" in str(err.value)


@pytest.mark.parametrize("arch, options", [("llama", {}), ("mixtral", {"output_router_logits": True})])
def test_the_sft_loss_is_transformers_loss_with_logits_only_where_a_label_follows(arch, options, request):
    """train.sft_loss projects only the positions whose next token is a label in some row; the loss and
    the gradients are those of transformers' own loss from `labels`, which projects every position (and,
    for a mixture of experts that returns its routers' logits, adds their load-balancing loss)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(f"tiny_{arch}"), dtype=torch.float32, **options)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    ignore = train.IGNORE
    rows = [  # answers in different places, rows of different lengths (padded), and a row with no answer
        train.Encoded([5, 6, 7, 8, 9, 10, 11, 12], [ignore] * 5 + [10, 11, 12]),
        train.Encoded([13, 14, 15, 16, 17], [ignore, ignore, 15, 16, ignore]),
        train.Encoded([18, 19, 20], [ignore] * 3)]
    tensors = train.collate(rows, pad_id=0)
    gradients = []
    for loss_of in (lambda: model(**tensors).loss, lambda: train.sft_loss(model, tensors)):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        gradients.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (theirs, their_grads), (ours, our_grads) = gradients
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(our_grads, their_grads))
