"""Preference tuning (method = "dpo" | "orpo"): the records, the losses held to TRL's own on the same
batch, and whole builds in which DPO continues an SFT adapter and raises held-out preference accuracy."""

import json
import math
import shutil

import pytest
from helpers import doit, write_spec

from stages import train
from stages.formats import dataset
from stages.ground.errors import BuildError
from stages.ground.spec import TrainSpec
from stages.training import preference

ASK = [{"role": "user", "content": "What is 2 + 3?"}]


def read(tmp_path, records, name="pairs.jsonl"):
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return dataset.read_jsonl(tmp_path / name)


def test_every_shape_of_a_preference_record_reads_as_the_same_pair(tmp_path):
    shapes = [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},  # TRL's standard
        {"prompt": ASK, "chosen": [{"role": "assistant", "content": "5"}],  # TRL's conversational
         "rejected": [{"role": "assistant", "content": "6"}]},
        {"messages": ASK, "chosen": {"role": "assistant", "content": "5"}, "rejected": "6"},
        {"chosen": ASK + [{"role": "assistant", "content": "5"}],  # implicit prompt: two whole conversations
         "rejected": ASK + [{"role": "assistant", "content": "6"}]},
    ]
    for example in read(tmp_path, shapes):
        assert example.is_preference and not example.is_text
        assert example.messages == (ASK[0], {"role": "assistant", "content": "5"})
        assert example.rejected == {"role": "assistant", "content": "6"}
    assert dataset.file_format(tmp_path / "pairs.jsonl") == "preference"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Q?", "chosen": "a"}, r"pairs.jsonl:1: a preference record needs \"rejected\""),
    ({"prompt": "Q?", "chosen": "a", "rejected": 3}, r"pairs.jsonl:1: 'rejected' must be the answer"),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, r"'chosen' must be the answer"),
    ({"chosen": ASK + [{"role": "assistant", "content": "5"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "6"}]},
     r"must be the same up to their last turn"),
])
def test_a_broken_pair_is_refused_naming_its_line(tmp_path, record, message):
    with pytest.raises(BuildError, match=message):
        read(tmp_path, [record])


def test_pairs_train_only_with_a_preference_method_and_sft_records_only_without(tmp_path):
    read(tmp_path, [{"prompt": "Q?", "chosen": "a", "rejected": "b"}] * 4)
    read(tmp_path, [{"instruction": "Q?", "output": "a"}] * 4, "sft.jsonl")
    pairs, sft = (TrainSpec.model_validate({"dataset": str(tmp_path / name), "method": method, "validation": 0.25})
                  for name, method in (("pairs.jsonl", "sft"), ("sft.jsonl", "dpo")))
    with pytest.raises(BuildError, match=r"pairs.jsonl:\d: a preference record .* method = \"sft\"; train on pairs with"):
        train.split_examples(pairs)
    with pytest.raises(BuildError, match=r"sft.jsonl:\d: method = \"dpo\" trains on preference records"):
        train.split_examples(sft)
    with pytest.raises(ValueError, match="packing does not apply"):
        TrainSpec.model_validate({"dataset": str(tmp_path / "pairs.jsonl"), "method": "orpo", "packing": True})


def _pairs(tokenizer, tmp_path):
    """Four pairs as the train stage encodes them, with answers of different lengths (padding must not count)."""
    records = [{"prompt": f"What is {a} + {b}?", "chosen": f"It is {a + b}.", "rejected": f"Maybe {a * b}, or {a - b} {'?' * a}"}
               for a, b in ((2, 3), (7, 1), (4, 4), (9, 6))]
    return [train.encode_pair(e, tokenizer, "chat", None) for e in read(tmp_path, records)]


