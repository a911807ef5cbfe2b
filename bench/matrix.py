"""A 2x2 [models.matrix] on the default model: serial `doit` against `doit -n 2`, and against four
separate specs (what a user without a matrix writes: each variant imports, converts and measures
its base again).

    python bench/matrix.py [--steps 10] [--work /tmp/matrix-bench] [--only serial,parallel,separate,ray]

`ray`: the matrix with `[build] executor = "ray"` and `doit -n 2` on a Ray cluster of two nodes on
this machine (`ray start`, one CPU each, as the tests start it), against `doit -n 2` here; the run
records give each task's dispatch overhead (its time in doit less its time in the worker).

Every run starts from an empty cache and an empty action cache (so nothing is restored), with the
llama.cpp tools already built (`doit tools`). The spec is the repo's models.toml with
`train.lora.r` = [8, 16] × `train.learning_rate` = [3e-4, 1e-3]; `--steps` caps each training
(`train.max_steps`) so the four trainings fit a benchmark, and `--quick` releases Q4_K_M only. The
figures: wall time of each way, its ratio to serial, how many tasks each ran, and where the shared
tasks' time went.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages.ground import runlog  # noqa: E402

RANKS, RATES = (8, 16), ("3e-4", "1e-3")
MATRIX = f"""
[models.matrix]
"train.lora.r" = [{", ".join(map(str, RANKS))}]
"train.learning_rate" = [{", ".join(RATES)}]
"""


def default_spec(steps: int, quick: bool) -> str:
    """The repo's models.toml, its training capped at `steps`, and with --quick one release."""
    text = (REPO / "models.toml").read_text(encoding="utf-8")
    text = text.replace("[models.train]\n", f"[models.train]\nmax_steps = {steps}\n", 1)
    if quick:
        text = text.replace('types = ["Q4_K_M", "Q8_0"]', 'types = ["Q4_K_M"]')
        text = text.replace('compare_without_imatrix = ["Q4_K_M"]', "compare_without_imatrix = []")
    return text


def workspace(folder: Path, spec_text: str) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copytree(REPO / "data", folder / "data")
    spec = folder / "models.toml"
    spec.write_text(spec_text, encoding="utf-8")
    return spec


def build(spec: Path, *args: str) -> tuple[float, dict]:
    """Wall time of `doit` on the spec, and its run records."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), *args, f"spec={spec}"],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"doit failed on {spec}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return wall, runlog.read_records(spec.parent / "cache")


def matrix_way(work: Path, name: str, text: str, *args: str) -> dict:
    wall, records = build(workspace(work / name, text), *args)
    return {"wall": wall, "records": records}


def separate_way(work: Path, text: str) -> dict:
    """Four specs, one per combination, built one after the other."""
    wall, records = 0.0, {}
    for r in RANKS:
        for rate in RATES:
            one = text.replace("r = 8\n", f"r = {r}\n", 1).replace("learning_rate = 3e-4", f"learning_rate = {rate}", 1)
            seconds, found = build(workspace(work / f"separate-r{r}-lr{rate}", one))
            wall += seconds
            records |= {f"{task} (r{r}, lr {rate})": record for task, record in found.items()}
    return {"wall": wall, "records": records}


def ray_way(work: Path, text: str) -> dict:
    """The matrix on a two-node Ray cluster on this machine, `-n 2`."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import RayCluster

    (work / "ray-cluster").mkdir(parents=True, exist_ok=True)
    with RayCluster(work / "ray-cluster") as cluster:
        return matrix_way(work, "ray", text + f'\n[build]\nexecutor = "ray"\naddress = "{cluster.address}"\n', "-n", "2")


def dispatch_overhead(records: dict) -> str:
    """Per task on the cluster: its time in doit less its time in the worker (inputs filed, the Ray
    task submitted and waited for, outputs restored)."""
    spent = sorted(r["wall_s"] - r["worker_wall_s"] for r in records.values() if "worker_wall_s" in r)
    if not spent:
        return ""
    total = sum(spent)
    return (f"dispatch overhead over {len(spent)} tasks on the cluster: mean {total / len(spent):.2f} s, median "
            f"{spent[len(spent) // 2]:.2f} s, max {spent[-1]:.2f} s; {total:.1f} s in all")


def shared_seconds(records: dict) -> float:
    """Time spent on what a matrix makes once: the import, the base's GGUF and eval, the data files."""
    shared = ("import:", "convert:smollm2-demo ", "eval:smollm2-demo-base", "eval:smollm2-demo.", "quantize:smollm2-demo.")
    return sum(r["wall_s"] for task, r in records.items() if task.startswith(shared) or task == "convert:smollm2-demo")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="train.max_steps of every variant (default 10)")
    parser.add_argument("--quick", action="store_true", help="release Q4_K_M only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/matrix-bench"))
    parser.add_argument("--only", default="serial,parallel,separate")
    args = parser.parse_args()
    single = default_spec(args.steps, args.quick)
    text = single + MATRIX
    ways = {}
    for way in args.only.split(","):
        print(f"building: {way} …", flush=True)
        if way == "serial":
            ways["matrix, serial `doit`"] = matrix_way(args.work, "serial", text)
        elif way == "parallel":
            ways["matrix, `doit -n 2`"] = matrix_way(args.work, "parallel", text, "-n", "2")
        elif way == "ray":
            ways["matrix, `doit -n 2` on a two-node Ray cluster"] = ray_way(args.work, text)
        elif way == "separate":
            ways["four separate specs, one after another"] = separate_way(args.work, single)
    baseline = next(iter(ways.values()))["wall"]
    print(f"\n2x2 matrix on the default model (train.max_steps = {args.steps}{', Q4_K_M only' if args.quick else ''}), "
          f"{os.cpu_count()} cores\n")
    print("| way | wall time | vs the first row | tasks run | time in tasks | of which shared stages |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, way in ways.items():
        records = way["records"]
        in_tasks = sum(r["wall_s"] for r in records.values())
        print(f"| {name} | {way['wall']:.1f} s | {way['wall'] / baseline:.2f}× | {len(records)} | {in_tasks:.1f} s | "
              f"{shared_seconds(records):.1f} s |")
    for name, way in ways.items():
        overhead = dispatch_overhead(way["records"])
        if overhead:
            print(f"\n{name}: {overhead} ({100 * sum(r['wall_s'] - r['worker_wall_s'] for r in way['records'].values() if 'worker_wall_s' in r) / way['wall']:.1f}% of its wall time)")
    print("\n" + json.dumps({name: round(way["wall"], 1) for name, way in ways.items()}))


if __name__ == "__main__":
    main()
