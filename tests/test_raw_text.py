"""Raw text for continued pretraining: {"text"} records or a .txt file, trained on every token,
packed; the preview shows it as such, and the eval, parity and calibration take it as text."""

import json
import re

import pytest
from helpers import doit, write_spec
from test_train import SPEC

from stages import train
from stages.formats import dataset
from stages.ground.errors import BuildError

CORPUS = "\n\n".join(f"Document {i}: the river Limmat flows through Zürich, and document {i} says so twice." * 2
                     for i in range(12)) + "\n"


def test_a_txt_file_is_documents_between_blank_lines_and_a_text_record_is_one(tmp_path):
    (tmp_path / "c.txt").write_text("First line.\nsecond line.\n\n\n  \nNext document.\n")
    docs = dataset.read_jsonl(tmp_path / "c.txt")
    assert [(d.text, d.where.rsplit(":", 1)[1], d.messages) for d in docs] == [
        ("First line.\nsecond line.", "1", ()), ("Next document.", "6", ())]
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "One."}) + "\n")
    assert dataset.read_jsonl(tmp_path / "t.jsonl")[0].text == "One." and dataset.file_format(tmp_path / "t.jsonl") == "text"
    for text, expected in ((json.dumps({"text": "a"}) + "\n" + json.dumps({"instruction": "b", "output": "c"}) + "\n",
                            "t.jsonl:2: alpaca record"),
                           (json.dumps({"text": "  "}) + "\n", "t.jsonl:1: 'text' must be a non-empty string")):
        (tmp_path / "t.jsonl").write_text(text)
        with pytest.raises(BuildError, match=expected):
            dataset.read_jsonl(tmp_path / "t.jsonl")
    with pytest.raises(BuildError, match=r"c.txt is a .txt file, which is raw text, and the spec's format says alpaca"):
        dataset.read_jsonl(tmp_path / "c.txt", "alpaca")


def test_raw_text_carries_loss_on_every_token_and_is_packed_into_full_rows(smollm_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer)
    (tmp_path / "c.txt").write_text(CORPUS)
    docs = dataset.read_jsonl(tmp_path / "c.txt")
    encoded = train.encode(docs[0], tokenizer, "chat", "A system prompt raw text never gets.")
    assert encoded.labels == encoded.ids and encoded.ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded.ids[:-1]) == docs[0].text, "the text alone: no chat template, no system prompt"
    spec = train.TrainSpec.model_validate({"dataset": str(tmp_path / "c.txt"), "validation": 0.0, "max_seq_len": 32})
    rows, _ = train._rows(spec, tokenizer, train.split_examples(spec))
    total = sum(len(train.encode(d, tokenizer, "chat", None).ids) for d in docs)
    assert all(len(r.ids) == 32 for r in rows[:-1]) and sum(len(r.ids) for r in rows) == total, \
        "packed though packing = false: documents longer than a row are trained on whole"


@pytest.mark.slow
def test_raw_text_alone_and_mixed_with_conversations_builds_through_every_stage(tiny_llama, tmp_path):
    """One build of two models: raw text mixed with conversations, and raw text alone."""
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "corpus.txt").write_text(CORPUS)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"Answer: {i}."}) + "\n"
                                                 for i in range(12)))
    spec = write_spec(tmp_path, """
[[models]]
name = "m"
base = "tiny"

[models.train]
max_steps = 2
batch_size = 4
max_seq_len = 64

[[models.train.datasets]]
path = "chat.jsonl"
weight = 0.5
validation = 0.25

[[models.train.datasets]]
path = "corpus.txt"
weight = 0.5
validation = 0.25

[models.quantize]
types = ["Q8_0"]
imatrix = true
""" + SPEC.replace('name = "m"', 'name = "text"').replace("data.jsonl", "corpus.txt") + "max_seq_len = 64\n")
    ran = doit(spec).ran
    assert {"train:m", "package:m-Q8_0", "train:text", "parity:text-Q8_0", "report"} <= set(ran)
    page = (tmp_path / "cache/m/preview.html").read_text()
    assert re.search(r"corpus.txt \(training\).*?carry loss \(<b>100.0%</b>\)", page, re.S), "all of the text carries loss"
    heldout = [json.loads(line) for line in (tmp_path / "cache/m/eval/heldout.jsonl").read_text().splitlines()]
    assert any(r["prompt"] == "" and r["answer"].startswith("Document ") for r in heldout)
    prompts = [json.loads(line) for line in (tmp_path / "cache/m/eval/prompts.jsonl").read_text().splitlines()]
    assert prompts and all(p["answer"].startswith("Answer: ") for p in prompts), "only conversations are asked"
    assert "the river Limmat" in (tmp_path / "cache/m/imatrix/calibration.txt").read_text()

    assert "eval:text.prompts" not in ran, "raw text alone holds no question to answer"
    result = json.loads((tmp_path / "cache/text/eval/Q8_0.json").read_text())
    assert result["quality"]["perplexity"] > 0 and "accuracy" not in result
