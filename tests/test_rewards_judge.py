"""The VLM judges against recorded vLLM replies (tests/judge/recorded/, captured from the tiny served model).

Requests go through the real `openai` client; only the network is replaced by an httpx mock transport
(openai's HTTP layer, `httpx2`), which replays the recordings, garbage, HTTP errors and timeouts.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx2
import pytest
import torch

from editrl.config import RecipeError
from editrl.preflight import load_recipe
from editrl.reward import build_reward
from editrl.rewards.vlm_judge import Aesthetics, Fidelity, JudgeOptions, JudgeUnavailable, Preservation
from editrl.rewards.vlm_judge.scoring import expected_score, parse_integer, read_score, score_tokens
from editrl.types import RewardBatch

RECORDED = Path(__file__).parent / "judge" / "recorded"
URL_A, URL_B = "http://judge-a.test/v1", "http://judge-b.test/v1"


def recorded(name: str) -> dict:
    return json.loads((RECORDED / name).read_text())


class FakeServer:
    """Answers like the recorded vLLM server; `chat` decides each chat reply (status, body) or raises."""

    def __init__(self, chat=None) -> None:
        self.chat = chat or (lambda request, body: (200, recorded("chat_logprobs.json")["body"]))
        self.requests: list[tuple[str, dict]] = []  # (host, json body) of every chat request

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            models = recorded("models.json")
            return httpx2.Response(models["status"], json=models["body"])
        body = json.loads(request.content)
        self.requests.append((request.url.host, body))
        status, payload = self.chat(request, body)
        return httpx2.Response(status, json=payload)

    @property
    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self)


def options(tmp_path: Path, **kw) -> JudgeOptions:
    base = dict(model="tiny-vlm", base_urls=[URL_A], cache_dir=str(tmp_path / "cache"), backoff=0.0, retries=2, frames=2)
    return JudgeOptions.model_validate(base | kw)


def batch(n: int = 3, seed: int = 0, references: bool = False) -> RewardBatch:
    g = torch.Generator().manual_seed(seed)
    return RewardBatch(
        instructions=[f"make object {i} red" for i in range(n)],
        sources=torch.rand(n, 5, 3, 16, 16, generator=g),
        edited=torch.rand(n, 5, 3, 16, 16, generator=g),
        references=[torch.rand(3, 16, 16, generator=g) if references and i == 0 else None for i in range(n)],
    )


def score(judge, b: RewardBatch):
    return asyncio.run(judge(b))


def images_in(body: dict) -> int:
    return sum(part["type"] == "image_url" for part in body["messages"][0]["content"])


# ------------------------------------------------------------------------------------------ scoring


def test_expected_score_is_the_mean_over_score_tokens_renormalised():
    top = [("7", math.log(0.3)), ("9", math.log(0.1)), ("x", math.log(0.5)), (" 7", math.log(0.1))]
    # "x" is not a score; " 7" and "7" are the same score: p(7) = 0.4, p(9) = 0.1.
    assert expected_score(top, 0, 9) == pytest.approx((7 * 0.4 + 9 * 0.1) / 0.5)
    assert expected_score([("12", 0.0), ("a", 0.0)], 0, 9) is None
    assert expected_score([("5", -0.5), ("3", -9999.0), ("4", -math.inf)], 0, 9) == pytest.approx(5.0)


def test_a_broken_log_probability_is_an_error_never_the_runner_up():
    """A NaN on the answer's token used to be skipped, scoring the reply from the next score token (issue 26)."""
    with pytest.raises(ValueError, match="log-probability of score '8' is nan"):
        expected_score([("8", math.nan), ("3", -2.0)], 0, 9)
    with pytest.raises(ValueError, match="is 3.0"):
        expected_score([("8", 3.0)], 0, 9)  # a probability of e^3
    s = read_score("8", [("8", [("8", math.nan), ("3", -2.0)])], 0, 9)
    assert s.value is None and "the reply's log-probabilities are broken" in s.error


def _with_logprob(value):
    body = json.loads(json.dumps(recorded("chat_logprobs.json")["body"]))
    content = body["choices"][0]["logprobs"]["content"][0]
    content["logprob"] = content["top_logprobs"][0]["logprob"] = value
    return body


@pytest.mark.parametrize("value,reason", [(math.nan, "log-probability of score '8' is nan"),
                                          (None, "has malformed log-probabilities")])
