"""Recipes: pydantic models, YAML loading, `section.field=value` overrides and derived values.

Everything that can be wrong in a recipe is caught here, before any model is built, and reported as
one `RecipeError` line naming the key path (and a did-you-mean suggestion for misspelt names).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AliasChoices, Field, PrivateAttr, ValidationError, field_validator, model_validator

from editrl.base import RecipeError, StrictModel, launch_env
from editrl.registry import did_you_mean


class LoraOptions(StrictModel):
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None  # None: the policy's own default targets


class WandbOptions(StrictModel):
    """Weights & Biases, when `run.loggers` names it; `mode: offline` writes the run under RUN/wandb (`wandb sync`)."""

    project: str = "editrl"
    entity: str | None = None  # None: the logged-in user's default entity
    group: str | None = None  # None: ungrouped (`editrl sweep` groups its runs by the sweep's name)
    mode: Literal["online", "offline", "disabled"] = "online"


class RunConfig(StrictModel):
    name: str = "run"
    output_dir: str = Field("runs/${run.name}", min_length=1)
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None = torch's default
    # Where every metric goes besides metrics.jsonl (which is always written).
    loggers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    wandb: WandbOptions = Field(default_factory=WandbOptions)
    # Packages whose code the recipe may name as `module:attr` (besides editrl's own and installed entry points).
    plugins: list[str] = Field(default_factory=list)

    @field_validator("plugins")
    @classmethod
    def _packages(cls, names: list[str]) -> list[str]:
        for name in names:
            if not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"{name!r} is not a package name (e.g. my_rewards)")
            top = name.split(".")[0]
            if top == "editrl":
                raise ValueError(f"{name!r} need not be listed: editrl's own code is always allowed")
            if top in sys.stdlib_module_names:
                raise ValueError(f"{name!r} is Python's standard library, not a plugin package: a recipe may not name "
                                 "code from it")
        return names


class PolicyConfig(StrictModel):
    name: str
    init_from: str | None = None  # a checkpoint directory whose trainable weights start this run
    # An SFT recipe that makes `init_from` when it does not exist yet (a self-contained warm start).
    warm_start: str | None = None
    warm_start_overrides: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)


class DataSource(StrictModel):
    kind: str = "prompts"
    options: dict[str, Any] = Field(default_factory=dict)


class DataConfig(StrictModel):
    train: DataSource = Field(default_factory=DataSource)
    eval: DataSource | None = None
    shuffle: bool = True


class RewardTerm(StrictModel):
    name: str
    weight: float = 1.0
    label: str | None = None  # defaults to name; needed when one reward is used twice
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.label or self.name


class RewardsConfig(StrictModel):
    aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    on_failure: Literal["skip", "fail"] = "skip"  # invalid scores: exclude the samples, or stop the run
    # Seconds one reward may take to score one batch; a late reward scores nothing for it (on_failure decides).
    timeout_s: float | None = Field(600.0, gt=0)
    terms: list[RewardTerm] = Field(default_factory=list)

    def weights(self) -> dict[str, float]:
        return {t.key: t.weight for t in self.terms}

    @model_validator(mode="after")
    def _some_weight(self) -> "RewardsConfig":
        if self.terms and not any(t.weight for t in self.terms):
            raise ValueError("every reward weight is 0, so every advantage would be 0: give one a non-zero weight")
        return self

    @model_validator(mode="before")
    @classmethod
    def _list_shorthand(cls, v: Any) -> Any:
        return {"terms": v} if isinstance(v, list) else v


class SdeWindow(StrictModel):
    """Where the SDE runs (ODE elsewhere): all steps, or a window of `size` steps (MixGRPO / Flow-GRPO-Fast)."""

    size: int | None = Field(None, ge=1)
    position: Literal["random", "fixed", "sliding"] = "random"
    start: int = Field(0, ge=0)  # for fixed
    stride: int = Field(1, ge=1)  # for sliding: moves this many steps per training step


class SamplingConfig(StrictModel):
    steps: int = Field(10, ge=2)  # the last step is deterministic: at least one SDE step needs two
    shift: float = Field(3.0, gt=0)
    sde: str = "flow_sde"
    noise_level: float = Field(0.7, ge=0)
    window: SdeWindow = Field(default_factory=SdeWindow)
    eval_steps: int | None = Field(None, ge=1)  # ODE steps for evaluation/inference; None = steps
    # How a `cps` step is scored: the exact Gaussian log-density, or Flow-GRPO's CPS score -mean((x - mean)^2), which
    # drops 1/(2 std^2) (so its log-ratios are 2 std^2 times smaller): pick flow_grpo to reproduce FlowCPS training.
    cps_logprob: Literal["exact", "flow_grpo"] = "exact"

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, v: Any) -> Any:
        if isinstance(v, dict) and "guidance_scale" in v:
            raise ValueError("guidance_scale: classifier-free guidance is the policy's (true CFG, a distilled guidance "
                             "input, or none): set policy.options.guidance_scale")
        return v

    @model_validator(mode="after")
    def _cps_logprob_needs_cps(self) -> "SamplingConfig":
        if self.cps_logprob != "exact" and self.sde != "cps":
            raise ValueError(f"cps_logprob={self.cps_logprob} scores cps steps only; set sampling.sde=cps or drop it")
        return self


class GrpoConfig(StrictModel):
    group_size: int = Field(4, ge=2)
    batch_size: int = Field(8, ge=2)  # samples per optimisation step, all ranks together
    micro_batch_size: int | None = Field(None, ge=1)  # samples per forward; None = group_size
    minibatches: int = Field(1, ge=1)  # optimiser updates per rollout batch (PPO-style; >1 makes clipping bite)
    clip_range: float = Field(1e-4, gt=0)
    beta: float = Field(0.0, ge=0)  # KL weight against the adapter-disabled reference
    adv_clip: float = Field(5.0, gt=0)
    scale: Literal["group", "batch", "none"] = "group"
    trained_steps: int | None = Field(None, ge=1)  # train this many of the SDE steps (random subset); None = all
    skip_tied_groups: bool = True
    async_rewards: bool = True
    share_encode: bool = True  # encode each request once for its group (False: once per sample, as flow_grpo)
    # The objective (editrl.objectives): a built-in (ppo_clip, reinforce, nft), module:attr or an `editrl.losses` entry
    # point; its own options, validated by it, in loss_options.
    loss: str = "ppo_clip"
    loss_options: dict[str, Any] = Field(default_factory=dict)
    # Dynamic sampling: up to this many extra groups (new requests) per step replace groups whose rewards all tie.
    resample_tied: int = Field(0, ge=0)
    ratio_norm: bool = False  # GRPO-Guard: centre and rescale each step's log-ratio (editrl.grpo.guard_log_ratio)
    shuffle_advantages: bool = False  # control run: a seeded permutation of the trained advantages across the batch

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, v: Any) -> Any:
        if isinstance(v, dict) and "nft" in v:
            raise ValueError("nft moved: an objective's options are grpo.loss_options (e.g. grpo.loss_options.beta=1.0)")
        return v


class EmaConfig(StrictModel):
    enabled: bool = False
    decay: float = Field(0.99, gt=0, lt=1)


Beta = Annotated[float, Field(ge=0, lt=1)]  # an Adam moment decay


class OptimConfig(StrictModel):
    lr: float = Field(1e-4, gt=0, validation_alias=AliasChoices("lr", "learning_rate"))
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)  # max gradient norm; None = no clipping
    warmup_steps: int = Field(0, ge=0)
    lora: LoraOptions | None = Field(default_factory=LoraOptions)
    ema: EmaConfig = Field(default_factory=EmaConfig)


class SentinelConfig(StrictModel):
    """The reward-hacking sentinel (editrl.sentinel); held-out metrics are named as metrics.jsonl names them, less `eval/`."""

    watch: list[str] | None = None  # held-out metrics to watch; None: every oracle/* metric
    patience: int = Field(2, ge=1)  # evaluations in a row of the reward rising while a watched metric falls
    reward: str = "reward/weighted/mean"  # the training metric whose trend is compared
    best: str | None = None  # keep checkpoints/best by this held-out metric (higher is better)
    stop: bool = False  # end the run at the first alarm (after saving a checkpoint)


class TrainConfig(StrictModel):
    steps: int = Field(20, ge=1)
    log_every: int = Field(1, ge=1)
    save_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)
    sample_every: int | None = Field(None, ge=1)  # save source|edited videos every N steps
    keep_checkpoints: int = Field(2, ge=1)
    progress: bool = True
    sentinel: SentinelConfig | None = None  # off unless set (needs data.eval and eval_every)


class DistributedConfig(StrictModel):
    backend: Literal["none", "deepspeed"] = "none"
    zero_stage: Literal[2, 3] = 2
    offload: Literal["none", "cpu"] = "none"
    config: str | None = None  # a DeepSpeed JSON merged over the generated one
    rollout_gather: bool = True  # ZeRO-3: gather the DiT once per rollout (False: per layer call, for models too big to hold whole)


class Recipe(StrictModel):
    run: RunConfig = Field(default_factory=RunConfig)
    policy: PolicyConfig
    data: DataConfig = Field(default_factory=DataConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    needs_rewards: ClassVar[bool] = True  # False for recipes that score nothing (SFT)
    _layout: Layout | None = PrivateAttr(default=None)
    # Each plugin's options as its `Options` model validated them (editrl.preflight.check), by recipe key: "policy",
    # "data.train", "data.eval", "rewards.terms.N". Builders take these, so nothing is validated twice.
    _plugin_options: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir.replace("${run.name}", self.run.name))

    @property
    def layout(self) -> Layout:
        """The derived values for this launch's world size, computed once (parse_recipe already did)."""
        if self._layout is None:
            self._layout = derive_layout(self, launch_env()[1])
        return self._layout

    def plugin_options(self, key: str, raw: Any) -> Any:
        """The validated options kept for `key`, or `raw` for a recipe no check has seen (a builder validates them)."""
        return self._plugin_options.get(key, raw)

    def keep_options(self, key: str, options: Any) -> Any:
        self._plugin_options[key] = options
        return options

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        """What no single section can check: combinations the engine refuses, before any model is built."""
        d = self.distributed
        zero3 = d.backend == "deepspeed" and d.zero_stage == 3
        if zero3 and self.grpo.resample_tied and not d.rollout_gather:
            raise ValueError("grpo.resample_tied rolls extra groups out on some ranks only, which ZeRO-3's per-layer "
                             "gathers cannot follow: set distributed.rollout_gather=true or grpo.resample_tied=0")
        if zero3 and self.optim.ema.enabled:
            raise ValueError("optim.ema: not available with ZeRO-3 (the EMA would copy sharded, empty tensors); use "
                             "distributed.zero_stage=2")
        if zero3 and self.policy.options.get("compile"):
            raise ValueError("policy.options.compile: compiled DiT blocks cannot run under ZeRO-3, which gathers each "
                             "layer's shards inside the blocks: use distributed.zero_stage=2, or policy.options.compile=false")
        if self.train.sentinel is not None and (self.data.eval is None or self.train.eval_every is None):
            raise ValueError("train.sentinel watches held-out evaluations: set data.eval and train.eval_every, or drop it")
        return self


