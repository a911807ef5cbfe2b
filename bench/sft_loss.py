"""A LoRA training step's time with the output layer at every position, against at the label positions only.

    python bench/sft_loss.py [--steps 12] [--base cache/smollm2-demo/base]

On data/demo.jsonl as models.toml trains it (batch 8, LoRA r 8 on every projection, float32): each
step is a forward and a backward pass over one batch. Baseline, in the same run and on the same
batches: transformers' own loss from `labels`, which projects every position onto the vocabulary.
Against it: the train stage's `sft_loss`, which projects only the positions that predict an answer
token (`logits_to_keep`). Prints the median step of each, their ratio, and the largest difference
between the two losses (the same loss, computed from fewer logits).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages import train  # noqa: E402
from stages.formats import dataset  # noqa: E402
from stages.ground.spec import load_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--base", type=Path, default=REPO / "cache/smollm2-demo/base")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = load_spec(REPO / "models.toml").models[0].train
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    rows = [train.encode(e, tokenizer, spec.template, spec.system) for e in dataset.read_jsonl(spec.dataset)]
    batches = [train.collate(b, tokenizer.pad_token_id) for b in train.batches(rows, spec.batch_size, None)]
    batches = (batches * (args.steps // len(batches) + 1))[:args.steps]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    labels = sum(int((b["labels"][:, 1:] != train.IGNORE).sum()) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"{args.base.name}: {len(batches)} batches of {spec.batch_size}, {tokens} tokens, {labels} of them "
          f"answer tokens ({labels / tokens:.0%}), {torch.get_num_threads()} threads")

    ways = {"every position (transformers' loss from labels)": lambda b: model(**b).loss,
            "label positions only (train.sft_loss)": lambda b: train.sft_loss(model, b)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    largest_gap = 0.0
    for batch in batches:  # the two ways alternate, batch by batch, so neither gets a quieter machine
        losses = []
        for name, loss_of in ways.items():
            started = time.perf_counter()
            loss = loss_of(batch)
            loss.backward()
            times[name].append(time.perf_counter() - started)
            model.zero_grad()
            losses.append(loss.item())
        largest_gap = max(largest_gap, abs(losses[0] - losses[1]))
    baseline = statistics.median(times[next(iter(ways))][1:])
    for name, measured in times.items():
        median = statistics.median(measured[1:])  # the first step of each warms up
        print(f"{name:50s} {median:6.3f} s a step   {median / baseline:.2f}x")
    print(f"largest difference between the two losses: {largest_gap:.2e}")


if __name__ == "__main__":
    main()
