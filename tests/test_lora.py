"""adapter (PEFT → GGUF LoRA) and merge (streamed LoRA fold) against PEFT and llama.cpp."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import doit, leftovers, lora_targets, make_peft_adapter, make_tiny_model, scratch_folder, write_spec
from safetensors.torch import load_file
from test_convert import PRETOKENIZER, llama_cpp_logits, prompt_ids, transformers_logits

from stages import adapter, convert, merge
from stages.ground.errors import BuildError


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(base, adapter_dir)


@pytest.fixture(scope="module", params=[("llama", False), ("mistral", False), ("qwen2", False), ("qwen3", False),
                                        ("gemma2", False), ("gemma3", False), ("phi3", False), ("llama", True)],
                ids=["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "llama-rslora"])
def adapted(request):
    arch, rslora = request.param
    base = request.getfixturevalue(f"tiny_{arch}")
    folder = scratch_folder(request, f"lora-{arch}")
    lora_dir = make_peft_adapter(folder / "adapter", base, rslora=rslora)
    merged = folder / "merged"
    merge.run(lora_dir, base, merged)
    return {"arch": arch, "base": base, "adapter": lora_dir, "merged": merged, "folder": folder}


def test_streaming_merge_equals_peft_merge_and_unload(adapted):
    """Tensor for tensor within 1e-6 (both fold in float32; PEFT's order of operations differs)."""
    reference = peft_model(adapted["base"], adapted["adapter"]).merge_and_unload().state_dict()
    merged = load_file(adapted["merged"] / "model.safetensors")
    assert sorted(merged) == sorted(k for k in reference if k in merged) and len(merged) >= len(reference) - 1
    changed = 0
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(tensor, load_file(adapted["base"] / "model.safetensors")[name])
    layers = json.loads((adapted["base"] / "config.json").read_text())["num_hidden_layers"]
    assert changed == len(lora_targets(adapted["base"])) * layers, "every adapted projection changed, nothing else"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (adapted["merged"] / name).read_bytes() == (adapted["base"] / name).read_bytes()


def test_merged_model_logits_equal_the_peft_model(adapted):
    ids = prompt_ids(adapted["base"])
    with torch.no_grad():
        expected = peft_model(adapted["base"], adapted["adapter"])(torch.tensor([ids])).logits[0].numpy()
    got = transformers_logits(adapted["merged"], ids)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_llama_cpp_base_plus_gguf_lora_equals_merged_gguf_and_peft(adapted):
    """llama.cpp, F32 GGUFs: base + LoRA against merged, and both against PEFT in PyTorch.
    Tolerance: max |Δlogit| within 1e-3 of the largest logit (llama.cpp's f32 path measured ~3e-4),
    2e-3 for the six-layer Gemma 3 (as in test_convert)."""
    folder, options = adapted["folder"], PRETOKENIZER[adapted["arch"]]
    base_gguf, merged_gguf, lora_gguf = folder / "base.gguf", folder / "merged.gguf", folder / "lora.gguf"
    convert.run(adapted["base"], base_gguf, "f32", "tiny", **options)
    convert.run(adapted["merged"], merged_gguf, "f32", "tiny", **options)
    adapter.run(adapted["adapter"], adapted["base"], lora_gguf, "f32", "tiny")
    ids = prompt_ids(adapted["base"])
    with_lora = llama_cpp_logits(base_gguf, ids, lora_path=str(lora_gguf))
    merged, plain = llama_cpp_logits(merged_gguf, ids), llama_cpp_logits(base_gguf, ids)
    with torch.no_grad():
        expected = peft_model(adapted["base"], adapted["adapter"])(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(expected).max()
    tolerance = 2e-3 if adapted["arch"] == "gemma3" else 1e-3
    assert np.abs(with_lora - merged).max() <= tolerance * scale
    assert np.abs(with_lora - expected).max() <= tolerance * scale
    assert np.abs(plain - expected).max() > 50 * tolerance * scale, "the adapter must matter for this test to mean anything"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blocked_merge_is_the_one_expression_bit_for_bit(dtype):
    """merge works a block of rows at a time for speed; every value must be what
    (W + s·(B·A)) in float32, rounded to W's dtype, gives (the merged bytes built before blocking)."""
    generator = torch.Generator().manual_seed(0)
    for rows, cols, rank in [(3072, 3072, 16), (1000, 700, 8), (49152 // 8, 576, 4), (5, 3, 2)]:
        weight = (torch.randn(rows, cols, generator=generator) * 0.02).to(dtype)
        a, b = torch.randn(rank, cols, generator=generator) * 0.01, torch.randn(rows, rank, generator=generator) * 0.01
        expected = (weight.float() + 1.7 * (b.float() @ a.float())).to(dtype)
        got = merge.merged_weight(weight, a, b, 1.7)
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (rows, cols)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_convert_folding_the_lora_in_writes_the_merged_gguf_byte_for_byte(adapted, outtype, tmp_path):
    """[models.merge] keep_hf = false: convert merges each adapted weight as it streams past, and the
    GGUF must be the one merge + convert write (same name, same bytes)."""
    options = PRETOKENIZER[adapted["arch"]]
    convert.run(adapted["merged"], tmp_path / "two-steps.gguf", outtype, "tiny-merged", **options)
    convert.run(adapted["base"], tmp_path / "fused.gguf", outtype, "tiny-merged", **options,
                adapter_dir=adapted["adapter"])
    convert.run(adapted["base"], tmp_path / "base.gguf", outtype, "tiny-merged", **options)
    fused = (tmp_path / "fused.gguf").read_bytes()
    assert fused == (tmp_path / "two-steps.gguf").read_bytes()
    assert fused != (tmp_path / "base.gguf").read_bytes(), "the adapter must change the weights"


def test_fused_merge_of_a_bf16_base_matches_merge_then_convert(tiny_llama, tmp_path):
    """bf16 is what hub checkpoints ship: the merge rounds W + BA back to bf16 before convert casts it,
    and the fused path must round at the same place."""
    from safetensors.torch import save_file

    base = tmp_path / "bf16-base"
    shutil.copytree(tiny_llama, base)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(base / "model.safetensors").items()}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    lora_dir = make_peft_adapter(tmp_path / "adapter", base)
    merge.run(lora_dir, base, tmp_path / "merged")
    for outtype in ("bf16", "f16"):
        convert.run(tmp_path / "merged", tmp_path / f"two-steps.{outtype}.gguf", outtype, "m")
        convert.run(base, tmp_path / f"fused.{outtype}.gguf", outtype, "m", adapter_dir=lora_dir)
        assert (tmp_path / f"fused.{outtype}.gguf").read_bytes() == (tmp_path / f"two-steps.{outtype}.gguf").read_bytes()


def test_gguf_lora_metadata(adapted, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "lora.gguf"
    adapter.run(adapted["adapter"], adapted["base"], out, "f16", "tiny")
    reader = GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    config = json.loads((adapted["adapter"] / "adapter_config.json").read_text())
    expected_alpha = config["lora_alpha"] * (config["r"] ** 0.5 if config["use_rslora"] else 1)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == {"mistral": "llama"}.get(adapted["arch"], adapted["arch"])
    assert fields["adapter.lora.alpha"] == pytest.approx(expected_alpha)
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}  # GGUF order: ne0 first
    base = json.loads((adapted["base"] / "config.json").read_text())
    head_dim = base.get("head_dim") or base["hidden_size"] // base["num_attention_heads"]
    if adapted["arch"] == "phi3":  # fused q, k, v rows
        qkv_rows = (base["num_attention_heads"] + 2 * base["num_key_value_heads"]) * head_dim
        assert shapes["blk.0.attn_qkv.weight.lora_a"] == (64, 4) and shapes["blk.0.attn_qkv.weight.lora_b"] == (4, qkv_rows)
    else:
        q_rows = base["num_attention_heads"] * head_dim
        assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 4) and shapes["blk.0.attn_q.weight.lora_b"] == (4, q_rows)
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (128, 4) and shapes["blk.1.ffn_down.weight.lora_b"] == (4, 64)
    assert len(shapes) == 2 * len(lora_targets(adapted["base"])) * base["num_hidden_layers"]


def test_adapter_for_another_base_is_refused_before_writing(tiny_llama, smollm_tokenizer, tmp_path):
    import transformers

    other = tmp_path / "other"
    make_tiny_model(other, "llama", smollm_tokenizer)
    config = json.loads((other / "config.json").read_text())
    config.update(hidden_size=96, num_attention_heads=4)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in config.items()
                                                                      if k not in ("architectures", "transformers_version")}))
    model.save_pretrained(other)
    lora_dir = make_peft_adapter(tmp_path / "adapter", tiny_llama)
    for run in (lambda: adapter.run(lora_dir, other, tmp_path / "out/lora.gguf", "f16", "x"),
                lambda: merge.run(lora_dir, other, tmp_path / "out/merged"),
                lambda: convert.run(other, tmp_path / "out/merged.gguf", "f16", "x", adapter_dir=lora_dir)):
        with pytest.raises(BuildError) as err:
            run()
        assert f"{lora_dir} does not fit the base {other}" in str(err.value)
        assert "mlp.down_proj.weight is (64, 128) in the base but the adapter changes a (64, 128) matrix" not in str(err.value)
        assert "is (128, 96) in the base but the adapter changes a (128, 64) matrix" in str(err.value)
        assert "Was it trained on another model?" in str(err.value)
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []
    assert not (tmp_path / "out/merged").exists()


