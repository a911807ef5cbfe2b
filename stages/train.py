"""train: a LoRA adapter on the user's instruction data, with PyTorch and PEFT.

Loss is on the answer tokens only; the prompt is written with the base model's own chat
template. On CPU the run is deterministic: the same inputs, seed and thread count give the
same adapter bytes. The folder written holds the PEFT adapter (adapter_model.safetensors,
adapter_config.json) and train_log.jsonl, whose timings make it a report, not an artifact.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .build.atomic import atomic_dir
from .build.errors import BuildError
from .build.spec import TrainSpec
from .build.task import ModelBuild, Task
from .formats import dataset as datasets
from .formats import lora

REVISION = 1
TOOLS = ("torch", "transformers", "peft", "safetensors", "tokenizers")

LOG = "train_log.jsonl"
IGNORE = -100  # label of tokens that carry no loss


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    labels: list[int]


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str):
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32  # bf16 on CPU is slow and loses the run's determinism guarantees


def prompt_and_answer(messages: tuple[dict, ...], tokenizer, template: str, system: str | None) -> tuple[str, str]:
    """The text before the answer and the answer itself, as the template writes them."""
    turns = list(messages)
    if system and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system})
    if template == "alpaca":
        user = "\n\n".join(t["content"] for t in turns[:-1] if t["role"] != "assistant")
        return f"### Instruction:\n{user}\n\n### Response:\n", turns[-1]["content"] + tokenizer.eos_token
    prompt = tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(turns, tokenize=False)
    if not full.startswith(prompt):
        raise BuildError("the model's chat template does not write the conversation so far as a prefix of the "
                         "whole conversation, so the answer cannot be told apart; use template = \"alpaca\"")
    return prompt, full[len(prompt):]


def encode(example: datasets.Example, tokenizer, template: str, system: str | None) -> Encoded:
    prompt, answer = prompt_and_answer(example.messages, tokenizer, template, system)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def make_rows(encoded: list[Encoded], max_len: int, packing: bool) -> list[Encoded]:
    """Training rows: one example each, or examples packed end to end into rows of max_len."""
    if not packing:
        return encoded
    ids, labels = [], []
    for e in encoded:
        ids += e.ids
        labels += e.labels
    return [Encoded(ids[i:i + max_len], labels[i:i + max_len]) for i in range(0, len(ids), max_len)]


def collate(rows: list[Encoded], pad_id: int):
    import torch

    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
        mask[i, : len(r.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(rows: list[Encoded], size: int, rng: random.Random | None) -> list[list[Encoded]]:
    order = list(range(len(rows)))
    if rng is not None:
        rng.shuffle(order)
    return [[rows[i] for i in order[k:k + size]] for k in range(0, len(order), size)]


def linear_module_names(model) -> list[str]:
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name})


def _encode_all(examples, tokenizer, spec: TrainSpec, what: str, path: Path) -> list[Encoded]:
    encoded = [encode(e, tokenizer, spec.template, spec.system) for e in examples]
    fitting = [e for e in encoded if len(e.ids) <= spec.max_seq_len or spec.packing]
    if not fitting:
        raise BuildError(f"{path}: every {what} record is longer than max_seq_len = {spec.max_seq_len} tokens "
                         f"(shortest {min(len(e.ids) for e in encoded)}); raise max_seq_len or enable packing")
    if len(fitting) < len(encoded):
        print(f"  {len(encoded) - len(fitting)} {what} records longer than {spec.max_seq_len} tokens were left out")
    return fitting


def _peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _validation_loss(model, rows: list[Encoded], spec: TrainSpec, pad_id: int, device: str) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(rows, spec.batch_size, None):
            tensors = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            tokens = int((tensors["labels"][:, 1:] != IGNORE).sum())
            total += float(model(**tensors).loss) * tokens  # the model averages over its label tokens
            count += tokens
    model.train()
    return total / count


def _normalize_config(path: Path, model_name: str) -> None:
    """Make adapter_config.json the same on every machine: PEFT records the base's host path
    and keeps target_modules in a set, whose order changes from process to process."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = model_name
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def split_examples(spec: TrainSpec) -> tuple[list[datasets.Example], list[datasets.Example]]:
    """(training, validation) records: the dataset and the validation file, or a seeded split of the dataset."""
    examples = datasets.read_jsonl(spec.dataset)
    if isinstance(spec.validation, Path):
        return examples, datasets.read_jsonl(spec.validation)
    return datasets.split(examples, spec.validation, spec.seed)


def _rows(spec: TrainSpec, tokenizer) -> tuple[list[Encoded], list[Encoded]]:
    """Training and validation rows, tokenized, masked and (optionally) packed."""
    train_examples, val_examples = split_examples(spec)
    val_path = spec.validation if isinstance(spec.validation, Path) else spec.dataset
    train_rows = make_rows(_encode_all(train_examples, tokenizer, spec, "training", spec.dataset),
                           spec.max_seq_len, spec.packing)
    val_rows = make_rows(_encode_all(val_examples, tokenizer, spec, "validation", val_path),
                         spec.max_seq_len, spec.packing) if val_examples else []
    return train_rows, val_rows


