"""The VLM judges: Edit-GRPO's three (instruction fidelity, content preservation, aesthetics) and two edit rubrics
(`edit_reward`, EditReward's instruction following + visual quality; `viescore`, GEdit-Bench's VIEScore).

Each is a reward class (`needs`, `Options`, async `__call__`) that asks an OpenAI-compatible server its `questions`,
one request per question and sample, each prompt an editable Jinja template (prompts/*.txt, or the file named by the
`prompt` option). A question's answer is one score token, or several ("7, 3"), each read as the expected value over
the score tokens from its position's log-probs at temperature 0; `combine` turns a sample's scores into its reward in
[0, 1] and the details kept in `extras` (on the rubric's own scale). A sample with a request that failed or a reply
that could not be read is `valid=False`, with the reason in `extras["error"]`. Images are one-frame videos: the judge
sees the image itself, and the prompts say "image".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
from pydantic import Field, model_validator

from editrl.base import RecipeError
from editrl.rewards.vlm_judge.client import ClientOptions, JudgeClient, JudgeUnavailable, Messages, Request
from editrl.rewards.vlm_judge.media import data_url, digest, image_array, sample_frames, tile
from editrl.rewards.vlm_judge.scoring import read_scores, score_tokens, to_ten, viescore
from editrl.types import RewardBatch, RewardOutput

log = logging.getLogger("editrl.rewards.vlm_judge")

PROMPTS = Path(__file__).parent / "prompts"
MEDIA = ("source", "edited", "reference")
# Media placeholders render as these markers; the rendered text is then split around them.
_MARK = "\x00{}\x00"
_SPLIT = re.compile("\x00(" + "|".join(MEDIA) + ")\x00")


class JudgeOptions(ClientOptions):
    # A Jinja template file; a judge asking several questions takes {question: file} (those not named stay bundled).
    prompt: str | dict[str, str] | None = None
    frames: int = Field(4, ge=1)  # frames sampled from each video, evenly spaced
    layout: Literal["frames", "grid"] = "frames"  # one image per frame, or one grid image per video
    image_size: int = Field(448, ge=28)  # longest side in pixels of each image sent (a frame, or the grid)
    min_score: int = 0
    max_score: int = 9
    constrain: Literal["structured_outputs", "guided_choice", "none"] = "structured_outputs"
    # 0: do not ask for log-probs, read the reply's text. None: one per score when constrained (only the
    # score tokens can have any probability then), else 20.
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=1)  # None: 1 per score and 3 between scores when constrained, else 8 per score

    @model_validator(mode="after")
    def _range(self) -> JudgeOptions:
        score_tokens(self.min_score, self.max_score)
        return self


def load_template(path: Path, required: tuple[str, ...]) -> Any:
    """A Jinja template that must show each of `required`, for videos and for images (else the judge would not see
    that input)."""
    import jinja2

    try:
        source = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"judge prompt template not found: {path}") from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    try:
        template = env.from_string(source)
        probes = {video: template.render(instruction="x", min_score=0, max_score=9, frames=1, video=video,
                                         **{m: _MARK.format(m) for m in MEDIA}) for video in (True, False)}
    except jinja2.TemplateError as e:
        raise ValueError(f"judge prompt {path}: {e}") from None
    for video, probe in probes.items():
        missing = [m for m in required if _MARK.format(m) not in probe]
        if missing:
            what = "" if video else " for an image"
            raise ValueError(f"judge prompt {path} never shows {{{{ {missing[0]} }}}}{what}: the judge would not see it")
    return template


class Question(NamedTuple):
    """What a judge asks of each sample in one request: a prompt that shows the `required` media, answered with one
    score per name in `scores`, in that order."""

    name: str
    prompt_file: str
    required: tuple[str, ...]
    scores: tuple[str, ...] = ("score",)


def prompt_paths(judge: str, questions: tuple[Question, ...], prompt: str | dict[str, str] | None) -> dict[str, Path]:
    """Each question's template: the bundled one, or the file the `prompt` option names for it (RecipeError: the
    option does not fit the judge's questions)."""
    names = [q.name for q in questions]
    if isinstance(prompt, str):
        if len(questions) > 1:
            raise RecipeError(f"{judge} asks {len(questions)} questions: give prompt as "
                              f"{{{', '.join(f'{n}: FILE' for n in names)}}}")
        prompt = {names[0]: prompt}
    prompt = prompt or {}
    unknown = sorted(set(prompt) - set(names))
    if unknown:
        raise RecipeError(f"{judge} has no question {unknown[0]!r} to give a prompt for; its questions: {', '.join(names)}")
    return {q.name: Path(prompt[q.name]).expanduser() if q.name in prompt else PROMPTS / q.prompt_file for q in questions}


