"""Training at scale on this machine: processes, checkpoints and gradient checkpointing.

    python bench/train_scale.py [--steps 16] [--base cache/smollm2-demo/base]

On the default spec's model and data (SmolLM2-135M-Instruct, batch 8, LoRA r 8 on every
projection), each configuration runs the train stage in a fresh Python process, so peak memory
is that run's alone:
- 1 process against 2 (DDP, gloo): tokens/s (median step) and peak RSS (of each training process);
- checkpoints: the same run with none, and with one every 4 steps; the cost of one checkpoint,
  and its share of the run at that cadence and at the default (every 10 minutes);
- gradient checkpointing off and on: peak RSS and tokens/s, and the memory estimate beside each.
On a CUDA machine it then measures a Llama-7B shape (random weights made there, seq 2048, batch
4): a forward pass alone as the baseline, and bf16 LoRA, + gradient checkpointing, and QLoRA, each
with its peak GPU memory. Where there is no GPU those rows are printed as unmeasured. (The GPU part
has not run yet: no GPU has been lent since it was written.)
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


def one_run(base: Path, work: Path, fields: dict, steps: int) -> dict:
    """Run in this process (the child): train, then report the figures as JSON."""
    from stages import train
    from stages.ground.spec import load_spec

    model = load_spec(REPO / "models.toml").models[0]
    spec = model.train.model_copy(update={"max_steps": steps, "eval_every": 10_000, "checkpoint_every": 0,
                                          "gradient_checkpointing": False} | fields)
    spec = type(spec).model_validate(spec.model_dump())  # validated again, as a spec would be
    started = time.perf_counter()
    train.run(base, work / "adapter", spec, "bench", threads=0, work=work / "adapter.work", inputs=[base / "config.json"])
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (work / "adapter" / train.LOG).read_text().splitlines()]
    steps_run = [r for r in log if "tokens_per_s" in r]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ranks = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"wall_s": wall, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps_run[1:]),
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
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.base, args.work, json.loads(args.one), args.steps)))
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
        gpu_rows(Path(tmp), args.steps)


GPU_CONFIGS = {
    "bf16 LoRA": {"dtype": "bfloat16", "gradient_checkpointing": False},
    "bf16 LoRA + gradient checkpointing": {"dtype": "bfloat16", "gradient_checkpointing": True},
    "QLoRA (+ gradient checkpointing)": {"qlora": True, "gradient_checkpointing": True},
}


def gpu_rows(tmp: Path, steps: int) -> None:
    """Llama 2 7B's layers with random weights (made here: weights cannot travel to a lent GPU),
    SmolLM2's tokenizer (so the vocabulary is 49,152), rows of 2048 packed tokens, batch 4."""
    import torch
    import transformers

    from stages.formats import dataset

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import save_smollm_tokenizer

    base = tmp / "llama-7b"
    save_smollm_tokenizer(base)
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    from stages import train
    from stages.ground.spec import load_spec

    spec = load_spec(REPO / "models.toml").models[0].train.model_copy(update={"max_seq_len": 2048, "packing": True,
                                                                              "batch_size": 4})
    rows = train.make_rows([train.encode(e, tokenizer, spec.template, spec.system)
                            for e in dataset.read_jsonl(spec.dataset)], 2048, True)
    batch = {k: v.cuda() for k, v in train.collate(rows[:4], tokenizer.eos_token_id).items()}
    model.eval()
    with torch.no_grad():
        model(**batch)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            model(**batch)
        torch.cuda.synchronize()
    forward = steps * int(batch["attention_mask"].sum()) / (time.perf_counter() - started)
    del model
    torch.cuda.empty_cache()
    print(f"\nGPU: {torch.cuda.get_device_name()}, Llama-7B shape, seq 2048, batch 4")
    print(f"{'forward pass alone (baseline)':36s} {forward:8,.0f} tokens/s")
    for name, fields in GPU_CONFIGS.items():
        with tempfile.TemporaryDirectory() as work:
            fields = {"max_seq_len": 2048, "packing": True, "batch_size": 4, "device": "cuda", **fields}
            run = subprocess.run([sys.executable, __file__, "--one", json.dumps(fields), "--steps", str(steps),
                                  "--base", str(base), "--work", work], capture_output=True, text=True, check=False)
            if run.returncode:
                print(f"{name:36s} failed: {(run.stdout + run.stderr).strip().splitlines()[-1]}")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{name:36s} {r['tokens_per_s']:8,.0f} tokens/s ({r['tokens_per_s'] / forward:.2f}x the forward "
                  f"pass)  peak GPU memory {r['peak_mb']:7,.0f} MB (estimate {r['estimated_mb']:,.0f} MB)")


if __name__ == "__main__":
    main()
