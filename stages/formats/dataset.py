"""Instruction datasets: JSONL files of conversations, read into chat turns. Every problem names
the file and line.

A file holds one of these formats, recognised by its first record's keys (or named by the spec's
`format`); a record of another format in the same file is an error naming its line:

- alpaca: {"instruction", "input" (optional), "output"}
- messages (OpenAI): {"messages": [{"role", "content"}, ...]}, with "tools" (function schemas) beside
  them and assistant turns of "tool_calls" and "tool" turns of their results where the data has them
- sharegpt: {"conversations": [{"from", "value"}, ...]}, roles human/user, gpt/assistant/model, system,
  and LLaMA-Factory's function_call (a {"name", "arguments"} call) and observation (its result), with "tools"
- prompt_completion (TRL's): {"prompt", "completion"}, each a string, or a list of messages
  (conversational: the prompt's turns, then the completion's)
- text: {"text"}, or a .txt file whose documents are separated by blank lines: raw text for
  continued pretraining, trained on every token
- preference (DPO, ORPO; TRL's shapes): {"prompt" | "messages", "chosen", "rejected"}, the prompt a
  string or the conversation so far, each answer a string or one assistant turn; or {"chosen",
  "rejected"} as two whole conversations that differ only in their last (assistant) turn

In a conversation the last turn is the assistant's answer, the one trained on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..ground.errors import BuildError

ROLES = ("system", "user", "assistant", "tool")
# The key that tells each format apart, in the order they are looked for.
FORMATS = {"preference": "chosen", "messages": "messages", "sharegpt": "conversations", "prompt_completion": "completion",
           "alpaca": "instruction", "text": "text"}
# ShareGPT's speakers, as exported by the tools that made the format common (ShareGPT itself, FastChat,
# Axolotl, LLaMA-Factory), → chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool"}
SHAPES = {"alpaca": '{"instruction", "input", "output"}', "messages": '{"messages": [{"role", "content"}, ...]}',
          "sharegpt": '{"conversations": [{"from", "value"}, ...]}', "prompt_completion": '{"prompt", "completion"}',
          "text": '{"text"}', "preference": '{"prompt" | "messages", "chosen", "rejected"}'}


@dataclass(frozen=True)
class Example:
    messages: tuple[dict, ...]  # chat turns; the last is the assistant's answer, the one trained on
    where: str  # "file:line", for messages about this record
    text: str | None = None  # raw text instead (no turns): every token is trained on
    tools: tuple[dict, ...] = ()  # the functions the conversation may call (JSON schemas), for the chat template
    rejected: dict | None = None  # a preference pair's rejected answer; its chosen one is the last of messages

    @property
    def is_text(self) -> bool:
        return self.text is not None

    @property
    def is_preference(self) -> bool:
        return self.rejected is not None

    @property
    def uses_tools(self) -> bool:
        """Tools defined, called or answered: rendered by a chat template that supports them."""
        return bool(self.tools) or any(t["role"] == "tool" or t.get("tool_calls") for t in self.messages)


def detect(record: object) -> str | None:
    """A record's format from its keys; None when it has none of them."""
    if isinstance(record, dict):
        for name, key in FORMATS.items():
            if key in record:
                return name
    return None


def _parsed(text: str) -> object:
    """JSON text inside a record (a call's arguments, LLaMA-Factory's tools), or None when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _tool_call(call: object, where: str) -> dict:
    """One call as chat templates take it: {"type": "function", "function": {"name", "arguments": {…}}}.
    OpenAI writes the arguments as a JSON string; Hugging Face's templates expect the object."""
    function = call.get("function", call) if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments", {}) if isinstance(function, dict) else None
    if isinstance(arguments, str):
        arguments = _parsed(arguments)
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise BuildError(f"{where}: a tool call is {{\"function\": {{\"name\", \"arguments\"}}}} with a string name and "
                         "arguments as an object (or its JSON text)")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _turn(turn: object, where: str) -> dict | None:
    """An OpenAI-style turn, checked and normalized; None when it is not one."""
    if not isinstance(turn, dict) or turn.get("role") not in ROLES:
        return None
    calls = turn.get("tool_calls")
    if calls is not None and (turn["role"] != "assistant" or not isinstance(calls, list) or not calls):
        return None
    if not isinstance(turn.get("content"), str) and not (calls and turn.get("content") is None):
        return None
    found = {"role": turn["role"], "content": turn.get("content") or ""}
    if calls:
        found["tool_calls"] = [_tool_call(c, where) for c in calls]
    for key in ("tool_call_id", "name"):  # which call a tool's result answers, as some templates write it
        if turn["role"] == "tool" and isinstance(turn.get(key), str):
            found[key] = turn[key]
    return found