@pytest.fixture
def policy(tiny_llama):
    """The tiny model, and a LoRA whose B starts random (PEFT's starts at zero), so that the policy is not its
    reference. TRL adds the LoRA itself: a model handed over with its adapter would be taken as one to
    re-train, and TRL would hold it near a copy of that adapter instead of the adapter disabled."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")


def test_dpo_loss_and_rewards_equal_trls_on_the_same_batch(policy, tiny_llama, tmp_path, monkeypatch):
    """TRL's DPOTrainer, given the same weights (a new adapter, so its reference is the adapter disabled)
    and the same rows, computes the same loss; float32, relative tolerance 1e-5."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    pairs = _pairs(tokenizer, tmp_path)
    batch = train.collate_pairs(pairs, tokenizer.pad_token_id)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, beta=0.1, loss_type="sigmoid",
                     gradient_checkpointing=False, report_to="none")
    trainer = DPOTrainer(model=policy[0], peft_config=policy[1], args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]))
    examples = [{"prompt_ids": p.chosen.ids[:p.chosen.labels.count(train.IGNORE)],
                 "chosen_ids": p.chosen.ids[p.chosen.labels.count(train.IGNORE):],
                 "rejected_ids": p.rejected.ids[p.rejected.labels.count(train.IGNORE):]} for p in pairs]
    trl_batch = trainer.data_collator(examples)
    assert torch.equal(trl_batch["input_ids"], batch["input_ids"]), "TRL lays a batch out as collate_pairs does"
    model = trainer.model
    model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, trl_batch)
        with model.disable_adapter():
            reference, _ = preference.sequence_logps(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        ours = preference.dpo(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"], reference, 0.1)
    assert abs(float(ours.loss) - math.log(2)) > 0.01, "the policy must differ from the reference for this to bite"
    assert float(ours.loss) == pytest.approx(float(trl_loss), rel=1e-5)
    logged = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}
    mine = ours.metrics()
    for key, trl_key in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                         ("rewards_margin", "rewards/margins")):
        assert mine[key] == pytest.approx(logged[trl_key], rel=1e-4, abs=1e-6), key


def test_orpo_loss_equals_trls_on_the_same_batch(policy, tiny_llama, tmp_path, monkeypatch):
    """TRL's ORPOTrainer (trl.experimental.orpo): the chosen rows' NLL minus λ log σ(log odds ratio)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    pairs = _pairs(tokenizer, tmp_path)
    batch = train.collate_pairs(pairs, tokenizer.pad_token_id)
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, beta=0.25,
                      gradient_checkpointing=False, report_to="none")
    trainer = ORPOTrainer(model=policy[0], peft_config=policy[1], args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]))
    width, half = batch["input_ids"].shape[1], len(pairs)
    trl_batch = {f"{side}_{key}": batch[name][rows] for side, rows in (("chosen", slice(0, half)), ("rejected", slice(half, None)))
                 for key, name in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"), ("labels", "labels"))}
    assert all(v.shape[1] == width for v in trl_batch.values())
    with torch.no_grad():
        trl_loss, metrics = trainer.get_batch_loss_metrics(trainer.model, trl_batch)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ours = preference.orpo(logits, batch["labels"], batch["input_ids"], batch["attention_mask"], 0.25)
    assert float(ours.loss) == pytest.approx(float(trl_loss), rel=1e-5)
    assert ours.metrics()["rewards_margin"] == pytest.approx(metrics["rewards/margins"], rel=1e-4, abs=1e-6)
    assert ours.metrics()["rewards_accuracy"] == pytest.approx(metrics["rewards/accuracies"])


def test_a_gate_on_preference_accuracy_names_the_share_it_saw():
    from stages.evaluate import gate_failures
    from stages.ground.spec import GateSpec

    gate = GateSpec(min_preference_accuracy=0.9)
    assert gate_failures({"preference": {"pairs": 12, "accuracy": 0.75, "mean_logp_margin": 0.1}}, gate) == [
        "it prefers the chosen answer in 75.00% of 12 held-out pairs, under min_preference_accuracy = 0.9"]
    assert gate_failures({"preference": {"pairs": 12, "accuracy": 0.95, "mean_logp_margin": 0.1}}, gate) == []
    assert gate_failures({}, gate) == ["it has no held-out preference pairs to gate on"]


TWO_MODELS = """
[[models]]
name = "sft"
base = "tiny"

