"""eval: what each GGUF variant costs and gives, measured with llama.cpp (llama-cpp-python).

- perplexity on held-out text, in windows of at most `context` tokens, each evaluated from an
  empty cache: a window's first token is context only, every later token is scored. Held-out
  conversations are a window each (no conversation sees another's answers), and for them the
  perplexity of the answers alone, the tokens the train stage learns, is measured too;
- against the reference GGUF (the converted F16 of the same model), on the same tokens: the mean
  KL divergence of the next-token distributions and how often their most likely tokens agree,
  the measure of llama.cpp's `llama-perplexity --kl-divergence`;
- prompt-processing and generation speed: the median of several timed runs, after one untimed;
- size and bits per weight (tensor bytes × 8 / weights);
- answer accuracy on held-out prompts by greedy generation (`stages.accuracy`): exact match, chrF,
  BLEU, and how many answers are the reference variant's own.

Results are JSON (eval/<variant>.json). They hold timings, so they are reports, not artifacts:
the manifest leaves them out, as it leaves out the train log.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import accuracy
from .formats import dataset, ggufheader
from .ground import llamacpp
from .ground.atomic import atomic_file
from .ground.device import available_cores
from .ground.errors import BuildError
from .ground.hashing import tool_versions
from .ground.spec import EvalSpec, GateSpec, TrainSpec
from .ground.task import ModelBuild, Task

REVISION = 3  # 3: prompts get one BOS where the GGUF asks for it, as llama-server gives
TOOLS = ("llama-cpp-python", "numpy", "transformers", "tokenizers", "sacrebleu")

ROWS_PER_CHUNK = 64  # next-token distributions turned to float64 at a time: bounds memory at any vocabulary


@dataclass(frozen=True)
class Subject:
    """One model as llama.cpp runs it: a GGUF, and for the adapter route a GGUF LoRA on top."""

    model: Path
    lora: Path | None = None

    def files(self) -> list[Path]:
        return [self.model] + ([self.lora] if self.lora else [])


@dataclass(frozen=True)
class Job:
    """What one eval task measures; the graph decides it."""

    model: str
    variant: str  # F16, Q4_K_M, …, "base" (before fine-tuning) or "lora" (base + adapter)
    subject: Subject
    reference: Subject | None  # compared with; None for the yardstick itself and the base before fine-tuning
    text: Path | None  # held-out text; None: speed and size only
    text_source: str  # how results name the text: "data/demo.jsonl (validation split)", "notes.txt"
    prompts: Path | None = None  # the prompts to answer (eval/prompts.jsonl); None: no generation
    reference_result: Path | None = None  # the reference's eval JSON, whose answers these are compared with


# ---- formats and arithmetic, no I/O ----

@dataclass(frozen=True)
class Window:
    """Tokens evaluated together from an empty cache, and which of them belong to an answer."""

    tokens: list[int]
    is_answer: list[bool]


def windows(documents: list[Window], context: int) -> list[Window]:
    """Each document cut into pieces of at most `context` tokens; a piece needs two tokens to score one.
    Conversations are documents of their own, so none sees another's answers."""
    return [Window(doc.tokens[i:i + context], doc.is_answer[i:i + context])
            for doc in documents for i in range(0, len(doc.tokens), context) if len(doc.tokens) - i >= 2]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Tally:
    """Sums over scored positions; `add` takes one window's logits (rows: positions, cols: vocabulary)."""

    scored: int = 0
    nll: float = 0.0  # Σ −log p(actual next token)
    answers: int = 0  # scored positions whose next token belongs to an answer
    answer_nll: float = 0.0
    reference_nll: float = 0.0  # Σ −log p(actual next token) under the reference
    kl: float = 0.0  # Σ KL(reference ‖ model)
    top1: int = 0  # positions where both models' most likely next token is the same

    def add(self, logits: np.ndarray, window: Window, reference: np.ndarray | None = None) -> None:
        targets, answer = np.asarray(window.tokens[1:]), np.asarray(window.is_answer[1:], dtype=bool)
        for start in range(0, len(targets), ROWS_PER_CHUNK):
            rows = slice(start, min(start + ROWS_PER_CHUNK, len(targets)))
            logp = log_softmax(logits[rows])
            nll = -logp[np.arange(len(logp)), targets[rows]]
            self.nll += float(nll.sum())
            self.answer_nll += float(nll[answer[rows]].sum())
            if reference is not None:
                ref_logp = log_softmax(reference[rows])
                self.reference_nll -= float(ref_logp[np.arange(len(ref_logp)), targets[rows]].sum())
                self.kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
                self.top1 += int((ref_logp.argmax(axis=-1) == logp.argmax(axis=-1)).sum())
        self.scored += len(targets)
        self.answers += int(answer.sum())

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.scored)

    @property
    def reference_perplexity(self) -> float:
        return math.exp(self.reference_nll / self.scored)

    @property
    def answer_perplexity(self) -> float | None:
        return math.exp(self.answer_nll / self.answers) if self.answers else None


