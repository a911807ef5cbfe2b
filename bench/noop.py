"""No-op `doit` on a fully built spec: the wall time of finding that nothing is stale.

    python bench/noop.py [SPEC] [--repeat 10]

Builds SPEC first if needed (default: models.toml). Baseline in the same run: starting
doit itself (`python -m doit --version`), the floor under any doit command.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def median_seconds(cmd, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default=str(REPO / "models.toml"))
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    doit = [sys.executable, "-m", "doit"]
    subprocess.run([*doit, "-f", str(REPO / "dodo.py"), f"spec={args.spec}"], cwd=REPO, check=True)

    noop = median_seconds([*doit, "-f", str(REPO / "dodo.py"), f"spec={args.spec}"], args.repeat)
    listing = median_seconds([*doit, "list", "-f", str(REPO / "dodo.py"), f"spec={args.spec}"], args.repeat)
    floor = median_seconds([*doit, "--version"], args.repeat)
    print(f"spec: {args.spec}, median of {args.repeat}")
    print(f"doit --version (baseline): {floor:.3f} s")
    print(f"doit list               : {listing:.3f} s  ({listing / floor:.2f}x baseline)")
    print(f"no-op doit              : {noop:.3f} s  ({noop / floor:.2f}x baseline; goal < 1 s)")


if __name__ == "__main__":
    main()
