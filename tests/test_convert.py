"""convert on tiny random models: tensors, metadata and llama.cpp's logits against transformers."""

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from helpers import REPO, doit, leftovers, write_spec

from stages import convert
from stages.ground.errors import BuildError

# transformers forces Qwen's own pre-tokenizer onto any qwen2 model, so the tiny qwen2 (which
# borrows SmolLM2's vocabulary) has a tokenizer llama.cpp does not know: it needs the override.
PRETOKENIZER = {"llama": {}, "qwen2": {"pretokenizer": "smollm"}, "qwen3": {"pretokenizer": "smollm"},
                "mistral": {}, "gemma2": {}, "gemma3": {}, "phi3": {}}
PROMPT = "The quick brown fox jumps over the lazy dog. 1234 + 5678 = ?"


def hf_tensors(model_dir):
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(model_dir / "model.safetensors").items()}


def llama_cpp_logits(gguf_path, token_ids, n_ctx=64, **options):
    """llama.cpp's logits for every position; `options` go to Llama (lora_path=…)."""
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, **options)
    llm.eval(token_ids)
    return np.array(llm.scores[: len(token_ids)])


def transformers_logits(model_dir, token_ids):
    from transformers import AutoConfig

    from stages.formats import hf

    # eager: the reference attention (SDPA skips Gemma 2's attention soft-capping)
    model_class = hf.language_model_class(AutoConfig.from_pretrained(model_dir))
    model = model_class.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def prompt_ids(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_holds_the_source_tensors(arch, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    out = tmp_path / "m.gguf"
    convert.run(model_dir, out, "f32", "tiny", **PRETOKENIZER[arch])
    reader = GGUFReader(out)
    written = {t.name: np.array(t.data) for t in reader.tensors}
    source = hf_tensors(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    # llama.cpp's rotary layout for llama q/k, written out independently of arch.permute_rotary:
    # within each head, rows [0, d/2) and [d/2, d) are interleaved as (0, d/2, 1, d/2+1, ...).
    def rotary(w, n):
        d = w.shape[0] // n
        order = [h * d + (i // 2 + (i % 2) * d // 2) for h in range(n) for i in range(d)]
        return w[order]

    expected = {"token_embd.weight": source["model.embed_tokens.weight"], "output.weight": source["lm_head.weight"],
                "output_norm.weight": source["model.norm.weight"]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q, k = source[p + "self_attn.q_proj.weight"], source[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = rotary(q, heads), rotary(k, kv_heads)
        expected |= {
            f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k,
            f"blk.{i}.attn_v.weight": source[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": source[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_gate.weight": source[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": source[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": source[p + "mlp.down_proj.weight"],
            f"blk.{i}.attn_norm.weight": source[p + "input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": source[p + "post_attention_layernorm.weight"],
        }
        if arch == "qwen2":
            expected |= {f"blk.{i}.attn_{x}.bias": source[p + f"self_attn.{x}_proj.bias"] for x in "qkv"}
        if arch == "qwen3":
            expected |= {f"blk.{i}.attn_{x}_norm.weight": source[p + f"self_attn.{x}_norm.weight"] for x in "qk"}
    assert sorted(written) == sorted(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(written[name].reshape(values.shape), values, err_msg=name)

    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.", f"{arch}."))}
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.context_length"] == 256
    if arch == "qwen3":  # head_dim 32, not hidden_size / heads = 16
        assert fields["qwen3.attention.key_length"] == fields["qwen3.attention.value_length"] == 32


@pytest.mark.parametrize("arch, outtype, tolerance", [
    ("llama", "f32", 1e-3), ("mistral", "f32", 1e-3), ("qwen2", "f32", 1e-3), ("qwen3", "f32", 1e-3), ("gemma2", "f32", 1e-3),
    ("gemma3", "f32", 2e-3), ("phi3", "f32", 1e-3), ("llama", "f16", 5e-3), ("gemma3", "f16", 5e-3),
    ("llama", "bf16", 3e-2),
    ("llama", "q8_0", 3e-2),
])
def test_llama_cpp_logits_match_transformers(arch, outtype, tolerance, request, tmp_path):
    """Tolerance is on max |Δlogit| over every position and vocab entry of a 20-token prompt,
    scaled by the largest logit; f16, bf16 and q8_0 round the weights, so they get more room."""
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    out = tmp_path / f"m.{outtype}.gguf"
    convert.run(model_dir, out, outtype, "tiny", **PRETOKENIZER[arch])
    ids = prompt_ids(model_dir)
    expected = transformers_logits(model_dir, ids)
    got = llama_cpp_logits(out, ids)
    scale = np.abs(expected).max()
    print(f"{arch} {outtype}: max |Δ| / scale = {np.abs(got - expected).max() / scale:.2e}")
    assert np.abs(got - expected).max() <= tolerance * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


ROPE_SCALINGS = {
    # Llama 3.1's: with original_max_position_embeddings 64 the 8 frequencies of a 16-wide head fall
    # on all three sides (kept, blended, divided by factor), so a wrong factor shows.
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},  # DeepSeek-Coder's kind
}


@pytest.mark.parametrize("scaling", ["linear", pytest.param("llama3", marks=pytest.mark.slow)])
def test_rope_scaling_is_written_as_llama_cpp_reads_it(scaling, smollm_tokenizer, tiny_llama, tmp_path):
    from helpers import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model", "llama", smollm_tokenizer,
                                rope_parameters=ROPE_SCALINGS[scaling])
    out = tmp_path / "m.gguf"
    convert.run(model_dir, out, "f32", "tiny")
    ids = prompt_ids(model_dir)
    expected = transformers_logits(model_dir, ids)
    got = llama_cpp_logits(out, ids)
    unscaled = transformers_logits(tiny_llama, ids)  # same seed and weights, no scaling
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-3 * scale
    print(f"{scaling}: |Δ| / scale {np.abs(got - expected).max() / scale:.1e}, unscaled {np.abs(unscaled - expected).max() / scale:.1e}")
    assert np.abs(unscaled - expected).max() > 3e-3 * scale, "the scaling changes the logits, so the check bites"
    fields = {k: f.contents() for k, f in GGUFReader(out).fields.items()}
    if scaling == "llama3":
        factors = np.array(next(t for t in GGUFReader(out).tensors if t.name == "rope_freqs.weight").data)
        assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < factors[2] < 8.0
    else:
        assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0


def test_unsupported_rope_scaling_names_the_way_out(smollm_tokenizer, tmp_path):
    from helpers import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model", "llama", smollm_tokenizer, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(BuildError, match=r"rope scaling 'dynamic' is not supported yet for llama \(modelmake writes "
                                         r"default, linear, llama3\); set \[models.convert\] engine = \"llama.cpp\""):
        convert.run(model_dir, tmp_path / "m.gguf", "f32", "tiny")
    assert not (tmp_path / "m.gguf").exists()


def test_llama_cpp_tokenizes_like_transformers(tiny_llama, tmp_path):
    from llama_cpp import Llama

    out = tmp_path / "m.gguf"
    convert.run(tiny_llama, out, "f16", "tiny")
    llm = Llama(str(out), n_ctx=64, verbose=False, vocab_only=True)
    text = "Hello <|im_start|>user\n  naïve café 😀 tabs\tand 12345<|im_end|>"
    from transformers import AutoTokenizer

    assert llm.tokenize(text.encode(), add_bos=False, special=True) == AutoTokenizer.from_pretrained(tiny_llama).encode(text)


def test_unknown_pretokenizer_is_refused_with_the_way_out(tiny_qwen2, tmp_path):
    with pytest.raises(BuildError) as err:
        convert.run(tiny_qwen2, tmp_path / "m.gguf", "f16", "tiny")
    assert "the BPE pre-tokenizer is not one modelmake recognizes" in str(err.value)
    assert 'set pretokenizer = "NAME"' in str(err.value)
    assert leftovers(tmp_path) == []


def _bad_model(tiny_llama, tmp_path, mutate, table=""):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama, model_dir)
    mutate(model_dir)
    return write_spec(tmp_path, '[[models]]\nname = "bad"\nbase = "model"\nquantize = ["Q8_0"]\n' + table)


def _unsupported(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))


def _truncated(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garbage(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


@pytest.mark.parametrize("mutate, table, expected", [
    # With engine = "native" only modelmake's own converter may convert it (by default llama.cpp's would).
    (_unsupported, '[models.convert]\nengine = "native"\n',
     "architecture FalconForCausalLM is not supported yet; modelmake converts LlamaForCausalLM, "
     "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, "
     "Phi3ForCausalLM. For another, set [models.convert] engine = \"llama.cpp\" in the model's table to convert "
     "it with llama.cpp's own converter from the pinned source, or name your own: command = [\"python3\", "
     "\"llama.cpp/convert_hf_to_gguf.py\""),
    (_truncated, "", "not a valid safetensors file, truncated"),
    (_garbage, "", "not a valid safetensors file, its header is not valid safetensors JSON"),
])
def test_bad_model_fails_cleanly(tiny_llama, tmp_path, mutate, table, expected):
    spec = _bad_model(tiny_llama, tmp_path, mutate, table)
    result = doit(spec, check=False)
    assert result.returncode != 0
    assert expected in result.output
    assert "Traceback" not in result.output
    assert leftovers(tmp_path / "cache") == []


# Stands in for llama.cpp's convert_hf_to_gguf.py, with its command line: MODEL --outfile OUT --outtype T.
EXTERNAL_CONVERTER = f"""
import argparse, sys
sys.path.insert(0, {str(REPO)!r})
from stages import convert
parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--outfile", required=True)
parser.add_argument("--outtype", required=True)
args = parser.parse_args()
if args.outtype == "bf16":
    sys.exit("outtype bf16 is not supported by this converter")
convert.run(args.model, args.outfile, args.outtype, "tiny")
"""
EXTERNAL_SPEC = """
[[models]]
name = "tiny"
base = "model"
outtype = "{outtype}"
quantize = ["Q8_0"]

[models.convert]
command = ["{python}", "converter.py", "{{model_dir}}", "--outfile", "{{out}}", "--outtype", "{{outtype}}"]
"""


@pytest.mark.slow
def test_external_converter_is_the_convert_stage(tiny_llama, tmp_path):
    import sys

    shutil.copytree(tiny_llama, tmp_path / "model")
    script = tmp_path / "converter.py"
    script.write_text(EXTERNAL_CONVERTER)
    spec = write_spec(tmp_path, EXTERNAL_SPEC.format(outtype="f16", python=sys.executable))
    ran = doit(spec).ran
    assert ran[:3] == ["convert:tiny", "quantize:tiny-Q8_0", "eval:tiny-F16"]
    out = tmp_path / "cache/tiny/gguf/tiny.F16.gguf"
    own = tmp_path / "own.gguf"
    convert.run(tmp_path / "model", own, "f16", "tiny")
    assert out.read_bytes() == own.read_bytes(), "what the external converter wrote is the convert output"
    assert "gguf/tiny.F16.gguf" in (tmp_path / "cache/tiny/SHA256SUMS").read_text()

    assert doit(spec).ran == []
    script.write_text(EXTERNAL_CONVERTER + "# a new version of the converter\n")
    assert doit(spec).ran[0] == "convert:tiny", "the converter script is an input"

    spec.write_text(EXTERNAL_SPEC.format(outtype="bf16", python=sys.executable))
    failed = doit(spec, check=False)
    assert failed.returncode != 0 and "Traceback" not in failed.output
    assert "the external converter failed (exit 1)" in failed.output
    assert "outtype bf16 is not supported by this converter" in failed.output
    assert not [p for p in leftovers(tmp_path / "cache") if ".tmp-" in p], "no half-written GGUF"


@pytest.mark.slow
def test_external_converter_command_must_write_to_out(tiny_llama, tmp_path):
    shutil.copytree(tiny_llama, tmp_path / "model")
    spec = write_spec(tmp_path, '[[models]]\nname = "tiny"\nbase = "model"\n\n[models.convert]\n'
                                'command = ["python3", "convert_hf_to_gguf.py", "{model_dir}"]\n')
    result = doit(spec, check=False)
    assert result.returncode != 0 and "convert.command: the command must write its GGUF to {out}" in result.output


@pytest.mark.parametrize("dtype", ["bfloat16", *(pytest.param(d, marks=pytest.mark.slow) for d in ("float16", "float32"))])
def test_sharded_sources_of_every_float_type_convert_exactly(dtype, tiny_llama, tmp_path):
    """A base saved in shards (model-0000x-of-0000y.safetensors) converts to the same bytes as the
    same weights in one file, and every source value is carried exactly (f32 out)."""
    from helpers import TOKENIZER_FILES
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=getattr(torch, dtype))
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    model.save_pretrained(one)
    model.save_pretrained(sharded, max_shard_size="2MB")
    for folder in (one, sharded):
        for name in TOKENIZER_FILES:
            if (tiny_llama / name).exists():
                shutil.copy(tiny_llama / name, folder / name)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    convert.run(one, tmp_path / "one.gguf", "f32", "tiny")
    convert.run(sharded, tmp_path / "sharded.gguf", "f32", "tiny")
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "sharded.gguf").read_bytes()
    written = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "sharded.gguf").tensors}
    source = model.state_dict()
    np.testing.assert_array_equal(written["token_embd.weight"].reshape(-1, 64),
                                  source["model.embed_tokens.weight"].float().numpy())
    np.testing.assert_array_equal(written["blk.1.ffn_down.weight"].reshape(64, 128),
                                  source["model.layers.1.mlp.down_proj.weight"].float().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bf16_output_is_gguf_pys_rounding_bit_for_bit(dtype, tmp_path):
    """convert casts to BF16 with torch (8x faster than gguf-py's numpy path on a 3B model); the bytes
    must be gguf-py's (= ggml's): round to nearest even, subnormals, infinities, signed zeros, and
    NaNs (where torch differs, convert takes gguf-py's own path)."""
    import gguf
    from safetensors import safe_open
    from safetensors.torch import save_file

    values = torch.cat([torch.randn(4096, generator=torch.Generator().manual_seed(0)),
                        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3e-39, 65504.0, 1 + 2**-8,
                                      1 + 3 * 2**-8, 3.0e38])]).to(dtype)
    with_nan = values.clone()
    with_nan[7] = float("nan")
    save_file({"plain": values.reshape(2, -1), "nan": with_nan.reshape(2, -1)}, tmp_path / "t.safetensors")
    with safe_open(tmp_path / "t.safetensors", framework="pt") as handle:
        for name in ("plain", "nan"):
            plan = convert.TensorPlan(name, name, (2, values.numel() // 2), gguf.GGMLQuantizationType.BF16)
            expected = gguf.quants.quantize(handle.get_tensor(name).float().numpy(), gguf.GGMLQuantizationType.BF16)
            got = convert._tensor_bytes(plan, handle.get_tensor(name), None)
            assert got.tobytes() == expected.tobytes(), name
            assert got.nbytes == plan.nbytes


def test_weights_beyond_float16_are_refused_by_an_f16_conversion(tiny_llama, tmp_path):
    """A diverged fine-tune's weights can be finite in float32 and infinite in float16: the F16 GGUF is
    refused naming the tensor and the way out, not passed on for llama.cpp's quantizer to reject."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_llama, tmp_path / "big")
    weights = load_file(tmp_path / "big/model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] = 1e6
    save_file(weights, tmp_path / "big/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuildError, match=r"model.layers.0.self_attn.q_proj.weight holds values up to 1e\+06, beyond "
                                         r"float16's largest \(65504\).*outtype = \"bf16\" or \"f32\""):
        convert.run(tmp_path / "big", tmp_path / "m.gguf", "f16", "big")
    assert not list(tmp_path.glob("*.gguf*"))
    convert.run(tmp_path / "big", tmp_path / "m.gguf", "f32", "big")
