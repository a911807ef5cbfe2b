"""Answer accuracy: does the variant still give the right answers?

Each held-out prompt, written with the model's chat template as the train stage writes it, is
answered by greedy generation in llama.cpp (the most likely token each step, up to
`max_new_tokens`, stopping at the end of the turn), then scored against the expected answer:
- exact match after `normalize`;
- chrF and BLEU over all answers, from sacrebleu (the reference implementation, not a copy);
- the share of answers identical to the reference variant's (the converted F16's) answers.

Each answer and its scores go into the eval JSON, so a user can read what the model said.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import dataset
from .ground.atomic import atomic_file
from .ground.errors import BuildError
from .ground.spec import EvalSpec, TrainSpec


@dataclass(frozen=True)
class Prompt:
    text: str  # the conversation so far, as the chat template writes it, ending where the answer starts
    answer: str  # the expected answer, as the data gives it


# ---- scores, no I/O ----

def normalize(answer: str) -> str:
    """What exact match compares: Unicode NFKC, case folded, runs of whitespace as one space, no
    whitespace at either end. "Answer:  Paris." and "answer: paris." match; "Paris" and "Paris." do not."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", answer).casefold()).strip()


def scores(answers: list[str], expected: list[str], reference_answers: list[str] | None = None) -> dict:
    """Corpus scores of `answers` against `expected`, and per answer; pure."""
    import sacrebleu

    refs = [expected]
    result = {
        "prompts": len(answers),
        "exact_match": sum(normalize(a) == normalize(e) for a, e in zip(answers, expected)) / len(answers),
        "chrf": sacrebleu.corpus_chrf(answers, refs).score,
        "bleu": sacrebleu.corpus_bleu(answers, refs).score,
    }
    if reference_answers is not None:
        result["same_as_reference"] = sum(a == r for a, r in zip(answers, reference_answers)) / len(answers)
    return result


def answer_rows(prompts: list[Prompt], answers: list[str], ended: list[bool]) -> list[dict]:
    import sacrebleu

    return [{"prompt": p.text, "expected": p.answer, "answer": a, "exact": normalize(a) == normalize(p.answer),
             "chrf": sacrebleu.sentence_chrf(a, [p.answer]).score, "ended_turn": e}
            for p, a, e in zip(prompts, answers, ended)]


# ---- the prompts ----

def read_prompts_file(path: Path) -> list[tuple[tuple[dict, ...], str]]:
    """(conversation so far, expected answer) per record of a {"prompt" | "messages", "answer"} .jsonl."""
    found = []
    for where, record in dataset.records(path, dataset.read_lines(path, "prompts file")):
        if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
            raise BuildError(f"{where}: the record has no \"answer\" string: each prompt needs the answer it is "
                             "scored against")
        if isinstance(record.get("prompt"), str):
            turns = ({"role": "user", "content": record["prompt"]},)
        elif isinstance(record.get("messages"), list) and record["messages"] and all(
                isinstance(t, dict) and isinstance(t.get("content"), str) for t in record["messages"]):
            turns = tuple(record["messages"])
        else:
            raise BuildError(f"{where}: the record needs a \"prompt\" string or a \"messages\" list of "
                             "{\"role\", \"content\"} turns")
        found.append((turns, record["answer"]))
    if not found:
        raise BuildError(f"{path}: no prompts in the file: give one {{\"prompt\", \"answer\"}} record per line")
    return found


def conversations(eval_spec: EvalSpec, train: TrainSpec | None) -> list[tuple[tuple[dict, ...], str]]:
    if isinstance(eval_spec.prompts, Path):
        return read_prompts_file(eval_spec.prompts)
    return held_out_conversations(train)


def held_out_conversations(train: TrainSpec) -> list[tuple[tuple[dict, ...], str]]:
    """The validation split's conversations as (turns asked, the answer). Raw text asks nothing; a
    conversation with tools is answered in a tool protocol that greedy text generation through the
    template without its tools would not reproduce: both are left out."""
    from .train import split_examples

    _, held_out = split_examples(train)
    return [(e.messages[:-1], e.messages[-1]["content"]) for e in held_out if not e.is_text and not e.uses_tools]


def write_prompts(eval_spec: EvalSpec, train: TrainSpec | None, base_dir: Path, out_path: Path) -> None:
    """The prompts as the model is asked them: through the train stage's own formatting."""
    from transformers import AutoTokenizer

    from .train import prompt_and_answer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template, system = (train.template, train.system) if train else ("chat", None)
    records = []
    for turns, answer in conversations(eval_spec, train)[:eval_spec.max_prompts]:
        text, _ = prompt_and_answer((*turns, {"role": "assistant", "content": answer}), tokenizer, template, system)
        records.append({"prompt": text, "answer": answer})
    with atomic_file(out_path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"{out_path.name}: {len(records)} prompts to answer"
          + ("" if records else " (the held-out records are raw text or conversations with tools, which eval does "
                                "not answer)"))


def read_prompts(path: Path) -> list[Prompt]:
    return [Prompt(r["prompt"], r["answer"]) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


# ---- llama.cpp ----

def generate(llm, prompt: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """Greedy: the most likely next token each step, until an end-of-generation token (end of turn,
    EOS: the model's own list) or `max_new_tokens`; the tokens, and whether the model ended its turn."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        # the last position's logits, read from llama.cpp: llama-cpp-python keeps none without logits_all
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            return generated, True
        generated.append(token)
        llm.eval([token])
    return generated, False


def answer_all(llm, tokenized: list[list[int]], max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """The answers, and for each whether it ended with the end of a turn before `max_new_tokens`."""
    answers, ended = [], []
    for tokens in tokenized:
        generated, stopped = generate(llm, tokens, max_new_tokens)
        answers.append(llm.detokenize(generated).decode("utf-8", errors="replace"))
        ended.append(stopped)
    return answers, ended
