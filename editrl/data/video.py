"""Video and image I/O with PyAV (bundles ffmpeg) and PIL; tensors are (T, C, H, W) float in [0, 1].

An image is a one-frame video: `read_media` / `probe_media` / `write_media` take either, told apart by the file's
suffix (`IMAGE_SUFFIXES`), so the data layer, `editrl edit` and the judges handle both with one code path.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from editrl.base import DataError


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class MediaError(DataError):
    """A media file that is missing, unreadable or empty; the message names the file."""


def is_image(path: str | Path) -> bool:
    """Whether a media path names an image (by its suffix); anything else is read as a video."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _unreadable(path: Path, decoded: int, error: Exception) -> MediaError:
    where = f" after {decoded} frames (cut short or damaged? re-export it)" if decoded else ""
    return MediaError(f"cannot read video {path}{where}: {error}")


def probe_video(path: str | Path, decode: bool = False) -> tuple[int, int, int]:
    """(frames, height, width) of a video. Headers only (frames 0 when the header does not say), or with `decode`
    every frame decoded without conversion: a clip cut short or with frames of changing size fails here, not mid-run."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video not found: {path}")
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            declared, size = stream.frames, (stream.codec_context.height, stream.codec_context.width)
            if not decode:
                return declared, *size
            for frame in container.decode(stream):
                if not decoded:
                    size = (frame.height, frame.width)
                elif (frame.height, frame.width) != size:
                    raise MediaError(f"{path}: frame {decoded} is {frame.height}x{frame.width}, the first {size[0]}x{size[1]}")
                decoded += 1
    except MediaError:
        raise
    except Exception as e:
        raise _unreadable(path, decoded, e) from e
    if not decoded:
        raise MediaError(f"{path} contains no frames")
    if decoded < declared:
        raise MediaError(f"{path} decodes {decoded} of its {declared} frames (cut short? re-export it)")
    return decoded, *size


def read_video(path: str | Path, max_frames: int | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """All frames (or the first `max_frames`) of a video as (T, C, H, W) float32 in [0, 1].

    `size` (height, width) scales each frame as it is decoded (area averaging), so a long full-HD clip that is to be
    edited small never sits in memory at full size."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video not found: {path}")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            for frame in container.decode(video=0):
                if size is None:
                    frames.append(frame.to_ndarray(format="rgb24"))
                else:
                    frames.append(frame.to_ndarray(format="rgb24", height=size[0], width=size[1], interpolation="AREA"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except MediaError:
        raise
    except Exception as e:  # PyAV raises a family of FFmpeg errors; the user needs the file name
        raise _unreadable(path, len(frames), e) from e
    if not frames:
        raise MediaError(f"{path} contains no frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0


def to_uint8(frames: Tensor) -> np.ndarray:
    """(T, C, H, W) float in [0, 1] -> (T, H, W, C) uint8, rounding (not truncating)."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_video(path: str | Path, frames: Tensor, fps: int = 8, lossless: bool = False) -> Path:
    """Write (T, C, H, W) in [0, 1] as H.264 mp4. `lossless` keeps exact RGB (libx264rgb, crf 0)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_uint8(frames)
    t, h, w, _ = data.shape
    if not lossless and (h % 2 or w % 2):
        raise MediaError(f"H.264 in yuv420p needs even sizes, got {h}x{w} for {path}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.options = {"crf": "0"} if lossless else {"crf": "18"}
        for frame in data:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """The PIL image at `path`; whatever PIL raises while it is open becomes a MediaError naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise MediaError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            yield img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # a truncated file is an OSError
        raise MediaError(f"cannot read image {path}: {e}") from e


def probe_image(path: str | Path, decode: bool = False) -> tuple[int, int, int]:
    """(1, height, width) of an image as it is shown (a photo's EXIF orientation applied): the header only, or with
    `decode` every pixel decoded."""
    with _opened(Path(path)) as img:
        if decode:
            img.load()
        w, h = img.size
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # stored rotated by 90 degrees
    return (1, w, h) if turned else (1, h, w)


def probe_media(path: str | Path, decode: bool = False) -> tuple[int, int, int]:
    """(frames, height, width) of a video or an image (one frame)."""
    return probe_image(path, decode) if is_image(path) else probe_video(path, decode)


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> Tensor:
    """An image file as (C, H, W) float32 in [0, 1] (RGB, upright); `size` (height, width) scales it by area
    averaging, as `read_video` does its frames."""
    from PIL import Image, ImageOps

    with _opened(Path(path)) as img:
        img = ImageOps.exif_transpose(img)
        wide = img.mode == "I" or img.mode.startswith("I;16")  # 16-bit greyscale: PIL's RGB would clip it to white
        img = img.convert("F" if wide else "RGB")
    if size is not None and (size[0], size[1]) != (img.height, img.width):
        img = img.resize((size[1], size[0]), Image.Resampling.BOX)
    if wide:
        return torch.from_numpy(np.asarray(img) / 65535).float().clamp(0, 1).expand(3, -1, -1).contiguous()
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


def read_media(path: str | Path, max_frames: int | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """A video, or an image as a one-frame video: (T, C, H, W) float32 in [0, 1]."""
    return read_image(path, size)[None] if is_image(path) else read_video(path, max_frames, size)


def write_image(path: str | Path, image: Tensor) -> Path:
    """(C, H, W) in [0, 1] as PNG (lossless)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image[None])[0]).save(path)
    return path


def write_media(stem: str | Path, frames: Tensor, fps: int = 8, lossless: bool = False) -> Path:
    """(T, C, H, W) in [0, 1] at `stem` + a suffix: one frame as a PNG, more as an mp4 (odd sizes losslessly, which
    H.264 in yuv420p cannot hold). The path written."""
    stem = Path(stem)
    if frames.shape[0] == 1:
        return write_image(stem.with_name(stem.name + ".png"), frames[0])
    odd = frames.shape[-1] % 2 or frames.shape[-2] % 2
    return write_video(stem.with_name(stem.name + ".mp4"), frames, fps=fps, lossless=lossless or bool(odd))
