"""The on-disk format of paired edit data, and its loader.

A data folder holds media files and a `manifest.jsonl`, one JSON object per line, paths relative to
the folder (absolute paths work too):

    {"id": "a1", "instruction": "remove the red circle", "source": "videos/a1_src.mp4",
     "target": "videos/a1_tgt.mp4", "reference": "images/a1_ref.png", "mask": "masks/a1.npz",
     "category": "remove", "edited": null, "meta": {}}

Only `id`, `instruction` and `source` are required: a folder of a user's own videos and instructions
is read exactly like the synthetic data. Masks are `.npz` files holding a bool array `mask` of shape
(T, 1, H, W), (T, H, W) or (H, W) (one mask for every frame), True where change is allowed.
Every row is checked when the dataset is opened (JSON, keys, non-empty instruction, files present, inside the
folder and readable); a bad row is reported as `manifest.jsonl:LINE: problem` and skipped or fatal (`on_error`).
Media paths must stay inside the manifest's folder, where they lead once links are followed (`..`, an absolute path
elsewhere, or a symlink inside the folder that points out of it are refused), so a manifest from elsewhere cannot make
training read, or a judge receive, arbitrary files; `allow_outside: true` (a data option, or `--allow-outside` for
`editrl data check`, `eval` and `judge`) lifts this for a manifest you wrote yourself. A mask must be binary (bool,
or 0/1 numbers): a mask of fractions or NaN is refused, never rounded into an edit region.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError, field_validator

from editrl.data.video import MediaError, probe_video, read_image, read_video, write_image, write_video
from editrl.base import DataError, StrictModel
from editrl.files import resolved, unique_keys, within
from editrl.types import EditSample

MANIFEST_NAME = "manifest.jsonl"
MEDIA_FIELDS = ("source", "target", "reference", "mask", "edited")
VIDEO_FIELDS = ("source", "target", "edited")

logger = logging.getLogger(__name__)


class ManifestError(DataError):
    """A manifest problem; the message starts with `file:line:` when a row is at fault."""


class ManifestRow(StrictModel):
    """One line of a manifest. The field order is the order written to disk."""

    id: str
    instruction: str
    source: str
    target: str | None = None
    reference: str | None = None
    mask: str | None = None
    category: str | None = None
    edited: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id", "instruction", "source")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


@dataclass(frozen=True)
class ManifestEntry:
    """A validated row with the folder its paths are relative to and its line number (for messages)."""

    row: ManifestRow
    root: Path
    line: int
    manifest: Path
    shape: tuple[int, int, int] | None = None  # the source's (frames, height, width), when its frames were decoded

    def path(self, name: str) -> Path | None:
        value = getattr(self.row, name)
        return None if value is None else self.root / value

    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


def manifest_path(path: str | Path) -> Path:
    """A data folder or its manifest file -> the manifest file (FileNotFoundError naming what is missing)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    return path


# ---------------------------------------------------------------- writing


def save_mask(path: str | Path, mask: torch.Tensor | np.ndarray) -> Path:
    """A bool mask as a compressed `.npz` (key `mask`), byte-identical for identical masks.

    `np.savez_compressed` stamps the current time into the zip entry; a fixed timestamp keeps
    generated data folders byte-reproducible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    info = zipfile.ZipInfo("mask.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(info, buffer.getvalue())
    return path


def load_mask(path: str | Path, frames: int | None = None) -> torch.Tensor:
    """An `.npz` mask as (T, 1, H, W) bool; a single (H, W) mask is repeated for `frames` frames."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"mask not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mask" not in data.files:
                raise MediaError(f"{path} has no array named 'mask' (found: {', '.join(data.files) or 'none'})")
            array = data["mask"]
    except MediaError:
        raise
    except Exception as e:  # numpy raises several kinds for a corrupt zip
        raise MediaError(f"cannot read mask {path}: {e}") from e
    if array.dtype != bool:
        try:
            odd = array[(array != 0) & (array != 1)]  # NaN is neither
        except TypeError:  # strings, objects
            raise MediaError(f"mask {path} holds {array.dtype} values: a mask is true/false (or 0/1)") from None
        if odd.size:
            raise MediaError(f"mask {path} holds values other than 0 and 1 (e.g. {odd.flat[0]}): a mask is binary, "
                             "true where the edit may change pixels; threshold it and save it as bool")
    mask = torch.from_numpy(array.astype(bool))
    if mask.dim() == 2:
        mask = mask[None, None].expand(frames or 1, 1, *mask.shape).clone()
    elif mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise MediaError(f"mask {path} must be (T, 1, H, W), (T, H, W) or (H, W), got {tuple(array.shape)}")
    return mask


