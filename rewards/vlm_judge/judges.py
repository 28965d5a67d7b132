"""The three VLM judges of Edit-GRPO: instruction fidelity, content preservation, aesthetics.

Each is a reward class (`needs`, `Options`, async `__call__`) that sends one request per sample to an
OpenAI-compatible server, with its prompt from an editable Jinja template (prompts/*.txt, or the file
named by the `prompt` option). Scores are normalised to [0, 1] from the judge's `min_score..max_score`
scale; a sample whose request failed or whose reply could not be read is `valid=False`, with the reason
in `extras["error"]`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from editrl.rewards.vlm_judge.client import ClientOptions, JudgeClient, JudgeUnavailable, Messages, Request
from editrl.rewards.vlm_judge.media import data_url, digest, image_array, sample_frames, tile
from editrl.rewards.vlm_judge.scoring import read_score, score_tokens
from editrl.types import RewardBatch, RewardOutput

log = logging.getLogger("editrl.rewards.vlm_judge")

PROMPTS = Path(__file__).parent / "prompts"
MEDIA = ("source", "edited", "reference")
# Media placeholders render as these markers; the rendered text is then split around them.
_MARK = "\x00{}\x00"
_SPLIT = re.compile("\x00(" + "|".join(MEDIA) + ")\x00")


class JudgeOptions(ClientOptions):
    prompt: str | None = None  # a Jinja template file; None = the judge's bundled prompt
    frames: int = Field(4, ge=1)  # frames sampled from each video, evenly spaced
    layout: Literal["frames", "grid"] = "frames"  # one image per frame, or one grid image per video
    image_size: int = Field(448, ge=28)  # longest side in pixels of each image sent (a frame, or the grid)
    min_score: int = 0
    max_score: int = 9
    constrain: Literal["structured_outputs", "guided_choice", "none"] = "structured_outputs"
    # 0: do not ask for log-probs, read the reply's text. None: one per score when constrained (only the
    # score tokens can have any probability then), else 20.
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=1)  # None: 1 when constrained (one score token), else 8

    @model_validator(mode="after")
    def _range(self) -> JudgeOptions:
        score_tokens(self.min_score, self.max_score)
        return self


def load_template(path: Path, required: tuple[str, ...]) -> Any:
    """A Jinja template that must show each of `required` (else the judge would not see that input)."""
    import jinja2

    try:
        source = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"judge prompt template not found: {path}") from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    try:
        template = env.from_string(source)
        probe = template.render(
            instruction="x", min_score=0, max_score=9, frames=1, **{m: _MARK.format(m) for m in MEDIA}
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"judge prompt {path}: {e}") from None
    missing = [m for m in required if _MARK.format(m) not in probe]
    if missing:
        raise ValueError(f"judge prompt {path} never shows {{{{ {missing[0]} }}}}: the judge would not see it")
    return template


class VlmJudge:
    """Base of the judges; a subclass sets `name`, `needs`, the bundled `prompt_file` and the `required` media."""

    Options: ClassVar[type[JudgeOptions]] = JudgeOptions
    name: ClassVar[str]  # its registry name, used in logs
    needs: ClassVar[set[str]]
    prompt_file: ClassVar[str]
    required: ClassVar[tuple[str, ...]]

    def __init__(self, options: JudgeOptions, transport: Any = None) -> None:
        """Fails at once (naming the URL or file) if the prompt is unusable or a server is down."""
        self.options = options
        self.prompt_path = Path(options.prompt).expanduser() if options.prompt else PROMPTS / self.prompt_file
        self.template = load_template(self.prompt_path, self.required)
        self.template_hash = hashlib.sha256(self.prompt_path.read_bytes()).hexdigest()
        self.client = JudgeClient(options, transport)
        if options.health_check:
            self.client.check()

    @classmethod
    def preflight(cls, options: JudgeOptions) -> list[str]:
        """For dry runs: the prompt template loads, and every server in base_urls is up and serves the model."""
        problems = []
        try:
            load_template(Path(options.prompt).expanduser() if options.prompt else PROMPTS / cls.prompt_file, cls.required)
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
        for url in options.base_urls:
            try:
                JudgeClient(options.model_copy(update={"base_urls": [url]})).check()
            except JudgeUnavailable as e:
                problems.append(str(e))
        return problems

    def params(self) -> dict[str, Any]:
        """Sampling parameters of every request: greedy, one score token, its log-probs."""
        o = self.options
        max_tokens = o.max_tokens or (8 if o.constrain == "none" else 1)
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0}
        choice = score_tokens(o.min_score, o.max_score)
        top = o.top_logprobs if o.top_logprobs is not None else (20 if o.constrain == "none" else len(choice))
        if top:
            params.update(logprobs=True, top_logprobs=top)
        if o.constrain == "structured_outputs":  # vLLM >= 0.10
            params["structured_outputs"] = {"choice": choice}
        elif o.constrain == "guided_choice":  # older vLLM
            params["guided_choice"] = choice
        return params

    def _media(self, batch: RewardBatch, i: int) -> dict[str, list[np.ndarray]]:
        """The pixels each placeholder stands for, as (H, W, C) uint8 images; absent inputs are []."""
        o = self.options
        out: dict[str, list[np.ndarray]] = {}
        for name, videos in (("source", batch.sources), ("edited", batch.edited)):
            if videos is None:
                if name in self.required:
                    raise ValueError(f"{self.name} needs `{name}` videos but the batch has none")
                out[name] = []
                continue
            frames = sample_frames(videos[i], o.frames)
            out[name] = [tile(frames)] if o.layout == "grid" else list(frames)
        ref = batch.references[i] if batch.references is not None else None
        out["reference"] = [image_array(ref)[0]] if ref is not None else []
        return out

    def request(self, batch: RewardBatch, i: int) -> Request:
        o = self.options
        media = self._media(batch, i)
        text = self.template.render(
            instruction=batch.instructions[i],
            min_score=o.min_score,
            max_score=o.max_score,
            frames=o.frames,
            **{m: _MARK.format(m) if media[m] else "" for m in MEDIA},
        )
        key_parts = [self.template_hash, text, o.layout, o.image_size, digest([a for m in MEDIA for a in media[m]])]
        key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()

        def messages() -> Messages:
            content: list[dict[str, Any]] = []
            for j, part in enumerate(_SPLIT.split(text)):
                if j % 2:  # a media placeholder
                    content += [
                        {"type": "image_url", "image_url": {"url": data_url(a, o.image_size)}} for a in media[part]
                    ]
                elif part.strip():
                    content.append({"type": "text", "text": part.strip()})
            return [{"role": "user", "content": content}]

        return Request(key=key, messages=messages, params=self.params())

    async def __call__(self, batch: RewardBatch) -> RewardOutput:
        o = self.options
        replies = await self.client.complete_many([self.request(batch, i) for i in range(len(batch))])
        values: list[float | None] = []
        extras: dict[str, list[Any]] = {k: [] for k in ("score", "method", "error", "cached", "attempts", "reply")}
        for reply in replies:
            score = read_score(reply.content, reply.positions, o.min_score, o.max_score)
            error = reply.error or score.error
            ok = reply.error is None and score.value is not None
            values.append((score.value - o.min_score) / (o.max_score - o.min_score) if ok else None)
            extras["score"].append(score.value if ok else None)
            extras["method"].append(score.method if ok else None)
            extras["error"].append(error)
            extras["cached"].append(reply.cached)
            extras["attempts"].append(reply.attempts)
            extras["reply"].append(reply.content)
        failed = [e for e in extras["error"] if e]
        if failed:
            self.client.stats["invalid"] += len(failed)
            log.warning("%s: %d/%d samples invalid, e.g. %s", self.name, len(failed), len(batch), failed[0])
        return RewardOutput.from_list(values, extras)


class Fidelity(VlmJudge):
    """Was the instruction carried out? Sees source and edited frames, the instruction and any reference."""

    name = "vlm_fidelity"
    needs: ClassVar[set[str]] = {"instruction", "source", "edited", "reference"}
    prompt_file = "fidelity.txt"
    required = ("source", "edited")


class Preservation(VlmJudge):
    """Were the parts the instruction did not mention kept? Sees source and edited frames and the instruction."""

    name = "vlm_preservation"
    needs: ClassVar[set[str]] = {"instruction", "source", "edited"}
    prompt_file = "preservation.txt"
    required = ("source", "edited")


class Aesthetics(VlmJudge):
    """Visual quality of the edited video alone."""

    name = "vlm_aesthetics"
    needs: ClassVar[set[str]] = {"edited"}
    prompt_file = "aesthetics.txt"
    required = ("edited",)
