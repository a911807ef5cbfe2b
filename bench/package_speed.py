"""Package time for the default model against a plain `tar` of the same files, and push / pull
throughput to a local registry (Debian's docker-registry on 127.0.0.1, via skopeo).

    python bench/package_speed.py [--variant Q4_K_M] [--repeat 5]

Builds the default spec first if needed. The package stage runs in this process with no hash
remembered from an earlier stage (a cold start, as `doit package:…` alone); the baseline is
`tar -cf` of the files the package ships (GGUF, LICENSE, chat template), page cache warm for both.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from stages import package  # noqa: E402
from stages.ground import hashing, registry  # noqa: E402
from stages.ground.spec import load_spec  # noqa: E402


def timed(func, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="Q4_K_M")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py")], cwd=REPO, check=True,
                   capture_output=True)
    spec = load_spec(REPO / "models.toml")
    model = spec.models[0]
    gguf = spec.cache / model.name / "gguf" / f"{model.name}-merged.{args.variant}.gguf"
    built = spec.cache / model.name / "package" / args.variant
    shipped = [gguf.name, "LICENSE", "chat_template.jinja"]
    size_mb = gguf.stat().st_size / 1e6

    with tempfile.TemporaryDirectory(dir=spec.cache) as work:
        work = Path(work)
        release = package.Release(model.name, args.variant, gguf, None, f"{model.name}:{args.variant}")

        def package_once():
            hashing._digests.clear(), hashing._sha256s.clear()
            package.run(release=release, options=model.package, out_dir=work / "package", source_date_epoch=0)

        def tar_once():
            subprocess.run(["tar", "-cf", str(work / "plain.tar"), *shipped], cwd=built, check=True)

        package_once(), tar_once()  # warm the page cache for both
        packaged = timed(package_once, args.repeat)
        plain = timed(tar_once, args.repeat)
        print(f"{model.name} {args.variant}: GGUF {size_mb:.1f} MB, median of {args.repeat}")
        print(f"plain tar of the shipped files (baseline): {plain:.3f} s")
        print(f"package stage (layout, tar, Modelfile, compose, sums): {packaged:.3f} s  ({packaged / plain:.2f}x)")

        from helpers import Registry

        pushes, pulls = [], []
        for rep in range(3):
            (work / f"registry-{rep}").mkdir()
            with Registry(work / f"registry-{rep}") as running:
                ref = f"{running.host}/bench/{model.name}:{args.variant}"
                start = time.perf_counter()
                registry.push(layout=built / "oci", tag=args.variant, ref=ref, tls_verify=None)
                pushes.append(time.perf_counter() - start)
                start = time.perf_counter()
                registry.pull(ref=ref, dest=work / f"pulled-{rep}", tls_verify=None)
                pulls.append(time.perf_counter() - start)
        push, pull = statistics.median(pushes), statistics.median(pulls)
        print(f"push to a fresh local registry: {push:.2f} s ({size_mb / push:.0f} MB/s)")
        print(f"pull with every blob verified: {pull:.2f} s ({size_mb / pull:.0f} MB/s)")


if __name__ == "__main__":
    main()
