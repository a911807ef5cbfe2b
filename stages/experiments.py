"""Experiments: the variants of a [models.matrix], compared on what they ship, and the best promoted.

`doit compare` prints one table of every variant: the values that made it, its last train and
validation loss, and per released quant type the eval's figures, read from the files the build
left (eval/<variant>.json, adapter/train_log.jsonl); a variant that failed shows its error. The
`select` task reads the same figures to choose the variant whose releases are packaged under the
model's own name (`[models.select]`); its choice and the figures it was made on are an artifact.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from . import package
from .formats.metrics import FIGURES, figure
from .ground import runlog
from .ground.atomic import atomic_file
from .ground.errors import BuildError
from .ground.spec import SELECT_METRICS, ModelSpec, SelectSpec, Spec
from .ground.task import ModelBuild

TRAIN_COLUMNS = ("train_loss", "val_loss")


@dataclass(frozen=True)
class Row:
    variant: str  # model@labels
    values: dict  # dotted matrix key → value
    cells: dict  # column → number or None (missing: not built, or failed)
    failed: str | None  # the error of the task that failed, from its run record


def last_losses(log_path: Path) -> dict:
    """The train log's last train loss and last validation loss."""
    found = {}
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line) if line.strip() else {}
            for key in TRAIN_COLUMNS:
                if record.get(key) is not None:
                    found[key] = record[key]
    return found


def variants_of(spec: Spec, matrix_model: str | None = None) -> list[ModelSpec]:
    found = [m for m in spec.models if m.matrix_of and (matrix_model is None or m.matrix_of == matrix_model)]
    if not found:
        named = f" named {matrix_model!r}" if matrix_model else ""
        raise BuildError(f"{spec.source}: no model{named} has a [models.matrix]; `doit compare` compares the "
                         "variants of one")
    return found


def rows(spec: Spec, models: list[ModelSpec]) -> list[Row]:
    failures = runlog.read_failures(spec.cache)
    found = []
    for model in models:
        build = ModelBuild.of(spec, model)
        cells = last_losses(build.paths.root / "adapter" / "train_log.jsonl")
        # Preference accuracy is measured only where the model trains on pairs: elsewhere it is no column,
        # not a figure missing (which would read as "not built").
        pairs = bool(model.train) and model.train.method != "sft"
        columns = [c for c in FIGURES if c != "preference_accuracy" or pairs]
        for release in (r.variant for r in package.releases(build)):  # each quant type, and the lora route
            path = build.paths.eval(release)
            result = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            cells |= {f"{release}.{column}": figure(result, column) for column in columns}
        failed = [error for task, error in failures.items() if _task_of(task, model.name)]
        found.append(Row(model.name, model.varied, cells, failed[0] if failed else None))
    return found


def _task_of(task: str, model: str) -> bool:
    """Whether `stage:name` is one of this model's tasks (train:m, eval:m-Q4_K_M, eval:m.prompts)."""
    name = task.split(":", 1)[-1]
    return name == model or name.startswith((model + "-", model + "."))


def table(found: list[Row], columns: list[str] | None = None, sort: str | None = None) -> tuple[list[str], list[list]]:
    """The header and rows: the varied keys, then the chosen columns (default: all), sorted by one
    (`-name` for descending); a row without that figure goes last."""
    keys = list(dict.fromkeys(k for row in found for k in row.values))
    available = list(dict.fromkeys(c for row in found for c in row.cells))
    chosen = available if not columns else list(dict.fromkeys(c for name in columns for c in _columns(name, available)))
    if sort:
        descending = sort.startswith("-")
        column = _column(sort.lstrip("-"), available + keys + ["variant"])
        def key(row: Row):
            value = row.variant if column == "variant" else row.values.get(column, row.cells.get(column))
            return (value is None, value if not descending or value is None else _negate(value))
        found = sorted(found, key=key)
    header = ["variant", *keys, *chosen, "status"]
    body = [[row.variant, *(row.values.get(k) for k in keys), *(row.cells.get(c) for c in chosen),
             "failed: " + row.failed if row.failed else "ok" if all(row.cells.get(c) is not None for c in chosen)
             else "not built"] for row in found]
    return header, body


