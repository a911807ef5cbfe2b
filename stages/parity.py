"""parity: what was trained is what runs, checked token for token before a release is packaged.

For each release (every quantized variant, and base + GGUF LoRA for the adapter route) a fixed set of
conversations (a single turn, one with a system prompt, a multi-turn one, and held-out records of
the dataset, with the spec's system prompt as training inserts it) is turned into the tokens of the
prompt a model answers from, three ways:
- as the train stage formats it (`train.prompt_and_answer`, tokenized without added specials: the
  template writes BOS where the model wants one);
- by llama-server, the engine Docker Model Runner runs: the release's own chat template through
  llama.cpp's Jinja engine (/apply-template), tokenized as a chat completion is (/tokenize, BOS added
  where the GGUF says so);
- by Ollama: the Modelfile's TEMPLATE through Go's text/template, with the Modelfile's SYSTEM where a
  conversation has none, tokenized with the GGUF's vocabulary as above (Ollama's llama.cpp runner
  adds specials the same way). Without a Go toolchain this engine is reported as not checked.
Every id must match; the first difference fails the build naming the release, the conversation, the
position and both sides as text. And the token the training answers end with (the end of a turn)
must be one llama.cpp ends generation at, so a served model stops where the trained one does.

Where the eval answers prompts, the same server then answers them as a client asks (greedy chat
completions) and the answers are compared with the eval's in-process ones: the count and every
difference, verbatim, go into the result and the report.

The result (parity/<variant>.json) is a report, not an artifact: whether Go was there to check
Ollama's engine depends on the machine, not on the inputs.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import accuracy, evaluate, package
from .formats import chat, ggufheader, modelfile
from .ground import llamacpp, ollama
from .ground.atomic import atomic_file
from .ground.errors import BuildError
from .ground.spec import EvalSpec, TrainSpec
from .ground.task import ModelBuild, Task
from .package import Release

REVISION = 3
TOOLS = ("transformers", "tokenizers", "llama-cpp-python")
MAX_HELD_OUT = 8  # held-out records rendered per release, besides the fixed conversations

# Conversations every release is checked on, whatever its data: the shapes a runtime gets.
FIXED = (
    ("one turn", ({"role": "user", "content": "What is the capital of France?"},)),
    ("with a system prompt", ({"role": "system", "content": "You answer in one short sentence."},
                              {"role": "user", "content": "Name a primary colour."})),
    ("two turns", ({"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me one fact about the Moon."})),
)


@dataclass(frozen=True)
class Conversation:
    name: str
    messages: tuple[dict, ...]  # ending with a user turn: what a client sends to be answered


# ---- pure ----

def conversations(held_out: list[tuple[tuple[dict, ...], str]], system: str | None) -> list[Conversation]:
    """The fixed conversations, held-out ones and a two-record chain of them; with the train stage's
    system prompt inserted as training inserts it (a runtime gets it from the client or the Modelfile)."""
    found = [Conversation(name, messages) for name, messages in FIXED]
    found += [Conversation(f"held-out record {i + 1}", turns) for i, (turns, _) in enumerate(held_out[:MAX_HELD_OUT])]
    if len(held_out) >= 2:
        (first, answer), (second, _) = held_out[:2]
        found.append(Conversation("held-out records 1 and 2 as two turns",
                                  (*first, {"role": "assistant", "content": answer}, *second)))
    return [Conversation(c.name, chat.with_system(c.messages, system)) for c in found]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (a missing token counts); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def end_of_turn(answer_ids: list[int], special_ids: set[int], stop_ids: set[int]) -> int | None:
    """Where a served model ends a trained answer: the first of the answer's special tokens that llama.cpp
    stops generating at (Phi-3 answers end <|end|>, a newline, <|endoftext|>: generation ends at <|end|>).
    When none is, the answer's last special token (the turn end the GGUF does not mark), or None."""
    specials = [token for token in answer_ids if token in special_ids]
    return next((token for token in specials if token in stop_ids), specials[-1] if specials else None)


def served_differences(questions: list[tuple[dict, ...]], in_process: list[str], served: list[str]) -> list[dict]:
    """The answers llama-server gave otherwise than the eval's in-process greedy generation did (whitespace
    at either end aside: the API strips it), verbatim."""
    return [{"question": turns[-1]["content"], "in_process": mine, "served": theirs}
            for turns, mine, theirs in zip(questions, in_process, served) if mine.strip() != theirs.strip()]


