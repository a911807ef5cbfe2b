"""The architecture families beyond llama/qwen (Gemma 2, Gemma 3, Phi-3) and SentencePiece
tokenizers, on tiny random models: what convert writes, and llama.cpp against transformers."""

import json
import shutil

import numpy as np
import pytest
from gguf import GGUFReader
from helpers import make_sentencepiece_tokenizer, make_tiny_model, scratch_folder
from test_convert import hf_tensors, llama_cpp_logits, prompt_ids, transformers_logits

from stages import convert
from stages.ground.errors import BuildError


def gguf_contents(path):
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_norms_are_written_as_one_plus_w_and_the_output_stays_tied(arch, request, tmp_path):
    """Gemma's RMSNorm scales by 1 + w, llama.cpp's by w: every norm is written plus one (llama.cpp's
    converter does the same), everything else as it is; lm_head is never written."""
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    out = tmp_path / "m.gguf"
    convert.run(model_dir, out, "f32", "tiny")
    fields, written = gguf_contents(out)
    source = hf_tensors(model_dir)
    pairs = {"output_norm.weight": "model.norm.weight", "token_embd.weight": "model.embed_tokens.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        pairs |= {f"blk.{i}.attn_norm.weight": p + "input_layernorm.weight",
                  f"blk.{i}.post_attention_norm.weight": p + "post_attention_layernorm.weight",
                  f"blk.{i}.ffn_norm.weight": p + "pre_feedforward_layernorm.weight",
                  f"blk.{i}.post_ffw_norm.weight": p + "post_feedforward_layernorm.weight",
                  f"blk.{i}.attn_q.weight": p + "self_attn.q_proj.weight",
                  f"blk.{i}.ffn_gate.weight": p + "mlp.gate_proj.weight"}
        if arch == "gemma3":
            pairs |= {f"blk.{i}.attn_q_norm.weight": p + "self_attn.q_norm.weight",
                      f"blk.{i}.attn_k_norm.weight": p + "self_attn.k_norm.weight"}
    for gguf_name, hf_name in pairs.items():
        offset = 1.0 if hf_name.endswith("norm.weight") else 0.0
        np.testing.assert_array_equal(written[gguf_name].reshape(source[hf_name].shape), source[hf_name] + offset,
                                      err_msg=gguf_name)
    assert "output.weight" not in written
    config = json.loads((model_dir / "config.json").read_text())
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.sliding_window"] == config["sliding_window"] == 4
    assert fields[f"{arch}.attention.key_length"] == fields[f"{arch}.attention.value_length"] == 32
    if arch == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == 1.0 and fields["gemma2.final_logit_softcapping"] == 2.0
    else:  # the global layers' rope: base 1e6, linear factor 8 (the local layers' 10000 is llama.cpp's own)
        assert fields["gemma3.rope.freq_base"] == 1e6
        assert fields["gemma3.rope.scaling.type"] == "linear" and fields["gemma3.rope.scaling.factor"] == 8.0


def test_gemma2_soft_caps_reach_llama_cpp(tiny_gemma2, tmp_path):
    """The tiny Gemma 2's caps (1 and 2) bite: written as Gemma 2's usual 50 and 30, llama.cpp's logits
    move more than 20x the tolerance the true caps meet from transformers' (measured 4.7e-2 vs 5.7e-4)."""
    config = json.loads((tiny_gemma2 / "config.json").read_text())
    wrong = tmp_path / "wrong-caps"
    shutil.copytree(tiny_gemma2, wrong)
    (wrong / "config.json").write_text(json.dumps(config | {"attn_logit_softcapping": 50.0,
                                                            "final_logit_softcapping": 30.0}))
    convert.run(wrong, tmp_path / "m.gguf", "f32", "tiny")
    ids = prompt_ids(tiny_gemma2)
    expected = transformers_logits(tiny_gemma2, ids)
    assert np.abs(llama_cpp_logits(tmp_path / "m.gguf", ids) - expected).max() > 2e-2 * np.abs(expected).max()


def test_phi3_fused_projections_partial_rope_and_window(tiny_phi3, tmp_path):
    out = tmp_path / "m.gguf"
    convert.run(tiny_phi3, out, "f32", "tiny")
    fields, written = gguf_contents(out)
    source = hf_tensors(tiny_phi3)
    for i in range(2):  # fused as in transformers: q, k, v rows stacked; gate and up rows stacked
        np.testing.assert_array_equal(written[f"blk.{i}.attn_qkv.weight"].reshape(128, 64),
                                      source[f"model.layers.{i}.self_attn.qkv_proj.weight"])
        np.testing.assert_array_equal(written[f"blk.{i}.ffn_up.weight"].reshape(256, 64),
                                      source[f"model.layers.{i}.mlp.gate_up_proj.weight"])
    assert fields["phi3.rope.dimension_count"] == 12  # partial_rotary_factor 0.75 of a 16-wide head
    assert fields["phi3.attention.sliding_window"] == 48
    assert fields["phi3.rope.scaling.original_context_length"] == fields["phi3.context_length"] == 256


