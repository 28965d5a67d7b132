"""Pre-flight checks for `editrl train --dry-run`: what a recipe needs that is not here, all listed at once.

Paths are checked here (the `init_from` checkpoint, or the data its warm start trains on; the data sources), and
plugins check themselves: a policy or reward class may define a classmethod `preflight(options) -> list[str]`
taking its validated `Options`, each string naming one missing piece (a checkpoint directory, a hub id absent
from the local cache, a judge server that does not answer, IQA weights not on disk). Nothing is built and
nothing is downloaded; plugins without the hook are taken to be ready.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from editrl.config import Recipe, RecipeError
from editrl.registry import DATASETS, POLICIES, REWARDS


def preflight(recipe: Recipe) -> list[str]:
    """Every problem found, each prefixed with the recipe key it comes from; [] when the recipe can run here."""
    pc = recipe.policy
    problems = _data(recipe, "")
    if pc.init_from is not None and not Path(pc.init_from).exists():
        if pc.warm_start is None:
            problems.append(f"policy.init_from: {pc.init_from} does not exist")
        else:
            from editrl.sft import load_sft_recipe

            sft = load_sft_recipe(pc.warm_start, pc.warm_start_overrides, check_paths=False)
            problems += _data(sft, f"policy.warm_start ({pc.warm_start}): ")
    problems += [f"policy ({pc.name}): {p}" for p in _check(POLICIES.get(pc.name), pc.options)]
    for i, term in enumerate(recipe.rewards.terms):
        problems += [f"rewards.terms.{i} ({term.key}): {p}" for p in _check(REWARDS.get(term.name), term.options)]
    return problems


def _data(recipe: Recipe, prefix: str) -> list[str]:
    """The data sources whose `check()` fails (a manifest that is not there, an unknown generator)."""
    problems = []
    for split in ("train", "eval"):
        src = getattr(recipe.data, split)
        options = getattr(DATASETS.get(src.kind), "Options", None) if src is not None else None
        check = getattr(options.model_validate(src.options), "check", None) if options is not None else None
        if check is None:
            continue
        try:
            check()
        except (ValueError, FileNotFoundError, RecipeError) as e:
            problems.append(f"{prefix}data.{split}.options: {e}")
    return problems


def _check(plugin: Any, options: dict[str, Any]) -> list[str]:
    hook = getattr(plugin, "preflight", None)
    if hook is None:
        return []
    model = getattr(plugin, "Options", None)
    return list(hook(model.model_validate(options) if model is not None else options))
