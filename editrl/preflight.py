"""Everything a recipe is checked against before any model is built: its plugins, their options, its paths.

`load_recipe` is how every command reads a recipe: the schema (`editrl.config.parse_recipe`), then `check`, which
stops at the first problem with one `RecipeError` line naming the key. `preflight` is `--dry-run`'s list of what a
recipe needs that is not here, all at once: paths (the `init_from` checkpoint, or the data its warm start trains on;
the data sources) and what plugins report themselves: a policy or reward class may define a classmethod
`preflight(options) -> list[str]` taking its validated `Options`, each string naming one missing piece (a checkpoint
directory, a hub id absent from the local cache, a judge server that does not answer, IQA weights not on disk).
Nothing is built and nothing is downloaded; plugins without the hook are taken to be ready. A dataset class may
declare `provides`, the `EditSample` fields it fills: `check_reward_inputs` refuses, for training, a reward that cannot
score without source or target videos (its `required` fields, else its `needs`) on data that lacks them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from editrl.base import RecipeError
from editrl.config import Recipe, SftRecipe, parse_recipe, validate_model
from editrl.registry import DATASETS, POLICIES, REWARDS, Registry, RegistryError, did_you_mean

DATA_VIDEOS = frozenset({"source", "target"})  # what a reward may need that only data holds (masks are optional)


def load_recipe(
    source: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    check_paths: bool = True,
    model: type[Recipe] = Recipe,
) -> Recipe:
    """Read, override, validate and cross-check a recipe. Raises RecipeError with a one-line message.

    `check_paths=False` skips data and init paths (a checkpoint's recipe, read back only to rebuild the policy).
    """
    recipe = parse_recipe(source, overrides, model)
    check(recipe, check_paths)
    return recipe


def load_sft_recipe(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = (), check_paths: bool = True
) -> SftRecipe:
    return load_recipe(source, overrides, check_paths=check_paths, model=SftRecipe)  # type: ignore[return-value]


def _lookup(registry: Registry[Any], name: str, where: str) -> Any:
    try:
        return registry.get(name)
    except RegistryError as e:
        raise RecipeError(f"{where}: {e}") from None


def _known(registry: Registry[Any], name: str, where: str, what: str) -> None:
    if name not in registry.names():
        known = registry.names()
        raise RecipeError(f"{where}: unknown {what} {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}")


def options_model(obj: Any) -> Any:
    """A plugin's pydantic `Options` model, or None (plain functions and classes without one)."""
    return getattr(obj, "Options", None)


def check(recipe: Recipe, check_paths: bool = True) -> None:
    """Plugin names exist and their options validate, the warm start is a valid SFT recipe, paths exist."""
    from editrl.grpo import LOSSES
    from editrl.sde import SDE_KINDS

    if "wandb" in recipe.run.loggers and importlib.util.find_spec("wandb") is None:
        raise RecipeError("run.loggers: wandb is not installed: pip install 'editrl[wandb]', or drop it")
    _known(SDE_KINDS, recipe.sampling.sde, "sampling.sde", "sde kind")
    _known(LOSSES, recipe.grpo.loss, "grpo.loss", "loss")
    policy_cls = _lookup(POLICIES, recipe.policy.name, "policy.name")
    if options_model(policy_cls) is not None:
        validate_model(policy_cls.Options, recipe.policy.options, "policy.options.")
    d = recipe.distributed
    if d.backend == "deepspeed" and d.zero_stage == 3 and recipe.policy.options.get("compile"):
        raise RecipeError(
            "policy.options.compile: compiled DiT blocks cannot run under ZeRO-3, which gathers each layer's shards "
            "inside the blocks: use distributed.zero_stage=2, or policy.options.compile=false"
        )
    pc = recipe.policy
    if pc.warm_start is not None:
        if pc.init_from is None:
            raise RecipeError("policy.warm_start: set policy.init_from to the directory the warm start writes")
        try:
            load_sft_recipe(pc.warm_start, pc.warm_start_overrides, check_paths=check_paths)
        except RecipeError as e:
            raise RecipeError(f"policy.warm_start ({pc.warm_start}): {e}") from None
    elif check_paths and pc.init_from is not None and not Path(pc.init_from).exists():
        raise RecipeError(f"policy.init_from: {pc.init_from} does not exist")
    for split in ("train", "eval"):
        src = getattr(recipe.data, split)
        if src is None:
            continue
        cls = _lookup(DATASETS, src.kind, f"data.{split}.kind")
        if options_model(cls) is not None:
            validate_model(cls.Options, src.options, f"data.{split}.options.")
    missing = _data(recipe, "") if check_paths else []
    if missing:
        raise RecipeError(missing[0])
    if recipe.needs_rewards and not recipe.rewards.terms:
        raise RecipeError("rewards: at least one reward is needed (see `editrl rewards` for the list)")
    keys = [t.key for t in recipe.rewards.terms]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise RecipeError(f"rewards: {dup!r} appears twice; give one of them a `label`")
    for i, term in enumerate(recipe.rewards.terms):
        opts = options_model(_lookup(REWARDS, term.name, f"rewards.terms.{i}.name"))
        if opts is not None:
            validate_model(opts, term.options, f"rewards.terms.{i}.options.")


def check_reward_inputs(recipe: Recipe) -> None:
    """The videos each reward cannot score without (source, target) against what the recipe's data has; for
    training (`editrl judge` and `editrl eval` score other data)."""
    for split in ("train", "eval"):
        src = getattr(recipe.data, split)
        provides = getattr(DATASETS.get(src.kind), "provides", None) if src is not None else None
        for i, term in enumerate(recipe.rewards.terms if provides is not None else []):
            reward = REWARDS.get(term.name)
            needs = set(getattr(reward, "required", None) or getattr(reward, "needs", None) or ())
            missing = sorted(needs & DATA_VIDEOS - set(provides))
            if missing:
                raise RecipeError(
                    f"rewards.terms.{i} ({term.key}) needs {' and '.join(missing)} videos, which data.{split} (kind "
                    f"{src.kind}) does not have: use data with them (kind manifest or synthetic) or another reward"
                )


def preflight(recipe: Recipe) -> list[str]:
    """Every problem found, each prefixed with the recipe key it comes from; [] when the recipe can run here."""
    pc = recipe.policy
    problems = _data(recipe, "") + device_problems(recipe)
    if pc.init_from is not None and not Path(pc.init_from).exists():
        if pc.warm_start is None:
            problems.append(f"policy.init_from: {pc.init_from} does not exist")
        else:
            sft = load_sft_recipe(pc.warm_start, pc.warm_start_overrides, check_paths=False)
            problems += _data(sft, f"policy.warm_start ({pc.warm_start}): ")
    problems += [f"policy ({pc.name}): {p}" for p in _hook(POLICIES.get(pc.name), pc.options)]
    for i, term in enumerate(recipe.rewards.terms):
        problems += [f"rewards.terms.{i} ({term.key}): {p}" for p in _hook(REWARDS.get(term.name), term.options)]
    return problems


def _data(recipe: Recipe, prefix: str) -> list[str]:
    """The data sources whose `check()` fails (a manifest that is not there, an unknown generator)."""
    problems = []
    for split in ("train", "eval"):
        src = getattr(recipe.data, split)
        options = options_model(DATASETS.get(src.kind)) if src is not None else None
        check_fn = getattr(options.model_validate(src.options), "check", None) if options is not None else None
        if check_fn is None:
            continue
        try:
            check_fn()
        except (ValueError, FileNotFoundError, RecipeError) as e:
            problems.append(f"{prefix}data.{split}.options: {e}")
    return problems


def device_problems(recipe: Recipe) -> list[str]:
    """`run.device` names a device this machine has (else a run would die at its first tensor); checked where a run
    starts and by `--dry-run`, not by commands that only read a recipe's rewards."""
    import torch

    name = recipe.run.device
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        return [f"run.device: {name!r} is not a device editrl runs on: use cpu, cuda, cuda:N or mps"]
    if device.type == "mps" and not torch.backends.mps.is_available():
        return [f"run.device: {name} is not available here: use run.device=cpu"]
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and not count:
        return [f"run.device: {name}, but torch sees no CUDA GPU on this machine: use run.device=cpu"]
    if device.type == "cuda" and (device.index or 0) >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count))
        return [f"run.device: {name}, but this machine has {have}: use one of those"]
    return []


def _hook(plugin: Any, options: dict[str, Any]) -> list[str]:
    hook = getattr(plugin, "preflight", None)
    if hook is None:
        return []
    model = getattr(plugin, "Options", None)
    return list(hook(model.model_validate(options) if model is not None else options))