def _lora_model(base_dir: Path, out_dir: Path, spec: TrainSpec, device: str, dtype):
    """The base with LoRA layers: fresh, or the previous build's adapter when resuming."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    # PEFT calls a transformers API that transformers 5 has deprecated; not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    available = linear_module_names(model)
    unknown = [m for m in spec.lora.target_modules if m not in available]
    if unknown:
        raise BuildError(f"lora.target_modules {', '.join(unknown)} are not in {base_dir}; "
                         f"its linear layers are {', '.join(available)}")
    if spec.resume and (out_dir / lora.WEIGHTS).is_file():
        return PeftModel.from_pretrained(model, out_dir, is_trainable=True), True
    config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                        target_modules=list(spec.lora.target_modules), use_rslora=spec.lora.rslora,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config), False


def _fit(model, train_rows, val_rows, spec: TrainSpec, steps: int, pad_id: int, device: str, name: str) -> list[dict]:
    """The training loop; returns the log, one row per step plus the validation losses."""
    import torch
    from transformers import get_scheduler

    optimizer_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[spec.optimizer]
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate,
                              weight_decay=spec.weight_decay)
    scheduler = get_scheduler(spec.schedule, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=steps)
    batches_per_epoch = math.ceil(len(train_rows) / spec.batch_size)
    log: list[dict] = []
    if val_rows:
        log.append({"step": 0, "val_loss": round(_validation_loss(model, val_rows, spec, pad_id, device), 6)})
    rng = random.Random(spec.seed)
    pending: list[list[Encoded]] = []
    model.train()
    progress = tqdm(range(1, steps + 1), desc=f"train {name}", unit="step")
    for step in progress:
        started, tokens, loss_sum = time.perf_counter(), 0, 0.0
        for _ in range(spec.grad_accum):
            if not pending:
                pending = batches(train_rows, spec.batch_size, rng)
            tensors = {k: v.to(device) for k, v in collate(pending.pop(0), pad_id).items()}
            loss = model(**tensors).loss / spec.grad_accum
            loss.backward()
            loss_sum += loss.item()
            tokens += int(tensors["attention_mask"].sum())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        row = {"step": step, "epoch": round(step * spec.grad_accum / batches_per_epoch, 3),
               "train_loss": round(loss_sum, 6), "learning_rate": scheduler.get_last_lr()[0],
               "tokens_per_s": round(tokens / (time.perf_counter() - started), 1),
               "peak_memory_mb": round(_peak_memory_mb(device), 1)}
        if val_rows and (step % spec.eval_every == 0 or step == steps):
            row["val_loss"] = round(_validation_loss(model, val_rows, spec, pad_id, device), 6)
        log.append(row)
        progress.set_postfix(loss=f"{loss_sum:.3f}", **({"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {}))
    progress.close()
    return log


def _save(model, base_dir: Path, out_dir: Path, model_name: str, log: list[dict]) -> None:
    # PEFT looks at the base's config while saving: point it at the local folder (a resumed
    # adapter names the model instead, and PEFT would go looking for that on the hub).
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
        _normalize_config(tmp / lora.CONFIG, model_name)
        (tmp / LOG).write_text("".join(json.dumps(r) + "\n" for r in log), encoding="utf-8")


def run(base_dir: Path, out_dir: Path, spec: TrainSpec, model_name: str, threads: int = 0) -> dict[str, str]:
    """Train and save the adapter; returns the platform facts that shaped its bytes, for the lock."""
    import torch
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(spec.seed)
    if device == "cpu":
        torch.use_deterministic_algorithms(True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows, val_rows = _rows(spec, tokenizer)
    model, resumed = _lora_model(base_dir, out_dir, spec, device, dtype)
    steps = spec.max_steps or spec.epochs * math.ceil(math.ceil(len(train_rows) / spec.batch_size) / spec.grad_accum)
    print(f"train {model_name}: device {device}, dtype {str(dtype).removeprefix('torch.')}, "
          f"{len(train_rows)} training / {len(val_rows)} validation rows, {steps} steps"
          f"{', resuming from the previous adapter' if resumed else ''}")
    log = _fit(model, train_rows, val_rows, spec, steps, pad_id, device, model_name)
    _save(model, base_dir, out_dir, model_name, log)
    if val_rows:
        print(f"  validation loss {log[0]['val_loss']:.4f} → {log[-1]['val_loss']:.4f}")
    facts = {"device": device, "dtype": str(dtype).removeprefix("torch.")}
    if device == "cpu":  # the SIMD kernels torch picked and how many threads split the sums shape the floats
        facts |= {"cpu_kernels": torch.backends.cpu.get_cpu_capability(), "threads": str(torch.get_num_threads())}
    return facts | ({"resumed": "true"} if resumed else {})


def tasks(build: ModelBuild) -> list[Task]:
    model, paths = build.model, build.paths
    if not model.train:
        return []
    return [Task(model.name, "LoRA fine-tune (PyTorch + PEFT)", run,
                 {"base_dir": paths.base, "out_dir": paths.adapter, "spec": model.train, "model_name": model.name,
                  "threads": build.spec.threads},
                 model.train.params(), inputs=paths.base_files() + model.train.data_files,
                 outputs=paths.adapter_files(), clean=[paths.adapter],
                 cacheable=not model.train.resume)]  # a resumed adapter depends on the one before it
