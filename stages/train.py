"""train: a LoRA adapter on the user's instruction data, with PyTorch and PEFT.

Loss is on the answer tokens only; the prompt is written with the base model's own chat
template. With method = "dpo" or "orpo" the records are preference pairs and the loss is theirs
(stages.training.preference); DPO's reference is the model as the run starts, scored once.
On CPU the run is deterministic: the same inputs, seed and thread count give the same adapter
bytes. The folder written holds the PEFT adapter (adapter_model.safetensors, adapter_config.json)
and train_log.jsonl, whose timings make it a report, not an artifact.

Before the model is loaded the run is checked against the device's memory (stages.training.memory).
While it trains, checkpoints let a killed build continue exactly (stages.training.checkpoint).
With processes > 1 this module is also each rank's program: `python -m stages.train JOB`
(stages.training.distributed launches them).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .formats import dataset as datasets
from .formats import chat, hf, lora, preview
from .formats import tokenizer as tokenizer_format
from .ground import buildlock
from .ground.atomic import atomic_dir, atomic_file
from .ground.device import available_cores, pick_device
from .ground.errors import BuildError
from .ground.hashing import canonical_json, file_blake3, tool_versions
from .ground.progress import bar, quiet_library_bars
from .ground.spec import TrainSpec
from .ground.task import ModelBuild, ModelPaths, Task
from .ground.units import parse_size
from .training import checkpoint, distributed, memory, preference, tracking
from .training.targets import is_moe, linear_module_names, lora_targets
from .training.distributed import Ranks

REVISION = 3  # 2: an Alpaca prompt starts with BOS where the tokenizer adds one; 3: no copy of an adapted lm_head
TOOLS = ("torch", "transformers", "peft", "safetensors", "tokenizers", "bitsandbytes")

LOG = "train_log.jsonl"
# bitsandbytes (which PEFT and transformers import) announces optional CPU kernels a LoRA run never uses.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
IGNORE = -100  # label of tokens that carry no loss


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    labels: list[int]
    source: str = ""  # the file of the record (a packed row of several records: none)


@dataclass(frozen=True)
class Pair:
    """A preference record as trained on: the same prompt tokens, then the chosen or the rejected answer."""

    chosen: Encoded
    rejected: Encoded

    @property
    def longest(self) -> int:
        return max(len(self.chosen.ids), len(self.rejected.ids))


def source_of(example: datasets.Example) -> str:
    """The file a record came from (its `where` is file:line)."""
    return example.where.rsplit(":", 1)[0]


def pick_dtype(requested: str, device: str):
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32  # bf16 on CPU is slow and loses the run's determinism guarantees


def no_chat_template(base: str) -> str:
    """Why a base without a chat template cannot train on template = "chat", and the choices."""
    return (f"{base} has no chat template, and [models.train] template = \"chat\" (the "
            "default) formats the training data with the base's own; set template = \"alpaca\" in [models.train] "
            "to train on the Alpaca format instead, or start from a base that has a chat template (an -Instruct model)")


_ADDS_BOS: dict[str, bool] = {}  # by tokenizer folder: read once, not once per record


def _adds_bos(model_dir: str, tokenizer) -> bool:
    if model_dir not in _ADDS_BOS:
        _ADDS_BOS[model_dir] = tokenizer_format.adds_bos(Path(model_dir), tokenizer)
    return _ADDS_BOS[model_dir]


def tools_problem(example: datasets.Example, tokenizer, template: str) -> str | None:
    """Why this record's tools cannot be written as the model would see them, or None. Templates
    ignore what they do not know, so one without tool support would silently drop the definitions."""
    if not example.uses_tools:
        return None
    if template == "alpaca":
        return f"{example.where}: a conversation with tools, which the Alpaca format cannot write; use template = \"chat\""
    chat_template = tokenizer.chat_template or ""
    needs = [word for word, used in (("tools", bool(example.tools)),
                                     ("tool_calls", any(t.get("tool_calls") for t in example.messages))) if used]
    missing = [word for word in needs if word not in chat_template]
    if missing:
        return (f"{example.where}: the conversation has {' and '.join(missing)}, which the base model's chat template "
                "never reads, so training would drop them silently; use a base whose template supports tools "
                "(Qwen2.5, Llama 3.1, Mistral's v3 and later), or records without them")
    return None


def prompt_and_answer(messages: tuple[dict, ...], tokenizer, template: str, system: str | None,
                      tools: tuple[dict, ...] = ()) -> tuple[str, str]:
    """The text before the answer and the answer itself, as the template writes them (with the
    conversation's tool definitions, where it has them)."""
    turns = list(chat.with_system(messages, system))
    if template == "alpaca":  # BOS first where the model's tokenizer adds one, as llama.cpp will when serving
        bos = tokenizer.bos_token if tokenizer.bos_token and _adds_bos(tokenizer.name_or_path, tokenizer) else ""
        return bos + chat.alpaca_prompt(turns[:-1]), turns[-1]["content"] + tokenizer.eos_token
    if not tokenizer.chat_template:  # the graph refuses this first where it can see the base's files
        raise BuildError(no_chat_template(f"the base {tokenizer.name_or_path}"))
    given = {"tools": list(tools)} if tools else {}
    prompt = tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True, **given)
    full = tokenizer.apply_chat_template(turns, tokenize=False, **given)
    if not full.startswith(prompt):
        raise BuildError("the model's chat template does not write the conversation so far as a prefix of the "
                         "whole conversation, so the answer cannot be told apart; use template = \"alpaca\"")
    return prompt, full[len(prompt):]


def written(example: datasets.Example, tokenizer, template: str, system: str | None) -> tuple[str, str]:
    """A record as the train stage writes it: (the prompt, the answer); raw text is all answer."""
    if example.is_text:
        return "", example.text
    return prompt_and_answer(example.messages, tokenizer, template, system, example.tools)


