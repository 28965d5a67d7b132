"""The VLM instructor on both tiny Qwen families: layer choice, system-prompt crop, padding, images."""

import pytest
import torch

from editrl.config import RecipeError
from editrl.policies.viva.instructor import Instructor
from editrl.policies.viva.presets import tiny_paths


def frames(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 32, 32, generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_crop_layer_and_padding(family):
    path = tiny_paths(family)["vlm"]
    full = Instructor(path, family, crop_system=False)
    cropped = Instructor(path, family)
    texts, images = ["make the sky red", "remove the ball from the left of the road"], [frames(1), frames(2, seed=1)]
    h_full, m_full = full(texts, images)
    h, m = cropped(texts, images)
    assert cropped.crop > 10 and h.shape[1] == h_full.shape[1] - cropped.crop
    assert torch.equal(h, h_full[:, cropped.crop :]) and torch.equal(m, m_full[:, cropped.crop :])
    assert m[0].sum() < m[1].sum() and not m[0, -1] and m[1].all()  # right padding of the shorter prompt
    alone, alone_mask = cropped(texts[:1], images[:1])
    n = int(alone_mask.sum())
    torch.testing.assert_close(h[0, :n], alone[0], rtol=1e-5, atol=1e-5)  # padding does not leak into real tokens
    first = Instructor(path, family, hidden_layer=1)(texts, images)[0]
    assert first.shape == h.shape and not torch.allclose(first, h)
    other_frame = cropped(texts[:1], [frames(1, seed=5)])[0]
    assert not torch.allclose(other_frame, alone)  # the image is read
    assert all(not q.requires_grad for q in cropped.parameters())


def test_bad_layer_is_a_clear_error():
    with pytest.raises(RecipeError, match="hidden_layer: 5 is out of range for a 2-layer VLM"):
        Instructor(tiny_paths("qwen2_5_vl")["vlm"], "qwen2_5_vl", hidden_layer=5)


@pytest.mark.parametrize("hub_kernels", [False, True])
def test_hub_kernels_are_the_recipes_choice_not_transformers_default(hub_kernels, monkeypatch):
    """transformers 5 kernelizes every load by default (offline, that fails); editrl passes its own choice."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    instructor = Instructor(tiny_paths("qwen2_5_vl")["vlm"], "qwen2_5_vl", hub_kernels=hub_kernels)
    assert instructor.model.use_kernels is hub_kernels
