"""parity: the training format is the served format, checked with the runtimes' own engines: the
real llama-server (llama.cpp's Jinja engine) and Go's text/template with the Modelfile TEMPLATE, on a
tiny model carrying SmolLM2's real tokenizer and chat template."""

import contextlib
import json
from pathlib import Path

import llama_cpp
import pytest
from helpers import scratch_folder

from stages import convert, parity, report
from stages.formats import chat, ggufheader, modelfile
from stages.ground import llamacpp
from stages.ground.errors import BuildError
from stages.ground.spec import TrainSpec
from stages.package import Release

GOLDEN = Path(__file__).parent / "golden/modelfile"

RECORDS = [
    {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (2, 2), (4, 4), (6, 1), (8, 3), (9, 9)]
]


@pytest.fixture(scope="module")
def tiny_release(request, tiny_llama):
    folder = scratch_folder(request, "parity")
    gguf_path = folder / "tiny.F16.gguf"
    convert.run(tiny_llama, gguf_path, "f16", "tiny")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return {"model_dir": tiny_llama, "gguf": gguf_path, "data": data, "folder": folder}


def release(tiny_release, chat_template: str | None = None) -> Release:
    return Release("tiny", "F16", tiny_release["gguf"], None, "tiny:F16", None, chat_template)


def check(tiny_release, tmp_path, train: TrainSpec | None, chat_template: str | None = None) -> dict:
    out = tmp_path / "parity.json"
    parity.run(release=release(tiny_release, chat_template), train=train, base_dir=tiny_release["model_dir"],
               modelfile_system=None, out_path=out, threads=1)
    return json.loads(out.read_text())


def test_first_difference_and_end_of_turn_are_what_they_say():
    assert parity.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert parity.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert parity.first_difference([1, 2], [1, 2, 3]) == 2  # a token missing at the end counts
    assert parity.end_of_turn([10, 11, 2, 198], {1, 2}, {2}) == 2  # ChatML: <|im_end|> then a newline
    assert parity.end_of_turn([10, 5, 198, 0], {0, 5}, {0, 5}) == 5  # Phi-3: <|end|>, a newline, <|endoftext|>
    assert parity.end_of_turn([10, 7, 198], {0, 7}, {0}) == 7  # no stop token: the last special, to name it
    assert parity.end_of_turn([10, 11], {1, 2}, {2}) is None


def test_served_differences_are_kept_verbatim_whitespace_at_the_ends_aside():
    questions = [({"role": "user", "content": "a?"},), ({"role": "user", "content": "b?"},)]
    assert parity.served_differences(questions, ["Answer: A.", "B"], ["Answer: A.\n", "B"]) == []
    assert parity.served_differences(questions, ["Answer: A.", "B"], ["Answer: A.", "C, then more"]) == [
        {"question": "b?", "in_process": "B", "served": "C, then more"}]


def test_conversations_cover_system_multi_turn_and_held_out_and_insert_the_trained_system():
    held_out = [(({"role": "user", "content": "a?"},), "A"), (({"role": "user", "content": "b?"},), "B")]
    found = parity.conversations(held_out, None)
    names = [c.name for c in found]
    assert names[:3] == ["one turn", "with a system prompt", "two turns"]
    assert "held-out record 2" in names and found[-1].messages[1] == {"role": "assistant", "content": "A"}
    assert all(c.messages[-1]["role"] == "user" for c in found)
    with_system = parity.conversations(held_out, "Be brief.")
    assert all(c.messages[0]["role"] == "system" for c in with_system)
    assert with_system[1].messages[0]["content"] == "You answer in one short sentence."  # its own is kept


def test_a_chatml_release_renders_the_same_tokens_in_training_llama_server_and_ollama(tiny_release, tmp_path):
    train = TrainSpec(dataset=tiny_release["data"], validation=0.3)
    result = check(tiny_release, tmp_path, train)
    assert result["conversations"] == 3 + 3 + 1  # fixed, held-out, two held-out records as two turns
    assert result["llama_server"] == result["ollama"] == f"identical {result['conversations']}/{result['conversations']}"
    assert result["end_of_turn"] == "<|im_end|>" and "<|im_end|>" in result["stop"]
    assert not result["skipped"]


