"""[models.matrix]: one model table, many variants.

    [models.matrix]
    "train.lora.r" = [8, 32]
    "train.learning_rate" = [1e-4, 3e-4]

Each key is a dotted path into the model's own table; each value lists what to try there. Every
combination becomes a model of its own, named `<model>@<labels>` (`demo@r8-lr1e-4`): the labels are
short, stable (the order of the keys as written, each value as written) and safe in file and task
names. This module only rewrites the TOML's tables before they are validated, so a variant is
checked exactly as a model written out by hand would be.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import PurePath

SEPARATOR = "@"  # between the model's name and its variant's labels
# Short labels for the settings people vary most; any other key is labelled by its last part.
LABELS = {"learning_rate": "lr", "epochs": "ep", "max_steps": "steps", "batch_size": "bs", "weight_decay": "wd",
          "warmup_steps": "warmup", "max_seq_len": "len", "dropout": "drop", "quantize": "q", "dataset": "data",
          "gradient_accumulation": "accum", "schedule": "sched", "optimizer": "opt"}
# Keys that change what every variant shares (the imported base, its preflight and its GGUF): a matrix
# over one of them gives variants that share nothing.
UNSHARED = ("base", "outtype", "pretokenizer", "convert", "train.lora.target_modules")


@dataclass(frozen=True)
class Variant:
    """One combination of a matrix: what it is called, and what it sets."""

    model: str  # the model table's own name
    name: str  # model@labels
    values: dict  # dotted key → value

    def describe(self) -> str:
        settings = ", ".join(f"{key} = {value!r}" for key, value in self.values.items())
        return f"{self.name} ([models.matrix] {settings})"


def shares_base(keys) -> bool:
    """Whether variants over these keys share their base's import, preflight and GGUF."""
    return not any(key == fixed or key.startswith(fixed + ".") for key in keys for fixed in UNSHARED)


def label_value(value) -> str:
    """A value as a name part: 1e-4 not 0.0001, a path's stem, a list joined by +."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value != 0 and not 1e-2 < abs(value) < 1e4:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(label_value(v) for v in value)
    if isinstance(value, str) and ("/" in value or "\\" in value or "." in value):
        value = PurePath(value).stem or value
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(value)).strip("_.")
    return text or "x"


def _labels(keys: list[str]) -> list[str]:
    """Each key's label: its short name, or its whole path where two keys would share one."""
    short = [LABELS.get(key.rsplit(".", 1)[-1], key.rsplit(".", 1)[-1]) for key in keys]
    return [label if short.count(label) == 1 else key for label, key in zip(short, keys)]


def _set(table: dict, key: str, value, model: str) -> None:
    *parents, last = key.split(".")
    for depth, part in enumerate(parents):
        inner = table.setdefault(part, {})
        if not isinstance(inner, dict):
            where = ".".join(parents[:depth + 1])
            raise ValueError(f"model {model!r}: [models.matrix] key {key!r} goes through {where!r}, which is a "
                             f"value ({inner!r}), not a table")
        table = inner
    table[last] = value


def expand(model: dict) -> list[tuple[dict, Variant | None]]:
    """A model table and its matrix → the model tables it stands for, each with its Variant (None
    for a table without a matrix). Raises ValueError for a matrix that cannot be expanded."""
    if not isinstance(model, dict) or "matrix" not in model:
        return [(model, None)]
    name, matrix = model.get("name"), model["matrix"]
    if not isinstance(name, str):
        return [(model, None)]  # validation names the missing name
    if SEPARATOR in name:
        raise ValueError(f"model {name!r}: {SEPARATOR!r} in a name separates a matrix variant's values; rename it")
    if not isinstance(matrix, dict) or not matrix:
        raise ValueError(f"model {name!r}: [models.matrix] must be a table of dotted keys and lists of values, "
                         'e.g. "train.lora.r" = [8, 32]')
    for key, values in matrix.items():
        if key in ("name", "matrix", "select") or key.startswith(("matrix.", "select.")):
            raise ValueError(f"model {name!r}: [models.matrix] cannot vary {key!r}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"model {name!r}: [models.matrix] {key!r} must list the values to try, e.g. "
                             f"{key!r} = [{values!r}, …]; it is {values!r}")
        labels = [label_value(v) for v in values]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"model {name!r}: [models.matrix] {key!r} lists {', '.join(repeated)} more than once")
    keys = list(matrix)
    labels = _labels(keys)
    tables = []
    base = {k: v for k, v in model.items() if k != "matrix"}
    for combination in itertools.product(*matrix.values()):
        table = copy.deepcopy(base)
        for key, value in zip(keys, combination):
            _set(table, key, copy.deepcopy(value), name)
        suffix = "-".join(f"{label}{label_value(value)}" for label, value in zip(labels, combination))
        variant = Variant(name, f"{name}{SEPARATOR}{suffix}", dict(zip(keys, combination)))
        table["name"] = variant.name
        table["matrix_of"] = name
        table["varied"] = variant.values
        tables.append((table, variant))
    return tables
