"""Import of a 1B-parameter Q4_K_M GGUF: wall time and memory of modelmake's streaming import against
transformers' GGUF loader (what the import stage used before), each in a fresh process, in one run.

    python bench/import_gguf.py [--layers 16] [--keep]

The GGUF is made here: a synthetic Llama with Llama 3.2 1B's layers (hidden 2048, FFN 8192, 16
layers, 32 heads, 8 KV heads; random bf16 weights, seed 0) and SmolLM2's 49,152-token vocabulary,
untied (1.17B parameters), converted to F16 by modelmake and quantized to Q4_K_M by llama.cpp.
Memory is sampled as the build's run records sample it: peak anonymous memory (what the process
allocated) and peak mapped file pages (the GGUF's pages, which the kernel can drop), beside VmHWM.
Goal (issue 15): peak memory of the import at most 1.2x one shard's worth of float32 (one shard here),
not twice the model. Both imports' safetensors must have the same sha256.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from convert_throughput import llama_shapes, write_llama_folder

TOKENIZER = REPO / "cache" / "smollm2-demo" / "base"
SHAPE = {"hidden": 2048, "ffn": 8192, "heads": 32, "kv_heads": 8, "vocab": 49152}

# Each import runs in a child, so its memory is its own; the child prints one JSON line.
CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from stages.ground.runlog import ResidentPeaks
source, out, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
start = time.perf_counter()
with ResidentPeaks() as peaks:
    if how == "modelmake":
        from stages import import_
        from stages.ground.spec import BaseRef
        import_.run(BaseRef(text=source.name, kind="gguf", location=str(source)), out)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype="float32")
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out)
seconds = time.perf_counter() - start
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"seconds": seconds, "hwm_mb": hwm / 1024, **peaks.record()}}))
"""


def write_weights(folder: Path, layers: int) -> int:
    """Random bf16 weights, a tensor at a time into one safetensors file; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    shapes = llama_shapes(**SHAPE, layers=layers)
    write_llama_folder(folder, TOKENIZER, **SHAPE, layers=layers, rope_theta=500000.0)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(*dims, generator=gen) * 0.02).to(torch.bfloat16) if len(dims) == 2
               else torch.ones(dims, dtype=torch.bfloat16) for name, dims in shapes.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def run_import(how: str, source: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), str(source), str(out), how],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{how} import failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16: Llama 3.2 1B)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if not (TOKENIZER / "tokenizer.json").is_file():
        raise SystemExit(f"{TOKENIZER} missing: run `doit` on the default spec first (its import has the tokenizer)")
    from stages import convert, quantize

    work = Path(tempfile.mkdtemp(prefix="import-bench-", dir=REPO / "cache"))
    try:
        start = time.perf_counter()
        params = write_weights(work / "hf", args.layers)
        print(f"synthetic Llama: {params / 1e9:.2f}B parameters, written in {time.perf_counter() - start:.0f} s")
        convert.run(work / "hf", work / "m.F16.gguf", "f16", "synthetic")
        shutil.rmtree(work / "hf")
        start = time.perf_counter()
        quantize.run(work / "m.F16.gguf", work / "m.Q4_K_M.gguf", "Q4_K_M")
        print(f"llama.cpp's quantizer, F16 → Q4_K_M: {time.perf_counter() - start:.0f} s")
        (work / "m.F16.gguf").unlink()
        source = work / "m.Q4_K_M.gguf"
        dequantized_mb = params * 4 / 2**20
        results = {}
        for how in ("transformers", "modelmake"):
            results[how] = run_import(how, source, work / how)
            shards = sorted((work / how).glob("*.safetensors"))
            results[how]["shards"] = len(shards)
            results[how]["largest_shard_mb"] = max(p.stat().st_size for p in shards) / 2**20
            results[how]["sha256"] = [sha256(p) for p in shards]
        print(f"\nQ4_K_M GGUF {source.stat().st_size / 2**20:,.0f} MiB; dequantized float32 {dequantized_mb:,.0f} MiB\n")
        print("| import | wall | peak memory (anonymous) | peak mapped file pages | VmHWM | memory / largest shard |")
        print("| --- | --- | --- | --- | --- | --- |")
        for how, r in results.items():
            print(f"| {how} | {r['seconds']:.1f} s | {r['peak_anon_mb']:,.0f} MiB | {r['peak_file_mb']:,.0f} MiB | "
                  f"{r['hwm_mb']:,.0f} MiB | {r['peak_anon_mb'] / r['largest_shard_mb']:.2f}x "
                  f"({r['shards']} shard(s), largest {r['largest_shard_mb']:,.0f} MiB) |")
        ours, theirs = results["modelmake"], results["transformers"]
        print(f"\nmodelmake / transformers: wall {ours['seconds'] / theirs['seconds']:.2f}x, "
              f"memory {ours['peak_anon_mb'] / theirs['peak_anon_mb']:.2f}x")
        print("same safetensors bytes:", ours["sha256"] == theirs["sha256"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
