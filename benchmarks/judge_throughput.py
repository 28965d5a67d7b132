"""Judge throughput on the tiny vLLM server: requests/s at concurrency 1 vs 16, and a cached re-score.

    python benchmarks/judge_throughput.py [--requests 48] [--concurrency 1 4 16] [--judge vlm_fidelity]

Needs .venv-vllm (bash scripts/vllm_env.sh). Starts its own server on 127.0.0.1, builds the tiny random
Qwen2-VL, and measures side by side on the same server: every measured batch holds new videos, so
neither vLLM's prefix/multimodal caches nor the judge's reply cache help the uncached runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from editrl.reward import build_reward
from editrl.rewards.vlm_judge.local_server import DEFAULT_PYTHON, REPO, LocalVllmServer
from editrl.types import RewardBatch


def make_batch(n: int, seed: int, frames: int = 5, size: int = 64) -> RewardBatch:
    g = torch.Generator().manual_seed(seed)
    return RewardBatch(
        instructions=[f"make the object number {seed}-{i} red" for i in range(n)],
        sources=torch.rand(n, frames, 3, size, size, generator=g),
        edited=torch.rand(n, frames, 3, size, size, generator=g),
    )


def timed(judge, batch: RewardBatch) -> tuple[float, int]:
    start = time.perf_counter()
    out = asyncio.run(judge(batch))
    return time.perf_counter() - start, int(out.valid.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--judge", default="vlm_fidelity", choices=["vlm_fidelity", "vlm_preservation", "vlm_aesthetics"])
    parser.add_argument("--frames", type=int, default=2, help="frames per video sent to the judge")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny_vlm"
        subprocess.run([str(DEFAULT_PYTHON), str(REPO / "scripts" / "tiny_vlm.py"), str(model)], check=True, capture_output=True)
        print(f"starting vLLM ({args.judge}, {args.requests} requests per run, {args.frames} frames per video) ...", flush=True)
        with LocalVllmServer(model, log_path=Path(tmp) / "server.log") as server:
            base = {"model": server.served_name, "base_urls": [server.base_url], "frames": args.frames, "image_size": 64}
            warm = build_reward(args.judge, base | {"cache_dir": None, "max_concurrency": 4})
            timed(warm, make_batch(8, seed=-1))  # first structured-output request compiles the grammar

            results = []
            for k, c in enumerate(args.concurrency):
                judge = build_reward(args.judge, base | {"cache_dir": None, "max_concurrency": c})
                seconds, valid = timed(judge, make_batch(args.requests, seed=k))
                results.append((c, seconds, valid))
                print(f"concurrency {c:3d}: {args.requests / seconds:7.2f} requests/s ({seconds:.2f} s, {valid}/{args.requests} valid)", flush=True)

            cached = build_reward(args.judge, base | {"cache_dir": str(Path(tmp) / "cache"), "max_concurrency": max(args.concurrency)})
            batch = make_batch(args.requests, seed=1000)
            first, _ = timed(cached, batch)
            again, valid = timed(cached, batch)

    base_c, base_s, _ = results[0]
    print()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average {load} (client, server and anything else share them)")
    print(f"| concurrency | requests/s | speed-up vs {base_c} |")
    print("|---|---|---|")
    for c, seconds, _ in results:
        print(f"| {c} | {args.requests / seconds:.2f} | {base_s / seconds:.2f}x |")
    print()
    print(
        f"cached re-score of {args.requests} edits: {again * 1000:.1f} ms ({again / args.requests * 1000:.2f} ms per edit, "
        f"{valid}/{args.requests} valid) vs {first:.2f} s uncached at concurrency {max(args.concurrency)}: {first / again:.0f}x faster"
    )


if __name__ == "__main__":
    main()