def test_a_reply_with_broken_log_probabilities_is_invalid(tmp_path, value, reason):
    def serve(request: httpx2.Request) -> httpx2.Response:  # json.dumps writes NaN as vLLM's Python server does
        body = recorded("models.json")["body"] if request.url.path.endswith("/models") else _with_logprob(value)
        return httpx2.Response(200, content=json.dumps(body).encode(), headers={"content-type": "application/json"})

    out = score(Fidelity(options(tmp_path), transport=httpx2.MockTransport(serve)), batch(2))
    assert not out.valid.any() and all(reason in e for e in out.extras["error"]), out.extras["error"]


def test_parse_integer_rejects_missing_and_out_of_range_scores():
    assert parse_integer("Score: 7/9", 0, 9) == (7, None)
    assert parse_integer("no idea", 0, 9)[0] is None
    value, why = parse_integer("15", 0, 9)
    assert value is None and "outside 0..9" in why
    assert parse_integer("3.5", 0, 9)[0] is None  # not an integer answer


def test_read_score_uses_the_position_of_the_generated_score_token():
    positions = [("Score", [("Score", -0.1), ("2", -3.0)]), (":", [(":", 0.0)]), ("6", [("6", math.log(0.5)), ("8", math.log(0.5))])]
    s = read_score("Score: 6", positions, 0, 9)
    assert (s.value, s.method) == (pytest.approx(7.0), "logprobs")
    assert read_score("6", None, 0, 9).method == "text"
    assert read_score("", None, 0, 9).error == "empty reply"


def test_score_range_must_be_single_tokens():
    assert score_tokens(1, 5) == ["1", "2", "3", "4", "5"]
    with pytest.raises(ValueError, match="0..9"):
        score_tokens(0, 10)


# ------------------------------------------------------------------------------------------ judges vs recorded replies


def test_recorded_reply_scores_as_the_expected_value_of_its_logprobs(tmp_path):
    server = FakeServer()
    judge = Fidelity(options(tmp_path), transport=server.transport)
    out = score(judge, batch())
    top = recorded("chat_logprobs.json")["body"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    probs = {int(t["token"]): math.exp(t["logprob"]) for t in top if t["token"].isdigit()}
    expected = sum(k * p for k, p in probs.items()) / sum(probs.values()) / 9
    assert out.valid.all()
    assert out.scores.tolist() == pytest.approx([expected] * 3, rel=1e-5)
    assert out.extras["method"] == ["logprobs"] * 3
    assert len(server.requests) == 3  # one request per sample
    body = server.requests[0][1]
    assert body["structured_outputs"] == {"choice": [str(i) for i in range(10)]}
    assert body["logprobs"] is True and body["top_logprobs"] == 10 and body["temperature"] == 0.0
    assert body["max_tokens"] == 1  # the constrained answer is one score token
    assert images_in(body) == 4  # 2 source frames + 2 edited frames
    assert "make object" in json.dumps(body["messages"])


def test_missing_logprobs_fall_back_to_the_parsed_integer(tmp_path):
    server = FakeServer(lambda r, b: (200, recorded("chat_no_logprobs.json")["body"]))
    out = score(Fidelity(options(tmp_path), transport=server.transport), batch(2))
    content = recorded("chat_no_logprobs.json")["body"]["choices"][0]["message"]["content"]
    assert out.valid.all()
    assert out.extras["method"] == ["text", "text"]
    assert out.scores.tolist() == pytest.approx([int(content) / 9] * 2)


def test_garbage_reply_is_invalid_with_its_reason(tmp_path):
    server = FakeServer(lambda r, b: (200, recorded("chat_unconstrained.json")["body"]))
    out = score(Aesthetics(options(tmp_path, constrain="none"), transport=server.transport), batch(2))
    assert not out.valid.any()
    assert all("no score in reply" in e for e in out.extras["error"])
    assert "structured_outputs" not in server.requests[0][1]
    assert server.requests[0][1]["max_tokens"] == 8  # room for "Score: 7" when unconstrained
    assert server.requests[0][1]["top_logprobs"] == 20


def test_http_500_is_retried_then_invalid_never_zero(tmp_path, caplog):
    err = {"error": {"message": "engine dead", "type": "InternalServerError", "code": 500}}
    server = FakeServer(lambda r, b: (500, err))
    judge = Preservation(options(tmp_path, retries=2), transport=server.transport)
    out = score(judge, batch(2))
    assert not out.valid.any()
    assert out.extras["attempts"] == [3, 3]
    assert all("HTTP 500" in e and "engine dead" in e and "after 3 attempts" in e for e in out.extras["error"])
    assert len(server.requests) == 6
    assert judge.client.stats["failures"] == 2 and judge.client.stats["invalid"] == 2
    assert "2/2 samples invalid" in caplog.text
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are never cached


def test_a_transient_error_is_retried_on_the_next_server(tmp_path):
    calls: list[str] = []

    def flaky(request, body):
        calls.append(request.url.host)
        if len(calls) == 1:
            return 503, {"error": {"message": "busy"}}
        return 200, recorded("chat_logprobs.json")["body"]

    server = FakeServer(flaky)
    out = score(Fidelity(options(tmp_path, base_urls=[URL_A, URL_B]), transport=server.transport), batch(1))
    assert out.valid.all() and out.extras["attempts"] == [2]
    assert calls[0] != calls[1]


def test_client_errors_are_not_retried(tmp_path):
    server = FakeServer(lambda r, b: (404, recorded("error_unknown_model.json")["body"]))
    out = score(Fidelity(options(tmp_path, retries=3, health_check=False), transport=server.transport), batch(1))
    assert not out.valid.any() and out.extras["attempts"] == [1]
    assert "HTTP 404" in out.extras["error"][0] and "does not exist" in out.extras["error"][0]


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [("<html>proxy error</html>", "text/html", "is not JSON"), ("{truncated", "application/json", "bad reply from")],
)
def test_a_reply_that_is_not_json_is_invalid(tmp_path, body, content_type, reason):
    def broken(request):
        if request.url.path.endswith("/models"):
            return FakeServer()(request)
        return httpx2.Response(200, text=body, headers={"content-type": content_type})

    out = score(Fidelity(options(tmp_path), transport=httpx2.MockTransport(broken)), batch(2))
    assert not out.valid.any()
    assert all(reason in e for e in out.extras["error"])