class SftConfig(StrictModel):
    batch_size: int = Field(4, ge=1)  # pairs per optimiser update
    timesteps: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    eval_samples: int = Field(8, ge=1)  # eval pairs scored with fixed noise every train.eval_every steps


class SftRecipe(Recipe):
    """A recipe with an `sft` section; rewards are optional (nothing is scored)."""

    sft: SftConfig = Field(default_factory=SftConfig)
    needs_rewards = False


class Layout(StrictModel):
    """Values derived from a recipe and the world size; never written in YAML."""

    world_size: int
    groups_per_step: int
    groups_per_rank: int
    micro_batch_size: int
    micro_batches_per_update: int
    grad_accumulation: int  # backward passes per optimiser update (micro-batches x trained steps)
    trained_steps: int


def derive_layout(recipe: Recipe, world_size: int = 1) -> Layout:
    g = recipe.grpo
    if g.batch_size % g.group_size:
        raise RecipeError(
            f"grpo.batch_size={g.batch_size} is not a multiple of grpo.group_size={g.group_size}: "
            f"try grpo.batch_size={max(g.group_size, g.batch_size // g.group_size * g.group_size)}"
        )
    groups = g.batch_size // g.group_size
    if groups % world_size:
        raise RecipeError(
            f"grpo.batch_size={g.batch_size} makes {groups} groups, which do not split over {world_size} ranks "
            "(each group lives on one rank)"
        )
    per_rank = g.batch_size // world_size
    mb = g.micro_batch_size or g.group_size
    if per_rank % mb:
        raise RecipeError(f"grpo.micro_batch_size={mb} does not divide the {per_rank} samples per rank")
    micro = per_rank // mb
    if micro % g.minibatches:
        raise RecipeError(f"grpo.minibatches={g.minibatches} does not divide the {micro} micro-batches per rank")
    s = recipe.sampling
    sde_steps = s.window.size if s.window.size is not None else s.steps - 1
    if not 1 <= sde_steps <= s.steps - 1:
        raise RecipeError(f"sampling.window.size={s.window.size} must be between 1 and sampling.steps-1={s.steps - 1}")
    if s.window.position == "fixed" and s.window.start + sde_steps > s.steps - 1:
        raise RecipeError(f"sampling.window.start={s.window.start} puts the window past the last SDE step {s.steps - 2}")
    trained = g.trained_steps if g.trained_steps is not None else sde_steps
    if not 1 <= trained <= sde_steps:
        raise RecipeError(f"grpo.trained_steps={g.trained_steps} must be between 1 and the {sde_steps} SDE steps")
    return Layout(
        world_size=world_size,
        groups_per_step=groups,
        groups_per_rank=groups // world_size,
        micro_batch_size=mb,
        micro_batches_per_update=micro // g.minibatches,
        grad_accumulation=micro // g.minibatches * trained,
        trained_steps=trained,
    )


