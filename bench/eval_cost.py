"""What quantization costs on the default spec's model, and what measuring it costs.

    doit && python bench/eval_cost.py [--cache cache/smollm2-demo] [--threads 2]

Prints the eval table of the last build (cache/<model>/eval/*.json) with every variant's ratios to
the F16 reference. Then times the eval stage's quality pass for Q4_K_M (both models' forward passes
through llama.cpp, log-softmax, NLL, KL and top-1 in numpy) against a baseline in the same run: the
same forward passes alone, logits copied out and nothing computed on them.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages import evaluate  # noqa: E402

ORDER = ("base", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "lora")


def table(cache: Path) -> None:
    results = {r["variant"]: r for r in (json.loads(p.read_text()) for p in (cache / "eval").glob("*.json"))}
    reference = results["F16"]
    print(f"{'variant':8} {'size MB':>8} {'bpw':>6} {'ppl':>9} {'ans ppl':>8} {'Δppl':>7} {'KL':>8} {'top-1':>6} "
          f"{'pp t/s':>7} {'tg t/s':>7} {'size×':>6} {'pp×':>5} {'tg×':>5}")
    for variant in sorted(results, key=lambda v: ORDER.index(v) if v in ORDER else 3):
        r, q = results[variant], results[variant]["quality"]
        increase = f"{q['perplexity'] / q['reference_perplexity'] - 1:+.2%}" if "reference_perplexity" in q else "—"
        kl = f"{q['kl_divergence']:.5f}" if "kl_divergence" in q else "—"
        top1 = f"{q['top1_agreement']:.1%}" if "top1_agreement" in q else "—"
        print(f"{variant:8} {r['size_bytes'] / 1e6:8.1f} {r['bits_per_weight']:6.2f} {q['perplexity']:9.4f} "
              f"{q.get('answer_perplexity', float('nan')):8.4f} {increase:>7} {kl:>8} {top1:>6} "
              f"{r['speed']['prompt_tokens_per_s']:7.0f} {r['speed']['gen_tokens_per_s']:7.1f} "
              f"{r['size_bytes'] / reference['size_bytes']:6.2f} "
              f"{r['speed']['prompt_tokens_per_s'] / reference['speed']['prompt_tokens_per_s']:5.2f} "
              f"{r['speed']['gen_tokens_per_s'] / reference['speed']['gen_tokens_per_s']:5.2f}")
    speed = reference["speed"]
    print(f"({reference['quality']['scored']} tokens scored, {reference['quality'].get('answer_tokens', 0)} of them "
          f"answers; speed: {speed['threads']} threads, pp{speed['prompt_tokens']} / tg{speed['gen_tokens']}, "
          f"median of {speed['runs']}; ×: against F16)")


def forward_only(job, documents, context, threads) -> None:
    model = evaluate._llama(job.subject, context, threads, logits_all=True)
    reference = evaluate._llama(job.reference, context, threads, logits_all=True)
    for window in evaluate.windows(documents, context):
        evaluate.window_logits(reference, window.tokens)
        evaluate.window_logits(model, window.tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=REPO / "cache/smollm2-demo")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not (args.cache / "eval/F16.json").is_file():
        sys.exit(f"{args.cache}/eval is not built: run `doit` first")
    table(args.cache)

    gguf = args.cache / "gguf"
    f16 = evaluate.Subject(next(gguf.glob("*-merged.F16.gguf"), None) or next(gguf.glob("*.F16.gguf")))
    q4 = evaluate.Subject(f16.model.with_name(f16.model.name.replace(".F16.", ".Q4_K_M.")))
    job = evaluate.Job("bench", "Q4_K_M", q4, f16, args.cache / "eval/heldout.jsonl", "")
    documents = evaluate.tokenize(q4, evaluate.read_documents(job.text), 8192)
    timings = {"forward passes alone (baseline)": [], "eval quality pass": []}
    for _ in range(args.repeat):
        for name, run in (("forward passes alone (baseline)", lambda: forward_only(job, documents, 512, args.threads)),
                          ("eval quality pass", lambda: evaluate.quality(job, documents, 512, args.threads))):
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    baseline = statistics.median(timings["forward passes alone (baseline)"])
    print(f"\nQ4_K_M against F16, {sum(len(d.tokens) for d in documents)} tokens, {args.threads} threads, "
          f"median of {args.repeat}:")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"  {name:32}: {median:6.2f} s  ({median / baseline:.2f}x)")


if __name__ == "__main__":
    main()