def encode(example: datasets.Example, tokenizer, template: str, system: str | None) -> Encoded:
    if example.is_text:  # continued pretraining: BOS where the model has one, the text, EOS; loss on all of it
        adds_bos = tokenizer.bos_token_id is not None and _adds_bos(tokenizer.name_or_path, tokenizer)
        bos = [tokenizer.bos_token_id] if adds_bos else []
        ids = bos + tokenizer(example.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Encoded(ids, list(ids), source_of(example))
    problem = tools_problem(example, tokenizer, template)
    if problem:
        raise BuildError(problem)
    prompt, answer = prompt_and_answer(example.messages, tokenizer, template, system, example.tools)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids, source_of(example))


def rejected_answer(example: datasets.Example, tokenizer, template: str, system: str | None) -> str:
    """A preference pair's rejected answer as the template writes it after the pair's prompt."""
    return prompt_and_answer(example.messages[:-1] + (example.rejected,), tokenizer, template, system)[1]


def encode_pair(example: datasets.Example, tokenizer, template: str, system: str | None) -> Pair:
    """A preference record's two conversations, written as `encode` writes one, sharing their prompt."""
    prompt, chosen = prompt_and_answer(example.messages, tokenizer, template, system)
    rejected = rejected_answer(example, tokenizer, template, system)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def side(answer: str) -> Encoded:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        return Encoded(prompt_ids + ids, [IGNORE] * len(prompt_ids) + ids, source_of(example))

    return Pair(side(chosen), side(rejected))


def method_problem(examples: list[datasets.Example], method: str) -> str | None:
    """Why the records cannot train with `method`, or None: preference methods take pairs, SFT takes the rest."""
    if method == "sft":
        pair = next((e for e in examples if e.is_preference), None)
        return pair and (f"{pair.where}: a preference record ({datasets.SHAPES['preference']}) and [models.train] "
                         "method = \"sft\"; train on pairs with method = \"dpo\" or \"orpo\", or give SFT records")
    other = next((e for e in examples if not e.is_preference), None)
    return other and (f"{other.where}: method = \"{method}\" trains on preference records "
                      f"({datasets.SHAPES['preference']}), and this one is not; give every file of this model pairs")


def make_rows(encoded: list[Encoded], max_len: int, packing: bool) -> list[Encoded]:
    """Training rows: one example each, or examples packed end to end into rows of max_len."""
    if not packing:
        return encoded
    ids, labels = [], []
    for e in encoded:
        ids += e.ids
        labels += e.labels
    return [Encoded(ids[i:i + max_len], labels[i:i + max_len]) for i in range(0, len(ids), max_len)]


def collate_pairs(pairs: list[Pair], pad_id: int):
    """TRL's layout of a preference batch: the chosen rows, then the rejected ones."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


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


def sft_loss(model, tensors: dict):
    """The mean cross-entropy of the label tokens, as transformers computes it from `labels`, with the
    output layer applied only at the positions that predict a label in some row (`logits_to_keep`). The
    answers are a small share of a chat row's tokens (15% of the default spec's), and the projection
    onto the vocabulary, with its softmax, is the largest product of a small model: computed for every
    position, it took a sixth of a LoRA training step of SmolLM2-135M (bench/sft_loss.py)."""
    import torch

    targets = tensors["labels"][:, 1:]  # position t predicts token t + 1
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
    output = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], logits_to_keep=keep)
    loss = torch.nn.functional.cross_entropy(output.logits.flatten(0, 1).float(), targets[:, keep].flatten(),
                                             ignore_index=IGNORE)
    # A mixture of experts whose config asks for its routers' logits adds their load-balancing loss, as
    # transformers' own loss does. DDP and FSDP hold the model as .module.
    if getattr(output, "aux_loss", None) is not None:
        loss = loss + getattr(model, "module", model).config.router_aux_loss_coef * output.aux_loss.to(loss.device)
    return loss


def batch_order(count: int, size: int, rng: random.Random | None) -> list[list[int]]:
    """One pass over `count` rows: the row numbers of each batch, shuffled by rng."""
    order = list(range(count))
    if rng is not None:
        rng.shuffle(order)
    return [order[k:k + size] for k in range(0, count, size)]


def mix_words(counts: dict[str, int]) -> str:
    """A mix as the train stage prints it: each file's name, share and records."""
    total = sum(counts.values())
    return ", ".join(f"{name} {n / total:.1%} ({n} records)" for name, n in counts.items())


def batches(rows: list[Encoded], size: int, rng: random.Random | None) -> list[list[Encoded]]:
    return [[rows[i] for i in batch] for batch in batch_order(len(rows), size, rng)]


def split_batch(batch: list[int], ranks: Ranks) -> tuple[list[int], float]:
    """This process's rows of a batch, and the weight of its loss. DDP averages the processes'
    gradients; a process left without rows (a last batch smaller than the process count) runs
    a row weighted 0, and the others count for it, so the step is the mean over the rows' processes."""
    mine = batch[ranks.rank::ranks.world]
    active = min(ranks.world, len(batch))
    return (mine, ranks.world / active) if mine else (batch[:1], 0.0)


def share(items: list, ranks: Ranks) -> list[tuple]:
    """This process's part of items, weighted 1; a process whose part is short gets the first item
    weighted 0, so every process runs the same number of steps (their collectives must pair up)."""
    mine = items[ranks.rank::ranks.world]
    return [(item, 1.0) for item in mine] + [(items[0], 0.0)] * (math.ceil(len(items) / ranks.world) - len(mine))


def _length(row: Encoded | Pair) -> int:
    return row.longest if isinstance(row, Pair) else len(row.ids)


def _encode_all(examples, tokenizer, spec: TrainSpec, what: str) -> list[Encoded] | list[Pair]:
    """The conversations' rows (or pairs): each record, or packed; a long one is left out unless packed."""
    encoder = encode if spec.method == "sft" else encode_pair
    encoded = [encoder(e, tokenizer, spec.template, spec.system) for e in examples]
    fitting = [e for e in encoded if _length(e) <= spec.max_seq_len or spec.packing]
    if not fitting:
        files = ", ".join(dict.fromkeys(source_of(e) for e in examples))
        raise BuildError(f"{files}: every {what} record is longer than max_seq_len = {spec.max_seq_len} tokens "
                         f"(shortest {min(map(_length, encoded))}); raise max_seq_len"
                         f"{' or enable packing' if spec.method == 'sft' else ''}")
    if len(fitting) < len(encoded):
        print(f"  {len(encoded) - len(fitting)} {what} records longer than {spec.max_seq_len} tokens were left out")
    return fitting


