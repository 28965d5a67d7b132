"""Any pyiqa image-quality metric as a reward, scored on a few frames of each video.

No-reference metrics (NIQE, MUSIQ, CLIP-IQA, ...) score the edited video alone (aesthetics/quality);
full-reference ones (LPIPS, DISTS, SSIM, ...) compare each edited frame with the same source frame
(preservation). Scores are oriented so that higher is better: a metric where lower is better (LPIPS,
NIQE) is negated; the metric's own value is kept in `extras["value"]`.

Learned metrics download their weights on first use (pyiqa's own, through torch.hub, and the CLIP backbones of
`laion_aes`, `clipscore`, ... through OpenAI's `clip` package), which cannot happen offline: the reward then fails
when it is built (a RecipeError: one line from the CLI), naming the metric, the URL it wanted and where the file goes
(or the `weights` option that takes a local file).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from pydantic import Field

from editrl.base import RecipeError, StrictModel
from editrl.registry import did_you_mean
from editrl.types import RewardBatch, RewardOutput

class _NeedsDownload(Exception):
    """Raised in place of a download during a dry run's check; args: (url, destination, what to do)."""


@contextlib.contextmanager
def _downloads(refuse: bool) -> Iterator[list[tuple[str, str]]]:
    """Inside, the weight downloads a pyiqa metric starts (pyiqa's and torch.hub's `download_url_to_file`, OpenAI
    CLIP's `_download`) are watched: each that fails is listed as (url, destination, how to provide the file), or,
    with `refuse`, raises `_NeedsDownload` instead of fetching anything. pyiqa's announcements are kept off stdout."""
    import pyiqa.utils.download_util as pyiqa_download

    failed: list[tuple[str, str, str]] = []

    def watch(original: Callable[..., Any], in_folder: bool, own: bool) -> Callable[..., Any]:
        def download(url: str, dst: str, *args: Any, **kwargs: Any) -> Any:
            path = os.path.join(dst, os.path.basename(url)) if in_folder else dst
            # pyiqa's own weights can come from the `weights` option; a backbone's must be where its library reads it.
            fix = f"set the reward option `weights: /path/to/{os.path.basename(path)}`" if own else f"put it at {path}"
            if refuse:
                raise _NeedsDownload(url, path, fix)
            try:
                return original(url, dst, *args, **kwargs)
            except Exception:
                failed.append((url, path, fix))
                raise

        return download

    patches = [(pyiqa_download, "download_url_to_file", False, True), (torch.hub, "download_url_to_file", False, False)]
    try:
        from pyiqa.archs.clip_imports import clip  # noqa: F401  (imports `clip` as pyiqa does, without its warning)
    except ImportError:  # no CLIP here: the metrics that need it say so when they are built
        pass
    else:
        patches.append((importlib.import_module("clip.clip"), "_download", True, False))
    saved = [(module, name, getattr(module, name)) for module, name, *_ in patches]
    for module, name, in_folder, own in patches:
        setattr(module, name, watch(getattr(module, name), in_folder, own))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield failed
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


