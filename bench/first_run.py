"""The first run, as a new user has it: README command 1 on a fresh clone, phase by phase.

    python bench/first_run.py [REV ...]      (default: HEAD; the first REV is the baseline)

For each revision: clone this repository at REV into a temporary folder, then time, with an empty
pip cache (PIP_CACHE_DIR in that folder) and an empty llama.cpp tools folder (MODELMAKE_TOOLS_DIR):
`python3 -m venv .venv`, `pip install torch==2.13.0` (its wheel comes from the machine's disk),
`pip install -e .` (every other package from the registry; llama-cpp-python compiles llama.cpp) and
`doit` (the tools, then the default spec's whole build, to the report). Prints each phase's seconds,
the total, and each revision's total against the first's. About 10 to 15 minutes a revision on 2
cores; nothing else should run meanwhile. The clones are removed afterwards (--keep keeps them).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(command: str, cwd: Path, env: dict, log: Path) -> float:
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {command}\n")
        out.flush()
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"`{command}` failed (exit {done.returncode}); its output: {log}")
    return time.perf_counter() - started


def first_run(rev: str, root: Path) -> dict[str, float]:
    clone = root / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env |= {"PIP_CACHE_DIR": str(root / "pip-cache"), "MODELMAKE_TOOLS_DIR": str(root / "tools"),
            "PATH": f"{clone / '.venv/bin'}:{env['PATH']}"}
    log = root / "first-run.log"
    phases = {"python3 -m venv .venv": "python3 -m venv .venv",
              "pip install torch==2.13.0": "pip install --quiet torch==2.13.0",
              "pip install -e .": "pip install --quiet -e .",
              "doit": "doit"}
    return {name: timed(command, clone, env, log) for name, command in phases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="*", default=["HEAD"])
    parser.add_argument("--keep", action="store_true", help="keep each clone, its venv and its build")
    args = parser.parse_args()
    totals = {}
    for rev in args.revs:
        root = Path(tempfile.mkdtemp(prefix="modelmake-first-run-"))
        commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        print(f"{rev} ({commit}), in {root}:", flush=True)
        phases = first_run(rev, root)
        for name, seconds in phases.items():
            print(f"  {name:28} {seconds:7.1f} s", flush=True)
        totals[rev] = sum(phases.values())
        print(f"  {'first run in all':28} {totals[rev]:7.1f} s ({totals[rev] / 60:.1f} min)", flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    baseline = totals[args.revs[0]]
    if len(totals) > 1:
        for rev, total in totals.items():
            print(f"{rev:12} {total:7.1f} s   {total / baseline:.2f}x {args.revs[0]}")


if __name__ == "__main__":
    main()
