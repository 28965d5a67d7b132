"""How long `editrl data synth` takes: 1,000 samples of 9 frames at 64x64 (goal: under 2 minutes).

Runs the generator with 1 worker and with every core side by side, checks that both folders are
byte-identical (determinism does not depend on the worker count), and prints the times and their
ratio. Usage: python benchmarks/synth_speed.py [--n 1000] [--frames 9] [--size 64]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import tempfile
import time
from pathlib import Path

from editrl.data.synth import synthesize


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    other = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files == other and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for workers in sorted({1, cores}):
            out = Path(tmp) / f"w{workers}"
            start = time.perf_counter()
            synthesize(out, args.n, seed=0, frames=args.frames, size=(args.size, args.size), workers=workers, progress=False)
            times[workers] = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in (Path(tmp) / "w1").rglob("*") if p.is_file()) / 2**20
        identical = same_tree(Path(tmp) / "w1", Path(tmp) / f"w{cores}") if cores > 1 else True
    print(f"{args.n} samples, {args.frames} frames, {args.size}x{args.size}, {size_mb:.0f} MiB on disk")
    for workers, seconds in times.items():
        print(f"  {workers} worker(s): {seconds:6.1f} s  ({1000 * seconds / args.n:.1f} ms/sample)")
    if cores > 1:
        print(f"  speed-up with {cores} workers: {times[1] / times[cores]:.2f}x; outputs byte-identical: {identical}")
    print(f"  goal < 120 s: {'met' if min(times.values()) < 120 else 'NOT met'}")


if __name__ == "__main__":
    main()
