"""Convert throughput against a plain copy of the same safetensors bytes, in the same run.

    python bench/convert_throughput.py [MODEL_DIR] [--outtype f16] [--repeat 3]
    python bench/convert_throughput.py --synthetic [--outtype f16]

MODEL_DIR defaults to the default spec's imported base (cache/smollm2-demo/base: build it
with `doit import` first). --synthetic writes a random bf16 llama of about 0.55B parameters
(1.1 GB, the dtype real checkpoints ship in) with the SmolLM2 tokenizer, and measures that.
Prints MB/s of source bytes for both, and the ratio (goal: ≤ 2×).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stages import convert  # noqa: E402


def timed(fns, repeat):
    """Median seconds of each function, run in turns, each starting with no dirty pages to
    flush, so neither pays for the other's writeback."""
    times = [[] for _ in fns]
    for fn in fns:  # warm-up: a VM's first touch of fresh memory pages is several times slower
        fn()
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            os.sync()
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def llama_shapes(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict[str, tuple]:
    """Every tensor of an untied Llama under its Hugging Face name, in the order weights are drawn."""
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn),
                   p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
    return shapes


def write_llama_folder(folder: Path, tokenizer_dir: Path, hidden: int, ffn: int, layers: int, heads: int,
                       kv_heads: int, vocab: int, rope_theta: float) -> None:
    """config.json of that Llama, and the tokenizer files beside it (the weights are the caller's)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": rope_theta, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, folder / name)


def write_synthetic(folder: Path, tokenizer_dir: Path, layers: int = 8) -> Path:
    """Random bf16 weights under llama names: convert's per-byte cost without a slow model init."""
    import torch
    from safetensors.torch import save_file

    shape = {"hidden": 2048, "ffn": 5632, "layers": layers, "heads": 16, "kv_heads": 4, "vocab": 49152}
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(*dims, generator=gen) * 0.02).to(torch.bfloat16) if len(dims) == 2
               else torch.ones(dims, dtype=torch.bfloat16) for name, dims in llama_shapes(**shape).items()}
    write_llama_folder(folder, tokenizer_dir, **shape, rope_theta=10000.0)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default="cache/smollm2-demo/base", type=Path)
    parser.add_argument("--outtype", default="f16", choices=sorted(convert.OUTTYPES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true")
    args = parser.parse_args()
    if args.synthetic:
        tokenizer_dir = args.model_dir
        args.model_dir = Path(tempfile.mkdtemp(prefix="synthetic-", dir=args.model_dir.parent))
        write_synthetic(args.model_dir, tokenizer_dir)
    shards = sorted(args.model_dir.glob("*.safetensors"))
    if not shards:
        sys.exit(f"{args.model_dir} has no safetensors: run `doit import` first, or name a model folder")
    size_mb = sum(p.stat().st_size for p in shards) / 1e6

    with tempfile.TemporaryDirectory(dir=args.model_dir.parent) as tmp:
        tmp = Path(tmp)
        for p in shards:  # warm the page cache so both sides read from memory
            p.read_bytes()

        def copy():
            for p in shards:
                shutil.copyfile(p, tmp / p.name)

        copy_s, convert_s = timed(
            [copy, lambda: convert.run(args.model_dir, tmp / "out.gguf", args.outtype, "bench")], args.repeat)
    print(f"source: {args.model_dir} ({size_mb:.0f} MB safetensors), outtype {args.outtype}, median of {args.repeat}")
    print(f"plain copy : {copy_s:6.2f} s  {size_mb / copy_s:7.0f} MB/s")
    print(f"convert    : {convert_s:6.2f} s  {size_mb / convert_s:7.0f} MB/s")
    print(f"ratio      : {convert_s / copy_s:.2f}x the copy's time (goal ≤ 2x)")
    if args.synthetic:
        shutil.rmtree(args.model_dir)


if __name__ == "__main__":
    main()
