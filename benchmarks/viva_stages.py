"""Parameter counts and per-stage CPU timings of the VIVA policy's tiny preset, plus whole GRPO steps.

Stages are timed on the shapes a tiny GRPO step uses (2 requests, groups of 4, 5 frames of 32x32): the VLM
encode of the requests, the VAE encode of their source videos, the refiner and one DiT call on the 8 group
members, the VAE decode of the 8 edits. Every (thread count, stage) pair runs once per round, `--repeats`
rounds after a warm-up, so a CPU shared with other work slows all of them alike; the table gives medians and
the ratio between thread counts. Then the bundled `viva_tiny` recipe runs `--grpo-steps` real steps per thread
count, alternating, and reports the trainer's own phase split.

    .venv/bin/python benchmarks/viva_stages.py [--threads 1 2] [--repeats 20] [--grpo-steps 3] [--family qwen3_vl]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from editrl.preflight import load_recipe
from editrl.trainer import Trainer


def interleaved_seconds(stages: dict[str, Callable[[], Any]], threads: list[int], repeats: int) -> dict[tuple[int, str], list[float]]:
    times: dict[tuple[int, str], list[float]] = defaultdict(list)
    for rnd in range(repeats + 1):  # round 0 warms up
        for n in threads:
            torch.set_num_threads(n)
            for name, fn in stages.items():
                t0 = time.perf_counter()
                fn()
                if rnd:
                    times[n, name].append(time.perf_counter() - t0)
    return times


def count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--family", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl")
    args = ap.parse_args()
    console = Console()

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe("viva_tiny", [f"run.output_dir={out}", "train.progress=false", "run.threads=null",
                                           "data.train.options.n=8", f"policy.options.vlm_family={args.family}"])
        trainer = Trainer(recipe)
        p = trainer.policy
        g, steps = recipe.grpo.group_size, recipe.sampling.steps
        requests = [trainer.train_data[i] for i in range(recipe.grpo.batch_size // g)]

        params = Table("part", "parameters", "trainable", title=f"tiny preset, viva_tiny recipe ({args.family})")
        for name, module in [("VLM instructor", p.instructor.model), ("token refiner", p.refiner),
                             ("DiT (Wan) incl. LoRA", p.denoiser), ("VAE (Wan)", p.vae)]:
            params.add_row(name, f"{count(module):,}", f"{count(module, trainable=True):,}")
        console.print(params)

        with torch.no_grad():
            cond = p.encode(requests).repeat_interleave(g)
            x = p.init_noise(cond, torch.Generator().manual_seed(0))
            sigma = torch.full((x.shape[0],), 0.5)
            timestep = sigma * 1000
            longest = int(cond["counts"].max())
            text = p.refine(cond["tokens"], cond["mask"], longest, timestep)
            dit_in = p.fuse(x, cond["source"], cond.get("reference"))
            sources = torch.stack([r.source for r in requests])
            images = [[r.source[0]] + ([r.reference] if r.reference is not None else []) for r in requests]
            stages = {
                "VLM encode (2 requests)": lambda: p.instructor([r.instruction for r in requests], images),
                "VAE encode (2 sources)": lambda: p._encode_pixels(sources),
                "encode() in all (2 requests)": lambda: p.encode(requests),
                "refiner (8 members)": lambda: p.refine(cond["tokens"], cond["mask"], longest, timestep),
                "DiT forward (8 members)": lambda: p.denoiser(dit_in, timestep=timestep, encoder_hidden_states=text, return_dict=False),
                "velocity() = refiner + DiT": lambda: p.velocity(x, sigma, cond),
                "VAE decode (8 edits)": lambda: p.decode(x),
            }
            runs = interleaved_seconds(stages, args.threads, args.repeats)
        med = {k: statistics.median(v) for k, v in runs.items()}
        base = args.threads[0]
        cols = [f"{n} thr ms" for n in args.threads] + [f"{n}/{base} thr" for n in args.threads[1:]]
        table = Table("stage (median)", *cols, title=f"per-stage CPU time, {args.repeats} interleaved rounds")
        for name in stages:
            table.add_row(name, *(f"{1000 * med[n, name]:.2f}" for n in args.threads),
                          *(f"{med[n, name] / med[base, name]:.2f}x" for n in args.threads[1:]))
        console.print(table)
        for n in args.threads:
            rollout = med[n, "encode() in all (2 requests)"] + steps * med[n, "velocity() = refiner + DiT"] + med[n, "VAE decode (8 edits)"]
            console.print(
                f"{n} thread(s): encode + {steps} x velocity + decode = {1000 * rollout:.1f} ms; shares: VAE decode "
                f"{med[n, 'VAE decode (8 edits)'] / rollout:.0%}, velocity {steps * med[n, 'velocity() = refiner + DiT'] / rollout:.0%}, "
                f"encode {med[n, 'encode() in all (2 requests)'] / rollout:.0%}"
            )

        totals: dict[int, dict[str, float]] = {n: defaultdict(float) for n in args.threads}
        for rnd in range(args.grpo_steps + 1):  # round 0 warms up
            for n in args.threads:
                torch.set_num_threads(n)
                metrics = trainer.train_step()
                if rnd:
                    for k, v in metrics.items():
                        if k.startswith("time/"):
                            totals[n][k[5:]] += v
        phases = list(totals[base])
        split = Table("threads", *phases, title=f"GRPO step on viva_tiny: {recipe.grpo.batch_size // g} groups x {g}, {steps} steps, "
                                                f"5x32x32; mean of {args.grpo_steps}, seconds")
        for n in args.threads:
            split.add_row(str(n), *(f"{totals[n][k] / args.grpo_steps:.3f}" for k in phases))
        console.print(split)


if __name__ == "__main__":
    main()
