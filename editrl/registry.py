"""Name -> factory registries for every pluggable concept (policies, rewards, SDE kinds, datasets).

A plugin is found in one of three ways, in this order: registered in code (decorator), registered by
a Python entry point of the registry's group (so a user's package needs no change in editrl), or
named directly as a lazy ``"pkg.module:Attr"`` string in a recipe.
"""

from __future__ import annotations

import difflib
import importlib
import traceback
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

from editrl.base import EditrlError, RecipeError

T = TypeVar("T")


class RegistryError(EditrlError, KeyError):
    """Unknown, duplicate or unloadable plugin name; the message is meant for the user as is."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """' (did you mean 'x'?)' or '' — used by every error about a misspelt name."""
    close = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def is_editrl(module_name: str) -> bool:
    """Whether a module is editrl's own: a plugin of ours that fails is a bug and keeps its traceback, a user's
    plugin that fails is a one-line error (import) or an invalid score (reward)."""
    return module_name.split(".")[0] == "editrl"


def import_string(path: str) -> Any:
    """Resolve ``"pkg.mod:Attr"`` (or ``"pkg.mod:Outer.inner"``)."""
    module_name, _, attr = path.partition(":")
    if not attr:
        raise RegistryError(f"{path!r} is not of the form 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"cannot import module {module_name!r} for {path!r}: {e}") from e
    except (Exception, SystemExit) as e:
        if is_editrl(module_name) and not isinstance(e, SystemExit):
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise RegistryError(
            f"importing {module_name!r} for {path!r} {_raised(e)} ({where.filename}:{where.lineno}): fix that module"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """A named collection of factories. Values may be registered lazily as import strings."""

    def __init__(self, kind: str, entry_point_group: str | None = None, builtins: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.group = entry_point_group
        self._items: dict[str, T | str] = dict(builtins or {})
        self._entry_points_loaded = False

    def register(self, name: str, obj: T | str | None = None) -> Any:
        """`registry.register("x", Factory)`, `registry.register("x", "pkg.mod:Factory")` or as a decorator."""
        if obj is None:

            def deco(o: T) -> T:
                self.register(name, o)
                return o

            return deco
        if name in self._items and self._items[name] is not obj:
            raise RegistryError(f"{self.kind} {name!r} is already registered ({self._describe(name)})")
        self._items[name] = obj
        return obj

    def _describe(self, name: str) -> str:
        v = self._items[name]
        return v if isinstance(v, str) else f"{getattr(v, '__module__', '?')}:{getattr(v, '__qualname__', v)}"

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or self.group is None:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.group):
            if ep.name in self._items:
                if self._items[ep.name] == ep.value:
                    continue
                raise RegistryError(
                    f"{self.kind} {ep.name!r} from entry point {ep.value!r} clashes with {self._describe(ep.name)}"
                )
            self._items[ep.name] = ep.value

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The factory for `name`, importing it if it was registered lazily."""
        self._load_entry_points()
        if name not in self._items:
            if ":" in name:
                return import_string(name)
            raise RegistryError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; known: {', '.join(self.names())}")
        obj = self._items[name]
        if isinstance(obj, str):
            obj = import_string(obj)
            self._items[name] = obj
        return obj

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """`name`'s factory called with these arguments. A user's plugin that raises while it starts (a missing
        weights file, say) is one line; editrl's own keep their traceback (a bug), and an EditrlError passes as is."""
        factory: Callable[..., Any] = self.get(name)  # type: ignore[assignment]
        try:
            return factory(*args, **kwargs)
        except EditrlError:
            raise
        except (Exception, SystemExit) as e:
            if is_editrl(getattr(factory, "__module__", None) or "") and not isinstance(e, SystemExit):
                raise
            raise RecipeError(f"{self.kind} {name!r} could not be built: {_raised(e).removeprefix('raised ')}") from e


def _raised(error: BaseException) -> str:
    """`raised ValueError: why`, or `called sys.exit(0)`: what a user's plugin did instead of working."""
    if isinstance(error, SystemExit):
        return f"called sys.exit({error.code!r})"
    return f"raised {type(error).__name__}: {error}"


# Built-in plugins, registered lazily so that importing editrl imports no model code.
POLICIES: Registry[Any] = Registry(
    "policy",
    "editrl.policies",
    {
        "toy_t2v": "editrl.policies.toy:ToyT2VPolicy",
        "viva": "editrl.policies.viva:VivaPolicy",
        "qwen_image_edit": "editrl.policies.image.qwen_image_edit:QwenImageEditPolicy",
        "flux_kontext": "editrl.policies.image.flux_kontext:FluxKontextPolicy",
    },
)
REWARDS: Registry[Any] = Registry(
    "reward",
    "editrl.rewards",
    {
        "brightness": "editrl.rewards.simple:Brightness",
        "target_color": "editrl.rewards.simple:TargetColor",
        "vlm_fidelity": "editrl.rewards.vlm_judge.judges:Fidelity",
        "vlm_preservation": "editrl.rewards.vlm_judge.judges:Preservation",
        "vlm_aesthetics": "editrl.rewards.vlm_judge.judges:Aesthetics",
        "edit_reward": "editrl.rewards.vlm_judge.judges:EditReward",
        "viescore": "editrl.rewards.vlm_judge.judges:VieScore",
        "iqa": "editrl.rewards.iqa:Iqa",
        "pixel_preservation": "editrl.rewards.pixel:Preservation",
        "temporal_consistency": "editrl.rewards.pixel:TemporalConsistency",
        "oracle_fidelity": "editrl.rewards.oracle:OracleFidelity",
        "oracle_preservation": "editrl.rewards.oracle:OraclePreservation",
    },
)
DATASETS: Registry[Any] = Registry(
    "dataset",
    "editrl.datasets",
    {
        "prompts": "editrl.data.prompts:PromptDataset",
        "manifest": "editrl.data.manifest:ManifestDataset",
        "synthetic": "editrl.data.synth:SyntheticDataset",
    },
)