# ---------------------------------------------------------------- loading, overrides, errors


class StrictLoader(yaml.SafeLoader):
    """YAML as recipes need it: a key given twice in one mapping (`train: {steps: 30, steps: 2}`, or a section twice)
    is an error naming both lines, never a silent "the last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (first on line {seen[key]})", key_node.start_mark
                    )
            except TypeError:  # an unhashable key: the base class says so
                break
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text read with `StrictLoader`; a RecipeError of one line (`where:LINE: problem`) when it is not valid."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{where}{line}: not valid YAML: {' '.join(str(e.problem or e.context).split())}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None


def read_yaml(path: Path) -> Any:
    """A YAML file read strictly (`parse_yaml`): a file that cannot be read, or is not UTF-8 text, is one line too."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not a text file (byte {e.start} is not UTF-8): a recipe is YAML text") from None
    return parse_yaml(text, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so `3`, `1e-4`, `[a, b]`, `null` work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} is not of the form section.field=value")
    path = key.strip().split(".")
    if not all(p.strip() for p in path):
        raise RecipeError(f"override {text!r}: {key.strip()!r} has an empty part; write section.field=value")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""
    except yaml.constructor.ConstructorError as e:  # a key given twice inside the value
        raise RecipeError(f"override {text!r}: {e.problem}") from None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path[: i + 1])]
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            where = ".".join(path[: i + 1])
            raise RecipeError(f"{'.'.join(path)}: {where} is {node!r}, which has no field {path[i + 1]!r}")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, path: list[str]) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise RecipeError(f"{'.'.join(path)}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _format_error(err: dict[str, Any], root: type[StrictModel], prefix: str = "") -> str:
    """One line for a pydantic error, named by its key path under `prefix` (a model-level error: `prefix` alone)."""
    loc = [str(p) for p in err["loc"]]
    path = ".".join([prefix.rstrip(".")] * bool(prefix) + loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(root, err["loc"][:-1])
        hint = did_you_mean(loc[-1], _field_names(parent)) if parent else ""
        return f"{path}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{path}: required"
    msg = err["msg"].removeprefix("Value error, ")
    if not path:  # a check across sections names its keys itself
        return msg
    return f"{path}: {msg}" + (f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else "")


def _field_names(model: type[StrictModel]) -> list[str]:
    """Field names plus their accepted aliases (`learning_rate` for `lr`), for did-you-mean hints."""
    names = list(model.model_fields)
    for f in model.model_fields.values():
        if isinstance(f.validation_alias, AliasChoices):
            names += [c for c in f.validation_alias.choices if isinstance(c, str)]
    return names


def _model_at(root: type[StrictModel], loc: tuple[Any, ...]) -> type[StrictModel] | None:
    """The pydantic model class reached by following `loc` from `root` (through lists and optionals)."""
    import typing

    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        for c in list(candidates):
            candidates += list(typing.get_args(c))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, StrictModel)), None)
        if model is None:
            return None
    return model


