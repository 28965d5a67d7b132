"""The denoiser at the card's pace (issue 22, docs/performance.md): the LoRA path in the model's dtype, compiled
blocks that compile once and keep rollout and training on the same numbers, the attention backend option."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch._dynamo.utils import counters

from editrl.base import RecipeError
from editrl.config import LoraOptions
from editrl.policy import CastLinear, build_policy
from editrl.preflight import load_recipe
from editrl.trainer import Trainer
from editrl.types import EditSample


def toy(dtype: torch.dtype = torch.float32, **options):
    policy = build_policy("toy_t2v", {"frames": 2, "height": 8, "width": 8, **options}, dtype=dtype)
    policy.add_lora(LoraOptions(rank=4, alpha=8))
    with torch.no_grad():  # a LoRA that changes the output (B starts at zero)
        g = torch.Generator().manual_seed(0)
        for p in policy.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy


def toy_velocity(policy, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 2, 8, 8, generator=g).to(policy.dtype)
    cond = policy.encode([EditSample(id=str(i), instruction=f"a red ball {i}") for i in range(batch)])
    return policy.velocity(x, torch.full((batch,), 0.6), cond)


def test_adapters_keep_float32_masters_and_run_in_the_model_dtype():
    policy = toy(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())  # what Adam updates
    seen: list[torch.dtype] = []
    layers = [m for m in policy.denoiser.modules() if isinstance(m, LoraLayer)]
    factors = [f for layer in layers for f in (*layer.lora_A.values(), *layer.lora_B.values())]
    assert factors and all(type(f) is CastLinear for f in factors)
    hooks = [f.register_forward_hook(lambda m, i, o: seen.extend([i[0].dtype, o.dtype])) for f in factors]
    with torch.no_grad():
        v = toy_velocity(policy)
    for h in hooks:
        h.remove()
    assert v.dtype == torch.bfloat16 and seen and set(seen) == {torch.bfloat16}  # no float32 activation on the path
    with torch.enable_grad():
        toy_velocity(policy).float().square().mean().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def with_peft_casts(policy):
    """The same policy with peft's stock adapter path (activations cast to the float32 adapter and back)."""
    for layer in policy.denoiser.modules():
        if isinstance(layer, LoraLayer):
            for f in (*layer.lora_A.values(), *layer.lora_B.values()):
                f.__class__ = torch.nn.Linear
            layer.cast_input_dtype_enabled = True
    return policy


def test_float32_policies_compute_exactly_what_peft_computes():
    """In float32 the cast is a no-op: the same bits as peft's own LoRA layers (the CPU quickstart is unchanged)."""
    policy = toy()
    with torch.no_grad():
        ours = toy_velocity(policy)
        assert torch.equal(ours, toy_velocity(with_peft_casts(policy)))


def test_bf16_adapter_path_matches_peft_float32_adapters_to_bf16_precision():
    policy = toy(torch.bfloat16)
    with torch.no_grad():
        fast = toy_velocity(policy).float()
        with policy.reference():
            base = toy_velocity(policy).float()
        peft = toy_velocity(with_peft_casts(policy)).float()
    assert (peft - base).abs().max() > 0.1  # the LoRA changes the output
    assert (fast - peft).abs().max() <= 4 * 2**-8 * peft.abs().max()  # a few bf16 roundings of the output


def first_update_log_ratios(trainer: Trainer) -> list[float]:
    """|ratio - 1| and ratio std of every trained timestep of the first update (one update per step)."""
    metrics = trainer.train_step()
    ratios = {k: v for k, v in metrics.items() if k.startswith("ratio/t")}
    assert ratios
    return [abs(v - 1) if k.endswith("/mean") else v for k, v in ratios.items()]


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_first_update_ratio_is_exactly_one_in_bf16_toy(tmp_path, compile_):
    """Rollout and update recompute the same log-probabilities bit for bit, also with compiled blocks (whose
    training graph the rollout runs: editrl.policy.training_graph), with the KL's reference pass on."""
    recipe = load_recipe("toy", [f"run.output_dir={tmp_path}", "train.progress=false", "run.threads=null",
                                 "run.dtype=bfloat16", f"policy.options.compile={str(compile_).lower()}", "grpo.beta=0.01"])
    trainer = Trainer(recipe)
    assert trainer.policy.compiled == compile_
    assert max(first_update_log_ratios(trainer)) <= 1e-6


@pytest.mark.parametrize("backbone,compile_", [("wan", False), ("wan", True), ("hunyuan_video", True)])
def test_first_update_ratio_is_exactly_one_in_bf16_viva(tmp_path, backbone, compile_):
    """The VIVA policy's refiner runs in the same graph as its DiT (both under training_graph), on both backbones."""
    from test_viva_grpo import viva_tiny
    from test_viva_hunyuan import PAIR

    trainer = Trainer(viva_tiny(tmp_path / "run", "run.dtype=bfloat16", "sampling.steps=4", "grpo.beta=0.01",
                                f"policy.options.compile={str(compile_).lower()}", *(PAIR if backbone != "wan" else [])))
    assert trainer.policy.options.backbone == backbone and trainer.policy.compiled == compile_
    assert max(first_update_log_ratios(trainer)) <= 1e-6


def test_compiled_blocks_compile_once_not_every_step(tmp_path):
    """Rollout, update, reference pass and held-out evaluation each settle on their graphs in the first steps; later
    steps (and a resumed run) add none."""
    torch._dynamo.reset()
    base = [f"run.output_dir={tmp_path}", "train.progress=false", "run.threads=null", "policy.options.compile=true",
            "grpo.beta=0.01", "train.save_every=2", "train.steps=5"]
    start = counters["stats"]["unique_graphs"]  # the counter is the process's: earlier tests compiled too
    trainer = Trainer(load_recipe("toy", base))
    graphs = []
    for _ in range(4):
        trainer.train_step()
        graphs.append(counters["stats"]["unique_graphs"] - start)
    trainer.save()
    assert 0 < graphs[0] and graphs[1] == graphs[2] == graphs[3] <= 6, graphs
    resumed = Trainer(load_recipe("toy", base), resume=True)  # a new model, the same graphs: no recompilation
    resumed.train_step()
    assert counters["stats"]["unique_graphs"] - start == graphs[-1]


def test_attention_backend_option(tmp_path):
    with torch.no_grad():
        native = toy_velocity(toy(attention="native"))
        math = toy_velocity(toy(attention="math"))
    assert torch.allclose(native, math, atol=1e-5)
    with pytest.raises(RecipeError, match="attention=cudnn: the cudnn kernels run on CUDA GPUs only"):
        toy(attention="cudnn")
    with pytest.raises(RecipeError, match="flash_attn_3: needs the flash_attn_interface package"):
        toy(attention="flash_attn_3")