def test_a_template_edited_after_training_fails_naming_release_conversation_and_token(tiny_release, tmp_path):
    """The release ships a chat template other than the one training used (simulated: ChatML with the
    assistant's role renamed): llama-server renders it, the gate names where the tokens part."""
    from transformers import AutoTokenizer

    trained = AutoTokenizer.from_pretrained(tiny_release["model_dir"]).chat_template
    edited = trained.replace("<|im_start|>assistant\n", "<|im_start|>bot\n")
    assert edited != trained
    with pytest.raises(BuildError) as failed:
        check(tiny_release, tmp_path, TrainSpec(dataset=tiny_release["data"]), chat_template=edited)
    message = str(failed.value)
    assert "release F16" in message and "'one turn'" in message and "llama-server" in message
    assert "from token" in message and "trained:" in message and "served:" in message and "bot" in message
    assert not (tmp_path / "parity.json").exists()


def test_an_alpaca_trained_release_carries_alpaca_through_llama_server_and_ollama(tiny_release, tmp_path):
    """template = "alpaca": the release's template is modelmake's Alpaca Jinja, which llama.cpp's engine
    renders as training wrote it, and the Modelfile's Go translation too."""
    assert modelfile.chat_family(chat.ALPACA_JINJA) is modelfile.ALPACA
    train = TrainSpec(dataset=tiny_release["data"], template="alpaca")
    result = check(tiny_release, tmp_path, train, chat_template=chat.ALPACA_JINJA)
    assert result["llama_server"].startswith("identical") and result["ollama"].startswith("identical")
    assert result["end_of_turn"] == "<|im_end|>"  # SmolLM2's EOS, which the Alpaca answers end with


def test_the_end_of_turn_must_be_a_token_llama_cpp_stops_at(tiny_release, tmp_path, monkeypatch):
    """A GGUF whose end-of-generation set lacks the trained end of turn (simulated: llama.cpp's list
    for this GGUF with <|im_end|> taken out) fails before anything is compared."""
    from stages.ground import llamacpp

    real = llamacpp.end_of_generation
    monkeypatch.setattr(llamacpp, "end_of_generation",
                        lambda path: {i: t for i, t in real(path).items() if t != "<|im_end|>"})
    with pytest.raises(BuildError, match=r"training answers end with '<\|im_end\|>' \(id 2\), which is not among"):
        check(tiny_release, tmp_path, TrainSpec(dataset=tiny_release["data"]))