@pytest.mark.slow
def test_pickle_only_adapter_needs_explicit_consent(tiny_llama, tmp_path):
    lora_dir = make_peft_adapter(tmp_path / "adapter", tiny_llama)
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    torch.save(tensors, lora_dir / "adapter_model.bin")
    (lora_dir / "adapter_model.safetensors").unlink()
    shutil.copytree(tiny_llama, tmp_path / "base")
    spec_text = '[[models]]\nname = "m"\nbase = "base"\n[models.adapter]\npath = "adapter"\n'
    result = doit(write_spec(tmp_path, spec_text), check=False)
    assert result.returncode != 0
    assert "holds only adapter_model.bin, a pickle that can run code when loaded" in result.output
    assert "allow_pickle = true" in result.output and "Traceback" not in result.output
    assert leftovers(tmp_path / "cache") == [] and not (tmp_path / "cache/m/merged").exists()

    ran = doit(write_spec(tmp_path, spec_text + "allow_pickle = true\n")).ran
    assert ran == ["adapter:m", "merge:m", "convert:m", "convert:m-merged", "eval:m-F16", "eval:m-base",
                   "eval:m-lora", "parity:m-F16", "parity:m-lora", "package:m-F16", "package:m-lora", "manifest:m",
                   "report"]
    assert (tmp_path / "cache/m/gguf/m.lora.F16.gguf").is_file()


def test_broken_adapters_fail_cleanly(tiny_llama, tmp_path):
    lora_dir = make_peft_adapter(tmp_path / "adapter", tiny_llama)
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    (lora_dir / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(BuildError, match="DoRA .use_dora. cannot be written as a llama.cpp LoRA"):
        adapter.run(lora_dir, tiny_llama, tmp_path / "x.gguf", "f16", "x")
    (lora_dir / "adapter_config.json").write_text(json.dumps(config))
    weights = lora_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BuildError, match="not a valid safetensors file"):
        merge.run(lora_dir, tiny_llama, tmp_path / "merged")
    assert leftovers(tmp_path) == [] and not (tmp_path / "merged").exists()
