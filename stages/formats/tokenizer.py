"""Tokenizer metadata for GGUF: tokens, token types, merges, special ids, chat template.

Written as llama.cpp's own converter writes it, so a GGUF made here tokenizes the same
in llama.cpp as in transformers. Two kinds: byte-level BPE ("gpt2": Llama 3, Qwen, SmolLM),
whose pre-tokenizer llama.cpp names by a probe hash, and SentencePiece ("llama": Llama 2,
Mistral, Gemma, Phi-3), whose pieces and scores come from tokenizer.model. Merges, special
ids, add_bos/add_eos and the chat template come from gguf-py's `SpecialVocab`.
"""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path

import gguf

from ..ground.errors import BuildError

# llama.cpp identifies a BPE pre-tokenizer by how it splits this text: sha256 of the
# token ids' repr, looked up in the table below (both from convert_hf_to_gguf.py).
PRETOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

PRETOKENIZERS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 … Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}


def restore_pretokenizer(tokenizer, gguf_pre: str | None) -> None:
    """transformers rebuilds a GGUF's BPE tokenizer with a plain byte-level pre-tokenizer. Where the
    GGUF names one that splits differently, put back the one its model was trained with, so the
    train stage sees the tokens llama.cpp will feed the model (SmolLM2: "\\n\\n4" is two tokens, not three)."""
    from tokenizers import pre_tokenizers

    if gguf_pre == "smollm":  # digits one by one, then GPT-2's split: SmolLM's own tokenizer.json
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def pretokenizer_name(tokenizer, where: str) -> str:
    digest = sha256(str(tokenizer.encode(PRETOKENIZER_PROBE)).encode()).hexdigest()
    if digest not in PRETOKENIZERS:
        known = ", ".join(sorted(set(PRETOKENIZERS.values())))
        raise BuildError(
            f"{where}: the BPE pre-tokenizer is not one modelmake recognizes (probe hash {digest}); "
            f"known: {known}. Writing a guess would make llama.cpp tokenize differently from transformers; "
            "if you know which llama.cpp pre-tokenizer it uses, set pretokenizer = \"NAME\" in the model's table."
        )
    return PRETOKENIZERS[digest]


def _looks_special(text: str) -> bool:
    # Some models leave control tokens unmarked; llama.cpp's converter treats these as control too.
    return (
        text in ("<pad>", "<mask>")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def bpe_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their GGUF token types, padded to the model's embedding rows."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        if i in added:
            if not added[i].normalized:
                # llama.cpp expects added tokens in their normalized form
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if added[i].special or _looks_special(text) else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def sentencepiece_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and GGUF token types from tokenizer.model, as llama.cpp's converter reads them
    (Llama 2, Mistral, Gemma, Phi-3): llama.cpp's SentencePiece tokenizer merges by these scores, so
    they must be SentencePiece's own. Added tokens from tokenizer_config.json override their ids."""
    import json

    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(path))
    except (OSError, RuntimeError) as err:
        raise BuildError(f"{path}: not a SentencePiece model ({err}); restore it from the model's source") from None
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(processor.vocab_size(), vocab_size)):
        tokens[i], scores[i] = processor.IdToPiece(i), processor.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if processor.IsUnknown(i) else gguf.TokenType.CONTROL if processor.IsControl(i)
                    else gguf.TokenType.UNUSED if processor.IsUnused(i) else gguf.TokenType.BYTE if processor.IsByte(i)
                    else gguf.TokenType.NORMAL)
    config_path = model_dir / "tokenizer_config.json"
    added = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) \
        if config_path.is_file() else {}
    for key, token in added.items():
        i, text = int(key), token["content"]
        if i >= vocab_size:
            continue
        if token.get("special") or _looks_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")  # llama.cpp matches user-defined tokens on the raw text
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i], scores[i] = text, -1000.0
    return tokens, scores, types


