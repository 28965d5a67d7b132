"""Synthetic paired edit data: (source video, instruction, [reference image], target video, edit mask).

The paper builds its paired data by editing real videos with models; on a CPU and for exact ground
truth, editrl draws procedural scenes instead (`scenes.py` renders them, `procedural.py` edits them).

Generators are plugins behind `PairGenerator` (registry `GENERATORS`, entry-point group
`editrl.generators`): `generate(op, rng, sample_id) -> EditSample`. The procedural one is the first;
a model-based one (image editing + image-to-video) only has to return the same EditSample, and
`synthesize` writes it through the manifest writer, so the loader never changes. This module writes
and caches the data folders and is the `synthetic` dataset kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import Field, field_validator

from editrl import monitor
from editrl.data.manifest import MANIFEST_NAME, ManifestDataset, ManifestRow, write_manifest, write_sample
from editrl.base import DataError, StrictModel
from editrl.registry import Registry, RegistryError, did_you_mean
from editrl.types import EditSample



@runtime_checkable
class PairGenerator(Protocol):
    """Makes one paired sample for an operation; all randomness comes from `rng` (reproducibility)."""

    name: str
    version: str  # part of the cache key: bump it when the output for a seed changes
    ops: tuple[str, ...]

    def generate(self, op: str, rng: np.random.Generator, sample_id: str) -> EditSample: ...


GENERATORS: Registry[Any] = Registry(
    "pair generator", "editrl.generators", {"procedural": "editrl.data.procedural:ProceduralGenerator"}
)


def check_frames(frames: int) -> int:
    """Wan-style video VAEs compress time 4x after the first frame, so clips have 4k+1 frames."""
    if frames < 1 or frames % 4 != 1:
        raise DataError(f"frames must be 4k+1 (5, 9, 13, ...) for video VAEs, got {frames}")
    return frames


# ---------------------------------------------------------------- writing a data folder

CLIP_COPIES = 8  # float32 clips a sample needs at once while it is drawn (source, target, layers), measured at 768x768
ROW_BYTES = 1024  # a manifest row kept until the manifest is written


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(n: int, frames: int, size: tuple[int, int], workers: int) -> None:
    """Refuses, before any work, data whose samples (one per worker at a time) and rows cannot fit in memory."""
    need = CLIP_COPIES * frames * int(size[0]) * int(size[1]) * 3 * 4 * workers + n * ROW_BYTES
    have = available_memory()
    if have is not None and need > have:
        raise DataError(
            f"{n} samples of {frames} frames of {size[0]}x{size[1]} need about {need / 2**30:.1f} GiB of memory while "
            f"they are made, and this machine has {have / 2**30:.1f} GiB free: choose a smaller size, fewer frames "
            "or fewer samples (or several folders)"
        )


def build_generator(name: str, frames: int, size: tuple[int, int], **options: Any) -> PairGenerator:
    try:
        return GENERATORS.build(name, frames=frames, size=size, **options)
    except TypeError as e:  # an option the generator does not take
        raise DataError(f"generator {name!r}: {e}") from None


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each sample's own stream: independent of workers and chunking, so any split of the work is identical."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def check_ops(ops: list[str] | tuple[str, ...] | None, known: tuple[str, ...]) -> list[str]:
    """The requested ops (all by default), each checked, with a did-you-mean for a typo."""
    ops = list(known) if not ops else list(ops)
    for op in ops:
        if op not in known:
            raise DataError(f"unknown op {op!r}{did_you_mean(op, known)}; known: {', '.join(known)}")
    return ops


def _make_chunk(spec: dict[str, Any], items: list[tuple[int, str]]) -> list[tuple[int, dict[str, Any]]]:
    """Worker: generate and write some samples; rows come back to be written in index order."""
    torch.set_num_threads(1)
    gen = build_generator(spec["generator"], spec["frames"], spec["size"], **spec["options"])
    out = []
    for index, op in items:
        sample = gen.generate(op, sample_rng(spec["seed"], spec["split"], index), f"{spec['split']}-{index:06d}")
        out.append((index, write_sample(spec["out"], sample).model_dump()))
    return out


def synthesize(
    out: str | Path,
    n: int,
    seed: int = 0,
    ops: list[str] | None = None,
    frames: int = 9,
    size: tuple[int, int] = (64, 64),
    split: str = "train",
    generator: str = "procedural",
    workers: int | None = None,
    progress: bool = True,
    bar: monitor.Bar | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """Generate `n` samples (ops taken in turn, so categories are balanced) into `out`; the manifest path.

    The same arguments give a byte-identical manifest and media, whatever `workers` is. Progress shows on its own
    bar, or advances `bar` (one bar for several datasets). `options` go to the generator (the procedural one's
    scene options: `objects`, `still`, `solid`).
    """
    if n < 1:
        raise DataError(f"n must be at least 1, got {n}")
    check_frames(frames)
    options = dict(options or {})
    gen = build_generator(generator, frames, size, **options)  # validates size and options before any work
    ops = check_ops(ops, gen.ops)
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        raise DataError(f"{out} already holds a {MANIFEST_NAME}; choose an empty folder")
    if workers is None:
        # A worker costs seconds to start (torch import) and one process already does ~30 samples/s at 64x64;
        # on a 2-core machine shared with other work, 2 workers measured slower than 1 (benchmarks/synth_speed.py).
        workers = max(1, min((os.cpu_count() or 1) // 2, 8, n // 500))
    check_memory(n, frames, size, workers)
    out.mkdir(parents=True, exist_ok=True)
    items = [(i, ops[i % len(ops)]) for i in range(n)]
    spec = dict(generator=generator, frames=frames, size=tuple(size), seed=seed, split=split, out=str(out), options=options)
    chunk = max(1, min(64, -(-n // (workers * 4))))
    chunks = [items[i : i + chunk] for i in range(0, n, chunk)]
    rows: dict[int, dict[str, Any]] = {}

    with nullcontext(bar) if bar is not None else monitor.progress("synthetic data", n, enabled=progress) as live:
        if workers == 1:
            for c in chunks:
                rows.update(_make_chunk(spec, c))
                live.update(advance=len(c))
        else:
            import multiprocessing as mp

            # spawn: the parent may hold torch/OpenMP threads that a forked child must not inherit
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_make_chunk, spec, c): len(c) for c in chunks}
                for fut in as_completed(futures):
                    rows.update(fut.result())
                    live.update(advance=futures[fut])
    return write_manifest(out, [ManifestRow(**rows[i]) for i in range(n)])


# ---------------------------------------------------------------- the `synthetic` dataset kind


def cache_root() -> Path:
    return Path(os.environ.get("EDITRL_CACHE", Path.home() / ".cache" / "editrl")) / "synthetic"


class SyntheticDataset:
    """Dataset kind `synthetic`: generated into a cache folder on first use, then read as a manifest."""

    class Options(StrictModel):
        n: int = Field(64, ge=1)
        seed: int = 0
        ops: list[str] | None = None
        frames: int = 9
        size: tuple[int, int] = (64, 64)
        split: str = "train"
        generator: str = "procedural"
        scene: dict[str, Any] = Field(default_factory=dict, description="the generator's options (procedural: "
                                      "objects [lo, hi], still, solid)")
        cache_dir: str | None = None
        max_frames: int | None = Field(None, ge=1)

        @field_validator("frames")
        @classmethod
        def _frames(cls, v: int) -> int:
            return check_frames(v)

        def check(self) -> None:
            try:
                known = GENERATORS.get(self.generator).ops
            except RegistryError as e:
                raise DataError(str(e)) from None
            check_ops(self.ops, known)
            build_generator(self.generator, self.frames, tuple(self.size), **self.scene)
            check_memory(self.n, self.frames, tuple(self.size), 1)

        def folder(self) -> Path:
            """Where this exact data lives: the options that shape the data, and the generator's version."""
            gen = GENERATORS.get(self.generator)
            unkeyed = {"cache_dir", "max_frames"} | (set() if self.scene else {"scene"})  # default data keeps its folder
            keyed = self.model_dump(exclude=unkeyed) | {"version": gen.version}
            digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
            root = Path(self.cache_dir) if self.cache_dir else cache_root()
            return root / f"{self.generator}-{self.split}-n{self.n}-s{self.seed}-{digest}"

    def __init__(self, options: Options) -> None:
        options.check()
        self.folder = ensure_synthetic(options)[0]
        self.data = ManifestDataset(ManifestDataset.Options(path=str(self.folder), max_frames=options.max_frames))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> EditSample:
        return self.data[index]

    @property
    def categories(self) -> list[str | None]:
        return self.data.categories


