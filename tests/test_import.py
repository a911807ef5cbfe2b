"""import of a GGUF base, for every family convert writes. The round trip is the oracle: a tiny
random model → convert (F32, F16, Q8_0) and llama.cpp's quantizer (Q4_K_M) → import must give back
its tensors, its config and its tokenizer, and convert must turn the import back into the file."""

import functools
import json

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from helpers import (
    doit,
    leftovers,
    make_peft_adapter,
    make_sentencepiece_tokenizer,
    make_tiny_model,
    scratch_folder,
    write_spec,
)
from safetensors.numpy import load_file
from test_convert import PRETOKENIZER, llama_cpp_logits, prompt_ids
from test_families import SPM_TEXTS

from stages import adapter, convert, import_, quantize
from stages.formats import arch as arches
from stages.formats import ggufheader
from stages.ground import llamacpp
from stages.ground.errors import BuildError
from stages.ground.spec import BaseRef

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
TYPES = ["f32", "f16", "q8_0", "Q4_K_M"]
# Wide enough (256) that Q4_K_M's K-quants apply: llama.cpp falls back to other types for rows
# that are not a multiple of 256.
WIDE = {"hidden_size": 256, "intermediate_size": 512}
TEXTS = ["Hello world, the answer is 42.\n\nAnswer: Athens.  Two  spaces é 😀", "\ttab and\nnewline 12345 ...",
         " leading space", "<|im_start|>user\nhi<|im_end|>\n"]


def import_gguf(path, out):
    import_.run(BaseRef(text=path.name, kind="gguf", location=str(path)), out)
    return out


@functools.cache
def _read(path):
    """Metadata and tensor bytes, with modelmake's header reader: gguf-py's GGUFReader takes seconds
    per file for a 49k-token vocabulary (the two are held equal in test_header_reader_agrees_with_gguf_py)."""
    with ggufheader.Mapped(path) as gguf_file:
        fields = {key: gguf_file.value(key) for key in gguf_file.keys()}
        tensors = {t.name: (t.qtype, gguf_file.rows(t).tobytes()) for t in gguf_file.header.tensors}
    return fields, tensors


def gguf_fields(path):
    return _read(path)[0]


def gguf_tensor_bytes(path):
    return _read(path)[1]