def tokenizer_kind(tokenizer, model_dir: Path) -> str:
    """"gpt2" (byte-level BPE) or "llama" (SentencePiece, read from tokenizer.model); anything else is
    refused, saying why, since a guess would tokenize differently in llama.cpp."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BuildError(f"{model_dir}: no tokenizer.json; modelmake needs a fast (tokenizers) tokenizer "
                         "saved beside the weights (tokenizer.save_pretrained)")
    model = backend.model
    byte_fallback = getattr(model, "byte_fallback", False)
    if type(model).__name__ == "BPE" and not byte_fallback:
        return "gpt2"
    if (model_dir / "tokenizer.model").is_file():
        return "llama"
    kind = type(model).__name__ + (" with byte fallback (SentencePiece-style)" if byte_fallback else "")
    raise BuildError(f"{model_dir}/tokenizer.json: a {kind} tokenizer needs the SentencePiece model it came from: "
                     "copy tokenizer.model from the model's source beside it. modelmake writes byte-level BPE "
                     "(Llama 3, Qwen2, SmolLM, DeepSeek-Coder) and SentencePiece (Llama 2, Mistral, Gemma, Phi-3) "
                     "tokenizers.")


def add_to_gguf(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pretokenizer: str | None = None,
                add_space_prefix: bool | None = None, chat_template: str | None = None) -> None:
    """`pretokenizer` overrides the BPE probe, for tokenizers llama.cpp knows but our table does not;
    `add_space_prefix` is the architecture's fixed choice for SentencePiece vocabularies (Gemma: no);
    `chat_template` replaces the folder's own (the format a model was trained on, when it is not that)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise BuildError(f"{model_dir}: transformers cannot load the tokenizer ({err}); "
                         "restore tokenizer.json and tokenizer_config.json from the model's source") from None
    kind = tokenizer_kind(tokenizer, model_dir)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        tokens, types = bpe_vocab(tokenizer, vocab_size)
        writer.add_tokenizer_pre(pretokenizer or pretokenizer_name(tokenizer, str(model_dir)))
    else:
        tokens, scores, types = sentencepiece_vocab(model_dir, vocab_size)
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if kind == "llama" and add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=len(tokens))
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_special_token.setdefault("bos", encodes_bos(tokenizer))  # not in tokenizer_config: what it does
    special.add_to_gguf(writer, quiet=True)


def adds_bos(model_dir: Path, tokenizer) -> bool:
    """Whether a text starts with BOS for this model: tokenizer_config's add_bos_token (what gguf-py's
    SpecialVocab reads), else what the tokenizer does. It is the GGUF's tokenizer.ggml.add_bos_token, so
    llama.cpp and Ollama add BOS to a prompt exactly where the train stage does (template = "alpaca")."""
    said = gguf.SpecialVocab(model_dir, load_merges=False).add_special_token.get("bos")
    return bool(said) if said is not None else encodes_bos(tokenizer)


def encodes_bos(tokenizer) -> bool:
    ids = tokenizer.encode("a")
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def sentencepiece_model(tokens: list[str], scores: list[float], types: list[int], special_ids: dict[str, int | None],
                        add_space_prefix: bool) -> bytes:
    """tokenizer.model for a GGUF's SentencePiece vocabulary (the import stage's inverse of
    `sentencepiece_vocab`): its pieces, scores and types as the GGUF holds them, a BPE model as
    Llama 2's and Gemma's are, with no normalization beyond whitespace escaping (llama.cpp applies
    none). convert, and llama.cpp's own converter, read the vocabulary back from it."""
    from sentencepiece import sentencepiece_model_pb2 as proto

    model = proto.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        model.pieces.add(piece=piece, score=score, type=int(kind))  # GGUF's token types are SentencePiece's
    trainer = model.trainer_spec
    trainer.model_type = proto.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = gguf.TokenType.BYTE in types
    trainer.allow_whitespace_only_pieces = True
    for name in ("unk", "bos", "eos", "pad"):
        token_id = special_ids.get(name)
        setattr(trainer, f"{name}_id", -1 if token_id is None else token_id)
        if token_id is not None:
            setattr(trainer, f"{name}_piece", tokens[token_id])
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = add_space_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()