class Iqa:
    """Any pyiqa metric on a few frames: a no-reference one scores the edit, a full-reference one compares it with the source."""

    needs: ClassVar[set[str]] = {"edited", "source"}  # narrowed per instance: NR metrics need "edited" only
    required: ClassVar[tuple[str, ...]] = ("edited",)  # what every metric reads (FR ones the source too, known once built)

    class Options(StrictModel):
        metric: str
        weights: str | None = None  # a local weights file, passed to pyiqa as `pretrained_model_path`
        frames: int | None = Field(4, ge=1)  # frames per video, evenly spaced; None = every frame
        device: str | None = None  # None: where the batch's videos are (the policy's device); built on the CPU
        batch_size: int = Field(16, ge=1)  # frames per forward pass
        metric_options: dict[str, Any] = Field(default_factory=dict)  # other pyiqa `create_metric` arguments

    def __init__(self, options: Options) -> None:
        self.options = options
        try:
            import pyiqa
            from pyiqa.default_model_configs import DEFAULT_CONFIGS
        except ImportError as e:
            raise RecipeError(f"the iqa reward needs pyiqa: pip install 'editrl[iqa]' ({e})") from None
        name = options.metric
        if name not in DEFAULT_CONFIGS:
            raise RecipeError(f"unknown pyiqa metric {name!r}{did_you_mean(name, list(DEFAULT_CONFIGS))}")
        kwargs = dict(options.metric_options)
        if options.weights is not None:
            kwargs["pretrained_model_path"] = options.weights
        with _downloads(refuse=False) as failed:
            try:
                self.metric = pyiqa.create_metric(name, device=torch.device(options.device or "cpu"), **kwargs)
            except Exception as e:
                if not failed:
                    raise RecipeError(f"pyiqa metric {name!r} could not be built: {e}") from None
                url, _, fix = failed[-1]
                raise RecipeError(
                    f"pyiqa metric {name!r} needs weights from {url}, which cannot be fetched ({e}); "
                    f"download that file elsewhere and {fix}"
                ) from None
        self.metric.eval()
        self.full_reference = self.metric.metric_mode == "FR"
        self.sign = -1.0 if self.metric.lower_better else 1.0
        self.needs = {"edited", "source"} if self.full_reference else {"edited"}

    @classmethod
    def preflight(cls, options: Options) -> list[str]:
        """For dry runs: pyiqa is installed, the metric exists and its weights are on disk. The metric is built
        with downloads refused, so a dry run never fetches anything."""
        try:
            import pyiqa
        except ImportError:
            return ["the iqa reward needs pyiqa: pip install 'editrl[iqa]'"]
        from pyiqa.default_model_configs import DEFAULT_CONFIGS

        if options.metric not in DEFAULT_CONFIGS:
            return [f"unknown pyiqa metric {options.metric!r}{did_you_mean(options.metric, list(DEFAULT_CONFIGS))}"]
        if options.weights is not None and not Path(options.weights).expanduser().is_file():
            return [f"weights file {options.weights} of pyiqa metric {options.metric!r} does not exist"]

        kwargs = dict(options.metric_options)
        if options.weights is not None:
            kwargs["pretrained_model_path"] = str(Path(options.weights).expanduser())
        import huggingface_hub.constants as hub

        offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True  # backbones from the hub (timm) fail at once, no retries
        try:
            with _downloads(refuse=True):
                pyiqa.create_metric(options.metric, device=torch.device("cpu"), **kwargs)
        except _NeedsDownload as e:
            url, dst, fix = e.args
            hint = " (or anywhere, with the reward option `weights: /path/to/it`)" if "weights" in fix else ""
            return [f"pyiqa metric {options.metric!r} needs {url}, which is not at {dst}: download it there{hint}"]
        except Exception as e:
            return [f"pyiqa metric {options.metric!r} cannot be built: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"]
        finally:
            hub.HF_HUB_OFFLINE = offline
        return []

    def _frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, n, C, H, W), n evenly spaced frames."""
        n = self.options.frames
        t = video.shape[1]
        if n is None or n >= t:
            return video
        return video[:, torch.linspace(0, t - 1, n).round().long()]

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> RewardOutput:
        if batch.edited is None:
            raise ValueError("the iqa reward needs the edited videos")
        if self.options.device is None:  # pyiqa runs where its parameters are
            self.metric.to(batch.edited.device)
        edited = self._frames(batch.edited.float().clamp(0, 1))
        b, n = edited.shape[:2]
        flat = edited.flatten(0, 1)
        ref = None
        if self.full_reference:
            if batch.sources is None:
                raise ValueError(f"pyiqa metric {self.options.metric!r} is full-reference: it needs the source videos")
            ref = self._frames(batch.sources.float().clamp(0, 1)).flatten(0, 1)
            if ref.shape != flat.shape:
                raise ValueError(f"edited {tuple(flat.shape)} and source {tuple(ref.shape)} frames differ in shape")
        values = []
        step = self.options.batch_size
        for i in range(0, flat.shape[0], step):
            args = (flat[i : i + step],) if ref is None else (flat[i : i + step], ref[i : i + step])
            values.append(torch.as_tensor(self.metric(*args)).detach().float().reshape(-1))
        per_sample = torch.cat(values).reshape(b, n).mean(dim=1)
        return RewardOutput(self.sign * per_sample, per_sample.isfinite(), {"value": per_sample.tolist()})