def _turns(turns: object, where: str, field: str) -> list[dict]:
    """An OpenAI-style list of {"role", "content"} turns (and tool calls), checked."""
    if not isinstance(turns, list) or not turns:
        raise BuildError(f"{where}: {field!r} must be a non-empty list of {{\"role\", \"content\"}} objects")
    found = []
    for i, turn in enumerate(turns):
        checked = _turn(turn, where)
        if checked is None:
            raise BuildError(f"{where}: {field}[{i}] needs a role ({', '.join(ROLES)}) and a string content (an "
                             "assistant's may be null beside a non-empty tool_calls list)")
        found.append(checked)
    return found


def _tools(record: dict, where: str) -> tuple[dict, ...]:
    """The record's tool definitions: a list of JSON schemas (or, as LLaMA-Factory writes it, its JSON text)."""
    tools = record.get("tools") or []
    if isinstance(tools, str):
        tools = _parsed(tools)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BuildError(f"{where}: 'tools' must be a list of function definitions (JSON objects)")
    return tuple(tools)


def _sharegpt(turns: object, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise BuildError(f"{where}: 'conversations' must be a non-empty list of {{\"from\", \"value\"}} objects")
    found = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise BuildError(f"{where}: conversations[{i}] needs \"from\" ({', '.join(SHAREGPT_ROLES)}) and a string "
                             f"\"value\"; it has from = {speaker!r}")
        if speaker == "function_call":  # the call itself, as JSON text: {"name", "arguments"}
            found.append({"role": "assistant", "content": "", "tool_calls": [_tool_call(_parsed(turn["value"]), where)]})
        else:
            found.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return found


def _prompt_completion(record: dict, where: str) -> list[dict]:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
        return _turns(prompt, where, "prompt") + _turns(completion, where, "completion")
    raise BuildError(f"{where}: 'prompt' and 'completion' must both be strings, or both lists of "
                     '{"role", "content"} messages')


def _answer(value: object, where: str, field: str) -> dict:
    """A preference answer: a string, one assistant turn, or a list holding one."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    turns = value if isinstance(value, list) else [value]
    checked = [_turn(turn, where) for turn in turns]
    if len(checked) != 1 or checked[0] is None or checked[0]["role"] != "assistant":
        raise BuildError(f"{where}: {field!r} must be the answer: a string, or one {{\"role\": \"assistant\", "
                         "\"content\"} turn")
    return checked[0]


def _preference(record: dict, where: str) -> tuple[list[dict], dict]:
    """A preference record's (prompt turns + chosen answer, rejected answer)."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if rejected is None:
        raise BuildError(f"{where}: a preference record needs \"rejected\" beside \"chosen\" "
                         f"({SHAPES['preference']})")
    if "prompt" in record or "messages" in record:
        asked = record.get("prompt", record.get("messages"))
        prompt = [{"role": "user", "content": asked}] if isinstance(asked, str) else _turns(asked, where, "prompt")
        return prompt + [_answer(chosen, where, "chosen")], _answer(rejected, where, "rejected")
    # No prompt: two whole conversations, the same up to their answers (TRL's implicit prompt).
    chosen, rejected = _turns(chosen, where, "chosen"), _turns(rejected, where, "rejected")
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise BuildError(f"{where}: without a \"prompt\", \"chosen\" and \"rejected\" are whole conversations "
                         "that must be the same up to their last turn, the assistant's answer")
    return chosen, rejected[-1]


def _alpaca(record: dict, where: str) -> list[dict]:
    missing = [key for key in ("instruction", "output") if not isinstance(record.get(key), str)]
    if missing:
        raise BuildError(f"{where}: missing {' and '.join(repr(k) for k in missing)} (a string); an alpaca record "
                         f"is {SHAPES['alpaca']}")
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def to_messages(record: object, where: str, form: str | None = None) -> tuple[dict, ...]:
    """One record → its chat turns; `form` is the file's format (None: the record's own)."""
    if not isinstance(record, dict):
        raise BuildError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    form = form or detect(record)
    if form is None:
        raise BuildError(f"{where}: not a record of a known format (keys: {', '.join(sorted(record)) or 'none'}); "
                         f"a record is one of {'; '.join(SHAPES.values())}")
    if form == "messages":
        turns = _turns(record.get("messages"), where, "messages")
    elif form == "sharegpt":
        turns = _sharegpt(record.get("conversations"), where)
    elif form == "prompt_completion":
        turns = _prompt_completion(record, where)
    else:
        turns = _alpaca(record, where)
    if turns[-1]["role"] != "assistant":
        raise BuildError(f"{where}: the last turn must be the assistant's answer, which is what is trained on")
    return tuple(turns)


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file the spec names; a missing, unreadable or non-UTF-8 file is a BuildError."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark some editors write
    except FileNotFoundError:
        raise BuildError(f"{what} {path} not found") from None
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise BuildError(f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x}): save the {what} as "
                         "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    except OSError as err:
        raise BuildError(f"{what} {path}: cannot be read ({err.strerror})") from None


