"""Route C at multi-billion scale: the real `doit` route on a synthetic Llama-shaped model, each
stage's wall time and memory, against `cp` of the same bytes and llama.cpp's quantizer alone.

    python bench/scale.py [--size 3b|7b] [--keep-hf both|true|false] [--llama-convert PATH]

--size picks a real model's shape with random bf16 weights (seed 0): 3b is Llama 3.2 3B's layers
(hidden 3072, FFN 8192, 28 layers, 24 heads, 8 KV heads), 7b is Llama 2 7B's (4096, 11008, 32, 32,
32); the vocabulary is SmolLM2's 49,152 tokens (its tokenizer comes from the default spec's import).
The weights are written in hub-style shards of at most 5 GB, one tensor in memory at a time, with a
random rank-16 LoRA on every projection. The spec is the default one's shape without training:
adapter (GGUF LoRA), merge, convert (BF16), quantize (Q4_K_M), eval (speed: no held-out text),
package (both routes), manifest. Each --keep-hf mode is a fresh build (`doit cache=off`) in a cache
of its own; with `both`, the merged GGUFs of the two must have the same sha256.

Figures come from the run records the build writes (cache/.runs): wall time, peak anonymous memory,
peak mapped file pages. Baselines, in the same run: `cp` + sync of the base shards (the cost of moving
the bytes once), `tar` of the adapter route's package files, and llama.cpp's quantizer alone
(llama_model_quantize through llama-cpp-python, in a fresh process, on the same merged GGUF). Goals
(issue 17): route C (merge + convert + quantize, or the fused convert + quantize) <= 1.25x the
quantizer alone; manifest under 2 s; adapter-route package <= 1.5x the tar.
"""

import argparse
import json
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

from convert_throughput import llama_shapes, write_llama_folder  # noqa: E402

from stages.formats import hf  # noqa: E402

SHAPES = {  # hidden, FFN, layers, heads, KV heads
    "3b": (3072, 8192, 28, 24, 8),
    "7b": (4096, 11008, 32, 32, 32),
}
VOCAB = 49152
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER = REPO / "cache" / "smollm2-demo" / "base"

SPEC = """
[[models]]
name = "synthetic"
base = "base"
outtype = "bf16"
quantize = ["Q4_K_M"]

[models.adapter]
path = "adapter"

[models.merge]
keep_hf = {keep_hf}
"""


def tensor_shapes(size: str) -> dict[str, tuple[int, ...]]:
    hidden, ffn, layers, heads, kv_heads = SHAPES[size]
    return llama_shapes(hidden, ffn, layers, heads, kv_heads, VOCAB)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, make) -> None:
    """A safetensors file written tensor by tensor, in name order: `make(name, shape)` gives each one's bytes."""
    with open(path, "wb") as f:
        f.write(hf.safetensors_header(shapes, dtype))
        for name in sorted(shapes):
            f.write(make(name, shapes[name]))