def test_header_reader_agrees_with_gguf_py(tmp_path):
    """Every metadata value and tensor as gguf-py's own reader gives them: the embedded SmolLM2 (Q8_0
    and Q4_1 tensors, a 49k-token BPE vocabulary) and a SentencePiece model's GGUF."""
    from helpers import SMOLLM_GGUF

    tokenizer_dir = make_sentencepiece_tokenizer(tmp_path / "tokenizer", "gemma")
    spm = tmp_path / "spm.gguf"
    convert.run(make_tiny_model(tmp_path / "model", "gemma3", tokenizer_dir, vocab_size=1024), spm, "q8_0", "tiny")
    for path in (SMOLLM_GGUF, spm):
        reader = GGUFReader(path)
        fields, tensors = _read(path)
        assert fields == {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
        assert tensors == {t.name: (t.tensor_type, bytes(np.asarray(t.data).data)) for t in reader.tensors}


def llama_cpp_dequantized(path, out):
    """llama.cpp's own dequantization of a GGUF: its quantizer, asked for F32."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = 0, True  # LLAMA_FTYPE_ALL_F32
    with llamacpp.captured_llama_log():
        assert llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), params) == 0
    return out


# The fast tier round-trips one family (Gemma 3: its stored 1 + w norms take the most care); the rest are slow.
@pytest.fixture(scope="module", params=[f if f == "gemma3" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def round_trip(request, smollm_tokenizer):
    """A wide tiny model of one family, its GGUFs of every type, and each imported back."""
    family = request.param
    folder = scratch_folder(request, f"import-{family}")
    model = make_tiny_model(folder / "model", family, smollm_tokenizer, **WIDE)
    ggufs = {kind: folder / f"m.{kind}.gguf" for kind in TYPES}
    for kind in TYPES[:3]:
        convert.run(model, ggufs[kind], kind, "tiny", **PRETOKENIZER[family])
    quantize.run(ggufs["f16"], ggufs["Q4_K_M"], "Q4_K_M")
    imports = {kind: import_gguf(path, folder / f"imported-{kind}") for kind, path in ggufs.items()}
    return {"family": family, "folder": folder, "model": model, "gguf": ggufs, "imported": imports}


def _norm_slack(name, original, family):
    """Gemma's norms are stored as 1 + w, rounded: w comes back within that rounding."""
    return np.spacing(np.abs(1 + original)) if family.startswith("gemma") and name.endswith("norm.weight") else 0


def test_f32_and_f16_sources_give_the_weights_back_exactly(round_trip):
    original = load_file(round_trip["model"] / "model.safetensors")
    for kind in ("f32", "f16"):
        got = load_file(round_trip["imported"][kind] / "model.safetensors")
        tied = json.loads((round_trip["model"] / "config.json").read_text())["tie_word_embeddings"]
        assert sorted(got) == sorted(name for name in original if not (tied and name == "lm_head.weight")), kind
        for name, values in got.items():
            expected = original[name].astype(np.float16).astype(np.float32) \
                if kind == "f16" and values.ndim == 2 else original[name]
            assert values.dtype == np.float32
            np.testing.assert_array_less(np.abs(values - expected), _norm_slack(name, original[name], round_trip["family"])
                                         + 1e-30, err_msg=f"{kind} {name}")


def test_quantized_sources_come_back_within_the_types_error(round_trip):
    """Q8_0: every value within half a step (the block's largest |w| / 127) of the original, plus the
    step's rounding to float16 times the largest quantum (127 · 2^-11 of a step). Q4_K_M:
    every matrix within 12% relative RMS error (measured at most 7.7% here, Q6_K's tensors ~2%)."""
    original = load_file(round_trip["model"] / "model.safetensors")
    q8 = load_file(round_trip["imported"]["q8_0"] / "model.safetensors")
    q4 = load_file(round_trip["imported"]["Q4_K_M"] / "model.safetensors")
    for name, values in q8.items():
        source = original[name]
        if values.ndim < 2:  # norms and biases stay F32 in every type
            assert np.array_equal(q4[name], values) and np.all(np.abs(values - source) <= _norm_slack(
                name, source, round_trip["family"])), name
            continue
        blocks = source.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(values.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2**-11) + 1e-9), name
        error = np.sqrt(np.mean((q4[name] - source) ** 2) / np.mean(source ** 2))
        assert 0 < error <= 0.12, (name, error)


