"""Instruction datasets: JSONL files of {"instruction", "input", "output"} or {"messages": [...]} records,
read into chat conversations. Every problem names the file and line."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..ground.errors import BuildError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    messages: tuple[dict, ...]  # chat turns; the last is the assistant's answer, the one trained on
    where: str  # "file:line", for messages about this record


def to_messages(record: object, where: str) -> tuple[dict, ...]:
    if not isinstance(record, dict):
        raise BuildError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            raise BuildError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        for i, turn in enumerate(turns):
            if not (isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("content"), str)):
                raise BuildError(f"{where}: messages[{i}] needs a role ({', '.join(ROLES)}) and a string content")
        if turns[-1]["role"] != "assistant":
            raise BuildError(f"{where}: the last message must be the assistant's answer, which is what is trained on")
        return tuple({"role": t["role"], "content": t["content"]} for t in turns)
    missing = [key for key in ("instruction", "output") if not isinstance(record.get(key), str)]
    if missing:
        raise BuildError(f"{where}: missing {' and '.join(repr(k) for k in missing)} (a string); records are "
                         '{"instruction", "input", "output"} or {"messages": [...]}')
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return ({"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]})


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


def read_jsonl(path: Path) -> list[Example]:
    lines = read_lines(path, "dataset")
    examples = [Example(to_messages(record, where), where) for where, record in records(path, lines)]
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