def write_random_bf16(folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Random bf16 weights (seed 0; 1-D ones, as norms start) in hub-style shards with their index."""
    import torch

    gen = torch.Generator().manual_seed(0)

    def make(name, shape):
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()

    shards = hf.plan_shards(shapes, "BF16")  # as transformers fills them: in name order, up to 5 GB
    folder.mkdir(parents=True, exist_ok=True)
    for shard_name, names in shards.items():
        write_safetensors(folder / shard_name, {name: shapes[name] for name in names}, "BF16", make)
    (folder / "model.safetensors.index.json").write_text(json.dumps(hf.shard_index(shards, shapes, "BF16")))


def write_model(folder: Path, size: str) -> None:
    hidden, ffn, layers, heads, kv_heads = SHAPES[size]
    write_random_bf16(folder, tensor_shapes(size))
    write_llama_folder(folder, TOKENIZER, hidden, ffn, layers, heads, kv_heads, VOCAB, rope_theta=500000.0)


def write_adapter(folder: Path, size: str, rank: int = 16) -> None:
    """A PEFT adapter folder as `save_pretrained` writes one, with random A and B (float32)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    shapes = {}
    for name, shape in tensor_shapes(size).items():
        if name.rsplit(".", 2)[-2] in PROJECTIONS:
            stem = "base_model.model." + name.removesuffix(".weight")
            shapes[f"{stem}.lora_A.weight"] = (rank, shape[1])
            shapes[f"{stem}.lora_B.weight"] = (shape[0], rank)
    folder.mkdir(parents=True, exist_ok=True)
    drawn = {name: (torch.randn(shape, generator=gen) * 0.01).numpy().tobytes() for name, shape in shapes.items()}
    write_safetensors(folder / "adapter_model.safetensors", shapes, "F32", lambda name, shape: drawn[name])
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(PROJECTIONS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": "base"}))


def timed(cmd: list[str], **kw) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)
    return time.perf_counter() - started


def doit(spec: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "doit", "run", "-f", str(REPO / "dodo.py"), *args, f"spec={spec}", "cache=off"]


def build(workdir: Path, keep_hf: bool) -> dict:
    """One fresh build in a cache of its own; its run records and manifest."""
    spec = workdir / f"keep-{str(keep_hf).lower()}.toml"
    spec.write_text(f'cache = "cache-keep-{str(keep_hf).lower()}"\n' + SPEC.format(keep_hf=str(keep_hf).lower()))
    cache = workdir / f"cache-keep-{str(keep_hf).lower()}"
    shutil.rmtree(cache, ignore_errors=True)
    os.sync()
    wall = timed(doit(spec), cwd=REPO, stdout=subprocess.DEVNULL)
    records = {json.loads(p.read_text())["task"]: json.loads(p.read_text()) for p in (cache / ".runs").glob("*.json")}
    manifest = json.loads((cache / "synthetic" / "manifest.json").read_text())
    sums = {a["path"]: a["sha256"] for a in manifest["artifacts"]}
    return {"wall": wall, "records": records, "sums": sums, "cache": cache}


def quantize_alone(gguf: Path, out: Path) -> float:
    code = ("import sys, time, llama_cpp\n"
            "params = llama_cpp.llama_model_quantize_default_params()\n"
            "params.ftype = 15  # Q4_K_M\n"
            "params.nthread = 0\n"
            "t = time.perf_counter()\n"
            "assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params) == 0\n"
            "print(time.perf_counter() - t)\n")
    os.sync()
    out_text = subprocess.run([sys.executable, "-c", code, str(gguf), str(out)], check=True, capture_output=True,
                              text=True).stdout
    return float(out_text.strip().splitlines()[-1])


def row(records: dict, task: str) -> str:
    r = records.get(task)
    if not r:
        return f"  {task:42s}   (did not run)"
    return (f"  {task:42s} {r['wall_s']:8.1f} s   memory {r.get('peak_anon_mb', 0):7,.0f} MB   "
            f"mapped files {r.get('peak_file_mb', 0):7,.0f} MB   resident {r['peak_rss_mb']:7,.0f} MB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--keep-hf", choices=("both", "true", "false"), default="both")
    parser.add_argument("--llama-convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py, timed on the base")
    parser.add_argument("--keep", action="store_true", help="leave the caches in place afterwards (less the package tar)")
    args = parser.parse_args()

    if not (TOKENIZER / "tokenizer.json").is_file():
        subprocess.run([sys.executable, "-m", "doit", "run", "-f", str(REPO / "dodo.py"), "import"], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
    workdir = REPO / "cache" / f"bench-scale-{args.size}"
    if not (workdir / "base" / "config.json").is_file():
        shutil.rmtree(workdir, ignore_errors=True)
        started = time.perf_counter()
        write_model(workdir / "base", args.size)
        write_adapter(workdir / "adapter", args.size)
        print(f"wrote the synthetic model in {time.perf_counter() - started:.0f} s")
    shards = sorted((workdir / "base").glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    params = sum(int.__mul__(*s) if len(s) == 2 else s[0] for s in tensor_shapes(args.size).values())
    print(f"model: Llama-shaped, {params / 1e9:.2f}B parameters, {model_bytes / 1e9:.2f} GB bf16 in {len(shards)} shards; "
          f"rank-16 LoRA on every projection; {os.cpu_count()} cores")

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        os.sync()
        cp_s = timed(["sh", "-c", f"cp {' '.join(map(str, shards))} {tmp}/ && sync"])
    print(f"cp + sync of the base shards (baseline): {cp_s:.1f} s ({model_bytes / cp_s / 1e6:,.0f} MB/s)")

    modes = {"both": (True, False), "true": (True,), "false": (False,)}[args.keep_hf]
    builds = {}
    for keep_hf in modes:
        result = builds[keep_hf] = build(workdir, keep_hf)
        print(f"\nbuild with [models.merge] keep_hf = {str(keep_hf).lower()}: {result['wall']:.1f} s for the whole `doit`")
        for task in sorted(result["records"], key=lambda t: result["records"][t]["finished"]):
            print(row(result["records"], task))

    first = builds[modes[0]]
    merged_gguf = first["cache"] / "synthetic" / "gguf" / "synthetic-merged.BF16.gguf"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        quantize_s = quantize_alone(merged_gguf, Path(tmp) / "q.gguf")
    print(f"\nllama.cpp's quantizer alone (BF16 -> Q4_K_M, fresh process): {quantize_s:.1f} s")
    if args.llama_convert:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            os.sync()
            convert_s = timed([sys.executable, str(args.llama_convert), str(workdir / "base"), "--outtype", "bf16",
                               "--outfile", f"{tmp}/base.gguf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"llama.cpp's convert_hf_to_gguf.py on the base: {convert_s:.1f} s")

    package = first["cache"] / "synthetic" / "package" / "lora"
    files = [p.name for p in package.iterdir() if p.suffix == ".gguf" or p.name == "LICENSE"]
    for built_tar in package.glob("*.oci.tar"):  # timed already; at 7B two such tars would not fit on the disk
        built_tar.unlink()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        os.sync()
        tar_s = timed(["tar", "-cf", f"{tmp}/files.tar", "-C", str(package), *files])
    print(f"tar of the adapter route's model files ({', '.join(files)}): {tar_s:.1f} s")

    print("\nratios (goal):")
    for keep_hf, result in builds.items():
        r = result["records"]
        if keep_hf:
            route = ["merge:synthetic", "convert:synthetic-merged", "quantize:synthetic-merged-Q4_K_M"]
        else:
            route = ["convert:synthetic-merged", "quantize:synthetic-merged-Q4_K_M"]
        route_s = sum(r[t]["wall_s"] for t in route)
        print(f"  keep_hf = {str(keep_hf).lower():5s}: route C ({' + '.join(t.split(':')[0] for t in route)}) "
              f"{route_s:.1f} s = {route_s / quantize_s:.2f}x the quantizer alone (<= 1.25x); "
              f"manifest {r['manifest:synthetic']['wall_s']:.2f} s (< 2 s); "
              f"adapter-route package {r['package:synthetic-lora']['wall_s']:.1f} s = "
              f"{r['package:synthetic-lora']['wall_s'] / tar_s:.2f}x the tar (<= 1.5x)")
    if len(builds) == 2:
        a, b = (builds[k]["sums"]["gguf/synthetic-merged.BF16.gguf"] for k in (True, False))
        print(f"merged GGUF from merge + convert and from the fused convert: same sha256: {a == b}")
    if not args.keep:
        for result in builds.values():
            shutil.rmtree(result["cache"], ignore_errors=True)


if __name__ == "__main__":
    main()