def write_sample(folder: str | Path, sample: EditSample, fps: int = 8) -> ManifestRow:
    """Write a sample's media under `folder` (videos losslessly, so ground truth stays exact); its row."""
    folder = Path(folder)
    if sample.source is None:
        raise ValueError(f"sample {sample.id!r} has no source video")
    row: dict[str, Any] = {"id": sample.id, "instruction": sample.instruction, "category": sample.category}
    row["source"] = f"videos/{sample.id}_src.mp4"
    write_video(folder / row["source"], sample.source, fps=fps, lossless=True)
    if sample.target is not None:
        row["target"] = f"videos/{sample.id}_tgt.mp4"
        write_video(folder / row["target"], sample.target, fps=fps, lossless=True)
    if sample.edited is not None:
        row["edited"] = f"videos/{sample.id}_edit.mp4"
        write_video(folder / row["edited"], sample.edited, fps=fps, lossless=True)
    if sample.reference is not None:
        row["reference"] = f"images/{sample.id}_ref.png"
        write_image(folder / row["reference"], sample.reference)
    if sample.mask is not None:
        row["mask"] = f"masks/{sample.id}.npz"
        save_mask(folder / row["mask"], sample.mask)
    return ManifestRow(**row, meta=sample.meta)


def write_manifest(folder: str | Path, rows: list[ManifestRow]) -> Path:
    """`folder/manifest.jsonl`, one row per line in the given order (deterministic bytes)."""
    path = Path(folder) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r.model_dump(), ensure_ascii=False, sort_keys=False) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- reading


def manifest_inputs(path: str | Path) -> list[Path]:
    """The manifest file and every media file its rows name (rows as written, none checked): what a command that
    reads this folder must never write over (`editrl.files.check_output`)."""
    manifest = Path(path) / MANIFEST_NAME if Path(path).is_dir() else Path(path)
    found = [manifest]
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return found  # reading it for real reports the problem
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            found += [manifest.parent / row[name] for name in MEDIA_FIELDS if isinstance(row.get(name), str)]
    return found


