"""Per-rank memory and step time of data parallelism, ZeRO-2 and ZeRO-3 on 2 ranks (DeepSpeed, CPU here).

One `torchrun` launch of this file trains the toy policy with a wider DiT (LoRA GRPO, as Edit-GRPO trains) under
DeepSpeed ZeRO stage 0 (plain data parallelism: every rank holds everything, the DDP equivalent), 2 and 3, and
counts on each rank the bytes it actually holds:

- parameters: the DiT's tensors resident on the rank (ZeRO-3: its shard; whole tensors otherwise), plus the
  policy's other modules (the toy's frozen text embedding), which no stage shards;
- optimiser: AdamW's moments plus any fp32 master copy ZeRO keeps apart from the module's own tensors.

It also times steps (after a warm-up step) and, under ZeRO-3, counts the all-gathers of one step's rollouts
with the DiT gathered once (`distributed.rollout_gather: true`, the default) and per layer call (false).

    .venv/bin/python benchmarks/zero_memory.py [--steps 3] [--layers 4 --width 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

STAGES = {0: "data parallel (replicated)", 2: "ZeRO-2", 3: "ZeRO-3"}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def held_bytes(trainer: Any) -> dict[str, int]:
    """Parameter and optimiser bytes this rank holds (tensors sharing storage with a parameter counted once)."""
    policy, backend = trainer.policy, trainer.backend
    modules = [m for m in vars(policy).values() if isinstance(m, torch.nn.Module)]
    params: dict[int, torch.nn.Parameter] = {id(p): p for m in modules for p in m.parameters()}
    dit = {id(p) for p in policy.denoiser.parameters()}

    def resident(p: torch.nn.Parameter) -> int:
        return _bytes(p.data) + (_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else 0)

    dit_bytes = sum(resident(p) for i, p in params.items() if i in dit)
    other_bytes = sum(resident(p) for i, p in params.items() if i not in dit)
    own = {p.data.untyped_storage().data_ptr() for p in params.values() if p.data.numel()}
    own |= {p.ds_tensor.untyped_storage().data_ptr() for p in params.values() if hasattr(p, "ds_tensor")}
    opt, zero = backend.optimizer, backend.engine.optimizer
    # fp32 masters: what AdamW steps (ZeRO-3 detaches them from the param groups between steps)
    masters = [q for g in opt.param_groups for q in g["params"]] + list(getattr(zero, "fp32_partitioned_groups_flat", []))
    unique = {q.untyped_storage().data_ptr(): q for q in masters}
    optim_bytes = sum(_bytes(q) for ptr, q in unique.items() if ptr not in own)
    optim_bytes += sum(_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"dit": dit_bytes, "other": other_bytes, "optimiser": optim_bytes}


def rollout_gathers(trainer: Any, gathered: bool) -> dict[str, float]:
    from deepspeed.comm import comm

    from editrl.distributed import all_gather_traffic
    from editrl.harness import Timer

    def rollouts() -> None:
        if gathered:
            with trainer.backend.inference(trainer.policy):
                trainer.collect(Timer())
        else:
            trainer.collect(Timer())

    comm.comms_logger.enabled = comm.comms_logger.prof_all = True  # only here: it syncs after every collective
    t0 = time.perf_counter()
    traffic = all_gather_traffic(rollouts)
    seconds = time.perf_counter() - t0
    comm.comms_logger.enabled = False
    return {**traffic, "seconds": seconds}


def worker(spec_path: str) -> None:
    from editrl.preflight import load_recipe
    from editrl.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for stage in STAGES:
        ds_json = Path(spec["out"]) / f"ds{stage}.json"
        ds_json.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        recipe = load_recipe("toy", spec["overrides"] + [
            f"run.output_dir={Path(spec['out']) / f'zero{stage}'}", "distributed.backend=deepspeed",
            f"distributed.config={ds_json}", f"train.steps={spec['steps'] + 1}",
        ])
        trainer = Trainer(recipe)
        trainer.train_step()  # warm-up, and AdamW's state exists from here on
        times = [trainer.train_step() for _ in range(spec["steps"])]
        row: dict[str, Any] = held_bytes(trainer)
        for key in ("step", "rollout", "train"):
            row[key] = sum(t[f"time/{key}"] for t in times) / len(times)
        if stage == 3:
            row["gathers"] = {"once": rollout_gathers(trainer, True), "per_call": rollout_gathers(trainer, False)}
        everyone: list[Any] = [None] * trainer.backend.world_size
        torch.distributed.all_gather_object(everyone, row)
        results[str(stage)] = everyone
        trainer.backend.barrier()
    if trainer.backend.is_main:
        (Path(spec["out"]) / "results.json").write_text(json.dumps(results))


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from editrl.base import free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per stage (after one warm-up step)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=512, help="DiT hidden size (heads x 64); tensors under 1e5 elements stay whole")
    args = ap.parse_args()
    heads = max(1, args.width // 64)
    overrides = [
        "train.progress=false", "run.threads=1", "train.save_every=1000",
        (f"policy.options={{frames: 2, height: 16, width: 16, num_layers: {args.layers}, num_heads: {heads}, "
         f"head_dim: 64, ffn_dim: {4 * args.width}, text_dim: {args.width}, vocab: 512}}"),
    ]
    with tempfile.TemporaryDirectory() as out:
        spec = Path(out) / "spec.json"
        spec.write_text(json.dumps({"out": out, "overrides": overrides, "steps": args.steps}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", __file__, "--worker", str(spec)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=False, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"torchrun failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        results = json.loads((Path(out) / "results.json").read_text())
    mib = 2**20
    base = results["0"][0]

    def sharded(r: dict[str, Any]) -> int:  # what the trainer hands DeepSpeed: the DiT (+ LoRA) and its optimiser
        return r["dit"] + r["optimiser"]

    table = Table(title=f"2 ranks, toy DiT {args.layers} layers x {args.width} + LoRA; per rank: rank 0 | rank 1")
    for col in ("stage", "DiT params MiB", "optimiser MiB", "DiT+optimiser", "vs replicated", "other modules MiB",
                "step s", "vs replicated", "rollout s", "train s"):
        table.add_column(col, justify="right")
    for stage, name in STAGES.items():
        r0, r1 = results[str(stage)]
        table.add_row(
            name,
            f"{r0['dit'] / mib:.2f} | {r1['dit'] / mib:.2f}",
            f"{r0['optimiser'] / mib:.3f} | {r1['optimiser'] / mib:.3f}",
            f"{sharded(r0) / mib:.2f} | {sharded(r1) / mib:.2f}",
            f"{max(sharded(r0), sharded(r1)) / sharded(base):.2f}x",
            f"{r0['other'] / mib:.2f}",
            f"{r0['step']:.2f}",
            f"{r0['step'] / base['step']:.2f}x",
            f"{r0['rollout']:.2f}",
            f"{r0['train']:.2f}",
        )
    console = Console(width=160)
    console.print(table)
    g = results["3"][0]["gathers"]
    console.print(
        "ZeRO-3 all-gathers of one step's rollouts (rank 0): DiT gathered once: "
        f"{g['once']['calls']} calls, {g['once']['bytes'] / mib:.2f} MiB, {g['once']['seconds']:.2f} s; "
        f"per layer call: {g['per_call']['calls']} calls, {g['per_call']['bytes'] / mib:.2f} MiB, "
        f"{g['per_call']['seconds']:.2f} s ({g['per_call']['bytes'] / max(1, g['once']['bytes']):.1f}x the bytes)"
    )
    console.print(f"(launch + 3 stages: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