def test_the_config_comes_back(round_trip):
    """Every field the model's computation depends on; Mistral imports as llama.cpp's llama, which it is."""
    original = json.loads((round_trip["model"] / "config.json").read_text())
    family = round_trip["family"]
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "vocab_size", "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id"]
    keys += {"qwen3": ["head_dim", "attention_bias"], "llama": ["attention_bias", "mlp_bias"],
             "gemma2": ["head_dim", "sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                        "final_logit_softcapping", "hidden_activation"],
             "gemma3": ["head_dim", "sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                        "final_logit_softcapping", "hidden_activation"],
             "phi3": ["sliding_window", "original_max_position_embeddings"]}.get(family, [])
    for kind, folder in round_trip["imported"].items():
        imported = json.loads((folder / "config.json").read_text())
        expected_class = "LlamaForCausalLM" if family == "mistral" else original["architectures"][0]
        assert imported["architectures"] == [expected_class], kind
        for key in keys:
            assert imported.get(key) == original.get(key), (kind, key)
        assert np.float32(imported["rms_norm_eps"]) == np.float32(original["rms_norm_eps"])
        assert json.dumps(imported["rope_parameters"], sort_keys=True) == json.dumps(original["rope_parameters"],
                                                                                   sort_keys=True), kind


def test_convert_turns_the_import_back_into_the_file(round_trip):
    """F32 and F16: the same tensors byte for byte, and the same metadata but the name."""
    for kind in ("f32", "f16"):
        again = round_trip["folder"] / f"again.{kind}.gguf"
        convert.run(round_trip["imported"][kind], again, kind, "tiny", **PRETOKENIZER[round_trip["family"]])
        assert gguf_tensor_bytes(again) == gguf_tensor_bytes(round_trip["gguf"][kind]), kind
        source, ours = gguf_fields(round_trip["gguf"][kind]), gguf_fields(again)
        assert {k: v for k, v in ours.items() if k != "general.name"} == \
            {k: v for k, v in source.items() if k != "general.name"}, kind


def test_the_tokenizer_encodes_like_the_original(round_trip):
    """Like the model's own tokenizer and like llama.cpp on the source GGUF. The tiny Qwen2 is the one
    exception to the second: transformers loads any qwen2 model folder, its own as the import, with
    Qwen's pre-tokenizer, which splits the SmolLM vocabulary it borrows otherwise than llama.cpp's
    smollm ("\\n\\n" is one token there, two in llama.cpp)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(round_trip["model"])
    imported = AutoTokenizer.from_pretrained(round_trip["imported"]["Q4_K_M"])
    llm = Llama(str(round_trip["gguf"]["Q4_K_M"]), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert imported.encode(text) == original.encode(text), text
        if round_trip["family"] != "qwen2":
            assert imported.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text
    assert imported.chat_template == original.chat_template is not None
    assert (imported.bos_token_id, imported.eos_token_id) == (original.bos_token_id, original.eos_token_id)


def test_the_import_holds_the_values_llama_cpp_computes_with(round_trip):
    """Q8_0 and Q4_K_M imports, converted back to F32, are byte for byte what llama.cpp's own
    dequantization of the original file gives. llama.cpp's logits then differ only by its quantized
    arithmetic (it multiplies a quantized file's rows by 8-bit activations): within 8% of the largest
    logit here (measured 1.5-4.5% across the families)."""
    for kind in ("q8_0", "Q4_K_M"):
        again = round_trip["folder"] / f"again-f32-from-{kind}.gguf"
        convert.run(round_trip["imported"][kind], again, "f32", "tiny", **PRETOKENIZER[round_trip["family"]])
        reference = llama_cpp_dequantized(round_trip["gguf"][kind], round_trip["folder"] / f"llama-cpp-f32-{kind}.gguf")
        assert gguf_tensor_bytes(again) == gguf_tensor_bytes(reference), kind
    ids = prompt_ids(round_trip["model"])
    expected = llama_cpp_logits(round_trip["gguf"]["Q4_K_M"], ids)
    got = llama_cpp_logits(again, ids)
    print(f"{round_trip['family']}: |Δ| / scale {np.abs(got - expected).max() / np.abs(expected).max():.1e}")
    assert np.abs(got - expected).max() <= 8e-2 * np.abs(expected).max()


@pytest.mark.parametrize("style, family", [("gemma", "gemma3"), ("llama2", "llama")])
def test_sentencepiece_vocabulary_round_trip(style, family, tmp_path):
    """tokenizer.model is written from the GGUF's pieces, scores and types, so convert writes the same
    vocabulary again; the imported tokenizer encodes like llama.cpp (on Llama 2 except transformers'
    known Metaspace difference, see test_families). No chat template in the GGUF: none invented."""
    import sentencepiece
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer_dir = make_sentencepiece_tokenizer(tmp_path / "tokenizer", style)
    model = make_tiny_model(tmp_path / "model", family, tokenizer_dir, vocab_size=1024)
    source = tmp_path / "m.gguf"
    convert.run(model, source, "f16", "tiny")
    imported = import_gguf(source, tmp_path / "imported")
    original = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    written = sentencepiece.SentencePieceProcessor(model_file=str(imported / "tokenizer.model"))
    assert [written.IdToPiece(i) for i in range(1000)] == [original.IdToPiece(i) for i in range(1000)]
    assert [written.GetScore(i) for i in range(1000)] == pytest.approx([original.GetScore(i) for i in range(1000)])
    for text in SPM_TEXTS[:3]:
        assert written.encode(text) == original.encode(text), text
    again = tmp_path / "again.gguf"
    convert.run(imported, again, "f16", "tiny")
    # The tiny Gemma vocabulary's <mask> lies past its 1000 pieces, so its GGUF names the padding row
    # 1000 ("[PAD1000]") as the mask: no token to carry over. A real Gemma's is a control token.
    assert {k: v for k, v in gguf_fields(again).items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in gguf_fields(source).items() if k.startswith("tokenizer.") and k != "tokenizer.ggml.mask_token_id"}
    hf_tokenizer = AutoTokenizer.from_pretrained(imported)
    llm = Llama(str(source), vocab_only=True, verbose=False)
    for text in SPM_TEXTS[:2] if style == "llama2" else SPM_TEXTS:
        assert hf_tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), text
    assert hf_tokenizer.chat_template is None and not (imported / "chat_template.jinja").exists()


@pytest.mark.slow
def test_llama3_rope_factors_come_back_as_its_parameters(smollm_tokenizer, tmp_path):
    """Llama 3.1's rope is stored as a factor per frequency; import solves for the parameters that
    give them (the original context is fixed by Llama 3's low_freq_factor = 1, as here)."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = make_tiny_model(tmp_path / "model", "llama", smollm_tokenizer, rope_parameters=rope)
    source = tmp_path / "m.gguf"
    convert.run(model, source, "f32", "tiny")
    imported = import_gguf(source, tmp_path / "imported")
    assert json.loads((imported / "config.json").read_text())["rope_parameters"] == rope
    again = tmp_path / "again.gguf"
    convert.run(imported, again, "f32", "tiny")
    assert gguf_tensor_bytes(again) == gguf_tensor_bytes(source)
    # Llama 3.1 8B's and Llama 3.2 1B's own parameters come back from their factors too
    for hidden, factor in ((4096, 8.0), (2048, 32.0)):
        config = {"hidden_size": hidden, "num_attention_heads": 32}
        real = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        factors = arches.llama3_rope_factors(config | {"rope_parameters": real})
        assert arches.llama3_rope_parameters(factors, config | {"rope_parameters": {"rope_theta": 500000.0}}) == real
    with pytest.raises(BuildError, match="rope_freqs.weight: these rope factors are not Llama 3's scaling"):
        arches.llama3_rope_parameters(factors ** 0.5, config | {"rope_parameters": {"rope_theta": 500000.0}})


@pytest.mark.slow
def test_phi3_longrope_factors_come_back_into_the_config(smollm_tokenizer, monkeypatch, tmp_path):
    """Phi-3 128k's LongRoPE factors are tensors in the GGUF; import puts them back in rope_parameters,
    and a file whose factors the config would not give back is refused (with the map released)."""
    rng = np.random.default_rng(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 256, "long_factor": rng.uniform(1, 8, 6).tolist(),
            "short_factor": rng.uniform(1, 3, 6).tolist()}
    model = make_tiny_model(tmp_path / "model", "phi3", smollm_tokenizer, sliding_window=None,
                            max_position_embeddings=1024, original_max_position_embeddings=256, rope_parameters=rope)
    source = tmp_path / "m.gguf"
    convert.run(model, source, "f32", "tiny")
    imported = json.loads((import_gguf(source, tmp_path / "imported") / "config.json").read_text())["rope_parameters"]
    assert imported["rope_type"] == "longrope" and imported["partial_rotary_factor"] == 0.75
    for kind in ("long_factor", "short_factor"):
        assert np.array_equal(np.float32(imported[kind]), np.float32(rope[kind])), kind
    again = tmp_path / "again.gguf"
    convert.run(tmp_path / "imported", again, "f32", "tiny")
    assert gguf_tensor_bytes(again) == gguf_tensor_bytes(source) and gguf_fields(again) | {"general.name": ""} == \
        gguf_fields(source) | {"general.name": ""}
    original = arches.Phi3.computed_tensors
    monkeypatch.setattr(arches.Phi3, "computed_tensors", lambda self, config: {
        name: values * 2 for name, values in original(self, config).items()})
    with pytest.raises(BuildError, match="tensor rope_factors_long.weight is not what the config read from it gives back"):
        import_gguf(source, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_b1_a_lora_trained_on_an_imported_gguf_runs_on_that_very_file(family, smollm_tokenizer, tmp_path):
    """Route B1 on the user's own GGUF: train on its import, then llama.cpp runs the user's file with
    the GGUF LoRA, and gets the merged model's logits (1e-3 of the largest; 2e-3 for the six-layer
    Gemma 3, as in test_lora), where the adapter moves them by far more."""
    model = make_tiny_model(tmp_path / "model", family, smollm_tokenizer)
    theirs = tmp_path / "theirs.gguf"
    convert.run(model, theirs, "f32", "theirs", **PRETOKENIZER[family])
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"Answer: {i}."})
                                                 + "\n" for i in range(8)))
    spec = write_spec(tmp_path, '[[models]]\nname = "m"\nbase = "theirs.gguf"\nouttype = "f32"\nquantize = []\n'
                      '[models.train]\ndataset = "data.jsonl"\nvalidation = 0.25\nmax_steps = 4\nbatch_size = 4\n'
                      'learning_rate = 0.05\n[models.train.lora]\nr = 8\n')
    doit(spec)
    gguf_dir = tmp_path / "cache/m/gguf"
    ids = prompt_ids(model)
    with_lora = llama_cpp_logits(theirs, ids, lora_path=str(gguf_dir / "m.lora.F16.gguf"))
    merged, plain = llama_cpp_logits(gguf_dir / "m-merged.F32.gguf", ids), llama_cpp_logits(theirs, ids)
    scale = np.abs(merged).max()
    tolerance = 2e-3 if family == "gemma3" else 1e-3
    print(f"{family}: |lora - merged| / scale {np.abs(with_lora - merged).max() / scale:.1e}, "
          f"|plain - merged| / scale {np.abs(plain - merged).max() / scale:.1e}")
    assert np.abs(with_lora - merged).max() <= tolerance * scale
    assert np.abs(plain - merged).max() > 20 * tolerance * scale, "the adapter must matter for this test to mean anything"


def _vocabulary_only(path):
    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def test_bad_gguf_bases_are_refused_naming_the_problem(tiny_llama, monkeypatch, tmp_path):
    """An adapter given as a base, a vocabulary-only file, and a hyperparameter import cannot carry
    over: each a clear error, and no folder left behind."""
    lora_dir = make_peft_adapter(tmp_path / "adapter", tiny_llama)
    cases = {"adapter.gguf": "is a LoRA adapter (general.type = adapter), not a base model",
             "vocab.gguf": "holds no tensors (a vocabulary-only GGUF?)",
             "yarn.gguf": "llama.rope.scaling.type = 'yarn' is a hyperparameter modelmake does not read back"}
    adapter.run(lora_dir, tiny_llama, tmp_path / "adapter.gguf", "f16", "tiny")
    _vocabulary_only(tmp_path / "vocab.gguf")
    with monkeypatch.context() as patch:  # a converter that writes a key import does not know
        patch.setattr(arches.Llama, "add_metadata",
                      lambda self, writer, config: writer.add_string("llama.rope.scaling.type", "yarn"))
        convert.run(tiny_llama, tmp_path / "yarn.gguf", "f16", "tiny")
    for name, message in cases.items():
        with pytest.raises(BuildError) as err:
            import_gguf(tmp_path / name, tmp_path / f"out-{name}")
        assert message in str(err.value) and str(tmp_path / name) in str(err.value), name
        assert not (tmp_path / f"out-{name}").exists()
    assert [p for p in tmp_path.rglob("*") if ".tmp-" in p.name] == []


def test_a_tensor_type_gguf_py_cannot_dequantize_is_named(tmp_path):
    import gguf

    path, qtype = tmp_path / "q8k.gguf", gguf.GGMLQuantizationType.Q8_K  # llama.cpp's internal dot-product type
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros(gguf.quants.quant_shape_to_byte_shape((2, 256), qtype), np.uint8),
                      raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with ggufheader.Mapped(path) as gguf_file, pytest.raises(BuildError) as err:
        import_.dequantized(gguf_file, gguf_file.header.tensors[0])
    assert f"{path}: tensor token_embd.weight is Q8_K, which gguf-py cannot dequantize" in str(err.value)


def test_a_bad_gguf_base_fails_the_build_with_exit_status_and_no_traceback(tmp_path):
    _vocabulary_only(tmp_path / "vocab.gguf")
    spec = write_spec(tmp_path, '[[models]]\nname = "v"\nbase = "vocab.gguf"\nquantize = ["Q8_0"]\n')
    result = doit(spec, check=False)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert "vocab.gguf holds no tensors" in result.output
    assert not (tmp_path / "cache/v/base").exists() and leftovers(tmp_path / "cache") == []


def test_float32_safetensors_header_is_safetensors_own(tmp_path):
    """The streamed shards start with the bytes safetensors' own writer gives the same tensors."""
    from safetensors.numpy import save_file

    from stages.formats import hf

    tensors = {"b.weight": np.ones((3, 5), np.float32), "a.bias": np.arange(7, dtype=np.float32),
               "model.layers.10.x": np.zeros((2, 2, 2), np.float32)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    header = hf.safetensors_header({name: value.shape for name, value in tensors.items()}, "F32")
    reference = (tmp_path / "ref.safetensors").read_bytes()
    assert reference[:len(header)] == header
    assert reference[len(header):] == b"".join(tensors[name].tobytes() for name in sorted(tensors))
    shards = hf.plan_shards({"a": (10,), "b": (10,), "c": (30,)}, "F32", limit=100)
    assert shards == {"model-00001-of-00002.safetensors": ["a", "b"], "model-00002-of-00002.safetensors": ["c"]}


@pytest.mark.slow
def test_a_sharded_import_loads_in_transformers(tiny_llama, monkeypatch, tmp_path):
    """Above the shard size the weights are split as the hub splits them, with an index."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "m.gguf"
    convert.run(tiny_llama, source, "f32", "tiny")
    whole = load_file(import_gguf(source, tmp_path / "whole") / "model.safetensors")
    monkeypatch.setattr(import_.hf, "SHARD_BYTES", 4 << 20)
    out = import_gguf(source, tmp_path / "sharded")
    assert len(list(out.glob("model-*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, values in whole.items():
        assert np.array_equal(model.state_dict()[name].numpy(), values), name


def test_a_gguf_base_holding_nan_is_refused_naming_the_tensor(tiny_llama, tmp_path):
    path = convert.run(tiny_llama, tmp_path / "m.gguf", "f32", "tiny") or tmp_path / "m.gguf"
    with ggufheader.Mapped(path) as gguf_file:
        norm = next(t for t in gguf_file.header.tensors if t.name == "blk.0.ffn_norm.weight")
        start = gguf_file.header.data_offset + norm.offset
    with open(path, "r+b") as f:  # one float32 of the norm becomes NaN
        f.seek(start + 4 * 3)
        f.write(np.float32("nan").tobytes())
    with pytest.raises(BuildError) as err:
        import_gguf(path, tmp_path / "out")
    assert f"{path}: tensor 'blk.0.ffn_norm.weight' holds NaN or infinite values" in str(err.value)
    assert not (tmp_path / "out").exists()
