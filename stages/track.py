"""track: the build's record in MLflow (`report_to = ["mlflow"]` in [models.train]).

One MLflow run per build of a model, named after it: the training parameters, the losses at every
step (from the train log), every variant's eval figures, and the sha256 of every artifact (from
SHA256SUMS) as tags. The tracking store is `MLFLOW_TRACKING_URI`'s, else a SQLite file in the
cache (`mlflow ui --backend-store-uri sqlite:///cache/mlflow.db` shows it); the experiment is
`MLFLOW_EXPERIMENT_NAME`'s, else "modelmake". The task runs after the manifest, whenever what it
records changed; it writes which run it made to cache/<model>/mlflow-run.json, and nothing the
build reads, so tracking changes no other task's key or bytes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .ground.atomic import atomic_file
from .ground.errors import BuildError
from .ground.task import ModelBuild, Task
from .training.tracking import SCALARS

REVISION = 1
TOOLS = ()  # it writes no artifact: the MLflow version shapes nothing a later task reads
# The train log's figures under the names TensorBoard shows them by, less the speed (a timing, not a result).
STEP_METRICS = {key: tag for key, tag in SCALARS.items() if key != "tokens_per_s"}


# ---- what is recorded (pure) ----

def flat_params(params: dict, prefix: str = "") -> dict[str, str]:
    """The train stage's params as MLflow params: nested tables joined with dots, values as text."""
    found = {}
    for key, value in params.items():
        if isinstance(value, dict):
            found |= flat_params(value, f"{prefix}{key}.")
        else:
            found[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return found


def step_metrics(log_rows: list[dict]) -> list[tuple[str, float, int]]:
    """(name, value, step) of every loss and learning rate the train log holds."""
    return [(name, float(row[key]), row["step"]) for row in log_rows for key, name in STEP_METRICS.items()
            if key in row]


def eval_metrics(variant: str, result: dict, prefix: str = "") -> dict[str, float]:
    """A variant's eval figures (perplexity, KL, speed, size, …) as `<variant>.<figure>`."""
    found = {}
    for key, value in result.items():
        if isinstance(value, dict):
            found |= eval_metrics(variant, value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[f"{variant}.{prefix}{key}"] = float(value)
    return found


def digests(sha256sums: str) -> dict[str, str]:
    """SHA256SUMS's lines (`<sha256>  <path>`) as path → sha256."""
    return {path: digest for digest, path in (line.split("  ", 1) for line in sha256sums.splitlines() if line)}


# ---- the I/O ----

def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another build's track task created it a moment ago
        found = client.get_experiment_by_name(name)
        if not found:
            raise
        return found.experiment_id


def run(model_name: str, params: dict, train_log: Path, eval_results: dict[str, Path], sha256sums: Path,
        cache_dir: Path, out_path: Path) -> dict[str, str]:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables…": set after MLflow's own setup
        logging.getLogger(name).setLevel(logging.WARNING)

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cache_dir.resolve() / 'mlflow.db'}"
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "modelmake"
    now = int(time.time() * 1000)
    rows = [json.loads(line) for line in train_log.read_text(encoding="utf-8").splitlines() if line.strip()]
    metrics = [Metric(name, value, now, step) for name, value, step in step_metrics(rows)]
    for variant, path in eval_results.items():
        result = json.loads(path.read_text(encoding="utf-8"))
        metrics += [Metric(name, value, now, 0) for name, value in eval_metrics(variant, result).items()]
    tags = [RunTag(f"sha256/{path}", digest) for path, digest in digests(sha256sums.read_text(encoding="utf-8")).items()]
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(_experiment(client, experiment), run_name=model_name,
                                   tags={"modelmake.model": model_name}).info.run_id
        for batch in _chunks([Param(k, v) for k, v in flat_params(params).items()], 100):
            client.log_batch(run_id, params=batch)
        for batch in _chunks(metrics, 1000):
            client.log_batch(run_id, metrics=batch)
        for batch in _chunks(tags, 100):
            client.log_batch(run_id, tags=batch)
        client.set_terminated(run_id)
    except Exception as err:  # the store is the user's: a server down, a URI mistyped, no permission
        raise BuildError(f"track {model_name}: MLflow at {uri} did not take the run ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no message'}); check MLFLOW_TRACKING_URI, or take "
                         "\"mlflow\" out of report_to in [models.train]") from None
    with atomic_file(out_path) as tmp:
        tmp.write_text(json.dumps({"tracking_uri": uri, "experiment": experiment, "run_id": run_id}, indent=2) + "\n",
                       encoding="utf-8")
    print(f"track {model_name}: MLflow run {run_id} in experiment {experiment!r} at {uri}: {len(metrics)} metrics, "
          f"{len(tags)} artifact digests")
    return {}


def tasks(build: ModelBuild) -> list[Task]:
    model, paths = build.model, build.paths
    if not model.train or "mlflow" not in model.train.report_to:
        return []
    results = {variant: paths.eval(variant) for variant in model.variants}
    train_log = paths.adapter / "train_log.jsonl"
    sums = paths.root / "SHA256SUMS"
    return [Task(model.name, "the build's record in MLflow: parameters, losses, eval figures, digests", run,
                 {"model_name": model.name, "params": model.train.params(), "train_log": train_log,
                  "eval_results": results, "sha256sums": sums, "cache_dir": build.spec.cache,
                  "out_path": paths.mlflow_run},
                 {"params": model.train.params()}, inputs=[train_log, *results.values(), sums],
                 outputs=[paths.mlflow_run], artifact=False, cacheable=False)]
