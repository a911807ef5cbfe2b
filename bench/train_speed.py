"""Train throughput and memory for the default spec's model and data.

    python bench/train_speed.py [--steps 12] [--base cache/smollm2-demo/base] [--device auto|cpu|cuda|mps]
                                [--random-init]

Runs the train stage for --steps steps on data/demo.jsonl (batch 8, LoRA r 8 on every
projection, as models.toml) and reports the median tokens/s and peak memory from its log.
Baseline in the same run: a forward pass alone (no grad, no LoRA) over the same batches, on
the same device and dtype. --random-init trains a model of the base's config with random
weights (seed 0), for a machine that has the base's config and tokenizer but not its weights.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages import train  # noqa: E402
from stages.formats import dataset  # noqa: E402
from stages.ground.device import pick_device  # noqa: E402
from stages.ground.spec import load_spec  # noqa: E402


def forward_tokens_per_s(base: Path, spec, steps: int, device: str, dtype) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
    rows = [train.encode(e, tokenizer, spec.template, spec.system) for e in dataset.read_jsonl(spec.dataset)]
    speeds = []
    with torch.no_grad():
        for batch in train.batches(rows, spec.batch_size, None)[:steps]:
            tensors = {k: v.to(device) for k, v in train.collate(batch, tokenizer.pad_token_id).items()}
            start = time.perf_counter()
            model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"])
            if device == "cuda":
                torch.cuda.synchronize()
            speeds.append(int(tensors["attention_mask"].sum()) / (time.perf_counter() - start))
    return statistics.median(speeds)


def random_copy(base: Path, out: Path) -> Path:
    """The base's config and tokenizer with random weights (seed 0)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True)
    for item in base.iterdir():
        if item.suffix in (".json", ".jinja") and item.name != "model.safetensors.index.json":
            shutil.copy(item, out / item.name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).save_pretrained(out)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--base", type=Path, default=REPO / "cache/smollm2-demo/base")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--random-init", action="store_true")
    args = parser.parse_args()
    if not (args.base / "config.json").is_file():
        sys.exit(f"{args.base} is not built: run `doit import` first")
    spec = load_spec(REPO / "models.toml").models[0].train.model_copy(update={
        "max_steps": args.steps, "eval_every": 10**6, "device": args.device})
    device = pick_device(spec.device)
    dtype = train.pick_dtype(spec.dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        base = random_copy(args.base, Path(tmp) / "base") if args.random_init else args.base
        train.run(base, Path(tmp) / "adapter", spec, "bench", threads=0)
        log = [json.loads(line) for line in (Path(tmp) / "adapter" / train.LOG).read_text().splitlines()]
        forward_speed = forward_tokens_per_s(base, spec, args.steps, device, dtype)
    steps = [row for row in log if row["step"] > 1]  # step 1 pays for warm-up
    train_speed = statistics.median(row["tokens_per_s"] for row in steps)
    peak = max(row["peak_memory_mb"] for row in steps)
    print(f"model {args.base}{' (random weights)' if args.random_init else ''}, device {device}, "
          f"{str(dtype).removeprefix('torch.')}, batch {spec.batch_size}, LoRA r {spec.lora.r}, "
          f"{len(steps)} steps timed (median)")
    print(f"forward only (baseline): {forward_speed:7.0f} tokens/s")
    print(f"LoRA training step     : {train_speed:7.0f} tokens/s  ({train_speed / forward_speed:.2f}x the forward pass)")
    memory = "peak CUDA memory" if device == "cuda" else "peak memory (RSS)"
    print(f"{memory:<23}: {peak:7.0f} MB")


if __name__ == "__main__":
    main()