def validate_model(model: type[StrictModel], data: Any, prefix: str = "") -> Any:
    """`model.model_validate` whose errors become one RecipeError line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RecipeError("; ".join(_format_error(err, model, prefix) for err in e.errors())) from None


def parse_recipe(
    source: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    model: type[Recipe] = Recipe,
) -> Recipe:
    """Read, override and validate a recipe's schema and layout; RecipeError with a one-line message.

    Plugins (names, their options) and paths are checked one layer up, by `editrl.preflight.load_recipe`.
    """
    if isinstance(source, dict):
        tree = source
    else:
        path = resolve_recipe_path(source)
        tree = read_yaml(path) or {}
        if not isinstance(tree, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        apply_override(tree, *parse_override(item))
    recipe = validate_model(model, tree)
    recipe.layout  # validated here, kept on the recipe
    return recipe


def resolve_recipe_path(source: str | Path) -> Path:
    """A path, or the name of a bundled recipe (`quickstart`, `viva_grpo`, ...)."""
    path = Path(source)
    if path.is_file():
        return path
    bundled = bundled_recipes()
    name = path.name.removesuffix(".yaml")
    if name in bundled and str(path.parent) in (".", "recipes"):
        return bundled[name]
    hint = did_you_mean(name, list(bundled))
    raise RecipeError(f"recipe {str(source)!r} not found{hint}; bundled recipes: {', '.join(sorted(bundled)) or 'none'}")


def bundled_recipes() -> dict[str, Path]:
    """Recipes shipped in the package (the repo's recipes/ folder), by name."""
    from importlib import resources

    root = Path(str(resources.files("editrl.recipes")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """The fully resolved recipe (defaults filled in), so a run directory says exactly what ran."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))