class VlmJudge:
    """Base of the judges; a subclass sets `name`, `needs` and its `questions`, and `combine` for several scores."""

    Options: ClassVar[type[JudgeOptions]] = JudgeOptions
    name: ClassVar[str]  # its registry name, used in logs
    needs: ClassVar[set[str]]
    questions: ClassVar[tuple[Question, ...]]

    def __init__(self, options: JudgeOptions, transport: Any = None) -> None:
        """Fails at once (naming the URL or file) if a prompt is unusable or a server is down."""
        self.options = options
        self.templates: dict[str, tuple[Any, str]] = {}  # question -> (template, hash of its file)
        for q, path in zip(self.questions, prompt_paths(self.name, self.questions, options.prompt).values()):
            self.templates[q.name] = (load_template(path, q.required), hashlib.sha256(path.read_bytes()).hexdigest())
        self.client = JudgeClient(options, transport)
        if options.health_check:
            self.client.check()

    @classmethod
    def preflight(cls, options: JudgeOptions) -> list[str]:
        """For dry runs: the prompt templates load, and every server in base_urls is up and serves the model."""
        problems = []
        try:
            for q, path in zip(cls.questions, prompt_paths(cls.name, cls.questions, options.prompt).values()):
                load_template(path, q.required)
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
        for url in options.base_urls:
            try:
                JudgeClient(options.model_copy(update={"base_urls": [url]})).check()
            except JudgeUnavailable as e:
                problems.append(str(e))
        return problems

    def combine(self, scores: dict[str, float]) -> tuple[float, dict[str, float]]:
        """A sample's reward in [0, 1] from its scores by name (on the judge's scale), and the details to keep in
        `extras`. One question of one score: that score, normalised."""
        o = self.options
        (value,) = scores.values()
        return (value - o.min_score) / (o.max_score - o.min_score), {"score": value}

    def params(self, question: Question) -> dict[str, Any]:
        """Sampling parameters of every request: greedy, the score tokens (joined by ", " for several), their
        log-probs."""
        o = self.options
        tokens = score_tokens(o.min_score, o.max_score)
        n = len(question.scores)
        max_tokens = o.max_tokens or (8 * n if o.constrain == "none" else 4 * n - 3)  # "7, 3": 7 , _ 3 at most
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0}
        top = o.top_logprobs if o.top_logprobs is not None else (20 if o.constrain == "none" else len(tokens))
        if top:
            params.update(logprobs=True, top_logprobs=top)
        choice = tokens if n == 1 else [", ".join(c) for c in itertools.product(tokens, repeat=n)]
        if o.constrain == "structured_outputs":  # vLLM >= 0.10
            params["structured_outputs"] = {"choice": choice}
        elif o.constrain == "guided_choice":  # older vLLM
            params["guided_choice"] = choice
        return params

    def _media(self, batch: RewardBatch, i: int, required: tuple[str, ...]) -> dict[str, list[np.ndarray]]:
        """The pixels each placeholder stands for, as (H, W, C) uint8 images; absent inputs are []. An image (a
        one-frame video) is sent as itself."""
        o = self.options
        out: dict[str, list[np.ndarray]] = {}
        for name, videos in (("source", batch.sources), ("edited", batch.edited)):
            if videos is None:
                if name in required:
                    raise ValueError(f"{self.name} needs `{name}` videos but the batch has none")
                out[name] = []
                continue
            frames = sample_frames(videos[i], o.frames)
            out[name] = [tile(frames)] if o.layout == "grid" else list(frames)
        ref = batch.references[i] if batch.references is not None else None
        out["reference"] = [image_array(ref)[0]] if ref is not None else []
        return out

    def request(self, batch: RewardBatch, i: int, question: Question) -> Request:
        o = self.options
        media = self._media(batch, i, question.required)
        template, template_hash = self.templates[question.name]
        video = (batch.edited if batch.edited is not None else batch.sources).shape[1] > 1  # type: ignore[union-attr]
        text = template.render(
            instruction=batch.instructions[i],
            min_score=o.min_score,
            max_score=o.max_score,
            frames=o.frames if video else 1,
            video=video,
            **{m: _MARK.format(m) if media[m] else "" for m in MEDIA},
        )
        key_parts = [template_hash, text, o.layout, o.image_size, digest([a for m in MEDIA for a in media[m]])]
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

        return Request(key=key, messages=messages, params=self.params(question))

    async def __call__(self, batch: RewardBatch) -> RewardOutput:
        o = self.options
        asked = self.questions
        replies = await self.client.complete_many([self.request(batch, i, q) for i in range(len(batch)) for q in asked])
        values: list[float | None] = []
        extras: dict[str, list[Any]] = {k: [] for k in ("method", "error", "cached", "attempts", "reply")}
        details: list[dict[str, float]] = []
        for i in range(len(batch)):
            mine = replies[i * len(asked) : (i + 1) * len(asked)]
            scores, methods, error = {}, set(), None
            for q, reply in zip(asked, mine):
                read = read_scores(reply.content, reply.positions, len(q.scores), o.min_score, o.max_score)
                error = error or reply.error or next((r.error for r in read if r.error), None)
                scores |= {name: r.value for name, r in zip(q.scores, read)}
                methods |= {r.method for r in read}
            ok = error is None
            value, detail = self.combine(scores) if ok else (None, {})  # type: ignore[arg-type]
            values.append(value)
            details.append(detail)
            extras["method"].append("+".join(sorted(methods)) if ok else None)  # type: ignore[arg-type]
            extras["error"].append(error)
            extras["cached"].append(all(r.cached for r in mine))
            extras["attempts"].append(max(r.attempts for r in mine))
            extras["reply"].append(mine[0].content if len(mine) == 1 else [r.content for r in mine])
        for key in dict.fromkeys(k for d in details for k in d):
            extras[key] = [d.get(key) for d in details]
        failed = [e for e in extras["error"] if e]
        if failed:
            self.client.stats["invalid"] += len(failed)
            log.warning("%s: %d/%d samples invalid, e.g. %s", self.name, len(failed), len(batch), failed[0])
        return RewardOutput.from_list(values, extras)