def bits_per_weight(header: ggufheader.Header, size: int) -> float:
    return (size - header.data_offset) * 8 / header.elements


def gate_failures(result: dict, gate: GateSpec) -> list[str]:
    """Each limit of `gate` that `result` misses, in words."""
    failures = []
    if gate.needs_text:
        failures += _quality_failures(result.get("quality"), gate)
    if gate.needs_answers:
        failures += _accuracy_failures(result.get("accuracy"), gate)
    if gate.min_preference_accuracy is not None:
        pairs = result.get("preference")
        if not pairs:
            failures.append("it has no held-out preference pairs to gate on")
        elif pairs["accuracy"] < gate.min_preference_accuracy:
            failures.append(f"it prefers the chosen answer in {pairs['accuracy']:.2%} of {pairs['pairs']} held-out pairs, "
                            f"under min_preference_accuracy = {gate.min_preference_accuracy}")
    return failures


def _quality_failures(quality: dict | None, gate: GateSpec) -> list[str]:
    if not quality or quality.get("reference_perplexity") is None:
        return ["it has no comparison with the reference to gate on"]
    failures = []
    increase = quality["perplexity"] / quality["reference_perplexity"] - 1
    if gate.max_ppl_increase is not None and increase > gate.max_ppl_increase:
        failures.append(f"perplexity {quality['perplexity']:.4f} is {increase:+.2%} over the reference's "
                        f"{quality['reference_perplexity']:.4f} (max_ppl_increase = {gate.max_ppl_increase} "
                        f"allows {gate.max_ppl_increase:+.2%})")
    if gate.max_kl is not None and quality["kl_divergence"] > gate.max_kl:
        failures.append(f"mean KL divergence {quality['kl_divergence']:.6f} exceeds max_kl = {gate.max_kl}")
    if gate.min_top1 is not None and quality["top1_agreement"] < gate.min_top1:
        failures.append(f"top-1 agreement {quality['top1_agreement']:.2%} is under min_top1 = {gate.min_top1}")
    return failures


def _accuracy_failures(scores: dict | None, gate: GateSpec) -> list[str]:
    if not scores:
        return ["it answered no prompts to gate on"]
    failures = []
    if gate.min_exact_match is not None and scores["exact_match"] < gate.min_exact_match:
        failures.append(f"exact match {scores['exact_match']:.2%} is under min_exact_match = {gate.min_exact_match}")
    if gate.max_exact_match_drop is not None:
        if scores.get("reference_exact_match") is None:
            failures.append("it has no reference exact match to measure a drop from")
        # shares of a few dozen answers: 0.8 - 0.5 must not come out over 0.3
        elif (drop := scores["reference_exact_match"] - scores["exact_match"]) > gate.max_exact_match_drop + 1e-9:
            failures.append(f"exact match {scores['exact_match']:.2%} is {drop:.2%} under the reference's "
                            f"{scores['reference_exact_match']:.2%} (max_exact_match_drop = {gate.max_exact_match_drop})")
    if gate.min_chrf is not None and scores["chrf"] < gate.min_chrf:
        failures.append(f"chrF {scores['chrf']:.2f} is under min_chrf = {gate.min_chrf}")
    if gate.min_terminated is not None and scores["terminated"] < gate.min_terminated:
        failures.append(f"{scores['terminated']:.2%} of the answers end their turn before max_new_tokens, under "
                        f"min_terminated = {gate.min_terminated}: the served model would talk on until cut off")
    return failures


# ---- llama.cpp ----

