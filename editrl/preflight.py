"""Everything a recipe is checked against before any model is built: its plugins, their options, its paths.

`load_recipe` is how every command reads a recipe: the schema (`editrl.config.parse_recipe`), then `check`, which
stops at the first problem with one `RecipeError` line naming the key. `preflight` is `--dry-run`'s list of what a
recipe needs that is not here, all at once: paths, and what a policy's or reward's own `preflight(options)` reports
missing (a hub id absent from the local cache, a judge server that does not answer). Nothing is built or downloaded.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from editrl.base import RecipeError
from editrl.config import Recipe, SftRecipe, parse_recipe, validate_model
from editrl.registry import DATASETS, POLICIES, REWARDS, Registry, RegistryError

DATA_VIDEOS = frozenset({"source", "target"})  # what a reward may need that only data holds (masks are optional)


def load_recipe(
    source: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    check_paths: bool = True,
    model: type[Recipe] = Recipe,
) -> Recipe:
    """Read, override, validate and cross-check a recipe (RecipeError, one line); `check_paths=False` skips data and
    init paths (a checkpoint's recipe, read back only to rebuild the policy)."""
    return checked(parse_recipe(source, overrides, model), overrides, check_paths)


def checked(recipe: Recipe, overrides: list[str] | tuple[str, ...] = (), check_paths: bool = True) -> Recipe:
    """A parsed recipe (`parse_recipe`, with these `overrides`) cross-checked against its plugins and paths."""
    trust_typed(recipe, overrides)
    check(recipe, check_paths)
    return recipe


def trust_typed(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> None:
    """A `module:attr` the user typed on the command line is their own decision, as running a script is: its module
    joins `run.plugins`, so the run's recipe.yaml (and a checkpoint's) says where its code comes from. Recipe files and
    checkpoints still name only what their `run.plugins` lists; the standard library stays refused."""
    typed = "\n".join(overrides)
    for _, name in plugin_names(recipe):
        module = name.partition(":")[0]
        top = module.split(".")[0]
        if ":" in name and name in typed and module not in recipe.run.plugins and top != "editrl" and top not in sys.stdlib_module_names:
            recipe.run.plugins.append(module)


def load_sft_recipe(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = (), check_paths: bool = True
) -> SftRecipe:
    return load_recipe(source, overrides, check_paths=check_paths, model=SftRecipe)  # type: ignore[return-value]


def _lookup(registry: Registry[Any], name: str, where: str) -> Any:
    try:
        return registry.get(name)
    except RegistryError as e:
        raise RecipeError(f"{where}: {e}") from None


def _sde_kind(recipe: Recipe) -> None:
    """`sampling.sde` names a transition that takes a test step: imported (built-in, module:attr, entry point) and run."""
    import torch

    from editrl.sde import SDE_KINDS, step

    s = recipe.sampling
    if not callable(_lookup(SDE_KINDS, s.sde, "sampling.sde")):
        raise RecipeError(f"sampling.sde: {s.sde} is not a function (x, v, t, t_next, noise_level) -> (mean, std)")
    x = torch.zeros(1, 2)
    try:
        step(s.sde, x, x, 0.5, 0.4, noise_level=s.noise_level)
    except Exception as e:
        raise RecipeError(f"sampling.sde: {s.sde} failed on a test step (sigma 0.5 -> 0.4): {type(e).__name__}: {e}") from None


def plugin_names(recipe: Recipe) -> list[tuple[str, str]]:
    """(recipe key, name) of every plugin a recipe names: its policy, dataset kinds, generators, loss, SDE kind, rewards."""
    names = [("policy.name", recipe.policy.name)]
    for split in ("train", "eval"):
        src = getattr(recipe.data, split)
        if src is not None:
            names.append((f"data.{split}.kind", src.kind))
            if src.kind == "synthetic" and isinstance(src.options.get("generator"), str):
                names.append((f"data.{split}.options.generator", src.options["generator"]))
    names += [("grpo.loss", recipe.grpo.loss), ("sampling.sde", recipe.sampling.sde)]
    return names + [(f"rewards.terms.{i}.name", t.name) for i, t in enumerate(recipe.rewards.terms)]


def check_source(name: str, where: str, plugins: list[str]) -> None:
    """A `module:attr` name in a recipe is code the recipe calls with arguments it chooses: it must come from editrl or
    a package listed in `run.plugins`, never from Python's standard library (`subprocess:Popen` would run a command).
    Checked before anything is imported. Names registered by entry points are installed packages: always allowed."""
    if ":" not in name:
        return
    module = name.partition(":")[0]
    top = module.split(".")[0]
    if top == "editrl" or any(module == p or module.startswith(p + ".") for p in plugins):
        return
    if top in sys.stdlib_module_names:
        raise RecipeError(f"{where}: {name!r} is Python's standard library, which a recipe may not call: name a "
                          "policy, dataset or reward plugin")
    raise RecipeError(f"{where}: {name!r} is code from {module!r}, which run.plugins does not list: add it "
                      f"(run.plugins=[{module}]) if you trust that package")


def _plugin(recipe: Recipe, registry: Registry[Any], name: str, key: str, options: Any) -> None:
    """The plugin `name` at recipe key `key` (`policy`, `data.train`, `rewards.terms.N`) exists and is a class or a
    function (a reward class's instances callable too); its `Options`, if any, validate `options` and are kept."""
    where, what = f"{key}.kind" if key.startswith("data.") else f"{key}.name", registry.kind
    obj = _lookup(registry, name, where)
    if not callable(obj):
        raise RecipeError(f"{where}: {name!r} is a {type(obj).__name__}, not a {what} class or function")
    if what == "reward" and inspect.isclass(obj) and not any("__call__" in vars(k) for k in obj.__mro__[:-1]):
        raise RecipeError(f"{where}: {name!r} is a class whose instances cannot be called: define __call__(batch)")
    if getattr(obj, "Options", None) is not None:
        recipe.keep_options(key, validate_model(obj.Options, options, f"{key}.options."))


def check(recipe: Recipe, check_paths: bool = True) -> None:
    """Plugin names are allowed and exist, their options validate, the warm start is a valid SFT recipe, paths exist."""
    from editrl.objectives import build_objective

    if "wandb" in recipe.run.loggers and importlib.util.find_spec("wandb") is None:
        raise RecipeError("run.loggers: wandb is not installed: pip install 'editrl[wandb]', or drop it")
    for where, name in plugin_names(recipe):
        check_source(name, where, recipe.run.plugins)
    _sde_kind(recipe)
    build_objective(recipe)
    pc = recipe.policy
    _plugin(recipe, POLICIES, pc.name, "policy", pc.options)
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
        if src is not None:
            _plugin(recipe, DATASETS, src.kind, f"data.{split}", src.options)
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
        _plugin(recipe, REWARDS, term.name, f"rewards.terms.{i}", term.options)


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
    problems += [f"policy ({pc.name}): {p}" for p in _hook(POLICIES.get(pc.name), recipe.plugin_options("policy", pc.options))]
    for i, term in enumerate(recipe.rewards.terms):
        options = recipe.plugin_options(f"rewards.terms.{i}", term.options)
        problems += [f"rewards.terms.{i} ({term.key}): {p}" for p in _hook(REWARDS.get(term.name), options)]
    return problems


def _data(recipe: Recipe, prefix: str) -> list[str]:
    """The data sources whose `check()` fails (a manifest that is not there, an unknown generator)."""
    problems = []
    for split in ("train", "eval"):
        src = getattr(recipe.data, split)
        options = recipe.plugin_options(f"data.{split}", None) if src is not None else None
        check_fn = getattr(options, "check", None)
        if check_fn is None:
            continue
        try:
            check_fn()
        except (ValueError, FileNotFoundError, RecipeError) as e:
            problems.append(f"{prefix}data.{split}.options: {e}")
    return problems


def device_problems(recipe: Recipe) -> list[str]:
    """`run.device` names a device this machine has (else a run would die at its first tensor) and `run.threads` no
    more threads than it has cores; checked where a run starts and by `--dry-run`, not by commands that only read a
    recipe's rewards."""
    import os

    problems = [p for p in [device_problem(recipe.run.device)] if p]
    cores, threads = os.cpu_count() or 1, recipe.run.threads
    if threads is not None and threads > cores:
        problems.append(f"run.threads: {threads}, but this machine has {cores} CPU cores: use at most {cores}, or null "
                        "for torch's default")
    return problems


def device_problem(name: str, key: str = "run.device") -> str | None:
    """Why the device `name` (given as `key`) cannot be used on this machine, or None."""
    import torch

    use = f"{key}={{}}" if "." in key else f"{key} {{}}"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        return f"{key}: {name!r} is not a device editrl runs on: use cpu, cuda, cuda:N or mps"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{key}: {name} is not available here: use {use.format('cpu')}"
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and not count:
        return f"{key}: {name}, but torch sees no CUDA GPU on this machine: use {use.format('cpu')}"
    if device.type == "cuda" and (device.index or 0) >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count))
        return f"{key}: {name}, but this machine has {have}: use one of those"
    return None


def check_device(name: str, key: str) -> None:
    """`device_problem` as a one-line RecipeError (a command's --device flag)."""
    problem = device_problem(name, key)
    if problem is not None:
        raise RecipeError(problem)


def _hook(plugin: Any, options: Any) -> list[str]:
    """A plugin's `preflight(options)`, given its options as the recipe's check validated them."""
    hook = getattr(plugin, "preflight", None)
    return [] if hook is None else list(hook(options))
