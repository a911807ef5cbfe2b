"""Importance matrix and answer accuracy on the default spec, in one run:
- the default build (cold, `cache=off`, tools already built by `doit tools`), timed end to end, and
  what its imatrix tasks (calibration text + llama-imatrix) and its answer generation cost of it;
- imatrix vs plain for Q4_K_M, Q3_K_M and IQ3_XXS, quantized from the build's F16: size, KL and
  top-1 against F16 on the held-out text, exact match and chrF on the held-out prompts.

    python bench/imatrix_accuracy.py [--keep] [--built CACHE]

--built takes a cache of the default spec that is already built (its tasks' own run records then
give the build's time, the sum of its tasks) instead of building one.

Works in cache/bench-imatrix/ (a copy of models.toml and data/). About 8 minutes on 2 cores.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages import evaluate, quantize  # noqa: E402
from stages.ground import runlog  # noqa: E402
from stages.ground.spec import EvalSpec  # noqa: E402

TYPES = ("Q4_K_M", "Q3_K_M", "IQ3_XXS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep cache/bench-imatrix afterwards")
    parser.add_argument("--built", type=Path, help="the cache folder of a built default spec to measure")
    args = parser.parse_args()
    work = REPO / "cache" / "bench-imatrix"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = args.built or work / "cache"
    if not args.built:
        shutil.copy(REPO / "models.toml", work / "models.toml")
        shutil.copytree(REPO / "data", work / "data")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "doit", "run", "-f", str(REPO / "dodo.py"), "cache=off",
                        f"spec={work / 'models.toml'}"], cwd=REPO, check=True, capture_output=True)
        build_s = time.perf_counter() - started
    records = runlog.read_records(cache)
    if args.built:
        build_s = sum(r["wall_s"] for r in records.values())
    imatrix_s = sum(r["wall_s"] for t, r in records.items() if t.endswith((".imatrix", ".calibration")))
    eval_s = sum(r["wall_s"] for t, r in records.items() if t.startswith("eval:"))

    model = cache / "smollm2-demo"
    f16, imatrix = model / "gguf/smollm2-demo-merged.F16.gguf", model / "imatrix/smollm2-demo-merged.imatrix.gguf"
    heldout, prompts, spec = model / "eval/heldout.jsonl", model / "eval/prompts.jsonl", EvalSpec()

    answers_s, evaluated = 0.0, sorted((model / "eval").glob("*.json"))  # every variant the build answered with
    for path in evaluated:
        result = json.loads(path.read_text())
        variant = result["variant"]
        subject = evaluate.Subject(*[model / f for f in result["files"]])
        tick = time.perf_counter()
        evaluate.answer_accuracy(evaluate.Job("m", variant, subject, None, None, "", prompts), spec, 0)
        answers_s += time.perf_counter() - tick

    how = "the sum of its tasks' last runs" if args.built else "cache=off, end to end"
    print(f"default build ({how}): {build_s:.1f} s")
    print(f"  imatrix (calibration text + llama-imatrix): {imatrix_s:.1f} s = {imatrix_s / build_s:.1%} of the build")
    print(f"  answer generation and scoring, {len(evaluated)} variants: {answers_s:.1f} s = {answers_s / build_s:.1%} of the build "
          f"(all eval tasks: {eval_s:.1f} s)")
    print()
    print(f"{'type':8} {'matrix':7} {'MB':>7} {'KL':>8} {'top-1':>6} {'exact':>6} {'chrF':>5}")
    documents = evaluate.tokenize(evaluate.Subject(f16), evaluate.read_documents(heldout), spec.max_tokens)
    for quant in TYPES:
        for with_matrix in (False, True):
            out = work / f"{quant}.{'imatrix' if with_matrix else 'plain'}.gguf"
            if with_matrix:
                quantize.run_with_imatrix(f16, out, quant, imatrix)
            else:
                quantize.run(f16, out, quant)
            job = evaluate.Job("m", quant, evaluate.Subject(out), evaluate.Subject(f16), heldout, "", prompts)
            quality = evaluate.quality(job, documents, spec.context, 0)
            answered = evaluate.answer_accuracy(job, spec, 0)
            print(f"{quant:8} {'yes' if with_matrix else 'no':7} {out.stat().st_size / 1e6:7.1f} "
                  f"{quality['kl_divergence']:8.5f} {quality['top1_agreement']:6.1%} "
                  f"{answered['exact_match']:6.1%} {answered['chrf']:5.1f}", flush=True)
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
