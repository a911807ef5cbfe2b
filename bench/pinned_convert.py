"""llama.cpp's pinned converter beside modelmake's own, and a mixture of experts through merge and
convert, each against `cp` of the same bytes, in the same run.

    python bench/pinned_convert.py [--size 3b] [--moe-layers 4] [--skip dense|moe]

dense: the synthetic Llama of bench/scale.py (random bf16 weights, Llama 3.2 3B's shape by default),
converted to BF16 by modelmake's own converter (`convert.run`) and by llama.cpp's
convert_hf_to_gguf.py from the pinned source (`convert.run_pinned`, as `doit` runs it), each in a
fresh process: wall time and peak resident memory (the largest process of its tree; it counts the
memory-mapped weights it touched), and whether the two GGUFs hold the same tensors.

moe: a synthetic Qwen3-MoE with Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts of FFN 768,
8 of them routed, 32 query and 4 KV heads of 128) and --moe-layers layers (4: 2.6B parameters,
5.2 GB), a random rank-16 LoRA on the attention (what the train stage adapts on a MoE), merged by
modelmake's streamed merge and converted by the pinned converter (the only one that takes a MoE).

The vocabulary is SmolLM2's (its tokenizer comes from the default spec's import: `doit import` first);
`doit tools` must have staged the converter.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from convert_throughput import write_llama_folder  # noqa: E402
from scale import SHAPES, TOKENIZER, VOCAB, write_model, write_random_bf16, write_safetensors  # noqa: E402


MOE = {"hidden": 2048, "experts": 128, "routed": 8, "moe_ffn": 768, "heads": 32, "kv_heads": 4, "head_dim": 128}


def measured(code: str) -> tuple[float, float]:
    """Wall seconds and peak resident GB of `code` run in a fresh Python process (its children included)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               f"subprocess.run([sys.executable, '-c', {code!r}], check=True); "
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    os.sync()
    done = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.exit(f"failed: {code}\n{done.stderr[-3000:]}")
    seconds, peak_kb = done.stdout.split()[-2:]
    return float(seconds), int(peak_kb) / 1e6


def copy_seconds(shards: list[Path], into: Path) -> float:
    os.sync()
    started = time.perf_counter()
    for shard in shards:
        shutil.copyfile(shard, into / shard.name)
    os.sync()
    return time.perf_counter() - started


def gguf_tensors(path: Path) -> dict[str, tuple[str, str]]:
    """Each tensor's type and the blake3 of its bytes (read from the memory-mapped file one at a time)."""
    import blake3
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, blake3.blake3(t.data.tobytes()).hexdigest()) for t in GGUFReader(path).tensors}


def dense(work: Path, size: str) -> None:
    base = work / "dense"
    write_model(base, size)
    shards = sorted(base.glob("*.safetensors"))
    gb = sum(p.stat().st_size for p in shards) / 1e9
    for shard in shards:
        shard.read_bytes()  # both sides read from the page cache
    (work / "copy").mkdir()
    cp = copy_seconds(shards, work / "copy")
    shutil.rmtree(work / "copy")
    native = measured(f"from stages import convert; convert.run({str(base)!r}, {str(work / 'native.gguf')!r}, 'bf16', 'b')")
    pinned = measured(f"from stages import convert; convert.run_pinned({str(base)!r}, {str(work / 'pinned.gguf')!r}, "
                      "'bf16', 'b')")
    same = gguf_tensors(work / "native.gguf") == gguf_tensors(work / "pinned.gguf")
    print(f"dense {size}: {gb:.2f} GB of bf16 safetensors; the same tensors from both converters: {same}")
    print(f"  cp + sync           : {cp:7.1f} s")
    for name, (seconds, peak) in (("modelmake's converter", native), ("llama.cpp's converter", pinned)):
        print(f"  {name:<20}: {seconds:7.1f} s  ({seconds / cp:4.2f}x cp)  peak resident {peak:5.2f} GB")
    print(f"  llama.cpp's / modelmake's: {pinned[0] / native[0]:.2f}x the time, {pinned[1] / native[1]:.2f}x the memory")
    shutil.rmtree(base)


