"""`editrl train` as one pipeline of stages (data -> SFT warm start -> Edit-GRPO -> its RunResult), each a function.

The warm start's SFT trainer is dropped before the Edit-GRPO trainer builds its policy: one policy is in memory at a
time. `phases`, the list the console numbers, is decided by the same functions the stages run.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from editrl.checkpoint import checkpoint_steps, find_checkpoint
from editrl.config import Recipe, SftRecipe
from editrl.harness import RunResult
from editrl.monitor import console, skipped
from editrl.registry import POLICIES


def warm_start_recipe(recipe: Recipe, resume: bool) -> SftRecipe | None:
    """The SFT recipe that makes `policy.init_from`, when this run starts from a warm start (not when it resumes)."""
    from editrl.preflight import load_sft_recipe

    pc = recipe.policy
    if pc.warm_start is None or pc.init_from is None or resume:
        return None
    return load_sft_recipe(pc.warm_start, [*pc.warm_start_overrides, f"run.output_dir={pc.init_from}"])


def warm_start_done(sft: SftRecipe) -> bool:
    """Whether `sft`'s run directory holds a finished warm start."""
    try:
        return json.loads((find_checkpoint(sft.output_dir) / "state.json").read_text())["step"] >= sft.train.steps
    except FileNotFoundError:
        return False


def phases(recipe: Recipe, resume: bool) -> list[str]:
    """The job's phases (`editrl.monitor.PHASES`) in the order the stages announce them: the synthetic data, what the
    policy announces while it is built (its OPTIONAL `job_phases(options)`), the warm start, Edit-GRPO and its held-out
    evaluations."""
    keys = ["data"] if any(d is not None and d.kind == "synthetic" for d in (recipe.data.train, recipe.data.eval)) else []
    policy = POLICIES.get(recipe.policy.name)
    built = list(getattr(policy, "job_phases", lambda options: [])(recipe.plugin_options("policy", recipe.policy.options)))
    sft = warm_start_recipe(recipe, resume)
    if sft is None:
        keys += built
    elif warm_start_done(sft):  # skipped: the policy is first built for Edit-GRPO
        keys += ["sft", *built]
    else:
        keys += [*built, "sft"]
    keys.append("grpo")
    if recipe.data.eval is not None and recipe.train.eval_every is not None:
        keys.append("eval")
    return keys


def prepare_data(recipe: Recipe, sft: SftRecipe | None) -> None:
    """Every synthetic data folder the job reads, generated (or found cached) in one phase before any model is built."""
    from editrl.data.synth import prepare_synthetic

    prepare_synthetic(recipe, *([sft] if sft is not None and not warm_start_done(sft) else []))


def warm_start(sft: SftRecipe) -> Path:
    """The SFT stage: `sft` trained to its last step in its run directory, unless a finished one is there, then its
    trainer and policy dropped. Several runs (a sweep's variants and seeds, the ranks of a launch) share one warm start:
    a file lock lets the first build it, the others wait and find it done; an interrupted one resumes from its own
    checkpoint. It runs as a single process."""
    from filelock import FileLock, Timeout
    from rich.markup import escape

    from editrl.distributed import LocalBackend
    from editrl.sft import SftTrainer

    out = sft.output_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out) + ".lock")
    try:
        lock.acquire(timeout=0)
        lock.release()
    except Timeout:  # another run builds it: say so, then wait for it (it is shared, not built twice)
        console.print(f"[yellow]note[/]: waiting for another process that builds the warm start {escape(str(out))}",
                      highlight=False)
    with lock:
        if warm_start_done(sft):
            skipped("sft", f"{out} holds a finished warm start ({sft.train.steps} steps)")
        else:
            resume = bool(checkpoint_steps(out / "checkpoints"))
            SftTrainer(sft, resume=resume, backend=LocalBackend(sft.optim)).fit()
    gc.collect()  # the SFT policy goes before the Edit-GRPO policy is built
    return out


def grpo(recipe: Recipe, resume: bool = False, overwrite: bool = False, accept_changes: bool = False) -> RunResult:
    """The Edit-GRPO stage: the recipe trained to its last step (or continued with `resume`)."""
    from editrl.trainer import Trainer

    return Trainer(recipe, resume=resume, overwrite=overwrite, accept_changes=accept_changes).fit()


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, accept_changes: bool = False) -> RunResult:
    """The whole job: data, the warm start the recipe asks for, Edit-GRPO."""
    sft = warm_start_recipe(recipe, resume)
    prepare_data(recipe, sft)
    if sft is not None:
        warm_start(sft)
    return grpo(recipe, resume, overwrite, accept_changes)
