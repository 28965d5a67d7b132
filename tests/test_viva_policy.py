"""The VIVA policy on its tiny preset: shapes through every stage, LoRA reference, CFG, round trips, errors."""

import pytest
import torch

from editrl.config import RecipeError
from editrl.policies.viva.instructor import to_pil
from editrl.policy import LoraOptions, build_policy
from editrl.types import EditSample

INSTRUCTIONS = ["make the sky red", "turn the car blue and the tree green", "remove the ball", "add a dog on the left"]


def viva(**options):
    return build_policy("viva", {"preset": "tiny", "text_len": 32, "refiner_heads": 2, **options})


def samples(n=2, refs=(True, False), frames=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ref = torch.rand(3, 24, 40, generator=g) if refs[i % len(refs)] else None  # any size: resized to the video
        out.append(EditSample(
            id=f"s{i}", instruction=INSTRUCTIONS[i % 4], source=torch.rand(frames, 3, size, size, generator=g),
            target=torch.rand(frames, 3, size, size, generator=g), reference=ref,
        ))
    return out


def velocity(policy, cond, seed=1, sigma=0.6):
    x = policy.init_noise(cond, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return policy.velocity(x, torch.full((cond.batch_size,), sigma), cond)


def perturb(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "fusion,use_reference,family",
    [("add", True, "qwen2_5_vl"), ("add", False, "qwen2_5_vl"), ("concat", True, "qwen2_5_vl"),
     ("concat", False, "qwen2_5_vl"), ("add", True, "qwen3_vl"), ("concat", True, "qwen3_vl")],
)
def test_shapes_through_every_stage(fusion, use_reference, family):
    p = viva(fusion=fusion, use_reference=use_reference, vlm_family=family)
    batch = samples(2, refs=(True, False))
    cond = p.encode(batch)
    assert cond["tokens"].shape == (2, 32, p.instructor.hidden_size) and cond["mask"].dtype == torch.bool
    assert cond["source"].shape == (2, 16, 2, 8, 8)  # 5 frames -> 2 latent frames, 32 px -> 8 (the tiny VAE is 4x)
    if use_reference:
        assert cond["reference"].shape == (2, 16, 1, 8, 8)
        assert cond["reference"][1].abs().sum() == 0 and cond["reference"][0].abs().sum() > 0  # no image: zeros
    else:
        assert cond.get("reference") is None
    group = cond.repeat_interleave(3)
    x = p.init_noise(group, torch.Generator().manual_seed(0))
    assert x.shape == (6, 16, 2, 8, 8)
    dit_in = p.fuse(x, group["source"], group.get("reference"))
    assert dit_in.shape == (6, 16 if fusion == "add" else 32, 3 if use_reference else 2, 8, 8)
    assert p.denoiser.config.in_channels == dit_in.shape[1]
    v = p.velocity(x, torch.full((6,), 0.5), group)
    assert v.shape == x.shape and torch.isfinite(v).all()
    pixels = p.decode(x)
    assert pixels.shape == (6, 5, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    assert p.encode_target(batch).shape == (2, 16, 2, 8, 8)


def test_reference_image_reaches_the_vlm_and_the_dit():
    p = viva()
    with_ref, without = samples(1, refs=(True,))[0], samples(1, refs=(False,))[0]
    cond = p.encode([with_ref, without])
    n_ref, n_plain = cond["mask"].sum(1).tolist()
    grid = p.instructor.image_processor(images=[to_pil(with_ref.reference)], return_tensors="pt")["image_grid_thw"]
    assert n_ref == n_plain + 2 + int(grid.prod()) // 4  # <|vision_start|>, merged 2x2 patches, <|vision_end|>
    v = velocity(p, cond)
    assert not torch.allclose(v[0], v[1])


def test_concat_starts_as_its_text_to_video_dit():
    """New input channels start at zero (the pretrained DiT has 16), so the source has no effect until trained."""
    p = viva(fusion="concat", use_reference=False)
    assert p.denoiser.patch_embedding.weight[:, 16:].abs().sum() == 0
    cond = p.encode(samples(1))
    moved = cond.index([0])
    moved.data["source"] = torch.randn_like(moved["source"])
    assert torch.equal(velocity(p, cond), velocity(p, moved))


def test_adapter_disabled_reproduces_base_exactly():
    p = viva()
    cond = p.encode(samples(2))
    base = velocity(p, cond)
    p.add_lora(LoraOptions(rank=4, alpha=4))
    perturb([q for q in p.denoiser.parameters() if q.requires_grad])  # LoRA B starts at 0: make it matter
    assert not torch.allclose(velocity(p, cond), base)
    with p.reference():
        assert torch.equal(velocity(p, cond), base)
    assert not torch.allclose(velocity(p, cond), base)  # the adapter is back on


def test_gradients_reach_lora_and_refiner_only():
    p = viva()
    p.add_lora(LoraOptions(rank=4, alpha=4))
    cond = p.encode(samples(2))
    x = p.init_noise(cond, torch.Generator().manual_seed(0))
    p.velocity(x, torch.full((2,), 0.5), cond).square().mean().backward()
    assert all(q.grad is not None for q in p.refiner.parameters())
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for n, q in p.denoiser.named_parameters() if "lora_B" in n)
    assert all(q.grad is None for q in p.instructor.parameters()) and all(q.grad is None for q in p.vae.parameters())
    assert {id(q) for q in p.trainable_parameters()} == {
        id(q) for q in [*p.refiner.parameters(), *(q for q in p.denoiser.parameters() if q.requires_grad)]
    }


def test_save_load_round_trip_is_exact(tmp_path):
    p = viva()
    p.add_lora(LoraOptions(rank=4, alpha=4))
    perturb(p.trainable_parameters())
    cond = p.encode(samples(2))
    p.save_trainable(tmp_path)
    q = viva(init_seed=7)  # a different random refiner: everything must come from the files
    q.add_lora(LoraOptions(rank=4, alpha=4))
    assert not torch.equal(velocity(q, cond), velocity(p, cond))
    q.load_trainable(tmp_path)
    assert torch.equal(velocity(q, cond), velocity(p, cond))
    for a, b in zip(p.trainable_parameters(), q.trainable_parameters()):
        assert torch.equal(a, b)


def test_fully_trained_dit_loads_into_a_lora_policy(tmp_path):
    """SFT trains the DiT; GRPO adds a LoRA on top and must see the SFT weights, then save them again."""
    sft = viva(trainable=["refiner", "dit"])
    assert {id(q) for q in sft.trainable_parameters()} >= {id(q) for q in sft.denoiser.parameters()}
    perturb(sft.trainable_parameters())
    cond = sft.encode(samples(2))
    sft.save_trainable(tmp_path / "sft")
    grpo = viva(trainable=[])
    grpo.add_lora(LoraOptions(rank=4, alpha=4))  # B = 0: the LoRA adds nothing yet
    grpo.load_trainable(tmp_path / "sft")
    assert torch.equal(velocity(grpo, cond), velocity(sft, cond))
    grpo.save_trainable(tmp_path / "grpo")  # base DiT + LoRA + refiner: a self-contained checkpoint
    again = viva(trainable=[])
    again.add_lora(LoraOptions(rank=4, alpha=4))
    again.load_trainable(tmp_path / "grpo")
    assert torch.equal(velocity(again, cond), velocity(sft, cond))


def test_dit_trains_fully_or_through_lora_not_both():
    with pytest.raises(RecipeError, match="trainable.*not both"):
        viva(trainable=["dit"]).add_lora(LoraOptions())


def test_classifier_free_guidance_extrapolates_from_the_null_condition():
    p = viva(guidance_scale=3.0)
    cond = p.encode(samples(2))
    assert cond["null_tokens"].shape == cond["tokens"].shape
    guided = velocity(p, cond)
    p.guidance_scale = 1.0
    v_cond = velocity(p, cond)
    null = cond.index([0, 1])
    null.data["tokens"], null.data["mask"] = cond["null_tokens"], cond["null_mask"]
    v_null = velocity(p, null)
    torch.testing.assert_close(guided, v_null + 3.0 * (v_cond - v_null), rtol=1e-5, atol=1e-5)


def test_output_does_not_depend_on_the_rest_of_the_batch():
    """Padding is masked in the refiner and fixed at text_len for the DiT: a request alone == in a batch."""
    p = viva()
    batch = samples(3, refs=(True, False, True))
    together = velocity(p, p.encode(batch).index([1]))
    alone = velocity(p, p.encode([batch[1]]))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_conform_video_trims_and_resizes_with_a_note():
    p = viva()
    video, note = p.conform_video(torch.rand(7, 3, 30, 40))
    assert video.shape == (5, 3, 32, 40) and "7 frames of 30x40 -> 5 frames of 32x40" in note
    same, none = p.conform_video(torch.rand(9, 3, 32, 16))
    assert same.shape == (9, 3, 32, 16) and none is None


def test_bad_inputs_are_one_line_errors():
    p = viva()
    with pytest.raises(ValueError, match="sample 's0' source: 6 frames of 32x32.*4k\\+1 frames"):
        p.encode(samples(1, frames=6))
    with pytest.raises(ValueError, match="needs a source video"):
        p.encode([EditSample(id="t", instruction="x")])
    with pytest.raises(ValueError, match="needs a target video"):
        p.encode_target([EditSample(id="t", instruction="x", source=torch.rand(5, 3, 32, 32))])


def test_missing_or_mismatched_checkpoints_name_the_component(tmp_path):
    from editrl.policies.viva.presets import tiny_paths

    paths = tiny_paths("qwen2_5_vl")
    with pytest.raises(RecipeError, match=r"policy\.options\.dit: .*nowhere does not exist"):
        viva(dit=str(tmp_path / "nowhere"))
    with pytest.raises(RecipeError, match=r"policy\.options\.dit: cannot load a WanTransformer3DModel from .*vae"):
        viva(dit=paths["vae"])
    with pytest.raises(RecipeError, match=r"policy\.options\.vae: cannot load"):
        viva(vae=str(tmp_path))  # an empty directory
    with pytest.raises(RecipeError, match=r"policy\.options\.vlm_family: .*'qwen2_5_vl' model, not 'qwen3_vl'"):
        viva(vlm=paths["vlm"], vlm_family="qwen3_vl")
    with pytest.raises(RecipeError, match=r"policy\.options\.refiner_heads"):
        viva(refiner_heads=5)  # 32 is not divisible by 5
    with pytest.raises(ValueError, match="preset: tiny.*missing: vlm, dit, vae"):
        build_policy("viva", {})


def test_one_vlm_call_per_encode_even_with_guidance():
    """The null condition rides in the same VLM batch; the VAE sees the source once and the references once."""
    p = viva(guidance_scale=2.0)
    rows, vae_batches = [], []
    p.instructor.model.register_forward_hook(lambda mod, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    encode = p.vae.encode
    p.vae.encode = lambda x: vae_batches.append(tuple(x.shape[:3])) or encode(x)
    p.encode(samples(3, refs=(True, False)))
    assert rows == [6]  # 3 requests + their 3 null prompts, in one call
    assert vae_batches == [(3, 3, 5), (2, 3, 1)]  # 3 source videos, then the 2 reference images


def test_decode_in_chunks_and_in_bfloat16():
    """Chunked decoding bounds memory without changing a pixel; bf16 decoding stays close to float32."""
    whole, chunked, low = viva(decode_chunk=8), viva(decode_chunk=3), viva(decode_dtype="bfloat16")
    x0 = torch.randn(5, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = whole.decode(x0)
    assert ref.shape == (5, 5, 3, 32, 32) and ref.dtype == torch.float32
    assert torch.allclose(chunked.decode(x0), ref, atol=1e-6)
    half = low.decode(x0)
    assert half.dtype == torch.float32 and 0 < (half - ref).abs().max() < 0.05
    # Its decoder's convolutions are stored in bf16: the very pixels of float32 weights cast by autocast at every call.
    assert low.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert next(low.vae.encoder.parameters()).dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast = whole.vae.decode(x0 * whole.latents_std + whole.latents_mean).sample.float()
    assert torch.equal(half, ((cast.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4))


def test_token_counts_are_host_side_and_bound_the_refiner():
    p = viva()
    cond = p.encode(samples(2))
    assert cond["counts"].device.type == "cpu"
    assert torch.equal(cond["counts"], cond["mask"].sum(1).cpu())
    assert int(cond["counts"].max()) < 32  # the refiner runs on fewer tokens than text_len