def _shown(decode, ids: list[int], at: int) -> str:
    before, after = decode(ids[max(0, at - 12):at]), decode(ids[at:at + 6])
    token = f"token {ids[at]} {decode(ids[at:at + 1])!r}" if at < len(ids) else "the end"
    return f"…{before!r} then {token}, then {after!r}"


def mismatch(variant: str, conversation: Conversation, engine: str, trained: list[int], served: list[int],
             decode) -> str:
    at = first_difference(trained, served)
    return (f"release {variant}: the conversation {conversation.name!r} becomes different tokens in {engine} than "
            f"in training, from token {at} on.\n  trained: {_shown(decode, trained, at)}\n  served:  "
            f"{_shown(decode, served, at)}\nA runtime would prompt the model in a format it was not trained on. "
            "Ship the template the train stage used ([models.train] template) or train on the one you serve")


# ---- I/O ----

def trained_tokens(tokenizer, train: TrainSpec | None, messages: tuple[dict, ...]) -> tuple[list[int], list[int]]:
    """(the prompt's ids, a placeholder answer's ids) as the train stage writes and tokenizes them."""
    from .train import prompt_and_answer

    template, system = (train.template, train.system) if train else ("chat", None)
    prompt, answer = prompt_and_answer((*messages, {"role": "assistant", "content": "OK."}), tokenizer, template, system)
    return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(answer, add_special_tokens=False)["input_ids"])


def run(*, release: Release, train: TrainSpec | None, base_dir: Path, modelfile_system: str | None,
        out_path: Path, threads: int = 0, eval_spec: EvalSpec | None = None, eval_result: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="modelmake-parity-") as work:
        shipped = None
        if release.chat_template:  # the adapter route ships its template beside the GGUFs, as DMR reads it
            shipped = Path(work) / "chat_template.jinja"
            shipped.write_text(release.chat_template, encoding="utf-8")
        return _check(release, train, base_dir, modelfile_system, out_path, threads, shipped, eval_spec, eval_result)


def _check(release: Release, train: TrainSpec | None, base_dir: Path, modelfile_system: str | None, out_path: Path,
           threads: int, shipped: Path | None, eval_spec: EvalSpec | None, eval_result: Path | None) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    chat_template = release.chat_template or ggufheader.scalars(release.gguf).get("tokenizer.chat_template")
    if not chat_template and not (train and train.template != "chat"):
        # Nothing was trained on a chat format and the release names none (a base model, converted and
        # quantized): there is no training format to hold the runtimes to. (Training on template = "chat"
        # with no template is refused when the spec loads.)
        result = {"variant": release.variant, "conversations": 0, "skipped": [], "rows": [], "end_of_turn": None,
                  "llama_server": "not checked: no chat template", "ollama": "not checked: no chat template",
                  "stop": sorted(llamacpp.end_of_generation(release.gguf).values())}
        with atomic_file(out_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"parity {release.variant}: not checked, the release has no chat template and was not trained on one")
        return {"conversations": 0}
    family = modelfile.chat_family(chat_template)
    system = modelfile.served_system(modelfile_system, train.system if train else None, chat_template)
    renderer = ollama.renderer_path() if family else None
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731

    stops = llamacpp.end_of_generation(release.gguf)
    special = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    checked = []
    # Flash attention off: the attention kernel of the in-process eval, so a served answer that differs
    # means a different prompt, tokens or sampling, not rounding (with llama-server's default, auto, the
    # default spec's Q4_K_M greedy answers differ from the eval's in 3 of 27 for that reason alone).
    with llamacpp.serving(release.gguf, lora=release.lora, chat_template=shipped, threads=threads,
                          flash_attention=False) as server:
        for conversation in conversations(accuracy.held_out_conversations(train) if train else [], train.system if train else None):
            try:
                trained, answer = trained_tokens(tokenizer, train, conversation.messages)
            except Exception as err:  # noqa: BLE001 - training could not have had this conversation either:
                # a template's own raise_exception, or one that drops what it cannot place (Mistral v0.3
                # writes the system text only into the last user turn, so not once the answer follows)
                checked.append({"conversation": conversation.name, "skipped": f"the chat template refuses it: {err}"})
                continue
            turn_end = end_of_turn(answer, special, set(stops))
            if turn_end is None or turn_end not in stops:
                ending = "no special token" if turn_end is None else f"{decode([turn_end])!r} (id {turn_end})"
                raise BuildError(
                    f"release {release.variant}: training answers end with {ending}, which is not among the tokens "
                    f"llama.cpp stops generating at ({', '.join(repr(t) for t in stops.values())}): a served model "
                    "would run on past the end of its turn. Use a base whose GGUF marks its end-of-turn token "
                    "(tokenizer.ggml.eos_token_id or eot_token_id)")
            row = {"conversation": conversation.name, "tokens": len(trained)}
            by_server = server.tokenize(server.chat_prompt(list(conversation.messages)))
            if by_server != trained:
                raise BuildError(mismatch(release.variant, conversation, "llama-server (llama.cpp's Jinja engine on "
                                          "the release's chat template)", trained, by_server, decode))
            if renderer:
                # Ollama gives a conversation without a system turn the Modelfile's SYSTEM (maybe the spec's
                # own prompt): the format is checked on those messages, as training would write them.
                sent = tuple(ollama.messages_as_ollama_sends(list(conversation.messages), system))
                expected = trained if sent == conversation.messages else trained_tokens(tokenizer, train, sent)[0]
                by_ollama = server.tokenize(ollama.render(renderer, family.template, list(sent)))
                if by_ollama != expected:
                    raise BuildError(mismatch(release.variant, conversation, "Ollama (the Modelfile TEMPLATE "
                                              "through Go's text/template)", expected, by_ollama, decode))
            checked.append(row)
        served = _served_answers(server, train, eval_spec, eval_result) if eval_result else None
    compared = [row for row in checked if "tokens" in row]
    result = {
        "variant": release.variant,
        "conversations": len(compared),
        "skipped": [row for row in checked if "skipped" in row],
        "llama_server": f"identical {len(compared)}/{len(compared)}",
        "ollama": (f"identical {len(compared)}/{len(compared)}" if renderer else
                   "not checked: the chat template is of no family modelmake writes an Ollama TEMPLATE for"
                   if not family else "not checked: Go is not installed"),
        "end_of_turn": decode([turn_end]) if compared else None,
        "stop": sorted(stops.values()),
        "rows": checked,
    }
    if served is not None:
        result["served_answers"] = served
    with atomic_file(out_path) as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"parity {release.variant}: {len(compared)} conversations, identical tokens in training, llama-server "
          f"and {'Ollama' if renderer else 'not Ollama (' + result['ollama'] + ')'}; end of turn "
          f"{result['end_of_turn']!r} stops llama.cpp")
    if served is not None:
        print(f"served answers {release.variant}: {served['identical']}/{served['answers']} identical to the eval's")
    return {"conversations": len(compared)}