PREVIEWED = 5  # records of each source the loss preview shows


def preview_sources(spec: TrainSpec, tokenizer, names: dict[str, str]) -> list[preview.Source]:
    """The training and validation records of each file as `encode` makes them, counted, with the first
    few token by token; `names`: each data file's path → how the page names it (the same on every machine)."""
    train_examples, val_examples = split_examples(spec)
    found = []
    for what, every in (("training", train_examples), ("validation", val_examples)):
        by_file: dict[str, list[datasets.Example]] = {}
        for example in every:
            by_file.setdefault(source_of(example), []).append(example)
        found += [_previewed(names.get(path, Path(path).name), what, examples, spec, tokenizer)
                  for path, examples in by_file.items()]
    return found


def _previewed(name: str, what: str, examples: list[datasets.Example], spec: TrainSpec, tokenizer) -> preview.Source:
    """One file's records (of training or validation): counted, the first few token by token (a
    preference pair as its two rows, the chosen and the rejected)."""
    rows = []  # (the record's line, as the page names the row, the row)
    for e in examples:
        line = e.where.rsplit(":", 1)[-1]
        if e.is_preference:
            pair = encode_pair(e, tokenizer, spec.template, spec.system)
            rows += [(f"{line} (chosen)", pair.chosen), (f"{line} (rejected)", pair.rejected)]
        else:
            rows.append((line, encode(e, tokenizer, spec.template, spec.system)))
    encoded = [row for _, row in rows]
    shown = [(f"{name}:{label}",
              [(tokenizer.decode([token]), kept != IGNORE) for token, kept in zip(row.ids, row.labels)])
             for label, row in rows[:PREVIEWED]]
    return preview.Source(f"{name} ({what})", len(examples), sum(len(r.ids) for r in encoded),
                          sum(label != IGNORE for r in encoded for label in r.labels), shown,
                          raw_text=all(e.is_text for e in examples))


def write_preview(spec: TrainSpec, base_dir: Path, out_path: Path, names: dict[str, str], title: str) -> None:
    """preview.html: what the loss sees, before any training; a source on which no token carries loss,
    or every token does, is refused here."""
    from transformers import AutoTokenizer

    sources = preview_sources(spec, AutoTokenizer.from_pretrained(base_dir), names)
    for source in sources:
        wrong = preview.problem(source, answers_only=not source.raw_text)  # raw text: every token, by design
        if wrong:
            raise BuildError(wrong)
    with atomic_file(out_path) as tmp:
        tmp.write_text(preview.render(title, sources), encoding="utf-8")
    print("; ".join(f"{s.name}: {s.share:.1%} of {s.tokens:,} tokens carry loss" for s in sources))


def _peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):  # this process's GPU: "cuda" or a rank's "cuda:N"
        return torch.cuda.max_memory_allocated() / 2**20
    if device == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _validation_loss(model, rows: list[Encoded], spec: TrainSpec, pad_id: int, device, ranks: Ranks) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, weight in share(batches(rows, spec.batch_size, None), ranks):
            tensors = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            tokens = int((tensors["labels"][:, 1:] != IGNORE).sum()) * weight
            total += float(sft_loss(model, tensors)) * tokens  # the mean over the batch's label tokens
            count += tokens
    model.train()
    total, count = ranks.total(total, count)
    return total / count


def _preference_loss(model, pairs: list[Pair], references: list[tuple[float, float]] | None, spec: TrainSpec,
                     pad_id: int, device) -> tuple[preference.Scored, int]:
    """One batch of pairs scored by DPO (against `references`) or ORPO, and the tokens it read."""
    import torch

    tensors = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
    if spec.method == "dpo":
        reference = torch.tensor([c for c, _ in references] + [r for _, r in references], device=logits.device)
        scored = preference.dpo(logits, tensors["labels"], reference, spec.beta)
    else:
        scored = preference.orpo(logits, tensors["labels"], tensors["input_ids"], tensors["attention_mask"], spec.beta)
    return scored, int(tensors["attention_mask"].sum())


def reference_logps(model, pairs: list[Pair], spec: TrainSpec, pad_id: int, device) -> list[tuple[float, float]]:
    """DPO's reference: each pair's (chosen, rejected) log-probabilities under the model as the run starts (the
    base, its LoRA starting at zero, or start_from's adapter), scored once before the first step, as TRL's
    precompute_ref_log_probs does: no second copy of the model in memory and no second forward per step."""
    import torch

    model.eval()
    found = []
    with torch.no_grad():
        for start in range(0, len(pairs), spec.batch_size):
            part = pairs[start:start + spec.batch_size]
            tensors = {k: v.to(device) for k, v in collate_pairs(part, pad_id).items()}
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
            logps = preference.sequence_logps(logits, tensors["labels"])[0].tolist()
            found += list(zip(logps[:len(part)], logps[len(part):]))
    model.train()
    return found


def _preference_validation(model, pairs: list[Pair], references: list[tuple[float, float]] | None, spec: TrainSpec,
                           pad_id: int, device, ranks: Ranks) -> dict[str, float]:
    """The held-out pairs' mean loss, and how often the model gives the chosen answer the higher mean
    token log-probability (preference.Scored.prefers_chosen): the held-out preference accuracy."""
    import torch

    model.eval()
    total, wins, count = 0.0, 0.0, 0.0
    with torch.no_grad():
        for batch, weight in share(batch_order(len(pairs), spec.batch_size, None), ranks):
            part = [pairs[i] for i in batch]
            scored, _ = _preference_loss(model, part, [references[i] for i in batch] if references else None,
                                         spec, pad_id, device)
            wins += int(scored.prefers_chosen.sum()) * weight
            total += float(scored.loss) * len(part) * weight
            count += len(part) * weight
    model.train()
    total, wins, count = ranks.total(total, wins, count)
    return {"val_loss": total / count, "val_preference_accuracy": wins / count}


