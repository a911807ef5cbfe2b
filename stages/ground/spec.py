"""`models.toml` → typed, validated spec.

Everything the rest of modelmake knows about the user's intent comes from here,
with defaults filled in, so a stage's parameters are exactly what this module says.
Validation is strict: an unknown key is an error that suggests the nearest valid name.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import matrix
from .errors import BuildError
from .units import duration_seconds, parse_size

# llama.cpp's `llama_ftype` numbers, as `llama-quantize` names them.
QUANT_TYPES: dict[str, int] = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25,
    "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "TQ1_0": 36, "TQ2_0": 37,
    "F16": 1, "BF16": 32,
}
# The types whose few bits only work with an importance matrix to say which weights matter
# (llama-quantize refuses IQ1/IQ2 without one; IQ3 without one is far worse than Q3_K).
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"}
# The variant name of a quant type made again without the importance matrix, to measure what the
# matrix buys (`compare_without_imatrix`): "Q4_K_M-no-imatrix". Measured, never released.
WITHOUT_IMATRIX = "-no-imatrix"

OutType = Literal["f32", "f16", "bf16", "q8_0", "auto"]  # "auto" is resolved to f16 or bf16 when the spec is read

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
VARIANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._+-]+)?$"  # a matrix variant: model@labels

# Folders modelmake keeps in the cache beside each model's own (cache/<model>): a model may not share
# one. Compared without case, because macOS and Windows file systems do not tell `Report` from `report`.
CACHE_FOLDERS = {"report": "the build report", "pulled": "what `doit pull` fetched"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseRef(Strict):
    """Where a model's weights come from, resolved to something a stage can read."""

    text: str  # as the spec wrote it: how manifests name the base, the same on every machine
    kind: Literal["gguf", "hf_dir", "hub"]
    location: str  # absolute path for gguf / hf_dir, repo id for hub
    revision: str | None = None  # hub only: a branch, tag or commit; required

    @property
    def path(self) -> Path:
        return Path(self.location)


def _spec_dir(info) -> Path:
    return (info.context or {}).get("spec_dir", Path.cwd())


def _spec_path(text: str | Path, spec_dir: Path) -> Path:
    """A path as the spec writes it: `~` expanded, relative to the spec's folder."""
    path = Path(text).expanduser()
    return (path if path.is_absolute() else spec_dir / path).resolve()


