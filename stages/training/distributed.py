"""Several training processes: torchrun's launcher (torch.distributed's elastic agent, which
`accelerate launch` also runs) starts them, and torch.distributed joins them, with DDP or FSDP2.
accelerate's wrappers are not used: on CPU they ignore FSDP, and DDP needs nothing they add.

The doit task stays one task: it launches N copies of `python -m stages.train JOB`, waits, and
turns a rank that failed (an exception, an out-of-memory kill, a signal) into one BuildError
naming the rank and the cause. The ranks write the adapter into the job folder; only when every
rank has exited cleanly is it renamed into place, so a failed run leaves no adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..ground.errors import BuildError

JOB = "job.json"
FACTS = "facts.json"


@dataclass
class Ranks:
    """This process's place among the training processes, and what the loop asks of the others."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    fsdp: bool = False

    @classmethod
    def joined(cls, device: str, fsdp: bool) -> Ranks:
        """Join the process group torchrun's launcher set up (RANK, WORLD_SIZE, MASTER_ADDR in the environment)."""
        import torch

        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), device, fsdp)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def wrap(self, model):
        """DDP (a copy of the model per process, gradients averaged), or FSDP2: each decoder layer's
        weights sharded over the processes and gathered only while that layer runs."""
        if not self.distributed:
            return model
        import torch

        if not self.fsdp:
            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        layer_classes = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module)
        fully_shard(model)
        return model

    def unwrap(self, model):
        return model.module if isinstance(model, _ddp()) else model

    def trained_state(self, model) -> dict | None:
        """The trained (LoRA) weights, whole, on the main process; None on the others."""
        if not self.distributed:
            return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_whole(ignore_frozen_params=True))
        return state if self.main else None

    def optimizer_state(self, model, optimizer) -> dict | None:
        if not self.distributed:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=_whole())
        return state if self.main else None

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        if not self.distributed:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_whole(broadcast_from_rank0=False, cpu_offload=False))

    def total(self, *values: float) -> list[float]:
        """The sums of values over every process."""
        if not self.distributed:
            return list(values)
        import torch

        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(summed)
        return summed.tolist()

    def gather(self, value) -> list:
        """value of every process, in rank order."""
        if not self.distributed:
            return [value]
        import torch

        values = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one: so they all checkpoint at the same step."""
        return self.total(float(flag))[0] > 0

    def barrier(self) -> None:
        if self.distributed:
            import torch
            torch.distributed.barrier()

    def leave(self) -> None:
        if self.distributed:
            import torch
            torch.distributed.destroy_process_group()


def _ddp():
    import torch
    return torch.nn.parallel.DistributedDataParallel


def _whole(**options):
    """State dict options: whole tensors gathered to the main process's CPU memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**{"full_state_dict": True, "cpu_offload": True} | options)


def launch(job: dict, work: Path, processes: int, threads_per_rank: int, gang: dict | None = None) -> Path:
    """Run `python -m stages.train JOB` in `processes` ranks; returns the job folder they wrote into.
    With `gang` (one node of a run over several): this node's agent meets the others' at the c10d
    rendezvous on `gang["endpoint"]` (the first node hosts it), and ranks count across the nodes."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Nodes of one run may share the work folder (the store's, so checkpoints outlive a lost node): a job folder each.
    folder = work / ("job" if gang is None else f"job-{gang['node_rank']}")
    shutil.rmtree(folder, ignore_errors=True)  # what a failed run left: its ranks' part of an adapter, their logs
    folder.mkdir(parents=True)
    (folder / JOB).write_text(json.dumps(job), encoding="utf-8")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the failure is ours to tell
    # Each rank's stderr goes to its own log: a rank that fails takes the others down with it, and
    # their tracebacks would only bury the cause. stdout is ours (only the main rank prints there).
    logs = DefaultLogsSpecs(log_dir=str(folder / "logs"), redirects=Std.ERR)
    nodes = gang["nodes"] if gang else 1
    meeting = {"rdzv_endpoint": gang["endpoint"], "run_id": gang["run_id"],
               "rdzv_configs": {"is_host": gang["node_rank"] == 0, "join_timeout": 300}} if gang else \
        {"rdzv_endpoint": "127.0.0.1:0", "run_id": f"modelmake-{os.getpid()}"}
    config = LaunchConfig(min_nodes=nodes, max_nodes=nodes, nproc_per_node=processes, rdzv_backend="c10d",
                          max_restarts=0, monitor_interval=0.5, start_method="spawn", logs_specs=logs, **meeting)
    threads_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads_per_rank)  # the ranks inherit our environment
    try:
        elastic_launch(config, sys.executable)("-m", "stages.train", str(folder / JOB))
    except ChildFailedError as failed:
        raise BuildError(failure_text(failed.failures, processes * nodes)) from None
    finally:
        if threads_before is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = threads_before
    return folder


def failure_text(failures: dict, processes: int) -> str:
    """One paragraph for the rank that failed first. The launcher stops the others with SIGTERM, and
    times failures to the second, so a rank that died of SIGTERM is the cause only if all did."""
    import signal

    stopped = lambda f: f.exitcode == -signal.SIGTERM  # noqa: E731
    first = min(failures.values(), key=lambda f: (stopped(f), f.timestamp))
    log = Path(first.error_file).parent / "stderr.log" if first.error_file else None
    where = f" (its output: {log})" if log and log.is_file() and log.stat().st_size else ""
    rank = next(r for r, f in failures.items() if f is first)  # the run's rank: across nodes, not the node's own
    return f"training failed in rank {rank} of {processes}: {_cause(first)}{where}; no adapter was written"


def _cause(failure) -> str:
    if failure.exitcode < 0:
        name = failure.signal_name()
        hint = " (the out-of-memory killer sends it when the machine runs out of RAM)" if name == "SIGKILL" else ""
        return f"the process died of {name}{hint}"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return str(message or f"exit status {failure.exitcode}").removeprefix("BuildError: ").strip()
