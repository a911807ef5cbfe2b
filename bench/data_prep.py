"""Reading, mixing and tokenizing 100k training records, against one epoch of training on them.

    python bench/data_prep.py [--records 100000] [--base cache/smollm2-demo/base] [--steps 6]

Writes --records conversations in three files of three formats (alpaca, OpenAI messages, ShareGPT:
the demo data's records, each numbered so that no two are alike), mixed with weights 0.5/0.3/0.2
and 10% of each held out, as a spec with [[models.train.datasets]] would. It times what the train
stage does before its first step: reading and checking every record and drawing the mix
(`split_examples`), then rendering each through SmolLM2's chat template and tokenizing it with the
loss mask (`_rows`). The baseline, in the same run: one epoch of the train stage over those rows
on the default spec (SmolLM2-135M-Instruct, batch 8, LoRA r 8), from the median of --steps
measured steps. Goal (issue 30): data preparation under 10% of one epoch.
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages import train  # noqa: E402
from stages.formats import dataset  # noqa: E402
from train_scale import default_train  # noqa: E402  (this folder is first on sys.path)

FORMATS = {"alpaca.jsonl": 0.5, "messages.jsonl": 0.3, "sharegpt.jsonl": 0.2}


def as_format(name: str, prompt: str, answer: str) -> dict:
    if name == "alpaca.jsonl":
        return {"instruction": prompt, "input": "", "output": answer}
    if name == "messages.jsonl":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


def write_sources(folder: Path, records: int) -> list[Path]:
    demo = dataset.read_jsonl(REPO / "data" / "demo.jsonl")
    paths = []
    for name, weight in FORMATS.items():
        lines = []
        for i in range(round(records * weight)):
            turns = demo[i % len(demo)].messages
            prompt = f"{turns[-2]['content']} (record {i})"
            lines.append(json.dumps(as_format(name, prompt, turns[-1]["content"])) + "\n")
        (folder / name).write_text("".join(lines))
        paths.append(folder / name)
    return paths


def step_seconds(base: Path, steps: int) -> float:
    """The median training step of the default spec (its first step, which warms up, left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = default_train(max_steps=steps, eval_every=10_000, checkpoint_every=0)
        train.run(base, Path(tmp) / "adapter", spec, "bench", threads=0)
        log = [json.loads(line) for line in (Path(tmp) / "adapter" / train.LOG).read_text().splitlines()]
    return statistics.median(r["step_s"] for r in log if "step_s" in r and r["step"] > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--base", type=Path, default=REPO / "cache" / "smollm2-demo" / "base")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_sources(Path(tmp), args.records)
        spec = default_train(dataset=None, datasets=[{"path": str(p), "weight": FORMATS[p.name]} for p in paths])
        tokenizer = AutoTokenizer.from_pretrained(args.base)
        started = time.perf_counter()
        split = train.split_examples(spec)
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        rows, _ = train._rows(spec, tokenizer, split)
        tokenize_s = time.perf_counter() - started
    step_s = step_seconds(args.base, args.steps)
    epoch_steps = math.ceil(len(rows) / spec.batch_size)
    epoch_s = epoch_steps * step_s
    prep_s = read_s + tokenize_s
    print(f"{args.records:,} records in 3 files (alpaca, messages, sharegpt), weights 0.5/0.3/0.2, 10% held out of each")
    print(f"read, check and mix ({len(split[0]):,} training, {len(split[1]):,} validation records): {read_s:7.1f} s")
    print(f"chat template, tokenize, loss mask ({len(rows):,} rows, {sum(len(r.ids) for r in rows):,} tokens):"
          f" {tokenize_s:7.1f} s  ({len(rows) / tokenize_s:,.0f} records/s)")
    print(f"one epoch of training (baseline): {epoch_steps:,} steps × {step_s:.2f} s (median of {args.steps - 1}) "
          f"= {epoch_s / 3600:.1f} h")
    print(f"data preparation: {prep_s:.1f} s = {prep_s / epoch_s:.2%} of one epoch (goal: under 10%)")


if __name__ == "__main__":
    main()
