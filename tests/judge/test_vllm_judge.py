"""The judges against a real vLLM server (tiny random Qwen2-VL on 127.0.0.1): scoring real videos,
concurrency, the cache, and the server dying mid-batch and mid-run."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import httpx2
import pytest
import torch
import yaml
from typer.testing import CliRunner

from editrl.data.video import read_video, write_video
from editrl.reward import build_reward
from editrl.rewards.vlm_judge import JudgeUnavailable
from editrl.types import RewardBatch, RewardOutput

pytestmark = pytest.mark.judge


def moving_square(color: tuple[float, float, float], frames: int = 9, size: int = 64) -> torch.Tensor:
    """A square crossing a gradient background: (T, C, H, W) in [0, 1]."""
    y = torch.linspace(0, 1, size).view(1, size, 1).expand(3, size, size)
    video = y.unsqueeze(0).repeat(frames, 1, 1, 1) * 0.6
    for t in range(frames):
        x0 = 4 + t * 4
        video[t, :, 20:36, x0 : x0 + 16] = torch.tensor(color).view(3, 1, 1)
    return video


def real_batch(tmp_path, n: int = 3) -> RewardBatch:
    """Videos written as H.264 and read back with PyAV, as `editrl judge` would see them."""
    colors = [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0)]
    sources, edited = [], []
    for i in range(n):
        sources.append(read_video(write_video(tmp_path / f"src{i}.mp4", moving_square(colors[i % 4]))))
        edited.append(read_video(write_video(tmp_path / f"edit{i}.mp4", moving_square(colors[(i + 1) % 4]))))
    return RewardBatch(
        instructions=[f"change the square's colour ({i})" for i in range(n)],
        sources=torch.stack(sources),
        edited=torch.stack(edited),
        references=[torch.rand(3, 32, 32) if i == 0 else None for i in range(n)],
    )


def opts(server, **kw) -> dict:
    return {"model": server.served_name, "base_urls": [server.base_url], "frames": 3, "image_size": 64, "cache_dir": None} | kw


def served_requests(server) -> float:
    """Requests the server finished, from its Prometheus metrics."""
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.mark.parametrize("name", ["vlm_fidelity", "vlm_preservation", "vlm_aesthetics"])
def test_judges_score_real_videos(judge_server, tmp_path, name):
    batch = real_batch(tmp_path)
    judge = build_reward(name, opts(judge_server))
    out = asyncio.run(judge(batch))
    assert out.valid.all(), out.extras["error"]
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert out.extras["method"] == ["logprobs"] * 3  # the server returned the score tokens' log-probs
    # An expected value over ten digits, not a bare digit.
    assert all(abs(s * 9 - round(s * 9)) > 1e-6 for s in out.scores.tolist())
    again = asyncio.run(judge(batch))
    assert torch.allclose(again.scores, out.scores, atol=1e-3)  # greedy, deterministic server


def test_scores_depend_on_the_images(judge_server, tmp_path):
    batch = real_batch(tmp_path, n=2)
    judge = build_reward("vlm_aesthetics", opts(judge_server))
    first = asyncio.run(judge(batch))
    batch.edited = batch.edited.flip(-1).clamp(0, 1) * 0.3
    second = asyncio.run(judge(batch))
    assert not torch.allclose(first.scores, second.scores, atol=1e-6)


def test_cache_rescoring_sends_nothing(judge_server, tmp_path):
    batch = real_batch(tmp_path, n=4)
    judge = build_reward("vlm_fidelity", opts(judge_server, cache_dir=str(tmp_path / "cache")))
    before = served_requests(judge_server)
    first = asyncio.run(judge(batch))
    assert served_requests(judge_server) - before == 4
    again = asyncio.run(judge(batch))
    assert served_requests(judge_server) - before == 4
    assert again.extras["cached"] == [True] * 4
    assert torch.equal(first.scores, again.scores) and torch.equal(first.valid, again.valid)


def test_requests_run_concurrently_up_to_the_limit(judge_server, tmp_path):
    """12 samples, max_concurrency 4: exactly 4 requests are in flight at the peak, all answered."""
    state = {"now": 0, "peak": 0}

    class Counting(httpx2.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            try:
                response = await super().handle_async_request(request)
                await response.aread()
                return response
            finally:
                state["now"] -= 1

    from editrl.rewards.vlm_judge import Aesthetics, JudgeOptions

    judge = Aesthetics(JudgeOptions.model_validate(opts(judge_server, max_concurrency=4, health_check=False)), transport=Counting())
    batch = real_batch(tmp_path, n=4)
    big = RewardBatch(instructions=batch.instructions * 3, edited=torch.cat([batch.edited] * 3) + torch.rand(12, 1, 1, 1, 1) * 0.01)
    out = asyncio.run(judge(big))
    assert out.valid.all()
    assert state["peak"] == 4


def test_editrl_judge_scores_a_folder_through_the_server(judge_server, tmp_path, invoke_judge):
    from editrl.data.manifest import write_manifest, write_sample
    from editrl.types import EditSample

    batch = real_batch(tmp_path, n=3)
    rows = [
        write_sample(tmp_path / "data", EditSample(id=f"e{i}", instruction=batch.instructions[i], source=batch.sources[i], edited=batch.edited[i]))
        for i in range(3)
    ]
    write_manifest(tmp_path / "data", rows)
    recipe = {
        "policy": {"name": "toy_t2v"},
        "data": {"train": {"kind": "prompts", "options": {"prompts": ["x"]}}},
        "rewards": [{"name": "vlm_fidelity", "options": opts(judge_server)}, {"name": "vlm_aesthetics", "options": opts(judge_server)}],
    }
    out = tmp_path / "scores.jsonl"
    result = invoke_judge(tmp_path, recipe, "-d", str(tmp_path / "data"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.output.count("(3/3 valid)") == 2
    scores = [json.loads(line)["scores"] for line in out.read_text().splitlines()]
    assert all(0 <= s[name] <= 1 for s in scores for name in ("vlm_fidelity", "vlm_aesthetics"))


def test_health_check_against_the_real_server(judge_server):
    with pytest.raises(JudgeUnavailable, match=r"does not serve model 'other'; it serves: tiny-vlm"):
        build_reward("vlm_fidelity", {"model": "other", "base_urls": [judge_server.base_url]})
    port = judge_server.port + 1 if judge_server.port < 65535 else judge_server.port - 1
    with pytest.raises(JudgeUnavailable, match=rf"judge server http://127.0.0.1:{port}/v1 is not reachable"):
        build_reward("vlm_fidelity", {"model": "tiny-vlm", "base_urls": [f"http://127.0.0.1:{port}/v1"]})


@pytest.mark.slow
def test_server_killed_mid_batch_gives_invalid_samples_not_a_crash(disposable_server, tmp_path):
    """One request at a time; the server is SIGKILLed once two replies are in: the rest fail after retries."""
    replies = {"n": 0}

    class KillAfterTwo(httpx2.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            response = await super().handle_async_request(request)
            await response.aread()
            if request.url.path.endswith("/chat/completions"):
                replies["n"] += 1
                if replies["n"] == 2:
                    disposable_server.kill()
            return response

    from editrl.rewards.vlm_judge import Fidelity, JudgeOptions

    options = JudgeOptions.model_validate(opts(disposable_server, max_concurrency=1, retries=2, backoff=0.1, timeout=10, health_check=False))
    judge = Fidelity(options, transport=KillAfterTwo())
    batch = real_batch(tmp_path, n=4)
    out = asyncio.run(judge(batch))
    assert out.valid.tolist() == [True, True, False, False]
    for error, attempts in zip(out.extras["error"][2:], out.extras["attempts"][2:]):
        assert error.startswith(f"connection error at {disposable_server.base_url}") and "after 3 attempts" in error
        assert attempts == 3
    assert judge.client.stats["retries"] == 4 and judge.client.stats["invalid"] == 2


class ServerKiller:
    """A reward that kills the judge server on its `kill_on_call`-th call (it runs before the judge)."""

    needs = {"edited"}
    server = None
    kill_on_call = 2
    calls = 0

    def __init__(self, **options) -> None:
        type(self).calls = 0

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        type(self).calls += 1
        if type(self).calls == self.kill_on_call:
            self.server.kill()
        return RewardOutput(torch.zeros(len(batch)), torch.ones(len(batch), dtype=torch.bool))


def judge_recipe(server, tmp_path, on_failure: str) -> str:
    recipe = {
        "run": {"name": "judge_kill", "output_dir": str(tmp_path / "run"), "threads": None, "plugins": [__name__]},
        "policy": {"name": "toy_t2v", "options": {"frames": 2, "height": 8, "width": 8}},
        "data": {"train": {"kind": "prompts", "options": {"prompts": ["a red ball", "a blue sky"]}}},
        "rewards": {
            "on_failure": on_failure,
            "terms": [
                {"name": f"{__name__}:ServerKiller", "label": "killer", "weight": 0.0},
                {"name": "vlm_aesthetics", "weight": 1.0, "options": opts(server, frames=2, retries=1, backoff=0.1, timeout=10)},
            ],
        },
        "sampling": {"steps": 4},
        "grpo": {"group_size": 2, "batch_size": 2},  # one group: one reward call per step
        "train": {"steps": 3, "save_every": 10, "progress": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def train_cli(recipe: str):
    import typer

    from editrl.commands import register

    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, ["train", recipe])


@pytest.mark.slow
def test_trainer_skips_invalid_judge_scores_when_the_server_dies(disposable_server, tmp_path, caplog):
    ServerKiller.server = disposable_server
    result = train_cli(judge_recipe(disposable_server, tmp_path, "skip"))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["reward/vlm_aesthetics/invalid"] for r in rows] == [0, 2, 2]
    assert "samples invalid" in caplog.text and "connection error" in caplog.text


@pytest.mark.slow
def test_trainer_stops_with_a_clear_message_when_the_server_dies(disposable_server, tmp_path):
    ServerKiller.server = disposable_server
    result = train_cli(judge_recipe(disposable_server, tmp_path, "fail"))
    assert result.exit_code == 2
    assert "reward 'vlm_aesthetics': 2 of 2 samples have no valid score at step 2" in result.output
    assert "connection error" in result.output and "rewards.on_failure=fail" in result.output
    assert "Traceback" not in result.output