def validate(model, rows, references, spec: TrainSpec, pad_id: int, device, ranks: Ranks) -> dict[str, float]:
    """The validation figures of a log row: the held-out loss, and for pairs their preference accuracy."""
    if spec.method == "sft":
        return {"val_loss": _validation_loss(model, rows, spec, pad_id, device, ranks)}
    return _preference_validation(model, rows, references, spec, pad_id, device, ranks)


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
    parts = []
    for source in spec.sources:
        examples = datasets.read_jsonl(source.path, source.format)
        if isinstance(source.validation, Path):
            parts.append((examples, datasets.read_jsonl(source.validation, source.format)))
        else:
            parts.append(datasets.split(examples, source.validation, spec.seed))
        problem = method_problem([e for part in parts[-1] for e in part], spec.method)
        if problem:
            raise BuildError(problem)
    if len(parts) == 1:
        return parts[0]
    mixed = datasets.mix([train for train, _ in parts], [s.weight for s in spec.sources], spec.seed)
    return mixed, [e for _, held_out in parts for e in held_out]


def _rows(spec: TrainSpec, tokenizer, split: tuple[list, list]) -> tuple[list[Encoded], list[Encoded]]:
    """Training and validation rows of `split_examples`' records, tokenized, masked and (optionally) packed."""
    return tuple(_rows_of(examples, tokenizer, spec, what) if examples else []
                 for what, examples in zip(("training", "validation"), split))


def _rows_of(examples: list[datasets.Example], tokenizer, spec: TrainSpec, what: str) -> list[Encoded]:
    """Conversations as `packing` says; raw text always packed, its documents end to end (with EOS
    between them) cut into rows of max_seq_len, so a long document is trained on whole."""
    if spec.method != "sft":  # preference pairs, never packed
        return _encode_all(examples, tokenizer, spec, what)
    chats = [e for e in examples if not e.is_text]
    texts = [encode(e, tokenizer, spec.template, spec.system) for e in examples if e.is_text]
    rows = make_rows(_encode_all(chats, tokenizer, spec, what), spec.max_seq_len, spec.packing) if chats else []
    return rows + (make_rows(texts, spec.max_seq_len, True) if texts else [])


def memory_limit(spec: TrainSpec, device: str) -> tuple[int, str]:
    """What the run may use (bytes), and what says so, for the refusal's wording."""
    if spec.max_memory:
        return parse_size(spec.max_memory), "that max_memory allows"
    return memory.available(device)


def check_memory(base_dir: Path, spec: TrainSpec, device: str, dtype, seq_len: int,
                 limit: tuple[int, str] | None = None) -> tuple[bool, memory.Estimate]:
    """Whether to checkpoint gradients, and the estimate for batches of rows `seq_len` tokens long;
    refuses a run that would not fit `limit` (default: memory_limit) before any weight is loaded."""
    from transformers import AutoConfig

    shape = memory.shape_of(AutoConfig.from_pretrained(base_dir), list(spec.lora.target_modules), spec.lora.r)
    cpu = device == "cpu"

    rows_per_record = 1 if spec.method == "sft" else 2  # a pair is a chosen and a rejected row

    def need(**change) -> memory.Estimate:
        options = {"batch": spec.batch_size, "checkpointing": bool(spec.gradient_checkpointing), "qlora": spec.qlora,
                   "optimizer": spec.optimizer} | change
        options["batch"] *= rows_per_record
        return memory.estimate(shape, weight_bytes=dtype.itemsize, seq_len=seq_len,
                               processes=spec.processes * spec.nodes, sharded=spec.fsdp, cpu=cpu, **options)

    limit, where = limit or memory_limit(spec, device)
    checkpointing = spec.gradient_checkpointing
    if checkpointing is None:  # on only where the run would not fit without it
        checkpointing = need().total > limit and need(checkpointing=True).total <= limit
    needed = need(checkpointing=checkpointing)
    if needed.total > limit:
        options = {} if checkpointing else {"gradient_checkpointing = true": need(checkpointing=True)}
        if device == "cuda" and not spec.qlora:
            options["qlora = true"] = need(checkpointing=checkpointing, qlora=True)
        if spec.optimizer == "adamw":
            options['optimizer = "adamw_8bit"'] = need(checkpointing=checkpointing, optimizer="adamw_8bit")
        smaller = spec.batch_size // 2
        while smaller > 1 and need(checkpointing=checkpointing, batch=smaller).total > limit:
            smaller //= 2
        if smaller >= 1:  # the largest batch that fits, with grad_accum keeping the step's batch
            accum = spec.grad_accum * math.ceil(spec.batch_size / smaller)
            options[f"batch_size = {smaller} with grad_accum = {accum}"] = need(checkpointing=checkpointing, batch=smaller)
        raise BuildError(memory.too_big(needed, limit, where, options))
    return checkpointing, needed


def longest(*row_lists: list[Encoded] | list[Pair]) -> int:
    """The longest row: batches are padded to theirs, so no batch is wider."""
    return max(_length(r) for rows in row_lists for r in rows)