def test_phi3_longrope_short_and_long_factors_match_transformers(smollm_tokenizer, tmp_path):
    """Phi-3 128k's LongRoPE: transformers uses the short factors up to the original context and the
    long ones beyond; llama.cpp picks them by its context size (rounded up to 256). Both sides are
    checked, each against a model without the factors, so a missing or swapped tensor shows."""
    rng = np.random.default_rng(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 256, "long_factor": rng.uniform(1, 8, 6).tolist(),
            "short_factor": rng.uniform(1, 3, 6).tolist()}
    model_dir = make_tiny_model(tmp_path / "model", "phi3", smollm_tokenizer, sliding_window=None,
                                max_position_embeddings=1024, original_max_position_embeddings=256,
                                rope_parameters=rope)
    out = tmp_path / "m.gguf"
    convert.run(model_dir, out, "f32", "tiny")
    fields, written = gguf_contents(out)
    np.testing.assert_array_equal(written["rope_factors_long.weight"], np.float32(rope["long_factor"]))
    np.testing.assert_array_equal(written["rope_factors_short.weight"], np.float32(rope["short_factor"]))
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(256)))
    short = prompt_ids(model_dir)
    long = (short * 20)[:300]
    unscaled = make_tiny_model(tmp_path / "unscaled", "phi3", smollm_tokenizer, sliding_window=None)
    for ids, n_ctx in ((short, 256), (long, 512)):
        expected = transformers_logits(model_dir, ids)
        got = llama_cpp_logits(out, ids, n_ctx=n_ctx)
        scale = np.abs(expected).max()
        print(f"{len(ids)} tokens: |Δ| / scale {np.abs(got - expected).max() / scale:.1e}")
        assert np.abs(got - expected).max() <= 1e-3 * scale
        assert np.abs(transformers_logits(unscaled, ids) - expected).max() > 3e-3 * scale


def _edit_config(model_dir, tmp_path, **changes):
    edited = tmp_path / "edited"
    shutil.copytree(model_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(config | changes))
    return edited


@pytest.mark.parametrize("arch, changes, message", [
    ("gemma2", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256 is not the 32 llama.cpp uses"),
    ("gemma2", {"tie_word_embeddings": False}, "an untied output (tie_word_embeddings = false) is not a gemma2"),
    ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]}, "not llama.cpp's gemma2 pattern"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     "sliding-window layers with rope base 10000 and no scaling, this model has 20000.0"),
    ("gemma3", {"architectures": ["Gemma3ForConditionalGeneration"]},
     "architecture Gemma3ForConditionalGeneration is not supported yet"),
    ("phi3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
     "rope scaling 'yarn' is not supported yet for phi3"),
])
def test_configs_llama_cpp_would_run_differently_are_refused(arch, changes, message, request, tmp_path):
    model_dir = _edit_config(request.getfixturevalue(f"tiny_{arch}"), tmp_path, **changes)
    with pytest.raises(BuildError) as err:
        convert.run(model_dir, tmp_path / "m.gguf", "f16", "tiny")
    assert message in str(err.value) and '[models.convert] engine = "llama.cpp"' in str(err.value)
    assert not (tmp_path / "m.gguf").exists()


# Texts for the SentencePiece checks: spaces, newlines and tabs, digits (Gemma splits them), bytes
# that need the byte fallback (é is in the training text, the emoji is not), and special tokens.
SPM_TEXTS = ["Hello world, the answer is 42.\n\nAnswer: Athens.  Two  spaces é 😀",
             "\ttab and\nnewline 12345 ...", " leading space", "<s>x</s> and <bos> y<eos>"]


@pytest.fixture(scope="module", params=[("llama2", "llama"), ("gemma", "gemma2"), ("gemma", "gemma3"), ("llama2", "phi3")],
                ids=["llama2-llama", "gemma-gemma2", "gemma-gemma3", "llama2-phi3"])
def sentencepiece_model(request):
    """A tiny model with a real SentencePiece tokenizer (1000 pieces in 1024 embedding rows), converted."""
    style, arch = request.param
    folder = scratch_folder(request, f"spm-{style}-{arch}")
    tokenizer_dir = make_sentencepiece_tokenizer(folder / "tokenizer", style)
    model_dir = make_tiny_model(folder / "model", arch, tokenizer_dir, vocab_size=1024)
    out = folder / "m.gguf"
    convert.run(model_dir, out, "f16", "tiny")
    return {"style": style, "arch": arch, "model": model_dir, "gguf": out}