[models.train]
dataset = "data.jsonl"
max_steps = 2

[[models]]
name = "dpo"
base = "tiny"
quantize = ["Q8_0"]

[models.train]
dataset = "pairs.jsonl"
method = "dpo"
start_from = "sft"
"""


@pytest.mark.parametrize("change, message", [
    (('start_from = "sft"', 'start_from = "nope"'), r"start_from = 'nope' names no model of this spec that trains \(those that do: sft\)"),
    (('start_from = "sft"', 'start_from = "sft"\n[models.train.lora]\nr = 4'), r"give this model the same lora settings"),
    (('max_steps = 2', 'max_steps = 2\nstart_from = "dpo"'), r"start_from goes round in a circle \(sft → dpo → sft\)"),
    (('quantize = ["Q8_0"]', 'quantize = ["Q8_0"]\n[models.eval.gate.Q8_0]\nmin_preference_accuracy = 0.8'), None),
    (('[[models]]\nname = "dpo"', '[models.eval.gate.lora]\nmin_preference_accuracy = 0.8\n[[models]]\nname = "dpo"'),
     r"eval.gate.lora.min_preference_accuracy gates on held-out preference pairs, and this model has none"),
])
def test_start_from_and_the_preference_gate_are_checked_when_the_spec_loads(tiny_llama, tmp_path, change, message):
    from stages.ground.spec import load_spec

    (tmp_path / "tiny").symlink_to(tiny_llama)
    (tmp_path / "data.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    spec = write_spec(tmp_path, TWO_MODELS.replace(*change))
    if message is None:
        assert load_spec(spec).models[1].eval.gate["Q8_0"].min_preference_accuracy == 0.8
        return
    with pytest.raises(BuildError, match=message):
        load_spec(spec)


def preference_pairs(count: int) -> str:
    """Sums answered plainly (chosen) or guessed at (rejected): a style a tiny model learns from a few steps."""
    import random

    rng = random.Random(0)
    return "".join(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"It is {a + b}.",
                               "rejected": f"Maybe {a * b}, who knows"}) + "\n"
                   for a, b in ((rng.randint(1, 50), rng.randint(1, 50)) for _ in range(count)))


def test_orpo_from_the_base_raises_held_out_preference_accuracy(tiny_llama, tmp_path):
    """ORPO needs no reference: 12 steps on the base take the held-out pairs from a coin toss to all won."""
    (tmp_path / "pairs.jsonl").write_text(preference_pairs(48))
    spec = TrainSpec.model_validate({"dataset": str(tmp_path / "pairs.jsonl"), "method": "orpo", "validation": 0.25,
                                     "max_steps": 12, "eval_every": 6, "batch_size": 4, "learning_rate": 1e-2,
                                     "max_seq_len": 64})
    train.run(tiny_llama, tmp_path / "adapter", spec, "m", threads=1)
    log = [json.loads(line) for line in (tmp_path / "adapter" / train.LOG).read_text().splitlines()]
    assert log[0]["val_preference_accuracy"] <= 0.5 and log[-1]["val_preference_accuracy"] == 1.0, (log[0], log[-1])
    assert log[-1]["val_loss"] < log[0]["val_loss"] and log[-1]["rewards_margin"] > 0


@pytest.mark.slow
def test_dpo_continues_an_sft_adapter_and_raises_held_out_preference_accuracy(tiny_llama, tmp_path):
    """One build: SFT, then DPO on top of it (start_from), released; the held-out pairs' preference
    accuracy, measured by llama.cpp on the quantized release, rises well above the base's and passes
    its gate; the train log holds TRL's rewards."""
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"Answer: {i}."}) + "\n"
                                                 for i in range(8)))
    (tmp_path / "pairs.jsonl").write_text(preference_pairs(48))
    preference_table = """
[models.train]
dataset = "pairs.jsonl"
method = "{method}"
validation = 0.25
max_steps = 12
eval_every = 6
batch_size = 4
learning_rate = 1e-2
max_seq_len = 64
{extra}
[models.eval.gate.Q8_0]
min_preference_accuracy = 0.9
"""
    spec = write_spec(tmp_path, TWO_MODELS.split('[models.train]\ndataset = "pairs.jsonl"')[0]
                      + preference_table.format(method="dpo", extra='start_from = "sft"'))
    ran = doit(spec).ran
    assert ran.index("train:sft") < ran.index("train:dpo"), "DPO continues the SFT adapter, so it trains after it"
    assert {"package:dpo-Q8_0", "report"} <= set(ran), "it passes its preference gate"
    log = [json.loads(line) for line in (tmp_path / "cache/dpo/adapter/train_log.jsonl").read_text().splitlines()]
    assert log[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6), "DPO's reference is the policy as it starts"
    assert log[-1]["val_preference_accuracy"] >= log[0]["val_preference_accuracy"] + 0.5, log[0]
    assert {"rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"} <= set(log[-1])
    shipped = json.loads((tmp_path / "cache/dpo/eval/Q8_0.json").read_text())["preference"]
    base = json.loads((tmp_path / "cache/dpo/eval/base.json").read_text())["preference"]
    print(f"held-out preference accuracy: base {base['accuracy']:.0%}, DPO's Q8_0 {shipped['accuracy']:.0%} "
          f"of {shipped['pairs']} pairs")
    assert shipped["pairs"] == base["pairs"] == 12
    assert shipped["accuracy"] >= 0.9 and shipped["accuracy"] >= base["accuracy"] + 0.5, (shipped, base)
    report = (tmp_path / "cache/report/REPORT.md").read_text()
    assert "Held-out preference pairs" in report and "prefers chosen ≥ 90%" in report


