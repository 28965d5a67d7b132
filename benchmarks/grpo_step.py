"""Where a GRPO step's time goes: the trainer's phase split and the share spent inside the model.

Runs a few steps of the toy policy at two sizes and reports, per step, encode / rollout / decode / reward /
train seconds and the fraction of wall time spent in model forward (policy.velocity, encode, decode) and
backward. The rest is engine overhead (SDE maths, advantages, bookkeeping, logging).

    .venv/bin/python benchmarks/grpo_step.py [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from editrl.preflight import load_recipe
from editrl.trainer import Trainer

SIZES = {
    "tiny (test size)": ["policy.options={frames: 2, height: 8, width: 8}"],
    "small (4x32x32, 4 layers, 128 wide)": [
        "policy.options={frames: 4, height: 32, width: 32, num_layers: 4, num_heads: 4, head_dim: 32, ffn_dim: 256}"
    ],
}


def timed(fn: Callable[..., Any], bucket: dict[str, float], key: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[key] += time.perf_counter() - t0

    return wrapper


def measure(overrides: list[str], steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe("toy", [f"run.output_dir={out}", "train.progress=false", *overrides])
        trainer = Trainer(recipe)
        trainer.train_step()  # warm-up: first calls allocate and pick kernels
        model: dict[str, float] = defaultdict(float)
        p, b = trainer.policy, trainer.backend
        p.velocity = timed(p.velocity, model, "forward")
        p.encode = timed(p.encode, model, "forward")
        p.decode = timed(p.decode, model, "forward")
        b.backward = timed(b.backward, model, "backward")
        totals: dict[str, float] = defaultdict(float)
        for _ in range(steps):
            for k, v in trainer.train_step().items():
                if k.startswith("time/"):
                    totals[k[5:]] += v
    result = {k: v / steps for k, v in totals.items()}
    result["model"] = (model["forward"] + model["backward"]) / steps
    result["share"] = result["model"] / result["step"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    table = Table("size", "step s", "encode", "rollout", "decode", "reward", "train", "model fwd+bwd", "share in model")
    for name, overrides in SIZES.items():
        r = measure(overrides, args.steps)
        table.add_row(
            name, f"{r['step']:.3f}", *(f"{r.get(k, 0.0):.3f}" for k in ("encode", "rollout", "decode", "reward", "train")),
            f"{r['model']:.3f}", f"{r['share']:.1%}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
