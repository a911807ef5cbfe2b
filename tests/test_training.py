"""Training at size: the memory estimate, gradient checkpointing, 8-bit AdamW, checkpoints that a
build killed with SIGKILL resumes from exactly, and several processes (DDP, FSDP) on CPU."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, leftovers, write_spec

from stages import train
from stages.formats import lora
from stages.ground.errors import BuildError
from stages.ground.spec import TrainSpec

DATA = "".join(json.dumps({"instruction": f"Say {i}.", "output": f"Answer: {i}."}) + "\n" for i in range(24))


def spec_text(**train_fields) -> str:
    fields = {"dataset": "data.jsonl", "validation": 0.25, "batch_size": 4, "max_steps": 40, "eval_every": 10,
              "learning_rate": 0.01} | train_fields
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in fields.items())
    return f'[[models]]\nname = "m"\nbase = "tiny"\nquantize = []\n\n[models.train]\n{lines}' \
           '\n[models.train.lora]\nr = 4\ndropout = 0.1\n'


def workspace(folder: Path, tiny_model: Path, **train_fields) -> Path:
    shutil.copytree(tiny_model, folder / "tiny")
    (folder / "data.jsonl").write_text(DATA)
    return write_spec(folder, spec_text(**train_fields))


def doit_command(spec: Path, *tasks: str) -> list[str]:
    return [sys.executable, "-m", "doit", "run", "-f", str(REPO / "dodo.py"), *tasks, f"spec={spec}"]


def build(spec: Path, *tasks: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(doit_command(spec, *tasks), capture_output=True, text=True, cwd=REPO)
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def adapter_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / "cache/m/adapter" / name).read_bytes() for name in lora.ADAPTER_FILES}


def checkpoints(folder: Path) -> list[Path]:
    return sorted((folder / "cache/m/adapter.work/checkpoints").glob("*/step-*"))


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / train.LOG).read_text().splitlines()]


# ---- memory ----

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}


@pytest.fixture
def llama_7b_config(tmp_path, smollm_tokenizer) -> Path:
    """A Llama-7B-shaped base of config.json and a tokenizer, no weights: a run that loaded them would fail."""
    folder = shutil.copytree(smollm_tokenizer, tmp_path / "llama-7b")
    (folder / "config.json").write_text(json.dumps(LLAMA_7B))
    return folder


def seven_b_spec(**fields) -> TrainSpec:
    return TrainSpec.model_validate({"dataset": str(REPO / "data/demo.jsonl"), "device": "cpu", **fields})


def test_the_estimate_counts_a_7b_model_by_its_own_code(llama_7b_config):
    from transformers import AutoConfig

    from stages.training import memory

    shape = memory.shape_of(AutoConfig.from_pretrained(llama_7b_config), ["q_proj", "v_proj"], 8)
    assert shape.params == 6_738_415_616  # Llama 2 7B's parameter count
    assert shape.lora_params == 32 * 2 * 8 * (4096 + 4096)  # 4.2M: PEFT's count for r=8 on q and v


def test_an_impossible_run_is_refused_before_anything_is_loaded(llama_7b_config, tmp_path):
    spec = seven_b_spec(max_memory="8GB")
    with pytest.raises(BuildError) as err:
        train.run(llama_7b_config, tmp_path / "adapter", spec, "seven")
    text = str(err.value)
    assert "training would need about" in text and "more than the 7.5 GiB that max_memory allows" in text
    assert "weights 25.1 GiB" in text and "use a machine with more memory" in text
    assert not (tmp_path / "adapter").exists()


def test_the_refusal_names_the_options_that_would_fit(llama_7b_config, tmp_path):
    spec = seven_b_spec(max_memory="30GB", gradient_checkpointing=False)
    with pytest.raises(BuildError) as err:
        train.run(llama_7b_config, tmp_path / "adapter", spec, "seven")
    text = str(err.value)
    assert "more than the 27.9 GiB that max_memory allows. These would fit: gradient_checkpointing = true (≈ " in text, text
    assert "batch_size = 1 with grad_accum = 8 (≈ " in text, text


def test_gradient_checkpointing_turns_on_when_only_it_fits(llama_7b_config):
    import torch

    on, needed = train.check_memory(llama_7b_config, seven_b_spec(max_memory="40GB"), "cpu", torch.float32, 256)
    assert on and needed.total <= 40 * 2**30
    off, _ = train.check_memory(llama_7b_config, seven_b_spec(max_memory="200GB"), "cpu", torch.float32, 256)
    assert not off


# ---- spec errors ----

@pytest.mark.parametrize("fields, expected", [
    ({"qlora": True, "device": "cpu"}, "qlora = true needs a CUDA GPU (bitsandbytes' 4-bit kernels) and the device here is cpu"),
    ({"qlora": True, "device": "mps"}, "the device here is mps"),
    ({"processes": 2, "device": "mps"}, "Apple's MPS runs one process"),
    ({"fsdp": True}, "fsdp = true shards the model over several processes: set processes = 2 or more"),
    ({"fsdp": True, "processes": 2, "optimizer": "adamw_8bit"}, "it does not combine with qlora or adamw_8bit"),
    ({"checkpoint_every": "10 minutes"}, "'10 minutes' is neither a step count nor a duration"),
    ({"max_memory": "lots"}, "'lots' is not a size"),
])
def test_training_options_a_device_cannot_honour_are_spec_errors(tmp_path, fields, expected):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "data.jsonl").write_text(DATA)
    spec = write_spec(tmp_path, spec_text(**fields))
    done = subprocess.run([sys.executable, "-m", "doit", "list", "-f", str(REPO / "dodo.py"), f"spec={spec}"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and expected in done.stdout + done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_qlora_with_device_auto_asks_this_machine_for_cuda():
    import torch

    fields = {"dataset": str(REPO / "data/demo.jsonl"), "qlora": True}
    if torch.cuda.is_available():
        assert TrainSpec.model_validate(fields).qlora
    else:
        with pytest.raises(ValueError, match=r"the device here is (cpu|mps) \(no CUDA GPU\)"):
            TrainSpec.model_validate(fields)


# ---- memory options on CPU ----

def test_gradient_checkpointing_keeps_the_loss_curve(tiny_llama, tmp_path):
    logs = {}
    for on in (False, True):
        spec = TrainSpec.model_validate({"dataset": str(REPO / "data/demo.jsonl"), "max_steps": 6, "batch_size": 4,
                                         "eval_every": 3, "gradient_checkpointing": on})
        facts = train.run(tiny_llama, tmp_path / str(on), spec, "tiny", threads=2)
        assert ("gradient_checkpointing" in facts) is on
        logs[on] = read_log(tmp_path / str(on))
    for plain, recomputed in zip(logs[False], logs[True], strict=True):
        for key in ("train_loss", "val_loss"):
            if key in plain:
                assert recomputed[key] == pytest.approx(plain[key], abs=1e-5), (key, plain, recomputed)


def test_adamw_8bit_trains_with_bitsandbytes_on_cpu(tiny_llama, tmp_path):
    spec = TrainSpec.model_validate({"dataset": str(REPO / "data/demo.jsonl"), "max_steps": 12, "batch_size": 4,
                                     "eval_every": 12, "learning_rate": 0.01, "optimizer": "adamw_8bit"})
    train.run(tiny_llama, tmp_path / "eight", spec, "tiny", threads=2)
    val = [row["val_loss"] for row in read_log(tmp_path / "eight") if "val_loss" in row]
    assert val[-1] < val[0] - 0.5, val
    plain = spec.model_copy(update={"optimizer": "adamw"})
    train.run(tiny_llama, tmp_path / "plain", plain, "tiny", threads=2)
    assert (tmp_path / "eight" / lora.WEIGHTS).read_bytes() != (tmp_path / "plain" / lora.WEIGHTS).read_bytes()


# ---- checkpoints and exact resume ----

def kill_during_training(spec: Path, folder: Path, delay: float, *, rank: int | None = None) -> str:
    """Start the train task, wait for its first checkpoint (or for rank `rank` to be training),
    then SIGKILL the whole build (or that one rank) `delay` seconds later; returns its output."""
    proc = subprocess.Popen(doit_command(spec, "train"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not checkpoints(folder):
        time.sleep(0.02)
    time.sleep(delay)
    if rank is None:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(rank_pid(proc.pid, rank), signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    return output


def rank_pid(root: int, rank: int) -> int:
    """The training process of `rank` among the descendants of `root` (by its RANK variable)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"stages.train" in cmdline and f"RANK={rank}".encode() in environ and root in ancestors(int(entry.name)):
            return int(entry.name)
    raise AssertionError(f"no training process of rank {rank}")


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        chain.append(pid)
    return chain