def _text(record: dict, where: str) -> str:
    if not isinstance(record.get("text"), str) or not record["text"].strip():
        raise BuildError(f"{where}: 'text' must be a non-empty string (a raw-text record is {SHAPES['text']})")
    return record["text"]


def read_text_file(path: Path, form: str = "auto") -> list[Example]:
    """A .txt file's documents, separated by blank lines, as raw-text examples ("file:line" of each's first line)."""
    if form not in ("auto", "text"):
        raise BuildError(f"dataset {path} is a .txt file, which is raw text, and the spec's format says {form}: "
                         "give the records as JSONL, or set format = \"text\"")
    examples, lines, start = [], [], 0
    for number, line in enumerate([*read_lines(path, "dataset"), ""], start=1):
        if line.strip():
            start = start or number
            lines.append(line)
        elif lines:
            examples.append(Example((), f"{path}:{start}", "\n".join(lines)))
            lines, start = [], 0
    if not examples:
        raise BuildError(f"dataset {path} is empty: add text, documents separated by blank lines")
    return examples


def file_format(path: Path, form: str = "auto") -> str | None:
    """A dataset file's format as read_jsonl would take it, from its first record alone (cheap)."""
    if path.suffix == ".txt" or form != "auto":
        return "text" if path.suffix == ".txt" else form
    first = next((line for line in read_lines(path, "dataset") if line.strip()), None)
    return detect(_parsed(first)) if first else None


def read_jsonl(path: Path, form: str = "auto") -> list[Example]:
    """Every record of a dataset file as chat turns (or raw text). The file's format is `form`, or with
    "auto" its first record's; a record of another format is an error naming its line and the first
    record's. A .txt file is raw text (read_text_file)."""
    if path.suffix == ".txt":
        return read_text_file(path, form)
    examples, first = [], None
    for where, record in records(path, read_lines(path, "dataset")):
        found = detect(record)
        if first is None:
            first = (where, form if form != "auto" else found)
        expected = first[1]
        if found is not None and expected is not None and found != expected:
            began = "the spec's format" if form != "auto" else f"its first record ({first[0]})"
            raise BuildError(f"{where}: {found} record ({SHAPES[found]}) in a file of {expected} records, as "
                             f"{began} says; one file holds one format: split it, or convert this record")
        if expected == "text" and isinstance(record, dict):
            examples.append(Example((), where, _text(record, where)))
        elif expected == "preference" and isinstance(record, dict):
            chosen, rejected = _preference(record, where)
            examples.append(Example(tuple(chosen), where, rejected=rejected))
        else:
            messages = to_messages(record, where, expected)
            examples.append(Example(messages, where, tools=_tools(record, where) if "tools" in record else ()))
    if not examples:
        raise BuildError(f"dataset {path} is empty: add JSONL records, one per line")
    return examples


def records(path: Path, lines: list[str]):
    """("file:line", the parsed record) for each non-blank line of a JSONL file."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise BuildError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line is one JSON record") from None


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded, reproducible hold-out of `fraction` of the records (at least one of each side)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(examples) * fraction)) if fraction > 0 else 0
    if held >= len(examples):
        raise BuildError(f"validation = {fraction} leaves no training records out of {len(examples)}")
    held_out = set(order[:held])
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def shares(weights: list[float], total: int) -> list[int]:
    """How many of `total` records each source gives: weight / the sum of weights of them, rounded by
    largest remainder (ties to the earlier source), so the counts add up to `total` exactly."""
    exact = [w / sum(weights) * total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(sources: list[list[Example]], weights: list[float], seed: int) -> list[Example]:
    """A weighted mix of the sources' training records, as many as they hold together. A source whose
    share is more than it holds is repeated in whole seeded passes (every record the same number of
    times, give or take one); one whose share is less gives a seeded sample without repeats."""
    rng = random.Random(seed)
    mixed = []
    for examples, count in zip(sources, shares(weights, sum(len(s) for s in sources))):
        order: list[int] = []
        while len(order) < count:
            order += rng.sample(range(len(examples)), len(examples))
        mixed += [examples[i] for i in order[:count]]
    return mixed