@contextlib.contextmanager
def _llama(subject: Subject, context: int, threads: int, logits_all: bool):
    """The subject loaded in llama.cpp, freed on leaving: a 7B model must not stay in memory
    until the garbage collector finds it, while the next task loads another."""
    import llama_cpp

    from .ground.llamacpp import captured_llama_log

    with captured_llama_log() as log:
        llm = None
        try:
            llm = llama_cpp.Llama(
                model_path=str(subject.model), n_ctx=context, n_batch=context, n_ubatch=context, n_threads=threads,
                n_threads_batch=threads, logits_all=logits_all, verbose=False)
            if subject.lora:
                _apply_lora(llm, subject.lora)
        except (ValueError, RuntimeError) as err:
            if llm:  # the base loaded but its LoRA did not
                llm.close()
            tail = "".join(log[-3:]).strip().replace("\n", " | ")
            raise BuildError(f"llama.cpp cannot load {' + '.join(map(str, subject.files()))} ({err}): {tail}; "
                             "rebuild it with `doit`") from None
    with contextlib.closing(llm):
        yield llm


def _apply_lora(llm, lora: Path) -> None:
    """Apply a GGUF LoRA at run time, as `Llama(lora_path=…)` does, but with the base still
    memory-mapped: llama-cpp-python turns mmap off whenever it is given a LoRA (a rule from when
    llama.cpp patched the weights in place), which copies a 7B base into 14 GB of process memory.
    llama.cpp itself applies the adapter beside the mapped weights."""
    import ctypes

    import llama_cpp

    adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(lora).encode("utf-8"))
    if not adapter:
        raise RuntimeError(f"llama.cpp cannot load the LoRA {lora}")
    llm._stack.callback(llama_cpp.llama_adapter_lora_free, adapter)
    adapters, scales = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), (ctypes.c_float * 1)(1.0)
    if llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, scales):
        raise RuntimeError(f"llama.cpp cannot apply the LoRA {lora} to {llm.model_path}")


def read_documents(path: Path) -> list[list[tuple[str, bool]]]:
    """Documents of (text, is it an answer) pieces: a .jsonl of {"prompt", "answer"} records (what
    the train split is written as) is a document per record; any other file is one plain text."""
    if path.suffix != ".jsonl":
        return [[(path.read_text(encoding="utf-8-sig"), False)]]
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        try:
            record = json.loads(line)
            documents.append([(record["prompt"], False), (record["answer"], True)])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BuildError(f"{path}:{number}: not a {{\"prompt\", \"answer\"}} record; a .jsonl eval text holds "
                             "one such record per line (or give a plain text file)") from None
    return documents


def read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of each held-out preference record: those with "rejected" beside the answer."""
    if path.suffix != ".jsonl":
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return [(r["prompt"], r["answer"], r["rejected"]) for r in records if "rejected" in r]


def preference_accuracy(job: Job, pairs: list[tuple[str, str, str]], context: int, threads: int) -> dict:
    """How often the variant, run by llama.cpp, gives each held-out pair's chosen answer a higher mean token
    log-probability than the rejected one: what the train stage measures in PyTorch, on what ships."""
    margins = []
    with _llama(job.subject, context, threads, logits_all=True) as llm:
        for prompt, *answers in pairs:
            asked = llamacpp.prompt_tokens(llm, prompt)
            means = []
            for answer in answers:
                tokens = (asked + llm.tokenize(answer.encode("utf-8"), add_bos=False, special=True))[:context]
                targets = np.asarray(tokens[len(asked):])
                logp = log_softmax(window_logits(llm, tokens)[len(asked) - 1:len(tokens) - 1])
                means.append(float(logp[np.arange(len(targets)), targets].mean()) if len(targets) else -math.inf)
            margins.append(means[0] - means[1])
    return {"pairs": len(pairs), "accuracy": sum(m > 0 for m in margins) / len(pairs),
            "mean_logp_margin": statistics.fmean(margins)}


def tokenize(subject: Subject, documents: list[list[tuple[str, bool]]], max_tokens: int) -> list[Window]:
    """Each document as the model's own tokenizer splits its pieces (special tokens such as
    <|im_start|> included; BOS first where the model asks for one), prompt and answer apart as the
    train stage splits them; up to `max_tokens` tokens in all."""
    with _vocabulary(subject.model) as vocab:
        return _tokenized(vocab, documents, max_tokens)


@contextlib.contextmanager
def _vocabulary(model: Path):
    """The GGUF's tokenizer alone (no weights loaded), freed on leaving."""
    import llama_cpp

    from .ground.llamacpp import captured_llama_log

    with captured_llama_log():
        vocab = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    with contextlib.closing(vocab):
        yield vocab


def _tokenized(llm, documents: list[list[tuple[str, bool]]], max_tokens: int) -> list[Window]:
    tokenized, total = [], 0
    for pieces in documents:
        tokens, is_answer = [], []
        for text, answer in pieces:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if tokens else \
                llamacpp.prompt_tokens(llm, text)
            tokens += ids
            is_answer += [answer] * len(ids)
        keep = min(len(tokens), max_tokens - total)
        tokenized.append(Window(tokens[:keep], is_answer[:keep]))
        total += keep
        if total >= max_tokens:
            break
    return tokenized


