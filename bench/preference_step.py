"""A DPO and an ORPO step against an SFT step, on the default spec's model and data.

    python bench/preference_step.py [--steps 8] [--base cache/smollm2-demo/base]

The pairs are data/demo.jsonl's records: the chosen answer is the record's own, the rejected one
the next record's answer, after the same prompt. Each method trains `--steps` steps of batch 8 in
a fresh Python process (so the peak RSS is its own), the default spec's other settings unchanged
(max_seq_len 256, LoRA r 8 on every projection):
- SFT on the chosen conversations (8 rows a step): the baseline;
- DPO on the pairs (8 pairs: 16 rows a step), and the one forward over every pair it makes before
  the first step to score the reference;
- ORPO on the same pairs.
Printed: the median step time, its ratio to SFT's, peak RSS and the stage's memory estimate.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train_scale import base_folder, default_train  # noqa: E402


def write_pairs(path: Path) -> int:
    """data/demo.jsonl as preference pairs: each record's answer chosen, the next record's rejected."""
    records = [json.loads(line) for line in (REPO / "data/demo.jsonl").read_text().splitlines() if line.strip()]
    with path.open("w") as out:
        for record, other in zip(records, records[1:] + records[:1]):
            prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            out.write(json.dumps({"prompt": prompt, "chosen": record["output"], "rejected": other["output"]}) + "\n")
    return len(records)


def one_run(base: Path, work: Path, method: str, steps: int) -> dict:
    """In the child: train `steps` steps with `method`, then report the figures as JSON."""
    import resource

    from stages import train

    fields = {"max_steps": steps, "eval_every": 10_000, "checkpoint_every": 0, "validation": 0.0}
    if method != "sft":
        fields |= {"dataset": str(work / "pairs.jsonl"), "method": method}
    spec = default_train(**fields)
    started = time.perf_counter()
    train.run(base, work / "adapter", spec, "bench", threads=0)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (work / "adapter" / train.LOG).read_text().splitlines()]
    steps_run = [r for r in log if "step_s" in r]
    return {"step_s": statistics.median(r["step_s"] for r in steps_run[1:]), "wall_s": wall,
            "train_s": sum(r["step_s"] for r in steps_run), "estimated_mb": log[0]["estimated_memory_mb"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps_run[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--base", type=Path, help="the default spec's imported base (default: import it now)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.base, args.work, args.one, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = base_folder(args.base, tmp)
        pairs = write_pairs(tmp / "pairs.jsonl")
        print(f"{pairs} pairs from data/demo.jsonl; {args.steps} steps of batch 8 each, SmolLM2-135M-Instruct, CPU")
        results = {}
        for method in ("sft", "dpo", "orpo"):
            work = tmp / method
            work.mkdir()
            (work / "pairs.jsonl").write_bytes((tmp / "pairs.jsonl").read_bytes())
            done = subprocess.run([sys.executable, __file__, "--one", method, "--steps", str(args.steps),
                                   "--base", str(base), "--work", str(work)], capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        sft = results["sft"]
        print(f"{'method':<6} {'step s':>8} {'vs SFT':>7} {'tokens/s':>9} {'peak RSS MB':>12} {'estimate MB':>12} "
              f"{'outside steps s':>16}")
        for method, r in results.items():
            # Wall time outside the steps: loading, the reference's forward (DPO), saving.
            print(f"{method:<6} {r['step_s']:>8.3f} {r['step_s'] / sft['step_s']:>6.2f}x {r['tokens_per_s']:>9,.0f} "
                  f"{r['peak_rss_mb']:>12,.0f} {r['estimated_mb']:>12,.0f} {r['wall_s'] - r['train_s']:>16.1f}")


if __name__ == "__main__":
    main()
