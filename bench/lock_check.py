"""`doit lock` and `doit check` on a built spec against a no-op `doit` in the same run.

    python bench/lock_check.py [SPEC] [--repeat 5]
    python bench/lock_check.py --synthetic-layers 62 [--shards 3] [--repeat 5]

SPEC defaults to models.toml (built first if needed). --synthetic-layers writes a random bf16
llama of that many layers (62: about 3.0B parameters, 6 GB in hub-style shards; the SmolLM2
tokenizer of cache/smollm2-demo/base) into cache/bench-lock/, with a spec that converts it to
BF16 and quantizes Q4_K_M, builds it once, then measures. Both commands read the digests the
build recorded (manifest.json), so they should cost about what a no-op does whatever the size
(goal: both under 1.5x the no-op). The bytes each command reads (rchar of /proc/self/io, the page cache
included) show that no multi-GB file is re-read.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

SYNTHETIC_SPEC = """
[[models]]
name = "synthetic"
base = "base"
outtype = "bf16"
quantize = ["Q4_K_M"]

[models.eval]  # speed only (there is no held-out text): keep the one-off build short
speed_prompt = 16
speed_tokens = 4
speed_runs = 1
"""


def doit(spec: Path, *task: str) -> list[str]:
    return [sys.executable, "-m", "doit", "run", "-f", str(REPO / "dodo.py"), *task, f"spec={spec}"]


def measured(cmd: list[str], repeat: int) -> tuple[float, float]:
    """(median seconds, median MB the doit process read through read(), page cache or not)."""
    times, reads = [], []
    # doit runs inside the wrapper, so /proc/self/io's rchar counts every byte it read.
    wrapper = ("import re, sys; from doit.doit_cmd import DoitMain; from doit.cmd_base import DodoTaskLoader; "
               "code = DoitMain(DodoTaskLoader()).run(sys.argv[4:]); "
               "print(re.search(r'rchar: (\\d+)', open('/proc/self/io').read()).group(1)); sys.exit(code)")
    for _ in range(repeat):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout
        times.append(time.perf_counter() - start)
        reads.append(int(out.split()[-1]) / 1e6)
    return statistics.median(times), statistics.median(reads)


def synthetic_spec(layers: int, shards: int) -> Path:
    from merge_memory import write_sharded_model

    folder = REPO / "cache" / "bench-lock"
    spec = folder / "models.toml"
    if not (folder / "base" / "config.json").is_file():
        write_sharded_model(folder / "base", REPO / "cache/smollm2-demo/base", layers, shards)
    spec.write_text(SYNTHETIC_SPEC)
    return spec


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default=str(REPO / "models.toml"))
    parser.add_argument("--synthetic-layers", type=int, default=0)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    spec = synthetic_spec(args.synthetic_layers, args.shards) if args.synthetic_layers else Path(args.spec)

    started = time.perf_counter()
    subprocess.run(doit(spec, "lock"), cwd=REPO, check=True, capture_output=True)  # builds what is stale first
    build_s = time.perf_counter() - started
    files = {(st.st_dev, st.st_ino): st.st_size for p in (spec.parent / "cache").rglob("*")
             if p.is_file() and (st := p.stat())}  # by inode: the action cache's blobs are hard links
    sizes = sum(files.values()) / 1e9

    noop = measured(doit(spec), args.repeat)
    lock = measured(doit(spec, "lock"), args.repeat)
    check = measured(doit(spec, "check"), args.repeat)
    print(f"spec: {spec} (first build + lock {build_s:.0f} s; its cache holds {sizes:.1f} GB); median of {args.repeat}")
    print(f"no-op doit (baseline): {noop[0]:.3f} s, {noop[1]:.1f} MB read")
    for name, (seconds, read_mb) in (("doit lock", lock), ("doit check", check)):
        print(f"{name:21s}: {seconds:.3f} s, {read_mb:.1f} MB read  ({seconds / noop[0]:.2f}x the no-op; goal < 1.5x)")


if __name__ == "__main__":
    main()
