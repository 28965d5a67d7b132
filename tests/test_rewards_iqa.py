"""The pyiqa reward (real pyiqa metrics, offline) and the torchvision guard it needs on CPU-only torch."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from editrl.base import RecipeError
from editrl.reward import build_reward
from editrl.types import RewardBatch

pytest.importorskip("pyiqa", reason="pyiqa is installed by scripts/install.sh (extra [iqa])")

ROOT = Path(__file__).resolve().parents[1]


def videos(b: int = 2, t: int = 6, size: int = 32) -> torch.Tensor:
    return torch.rand(b, t, 3, size, size, generator=torch.Generator().manual_seed(0)) * 0.5


def test_full_reference_metric_compares_with_the_source():
    src = videos()
    reward = build_reward("iqa", {"metric": "psnr", "frames": 3})
    assert reward.needs == {"edited", "source"}
    out = reward(RewardBatch(["a", "b"], edited=src + 0.1, sources=src))
    assert out.valid.all()
    assert out.scores.tolist() == pytest.approx([20.0, 20.0], abs=1e-2)  # MSE 0.01


def test_lower_is_better_metrics_are_negated():
    src = videos()
    reward = build_reward("iqa", {"metric": "gmsd"})
    same = reward(RewardBatch(["a", "b"], edited=src, sources=src))
    worse = reward(RewardBatch(["a", "b"], edited=src.flip(-1), sources=src))
    assert same.scores.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert (worse.scores < 0).all()
    assert worse.extras["value"] == pytest.approx((-worse.scores).tolist())


def test_no_reference_metric_scores_the_edit_alone():
    reward = build_reward("iqa", {"metric": "entropy", "frames": 2})
    assert reward.needs == {"edited"}
    flat = torch.full((1, 4, 3, 32, 32), 0.5)
    out = reward(RewardBatch(["a", "b"], edited=torch.cat([flat, videos(1, t=4) * 2])))
    assert out.valid.all()
    assert out.scores[0] < out.scores[1]  # a flat image has no entropy


def test_unknown_metric_suggests_the_right_name():
    with pytest.raises(ValueError, match=r"unknown pyiqa metric 'pnsr' \(did you mean 'psnr'"):
        build_reward("iqa", {"metric": "pnsr"})


def test_weights_load_from_a_local_file(tmp_path):
    from pyiqa.archs.cnniqa_arch import CNNIQA

    torch.manual_seed(0)
    net = CNNIQA(pretrained=None)
    path = tmp_path / "cnniqa.pth"
    torch.save({"params": net.state_dict()}, path)
    reward = build_reward("iqa", {"metric": "cnniqa", "weights": str(path), "frames": 2})
    loaded = reward.metric.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    out = reward(RewardBatch(["a", "b"], edited=videos()))
    assert out.valid.all()


def test_weights_that_cannot_be_fetched_fail_at_start_up_with_a_way_out(tmp_path, monkeypatch):
    # An empty cache: the metric must try to download (which fails offline) instead of finding a file.
    monkeypatch.setattr("pyiqa.utils.download_util.DEFAULT_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"pyiqa metric 'cnniqa' needs weights from https://\S+, which cannot be fetched.*`weights: /path/to/"):
        build_reward("iqa", {"metric": "cnniqa"})


def test_qwen_vl_processors_still_load_with_the_guarded_torchvision(tmp_path):
    """pyiqa brings torchvision; after scripts/guard_torchvision.py, transformers' Qwen-VL processors work."""
    import torchvision  # noqa: F401  (raised "operator torchvision::nms does not exist" before the guard)
    from transformers import AutoProcessor, Qwen2_5_VLProcessor

    spec = importlib.util.spec_from_file_location("tiny_vlm", ROOT / "scripts" / "tiny_vlm.py")
    tiny_vlm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_vlm)
    tiny_vlm.build(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "rate 0 to 9"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = (videos(1, t=1, size=56)[0, 0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    out = processor(text=[text], images=[image], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert (out["input_ids"] == processor.image_token_id).sum() == 4  # 4x4 patches merged 2x2
    video = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[videos(1, t=4, size=56)[0]], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == [[2, 4, 4]]
    qwen25 = Qwen2_5_VLProcessor(processor.image_processor, processor.tokenizer, processor.video_processor, chat_template=processor.chat_template)
    assert qwen25(text=[text], images=[image], return_tensors="pt")["pixel_values"].shape[0] == 16


def test_guard_script_is_idempotent_here():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "guard_torchvision.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "guarded" not in result.stdout  # already applied by scripts/install.sh


def bundled_iqa_metrics() -> list[str]:
    """Every pyiqa metric a bundled recipe names (an `iqa` reward term's `metric`)."""
    import yaml

    from editrl.config import bundled_recipes

    metrics = set()
    for path in bundled_recipes().values():
        rewards = (yaml.safe_load(path.read_text()) or {}).get("rewards") or {}
        terms = rewards if isinstance(rewards, list) else rewards.get("terms", [])
        metrics |= {t["options"]["metric"] for t in terms if t.get("name") == "iqa"}
    return sorted(metrics)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty weight caches (pyiqa's, torch.hub's, OpenAI CLIP's under ~/.cache/clip): every metric must download."""
    monkeypatch.setattr("pyiqa.utils.download_util.DEFAULT_CACHE_DIR", str(tmp_path / "pyiqa"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path


def test_the_bundled_recipes_name_laion_aes():
    assert "laion_aes" in bundled_iqa_metrics()  # the test below builds what they name


@pytest.mark.parametrize("metric", sorted({*bundled_iqa_metrics(), "clipscore"}))
def test_bundled_metrics_build_up_to_their_weights(metric, no_weights):
    """Everything a metric imports works on a fresh install (laion_aes and clipscore import OpenAI's clip, which
    imports pkg_resources: setuptools<81); what stops it here is the one thing offline can't have, its weights, said
    in one line with the URL and where the file goes."""
    with pytest.raises(RecipeError) as caught:
        build_reward("iqa", {"metric": metric})
    message = str(caught.value)
    assert "\n" not in message and "No module named" not in message
    assert re.match(rf"pyiqa metric '{metric}' needs weights from https://\S+, which cannot be fetched", message), message
    assert re.search(r"download that file elsewhere and (put it at /\S+|set the reward option `weights: )", message), message


@pytest.mark.parametrize("metric", bundled_iqa_metrics())
def test_dry_run_names_the_weights_of_bundled_metrics_without_fetching(metric, no_weights):
    from editrl.rewards.iqa import Iqa

    (problem,) = Iqa.preflight(Iqa.Options(metric=metric))
    assert re.match(rf"pyiqa metric '{metric}' needs https://\S+, which is not at /\S+: download it there", problem), problem
    assert not any(no_weights.rglob("*.pt")) and not any(no_weights.rglob("*.pth"))