def window_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def quality(job: Job, documents: list[Window], context: int, threads: int) -> dict:
    # Both models stay loaded (llama.cpp maps the files) so each window's distributions are
    # compared as they come, never stored: a stored reference is tokens × vocabulary floats.
    mine = Tally()
    with contextlib.ExitStack() as loaded:
        model = loaded.enter_context(_llama(job.subject, context, threads, logits_all=True))
        reference = loaded.enter_context(_llama(job.reference, context, threads, logits_all=True)) \
            if job.reference else None
        for window in windows(documents, context):
            ref_logits = window_logits(reference, window.tokens) if reference else None
            mine.add(window_logits(model, window.tokens), window, ref_logits)
    result = {"documents": len(documents), "tokens": sum(len(d.tokens) for d in documents), "context": context,
              "scored": mine.scored, "perplexity": mine.perplexity}
    if mine.answers:
        result |= {"answer_tokens": mine.answers, "answer_perplexity": mine.answer_perplexity}
    if reference:
        result |= {"reference_perplexity": mine.reference_perplexity, "kl_divergence": mine.kl / mine.scored,
                   "top1_agreement": mine.top1 / mine.scored}
    return result


LARGE_GGUF = 1 << 30  # bytes; above this a generated token costs about a second on a laptop's CPU


def speed_settings(spec: EvalSpec, size_bytes: int) -> tuple[int, int, int]:
    """(prompt tokens, generated tokens, timed runs): the spec's, or by the variant's size, so that
    measuring the speed of a 7B model does not take longer than building it. Pure."""
    large = size_bytes > LARGE_GGUF
    return (spec.speed_prompt or (32 if large else 128), spec.speed_tokens or (8 if large else 32),
            spec.speed_runs or (1 if large else 3))


def speed(subject: Subject, spec: EvalSpec, threads: int) -> dict:
    """llama-bench's pp/tg idea: time a prompt of `speed_prompt` tokens, then `speed_tokens` tokens
    one at a time after it. Token ids are drawn at random (seed 0); speed does not depend on them."""
    n_prompt, n_gen, runs = speed_settings(spec, sum(os.path.getsize(f) for f in subject.files()))
    prompt_speeds, gen_speeds = [], []
    with _llama(subject, n_prompt + n_gen, threads, logits_all=False) as llm:
        rng = random.Random(0)
        ids = [rng.randrange(llm.n_vocab()) for _ in range(n_prompt + n_gen)]
        prompt, generated = ids[:n_prompt], ids[n_prompt:]
        for run in range(runs + 1):  # run 0 warms caches and is not counted
            llm.reset()
            started = time.perf_counter()
            llm.eval(prompt)
            prompted = time.perf_counter()
            for token in generated:
                llm.eval([token])
            if run:
                prompt_speeds.append(len(prompt) / (prompted - started))
                gen_speeds.append(len(generated) / (time.perf_counter() - prompted))
    return {"threads": threads, "prompt_tokens": len(prompt), "gen_tokens": len(generated), "runs": runs,
            "prompt_tokens_per_s": statistics.median(prompt_speeds), "gen_tokens_per_s": statistics.median(gen_speeds)}