def _probe_image(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MediaError(f"cannot read image {path}: {e}") from e


def _fitted_mask(path: Path, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The mask at `path` for a source of (T, C, H, W) `shape`: one (T, 1, H, W) mask, or a MediaError naming it."""
    mask = load_mask(path, frames=shape[0])[: shape[0]]
    if tuple(mask.shape) != (shape[0], 1, *shape[2:]):
        t, h, w = shape[0], *shape[2:]
        raise MediaError(f"mask {name} is {tuple(mask.shape)}; a source of {t} frames of {h}x{w} needs ({t}, 1, {h}, {w})")
    return mask


def _outside(entry: ManifestEntry) -> str | None:
    """The first media field whose file is outside the manifest's folder: by `..`, an absolute path elsewhere, or a
    link inside the folder that points out of it."""
    for name in MEDIA_FIELDS:
        path = entry.path(name)
        if path is not None and not within(path, entry.root):
            return name
    return None


def _check_entry(entry: ManifestEntry, decode: bool) -> tuple[int, int, int] | None:
    """Every media file of a row is there and opens; with `decode`, every video decodes to the source's shape.
    Returns the source's (frames, height, width) when decoded."""
    shape = None
    for name in MEDIA_FIELDS:
        path = entry.path(name)
        if path is None:
            continue
        value = getattr(entry.row, name)
        if not path.is_file():
            raise MediaError(f"{name} {value} is not a file" if path.exists() else f"{name} file {value} not found")
        if name in VIDEO_FIELDS:
            dims = probe_video(path, decode)
            if decode and shape is None:
                shape = dims
            elif decode and dims != shape:
                raise MediaError(f"{name} {value} is {dims[0]} frames of {dims[1]}x{dims[2]} but source is "
                                 f"{shape[0]} frames of {shape[1]}x{shape[2]}")
        elif name == "reference":
            _probe_image(path)
        elif shape is not None:
            _fitted_mask(path, value, (shape[0], 1, *shape[1:]))
        else:
            load_mask(path)
    return shape


def batch_problem(entries: list[ManifestEntry], limit: int = 5) -> str | None:
    """Why decoded rows cannot share a batch (their sources differ in shape), naming the odd files; None if they can."""
    groups: dict[tuple[int, int, int], list[ManifestEntry]] = {}
    for e in entries:
        if e.shape is not None:
            groups.setdefault(e.shape, []).append(e)
    if len(groups) < 2:
        return None
    common, *others = sorted(groups, key=lambda k: -len(groups[k]))
    odd = [e for k in others for e in groups[k]]
    sizes = ", ".join(f"{len(groups[k])} of {k[0]} frames of {k[1]}x{k[2]}" for k in (common, *others))
    names = ", ".join(f"{e.row.source} (line {e.line})" for e in odd[:limit]) + (" ..." if len(odd) > limit else "")
    return (f"source clips differ in size ({sizes}) and a batch needs one size: resize or trim them, or split the "
            f"folder; not {common[0]} frames of {common[1]}x{common[2]}: {names}")


def _row_error(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "missing":
            problems.append(f"missing key {key!r}")
        elif e["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}")
        else:
            problems.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def load_manifest(
    path: str | Path,
    on_error: Literal["skip", "fail"] = "fail",
    check_media: bool = True,
    decode: bool = False,
    allow_outside: bool = False,
) -> list[ManifestEntry]:
    """Parse and check every row. Bad rows raise ManifestError (`fail`) or are logged and dropped (`skip`).

    `check_media` opens each referenced file (headers only) so that an unreadable video is reported with its line
    number now rather than as a crash mid-training; `decode` (`editrl data check`) decodes every frame too, and
    records each source's shape for `batch_problem`.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    manifest = manifest_path(path)
    root = manifest.parent
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    with manifest.open(encoding="utf-8") as f:
        lines = list(f)
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            try:
                data = json.loads(text, object_pairs_hook=unique_keys)
            except json.JSONDecodeError as e:
                raise ManifestError(f"not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:
                raise ManifestError(f"not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise ManifestError(f"a row must be a JSON object, got {type(data).__name__}")
            try:
                row = ManifestRow.model_validate(data)
            except ValidationError as e:
                raise ManifestError(_row_error(e)) from None
            if row.id in seen:
                raise ManifestError(f"duplicate id {row.id!r} (first on line {seen[row.id]})")
            entry = ManifestEntry(row, root, number, manifest)
            outside = None if allow_outside else _outside(entry)
            if outside is not None:
                real = resolved(entry.path(outside))  # type: ignore[arg-type]
                link = f" (a link to {real})" if real != Path(os.path.normpath(entry.path(outside).absolute())) else ""  # type: ignore[union-attr]
                raise ManifestError(
                    f"{outside} {getattr(row, outside)}{link} is outside the data folder {root}: move it in, or allow it "
                    "with the data option allow_outside: true (editrl data check --allow-outside)"
                )
            if check_media:
                entry = ManifestEntry(row, root, number, manifest, _check_entry(entry, decode))
        except (ManifestError, MediaError) as e:
            message = f"{manifest}:{number}: {e}"
            if on_error == "fail":
                raise ManifestError(message) from None
            logger.warning("skipping row: %s", message)
            problems.append(message)
            continue
        seen[row.id] = number
        entries.append(entry)
    if not entries:
        detail = f" ({len(problems)} bad rows skipped; first: {problems[0]})" if problems else ""
        raise ManifestError(f"{manifest}: no usable rows{detail}")
    return entries


def load_sample(entry: ManifestEntry, max_frames: int | None = None) -> EditSample:
    """Decode a row's media into an EditSample; any media problem is reported with the row's line."""
    try:
        return _decode(entry, max_frames)
    except MediaError as e:
        raise MediaError(f"{entry.where()}: {e}") from None


def _decode(entry: ManifestEntry, max_frames: int | None) -> EditSample:
    row = entry.row

    def video(name: str) -> torch.Tensor | None:
        path = entry.path(name)
        return None if path is None else read_video(path, max_frames=max_frames)

    source = read_video(entry.root / row.source, max_frames=max_frames)
    target, edited = video("target"), video("edited")
    for name, value in (("target", target), ("edited", edited)):
        if value is not None and value.shape != source.shape:
            raise MediaError(f"{name} {getattr(row, name)} is {tuple(value.shape)} but source is {tuple(source.shape)}")
    mask_path = entry.path("mask")
    mask = None if mask_path is None else _fitted_mask(mask_path, row.mask, tuple(source.shape))  # type: ignore[arg-type]
    reference_path = entry.path("reference")
    return EditSample(
        id=row.id,
        instruction=row.instruction,
        source=source,
        reference=read_image(reference_path) if reference_path is not None else None,
        target=target,
        mask=mask,
        category=row.category,
        edited=edited,
        meta=dict(row.meta),
    )


class ManifestDataset:
    """Dataset kind `manifest`: a folder (or manifest file) of paired or unpaired edit requests."""

    class Options(StrictModel):
        path: str
        on_error: Literal["skip", "fail"] = "fail"
        max_frames: int | None = Field(None, ge=1)
        allow_outside: bool = False  # media paths may leave the manifest's folder (only for a manifest you trust)

        def check(self) -> None:
            manifest_path(self.path)

    def __init__(self, options: Options) -> None:
        self.options = options
        self.entries = load_manifest(options.path, on_error=options.on_error, allow_outside=options.allow_outside)
        self.broken: set[int] = set()  # rows that failed to decode mid-run (`skip`): never decoded again

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> EditSample:
        """Row `index`; under `on_error: skip` a row whose media fail to decode is reported once and the next good
        row takes its place (deterministically, so every rank and a resumed run draw the same)."""
        n = len(self.entries)
        for i in ((index + k) % n for k in range(n)):
            if i in self.broken:
                continue
            try:
                return load_sample(self.entries[i], max_frames=self.options.max_frames)
            except MediaError as e:
                if self.options.on_error == "fail":
                    raise MediaError(f"{e} (find every such clip with `editrl data check`, or set on_error: skip)") from None
                self.broken.add(i)
                logger.warning("skipping row: %s; the next row takes its place", e)
        raise ManifestError(f"{self.entries[0].manifest}: no row decodes (run `editrl data check` on it)")

    @property
    def categories(self) -> list[str | None]:
        """Each row's category without decoding any media (for per-category selection and reports)."""
        return [e.row.category for e in self.entries]