def _resolve_file(value, info, what: str, folder: bool = False) -> Path:
    """A file (or with `folder`, a folder) the spec names, which must be there and of that kind."""
    path = _spec_path(value, _spec_dir(info))
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist (relative paths start at the spec's folder)")
    if folder and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder: give the folder that holds it")
    if not folder and not path.is_file():
        raise ValueError(f"{what} {path} is a folder, not a file: give the path of the file itself")
    return path


def _switch_or_file(value, info, what: str) -> bool | Path:
    """A setting that is true, false, or a file of the user's (relative to the spec)."""
    if isinstance(value, bool):
        return value
    return _resolve_file(value, info, what)


def _auto_device() -> str:
    """What device = "auto" picks on this machine (torch is imported only for a spec that asks)."""
    from .device import pick_device

    device = pick_device("auto")
    return device if device == "cuda" else f"{device} (no CUDA GPU)"


class LoraSpec(Strict):
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r


DatasetFormat = Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference"]


def _fraction_or_file(value, info):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value < 1:
            raise ValueError("a validation fraction is at least 0 and below 1")
        return float(value)
    return _resolve_file(value, info, "validation file")


class DataSource(Strict):
    """One dataset of a weighted training mix ([[models.train.datasets]])."""

    path: Path  # a JSONL file of conversations
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # its share of the mix: weight / the sum of weights
    validation: float | Path | None = None  # a held-out fraction of it, or its own file; default: [models.train]'s
    format: DatasetFormat = "auto"

    @field_validator("path", mode="before")
    @classmethod
    def _exists(cls, value, info):
        return _resolve_file(value, info, "dataset")

    @field_validator("validation", mode="before")
    @classmethod
    def _validation_file_or_fraction(cls, value, info):
        return None if value is None else _fraction_or_file(value, info)

    def params(self) -> dict:
        validation = self.validation if not isinstance(self.validation, Path) else "file"
        return {"weight": self.weight, "validation": validation}


# What each report_to tracker imports: the optional extras of pyproject.toml.
TRACKERS = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy")}


class TrainSpec(Strict):
    dataset: Path | None = None  # JSONL of conversations: alpaca, OpenAI messages, ShareGPT or prompt-completion records
    datasets: list[DataSource] = Field(default_factory=list)  # or several, mixed by weight
    validation: float | Path = 0.1  # a held-out fraction of dataset, or a second JSONL file
    # The records' format (formats.dataset): "auto" takes each file's first record's. Only a check: the
    # conversations read are the same either way, so it is not part of the task's key.
    format: DatasetFormat = "auto"
    template: Literal["chat", "alpaca"] = "chat"  # chat: the base model's own chat template
    system: str | None = None  # a system prompt put before every conversation that has none
    max_seq_len: int = Field(default=256, ge=8)
    packing: bool = False
    lora: LoraSpec = Field(default_factory=LoraSpec)
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = "adamw"  # adamw_8bit: bitsandbytes' 8-bit state
    learning_rate: float = Field(default=2e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    epochs: int = Field(default=1, ge=1)
    max_steps: int = Field(default=0, ge=0)  # 0: as many as `epochs` take
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    eval_every: int = Field(default=10, ge=1)  # steps between validation losses
    # Stop when this many validation losses in a row were no better than the best (0: never stop early).
    early_stopping_patience: int = Field(default=0, ge=0)
    keep: Literal["last", "best"] = "last"  # the adapter of the last step, or of the lowest validation loss
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    resume: bool = False  # continue from the adapter of the previous build instead of starting fresh
    # Memory: None lets the estimate decide (on when the activations would not fit without it).
    gradient_checkpointing: bool | None = None
    qlora: bool = False  # a 4-bit NF4 base (bitsandbytes, double quantization, bf16 compute): CUDA only
    max_memory: str | None = None  # what training may use (e.g. "20GB"); default: the device's free memory
    # Every N steps, or every "10min" / "30s" / "1h" of training; 0 turns checkpoints off.
    checkpoint_every: int | str = "10min"
    processes: int = Field(default=1, ge=1)  # >1: DDP over that many processes (torchrun's agent, torch.distributed)
    fsdp: bool = False  # shard the weights over the processes instead of copying them (FSDP2)
    # >1: one run over that many Ray nodes, `processes` on each (executor = "ray"): torch's elastic agents
    # meet at a c10d rendezvous; the adapter is the one nodes × processes processes on one machine train.
    nodes: int = Field(default=1, ge=1)
    # Experiment tracking (optional extras): TensorBoard event files as the run trains, an MLflow run
    # once the build is done. Neither changes the task's key or the adapter's bytes.
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    # sft: supervised, on the answers. dpo / orpo: preference tuning on {prompt, chosen, rejected} records.
    method: Literal["sft", "dpo", "orpo"] = "sft"
    beta: float = Field(default=0.1, gt=0, allow_inf_nan=False)  # DPO's β (KL strength) or ORPO's λ, as TRL names both
    # Another model of this spec whose adapter this run continues (SFT, then DPO on top): its train task
    # runs first, and its adapter is where this one starts and, for DPO, the reference it is held near.
    start_from: str | None = None
    # What the run asks of a node under the Ray executor, in Ray's names; default: 1 GPU per process on cuda.
    resources: dict[str, int | float | str] | None = None

    @field_validator("resources")
    @classmethod
    def _ray_names(cls, value):
        return None if value is None else _resources(value)

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value):
        import importlib.util

        for tracker in value:
            missing = [m for m in TRACKERS[tracker] if importlib.util.find_spec(m) is None]
            if missing:
                raise ValueError(f"report_to = [\"{tracker}\"] needs {' and '.join(missing)}, which is not "
                                 f"installed: pip install -e '.[{tracker}]' (or take \"{tracker}\" out of report_to)")
        return list(dict.fromkeys(value))

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_exists(cls, value, info):
        return None if value is None else _resolve_file(value, info, "dataset")

    @field_validator("validation", mode="before")
    @classmethod
    def _validation_file_or_fraction(cls, value, info):
        return _fraction_or_file(value, info)

    @model_validator(mode="after")
    def _one_way_to_name_the_data(self):
        if (self.dataset is None) == (not self.datasets):
            raise ValueError("name the training data once: dataset = \"data.jsonl\", or several with weights as "
                             "[[models.train.datasets]] tables (path, weight)")
        if (self.early_stopping_patience or self.keep == "best") and not self.validates:
            raise ValueError("early_stopping_patience and keep = \"best\" follow the validation loss, and no record is "
                             "held out: set validation to a fraction above 0 or a file")
        if self.datasets and isinstance(self.validation, Path):
            raise ValueError("with [[models.train.datasets]], a validation file belongs to its source: set "
                             "validation = \"val.jsonl\" in that source's table (or a fraction here, for every source)")
        if self.method != "sft" and self.packing:
            raise ValueError(f"method = \"{self.method}\" scores each answer of a pair whole: packing does not apply; "
                             "set packing = false")
        if self.method != "sft" and self.resume:
            raise ValueError(f"method = \"{self.method}\" starts from the base or another model's adapter: continue "
                             "one with start_from = \"<model>\" instead of resume = true")
        paths = [s.path for s in self.datasets]
        if len(set(paths)) < len(paths):
            raise ValueError("[[models.train.datasets]] names the same file twice: give it one source, with the weight "
                             "of both")
        return self

    @field_validator("max_memory")
    @classmethod
    def _a_size(cls, value):
        if value is not None:
            parse_size(value)
        return value

    @field_validator("checkpoint_every")
    @classmethod
    def _steps_or_duration(cls, value):
        if isinstance(value, str):
            duration_seconds(value)  # raises the ValueError that names what to write
        if isinstance(value, int) and value < 0:
            raise ValueError("a step count is at least 0 (0: no checkpoints)")
        return value

    @model_validator(mode="after")
    def _devices_support_the_options(self):
        if self.qlora and self.device != "cuda":
            where = self.device if self.device != "auto" else _auto_device()
            if where != "cuda":
                raise ValueError(
                    f"qlora = true needs a CUDA GPU (bitsandbytes' 4-bit kernels) and the device here is {where}; "
                    "to save memory elsewhere use gradient_checkpointing = true, optimizer = \"adamw_8bit\" and a "
                    "smaller batch_size with grad_accum, or train on a CUDA machine")
        if (self.processes > 1 or self.nodes > 1) and self.device == "mps":
            raise ValueError("processes > 1 and nodes > 1 need CPU cores or CUDA GPUs: Apple's MPS runs one process")
        if self.fsdp and self.processes * self.nodes < 2:
            raise ValueError("fsdp = true shards the model over several processes: set processes = 2 or more")
        if self.fsdp and (self.qlora or self.optimizer == "adamw_8bit"):
            raise ValueError("fsdp = true shards float weights and optimizer state: it does not combine with qlora "
                             "or adamw_8bit here; use processes = N without fsdp (DDP) for those")
        return self

    @property
    def sources(self) -> list[DataSource]:
        """Where the records come from, as a mix: the datasets, or the one dataset (weight 1)."""
        if self.datasets:
            return [s if s.validation is not None else s.model_copy(update={"validation": self.validation})
                    for s in self.datasets]
        return [DataSource.model_construct(path=self.dataset, weight=1.0, validation=self.validation, format=self.format)]

    @property
    def validates(self) -> bool:
        """Whether any record is held out for validation (a fraction above 0, or a file)."""
        return any(s.validation for s in self.sources)

    @property
    def data_files(self) -> list[Path]:
        """The JSONL files the records come from: each dataset, and the validation files named."""
        return [f for s in self.sources for f in (s.path, *([s.validation] if isinstance(s.validation, Path) else []))]

    def split_params(self) -> dict:
        """The params that decide which records are held out and how a record is written: what the
        held-out conversations, the eval prompts and the calibration text depend on."""
        return {key: value for key, value in self.params().items()
                if key in ("validation", "template", "system", "seed", "datasets")}

    def params(self) -> dict:
        """What shapes the adapter besides the data files themselves (their bytes are inputs)."""
        # Checkpoints and the memory limit change when the work is saved or refused, never its result.
        params = self.model_dump(mode="json", exclude={"dataset", "datasets", "validation", "resume", "max_memory",
                                                       "checkpoint_every", "format", "report_to",
                                                       "resources"})
        if self.datasets:  # a single dataset's params stay as they were before mixes
            params["datasets"] = [s.params() for s in self.sources]
        for key, default in (("early_stopping_patience", 0), ("keep", "last"), ("method", "sft"), ("beta", 0.1),
                             ("start_from", None), ("nodes", 1)):  # so they did before these were added
            if params[key] == default:
                del params[key]
        return params | {"validation": self.validation if isinstance(self.validation, float) else "file"}


class AdapterSpec(Strict):
    path: Path | None = None  # an existing PEFT adapter folder to use instead of training one
    allow_pickle: bool = False  # accept adapter_model.bin (pickles can run code when loaded)
    outtype: Literal["f32", "f16"] = "f16"  # of the GGUF LoRA

    @field_validator("path", mode="before")
    @classmethod
    def _folder_exists(cls, value, info):
        return None if value is None else _resolve_file(value, info, "adapter folder", folder=True)


class PackageSpec(Strict):
    """[models.package]: what goes beside the GGUF for Ollama, Docker Model Runner and Compose."""

    license: Path | None = None  # a license text: an OCI layer, LICENSE in the Modelfile
    system: str | None = None  # Ollama SYSTEM: the system prompt when a request brings none
    parameters: dict[str, int | float | str | bool | list[str]] = Field(default_factory=dict)  # Ollama PARAMETERs
    context_size: int | None = Field(default=None, ge=1)  # default: the model's, at most 4096

    @field_validator("license", mode="before")
    @classmethod
    def _license_exists(cls, value, info):
        return None if value is None else _resolve_file(value, info, "license file")

    @field_validator("parameters")
    @classmethod
    def _plain_parameter_names(cls, parameters: dict) -> dict:
        for name in parameters:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an Ollama parameter name (e.g. temperature, top_p, num_ctx)")
        if "stop" in parameters and not isinstance(parameters["stop"], list):
            raise ValueError("stop is a list of strings, e.g. stop = [\"</answer>\"]")
        return parameters


class PublishSpec(Strict):
    """[package]: where `doit push` sends every packaged variant."""

    registry: str | None = Field(default=None, pattern=r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*$")  # host[:port]/namespace
    tag: str = "{model}:{variant}"  # repository and tag under the registry
    tls_verify: bool | None = None  # default: plain HTTP for loopback hosts (as Docker does), TLS elsewhere

    @field_validator("tag")
    @classmethod
    def _known_fields(cls, tag: str) -> str:
        try:
            filled = tag.format(model="m", variant="Q4_K_M")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"{tag!r}: only {{model}} and {{variant}} can be filled in") from None
        if not re.fullmatch(r"[a-z0-9._/-]+:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", filled):
            raise ValueError(f"{tag!r} must give 'repository:tag' (e.g. '{{model}}:{{variant}}')")
        return tag


class CacheSpec(Strict):
    """[cache]: where outputs go, and the action cache that keeps finished outputs by action key,
    locally and in an OCI registry (`cache = "folder"` alone is short for `[cache] dir = "folder"`)."""

    dir: Path = Path("cache")  # outputs and doit's state, relative to the spec
    store: Path | None = None  # the local action cache; default <dir>/.store; checkouts on one machine may share one
    remote: str | None = Field(default=None, pattern=r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+$")  # host[:port]/repository
    push: bool = False  # upload every output this build makes to the remote (CI caches often only pull)
    tls_verify: bool | None = None  # default: plain HTTP for loopback hosts (as Docker does), TLS elsewhere

    @field_validator("store", mode="before")
    @classmethod
    def _store_path(cls, value, info):
        return None if value is None else _spec_path(value, _spec_dir(info))

    @model_validator(mode="after")
    def _push_needs_remote(self):
        if self.push and not self.remote:
            raise ValueError('push = true needs remote = "host[:port]/repository" to push to')
        return self


class ConvertSpec(Strict):
    """[models.convert]: which converter writes the GGUFs."""

    # "auto": modelmake's own where it has a plan for the architecture (faster, byte-checked against
    # llama.cpp's), else llama.cpp's convert_hf_to_gguf.py from the pinned source; "llama.cpp": always
    # the pinned one; "native": always modelmake's own.
    engine: Literal["auto", "native", "llama.cpp"] = "auto"
    # Your own converter instead, run for each convert task; {model_dir}, {out} and {outtype} are filled
    # in. An argument that names an existing file (relative to the spec) is an input: editing it rebuilds.
    command: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_converter(self):
        if self.command and self.engine != "auto":
            raise ValueError(f"engine = \"{self.engine}\" and command name two converters; keep one")
        return self

    @field_validator("command")
    @classmethod
    def _writes_out(cls, command: list[str] | None) -> list[str] | None:
        if command is None:
            return command
        if not any("{out}" in arg for arg in command):
            raise ValueError("the command must write its GGUF to {out}, e.g. [\"python3\", "
                             "\"llama.cpp/convert_hf_to_gguf.py\", \"{model_dir}\", \"--outfile\", \"{out}\", "
                             "\"--outtype\", \"{outtype}\"]")
        for arg in command:
            try:
                arg.format(model_dir="", out="", outtype="")
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"{arg!r}: the placeholders are {{model_dir}}, {{out}} and {{outtype}}") from None
        return command

    def input_files(self, spec_dir: Path) -> list[Path]:
        return [path for arg in self.command or () if "{" not in arg
                and (path := _spec_path(arg, spec_dir)).is_file()]


class GateSpec(Strict):
    """What a variant must meet, against its reference GGUF, before it is packaged."""

    max_ppl_increase: float | None = Field(default=None, ge=0)  # 0.05: perplexity at most 5% above the reference's
    max_kl: float | None = Field(default=None, ge=0)  # mean KL divergence from the reference, in nats
    min_top1: float | None = Field(default=None, ge=0, le=1)  # share of tokens whose most likely next token agrees
    min_exact_match: float | None = Field(default=None, ge=0)  # share of answers equal to the expected one
    max_exact_match_drop: float | None = Field(default=None, ge=0)  # exact match at most this far under the reference's
    min_chrf: float | None = Field(default=None, ge=0)  # sacrebleu's corpus chrF, 0–100
    min_terminated: float | None = Field(default=None, ge=0, le=1)  # share of answers that end their turn in time
    # share of held-out preference pairs whose chosen answer the variant finds likelier (method = "dpo" / "orpo")
    min_preference_accuracy: float | None = Field(default=None, ge=0, le=1)

    @property
    def needs_text(self) -> bool:
        return any(v is not None for v in (self.max_ppl_increase, self.max_kl, self.min_top1))

    @property
    def needs_answers(self) -> bool:
        return any(v is not None for v in (self.min_exact_match, self.max_exact_match_drop, self.min_chrf,
                                           self.min_terminated))


class EvalSpec(Strict):
    """[models.eval]: how every GGUF variant is measured (perplexity, KL, speed) with llama.cpp."""

    text: Path | None = None  # held-out text; default: the train stage's validation split, as trained on
    context: int = Field(default=512, ge=16)  # tokens per perplexity window
    max_tokens: int = Field(default=8192, ge=32)  # of the held-out text, at most
    # Answer accuracy: a .jsonl of {"prompt" | "messages", "answer"} to answer by greedy generation;
    # default: the validation split's conversations. false: no generation.
    prompts: Path | bool = True
    max_new_tokens: int = Field(default=48, ge=1)  # per answer; generation also stops at the end of the turn
    max_prompts: int = Field(default=64, ge=1)  # of the prompts, at most (generation costs a model call per token)
    # Speed runs; unset, each follows the variant's size (stages.evaluate.speed_settings): 128 prompt
    # tokens, 32 generated, median of 3 runs, or 32, 8 and 1 above 1 GiB, where one token costs seconds.
    speed_prompt: int | None = Field(default=None, ge=1)  # prompt tokens per prompt-processing run
    speed_tokens: int | None = Field(default=None, ge=1)  # tokens per generation run
    speed_runs: int | None = Field(default=None, ge=1)  # timed runs; the median is reported
    gate: dict[str, GateSpec] = Field(default_factory=dict)  # by variant: a quant type, or "lora"

    @field_validator("text", mode="before")
    @classmethod
    def _text_exists(cls, value, info):
        return None if value is None else _resolve_file(value, info, "eval text")

    def answers_prompts(self, train: TrainSpec | None) -> bool:
        """Whether there are prompts to answer: a prompts file, or the validation split's conversations."""
        return isinstance(self.prompts, Path) or (self.prompts is True and train is not None and train.validates)

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_exist(cls, value, info):
        path = _switch_or_file(value, info, "eval prompts file")
        if isinstance(path, Path) and path.suffix != ".jsonl":
            raise ValueError(f"{path}: prompts are a .jsonl file of {{\"prompt\" | \"messages\", \"answer\"}} records")
        return path


class QuantizeSpec(Strict):
    """[models.quantize]: the quant types, and the importance matrix they are made with."""

    types: list[str] = Field(default_factory=list)
    # true: llama.cpp's imatrix on the training set as the train stage formats it; a path: on that
    # text file. It lowers the error of the K-quants and is what the IQ1–IQ3 types need.
    imatrix: bool | Path = False
    imatrix_context: int = Field(default=512, ge=16)  # tokens per chunk the imatrix is gathered over
    # Types to quantize a second time without the matrix, measured beside the released ones (not released).
    compare_without_imatrix: list[str] = Field(default_factory=list)

    @field_validator("imatrix", mode="before")
    @classmethod
    def _calibration_file(cls, value, info):
        path = _switch_or_file(value, info, "imatrix calibration file")
        if isinstance(path, bool):
            return path
        try:
            path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"imatrix calibration file {path} is not UTF-8 text (byte {err.start}): give a "
                             "plain text file, e.g. text like what the model will be asked") from None
        return path


