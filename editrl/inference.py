"""`editrl edit`: one edit of a video or an image with a trained checkpoint; also the command-line entry of `editrl sft`.

Only typer is imported at module level (this module is loaded for every `editrl` command); torch and the
models load inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer


def video_fps(path: Path, default: float = 8.0) -> float:
    import av

    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else default


def training_size(recipe: Any) -> tuple[int, int] | None:
    """(height, width) the checkpoint was trained at: its data's `size` option, else the first source clip of its
    manifest when that is still there; None when unknown."""
    from editrl.base import EditrlError
    from editrl.data.manifest import load_manifest
    from editrl.data.video import probe_media
    from editrl.registry import DATASETS

    data = recipe.data.train
    model = getattr(DATASETS.get(data.kind), "Options", None)
    options = model.model_validate(data.options) if model is not None else None
    size, path = getattr(options, "size", None), getattr(options, "path", None)
    if size:
        return int(size[0]), int(size[1])
    if data.kind != "manifest" or path is None:
        return None
    try:
        first = load_manifest(path, check_media=False)[0]
        _, h, w = probe_media(first.root / first.row.source)
    except (EditrlError, OSError):
        return None
    return h, w


def fit_size(size: tuple[int, int], trained: tuple[int, int] | None) -> tuple[tuple[int, int] | None, str | None]:
    """For a video of over twice the training pixel count, the size that scales it down (aspect kept) to that count,
    and a note saying so: the model saw nothing larger, and a full-HD input would run for minutes. (None, None) when
    it is not larger."""
    h, w = size
    if trained is None or h * w <= 2 * trained[0] * trained[1]:
        return None, None
    scale = (trained[0] * trained[1] / (h * w)) ** 0.5
    h2, w2 = max(2, round(h * scale)), max(2, round(w * scale))
    note = f"{h}x{w} scaled to {h2}x{w2}, the pixel count the checkpoint was trained at ({trained[0]}x{trained[1]})"
    return (h2, w2), f"{note}; --keep-size edits at {h}x{w}"


def resize(frames: Any, size: tuple[int, int]) -> Any:
    """(T, C, H, W) in [0, 1] to (height, width): bicubic with antialiasing (area-like when shrinking), clamped."""
    import torch.nn.functional as F

    return F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def run_edit(
    checkpoint: str | Path,
    video: str | Path,
    instruction: str,
    out: str | Path,
    reference: str | Path | None = None,
    steps: int | None = None,
    shift: float | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    device: str = "cpu",
    note: Callable[[str], None] = print,
    keep_size: bool = False,
) -> Path:
    """Edit `video` (a video, or an image: a one-frame video) as `instruction` says and write the result as an mp4
    (a PNG for an image, at the image's size); returns its path.

    The output path is checked first; an input larger than the training size is scaled down unless `keep_size`."""
    import torch

    from editrl.base import CheckpointError, DataError
    from editrl.checkpoint import load_checkpoint
    from editrl.data.video import is_image, probe_media, read_image, read_media, write_image, write_video
    from editrl.files import check_output
    from editrl.monitor import progress
    from editrl.preflight import check_device
    from editrl.rollout import sample_ode
    from editrl.types import EditSample

    video, out = Path(video), Path(out)
    image = is_image(video)
    if not instruction.strip():
        raise DataError("--instruction is empty: say what to change (e.g. --instruction \"make the car red\")")
    check_device(device, "--device")
    check_output(out, [video, *([Path(reference)] if reference is not None else [])], suffix=".png" if image else ".mp4")
    _, *size = probe_media(video)  # a missing or unreadable input fails here, before the checkpoint loads
    ref = read_image(reference) if reference is not None else None
    policy, recipe = load_checkpoint(checkpoint, device)
    if not getattr(policy, "edits_video", True):
        raise CheckpointError(
            f"{checkpoint} holds a {recipe.policy.name!r} policy, which makes videos from text and ignores a source: "
            "`editrl edit` needs the checkpoint of an editing policy (e.g. viva)"
        )
    if guidance_scale is not None:
        if not hasattr(policy, "guidance_scale"):
            raise CheckpointError(f"policy {recipe.policy.name!r} has no guidance_scale to set: drop --guidance-scale")
        policy.guidance_scale = guidance_scale
    scaled, message = (None, None) if keep_size else fit_size((size[0], size[1]), training_size(recipe))
    if message:
        note(f"note: {message}")
    source = read_media(video, size=scaled)
    conform = getattr(policy, "conform_video", None)
    if conform is not None:
        source, message = conform(source)
        if image and source.shape[0] != 1:
            raise CheckpointError(f"{checkpoint} holds a {recipe.policy.name!r} policy, which cannot edit a single "
                                  f"frame ({message}): `editrl edit --image` needs a policy that takes one-frame videos")
        if message and not image:  # an image is resized back to its own size at the end
            note(f"note: {message}")
    n_steps = steps or recipe.sampling.eval_steps or recipe.sampling.steps
    sample = EditSample(id=video.stem, instruction=instruction, source=source, reference=ref)
    with progress("edit", n_steps + 2) as bar, torch.no_grad():
        bar.update(note="encode")
        cond = policy.encode([sample])
        bar.update(advance=1, note="denoise")
        generator = torch.Generator().manual_seed(seed)
        x0 = sample_ode(policy, cond, n_steps, shift or recipe.sampling.shift, generator, lambda: bar.update(advance=1))
        bar.update(note="decode")
        edited = policy.decode(x0)[0].float().cpu()
        bar.update(advance=1, note="done")
    if image:
        if tuple(edited.shape[-2:]) != (size[0], size[1]):
            note(f"note: edited at {edited.shape[-2]}x{edited.shape[-1]} (the size the policy takes), resized back to "
                 f"the input's {size[0]}x{size[1]}")
            edited = resize(edited, (size[0], size[1]))
        return write_image(out, edited[0])
    odd = edited.shape[-1] % 2 or edited.shape[-2] % 2
    return write_video(out, edited, fps=max(1, round(video_fps(video))), lossless=bool(odd))


def edit(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="a checkpoint directory, or a run directory (its latest)"),
    video: Optional[Path] = typer.Option(None, "--video", help="the source video"),
    image: Optional[Path] = typer.Option(None, "--image", help="or a source image (png, jpg, webp): edited as one frame"),
    instruction: str = typer.Option(..., "--instruction", help="what to change"),
    out: Path = typer.Option(..., "--out", help="where to write the edit: an mp4 (--video) or a png (--image)"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="a reference image for the edit"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="ODE steps (default: the recipe's eval steps)"),
    shift: Optional[float] = typer.Option(None, "--shift", min=0.0, help="schedule shift (default: the recipe's)"),
    seed: int = typer.Option(0, "--seed"),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", min=1.0, help="override the policy's CFG scale"),
    device: str = typer.Option("cpu", "--device"),
    keep_size: bool = typer.Option(
        False, "--keep-size", help="edit at the input's size (default: over twice the training pixel count is scaled down)"
    ),
) -> None:
    """Edit a video (or an image) with a trained checkpoint (GRPO or SFT) and write the result as an mp4 (a png).

    The output path is checked before any work and may not be an input. A video of over twice the training pixel
    count is scaled down to it (--keep-size keeps its size); the console says what was changed. An image is edited
    as a one-frame video and written at its own size (resized back when the policy needed another). The end of
    `editrl train` prints this command for one of the run's held-out clips.

    Examples:
      editrl edit --checkpoint runs/quickstart/grpo --video in.mp4 --instruction "make the square red" --out out.mp4
      editrl edit --checkpoint runs/qwen_image_edit_tiny --image in.png --instruction "remove the star" --out out.png
    """
    from editrl.commands import console, run_cli

    def go() -> None:
        from editrl.base import DataError
        from editrl.data.video import IMAGE_SUFFIXES, is_image

        if (video is None) == (image is None):
            raise DataError("give --video (a video to edit) or --image (an image), one of them")
        if image is not None and not is_image(image):
            raise DataError(f"--image {image}: give an image file ({', '.join(IMAGE_SUFFIXES)}); a video goes to --video")
        if video is not None and is_image(video):
            raise DataError(f"--video {video} is an image: give it as --image (it is edited as one frame)")
        path = run_edit(
            checkpoint, video or image, instruction, out, reference=reference, steps=steps, shift=shift, seed=seed,  # type: ignore[arg-type]
            guidance_scale=guidance_scale, device=device, keep_size=keep_size,
            note=lambda msg: console.print(f"[yellow]{msg}[/yellow]", highlight=False),
        )
        console.print(f"[green]wrote[/green] {path}")

    run_cli(go)


def sft(
    recipe: str = typer.Argument(..., help="SFT recipe file, or the name of a bundled recipe (e.g. viva_sft_tiny)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.field=value overrides, e.g. train.steps=5"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run directory's latest checkpoint"),
) -> None:
    """Supervised fine-tuning on paired edits with the flow-matching loss (a starting point for GRPO).

    A GRPO recipe starts from the result with policy.init_from=RUN, or makes it itself with policy.warm_start
    (the quickstart does). Third-party messages go to RUN/libraries.log.

    Example:
      editrl sft viva_sft_tiny train.steps=50 run.output_dir=runs/my_sft
    """
    from editrl.commands import console, run_cli

    def go() -> None:
        from editrl.config import SftRecipe, parse_recipe
        from editrl.files import refuse_if_in_use

        rec = parse_recipe(recipe, overrides or [], SftRecipe)
        refuse_if_in_use(rec.output_dir)  # before the models load

        from editrl.monitor import LIBRARY_LOG, library_log
        from editrl.preflight import checked
        from editrl.sft import SftTrainer

        checked(rec, overrides or [])
        with library_log(rec.output_dir / LIBRARY_LOG):
            run_dir = SftTrainer(rec, resume=resume).fit().run_dir
        console.print(f"[green]done[/green]: {run_dir} (start GRPO from it with policy.init_from={run_dir})")

    run_cli(go)


def register(app: typer.Typer) -> None:
    app.command()(edit)
    app.command()(sft)
