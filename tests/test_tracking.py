"""Experiment tracking (report_to): TensorBoard events read back with tensorboard's own reader, the
MLflow run with MLflow's client, and the adapter's key and bytes the same with tracking on or off."""

import json
from pathlib import Path

import pytest
from helpers import REPO, doit, write_spec
from test_train import GOOD, SPEC, read_log, train_spec, workspace

from stages import track, train
from stages.formats import lora
from stages.ground.errors import BuildError
from stages.ground.spec import TrainSpec, load_spec
from stages.training import tracking


def test_the_train_log_becomes_scalars_under_the_trainers_names():
    row = {"step": 3, "train_loss": 2.5, "learning_rate": 1e-4, "tokens_per_s": 900.0, "val_loss": 2.25,
           "peak_memory_mb": 800.0, "step_s": 0.4}
    assert tracking.scalars(row) == {"train/loss": 2.5, "eval/loss": 2.25, "train/learning_rate": 1e-4,
                                     "train/tokens_per_s": 900.0}
    assert track.step_metrics([{"step": 0, "val_loss": 3.0, "estimated_memory_mb": 1.0}, row]) == [
        ("eval/loss", 3.0, 0), ("train/loss", 2.5, 3), ("eval/loss", 2.25, 3), ("train/learning_rate", 1e-4, 3)]


def test_what_mlflow_records_is_flattened_from_the_builds_files():
    assert track.flat_params({"lora": {"r": 8, "target_modules": ["q_proj"]}, "template": "chat", "system": None}) == {
        "lora.r": "8", "lora.target_modules": '["q_proj"]', "template": "chat", "system": "null"}
    result = {"model": "m", "variant": "Q8_0", "size_bytes": 10, "quality": {"perplexity": 9.5, "ok": True},
              "files": ["a.gguf"]}
    assert track.eval_metrics("Q8_0", result) == {"Q8_0.size_bytes": 10.0, "Q8_0.quality.perplexity": 9.5}
    assert track.digests("ab12  adapter/adapter_model.safetensors\ncd34  gguf/m.Q8_0.gguf\n") == {
        "adapter/adapter_model.safetensors": "ab12", "gguf/m.Q8_0.gguf": "cd34"}


def test_report_to_is_checked_when_the_spec_loads_and_is_not_part_of_the_key(tmp_path):
    with pytest.raises(ValueError, match="report_to"):
        TrainSpec.model_validate({"dataset": str(REPO / "data/demo.jsonl"), "report_to": ["wandb"]})
    plain = TrainSpec.model_validate({"dataset": str(REPO / "data/demo.jsonl")})
    tracked = TrainSpec.model_validate({"dataset": str(REPO / "data/demo.jsonl"), "report_to": ["tensorboard", "mlflow"]})
    assert plain.params() == tracked.params()


def test_tensorboard_events_as_it_trains_and_the_same_adapter_bytes(tiny_llama, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain = train_spec(max_steps=4, batch_size=4, eval_every=2)
    tracked = plain.model_copy(update={"report_to": ["tensorboard"]})
    train.run(tiny_llama, tmp_path / "plain", plain, "tiny", threads=2)
    train.run(tiny_llama, tmp_path / "tracked", tracked, "tiny", threads=2, events=tmp_path / "events")
    for name in lora.ADAPTER_FILES:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "tracked" / name).read_bytes(), name

    events = EventAccumulator(str(tmp_path / "events"))
    events.Reload()
    assert {"train/loss", "eval/loss", "train/learning_rate", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
    log = read_log(tmp_path / "tracked")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == \
        [(r["step"], r["train_loss"]) for r in log if "train_loss" in r]
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4], "the base's loss at step 0, then every eval_every"


@pytest.mark.slow
def test_mlflow_records_the_build_and_turning_tracking_on_rebuilds_nothing(tiny_llama, tmp_path):
    from mlflow.tracking import MlflowClient

    spec = workspace(tmp_path, tiny_llama, GOOD)
    built = doit(spec).ran
    assert "track:m" not in built and "train:m" in built
    spec.write_text(SPEC + 'report_to = ["tensorboard", "mlflow"]\n')
    # Tracking is not part of any task's key; the report redraws its task graph, which now has track:m.
    assert doit(spec).ran == ["track:m", "report"]

    recorded = json.loads((tmp_path / "cache/m/mlflow-run.json").read_text())
    assert recorded["tracking_uri"] == f"sqlite:///{tmp_path / 'cache/mlflow.db'}" and recorded["experiment"] == "modelmake"
    client = MlflowClient(tracking_uri=recorded["tracking_uri"])
    run = client.get_run(recorded["run_id"])
    assert run.info.run_name == "m" and run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == str(load_spec(spec).models[0].train.lora.r)
    log = read_log(tmp_path / "cache/m/adapter")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["train_loss"]) for r in log if "train_loss" in r]
    result = json.loads((tmp_path / "cache/m/eval/Q8_0.json").read_text())
    assert run.data.metrics["Q8_0.quality.perplexity"] == result["quality"]["perplexity"]
    sums = track.digests((tmp_path / "cache/m/SHA256SUMS").read_text())
    assert {k.removeprefix("sha256/"): v for k, v in run.data.tags.items() if k.startswith("sha256/")} == sums
    assert "adapter/adapter_model.safetensors" in sums
    assert doit(spec).ran == [], "recorded once per build"

    # A store that cannot be written: one clear error naming it, no run record left behind.
    (tmp_path / "cache/m/mlflow-run.json").unlink()
    failed = doit(spec, check=False, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/data.jsonl/mlflow.db"})
    assert failed.returncode != 0 and "track m: MLflow at sqlite:///" in failed.output, failed.output[-2000:]
    assert "Traceback" not in failed.output and not (tmp_path / "cache/m/mlflow-run.json").exists()
