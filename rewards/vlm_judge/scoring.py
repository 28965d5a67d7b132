"""Reading a judge's scores from its reply: log-probs first, the reply's text as a fallback; the rubrics' arithmetic.

A judge answers with one score token (0-9 by default), or with several ("7, 3") when its question asks for several
scores. When the server returns the top log-probs of each score's position, the score is the expected value over the
score tokens, which is smoother and more informative than the argmax digit (two edits that both get "7" can still be
ranked); Edit-R1 (UniWorld-V2, arXiv:2510.16888, reward_server/reward_server.py) scores its judge the same way.
Scores are single digits because tokenizers such as Qwen's split numbers into digits: "10" would be two positions and
its probability could not be read from one distribution.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_INTEGER = re.compile(r"(?<![\d.])-?\d+(?![\d.])")


@dataclass(frozen=True)
class Score:
    """`value` is the raw score on the judge's scale, None when the reply could not be read."""

    value: float | None
    method: str | None  # "logprobs" | "text"
    error: str | None = None


def score_tokens(min_score: int, max_score: int) -> list[str]:
    """The tokens a judge may answer with, e.g. ["0", ..., "9"]."""
    if not 0 <= min_score < max_score <= 9:
        raise ValueError(f"score range {min_score}..{max_score} must lie within 0..9 (one token per score)")
    return [str(i) for i in range(min_score, max_score + 1)]


def expected_score(top_logprobs: list[tuple[str, float]], min_score: int, max_score: int) -> float | None:
    """Expected score over the score tokens among `top_logprobs`, renormalised; None if none is there.

    A score token whose log-probability is not one (NaN, or above 0) is a broken reply, a ValueError: scoring the rest
    would read the answer from the runner-up tokens. -inf is a probability of 0."""
    probs: dict[int, float] = {}
    for token, logprob in top_logprobs:
        text = token.strip()
        if not text.isdigit():
            continue
        value = int(text)
        if not min_score <= value <= max_score:
            continue
        if math.isnan(logprob) or logprob > 1e-4:
            raise ValueError(f"the log-probability of score {token!r} is {logprob}")
        # The same score can appear twice (" 7" and "7"): their probabilities add up.
        probs[value] = probs.get(value, 0.0) + math.exp(logprob)
    total = sum(probs.values())
    if total <= 0:
        return None
    return sum(v * p for v, p in probs.items()) / total


def parse_integers(text: str, n: int, min_score: int, max_score: int) -> tuple[list[int] | None, str | None]:
    """The first `n` integers in `text` if they are valid scores, else (None, why)."""
    found = [int(m.group()) for m in _INTEGER.finditer(text)][:n]
    if len(found) < n:
        return None, f"no score in reply {text[:80]!r}" if not found else f"{n} scores needed, {len(found)} in reply {text[:80]!r}"
    bad = next((v for v in found if not min_score <= v <= max_score), None)
    if bad is not None:
        return None, f"score {bad} outside {min_score}..{max_score} in reply {text[:80]!r}"
    return found, None


def read_scores(
    content: str | None,
    positions: list[tuple[str, list[tuple[str, float]]]] | None,
    n: int,
    min_score: int,
    max_score: int,
) -> list[Score]:
    """The first `n` scores of one reply; `positions` holds (generated token, its top log-probs) per position, or None.

    Each answer is a generated token that is a score (an unconstrained reply may start with a space or "Score:"); its
    position's distribution gives the expected value. Without log-probs at every score's position, all `n` are read
    from the text. A reply that cannot give all `n` gives `n` failed Scores with the reason.
    """
    valid = set(score_tokens(min_score, max_score))
    found: list[Score] = []
    for token, top in positions or []:
        if token.strip() not in valid:
            continue
        try:
            value = expected_score(top, min_score, max_score)
        except ValueError as e:
            return [Score(None, None, f"{e}: the reply's log-probabilities are broken")] * n
        if value is None:
            break
        found.append(Score(value, "logprobs"))
        if len(found) == n:
            return found
    if not content or not content.strip():
        return [Score(None, None, "empty reply")] * n
    values, error = parse_integers(content, n, min_score, max_score)
    if values is None:
        return [Score(None, None, error)] * n
    return [Score(float(v), "text") for v in values]


def to_ten(value: float, min_score: int, max_score: int) -> float:
    """A score on the judge's `min_score..max_score` scale mapped linearly onto 0..10 (VIEScore's scale)."""
    return 10.0 * (value - min_score) / (max_score - min_score)


def viescore(sc: list[float], pq: list[float]) -> tuple[float, float, float]:
    """(SC, PQ, overall) from VIEScore's sub-scores on 0..10, as GEdit-Bench computes them (Step1X-Edit's
    GEdit-Bench/viescore): SC = min(editing success, over-editing), PQ = min(naturalness, artifacts), overall =
    sqrt(SC * PQ), their geometric mean."""
    semantic, perceptual = min(sc), min(pq)
    return semantic, perceptual, math.sqrt(semantic * perceptual)