def _lora_model(base_dir: Path, out_dir: Path, spec: TrainSpec, device, dtype, checkpointing: bool,
                start_adapter: Path | None = None):
    """The base with LoRA layers: fresh, the previous build's adapter when resuming, or `start_adapter`
    (another model's, start_from) to train on."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig

    # PEFT calls a transformers API that transformers 5 has deprecated; not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    model_class = hf.language_model_class(AutoConfig.from_pretrained(base_dir))
    if spec.qlora:
        import torch
        from transformers import BitsAndBytesConfig

        quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
        model = model_class.from_pretrained(base_dir, dtype=torch.bfloat16, quantization_config=quantized,
                                                     device_map={"": device})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = model_class.from_pretrained(base_dir, dtype=dtype).to(device)
        for weight_name, weight in model.named_parameters():  # refused here, not as a NaN loss at step 1
            hf.refuse_non_finite(weight.detach(), weight_name, base_dir, "use an intact copy of the base model")
        if checkpointing:  # recompute each layer in backward instead of keeping its activations
            if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # earlier releases (5.17 ran the GPU rows of bench/train_scale.py)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = lora_targets(spec, linear_module_names(model), is_moe(model), base_dir)
    if spec.resume and (out_dir / lora.WEIGHTS).is_file():
        return PeftModel.from_pretrained(model, out_dir, is_trainable=True), True
    if start_adapter:
        return PeftModel.from_pretrained(model, start_adapter, is_trainable=True), False
    # A vision tower has layers of the same names (q_proj, …); a LoRA trained on text leaves them alone.
    vision = any(hf.is_vision(name) for name, _ in model.named_modules())
    config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                        target_modules=targets, use_rslora=spec.lora.rslora, task_type="CAUSAL_LM",
                        exclude_modules=rf".*\b({'|'.join(hf.VISION_PARTS)})\b.*" if vision else None)
    return get_peft_model(model, config), False


def _optimizer(model, spec: TrainSpec):
    import torch

    trained = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(trained, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    optimizer_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[spec.optimizer]
    return optimizer_cls(trained, lr=spec.learning_rate, weight_decay=spec.weight_decay)


@dataclass
class Progress:
    """Where the run is: what a checkpoint saves and a resumed run starts from."""

    step: int
    data_order: random.Random
    pending: list[list[int]]  # the batches left of the current pass, as row numbers
    log: list[dict]
    best: dict | None = None  # the lowest validation loss so far: step, val_loss, evaluations since, weights (main)
    # DPO: the reference's log-probabilities of each pair, {"train": […], "validation": […]}, scored at step 0
    references: dict | None = None


def next_batch(progress: Progress, count: int, size: int) -> list[int]:
    """The next batch's row numbers: from the current seeded pass over `count` rows, or a new one."""
    if not progress.pending:
        progress.pending = batch_order(count, size, progress.data_order)
    return progress.pending.pop(0)


def rows_trained(count: int, size: int, seed: int, batches_taken: int) -> list[int]:
    """The row numbers the training loop took in `batches_taken` batches: the same draws from the same
    seed as `_fit`, however often the run was resumed."""
    replay = Progress(0, random.Random(seed), [], [])
    return [row for _ in range(batches_taken) for row in next_batch(replay, count, size)]


def _snapshot(model, optimizer, scheduler, progress: Progress, ranks: Ranks) -> dict | None:
    """The checkpoint's content, on the main process (None elsewhere); every process's RNG is in it."""
    import torch

    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    every_rng = ranks.gather(rng)
    trained, optimized = ranks.trained_state(model), ranks.optimizer_state(model, optimizer)
    if not ranks.main:
        return None
    return {"step": progress.step, "lora": trained, "optimizer": optimized,
            "scheduler": scheduler.state_dict(), "data_order": progress.data_order.getstate(),
            "pending": progress.pending, "log": progress.log, "rng": every_rng, "best": progress.best,
            "references": progress.references}


def _restore_weights(state: dict, model) -> None:
    """The checkpoint's LoRA weights, into the model before it is wrapped or sharded."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state["lora"][name])


def _restore(state: dict, model, optimizer, scheduler, ranks: Ranks) -> Progress:
    import torch

    ranks.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][ranks.rank]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    data_order = random.Random()
    data_order.setstate(state["data_order"])
    return Progress(state["step"], data_order, state["pending"], state["log"], state.get("best"), state.get("references"))


def track_best(best: dict | None, step: int, val_loss: float) -> tuple[dict, bool]:
    """After a validation at `step`: the best so far, and whether this one is it (strictly lower;
    step 0, the base before any update, does not count)."""
    if step > 0 and (best is None or val_loss < best["val_loss"]):
        return {"step": step, "val_loss": val_loss, "since": 0}, True
    return (best | {"since": best["since"] + 1} if best else best), False


def diverged(name: str, step: int, steps: int, loss: float, learning_rate: float, spec: TrainSpec) -> str:
    """Why training stopped at a NaN or infinite loss, and what to try: going on would only write an
    adapter of NaNs, which llama.cpp's quantizer rejects hours later."""
    where = f"train {name}: the loss is {loss} at step {step} of {steps}"
    if step == 1:  # no update has happened yet: the LoRA starts as zero, so this is the base or the data
        return (f"{where}, before any update: the base model's weights or the training data give it; check the "
                "base (does it answer sensibly on its own?) and the data's records")
    hints = [f"lower learning_rate in [models.train] (now {spec.learning_rate:g}; the step used {learning_rate:g})"]
    if spec.warmup_steps == 0:
        hints.append("add warmup_steps")
    if spec.dtype == "float16":
        hints.append('use dtype = "bfloat16" or "float32" (float16 overflows easily)')
    return f"{where}: training diverged, and going on would write broken weights; {', or '.join(hints)}"