def prepare_synthetic(*recipes: Any) -> None:
    """Make every synthetic dataset these recipes read, in one "synthetic data" phase (a job's SFT warm start and
    its GRPO run read several)."""
    sources = [d for r in recipes for d in (r.data.train, r.data.eval) if d is not None and d.kind == "synthetic"]
    if sources:
        ensure_synthetic(*[SyntheticDataset.Options.model_validate(d.options) for d in sources])


def ensure_synthetic(*options: SyntheticDataset.Options) -> list[Path]:
    """The cached folders for these options; the missing ones are generated first, under one progress bar.

    Generation goes to a private temporary folder that is renamed into place when complete, so an
    interrupted run leaves nothing half-written and concurrent ranks cannot read a partial folder.
    """
    folders = [o.folder() for o in options]
    todo = {f: o for o, f in zip(options, folders) if not (f / MANIFEST_NAME).is_file()}
    where = ", ".join(sorted({str(f.parent) for f in folders}))
    if not todo:
        monitor.skipped("data", f"cached in {where}")
        return folders
    total = sum(o.n for o in todo.values())
    monitor.announce("data", f"{total} pairs ({', '.join(f'{o.split} {o.n}' for o in todo.values())}) into {where}")
    with monitor.progress("synthetic data", total) as bar:
        for folder, o in todo.items():
            _generate(folder, o, bar)
    return folders


def _generate(folder: Path, options: SyntheticDataset.Options, bar: monitor.Bar) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    synthesize(tmp, options.n, options.seed, options.ops, options.frames, tuple(options.size), options.split,
               options.generator, bar=bar, options=options.scene)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / MANIFEST_NAME).is_file():
            raise
