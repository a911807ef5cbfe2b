"""Streaming merge against PEFT's merge_and_unload + save_pretrained: wall time and peak RSS.

    python bench/merge_memory.py [--layers 8] [--shards 4] [--repeat 2]

Writes a random bf16 llama (about 0.55B parameters, 1.1 GB, in --shards safetensors shards,
as real checkpoints ship) and a rank-16 PEFT adapter on every projection, then runs each merge
in a fresh process (so peak RSS is that merge's own) and prints medians and ratios.
Goal: streaming peak RSS under half of PEFT's, time no worse.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_sharded_model(folder: Path, tokenizer_dir: Path, layers: int, shards: int) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "bench"))
    from convert_throughput import write_synthetic

    write_synthetic(folder, tokenizer_dir, layers=layers)
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    parts, size = [{}], 0  # fill shards in order up to an even share of the bytes, as transformers does
    for name in sorted(tensors):
        if size >= total / shards * len(parts) and len(parts) < shards:
            parts.append({})
        parts[-1][name] = tensors[name]
        size += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for i, part in enumerate(parts):
        shard = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    del tensors, torch


def write_adapter(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft_model.save_pretrained(out)


def peak_rss_mb() -> float:
    """This process's own high-water RSS. Not ru_maxrss: Linux carries that across fork+exec,
    so a child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, base: Path, adapter: Path, out: Path) -> None:
    start = time.perf_counter()
    if method == "streaming":
        from stages import merge

        merge.run(adapter, base, out)
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def measure(method: str, base: Path, adapter: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(base), str(adapter), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=REPO / "cache/smollm2-demo/base")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, base, adapter, out = args.child
        return child(method, Path(base), Path(adapter), Path(out))

    with tempfile.TemporaryDirectory(dir=REPO / "cache") as tmp:
        tmp = Path(tmp)
        write_sharded_model(tmp / "base", args.tokenizer, args.layers, args.shards)
        write_adapter(tmp / "base", tmp / "adapter")
        size_mb = sum(p.stat().st_size for p in (tmp / "base").glob("*.safetensors")) / 1e6
        largest_mb = max(p.stat().st_size for p in (tmp / "base").glob("*.safetensors")) / 1e6
        floor_mb = json.loads(subprocess.run(
            [sys.executable, "-c", "import json, sys, torch, safetensors.torch, peft, transformers; "
             f"sys.path.insert(0, {str(REPO / 'bench')!r}); from merge_memory import peak_rss_mb; "
             "print(json.dumps(peak_rss_mb()))"],
            capture_output=True, text=True, check=True).stdout)
        results = {"streaming": [], "peft": []}
        for i in range(args.repeat):
            for method in results:
                results[method].append(measure(method, tmp / "base", tmp / "adapter", tmp / f"out-{method}-{i}"))
    print(f"process floor (python + torch + safetensors imported): {floor_mb:.0f} MB")
    print(f"model: random llama, {args.layers} layers, {size_mb:.0f} MB bf16 in {args.shards} shards "
          f"(largest {largest_mb:.0f} MB); "
          f"rank-16 LoRA on all projections; median of {args.repeat}, each merge in its own process")
    summary = {m: {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_rss_mb")} for m, runs in results.items()}
    for method, figures in summary.items():
        print(f"{method:10s}: {figures['seconds']:6.2f} s   peak RSS {figures['peak_rss_mb']:7.0f} MB")
    print(f"streaming / peft: time {summary['streaming']['seconds'] / summary['peft']['seconds']:.2f}x, "
          f"peak RSS {summary['streaming']['peak_rss_mb'] / summary['peft']['peak_rss_mb']:.2f}x (goal < 0.5x)")


if __name__ == "__main__":
    main()
