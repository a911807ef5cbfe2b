"""The action cache on the default spec: what recording costs a cold build, what a switch-back
restore costs against rebuilding, and what a fresh clone with a warm remote costs against a cold
build, all in the same run.

    python bench/cache_restore.py [--keep]

Works in cache/bench-cache/ (a copy of models.toml and data/), with a docker-registry on
127.0.0.1 of its own (Debian's docker-registry and skopeo must be installed). Steps, each a
separate `doit` process, timed end to end:
  1. cold build with `cache=off` (baseline: no store at all)
  2. cold build with the local store (recording everything, no remote): the recording overhead
  3. lora.r 8 → 16 (a rebuild of train and everything after it), then back to 8: the restore
  4. `doit cache-push` to the registry (MB/s)
  5. a fresh clone, empty cache and store, the same registry: every task restored from it
About 12 minutes on 2 cores.
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
sys.path.insert(0, str(REPO / "tests"))

from helpers import Registry  # noqa: E402  (the tests' registry: docker-registry on a free port)

ACTIONS = ("train:", "adapter:", "merge:", "convert:", "quantize:")


def doit(spec: Path, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "doit", "run", "-f", str(REPO / "dodo.py"), *args, f"spec={spec}"],
                            cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"doit {' '.join(args)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def workspace(folder: Path, extra: str = "") -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(REPO / "data", folder / "data")
    spec = folder / "models.toml"
    spec.write_text((REPO / "models.toml").read_text() + extra)
    return spec


def runs(spec: Path) -> dict[str, dict]:
    return {r["task"]: r for r in (json.loads(p.read_text()) for p in (spec.parent / "cache/.runs").glob("*.json"))}


def restored_actions(spec: Path) -> tuple[int, int, float]:
    """(actions restored, actions run, seconds spent restoring) in the last build."""
    records = [r for r in runs(spec).values() if r["task"].startswith(ACTIONS)]
    last = max(r["build"] for r in runs(spec).values())
    in_last = [r for r in records if r["build"] == last]
    return (sum(1 for r in in_last if r.get("restored")), sum(1 for r in in_last if not r.get("restored")),
            sum(r.get("restore_s", 0) for r in in_last))


def recording_cost(cache_dir: Path) -> tuple[float, float]:
    """(seconds to record every entry of a built cache into an empty store, seconds the build's tasks
    ran): the recording a cold build does, replayed apart from the noise of the build itself. The
    build had just hashed each output (record_outputs), so the replay hashes first, untimed."""
    from stages.ground.store import Store
    from stages.ground.hashing import file_blake3

    built = Store(cache_dir / ".store")
    replay = Store(cache_dir / ".store-replay")
    shutil.rmtree(replay.root, ignore_errors=True)
    entries = [entry for _, entry in built.entries()]
    for entry in entries:
        for path in entry.files:
            file_blake3(cache_dir / path)
    started = time.perf_counter()
    for entry in entries:
        replay.record(entry.key, entry.task, cache_dir, [cache_dir / path for path in entry.files], entry.run)
    seconds = time.perf_counter() - started
    shutil.rmtree(replay.root)
    return seconds, sum(entry.run.get("wall_s", 0) for entry in entries)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep cache/bench-cache/ afterwards")
    parser.add_argument("--recording-only", action="store_true",
                        help="only replay the recording of the repo's own built cache/ (build it first)")
    args = parser.parse_args()
    if args.recording_only:
        replay, tasks_s = recording_cost(REPO / "cache")
        print(f"recording every entry of cache/ again: {replay:.3f} s ({replay / tasks_s:.3%} of the {tasks_s:.1f} s "
              "its tasks ran)")
        return
    root = REPO / "cache" / "bench-cache"
    with Registry(Path(root.parent / "bench-cache-registry")) as registry:
        remote = f'\n[cache]\nremote = "{registry.host}/bench-cache"\n'

        spec = workspace(root / "off")
        off, _ = doit(spec, "cache=off")
        spec = workspace(root / "on")
        on, _ = doit(spec)
        store = root / "on/cache/.store"
        replay, tasks_s = recording_cost(root / "on/cache")
        print(f"cold build, cache=off (baseline)   : {off:7.1f} s")
        print(f"cold build, recording in the store : {on:7.1f} s  ({on / off:.3f}x; goal < 1.05x)")
        print(f"  recording alone, replayed        : {replay:7.3f} s  ({replay / tasks_s:.3%} of the "
              f"{tasks_s:.1f} s its tasks ran)")

        spec.write_text(spec.read_text().replace("r = 8", "r = 16"))
        rebuild, _ = doit(spec)
        spec.write_text(spec.read_text().replace("r = 16", "r = 8"))
        back, out = doit(spec)
        hits, ran, restore_s = restored_actions(spec)
        print(f"lora.r 8 -> 16 (rebuild from train) : {rebuild:7.1f} s")
        print(f"lora.r 16 -> 8 (switch back)        : {back:7.1f} s  ({back / rebuild:.1%} of the rebuild; "
              f"goal < 2 s and < 2%); {hits} actions restored, {ran} run, {restore_s:.2f} s inside the restores")

        spec.write_text(spec.read_text() + remote)  # [cache] is no task's parameter: nothing goes stale
        push, out = doit(spec, "cache-push")
        size = sum(p.stat().st_size for p in (store / "blobs").glob("*/*"))
        print(f"doit cache-push                     : {push:7.1f} s  ({size / 1e6:,.0f} MB of blobs, "
              f"{size / 1e6 / push:,.0f} MB/s)")

        clone = workspace(root / "clone", remote)
        fresh, out = doit(clone)
        hits, ran, restore_s = restored_actions(clone)
        pulled = [line for line in out.splitlines() if line.startswith("pulled ")]
        mb = sum(float(line.split(": ")[1].split(" MB")[0].replace(",", "")) for line in pulled)
        pull_s = sum(float(line.split(" MB in ")[1].split(" s")[0]) for line in pulled)
        print(f"fresh clone, warm remote            : {fresh:7.1f} s  ({fresh / on:.1%} of the cold build; goal < 30 s); "
              f"{hits} actions restored, {ran} run; pulled {mb:,.0f} MB in {pull_s:.1f} s ({mb / pull_s:,.0f} MB/s)")
        same = (root / "clone/cache/smollm2-demo/SHA256SUMS").read_bytes() == \
            (root / "on/cache/smollm2-demo/SHA256SUMS").read_bytes()
        print(f"SHA256SUMS of the clone equal the cold build's: {same}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root.parent / "bench-cache-registry", ignore_errors=True)


if __name__ == "__main__":
    main()