def moe_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, e, f, q, kv = MOE["hidden"], MOE["experts"], MOE["moe_ffn"], MOE["heads"] * MOE["head_dim"], \
        MOE["kv_heads"] * MOE["head_dim"]
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "lm_head.weight": (VOCAB, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "self_attn.q_norm.weight": (MOE["head_dim"],), p + "self_attn.k_norm.weight": (MOE["head_dim"],),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "mlp.gate.weight": (e, h)}
        for x in range(e):
            shapes |= {f"{p}mlp.experts.{x}.gate_proj.weight": (f, h), f"{p}mlp.experts.{x}.up_proj.weight": (f, h),
                       f"{p}mlp.experts.{x}.down_proj.weight": (h, f)}
    return shapes


def write_moe(folder: Path, layers: int) -> None:
    write_random_bf16(folder, moe_shapes(layers))
    write_llama_folder(folder, TOKENIZER, MOE["hidden"], MOE["moe_ffn"], layers, MOE["heads"], MOE["kv_heads"], VOCAB,
                       rope_theta=1000000.0)
    config = json.loads((folder / "config.json").read_text())
    config |= {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": MOE["head_dim"],
               "num_experts": MOE["experts"], "num_experts_per_tok": MOE["routed"], "moe_intermediate_size": MOE["moe_ffn"],
               "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6}
    (folder / "config.json").write_text(json.dumps(config))


def write_attention_lora(folder: Path, shapes: dict[str, tuple[int, ...]], rank: int = 16) -> None:
    import torch

    gen = torch.Generator().manual_seed(1)
    lora = {}
    for name, shape in shapes.items():
        if name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            stem = "base_model.model." + name.removesuffix(".weight")
            lora[f"{stem}.lora_A.weight"] = (rank, shape[1])
            lora[f"{stem}.lora_B.weight"] = (shape[0], rank)
    folder.mkdir(parents=True)
    drawn = {name: (torch.randn(shape, generator=gen) * 0.01).numpy().tobytes() for name, shape in lora.items()}
    write_safetensors(folder / "adapter_model.safetensors", lora, "F32", lambda name, shape: drawn[name])
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "bias": "none", "use_rslora": False}))


def moe(work: Path, layers: int) -> None:
    base, adapter, merged = work / "moe", work / "moe-lora", work / "moe-merged"
    write_moe(base, layers)
    write_attention_lora(adapter, moe_shapes(layers))
    shards = sorted(base.glob("*.safetensors"))
    gb = sum(p.stat().st_size for p in shards) / 1e9
    params = sum(math.prod(s) for s in moe_shapes(layers).values()) / 1e9
    (work / "copy").mkdir()
    cp = copy_seconds(shards, work / "copy")
    shutil.rmtree(work / "copy")
    merge = measured(f"from pathlib import Path; from stages import merge; merge.run(Path({str(adapter)!r}), "
                     f"Path({str(base)!r}), Path({str(merged)!r}))")
    convert = measured(f"from stages import convert; convert.run_pinned({str(merged)!r}, {str(work / 'moe.gguf')!r}, "
                       "'bf16', 'moe')")
    print(f"moe (Qwen3-MoE shape, {layers} layers): {params:.2f}B parameters, {gb:.2f} GB of bf16 safetensors, "
          f"rank-16 LoRA on the attention")
    print(f"  cp + sync           : {cp:7.1f} s")
    for name, (seconds, peak) in (("merge (streamed)", merge), ("convert (llama.cpp's)", convert)):
        print(f"  {name:<20}: {seconds:7.1f} s  ({seconds / cp:4.2f}x cp)  peak resident {peak:5.2f} GB")
    print(f"  merge + convert     : {merge[0] + convert[0]:7.1f} s  ({(merge[0] + convert[0]) / cp:4.2f}x cp)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--moe-layers", type=int, default=4)
    parser.add_argument("--skip", choices=["dense", "moe"])
    parser.add_argument("--work", type=Path, default=REPO / "cache", help="where the synthetic models go")
    args = parser.parse_args()
    if not (TOKENIZER / "tokenizer.json").is_file():
        sys.exit(f"{TOKENIZER} has no tokenizer: run `doit import` first")
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-pinned-", dir=args.work) as work:
        if args.skip != "dense":
            dense(Path(work), args.size)
        if args.skip != "moe":
            moe(Path(work), args.moe_layers)


if __name__ == "__main__":
    main()