@pytest.mark.slow
def test_a_killed_dpo_run_resumes_with_its_reference_to_the_same_adapter_bytes(tiny_llama, tmp_path):
    """The reference's log-probabilities are scored at step 0 and travel in the checkpoints: scored again
    from the half-trained adapter, they would hold the run near the wrong model."""
    from test_training import adapter_bytes, build, kill_during_training, spec_text

    options = dict(method="dpo", checkpoint_every=3, max_steps=12, max_seq_len=64)

    def workspace(folder):
        shutil.copytree(tiny_llama, folder / "tiny")
        (folder / "data.jsonl").write_text(preference_pairs(48))
        return write_spec(folder, spec_text(**options))

    build(workspace(tmp_path / "whole"), "train")
    expected = adapter_bytes(tmp_path / "whole")
    folder = tmp_path / "killed"
    spec = workspace(folder)
    kill_during_training(spec, folder, 0.3)
    output = build(spec, "train").stdout
    assert "continuing from the checkpoint at step" in output, "the kill landed after a checkpoint"
    assert adapter_bytes(folder) == expected, "the resumed DPO run wrote another adapter"


def test_the_preview_shows_both_answers_of_a_pair_with_only_their_tokens_carrying_loss(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    read(tmp_path, [{"prompt": "What is 2 + 3?", "chosen": "It is 5.", "rejected": "Maybe 6, who knows"}] * 4)
    spec = TrainSpec.model_validate({"dataset": str(tmp_path / "pairs.jsonl"), "method": "dpo", "validation": 0.25})
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    training = train.preview_sources(spec, tokenizer, {})[0]
    labels = [label for label, _ in training.examples]
    assert len(labels) == train.PREVIEWED and training.records == 3
    assert [label.replace("chosen", "rejected") for label in labels[0:4:2]] == labels[1:4:2], "a pair's rows side by side"
    for label, tokens in training.examples[:2]:
        answer = "It is 5." if "chosen" in label else "Maybe 6, who knows"
        assert "".join(text for text, carries in tokens if carries).startswith(answer), label
        assert "What is 2 + 3?" in "".join(text for text, carries in tokens if not carries)