class Fidelity(VlmJudge):
    """Was the instruction carried out? Sees source and edited frames, the instruction and any reference."""

    name = "vlm_fidelity"
    needs: ClassVar[set[str]] = {"instruction", "source", "edited", "reference"}
    questions = (Question("fidelity", "fidelity.txt", ("source", "edited")),)


class Preservation(VlmJudge):
    """Were the parts the instruction did not mention kept? Sees source and edited frames and the instruction."""

    name = "vlm_preservation"
    needs: ClassVar[set[str]] = {"instruction", "source", "edited"}
    questions = (Question("preservation", "preservation.txt", ("source", "edited")),)


class Aesthetics(VlmJudge):
    """Visual quality of the edited video alone."""

    name = "vlm_aesthetics"
    needs: ClassVar[set[str]] = {"edited"}
    questions = (Question("aesthetics", "aesthetics.txt", ("edited",)),)


class EditRewardOptions(JudgeOptions):
    min_score: int = 1  # EditReward's annotation scale: 1 (very poor) .. 4 (very good) per dimension
    max_score: int = 4


class EditReward(VlmJudge):
    """Instruction following + visual quality of an edit (EditReward's rubric), asked of a served VLM.

    EditReward (Wu et al. 2025, arXiv:2509.26346, TIGER-AI-Lab/EditReward) rates instruction following (semantic
    accuracy, completeness, no over-editing) and visual quality (plausibility, artifacts, aesthetics), each against the
    source on 1-4, overall = their sum as in its annotations; the reward is the overall mapped to [0, 1]. EditReward
    trains a reward model on that rubric; here a served VLM answers it."""

    Options = EditRewardOptions
    name = "edit_reward"
    needs: ClassVar[set[str]] = {"instruction", "source", "edited", "reference"}
    questions = (
        Question("following", "edit_reward_following.txt", ("source", "edited"), ("instruction_following",)),
        Question("quality", "edit_reward_quality.txt", ("source", "edited"), ("visual_quality",)),
    )

    def combine(self, scores: dict[str, float]) -> tuple[float, dict[str, float]]:
        lo, hi = self.options.min_score, self.options.max_score
        overall = scores["instruction_following"] + scores["visual_quality"]
        return (overall - 2 * lo) / (2 * (hi - lo)), {**scores, "overall": overall}


class VieScore(VlmJudge):
    """GEdit-Bench's VIEScore of an edit, sqrt(semantic consistency x perceptual quality), asked of a served VLM.

    VIEScore (Ku et al. 2024, arXiv:2312.14867) as GEdit-Bench computes it (Step1X-Edit, arXiv:2504.17761):
    semantic consistency SC = min(editing success, over-editing) from source, edit and instruction; perceptual quality
    PQ = min(naturalness, artifacts) from the edit alone; overall = sqrt(SC * PQ), all on 0..10; the reward is
    overall / 10. GEdit-Bench asks for 0-10 in text; read from log-probs a score must be one token, and Qwen's
    tokenizer splits "10" in two, so the judge answers on its `min_score..max_score` (0..9) and each sub-score is
    mapped linearly onto 0..10 before the minima and the geometric mean."""

    name = "viescore"
    needs: ClassVar[set[str]] = {"instruction", "source", "edited", "reference"}
    questions = (
        Question("sc", "viescore_sc.txt", ("source", "edited"), ("editing_success", "over_editing")),
        Question("pq", "viescore_pq.txt", ("edited",), ("naturalness", "artifacts")),
    )

    def combine(self, scores: dict[str, float]) -> tuple[float, dict[str, float]]:
        ten = {k: to_ten(v, self.options.min_score, self.options.max_score) for k, v in scores.items()}
        sc, pq, overall = viescore([ten["editing_success"], ten["over_editing"]], [ten["naturalness"], ten["artifacts"]])
        return overall / 10, {**ten, "sc": sc, "pq": pq, "overall": overall}