def _fit(model, optimizer, scheduler, progress: Progress, train_rows, val_rows, spec: TrainSpec, steps: int,
         pad_id: int, device, name: str, ranks: Ranks, checkpoints: Path | None,
         events: tracking.EventWriter) -> list[dict]:
    """The training loop from `progress` on; returns the log, one row per step plus the validation losses."""
    batches_per_epoch = math.ceil(len(train_rows) / spec.batch_size)
    cadence = checkpoint.Cadence(spec.checkpoint_every if checkpoints else 0)
    log = progress.log
    model.train()
    progress_bar = bar(range(progress.step + 1, steps + 1), desc=f"train {name}", unit="step",
                       initial=progress.step, total=steps, disable=not ranks.main,
                       file=sys.stdout if ranks.distributed else None)  # the launcher passes on the main rank's stdout
    references = progress.references or {}
    for step in progress_bar:
        started, tokens, loss_sum = time.perf_counter(), 0, 0.0
        rewards: dict[str, float] = {}  # preference methods: the step's mean rewards, as TRL logs them
        for _ in range(spec.grad_accum):
            batch, weight = split_batch(next_batch(progress, len(train_rows), spec.batch_size), ranks)
            if spec.method == "sft":
                tensors = {k: v.to(device) for k, v in collate([train_rows[i] for i in batch], pad_id).items()}
                loss, read = sft_loss(model, tensors), int(tensors["attention_mask"].sum())
            else:
                scored, read = _preference_loss(model, [train_rows[i] for i in batch],
                                                [references["train"][i] for i in batch] if references else None,
                                                spec, pad_id, device)
                loss = scored.loss
                for key, value in scored.metrics().items():
                    rewards[key] = rewards.get(key, 0.0) + value * weight / spec.grad_accum
            loss = loss * (weight / spec.grad_accum)
            loss.backward()  # DDP and FSDP exchange the gradients inside backward
            loss_sum += loss.item()
            tokens += read * weight
        if ranks.distributed:
            loss_sum, tokens, *summed = ranks.total(loss_sum / ranks.world, tokens, *(v / ranks.world for v in rewards.values()))
            rewards = dict(zip(rewards, summed))
        if not math.isfinite(loss_sum):  # every rank sees the same total, so all stop together
            progress_bar.close()
            raise BuildError(diverged(name, step, steps, loss_sum, scheduler.get_last_lr()[0], spec))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        row = {"step": step, "epoch": round(step * spec.grad_accum / batches_per_epoch, 3),
               "train_loss": round(loss_sum, 6), "learning_rate": scheduler.get_last_lr()[0],
               "step_s": round(time.perf_counter() - started, 4),
               "tokens_per_s": round(tokens / (time.perf_counter() - started), 1),
               "peak_memory_mb": round(_peak_memory_mb(device), 1)} | {k: round(v, 6) for k, v in rewards.items()}
        if val_rows and (step % spec.eval_every == 0 or step == steps):
            row |= {k: round(v, 6) for k, v in validate(model, val_rows, references.get("validation"), spec, pad_id,
                                                         device, ranks).items()}
        log.append(row)
        events.write(row)
        stop = False
        if "val_loss" in row and (spec.early_stopping_patience or spec.keep == "best"):
            progress.best, improved = track_best(progress.best, step, row["val_loss"])
            if improved and spec.keep == "best":  # every rank takes part in gathering; the main keeps them
                progress.best["weights"] = ranks.trained_state(model)
            patience = spec.early_stopping_patience
            if patience and progress.best and progress.best["since"] >= patience and step < steps:
                row["stopped"] = (f"early: no lower validation loss in {patience} evaluations since step "
                                  f"{progress.best['step']}")
                stop = True
        # refresh=False: the loss shows with the bar's next draw, so a log gets no line per step
        progress_bar.set_postfix(refresh=False, loss=f"{loss_sum:.3f}",
                                 **({"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {}))
        progress.step = step
        if stop:
            break
        if step < steps and ranks.any(cadence.due(step)):
            started = time.perf_counter()
            state = _snapshot(model, optimizer, scheduler, progress, ranks)
            if ranks.main:
                checkpoint.save(checkpoints, step, state)
            ranks.barrier()
            row["checkpoint_s"] = round(time.perf_counter() - started, 4)  # after the snapshot: a report, not state
    progress_bar.close()
    return log


def _save(model, base_dir: Path, out_dir: Path, model_name: str, log: list[dict], state: dict | None = None) -> None:
    # PEFT looks at the base's config while saving: point it at the local folder (a resumed
    # adapter names the model instead, and PEFT would go looking for that on the hub).
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    with atomic_dir(out_dir) as tmp:
        # state: the whole weights of sharded ones. With lm_head (or embed_tokens) among the targets PEFT
        # would also save the layer's whole base weight, for a vocabulary resized in training; modelmake
        # never resizes it, and neither a GGUF LoRA nor the merge wants a second copy of the base.
        model.save_pretrained(tmp, state_dict=state, save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
        _normalize_config(tmp / lora.CONFIG, model_name)
        (tmp / LOG).write_text("".join(json.dumps(r) + "\n" for r in log), encoding="utf-8")


def train(base_dir: Path, out_dir: Path, spec: TrainSpec, model_name: str, threads: int,
          checkpoints: Path | None, ranks: Ranks, limit: tuple[int, str] | None = None,
          events: Path | None = None, start_adapter: Path | None = None) -> dict[str, str]:
    """One process's part of a run (all of it when there is one): train, and save on the main process.
    `limit`: the memory the launching process measured, so that every rank decides as it did.
    `events`: TensorBoard's folder for this run (report_to), written by the main process.
    `start_adapter`: the adapter of the model named by start_from, which this run continues."""
    import torch
    from transformers import AutoTokenizer, get_scheduler

    quiet_library_bars()  # each process of a multi-process run loads the weights too
    device = pick_device(spec.device)
    dtype = torch.bfloat16 if spec.qlora else pick_dtype(spec.dtype, device)
    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    split = split_examples(spec)
    train_rows, val_rows = _rows(spec, tokenizer, split)
    checkpointing, needed = check_memory(base_dir, spec, device, dtype, longest(train_rows, val_rows), limit)
    device = ranks.device if ranks.distributed else device
    torch.manual_seed(spec.seed)
    if device == "cpu":
        torch.use_deterministic_algorithms(True)
    model, resumed = _lora_model(base_dir, out_dir, spec, device, dtype, checkpointing, start_adapter)
    steps = spec.max_steps or spec.epochs * math.ceil(math.ceil(len(train_rows) / spec.batch_size) / spec.grad_accum)
    saved = checkpoint.latest(checkpoints) if checkpoints else None
    state = checkpoint.load(saved) if saved else None
    if state:
        _restore_weights(state, model)
    model = ranks.wrap(model)
    optimizer = _optimizer(model, spec)
    scheduler = get_scheduler(spec.schedule, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=steps)
    progress = _restore(state, model, optimizer, scheduler, ranks) if state else Progress(0, random.Random(spec.seed), [], [])
    if spec.method == "dpo" and progress.references is None:  # the model as it starts: the reference
        progress.references = {"train": reference_logps(model, train_rows, spec, pad_id, device),
                               "validation": reference_logps(model, val_rows, spec, pad_id, device)}
    if ranks.main:
        print(f"train {model_name}: device {device}, dtype {str(dtype).removeprefix('torch.')}, "
              f"{len(train_rows)} training / {len(val_rows)} validation rows, {steps} steps"
              f"{f', {ranks.world} processes' if ranks.world > 1 else ''}"
              f"{', gradient checkpointing' if checkpointing else ''}{', QLoRA (4-bit NF4 base)' if spec.qlora else ''}"
              f"{f', {spec.method.upper()} (beta {spec.beta:g}) on {len(train_rows)} pairs' if spec.method != 'sft' else ''}"
              f"{f', continuing the adapter of {spec.start_from}' if start_adapter else ''}"
              f"{', resuming from the previous adapter' if resumed else ''}"
              f"{f', continuing from the checkpoint at step {progress.step}' if saved else ''}\n"
              f"  memory estimate {memory.describe(needed)}")
    # The training mix: each source's file name → how many of its records an epoch holds.
    mix = dict(collections.Counter(Path(source_of(e)).name for e in split[0])) if len(spec.sources) > 1 else None
    if mix and ranks.main:
        print(f"  mix of {sum(mix.values())} training records: {mix_words(mix)}")
    event_writer = tracking.EventWriter(events if ranks.main else None)
    if not saved:  # step 0: where the run starts, and what it was estimated to need
        start = {"step": 0, "estimated_memory_mb": round(needed.total / 2**20, 1)}
        if mix:
            start["mix"] = mix
        if val_rows:
            start |= {k: round(v, 6) for k, v in validate(model, val_rows, progress.references and
                                                           progress.references["validation"], spec, pad_id, device,
                                                           ranks).items()}
        progress.log.append(start)
        event_writer.write(start)
    try:
        log = _fit(model, optimizer, scheduler, progress, train_rows, val_rows, spec, steps, pad_id, device,
                   model_name, ranks, checkpoints, event_writer)
    finally:
        event_writer.close()
    facts = {"device": device.split(":")[0], "dtype": str(dtype).removeprefix("torch.")}
    if device == "cpu":  # the SIMD kernels torch picked and how many threads split the sums shape the floats
        facts |= {"cpu_kernels": torch.backends.cpu.get_cpu_capability(), "threads": str(torch.get_num_threads())}
    if ranks.world > 1:
        facts["processes"] = str(ranks.world)
    if checkpointing:
        facts["gradient_checkpointing"] = "true"
    if mix and not spec.packing:  # what the steps took of each source (a packed row mixes them)
        taken = collections.Counter(Path(train_rows[i].source).name
                                    for i in rows_trained(len(train_rows), spec.batch_size, spec.seed, progress.step * spec.grad_accum))
        log[-1]["mix_trained"] = {name: taken[name] for name in mix}
    trained = ranks.trained_state(model) if ranks.distributed else None  # every process takes part
    best = progress.best
    if spec.keep == "best" and best and best["step"] != log[-1]["step"]:
        trained = best["weights"]
        log[-1]["kept_step"] = best["step"]
    if ranks.main and (log[-1].get("stopped") or "kept_step" in log[-1]):
        print(f"  {'stopped ' + log[-1]['stopped'] + '; ' if log[-1].get('stopped') else ''}"
              f"kept the adapter of step {log[-1].get('kept_step', log[-1]['step'])}")
    if ranks.main:
        _save(ranks.unwrap(model), base_dir, out_dir, model_name, log, trained)
        if val_rows:
            accuracy = [r["val_preference_accuracy"] for r in (log[0], log[-1]) if "val_preference_accuracy" in r]
            print(f"  validation loss {log[0]['val_loss']:.4f} → {log[-1]['val_loss']:.4f}; "
                  f"{'held-out preference accuracy {:.1%} → {:.1%}; '.format(*accuracy) if len(accuracy) == 2 else ''}"
                  f"peak memory {max(r.get('peak_memory_mb', 0) for r in log):,.0f} MB measured, "
                  f"{needed.total / 2**20:,.0f} MB estimated")
    ranks.barrier()
    return facts | ({"resumed": "true"} if resumed else {})


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def run_key(spec: TrainSpec, inputs: list[Path], threads: int) -> str:
    """What the checkpoints are valid for: every input's bytes, the parameters, the tools and the
    thread count (which shapes CPU floats)."""
    import blake3

    described = {"inputs": sorted(file_blake3(p) for p in inputs), "params": spec.params(),
                 "versions": tool_versions(*TOOLS) | {"stage": str(REVISION)}, "threads": threads}
    return blake3.blake3(canonical_json(described).encode()).hexdigest()


def run(base_dir: Path, out_dir: Path, spec: TrainSpec, model_name: str, threads: int = 0,
        work: Path | None = None, inputs: list[Path] = (), slots: tuple[Path, int] | None = None,
        events: Path | None = None, start_adapter: Path | None = None, gang: dict | None = None) -> dict[str, str]:
    """Train and save the adapter; returns the platform facts that shaped its bytes, for the lock.

    With a work folder, checkpoints go under work/checkpoints (keyed by the run's inputs) and a
    killed run continues from the last one; they are removed once the adapter is in place. `slots`:
    (folder, count): at most count trainings of this cache run at once (`[build] max_parallel_train`).
    `gang`: this node's part of a run over several (`nodes`, given by the Ray executor): {"nodes",
    "node_rank", "run_id", "endpoint"}; the node whose ranks hold the main one writes the adapter."""
    if slots:
        with buildlock.slot(*slots, "train"):
            return run(base_dir, out_dir, spec, model_name, threads, work, inputs, events=events,
                       start_adapter=start_adapter, gang=gang)
    out_dir = Path(out_dir)
    if spec.processes > 1:  # the cores are shared between the processes
        threads = max(1, (threads or available_cores()) // spec.processes)
    checkpoints = None
    if work:
        key = run_key(spec, inputs, threads or available_cores())
        checkpoints = checkpoint.folder_for(work / "checkpoints", key)
    if spec.processes == 1 and gang is None:
        facts = train(base_dir, out_dir, spec, model_name, threads, checkpoints, Ranks(), events=events,
                      start_adapter=start_adapter)
    elif work is None:
        raise BuildError("training with processes > 1 needs a work folder for its job")
    else:
        facts = _run_ranks(base_dir, out_dir, spec, model_name, threads, checkpoints, work, events, start_adapter, gang)
        if facts is None:  # another node moves the adapter into place, and clears the work (shared with it)
            return {}
    if work:
        shutil.rmtree(work, ignore_errors=True)
    return facts


def _run_ranks(base_dir: Path, out_dir: Path, spec: TrainSpec, model_name: str, threads: int, checkpoints: Path | None,
               work: Path, events: Path | None, start_adapter: Path | None, gang: dict | None) -> dict[str, str] | None:
    """processes > 1 (or this node's part of a run over several): check what can be checked here, launch
    the ranks, and move their adapter into place; None where the main rank ran on another node."""
    from transformers import AutoTokenizer

    device = pick_device(spec.device)
    gpus = _cuda_devices() if device == "cuda" else spec.processes
    if gpus < spec.processes:
        raise BuildError(f"processes = {spec.processes} trains one process per GPU and this machine has {gpus}: "
                         f"set processes = {gpus} or fewer")
    # Refuse before launching, and decide for every rank: ranks measuring free memory themselves,
    # while the others load, could each decide differently.
    rows = _rows(spec, AutoTokenizer.from_pretrained(base_dir), split_examples(spec))
    limit = memory_limit(spec, device)
    checkpointing, _ = check_memory(base_dir, spec, device, pick_dtype(spec.dtype, device), longest(*rows), limit)
    decided = spec.model_copy(update={"gradient_checkpointing": checkpointing})
    job = {"base_dir": str(base_dir), "spec": decided.model_dump(mode="json"), "model_name": model_name,
           "threads": threads, "checkpoints": str(checkpoints), "resume_from": str(out_dir), "limit": list(limit),
           "events": str(events) if events else None, "start_adapter": str(start_adapter) if start_adapter else None}
    folder = distributed.launch(job, work, spec.processes, threads, gang)
    if gang and not (folder / "adapter").is_dir():
        return None
    with atomic_dir(out_dir) as tmp:  # the ranks' finished adapter takes the empty temp folder's place
        tmp.rmdir()
        os.replace(folder / "adapter", tmp)
    return json.loads((folder / distributed.FACTS).read_text(encoding="utf-8"))


def _rank_main(job_path: str) -> None:
    """One rank of a run with processes > 1: `python -m stages.train JOB` (started by distributed.launch)."""
    import signal

    # Stopped with SIGINT (Ctrl-C, or the agent stopping a run another node failed): at once. Python's own
    # handler would wait for a collective that is blocked on a dead peer to return first, for minutes.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    spec = TrainSpec.model_validate(job["spec"])
    folder = Path(job_path).parent
    ranks = Ranks.joined(pick_device(spec.device), spec.fsdp)
    adapter = folder / "adapter"
    if ranks.main and spec.resume and Path(job["resume_from"], lora.WEIGHTS).is_file():
        shutil.copytree(job["resume_from"], adapter, dirs_exist_ok=True)  # the previous adapter, to start from
    ranks.barrier()
    facts = train(Path(job["base_dir"]), adapter, spec, job["model_name"], job["threads"],
                  Path(job["checkpoints"]), ranks, tuple(job["limit"]), Path(job["events"]) if job["events"] else None,
                  Path(job["start_adapter"]) if job["start_adapter"] else None)
    if ranks.main:
        (folder / distributed.FACTS).write_text(json.dumps(facts), encoding="utf-8")
    ranks.leave()


def tasks(build: ModelBuild) -> list[Task]:
    model, paths = build.model, build.paths
    if not model.train:
        return []
    split_examples(model.train)  # a bad record fails `doit` before anything runs, not hours into the build
    if model.train.template == "chat" and build.base_has_chat_template is False:
        raise BuildError(no_chat_template(f"model {model.name!r}: its base {model.base.text}"))
    inputs = paths.base_files() + model.train.data_files
    first = model.train.start_from  # the model whose adapter this run continues, trained first
    start_adapter = ModelPaths.of(build.spec, next(m for m in build.spec.models if m.name == first)).adapter if first else None
    trained_from = inputs + ([start_adapter / name for name in lora.ADAPTER_FILES] if first else [])
    shown = paths.preview
    look = Task(f"{paths.data_name}.preview", "what the loss sees: the first records as tokenized, loss tokens marked",
                write_preview, {"spec": model.train, "base_dir": paths.base, "out_path": shown,
                                "names": {str(f): build.input_name(f) for f in model.train.data_files},
                                "title": f"{paths.data_name}: what the loss sees"},
                model.train.split_params() | {"shown": PREVIEWED}, inputs=inputs, outputs=[shown])
    return [look, Task(model.name, "LoRA fine-tune (PyTorch + PEFT)", run,
                 {"base_dir": paths.base, "out_dir": paths.adapter, "spec": model.train, "model_name": model.name,
                  "threads": build.spec.threads, "work": paths.train_work, "inputs": trained_from,
                  "slots": (build.spec.cache / ".locks", build.spec.build.max_parallel_train),
                  "events": paths.events if "tensorboard" in model.train.report_to else None,
                  "start_adapter": start_adapter},
                 model.train.params(), inputs=trained_from,
                 outputs=paths.adapter_files(), clean=[paths.adapter], scratch=[paths.train_work],
                 cacheable=not model.train.resume,  # a resumed adapter depends on the one before it
                 after=[f"train:{look.name}", *build.after_preflight, *([f"train:{first}"] if first else [])])]


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record  # the launcher reads the error it writes

    record(_rank_main)(sys.argv[1])
