"""Tool definitions and tool calls in the training data, written through the chat template's own
tools support (Qwen2.5's template, as llama.cpp's pinned source holds it: tests/golden/templates/)."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import doit, write_spec
from test_train import SPEC

from stages import train
from stages.formats import dataset
from stages.ground.errors import BuildError

QWEN25 = Path(__file__).parent / "golden/templates/qwen2.5.jinja"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def call_record(i: int) -> dict:
    """A user asks, the model calls the tool, the tool answers, the model answers: OpenAI's format
    (the arguments as JSON text, as OpenAI's API writes them)."""
    return {"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"Weather in city {i}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": f"city {i}"})}}]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"celsius": i})},
        {"role": "assistant", "content": f"It is {i} degrees."}]}


def first_call(i: int) -> dict:
    """The same conversation up to the call: the call itself is the answer trained on."""
    record = call_record(i)
    return {"tools": record["tools"], "messages": record["messages"][:2]}


def sharegpt_call(i: int) -> dict:
    """LLaMA-Factory's ShareGPT with tools: function_call and observation turns, tools as JSON text."""
    return {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": f"Weather in city {i}?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": f"city {i}"}})},
        {"from": "observation", "value": json.dumps({"celsius": i})},
        {"from": "gpt", "value": f"It is {i} degrees."}]}


@pytest.fixture
def qwen_tokenizer(smollm_tokenizer, tmp_path):
    """SmolLM2's tokenizer (ChatML's tokens) with Qwen2.5's tool-aware template."""
    from transformers import AutoTokenizer

    folder = tmp_path / "qwen-template"
    shutil.copytree(smollm_tokenizer, folder)
    (folder / "chat_template.jinja").write_text(QWEN25.read_text())
    return AutoTokenizer.from_pretrained(folder)


def read(tmp_path: Path, records: list[dict], name: str = "data.jsonl") -> list[dataset.Example]:
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return dataset.read_jsonl(tmp_path / name)


def test_tools_and_calls_are_read_and_normalized_as_templates_take_them(tmp_path):
    example = read(tmp_path, [call_record(3)])[0]
    assert example.tools == (WEATHER,) and example.uses_tools
    call = example.messages[1]
    assert call == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "city 3"}}}]}
    assert example.messages[2] == {"role": "tool", "content": '{"celsius": 3}', "tool_call_id": "c3"}
    shared = read(tmp_path, [sharegpt_call(3)], "sharegpt.jsonl")[0]
    assert shared.tools == example.tools and [t["role"] for t in shared.messages] == ["user", "assistant", "tool", "assistant"]
    assert shared.messages[1]["tool_calls"] == call["tool_calls"]
    assert not read(tmp_path, [{"instruction": "a", "output": "b"}])[0].uses_tools
    for bad, expected in (({"tools": "not json", "messages": call_record(1)["messages"]}, "'tools' must be a list"),
                          ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                                           "tool_calls": [{"function": {"arguments": "{}"}}]}]},
                           "a tool call is")):
        with pytest.raises(BuildError, match=expected):
            read(tmp_path, [bad])


def test_a_tool_call_is_the_answer_trained_on_with_the_tools_in_the_prompt(qwen_tokenizer, tmp_path):
    first, whole = read(tmp_path, [first_call(7), call_record(7)])
    encoded = train.encode(first, qwen_tokenizer, "chat", None)
    answer = qwen_tokenizer.decode([t for t, label in zip(encoded.ids, encoded.labels) if label != train.IGNORE])
    assert answer == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "city 7"}}\n</tool_call><|im_end|>\n'
    prompt = qwen_tokenizer.decode([t for t, label in zip(encoded.ids, encoded.labels) if label == train.IGNORE])
    assert "# Tools" in prompt and '"name": "get_weather"' in prompt and prompt.endswith("<|im_start|>assistant\n")
    encoded = train.encode(whole, qwen_tokenizer, "chat", None)
    answer = qwen_tokenizer.decode([t for t, label in zip(encoded.ids, encoded.labels) if label != train.IGNORE])
    assert answer == "It is 7 degrees.<|im_end|>\n"
    prompt = qwen_tokenizer.decode(encoded.ids)
    assert "<tool_response>\n{\"celsius\": 7}\n</tool_response>" in prompt, "the tool's result, as the template writes it"


def test_a_template_without_tool_support_is_refused_naming_the_record(smollm_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    smollm = AutoTokenizer.from_pretrained(smollm_tokenizer)  # SmolLM2's template has no tools
    plain = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    example = read(tmp_path, [plain, call_record(1)])[1]
    with pytest.raises(BuildError, match=r"data.jsonl:2: the conversation has tools and tool_calls, which the base "
                                         r"model's chat template never reads"):
        train.encode(example, smollm, "chat", None)
    with pytest.raises(BuildError, match=r"data.jsonl:2: a conversation with tools, which the Alpaca format cannot write"):
        train.encode(example, smollm, "alpaca", None)


@pytest.mark.slow
def test_tool_calling_data_builds_and_its_conversations_stay_out_of_the_answers(tiny_llama, tmp_path):
    shutil.copytree(tiny_llama, tmp_path / "tiny")
    (tmp_path / "tiny/chat_template.jinja").write_text(QWEN25.read_text())
    records = [call_record(i) if i % 3 else first_call(i) for i in range(12)]
    records += [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"Answer: {i}."}]}
                for i in range(12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = write_spec(tmp_path, SPEC + SPEC.replace('name = "m"', 'name = "only-tools"').replace("data.jsonl", "tools.jsonl"))
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:12]))
    ran = doit(spec).ran
    result = json.loads((tmp_path / "cache/only-tools/eval/Q8_0.json").read_text())
    assert result["quality"]["perplexity"] > 0 and "accuracy" not in result, "nothing to answer: no tool-free conversation"
    assert "train:m" in ran and "parity:m-Q8_0" in ran and "report" in ran
    heldout = (tmp_path / "cache/m/eval/heldout.jsonl").read_text()
    prompts = [json.loads(line) for line in (tmp_path / "cache/m/eval/prompts.jsonl").read_text().splitlines()]
    assert "<tool_call>" in heldout or "<tool_response>" in heldout, "the perplexity text holds the tool conversations"
    assert prompts and all(p["answer"].startswith("Answer: ") for p in prompts), "answers: conversations without tools"
    assert "# Tools" in heldout and "Tools" in (tmp_path / "cache/m/preview.html").read_text()  # the page: a token each
