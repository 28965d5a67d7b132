"""Atomic checkpoints and exact resume.

A checkpoint is a directory `<run>/checkpoints/step_000010/` holding the resolved `recipe.yaml`, the
policy's trainable weights (safetensors, written by `policy.save_trainable`), and `state.pt` (optimiser,
LR schedule, EMA, RNG states; read back with `torch.load(weights_only=True)`) plus `state.json` (step, data
cursor). It is written under a temporary name and renamed into place, and `<run>/checkpoints/latest` is
replaced atomically after it, so a run killed at any instant leaves the previous checkpoint intact.

`checksums.json` lists every other file's size and sha256. A file damaged later (a full disk, a copy cut short)
is found before anything deserialises it: a run directory then yields its newest intact checkpoint, with one
warning naming the damaged one. Checkpoints written before checksums existed are checked for presence only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from editrl.base import CheckpointError
from editrl.config import Recipe, dump_recipe

LATEST = "latest"
CHECKSUMS = "checksums.json"

logger = logging.getLogger(__name__)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    recipe: Recipe,
    policy: Any,
    training_state: dict[str, Any],
    info: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to the newest `keep`."""
    root = checkpoint_root(run_dir)
    final = write_checkpoint(root / f"step_{step:06d}", step, recipe, policy, info, training_state)
    _write_atomic(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(
    final: Path, step: int, recipe: Recipe, policy: Any, info: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint directory `final` (trainable weights, recipe, `state.json`, `state.pt` when `training_state` is
    given to resume from, checksums), written under a temporary name and swapped in: a crash at any instant leaves
    the previous one or the new one whole."""
    tmp, old = (final.with_name(f".{mark}-{final.name}-{os.getpid()}") for mark in ("tmp", "old"))
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_trainable(tmp)
    dump_recipe(recipe, tmp / "recipe.yaml")
    if training_state is not None:
        torch.save({**training_state, "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=1))
    write_checksums(tmp)
    _fsync_dir(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def write_checksums(directory: Path) -> None:
    """`checksums.json`: the size and sha256 of every file written so far (call it last, before the rename)."""
    files = {f.relative_to(directory).as_posix(): f for f in sorted(directory.rglob("*")) if f.is_file()}
    sums = {name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for name, f in files.items()}
    (directory / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def checkpoint_problem(ckpt: Path) -> str | None:
    """What is wrong with checkpoint `ckpt` as written (a file missing, cut short or altered), or None."""
    for name in ("recipe.yaml", "state.json"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    if not (ckpt / CHECKSUMS).is_file():  # written before checksums: at least its step must read back
        try:
            json.loads((ckpt / "state.json").read_text())["step"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return "state.json is damaged"
        return None
    try:
        listed = json.loads((ckpt / CHECKSUMS).read_text())
        sums = {name: (int(want["bytes"]), str(want["sha256"])) for name, want in listed.items()}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return f"{CHECKSUMS} is damaged"
    for name, (size, digest) in sums.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} of its {size} bytes"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_checkpoint(path: str | Path) -> Path:
    """An intact checkpoint directory: `path` itself, or a run directory's newest intact one (`latest` first, then
    by step; a damaged newer one is named in one warning). Nothing intact is a CheckpointError, never a traceback."""
    path = Path(path)
    if (path / "state.json").is_file() or (path / CHECKSUMS).is_file():
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        run = path.parent.parent
        hint = f"; give the run directory {run} to use its newest intact checkpoint" if path.parent.name == "checkpoints" else ""
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}{hint}")
    root = checkpoint_root(path)
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []
    latest = root / LATEST
    named = root / latest.read_text().strip() if latest.is_file() else None
    if named in steps:
        steps.insert(0, steps.pop(steps.index(named)))
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {path} (expected a checkpoint directory or a run directory with checkpoints/)")
    damaged: list[str] = []
    for ckpt in steps:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if damaged:
                logger.warning("checkpoint %s/%s is damaged; using %s, the newest intact one", root, "; ".join(damaged), ckpt.name)
            return ckpt
        damaged.append(f"{ckpt.name} ({problem})")
    raise CheckpointError(
        f"no intact checkpoint in {path}: {'; '.join(damaged)}; restore the files, or start the run over (--overwrite)"
    )


def load_training_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor state: optimiser, scheduler, EMA, torch RNG; info: step, data cursor, ...).

    Only torch's RNG is global state worth restoring: every sampling seed is derived from (seed, step).
    """
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    info = json.loads((ckpt / "state.json").read_text())
    return state, info


def policy_from_recipe(recipe: Recipe, device: str | None = None, init_from: bool = True) -> Any:
    """The one way a policy is built from a recipe: the registered policy, its LoRA (if any), and the
    `policy.init_from` checkpoint's trainable weights unless `init_from=False` (the caller loads them later)."""
    from editrl.policy import DenoiserOptions, build_policy
    from editrl.registry import POLICIES

    options, d = recipe.policy.options, recipe.distributed
    zero3 = d.backend == "deepspeed" and d.zero_stage == 3
    if zero3 and options.get("compile") is None and issubclass(getattr(POLICIES.get(recipe.policy.name), "Options", object), DenoiserOptions):
        options = {**options, "compile": False}  # ZeRO-3 cannot run compiled blocks (preflight refuses compile: true)
    policy = build_policy(
        recipe.policy.name, options, device=device or recipe.run.device, dtype=getattr(torch, recipe.run.dtype)
    )
    if recipe.optim.lora is not None:
        policy.add_lora(recipe.optim.lora)
    if init_from and recipe.policy.init_from:
        policy.load_trainable(find_checkpoint(recipe.policy.init_from))
    return policy


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[Any, Recipe]:
    """(policy, recipe) of a GRPO or SFT checkpoint (or a run directory: its newest intact), rebuilt for inference."""
    ckpt = find_checkpoint(path)
    recipe = checkpoint_recipe(ckpt)
    policy = policy_from_recipe(recipe, device=device)
    policy.load_trainable(ckpt)
    return policy, recipe


def checkpoint_recipe(ckpt: Path) -> Recipe:
    """The GRPO or SFT recipe a checkpoint directory was trained with (its plugins resolved: trusted code only)."""
    from editrl.config import SftRecipe
    from editrl.preflight import load_recipe

    tree = yaml.safe_load((ckpt / "recipe.yaml").read_text()) or {}
    model = SftRecipe if isinstance(tree, dict) and "sft" in tree else Recipe
    recipe = load_recipe(tree, check_paths=False, model=model)
    recipe.policy.init_from = None  # the checkpoint holds everything that was loaded from it
    return recipe