def test_sentencepiece_vocabulary_is_written_as_llama_cpp_reads_it(sentencepiece_model):
    """Pieces, scores and types straight from tokenizer.model (llama.cpp's tokenizer merges by score),
    padded to the embedding rows; Gemma's vocabularies have no space prefix."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model["model"] / "tokenizer.model"))
    reader = GGUFReader(sentencepiece_model["gguf"])
    field = reader.fields
    tokens = field["tokenizer.ggml.tokens"].contents()
    scores = field["tokenizer.ggml.scores"].contents()
    types = field["tokenizer.ggml.token_type"].contents()
    assert field["tokenizer.ggml.model"].contents() == "llama" and field["tokenizer.ggml.pre"].contents() == "default"
    assert len(tokens) == len(scores) == len(types) == 1024
    assert tokens[:1000] == [processor.IdToPiece(i) for i in range(1000)]
    assert scores[:1000] == pytest.approx([processor.GetScore(i) for i in range(1000)])
    assert tokens[1000:] == [f"[PAD{i}]" for i in range(1000, 1024)] and set(types[1000:]) == {5}  # UNUSED
    assert types[processor.PieceToId("<0x0A>")] == 6 and types[processor.unk_id()] == 2  # BYTE, UNKNOWN
    assert types[processor.bos_id()] == types[processor.eos_id()] == 3  # CONTROL
    assert field["tokenizer.ggml.bos_token_id"].contents() == processor.bos_id()
    assert field["tokenizer.ggml.eos_token_id"].contents() == processor.eos_id()
    assert field["tokenizer.ggml.add_bos_token"].contents() is True
    gemma = sentencepiece_model["style"] == "gemma"
    assert ("tokenizer.ggml.add_space_prefix" in field) == gemma
    if gemma:
        assert field["tokenizer.ggml.add_space_prefix"].contents() is False


def test_llama_cpp_tokenizes_like_sentencepiece_and_transformers(sentencepiece_model):
    """llama.cpp equals SentencePiece itself on every text, and transformers' tokenizer (what the train
    stage feeds the model) with BOS and special tokens. One known exception: transformers 5 rebuilds a
    Llama 2 tokenizer with a Metaspace pre-tokenizer, which adds no second ▁ to text that starts with
    a space or follows a special token, where SentencePiece and llama.cpp do."""
    import sentencepiece
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model["model"] / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_model["model"])
    llm = Llama(str(sentencepiece_model["gguf"]), vocab_only=True, verbose=False)
    for text in SPM_TEXTS[:3]:
        assert llm.tokenize(text.encode(), add_bos=False) == processor.encode(text), text
    leading_space_differs = sentencepiece_model["style"] == "llama2"
    for text in SPM_TEXTS[:2] if leading_space_differs else SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text


def test_sentencepiece_style_tokenizer_without_its_model_is_refused(sentencepiece_model, tmp_path):
    """tokenizer.json alone does not hold SentencePiece's scores, which llama.cpp merges by: a guess
    would tokenize differently, so convert says what is missing."""
    model_dir = tmp_path / "model"
    shutil.copytree(sentencepiece_model["model"], model_dir)
    (model_dir / "tokenizer.model").unlink()
    with pytest.raises(BuildError) as err:
        convert.run(model_dir, tmp_path / "m.gguf", "f16", "tiny")
    assert "tokenizer.json: a BPE with byte fallback (SentencePiece-style) tokenizer needs the SentencePiece model" \
        in str(err.value) and "copy tokenizer.model from the model's source" in str(err.value)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_readme_command_one_alone_imports_a_sentencepiece_gguf(tmp_path):
    """`pip install -e .` (README command 1, no test extras) must be enough for every documented path:
    the doit here sees only the runtime dependencies' closure (tests/runtime_only/sitecustomize.py),
    and imports a GGUF whose vocabulary is SentencePiece's (transformers builds its tokenizer with protobuf)."""
    import os
    import subprocess
    import sys

    from helpers import REPO, doit, write_spec

    model_dir = make_tiny_model(tmp_path / "model", "llama", make_sentencepiece_tokenizer(tmp_path / "tok", "llama2"),
                                vocab_size=1024)
    convert.run(model_dir, tmp_path / "spm.gguf", "f16", "tiny")
    spec = write_spec(tmp_path, '[[models]]\nname = "m"\nbase = "spm.gguf"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests/runtime_only")}
    blocked = subprocess.run([sys.executable, "-c", "import pytest"], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError: import of pytest halted" in blocked.stderr  # the blocker works
    result = doit(spec, "import", env=env, check=False)
    assert result.returncode == 0, result.output[-3000:]
    assert (tmp_path / "cache/m/base/tokenizer.json").is_file()