def _served_answers(server: llamacpp.Server, train: TrainSpec | None, eval_spec: EvalSpec, eval_result: Path) -> dict:
    """The eval's prompts asked through llama-server's /v1/chat/completions as a client asks them
    (greedy, the same token limit), against the answers the eval generated in process."""
    evaluated = json.loads(eval_result.read_text(encoding="utf-8")).get("accuracy") or {}
    in_process = [row["answer"] for row in evaluated.get("answers", [])]
    system = train.system if train else None
    questions = [chat.with_system(turns, system) for turns, _ in accuracy.conversations(eval_spec, train)[:len(in_process)]]
    served = [server.chat(list(turns), evaluated["max_new_tokens"]) for turns in questions]
    differences = served_differences(questions, in_process, served)
    return {"identical": len(in_process) - len(differences), "answers": len(in_process), "differences": differences}


def task_name(build: ModelBuild, variant: str) -> str:
    return f"{build.model.name}-{variant}"


def tasks(build: ModelBuild) -> list[Task]:
    """parity:<model>-<variant> for every release; its package waits for it."""
    model, paths = build.model, build.paths
    found = []
    answers = evaluate.answers_prompts(build)
    for release in package.releases(build):
        out = paths.root / "parity" / f"{release.variant}.json"
        eval_result = paths.eval(release.variant) if answers else None
        found.append(Task(
            task_name(build, release.variant), "training format = served format: tokens through llama-server and Ollama",
            run, {"release": release, "train": model.train, "base_dir": paths.base,
                  "modelfile_system": model.package.system, "out_path": out, "threads": build.spec.threads,
                  "eval_spec": model.eval, "eval_result": eval_result},
            {"variant": release.variant, "system": model.package.system, "chat_template": release.chat_template,
             **(model.train.split_params() if model.train else {})},
            inputs=[p for p in (release.gguf, release.lora, eval_result) if p] + paths.base_files()
            + (model.train.data_files if model.train else []),
            outputs=[out], artifact=False, versions=llamacpp.fingerprint_versions(),
            after=[f"eval:{evaluate.task_name(build, release.variant)}"] if answers else []))
    return found