def _negate(value):
    return -value if isinstance(value, (int, float)) else value


def _columns(name: str, available: list[str]) -> list[str]:
    """A column by its name, or a figure of every release (`perplexity`: Q8_0.perplexity, lora.perplexity)."""
    matches = [name] if name in available else [c for c in available if c.endswith("." + name)]
    if not matches:
        raise BuildError(f"no column {name!r}; the columns are {', '.join(available)}")
    return matches


def _column(name: str, available: list[str]) -> str:
    """The one column to sort by: a figure needs its release where several have it."""
    matches = _columns(name, available)
    if len(matches) > 1:
        raise BuildError(f"sort={name} is ambiguous: say which release's, e.g. sort={matches[0]} "
                         f"(the columns are {', '.join(matches)})")
    return matches[0]


def render(header: list[str], body: list[list], form: str) -> str:
    """The table as aligned text, CSV or JSON (a list of objects)."""
    if form == "json":
        return json.dumps([dict(zip(header, row)) for row in body], indent=1)
    if form == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in body])
        return out.getvalue()
    if form != "table":
        raise BuildError(f"format={form}: say format=table, csv or json")
    text = [[_cell(v) for v in row] for row in [header, *body]]
    widths = [max(len(row[i]) for row in text) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in text)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def compare(spec: Spec, model: str | None, columns: str, sort: str, form: str) -> str:
    found = rows(spec, variants_of(spec, model or None))
    header, body = table(found, [c for c in columns.split(",") if c] or None, sort or None)
    return render(header, body, form or "table")


def for_report(spec: Spec, matrix_model: str):
    """The report's view of one matrix: the table, the train logs and the choice."""
    from .report import Experiment, train_log

    variants = spec.matrices[matrix_model]
    header, body = table(rows(spec, variants), None, None)
    logs = {model.name: train_log(spec.cache / model.name / "adapter" / "train_log.jsonl") for model in variants}
    selection = spec.cache / matrix_model / "selected.json"
    chosen = json.loads(selection.read_text(encoding="utf-8")) if variants[0].select and selection.is_file() else None
    return Experiment(matrix_model, header, body, logs, chosen)


def choose(figures: dict[str, float | None], maximize: bool) -> str:
    """The variant with the best figure; ties go to the first in matrix order (the order the
    matrix's values are written in), so the same figures always choose the same variant."""
    measured = {name: value for name, value in figures.items() if value is not None}
    if not measured:
        raise BuildError("no variant has the figure to select on")
    best = max(measured.values()) if maximize else min(measured.values())
    return next(name for name, value in measured.items() if value == best)


def select(select_spec: SelectSpec, results: dict[str, Path], out_path: Path, model: str) -> None:
    """Choose among the variants by their eval results (variant name → eval JSON of the selected
    quant type) and write the choice with the figures it was made on."""
    metric, maximize = select_spec.metric, select_spec.maximizes
    figures = {}
    for name, path in results.items():
        figures[name] = figure(json.loads(path.read_text(encoding="utf-8")), metric)
    winner = choose(figures, maximize)
    chosen = {"model": model, "metric": metric, "variant": select_spec.variant, "maximize": maximize,
              "winner": winner, "figures": figures}
    with atomic_file(out_path) as tmp:
        tmp.write_text(json.dumps(chosen, indent=1) + "\n", encoding="utf-8")
    print(f"{model}: {winner} has the {'highest' if maximize else 'lowest'} {metric} of {select_spec.variant} "
          f"({figures[winner]}); its releases ship as {model}")


def winner(selection: Path) -> str:
    return json.loads(selection.read_text(encoding="utf-8"))["winner"]


def run_promoted(choices: dict[str, tuple], selection: Path) -> None:
    """Run the chosen variant's task (a package under the model's own name), after its own checks (its
    quality gate): variant name → (action, its arguments, its checks)."""
    func, kwargs, checks = choices[winner(selection)]
    for check, check_kwargs in checks:
        check(**check_kwargs)
    return func(**kwargs)


assert set(SELECT_METRICS) <= set(FIGURES)
