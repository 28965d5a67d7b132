"""Atomic checkpoints and exact resume.

A checkpoint is a directory `<run>/checkpoints/step_000010/` holding the resolved `recipe.yaml`, the
policy's trainable weights (safetensors, written by `policy.save_trainable`), and `state.pt` (optimiser,
LR schedule, EMA, RNG states; read back with `torch.load(weights_only=True)`) plus `state.json` (step, data
cursor). It is written under a temporary name and renamed into place, and `<run>/checkpoints/latest` is
replaced atomically after it, so a run killed at any instant leaves the previous checkpoint intact.

`checksums.json` lists every other file's size and sha256. A file damaged later (a full disk, a copy cut short)
is found before anything deserialises it: a run directory then yields its newest intact checkpoint, with one
warning naming the damaged one. A file checksums.json does not list (written before checksums existed, or its list
lost) is checked by its format instead. `find_checkpoint` is the one way in: no library reads a file before it passed.

Checkpoints are ordered by their step, never by name (`step_1000000` sorts before `step_999999`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from editrl.base import CheckpointError, RecipeError
from editrl.config import Recipe, dump_recipe, read_yaml

LATEST = "latest"
CHECKSUMS = "checksums.json"
FORMATS = ("state.pt", "state.json", "recipe.yaml")  # besides *.safetensors: the files editrl reads from a checkpoint

logger = logging.getLogger(__name__)


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_steps(root: Path) -> list[Path]:
    """The `step_N` checkpoint folders under `root`, oldest first by N."""
    found = []
    for path in root.glob("step_*") if root.is_dir() else []:
        digits = path.name.removeprefix("step_")
        if digits.isdigit() and path.is_dir():
            found.append((int(digits), path))
    return [path for _, path in sorted(found)]


def clean_interrupted(root: Path) -> list[str]:
    """What saves cut short by a crash left under `root` (any process's): half-written `.tmp-*` folders and `latest`
    files are removed; a `.old-*` copy whose replacement never landed is put back. Call it only while holding the run's
    lock (nobody else is saving). Returns what it did, one phrase each."""
    done: list[str] = []
    if not root.is_dir():
        return done
    for path in sorted(root.glob(".tmp-*")) + sorted(root.glob(f"{LATEST}.tmp-*")):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        done.append(f"removed {path.name}")
    for path in sorted(root.glob(".old-*")):
        name = path.name.removeprefix(".old-").rpartition("-")[0]
        if name and not (root / name).exists():
            os.replace(path, root / name)
            done.append(f"restored {name}")
        else:
            shutil.rmtree(path)
            done.append(f"removed {path.name}")
    return done


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
    try:
        _write_atomic(root / LATEST, final.name)
    except OSError as e:
        raise _unwritable(final, e) from None
    steps = checkpoint_steps(root)
    for old in [p for p in steps if p != final][: max(0, len(steps) - keep)]:  # the oldest, never the one just saved
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(
    final: Path, step: int, recipe: Recipe, policy: Any, info: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint directory `final` (`state.pt` only with a `training_state` to resume from), written under a
    temporary name and swapped in: a crash at any instant leaves the previous one or the new one whole."""
    tmp, old = (final.with_name(f".{mark}-{final.name}-{os.getpid()}") for mark in ("tmp", "old"))
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        policy.save_trainable(tmp)
        dump_recipe(recipe, tmp / "recipe.yaml")
        if training_state is not None:
            torch.save({**training_state, "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=1))
        write_checksums(tmp)
        _fsync_dir(tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch says "unexpected pos", safetensors "os error 28"
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unwritable(final, e) from None
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _unwritable(final: Path, error: BaseException) -> CheckpointError:
    """A checkpoint that could not be written: why, the disk's free space, and that the earlier ones are intact."""
    try:
        free = f"{shutil.disk_usage(final.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    cause = " ".join(str(error).split())[:200] or type(error).__name__
    return CheckpointError(
        f"cannot write checkpoint {final} ({cause}; {free}): the checkpoints saved before it are intact; free some "
        "space, then continue with --resume"
    )


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
    """What is wrong with checkpoint `ckpt` as written (a file missing, cut short, altered or not what its name says),
    or None. Files checksums.json lists are compared with it; the others that editrl reads, by their format."""
    for name in ("recipe.yaml", "state.json"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    sums: dict[str, tuple[int, str]] = {}
    if (ckpt / CHECKSUMS).is_file():
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
    files = [f for f in sorted(ckpt.iterdir()) if f.is_file()]
    if all(f.name in (*FORMATS, CHECKSUMS) for f in files):
        return "it holds no weights"
    for f in (f for f in files if f.name in FORMATS or f.suffix == ".safetensors"):
        problem = None if f.name in sums else _format_problem(f)
        if problem is not None:
            return f"{f.name} {problem}"
    return None


def _format_problem(path: Path) -> str | None:
    """Why a checkpoint file unlisted in checksums.json is not what its name says (cut short, altered), or None."""
    size = path.stat().st_size
    try:
        if path.suffix == ".safetensors":  # an 8-byte header length, a JSON header, then the tensors' bytes
            with open(path, "rb") as fh:
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
            if not isinstance(header, dict):
                return "is damaged (no safetensors header)"
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
            if 8 + n + max(ends, default=0) != size:
                return f"has {size} bytes where its header says {8 + n + max(ends, default=0)}"
        elif path.name == "state.pt":
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                return f"is damaged ({bad} fails its CRC)"
        elif path.name == "state.json":
            int(json.loads(path.read_text())["step"])
        elif path.name == "recipe.yaml" and not isinstance(read_yaml(path), dict):
            return "is damaged (not a recipe)"
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, zipfile.BadZipFile, RecipeError):
        return "is damaged"
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
    steps = checkpoint_steps(root)[::-1]
    latest = root / LATEST
    try:
        named = root / latest.read_text().strip() if latest.is_file() else None
    except (OSError, UnicodeDecodeError):
        named = None
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
    """(tensor state: optimiser, scheduler, EMA, torch RNG; info: step, data cursor, ...). Only torch's RNG is global
    state worth restoring: every sampling seed is derived from (seed, step)."""
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no state.pt to resume from (a best or exported checkpoint holds weights "
                              f"only): start a new run from it with policy.init_from={ckpt}") from None
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False, which runs the file's code
        raise CheckpointError(
            f"{ckpt / 'state.pt'} holds Python objects besides tensors, which editrl never writes there: it was not "
            "written by editrl or was altered, and loading it could run code, so it is not loaded; start a new run "
            f"from this checkpoint's weights with policy.init_from={ckpt}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{ckpt / 'state.pt'} is damaged ({' '.join(str(e).split())[:120]}): restore it, or "
                              f"start a new run from this checkpoint's weights with policy.init_from={ckpt}") from None
    info = json.loads((ckpt / "state.json").read_text())
    return state, info


def policy_from_recipe(recipe: Recipe, device: str | None = None, init_from: bool = True) -> Any:
    """The one way a policy is built from a recipe: the registered policy, its LoRA (if any), and the
    `policy.init_from` checkpoint's trainable weights unless `init_from=False` (the caller loads them later)."""
    from editrl.policy import DenoiserOptions, build_policy

    options, d = recipe.plugin_options("policy", recipe.policy.options), recipe.distributed
    if d.backend == "deepspeed" and d.zero_stage == 3 and isinstance(options, DenoiserOptions) and options.compile is None:
        options = options.model_copy(update={"compile": False})  # ZeRO-3 cannot run compiled blocks (refused if asked)
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

    tree = read_yaml(ckpt / "recipe.yaml") or {}
    model = SftRecipe if isinstance(tree, dict) and "sft" in tree else Recipe
    try:
        recipe = load_recipe(tree, check_paths=False, model=model)
    except RecipeError as e:
        raise RecipeError(f"{ckpt / 'recipe.yaml'}: {e}") from None
    recipe.policy.init_from = None  # the checkpoint holds everything that was loaded from it
    return recipe
