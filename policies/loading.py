"""Loading pretrained parts by path or hub id, with errors that name the component and the recipe key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, TypeVar

from editrl.base import RecipeError

T = TypeVar("T")
# "org/name", or "org/name/sub/folder" for one component of a hub repo (e.g. a diffusers pipeline's transformer/).
_HUB_ID = re.compile(r"^(?P<repo>[\w-][\w.-]*/[\w.-]+)(?:/(?P<subfolder>[\w.-]+(?:/[\w.-]+)*))?$")


def resolve(component: str, path: str) -> dict[str, Any]:
    """`from_pretrained` arguments for a local directory or a hub id; anything else is an error naming `component`."""
    local = Path(path).expanduser()
    if local.exists():
        return {"pretrained_model_name_or_path": str(local.resolve())}
    hub = _HUB_ID.match(path)
    if hub is None:
        raise RecipeError(
            f"policy.options.{component}: {path} does not exist (give a local directory or a hub id 'org/name[/subfolder]')"
        )
    args: dict[str, Any] = {"pretrained_model_name_or_path": hub["repo"]}
    if hub["subfolder"]:
        args["subfolder"] = hub["subfolder"]
    return args


def missing(component: str, path: str, config: str = "config.json") -> str | None:
    """Why `path` cannot be loaded here without a download (None: it can): a local directory without its `config`
    file (a tokenizer's is tokenizer_config.json), or a hub id whose `config` is not in the local Hugging Face cache.
    Used by dry runs; reads nothing big."""
    local = Path(path).expanduser()
    if local.exists():
        return None if (local / config).is_file() else f"{component}: {path} has no {config} (not a saved model)"
    hub = _HUB_ID.match(path)
    if hub is None:
        return f"{component}: {path} does not exist (give a local directory or a hub id 'org/name[/subfolder]')"
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub["repo"], f"{hub['subfolder']}/{config}" if hub["subfolder"] else config), str):
        return None
    include = f" --include '{hub['subfolder']}/*'" if hub["subfolder"] else ""
    return (f"{component}: {path} is not in the local Hugging Face cache; fetch it with "
            f"`huggingface-cli download {hub['repo']}{include}` or give a local directory")


def load(component: str, what: str, path: str, loader: Callable[..., T], **kwargs: Any) -> T:
    """`loader` (a `from_pretrained`) on `path`, its failures one RecipeError line naming the component."""
    try:
        return loader(**resolve(component, path), **kwargs)
    except RecipeError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"policy.options.{component}: cannot load a {what} from {path}: {reason[:300]}") from e


def check(component: str, ok: bool, message: str) -> None:
    """A loaded part that does not fit the others (wrong channels, widths, family)."""
    if not ok:
        raise RecipeError(f"policy.options.{component}: {message}")
