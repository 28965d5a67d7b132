"""Atomic checkpoints and exact resume.

A checkpoint is a directory `<run>/checkpoints/step_000010/` holding the resolved `recipe.yaml`, the
policy's trainable weights (safetensors, written by `policy.save_trainable`), and `state.pt` (optimiser,
LR schedule, EMA, RNG states; read back with `torch.load(weights_only=True)`) plus `state.json` (step, data
cursor). It is written under a temporary name and renamed into place, and `<run>/checkpoints/latest` is
replaced atomically after it, so a run killed at any instant leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from editrl.config import Recipe, dump_recipe

LATEST = "latest"


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
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    policy.save_trainable(tmp)
    dump_recipe(recipe, tmp / "recipe.yaml")
    torch.save({**training_state, "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, from a run directory (its latest), or a clear error."""
    path = Path(path)
    if (path / "recipe.yaml").is_file() and (path / "state.json").is_file():
        return path
    root = checkpoint_root(path)
    latest = root / LATEST
    if latest.is_file():
        ckpt = root / latest.read_text().strip()
        if ckpt.is_dir():
            return ckpt
    candidates = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    if candidates:
        return candidates[-1]
    raise FileNotFoundError(f"no checkpoint in {path} (expected a checkpoint directory or a run directory with checkpoints/)")


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
    from editrl.policy import build_policy

    policy = build_policy(
        recipe.policy.name, recipe.policy.options, device=device or recipe.run.device, dtype=getattr(torch, recipe.run.dtype)
    )
    if recipe.optim.lora is not None:
        policy.add_lora(recipe.optim.lora)
    if init_from and recipe.policy.init_from:
        policy.load_trainable(find_checkpoint(recipe.policy.init_from))
    return policy


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[Any, Recipe]:
    """(policy, recipe) of a GRPO or SFT checkpoint (or a run directory: its latest), rebuilt for inference."""
    from editrl.config import SftRecipe
    from editrl.preflight import load_recipe

    ckpt = find_checkpoint(path)
    tree = yaml.safe_load((ckpt / "recipe.yaml").read_text()) or {}
    model = SftRecipe if isinstance(tree, dict) and "sft" in tree else Recipe
    recipe = load_recipe(tree, check_paths=False, model=model)
    recipe.policy.init_from = None  # the checkpoint holds everything that was loaded from it
    policy = policy_from_recipe(recipe, device=device)
    policy.load_trainable(ckpt)
    return policy, recipe