@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_adapter_bytes(tiny_llama, tmp_path):
    whole = workspace(tmp_path / "whole", tiny_llama, checkpoint_every=3, max_steps=80)
    build(whole, "train")
    expected = adapter_bytes(tmp_path / "whole")
    assert not (tmp_path / "whole/cache/m/adapter.work").exists(), "checkpoints are removed when the stage completes"
    trials = random.Random(14)
    continued = 0
    for trial in range(1):  # and one more with keep = "best" below, and a DPO run in test_preference.py
        folder = tmp_path / f"killed-{trial}"
        spec = workspace(folder, tiny_llama, checkpoint_every=3, max_steps=80)
        kill_during_training(spec, folder, trials.uniform(0, 2.0))  # the 80 steps take about 4 s
        assert not (folder / "cache/m/adapter").exists() or adapter_bytes(folder) == expected
        output = build(spec, "train").stdout
        continued += "continuing from the checkpoint at step" in output
        assert adapter_bytes(folder) == expected, f"trial {trial}: the resumed adapter differs"
        assert not (folder / "cache/m/adapter.work").exists()
    assert continued >= 1, f"none of the {trial + 1} kills landed after a checkpoint"


@pytest.mark.slow
def test_a_killed_run_that_keeps_its_best_resumes_to_the_same_adapter(tiny_llama, tmp_path):
    """keep = "best": the best validation's weights travel in the checkpoints, so a run killed after
    its best and resumed keeps that step's adapter, as the run never killed does."""
    # 240 steps: with the loss projected only at the answers' positions, 80 tiny steps ended within the kill's delay
    options = dict(checkpoint_every=3, max_steps=240, keep="best", eval_every=2, learning_rate=0.05, schedule="constant")
    build(workspace(tmp_path / "whole", tiny_llama, **options), "train")
    expected = adapter_bytes(tmp_path / "whole")
    last = json.loads((tmp_path / "whole/cache/m/adapter/train_log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 240 and last["kept_step"] < 240, "a best before the end, so it must travel"
    trials = random.Random(15)
    folder = tmp_path / "killed"
    spec = workspace(folder, tiny_llama, **options)
    kill_during_training(spec, folder, trials.uniform(1.0, 2.5))
    output = build(spec, "train").stdout
    assert "continuing from the checkpoint at step" in output, "the kill landed after a checkpoint"
    assert adapter_bytes(folder) == expected, "the resumed run kept another adapter"


@pytest.mark.slow
def test_a_changed_learning_rate_after_a_kill_starts_fresh(tiny_llama, tmp_path):
    spec = workspace(tmp_path, tiny_llama, checkpoint_every=3)
    kill_during_training(spec, tmp_path, 0.5)
    old = checkpoints(tmp_path)
    assert old, "the kill came after a checkpoint"
    spec.write_text(spec_text(checkpoint_every=3, learning_rate=0.02))
    output = build(spec, "train").stdout
    assert "continuing from the checkpoint" not in output
    assert not any(p.exists() for p in old)


@pytest.mark.slow
def test_doit_clean_removes_a_killed_runs_checkpoints(tiny_llama, tmp_path):
    spec = workspace(tmp_path, tiny_llama, checkpoint_every=3)
    kill_during_training(spec, tmp_path, 0.2)
    assert checkpoints(tmp_path)
    subprocess.run([sys.executable, "-m", "doit", "clean", "-f", str(REPO / "dodo.py"), "train", f"spec={spec}"],
                   check=True, capture_output=True, cwd=REPO)
    assert not (tmp_path / "cache/m/adapter.work").exists()


# ---- several processes ----

@pytest.mark.slow
def test_two_processes_train_with_ddp_reproducibly(tiny_llama, tmp_path):
    adapters = []
    for name in ("one", "two"):
        spec = workspace(tmp_path / name, tiny_llama, processes=2, learning_rate=0.05, max_steps=20)
        output = build(spec, "train").stdout
        assert "2 processes" in output and re.findall(r"^\.  train:m$", output, re.M) == [".  train:m"], output[-3000:]
        adapters.append(adapter_bytes(tmp_path / name))
    assert adapters[0] == adapters[1]
    val = [row["val_loss"] for row in read_log(tmp_path / "one/cache/m/adapter") if "val_loss" in row]
    assert val[-1] < val[0] - 0.3, val
    run = json.loads((tmp_path / "one/cache/.runs/train.m.json").read_text())
    assert run["platform"]["processes"] == "2", "the lock records how many processes shaped the floats"


@pytest.mark.slow
def test_fsdp_shards_and_trains_the_same_adapter_as_ddp(tiny_llama, tmp_path):
    for name, fields in (("ddp", {}), ("fsdp", {"fsdp": True})):
        build(workspace(tmp_path / name, tiny_llama, processes=2, max_steps=6, **fields), "train")
    assert adapter_bytes(tmp_path / "fsdp") == adapter_bytes(tmp_path / "ddp")


@pytest.mark.slow
def test_a_killed_rank_fails_the_task_clearly_and_the_rerun_resumes(tiny_llama, tmp_path):
    whole = workspace(tmp_path / "whole", tiny_llama, processes=2, max_steps=40, checkpoint_every=3)
    build(whole, "train")
    spec = workspace(tmp_path / "killed", tiny_llama, processes=2, max_steps=40, checkpoint_every=3)
    output = kill_during_training(spec, tmp_path / "killed", 0.3, rank=1)
    assert "training failed in rank 1 of 2: the process died of SIGKILL" in output, output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "killed/cache/m/adapter").exists()
    assert leftovers(tmp_path / "killed/cache/m") == []
    rerun = build(spec, "train").stdout
    assert "continuing from the checkpoint at step" in rerun
    assert adapter_bytes(tmp_path / "killed") == adapter_bytes(tmp_path / "whole")


@pytest.mark.slow
def test_an_error_in_the_ranks_is_named_once(tiny_llama, tmp_path):
    spec = workspace(tmp_path, tiny_llama, processes=2)
    spec.write_text(spec.read_text().replace("dropout = 0.1\n", 'dropout = 0.1\ntarget_modules = ["qkv_proj"]\n'))
    done = build(spec, "train", check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    # both ranks fail the same way; the launcher names the first it saw
    assert re.search(r"training failed in rank [01] of 2: lora.target_modules qkv_proj are not in", output), output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "cache/m/adapter").exists()


def test_the_rank_that_failed_is_named_not_the_one_the_launcher_stopped(tmp_path):
    """torch's launcher stops the other ranks with SIGTERM and times failures to the second: the rank that
    died of something else is the cause, whichever the clock lists first."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from stages.training.distributed import failure_text

    missing = str(tmp_path / "error.json")
    stopped = ProcessFailure(local_rank=0, pid=1, exitcode=-signal.SIGTERM, error_file=missing)
    killed = ProcessFailure(local_rank=1, pid=2, exitcode=-signal.SIGKILL, error_file=missing)
    killed.timestamp = stopped.timestamp + 1  # listed later, as under a loaded machine
    assert "rank 1 of 2: the process died of SIGKILL" in failure_text({0: stopped, 1: killed}, 2)
    assert "rank 0 of 2: the process died of SIGTERM" in failure_text({0: stopped}, 2)  # a user's kill
