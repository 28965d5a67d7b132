"""The edit rubrics (`edit_reward`, `viescore`) through a real vLLM server of the tiny random Qwen2-VL: images and
videos scored from the log-probs of every score position, `editrl judge` on a folder of images, and
`editrl judge --audit` with the rubrics. The machinery, not the numbers (the model is random)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch

from editrl.data.manifest import write_manifest, write_sample
from editrl.data.video import read_media
from editrl.reward import build_reward
from editrl.types import EditSample, RewardBatch

pytestmark = pytest.mark.judge


def opts(server, **kw) -> dict:
    return {"model": server.served_name, "base_urls": [server.base_url], "frames": 3, "image_size": 64, "cache_dir": None} | kw


def square(color: tuple[float, float, float], frames: int, shift: int = 0) -> torch.Tensor:
    """A square over a gradient, (T, C, H, W); it slides over the frames of a video."""
    y = torch.linspace(0, 1, 32).view(1, 32, 1).expand(3, 32, 32)
    video = y.unsqueeze(0).repeat(frames, 1, 1, 1) * 0.6
    for t in range(frames):
        video[t, :, 8:20, 2 + 3 * t + shift : 14 + 3 * t + shift] = torch.tensor(color).view(3, 1, 1)
    return video


def samples(frames: int, n: int = 3) -> list[EditSample]:
    colors = [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0)]
    return [EditSample(id=f"e{i}", instruction=f"make the square colour {i}", source=square(colors[i], frames),
                       target=square(colors[i + 1], frames), edited=square(colors[i + 1], frames, shift=2), category="recolor",
                       mask=torch.ones(frames, 1, 32, 32, dtype=torch.bool))
            for i in range(n)]


def folder(tmp_path, frames: int) -> tuple:
    """The samples written as a data folder (PNGs for one frame) and read back, as `editrl judge` sees them."""
    data = tmp_path / f"data{frames}"
    write_manifest(data, [write_sample(data, s) for s in samples(frames)])
    return data, [read_media(p) for p in sorted((data / ("images" if frames == 1 else "videos")).glob("*_edit.*"))]


@pytest.mark.parametrize("frames", [1, 5])
def test_rubrics_score_images_and_videos_from_logprobs(judge_server, tmp_path, frames):
    data, edited = folder(tmp_path, frames)
    sources = [read_media(p) for p in sorted(data.glob("*/*_src.*"))]
    assert edited[0].shape[0] == frames and (data / "images").is_dir() == (frames == 1)
    batch = RewardBatch(instructions=[s.instruction for s in samples(frames)], sources=torch.stack(sources),
                        edited=torch.stack(edited), references=[None] * 3)
    vie = asyncio.run(build_reward("viescore", opts(judge_server))(batch))
    assert vie.valid.all(), vie.extras["error"]
    assert vie.extras["method"] == ["logprobs"] * 3
    for i in range(3):
        parts = {k: vie.extras[k][i] for k in ("editing_success", "over_editing", "naturalness", "artifacts")}
        assert all(0 <= v <= 10 for v in parts.values())
        assert any(abs(v * 0.9 - round(v * 0.9)) > 1e-6 for v in parts.values())  # expected values, not bare digits
        sc, pq = min(parts["editing_success"], parts["over_editing"]), min(parts["naturalness"], parts["artifacts"])
        assert (vie.extras["sc"][i], vie.extras["pq"][i]) == (sc, pq)
        assert vie.extras["overall"][i] == pytest.approx(math.sqrt(sc * pq))
        assert float(vie.scores[i]) == pytest.approx(math.sqrt(sc * pq) / 10, rel=1e-6)
    er = asyncio.run(build_reward("edit_reward", opts(judge_server))(batch))
    assert er.valid.all(), er.extras["error"]
    assert er.extras["method"] == ["logprobs"] * 3
    for i in range(3):
        following, quality = er.extras["instruction_following"][i], er.extras["visual_quality"][i]
        assert 1 <= following <= 4 and 1 <= quality <= 4
        assert float(er.scores[i]) == pytest.approx((following + quality - 2) / 6, rel=1e-6)


def test_editrl_judge_scores_a_folder_of_images_with_the_rubrics(judge_server, tmp_path, invoke_judge):
    data, _ = folder(tmp_path, 1)
    recipe = {
        "policy": {"name": "toy_t2v"},
        "data": {"train": {"kind": "prompts", "options": {"prompts": ["x"]}}},
        "rewards": [{"name": "viescore", "options": opts(judge_server)}, {"name": "edit_reward", "options": opts(judge_server)}],
    }
    out = tmp_path / "scores.jsonl"
    result = invoke_judge(tmp_path, recipe, "-d", str(data), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.output.count("(3/3 valid)") == 2
    scores = [json.loads(line)["scores"] for line in out.read_text().splitlines()]
    assert all(0 <= s[name] <= 1 for s in scores for name in ("viescore", "edit_reward"))


def test_audit_with_the_rubrics_on_images(judge_server, tmp_path, invoke_judge):
    from editrl.audit import COLUMNS, ORACLE

    data, _ = folder(tmp_path, 1)
    recipe = {
        "run": {"name": "rubrics"},
        "policy": {"name": "toy_t2v"},
        "data": {"train": {"kind": "manifest", "options": {"path": str(data)}}},
        "rewards": [{"name": "viescore", "options": opts(judge_server)}, {"name": "edit_reward", "options": opts(judge_server)}],
    }
    out = tmp_path / "audit"
    result = invoke_judge(tmp_path, recipe, "--audit", str(data), "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in (out / "audit_samples.csv").read_text().splitlines()[1:]]
    frozen = 3 + COLUMNS.index("vs_frozen")
    for term in (ORACLE, "viescore", "edit_reward"):
        mine = [r for r in rows if r[0] == term]
        assert len(mine) == 3, term
        for r in mine:
            assert r[frozen] == ""  # an image has no frozen foil: n/a, not a tie
            prefs = [float(v) for j, v in enumerate(r[3 : 3 + len(COLUMNS) - 1], start=3) if j != frozen]
            assert all(p in (0.0, 0.5, 1.0) for p in prefs), r  # every other foil got a score
    assert {p.name for p in out.iterdir()} == {"audit.md", "audit.csv", "audit_samples.csv", "audit.png"}
