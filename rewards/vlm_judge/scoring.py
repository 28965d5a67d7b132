"""Reading a judge's score from its reply: log-probs first, the reply's text as a fallback.

A judge answers with one score token (0-9 by default). When the server returns the top log-probs of
that position, the score is the expected value over the score tokens, which is smoother and more
informative than the argmax digit (two edits that both get "7" can still be ranked). Scores are single
digits because tokenizers such as Qwen's split numbers into digits: "10" would be two positions and its
probability could not be read from one distribution.
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


def parse_integer(text: str, min_score: int, max_score: int) -> tuple[int | None, str | None]:
    """The first integer in `text` if it is a valid score, else (None, why)."""
    match = _INTEGER.search(text)
    if match is None:
        return None, f"no score in reply {text[:80]!r}"
    value = int(match.group())
    if not min_score <= value <= max_score:
        return None, f"score {value} outside {min_score}..{max_score} in reply {text[:80]!r}"
    return value, None


def read_score(
    content: str | None,
    positions: list[tuple[str, list[tuple[str, float]]]] | None,
    min_score: int,
    max_score: int,
) -> Score:
    """Score from one reply; `positions` holds (generated token, its top log-probs) per position, or None.

    The answer is the first generated token that is a score (an unconstrained reply may start with a
    space or "Score:"); its position's distribution gives the expected value.
    """
    valid = set(score_tokens(min_score, max_score))
    for token, top in positions or []:
        if token.strip() in valid:
            try:
                value = expected_score(top, min_score, max_score)
            except ValueError as e:
                return Score(None, None, f"{e}: the reply's log-probabilities are broken")
            if value is not None:
                return Score(value, "logprobs")
            break
    if not content or not content.strip():
        return Score(None, None, "empty reply")
    value, error = parse_integer(content, min_score, max_score)
    if value is None:
        return Score(None, None, error)
    return Score(float(value), "text")
