"""What every layer shares: the strict options model and the errors a user can cause or meet.

An `EditrlError` is a failure whose message is the whole story for a user (a recipe typo, an occupied run
directory, a judge server that does not answer, a file that is not a video): the command line prints it as one
line and exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import socket
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _bool_for_number(value: Any, annotation: Any) -> bool:
    """Whether `value` holds a boolean where `annotation` wants a number (`steps: true` would be read as 1)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _bool_for_number(value, args[0])
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, bool):
            return bool not in args and any(a in (int, float) for a in args)
        return any(_bool_for_number(value, a) for a in args if typing.get_origin(a) in (list, tuple))
    if isinstance(value, bool):
        return annotation in (int, float)
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        items = args[:1] * len(value) if origin is list or args[-1] is Ellipsis else args
        return any(_bool_for_number(v, a) for v, a in zip(value, items))
    return False


class StrictModel(BaseModel):
    """Base for every options model: unknown keys are errors (a typo must never be silently ignored), and so are
    NaN and infinite numbers (`optim.lr=.inf` would train nothing, silently) and booleans given for numbers
    (`train.steps=true` would run one step)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_for_number(value, field.annotation):
            raise ValueError("a number is expected here, not true/false")
        return value


class EditrlError(Exception):
    """A failure meant for the user, worded as one line that names the thing and what to do."""


class RecipeError(EditrlError, ValueError):
    """A recipe problem (one line, key path first): fixed by changing the recipe or an override."""


class TrainingError(EditrlError, RuntimeError):
    """A run that cannot start or must stop: an occupied run directory, nothing to resume, rewards that keep failing."""


class ServiceUnavailable(EditrlError, ConnectionError):
    """A server the run needs (a judge) cannot be used: unreachable, wrong key, model not served; names the URL."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now (a single-process DeepSpeed rendezvous, a local server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DataError(EditrlError, ValueError):
    """Data that cannot be used as given (a manifest row, a media file, an output path); names the file and the fix."""


class CheckpointError(EditrlError, RuntimeError):
    """A checkpoint that cannot be used: damaged with no intact one to fall back to, or unfit for the command."""


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun / deepspeed / accelerate launch; (0, 1, 0) without one."""
    env = os.environ
    try:
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    except ValueError:
        raise RecipeError(
            f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, LOCAL_RANK={env.get('LOCAL_RANK')!r}: "
            "the launcher's rank variables must be integers"
        ) from None