def test_timeouts_are_retried_then_invalid(tmp_path):
    def hang(request, body):
        raise httpx2.ReadTimeout("timed out", request=request)

    server = FakeServer(hang)
    out = score(Fidelity(options(tmp_path, retries=1, timeout=0.5), transport=server.transport), batch(2))
    assert not out.valid.any()
    assert all(e.startswith("timeout after 0.5s at http://judge-a.test/v1") for e in out.extras["error"])
    assert out.extras["attempts"] == [2, 2]


def test_requests_round_robin_over_base_urls(tmp_path):
    server = FakeServer()
    score(Fidelity(options(tmp_path, base_urls=[URL_A, URL_B], cache_dir=None), transport=server.transport), batch(6))
    hosts = [h for h, _ in server.requests]
    assert hosts.count("judge-a.test") == 3 and hosts.count("judge-b.test") == 3


def test_concurrency_is_bounded_by_max_concurrency(tmp_path):
    state = {"now": 0, "peak": 0}

    async def slow(request: httpx2.Request) -> httpx2.Response:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return httpx2.Response(200, json=recorded("chat_logprobs.json")["body"])

    opts = options(tmp_path, max_concurrency=3, health_check=False, cache_dir=None)
    out = score(Aesthetics(opts, transport=httpx2.MockTransport(slow)), batch(10))
    assert out.valid.all()
    assert state["peak"] == 3


def test_cache_answers_repeats_and_misses_on_any_change(tmp_path):
    server = FakeServer()
    judge = Fidelity(options(tmp_path), transport=server.transport)
    b = batch(3)
    first = score(judge, b)
    again = score(judge, b)
    assert len(server.requests) == 3
    assert again.extras["cached"] == [True] * 3 and torch.equal(first.scores, again.scores)
    # A fresh judge (a new process) reads the same disk cache.
    assert score(Fidelity(options(tmp_path), transport=server.transport), b).extras["cached"] == [True] * 3
    changed = batch(3)
    changed.instructions[0] = "make it blue"
    changed.edited[1, 4] = 0.0  # a sampled frame (the last) of sample 1
    out = score(judge, changed)
    assert out.extras["cached"] == [False, False, True]
    assert len(server.requests) == 5
    other_model = Fidelity(options(tmp_path, max_score=5), transport=server.transport)
    assert score(other_model, b).extras["cached"] == [False] * 3  # other scale: other request


def test_reference_image_is_sent_only_when_present(tmp_path):
    server = FakeServer()
    score(Fidelity(options(tmp_path, cache_dir=None), transport=server.transport), batch(2, references=True))
    counts = sorted(images_in(body) for _, body in server.requests)
    assert counts == [4, 5]
    with_ref = next(body for _, body in server.requests if images_in(body) == 5)
    assert "Reference image" in json.dumps(with_ref)


def test_grid_layout_sends_one_image_per_video(tmp_path):
    server = FakeServer()
    score(Preservation(options(tmp_path, layout="grid", frames=4, cache_dir=None), transport=server.transport), batch(1))
    assert images_in(server.requests[0][1]) == 2


