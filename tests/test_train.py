"""train: PEFT LoRA training, on the real SmolLM2 and on tiny models, and its place in the graph."""

import json
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
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "", "data.jsonl:1: the last message must be the assistant's answer"),
    ("\n\n", "", "data.jsonl is empty: add JSONL records"),
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
    assert doit(spec).ran == ["train:m", "adapter:m", "merge:m", "convert:m", "convert:m-merged",
                              "quantize:m-merged-Q8_0", "eval:m.heldout", "eval:m.prompts", "eval:m-F16", "eval:m-Q8_0", "eval:m-base",
                              "eval:m-lora", "parity:m-Q8_0", "parity:m-lora", "package:m-Q8_0", "package:m-lora",
                              "manifest:m", "report"]
    spec.write_text(SPEC + "[models.train.lora]\nr = 4\n")
    assert doit(spec).ran == ["train:m", "adapter:m", "merge:m", "convert:m-merged", "quantize:m-merged-Q8_0",
                              "eval:m-F16", "eval:m-Q8_0", "eval:m-lora", "parity:m-Q8_0", "parity:m-lora",
                              "package:m-Q8_0", "package:m-lora", "manifest:m", "report"]
    with open(tmp_path / "data.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "Say 99.", "output": "Answer: 99."}) + "\n")
    assert doit(spec).ran[0] == "train:m", "a changed dataset retrains"
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