class MergeSpec(Strict):
    """[models.merge]: whether the merged model is kept as a Hugging Face folder."""

    # false: no merged safetensors are written; convert folds the LoRA in as it writes the merged
    # GGUF (the same bytes, one pass over the weights less). true keeps cache/<model>/merged, for a hub upload.
    keep_hf: bool = True


# What [models.select] may choose on: eval figures that the same build always gives the same (speeds
# do not), with the direction that is better.
SELECT_METRICS = {"exact_match": True, "chrf": True, "bleu": True, "top1": True, "perplexity": False, "kl": False,
                  "size_mb": False, "preference_accuracy": True}


class SelectSpec(Strict):
    """[models.select]: which variant of the model's [models.matrix] ships under the model's own name."""

    metric: Literal["exact_match", "chrf", "bleu", "top1", "perplexity", "kl", "size_mb", "preference_accuracy"] = "exact_match"
    variant: str  # the release whose figure decides: a quant type, or "lora"
    maximize: bool | None = None  # default: what is better for the metric (higher exact match, lower perplexity)

    @property
    def maximizes(self) -> bool:
        return SELECT_METRICS[self.metric] if self.maximize is None else self.maximize


class ModelSpec(Strict):
    name: str = Field(pattern=VARIANT_PATTERN)
    base: BaseRef
    outtype: OutType = "f16"
    quantize: list[str] = Field(default_factory=list)  # `quantize = [...]` or [models.quantize] types = [...]
    quantize_options: QuantizeSpec = Field(default_factory=QuantizeSpec)  # the [models.quantize] table
    # llama.cpp's name for the BPE pre-tokenizer, for tokenizers convert cannot identify itself
    pretokenizer: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    train: TrainSpec | None = None
    adapter: AdapterSpec | None = None
    package: PackageSpec = Field(default_factory=PackageSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    convert: ConvertSpec | None = None
    merge: MergeSpec | None = None
    select: SelectSpec | None = None
    # Set by modelmake for a variant of [models.matrix] (stages.ground.matrix), never by users.
    matrix_of: str | None = None  # the model table it comes from
    varied: dict[str, Any] = Field(default_factory=dict)  # dotted key → this variant's value

    @model_validator(mode="before")
    @classmethod
    def _quantize_table(cls, data):
        if isinstance(data, dict) and "quantize_options" in data:
            raise ValueError("'quantize_options' is set by modelmake itself; write a [models.quantize] table")
        if isinstance(data, dict) and isinstance(data.get("quantize"), dict):
            table = data["quantize"]
            data = {**data, "quantize": table.get("types", []), "quantize_options": table}
        return data

    @property
    def imatrix(self) -> bool:
        return self.quantize_options.imatrix is not False

    @model_validator(mode="after")
    def _imatrix_types(self):
        needing = [q for q in self.quantize if q in NEEDS_IMATRIX]
        if needing and not self.imatrix:
            raise ValueError(f"quantize: {', '.join(needing)} need an importance matrix: write the quant types as "
                             "[models.quantize] types = [...] with imatrix = true (calibrated on the training set) "
                             "or imatrix = \"calibration.txt\"")
        if self.quantize_options.imatrix is True and not self.train:
            raise ValueError("quantize.imatrix = true calibrates on the training set, and this model has no "
                             "[models.train]: give a calibration text instead, imatrix = \"calibration.txt\"")
        if self.imatrix and not self.quantize:
            raise ValueError("quantize.imatrix is set but quantize.types is empty: list the quant types to make with it")
        for quant in self.quantize_options.compare_without_imatrix:
            if not self.imatrix:
                raise ValueError("quantize.compare_without_imatrix measures what the importance matrix buys, and "
                                 "this model has none: set imatrix = true (or a calibration file), or remove it")
            if quant.upper() not in self.quantize:
                raise ValueError(f"quantize.compare_without_imatrix: {quant!r} is not one of quantize.types "
                                 f"({', '.join(self.quantize)}): only a type made with the matrix has something to "
                                 "compare with")
            if quant.upper() in NEEDS_IMATRIX:
                raise ValueError(f"quantize.compare_without_imatrix: {quant.upper()} is not made without an "
                                 "importance matrix; compare a K-quant (e.g. Q4_K_M) instead")
        return self

    @property
    def without_imatrix(self) -> list[str]:
        """The quant types also made without the importance matrix, in the spelling of `quantize`."""
        return list(dict.fromkeys(q.upper() for q in self.quantize_options.compare_without_imatrix))

    @model_validator(mode="after")
    def _select_among_variants(self):
        if self.select is None:
            return self
        if self.matrix_of is None:
            raise ValueError("[models.select] chooses among the variants of a [models.matrix], and this model has "
                             "none: add a matrix or remove the table")
        releases = [*self.quantize, *(["lora"] if self.has_adapter else [])] or [self.outtype.upper()]
        if self.select.variant not in releases:
            raise ValueError(f"select.variant = {self.select.variant!r} is not a release of this model; its releases "
                             f"are {', '.join(releases)}")
        return self

    @model_validator(mode="after")
    def _at_only_in_variants(self):
        if matrix.SEPARATOR in self.name and self.matrix_of is None:
            raise ValueError(f"name {self.name!r}: {matrix.SEPARATOR!r} separates a matrix variant's values; "
                             "rename the model")
        return self

    @property
    def shares_base(self) -> bool:
        """Whether this model's base import, preflight and base GGUF are its matrix's, made once for all
        its variants (in cache/<model>/) rather than its own. Only a fine-tune shares: without an
        adapter the base GGUF is the release itself, which is the variant's own."""
        return self.matrix_of is not None and self.has_adapter and matrix.shares_base(self.varied)

    @field_validator("name")
    @classmethod
    def _not_a_cache_folder(cls, name: str) -> str:
        if name.lower() in CACHE_FOLDERS:
            raise ValueError(f"{name!r} is the name of a folder modelmake keeps in the cache "
                             f"(cache/{name.lower()}: {CACHE_FOLDERS[name.lower()]}); give the model another name, "
                             f"e.g. {name + '-model'!r}")
        return name

    @property
    def quant_variants(self) -> list[str]:
        """Every quant type, each followed by itself without the importance matrix where it is compared."""
        return [v for q in self.quantize for v in (q, *([q + WITHOUT_IMATRIX] if q in self.without_imatrix else []))]

    @property
    def variants(self) -> list[str]:
        """What eval measures, in the order reports list it: with an adapter the base before
        fine-tuning, then the converted GGUF, the quant variants, and the adapter route (base + GGUF LoRA)."""
        adapted = self.has_adapter
        return [*(["base"] if adapted else []), self.outtype.upper(), *self.quant_variants,
                *(["lora"] if adapted else [])]

    @model_validator(mode="after")
    def _outtype_is_not_quantized_again(self):
        if self.outtype.upper() in self.quantize:
            raise ValueError(f"quantize lists {self.outtype.upper()}, which is the outtype: convert already writes it; "
                             "drop it from quantize")
        return self

    @model_validator(mode="after")
    def _gates_name_variants(self):
        for variant in self.eval.gate:
            if variant not in self.variants:
                raise ValueError(f"eval.gate.{variant}: not a variant of this model; its variants are "
                                 f"{', '.join(self.variants)}")
            if variant in (self.outtype.upper(), "base"):
                raise ValueError(f"eval.gate.{variant}: {variant} is not compared with anything (it is the yardstick, "
                                 "or the model before fine-tuning); gate a quant type or the lora route")
            if variant.endswith(WITHOUT_IMATRIX):
                raise ValueError(f"eval.gate.{variant}: {variant} is measured for comparison and never released, so "
                                 f"there is nothing to gate; gate {variant.removesuffix(WITHOUT_IMATRIX)} instead")
            if self.eval.gate[variant].needs_text and not self.eval.text and not self.train:
                raise ValueError(f"eval.gate.{variant} compares outputs on held-out text, and this model has none: "
                                 "set [models.eval] text = \"a held-out text file\"")
            if self.eval.gate[variant].min_preference_accuracy is not None and not (
                    self.train and self.train.method != "sft" and self.train.validates and not self.eval.text):
                raise ValueError(f"eval.gate.{variant}.min_preference_accuracy gates on held-out preference pairs, and "
                                 "this model has none: train it with method = \"dpo\" or \"orpo\" and a validation "
                                 "split (and no [models.eval] text, which takes the held-out pairs' place)")
            if self.eval.gate[variant].needs_answers and not self.eval.answers_prompts(self.train):
                raise ValueError(f"eval.gate.{variant} gates on answers, and this model has no prompts to answer: "
                                 "set [models.eval] prompts = \"prompts.jsonl\" (or train it with a validation split)")
        return self

    @model_validator(mode="after")
    def _one_adapter_source(self):
        if self.train and self.adapter and self.adapter.path:
            raise ValueError("give either [models.train] or adapter.path, not both: "
                             "the adapter is trained here or brought along")
        if self.adapter and not self.adapter.path and not self.train:
            raise ValueError("[models.adapter] needs a path to a PEFT adapter folder, or a [models.train] table")
        return self

    @model_validator(mode="after")
    def _merge_needs_adapter(self):
        if self.merge and not self.has_adapter:
            raise ValueError("[models.merge] is for a model with an adapter ([models.train] or adapter.path); "
                             "this one has none to merge: remove the table")
        if self.merge and not self.merge.keep_hf and self.convert and self.convert.engine != "native":
            raise ValueError("merge.keep_hf = false folds the LoRA in inside modelmake's own converter, and "
                             "[models.convert] names another one, which needs the merged folder: "
                             "set keep_hf = true or remove [models.convert]")
        return self

    @property
    def keep_merged_hf(self) -> bool:
        return self.merge.keep_hf if self.merge else True

    @property
    def has_adapter(self) -> bool:
        return self.train is not None or (self.adapter is not None and self.adapter.path is not None)

    def data_params(self) -> dict:
        """What the files made from the data alone read besides the base (the held-out text, the eval
        prompts, the calibration text, the base's eval): variants equal in these share those files."""
        train = self.train
        return {"split": train.split_params() if train else None,
                "files": [str(f) for f in train.data_files] if train else [],
                "eval": self.eval.model_dump(mode="json")}

    @field_validator("base", mode="before")
    @classmethod
    def _parse_base(cls, value, info):
        if isinstance(value, BaseRef):
            return value
        if not isinstance(value, str):
            raise ValueError("base must be a string: a path, 'hf:org/name@revision' or 'pkg:module/file.gguf'")
        return parse_base(value, _spec_dir(info))

    @field_validator("outtype", mode="before")
    @classmethod
    def _lower_outtype(cls, value, info):
        value = value.lower() if isinstance(value, str) else value
        if value == "auto" and "base" in info.data:  # else the base's own error is the one to show
            return auto_outtype(info.data["base"])
        return value

    @field_validator("quantize")
    @classmethod
    def _known_quant_types(cls, names: list[str]) -> list[str]:
        canonical = []
        for name in names:
            upper = name.upper()
            if upper not in QUANT_TYPES:
                near = difflib.get_close_matches(upper, QUANT_TYPES, n=1)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown quant type {name!r}.{hint} Valid types: {', '.join(QUANT_TYPES)}")
            if upper in canonical:
                raise ValueError(f"quant type {upper!r} is listed twice")
            canonical.append(upper)
        return canonical


# The stages whose tasks the Ray executor runs on the cluster (select, manifest and track run where doit
# does: they read many artifacts and write little); [build.resources] names them.
CLUSTER_STAGES = Literal["import", "train", "adapter", "merge", "convert", "quantize", "eval", "parity", "package"]


def _resources(request: dict) -> dict:
    """A stage's resources in Ray's names (`{ GPU = 1, memory = "40GB", accelerator_type = "H100" }`)."""
    from .ray_executor import ray_options

    ray_options(request)  # raises ValueError naming the entry
    return request


class BuildSpec(Strict):
    """[build]: where tasks run, and how many of a kind at once under `doit -n N`."""

    # Training takes every core (or the GPU) it is given; two at once on one device only contend.
    max_parallel_train: int = Field(default=1, ge=1)
    # "local": in doit's process (or its `-n N` processes); "ray": each task on a Ray cluster (doit's thread
    # runner waits for them), files moving through the action cache's store by content.
    executor: Literal["local", "ray"] = "local"
    # The cluster's head, host:port (its GCS port) or ray://host:10001; default RAY_ADDRESS, else a Ray
    # started on this machine for the build.
    address: str | None = Field(default=None, min_length=1)
    # What each stage's tasks ask of a node, in Ray's names; default 1 CPU (train: 1 GPU per process on cuda).
    resources: dict[CLUSTER_STAGES, dict[str, int | float | str]] = Field(default_factory=dict)

    @field_validator("resources")
    @classmethod
    def _ray_names(cls, value: dict) -> dict:
        for request in value.values():
            _resources(request)
        return value

    @model_validator(mode="after")
    def _ray_installed(self):
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("executor = \"ray\" needs Ray, which is not installed: pip install -e '.[ray]' "
                             "(here and on every node of the cluster)")
        return self


class Spec(Strict):
    cache: Path = Path("cache")  # the output folder: `cache = "…"` or `[cache] dir = "…"`
    threads: int = Field(default=0, ge=0)  # 0: all cores
    build: BuildSpec = Field(default_factory=BuildSpec)
    models: list[ModelSpec] = Field(min_length=1)
    package: PublishSpec = Field(default_factory=PublishSpec)
    cache_options: CacheSpec = Field(default_factory=CacheSpec)  # the [cache] table; errors name it `cache`
    source: Path | None = None  # the spec file; set by load_spec, not by users

    @model_validator(mode="before")
    @classmethod
    def _cache_table(cls, data):
        if isinstance(data, dict) and isinstance(data.get("cache"), dict):
            table = data["cache"]
            data = {**data, "cache": table.get("dir", "cache"), "cache_options": table}
        return data

    @field_validator("threads")
    @classmethod
    def _threads_this_machine_has(cls, threads: int) -> int:
        """More threads than cores only slows llama.cpp down, and tens of thousands abort it."""
        import sys

        from .device import available_cores

        cores = available_cores()
        if threads > cores:
            print(f"modelmake: note: threads = {threads} is more than the {cores} cores this build may use; using {cores}",
                  file=sys.stderr)
            return cores
        return threads

    @property
    def matrices(self) -> dict[str, list[ModelSpec]]:
        """Each model table with a [models.matrix] → its variants, in matrix order."""
        found: dict[str, list[ModelSpec]] = {}
        for model in self.models:
            if model.matrix_of:
                found.setdefault(model.matrix_of, []).append(model)
        return found

    @cached_property
    def shares_data(self) -> frozenset[str]:
        """The matrix models whose variants read their data alike (ModelSpec.data_params), so that what is
        made from the data alone is made once for all of them."""
        return frozenset(name for name, variants in self.matrices.items()
                         if all(v.data_params() == variants[0].data_params() for v in variants))

    @property
    def promoted(self) -> list[str]:
        """The matrix models whose chosen variant ships under their own name ([models.select])."""
        return [name for name, variants in self.matrices.items() if variants[0].select]

    @property
    def manifest_names(self) -> list[str]:
        """Every folder of the cache with a manifest: each model and variant, and each promoted matrix model."""
        return [m.name for m in self.models] + self.promoted

    @model_validator(mode="after")
    def _unique_names(self):
        names = [m.name for m in self.models] + list(self.matrices)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        # A model's name is its folder in the cache: on macOS and Windows, whose file systems fold case,
        # "Demo" and "demo" would be one folder and the two builds would overwrite each other.
        folded = {}
        for name in names:
            if (other := folded.setdefault(name.casefold(), name)) != name:
                raise ValueError(f"model names {other!r} and {name!r} differ only in case: they would share one cache "
                                 "folder on macOS and Windows, whose file systems ignore case; rename one")
        return self

    @model_validator(mode="after")
    def _nodes_need_the_ray_executor(self):
        for model in self.models:
            if model.train and model.train.nodes > 1 and self.build.executor != "ray":
                raise ValueError(f"model {model.name!r}: [models.train] nodes = {model.train.nodes} spreads training "
                                 "over the nodes of a Ray cluster: set [build] executor = \"ray\" (and address), or "
                                 "train on one machine with processes = N")
        return self

    @model_validator(mode="after")
    def _start_from_a_trained_model(self):
        """start_from names another model here that trains on the same base with the same LoRA shape, and
        no chain of them comes back to where it started."""
        by_name = {m.name: m for m in self.models}
        for model in self.models:
            if not model.train or model.train.start_from is None:
                continue
            where = f"model {model.name!r}: [models.train] start_from = {model.train.start_from!r}"
            first = by_name.get(model.train.start_from)
            if first is None or not first.train:
                trained = ", ".join(m.name for m in self.models if m.train and m is not model) or "none"
                raise ValueError(f"{where} names no model of this spec that trains (those that do: {trained})")
            if first.base.text != model.base.text:
                raise ValueError(f"{where}: its adapter was trained on {first.base.text} and this model's base is "
                                 f"{model.base.text}; an adapter only continues on the base it was trained on")
            if first.train.lora != model.train.lora:
                raise ValueError(f"{where}: the adapter's shape is that model's [models.train.lora]; give this model "
                                 "the same lora settings")
            seen = [model.name]
            while first is not None and first.train and first.train.start_from:
                if first.name in seen:
                    raise ValueError(f"{where}: start_from goes round in a circle ({' → '.join(seen + [first.name])})")
                seen.append(first.name)
                first = by_name.get(first.train.start_from)
        return self


def auto_outtype(base: BaseRef) -> str:
    """`outtype = "auto"`, decided as llama.cpp's converter decides it: f16 if the first tensor is
    float16, else bf16 (config.json's torch_dtype is not trusted; some fine-tunes misstate it). A GGUF
    base is imported as float32, so it gets bf16. Decided when the spec is read, because the file
    names carry the type; only safetensors headers are read."""
    from ..formats import hf

    if base.kind == "gguf":
        return "bf16"
    shards = sorted(base.path.glob("*.safetensors")) if base.kind == "hf_dir" else _cached_hub_shards(base)
    if not shards:
        raise ValueError(f"outtype = \"auto\" reads the dtype of the base's first tensor, and {base.text} has no "
                         "safetensors weights here yet; set outtype = \"f16\" or \"bf16\" (or fetch the base first)")
    try:
        header = hf.read_header(shards[0])
    except BuildError as err:
        raise ValueError(str(err)) from None
    return "f16" if header[min(header)]["dtype"] == "F16" else "bf16"


def base_config(base: BaseRef) -> dict:
    """The base's config.json as far as it is here: a Hugging Face folder's, a hub base's from the local
    Hugging Face cache; {} for a GGUF base (its config is written by import) or a hub base not fetched
    yet. Read when the graph is made, to choose the converter; a broken file is the import's to report."""
    import json

    if base.kind == "hf_dir":
        path = base.path / "config.json"
    elif base.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base.location, "config.json", revision=base.revision)
        path = Path(found) if isinstance(found, str) else None
    else:
        path = None
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _cached_hub_shards(base: BaseRef) -> list[Path]:
    """The first safetensors shard of a hub base, if the local Hugging Face cache holds it."""
    import json

    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(base.location, "model.safetensors.index.json", revision=base.revision)
    if isinstance(index, str):
        names = sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    found = try_to_load_from_cache(base.location, names[0], revision=base.revision)
    return [Path(found)] if isinstance(found, str) else []