def answer_accuracy(job: Job, spec: EvalSpec, threads: int) -> dict | None:
    """Greedy answers to every prompt, scored; the reference variant's answers, where there is one,
    from its eval JSON (its task runs first)."""
    prompts = accuracy.read_prompts(job.prompts)
    if not prompts:  # every held-out record is raw text or uses tools (accuracy.held_out_conversations)
        return None
    with _vocabulary(job.subject.model) as vocab:
        tokenized = [llamacpp.prompt_tokens(vocab, p.text) for p in prompts]
    with _llama(job.subject, max(map(len, tokenized)) + spec.max_new_tokens, threads, logits_all=False) as llm:
        answers, ended = accuracy.answer_all(llm, tokenized, spec.max_new_tokens)
    reference = None
    if job.reference_result:
        reference = (json.loads(job.reference_result.read_text(encoding="utf-8")).get("accuracy") or {})
    reference_answers = [a["answer"] for a in reference["answers"]] if reference else None
    result = accuracy.scores(answers, [p.answer for p in prompts], reference_answers)
    # The termination probe: a served model that never emits its end of turn talks until max_tokens.
    result["terminated"] = sum(ended) / len(ended)
    if reference:
        result["reference_exact_match"] = reference["exact_match"]
    return result | {"max_new_tokens": spec.max_new_tokens, "answers": accuracy.answer_rows(prompts, answers, ended)}


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def run(job: Job, spec: EvalSpec, out_path: Path, model_root: Path, threads: int = 0) -> None:
    threads = threads or available_cores()
    header = ggufheader.read(job.subject.model)
    size = sum(os.path.getsize(f) for f in job.subject.files())
    result = {
        "model": job.model,
        "variant": job.variant,
        # A matrix variant's base GGUF is its matrix's: ../<model>/gguf/…
        "files": [Path(os.path.relpath(f, model_root)).as_posix() for f in job.subject.files()],
        "reference": [Path(os.path.relpath(f, model_root)).as_posix() for f in job.reference.files()]
        if job.reference else None,
        "size_bytes": size,
        "parameters": header.elements,
        "bits_per_weight": bits_per_weight(header, os.path.getsize(job.subject.model)),
        "text": job.text_source if job.text else None,
        "quality": None,
        "speed": None,
        "versions": tool_versions("llama-cpp-python"),
    }
    if job.text:
        documents = tokenize(job.subject, read_documents(job.text), spec.max_tokens)
        if not windows(documents, spec.context):
            raise BuildError(f"{job.text}: fewer than two tokens of held-out text; give eval more text")
        result["quality"] = quality(job, documents, spec.context, threads)
        pairs = read_pairs(job.text)[:spec.max_prompts]
        if pairs:
            result["preference"] = preference_accuracy(job, pairs, spec.context, threads)
    scores = answer_accuracy(job, spec, threads) if job.prompts else None
    if scores:
        result["accuracy"] = scores
    result["speed"] = speed(job.subject, spec, threads)
    with atomic_file(out_path) as tmp:
        tmp.write_text(json.dumps(_rounded(result), indent=2) + "\n", encoding="utf-8")
    _print_summary(result)


def _print_summary(result: dict) -> None:
    parts = [f"{result['model']} {result['variant']}: {result['size_bytes'] / 1e6:.1f} MB, "
             f"{result['bits_per_weight']:.2f} bpw"]
    if quality := result["quality"]:
        parts.append(f"ppl {quality['perplexity']:.4f} ({quality['scored']} tokens)")
        if "kl_divergence" in quality:
            parts.append(f"KL {quality['kl_divergence']:.5f}, top-1 {quality['top1_agreement']:.1%}")
    if scores := result.get("accuracy"):
        parts.append(f"exact match {scores['exact_match']:.0%}, chrF {scores['chrf']:.1f} ({scores['prompts']} prompts)")
    if pairs := result.get("preference"):
        parts.append(f"prefers the chosen answer in {pairs['accuracy']:.0%} of {pairs['pairs']} held-out pairs")
    speed_ = result["speed"]
    parts.append(f"{speed_['prompt_tokens_per_s']:.0f} / {speed_['gen_tokens_per_s']:.1f} t/s "
                 f"(prompt / generation, {speed_['threads']} threads)")
    print(", ".join(parts))


def check_gate(result_path: Path, variant: str, gate: GateSpec) -> None:
    """Refuse to package a variant that misses its gate; the message says by how much."""
    failures = gate_failures(json.loads(result_path.read_text(encoding="utf-8")), gate)
    if failures:
        raise BuildError(f"{variant} fails its quality gate: {'; '.join(failures)}. It is not packaged. "
                         f"Loosen [models.eval.gate.{variant}] or drop {variant} from the release "
                         f"(measured in {result_path})")


# ---- the held-out conversations ----

def heldout_records(train: TrainSpec, base_dir: Path) -> list[dict]:
    """The validation records as the train stage writes them (chat template, system prompt); a raw-text
    record is all answer, as all of it is trained on; a preference pair's answer is the chosen one, with
    the rejected one beside it."""
    from transformers import AutoTokenizer

    from .train import rejected_answer, split_examples, written

    _, held_out = split_examples(train)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    records = []
    for example in held_out:
        record = dict(zip(("prompt", "answer"), written(example, tokenizer, train.template, train.system)))
        if example.is_preference:
            record["rejected"] = rejected_answer(example, tokenizer, train.template, train.system)
        records.append(record)
    return records


def write_heldout(train: TrainSpec, base_dir: Path, out_path: Path) -> None:
    records = heldout_records(train, base_dir)
    with atomic_file(out_path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"{out_path.name}: {len(records)} held-out conversations")