def test_a_release_with_no_chat_template_and_no_chat_training_is_not_checked_and_says_so(tiny_release, tmp_path):
    """A base model converted and quantized as is (no chat template, nothing trained on one): there is no
    training format to hold the runtimes to; the result says so instead of failing the build."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_release["model_dir"], plain)
    (plain / "chat_template.jinja").unlink()
    convert.run(plain, tmp_path / "plain.gguf", "f16", "plain")
    out = tmp_path / "parity.json"
    parity.run(release=Release("plain", "F16", tmp_path / "plain.gguf", None, "plain:F16"), train=None,
               base_dir=plain, modelfile_system=None, out_path=out, threads=1)
    result = json.loads(out.read_text())
    assert result["conversations"] == 0 and result["llama_server"] == "not checked: no chat template"


# The families modelmake converts, each with its own special tokens and a real model's chat template
# (tests/golden/modelfile: Meta-Llama-3-Instruct, Gemma 3, Mistral Instruct v0.3, Phi-3-mini-4k-instruct).
# A tiny model of the family's architecture gets SmolLM2's tokenizer with the family's tokens put in
# place of SmolLM2's first specials (same ids: the vocabulary keeps its size), its BOS and EOS, and
# whether its tokenizer adds BOS, as the real one's tokenizer_config says.
FAMILIES = {
    "llama3": ("llama", {0: "<|end_of_text|>", 1: "<|begin_of_text|>", 2: "<|eot_id|>", 3: "<|start_header_id|>",
                         4: "<|end_header_id|>"}, "<|begin_of_text|>", "<|eot_id|>", True),
    "gemma": ("gemma3", {0: "<pad>", 1: "<bos>", 2: "<eos>", 3: "<start_of_turn>", 4: "<end_of_turn>"},
              "<bos>", "<eos>", True),
    "mistral": ("mistral", {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]"}, "<s>", "</s>", True),
    "phi3": ("phi3", {0: "<unk>", 1: "<s>", 2: "<|endoftext|>", 3: "<|user|>", 4: "<|assistant|>", 5: "<|end|>",
                      6: "<|system|>"}, "<s>", "<|endoftext|>", False),
}
END_OF_TURN = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>", "phi3": "<|end|>"}


def family_tokenizer(smollm_dir: Path, folder: Path, family: str) -> Path:
    _, renamed, bos, eos, add_bos = FAMILIES[family]
    folder.mkdir()
    tokenizer = json.loads((smollm_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for added in tokenizer["added_tokens"]:
        if added["id"] in renamed:
            del vocab[added["content"]]
            added["content"] = renamed[added["id"]]
    for token_id, text in renamed.items():
        assert text not in vocab, text
        vocab[text] = token_id
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config.update(bos_token=bos, eos_token=eos, pad_token=eos, unk_token=renamed[0], add_bos_token=add_bos)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    (folder / "chat_template.jinja").write_text((GOLDEN / f"{family}.jinja").read_text())
    return folder


def family_release(smollm_dir: Path, tmp_path: Path, family: str) -> tuple[Path, Path, Path]:
    """(the tiny model's folder, its F16 GGUF, a dataset) for one family."""
    from helpers import make_tiny_model

    arch = FAMILIES[family][0]
    model_dir = make_tiny_model(tmp_path / "model", arch, family_tokenizer(smollm_dir, tmp_path / "tok", family))
    gguf_path = tmp_path / "tiny.F16.gguf"
    convert.run(model_dir, gguf_path, "f16", "tiny")
    assert ggufheader.scalars(gguf_path)["tokenizer.ggml.add_bos_token"] is FAMILIES[family][4]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return model_dir, gguf_path, data


def first_prompt_ids(model_dir: Path, train: TrainSpec) -> list[int]:
    from transformers import AutoTokenizer

    return parity.trained_tokens(AutoTokenizer.from_pretrained(model_dir), train, parity.FIXED[0][1])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_renders_the_same_tokens_in_training_llama_server_and_ollama(family, smollm_tokenizer,
                                                                                   tmp_path):
    """ChatML is the test above; here Llama 3, Gemma, Mistral and Phi-3, each with its BOS rule: the
    template writes BOS as text, the GGUF says llama.cpp adds one, and exactly one comes out each way."""
    model_dir, gguf_path, data = family_release(smollm_tokenizer, tmp_path, family)
    train = TrainSpec(dataset=data, validation=0.3)
    out = tmp_path / "parity/F16.json"
    parity.run(release=Release("tiny", "F16", gguf_path, None, "tiny:F16"), train=train, base_dir=model_dir,
               modelfile_system=None, out_path=out, threads=1)
    result = json.loads(out.read_text())
    skipped = {row["conversation"]: row["skipped"] for row in result["skipped"]}
    if family == "mistral":  # v0.3 writes the system text into the last user turn only: gone once answered
        assert list(skipped) == ["with a system prompt"] and "prefix of the whole conversation" in skipped[
            "with a system prompt"]
        parities = report.read_parities(tmp_path, ["F16"])
        assert report.parity_rows(parities, {})[0][1] == "6, 1 skipped"  # the report says so, and why
        assert report.parity_skipped(parities)[1].rows[0][:2] == ["F16", "with a system prompt"]
    else:
        assert not skipped and report.parity_skipped(report.read_parities(tmp_path, ["F16"])) == []
    compared = 7 - len(skipped)
    assert result["conversations"] == compared
    assert result["llama_server"] == result["ollama"] == f"identical {compared}/{compared}"
    assert result["end_of_turn"] == END_OF_TURN[family] and END_OF_TURN[family] in result["stop"]
    # Identical ids on every side, and the one BOS the family wants (written by the template as text):
    # llama.cpp adds none again where the GGUF asks it to add one.
    ids = first_prompt_ids(model_dir, train)
    assert ids.count(1) == (1 if FAMILIES[family][4] else 0) and ids[0] == (1 if FAMILIES[family][4] else 3)
    tokens = {row["conversation"]: row.get("tokens") for row in result["rows"]}
    assert tokens["two turns"] > tokens["one turn"]
    # The eval tokenizes its prompts the same way (llamacpp.prompt_tokens): one BOS, where the GGUF wants it.
    bos_text = FAMILIES[family][2]
    with contextlib.closing(llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)) as vocab:
        for text in (bos_text + "Hi", "Hi"):
            ids = llamacpp.prompt_tokens(vocab, text)
            assert ids.count(1) == (1 if FAMILIES[family][4] or text.startswith(bos_text) else 0), (text, ids)