def parse_base(text: str, spec_dir: Path) -> BaseRef:
    """Resolve a `base = "..."` string: `hf:org/name@rev`, `pkg:module/file`, or a path."""
    if text.startswith("hf:"):
        repo_id, _, revision = text[3:].partition("@")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise ValueError(f"{text!r}: a hub base is 'hf:org/name@revision'")
        if not revision:
            raise ValueError(
                f"{text!r} has no revision: pin one (a commit hash is best), e.g. 'hf:{repo_id}@main', "
                "so that a rebuild next month uses the same weights"
            )
        return BaseRef(text=text, kind="hub", location=repo_id, revision=revision)
    if text.startswith("pkg:"):
        module, _, inner = text[4:].partition("/")
        found = importlib.util.find_spec(module) if module.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise ValueError(f"{text!r}: Python package {module!r} is not installed (pip install it)")
        path = Path(next(iter(found.submodule_search_locations))) / inner
    else:
        path = _spec_path(text, spec_dir)
    path = path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory without config.json: a Hugging Face model directory is expected")
        return BaseRef(text=text, kind="hf_dir", location=str(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
        return BaseRef(text=text, kind="gguf", location=str(path))
    raise ValueError(f"{path} does not exist: fix the path (relative paths start at the spec's folder)")


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; every failure is a BuildError naming file and field."""
    path = Path(path).resolve()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: some editors start with a BOM
    except FileNotFoundError:
        raise BuildError(f"spec file {path} not found: create it or pass another with `doit spec=PATH`") from None
    except IsADirectoryError:
        raise BuildError(f"spec file {path} is a folder: pass the models.toml inside it, `doit spec={path / 'models.toml'}`") from None
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise BuildError(f"{path}: not UTF-8 text (line {line}: byte 0x{err.object[err.start]:02x} at offset {err.start}): "
                         "TOML files are UTF-8; save the spec as UTF-8 in your editor") from None
    except OSError as err:
        raise BuildError(f"spec file {path}: cannot be read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise BuildError(f"{path}: invalid TOML: {err}. Fix the syntax at that line and column.") from None
    for internal in ("source", "cache_options"):
        if internal in data:
            raise BuildError(f"{path}: '{internal}' is set by modelmake itself; remove it from the spec")
    data, variants = _expand_matrices(data, path)
    try:
        spec = Spec.model_validate(data, context={"spec_dir": path.parent})
    except ValidationError as err:
        raise BuildError(f"{path}: {'; '.join(_problems(err.errors(), variants))}") from None
    cache = (spec.cache if spec.cache.is_absolute() else path.parent / spec.cache).resolve()
    key = "cache.dir" if isinstance(data.get("cache"), dict) else "cache"
    existing = next(folder for folder in (cache, *cache.parents) if folder.exists())
    if not existing.is_dir():
        raise BuildError(f"{path}: {key} = {str(spec.cache)!r} needs a folder at {existing}, and that is a file: "
                         "move the file away or give the cache another folder")
    if path.parent.is_relative_to(cache):
        raise BuildError(f"{path}: {key} = {str(spec.cache)!r} is the spec's own folder{'' if cache == path.parent else ' or above it'}: "
                         "modelmake writes a folder per model there and `doit clean` removes them, which could "
                         "delete your own folders of the same name; give the cache a folder of its own, "
                         "e.g. cache = \"cache\"")
    return spec.model_copy(update={"source": path, "cache": cache})


def _expand_matrices(data: dict, path: Path) -> tuple[dict, dict[int, matrix.Variant]]:
    """Each model table with a [models.matrix] → one table per combination; the variants by their
    index in the expanded list, so a validation error names the combination, not a list index."""
    models = data.get("models")
    if not isinstance(models, list):
        return data, {}
    expanded, variants = [], {}
    for index, model in enumerate(models):
        for internal in ("matrix_of", "varied"):
            if isinstance(model, dict) and internal in model:
                raise BuildError(f"{path}: models[{index}].{internal} is set by modelmake itself; remove it")
        try:
            tables = matrix.expand(model)
        except ValueError as err:
            raise BuildError(f"{path}: {err}") from None
        for table, variant in tables:
            if variant:
                variants[len(expanded)] = variant
            expanded.append(table)
    return {**data, "models": expanded}, variants


# Names other tools use for the same setting, which string similarity alone would not find.
SYNONYMS = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lr": "learning_rate",
            "use_rslora": "rslora", "data": "dataset", "quant": "quantize", "quants": "quantize"}


def _problems(errors: list[dict], variants: dict[int, matrix.Variant]) -> list[str]:
    """Each error as a sentence. One in a matrix variant names the variant and the values that made it;
    one that every variant of a matrix has is said once, of the model table."""
    said: dict[str, list] = {}
    for error in errors:
        loc = error["loc"]
        variant = variants.get(loc[1]) if loc[:1] == ("models",) and len(loc) > 1 else None
        if variant is None:
            said.setdefault(_describe(error), [])
        else:
            said.setdefault(_describe(error, shown_from=2), []).append(variant)
    counts = {}
    for variant in variants.values():
        counts[variant.model] = counts.get(variant.model, 0) + 1
    problems = []
    for text, hit in said.items():
        models = {v.model for v in hit}
        if hit and len(models) == 1 and len(hit) == counts[hit[0].model]:
            problems.append(f"model {hit[0].model!r} (every variant of its [models.matrix]): {text}")
        else:
            problems += [f"model {v.describe()}: {text}" for v in hit] or [text]
    return problems


def _describe(error: dict, shown_from: int = 0) -> str:
    """One readable sentence for one pydantic error, with a did-you-mean for unknown keys; the place
    is named from `shown_from` on (2: within a model table, for a matrix variant)."""
    internal = {"cache_options": "cache", "quantize_options": "quantize"}
    loc = tuple(internal.get(p, p) if isinstance(p, str) else p for p in error["loc"][shown_from:])
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "spec"
    if error["type"] == "extra_forbidden":
        valid = _field_names_at(error["loc"][:-1])  # the whole path: the lookup starts at the spec
        near = [SYNONYMS[loc[-1]]] if SYNONYMS.get(loc[-1]) in valid else difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return f"unknown key {where!r}: {hint}valid keys here are {', '.join(valid)}"
    if error["type"] == "missing":
        return f"{where!r} is required but missing: add it"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def _field_names_at(loc: tuple) -> list[str]:
    """The user-facing field names of the model class that `loc` points into."""
    model: type[BaseModel] = Spec
    for part in loc:
        if part not in model.model_fields:  # a list index or a dict key
            continue
        annotation = model.model_fields[part].annotation
        for inner in getattr(annotation, "__args__", (annotation,)):  # list[X], dict[str, X], X | None
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                model = inner
    return [name for name in model.model_fields if name not in ("source", "cache_options", "quantize_options")]