# ---- the tasks ----

def eval_text(build: ModelBuild) -> tuple[Path | None, str | None]:
    """(the held-out text eval reads, how reports name it): the spec's file, else the train stage's
    validation records (written to eval/heldout.jsonl), else none."""
    model = build.model
    if model.eval.text:
        return model.eval.text, build.input_name(model.eval.text)
    if model.train and model.train.validates:
        source = ", ".join(build.input_name(s.validation) if isinstance(s.validation, Path) else
                           f"{build.input_name(s.path)} (validation split)" for s in model.train.sources if s.validation)
        return build.paths.heldout, source
    return None, None


def answers_prompts(build: ModelBuild) -> bool:
    """Whether eval answers prompts: a prompts file, or held-out conversations (raw text has none)."""
    model = build.model
    asks = model.eval.answers_prompts(model.train)
    if not asks or isinstance(model.eval.prompts, Path):
        return asks
    return any(dataset.file_format(s.path, s.format) != "text" for s in model.train.sources if s.validation)


def task_name(build: ModelBuild, variant: str) -> str:
    # The base's eval is its matrix's where the variants share their data (ModelPaths.data).
    return f"{build.paths.data_name if variant == 'base' else build.model.name}-{variant}"


def tasks(build: ModelBuild) -> list[Task]:
    """eval:<model>-<variant> for every variant, and the held-out conversations they read. Results
    hold timings, so they are not artifacts."""
    model, paths = build.model, build.paths
    text, source = eval_text(build)
    text_deps = [text] if text else []
    found = []
    if text and not model.eval.text:
        found.append(Task(
            f"{paths.data_name}.heldout", "the held-out conversations, as the train stage writes them", write_heldout,
            {"train": model.train, "base_dir": paths.base, "out_path": text},
            model.train.split_params(),
            inputs=paths.base_files() + model.train.data_files, outputs=[text], artifact=False))

    prompts = paths.prompts if answers_prompts(build) else None
    if isinstance(model.eval.prompts, Path):
        accuracy.read_prompts_file(model.eval.prompts)  # a bad record fails `doit` before training, not after it
    if prompts:
        source_files = [model.eval.prompts] if isinstance(model.eval.prompts, Path) else model.train.data_files
        split = model.train.split_params() if model.train else {}
        found.append(Task(
            f"{paths.data_name}.prompts", "the prompts to answer, written with the chat template as the train stage does",
            accuracy.write_prompts, {"eval_spec": model.eval, "train": model.train, "base_dir": paths.base,
                                     "out_path": prompts},
            {"source": build.input_name(source_files[0]) if isinstance(model.eval.prompts, Path) else "validation split",
             "max_prompts": model.eval.max_prompts, **split},
            inputs=paths.base_files() + source_files, outputs=[prompts], artifact=False))

    outtype = model.outtype.upper()
    yardstick = Subject(paths.gguf(build.release, outtype))
    subjects = {outtype: (yardstick, None)}
    subjects |= {variant: (Subject(paths.gguf(build.release, variant)), yardstick) for variant in model.quant_variants}
    if build.lora_gguf:
        base = paths.base_gguf(outtype)
        subjects |= {"base": (Subject(base), None), "lora": (Subject(base, build.lora_gguf), yardstick)}
    eval_spec = model.eval.model_copy(update={"context": build.context(model.eval.context)})
    options = eval_spec.model_dump(mode="json", exclude={"text", "gate", "prompts", "max_prompts"})
    for variant, (subject, reference) in subjects.items():
        reference_result = paths.eval(outtype) if prompts and reference else None
        home = paths.eval(variant).parent.parent  # cache/<model>, or its matrix's for a shared base eval
        job = Job(home.name, variant, subject, reference, text, source or "", prompts, reference_result)
        compared = f", against {reference.model.name}" if reference else ""
        found.append(Task(
            task_name(build, variant), f"perplexity, KL, {'answers, ' if prompts else ''}speed with llama.cpp{compared}", run,
            {"job": job, "spec": eval_spec, "out_path": paths.eval(variant), "model_root": home,
             "threads": build.spec.threads},
            {"variant": variant, "text": source, "threads": build.spec.threads, **options},
            inputs=subject.files() + (reference.files() if reference else []) + text_deps
            + ([prompts] if prompts else []) + ([reference_result] if reference_result else []),
            outputs=[paths.eval(variant)], artifact=False))
    return found