def test_custom_prompt_template_is_used_and_checked(tmp_path):
    prompt = tmp_path / "mine.txt"
    prompt.write_text("Look: {{ edited }} Is it pretty? Say {{ min_score }}-{{ max_score }}. QWERTY")
    server = FakeServer()
    score(Aesthetics(options(tmp_path, prompt=str(prompt)), transport=server.transport), batch(1))
    text = json.dumps(server.requests[0][1]["messages"])
    assert "QWERTY" in text and "Say 0-9" in text
    with pytest.raises(ValueError, match="never shows"):
        Fidelity(options(tmp_path, prompt=str(prompt)), transport=server.transport)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Aesthetics(options(tmp_path, prompt=str(tmp_path / "nope.txt")), transport=server.transport)


# ------------------------------------------------------------------------------------------ start-up checks


def test_health_check_names_the_unreachable_url(tmp_path):
    def refuse(request):
        raise httpx2.ConnectError("connection refused", request=request)

    with pytest.raises(JudgeUnavailable, match=r"judge server http://judge-a.test/v1 is not reachable"):
        Fidelity(options(tmp_path), transport=httpx2.MockTransport(refuse))


@pytest.mark.parametrize("body", [b"not json{", b'{"data": 5}', b"[]", b"null"])
def test_health_check_names_a_server_that_answers_nonsense(tmp_path, body):
    """A /models reply that is not a model list used to be a traceback from inside the openai client."""
    nonsense = httpx2.MockTransport(lambda r: httpx2.Response(200, content=body, headers={"content-type": "application/json"}))
    with pytest.raises(JudgeUnavailable, match=r"judge server http://judge-a.test/v1 answered GET /models with something "
                                               r"other than a list of models \(.*\): is base_urls an OpenAI-compatible"):
        Fidelity(options(tmp_path), transport=nonsense)


def test_health_check_requires_the_model_to_be_served(tmp_path):
    with pytest.raises(JudgeUnavailable, match=r"does not serve model 'other'; it serves: tiny-vlm"):
        Fidelity(options(tmp_path, model="other"), transport=FakeServer().transport)


def test_api_key_comes_from_the_named_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("EDITRL_TEST_KEY", raising=False)
    with pytest.raises(JudgeUnavailable, match=r"\$EDITRL_TEST_KEY"):
        Fidelity(options(tmp_path, api_key_env="EDITRL_TEST_KEY"), transport=FakeServer().transport)
    monkeypatch.setenv("EDITRL_TEST_KEY", "sk-secret")
    seen: list[str] = []

    def check_key(request):
        seen.append(request.headers["authorization"])
        return FakeServer()(request)

    judge = Fidelity(options(tmp_path, api_key_env="EDITRL_TEST_KEY"), transport=httpx2.MockTransport(check_key))
    score(judge, batch(1))
    assert set(seen) == {"Bearer sk-secret"}
    assert "sk-secret" not in json.dumps(judge.options.model_dump())


def test_recipe_validates_judge_options():
    recipe = {
        "policy": {"name": "toy_t2v"},
        "data": {"train": {"kind": "prompts", "options": {"prompts": ["a red ball"]}}},
        "rewards": [{"name": "vlm_fidelity", "options": {"model": "m", "max_score": 10}}],
    }
    with pytest.raises(RecipeError, match=r"rewards.terms.0.options.*0..9"):
        load_recipe(recipe)
    recipe["rewards"][0]["options"] = {"model": "m", "frame": 3}
    with pytest.raises(RecipeError, match=r"rewards.terms.0.options.frame: unknown key \(did you mean 'frames'"):
        load_recipe(recipe)


def test_registry_builds_judges_by_name(tmp_path):
    judge = build_reward("vlm_aesthetics", {"model": "m", "health_check": False, "cache_dir": None})
    assert isinstance(judge, Aesthetics) and judge.needs == {"edited"}


def test_editrl_train_reports_a_dead_judge_server_in_one_line(tmp_path):
    import typer
    import yaml
    from typer.testing import CliRunner

    from editrl.commands import register

    recipe = {
        "run": {"output_dir": str(tmp_path / "run")},
        "policy": {"name": "toy_t2v", "options": {"frames": 2, "height": 8, "width": 8}},
        "data": {"train": {"kind": "prompts", "options": {"prompts": ["x"]}}},
        "rewards": [{"name": "vlm_aesthetics", "options": {"model": "m", "base_urls": ["http://127.0.0.1:9/v1"], "timeout": 2}}],
        "grpo": {"group_size": 2, "batch_size": 2},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml")], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "judge server http://127.0.0.1:9/v1 is not reachable" in result.output and "Traceback" not in result.output