def test_alpaca_on_a_base_that_adds_bos_trains_and_serves_with_one_bos(smollm_tokenizer, tmp_path):
    """template = "alpaca" writes no BOS, yet llama.cpp and Ollama add one where the GGUF asks (Gemma):
    the train stage starts its Alpaca prompts with it too, so all three sides agree."""
    model_dir, gguf_path, data = family_release(smollm_tokenizer, tmp_path, "gemma")
    train = TrainSpec(dataset=data, validation=0.3, template="alpaca")
    out = tmp_path / "parity.json"
    parity.run(release=Release("tiny", "F16", gguf_path, None, "tiny:F16", None, chat.ALPACA_JINJA), train=train,
               base_dir=model_dir, modelfile_system=None, out_path=out, threads=1)
    result = json.loads(out.read_text())
    assert result["llama_server"] == result["ollama"] == "identical 7/7"
    assert result["end_of_turn"] == "<eos>"
    ids = first_prompt_ids(model_dir, train)
    assert ids[0] == 1 and ids.count(1) == 1


@pytest.mark.slow
def test_a_base_gguf_without_a_chat_template_ships_alpaca_on_every_route(smollm_tokenizer, tmp_path):
    """A GGUF from outside with no chat template, whose tokenizer adds BOS (a Llama 3 base, in tiny):
    template = "alpaca" trains, and doit releases the Alpaca format everywhere (the merged and quantized
    GGUF's tokenizer.chat_template, the adapter package's template layer, both Modelfiles' TEMPLATE); the
    parity gate passes on every release, the training prompts starting with the BOS llama.cpp adds."""
    from gguf import GGUFReader
    from helpers import doit, make_tiny_model, write_spec

    tokenizer_dir = family_tokenizer(smollm_tokenizer, tmp_path / "tok", "llama3")
    (tokenizer_dir / "chat_template.jinja").unlink()
    convert.run(make_tiny_model(tmp_path / "model", "llama", tokenizer_dir), tmp_path / "bare.gguf", "f16", "bare")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    spec = write_spec(tmp_path, '[[models]]\nname = "m"\nbase = "bare.gguf"\nquantize = ["Q8_0"]\n'
                                '[models.train]\ndataset = "data.jsonl"\ntemplate = "alpaca"\nvalidation = 0.3\n'
                                'max_steps = 2\nbatch_size = 4\n')
    doit(spec)
    cache = tmp_path / "cache/m"
    for variant in ("Q8_0", "lora"):
        result = json.loads((cache / f"parity/{variant}.json").read_text())
        assert result["llama_server"] == result["ollama"] == "identical 7/7", (variant, result)
        assert result["end_of_turn"] == "<|eot_id|>"  # the base's EOS, which the Alpaca answers end with
        modelfile_text = (cache / f"package/{variant}/Modelfile").read_text()
        assert f"TEMPLATE {modelfile.quoted(modelfile.ALPACA.template, 'the chat template')}" in modelfile_text
    released = GGUFReader(next((cache / "gguf").glob("m-merged.Q8_0.gguf")))
    assert released.fields["tokenizer.chat_template"].contents() == chat.ALPACA_JINJA
    assert (cache / "package/lora/chat_template.jinja").read_text() == chat.ALPACA_JINJA
    assert first_prompt_ids(cache / "base", TrainSpec(dataset=tmp_path / "data.jsonl", template="alpaca"))[0] == 1
