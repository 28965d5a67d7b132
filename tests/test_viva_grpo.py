"""The bundled VIVA GRPO recipe end to end on CPU: one VLM call per request, training, checkpoint, reload."""

import torch

from editrl.checkpoint import find_checkpoint, load_checkpoint
from editrl.preflight import load_recipe
from editrl.monitor import read_metrics
from editrl.trainer import Trainer


def count_vlm_rows(policy) -> list[int]:
    rows: list[int] = []
    policy.instructor.model.register_forward_hook(
        lambda mod, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return rows


def viva_tiny(out, *extra):
    return load_recipe("viva_tiny", [
        f"run.output_dir={out}", "run.threads=null", "train.progress=false", "data.train.options.n=8", *extra,
    ])


def test_viva_tiny_recipe_trains_encodes_once_per_request_and_reloads(tmp_path):
    trainer = Trainer(viva_tiny(tmp_path / "run", "train.steps=2", "train.save_every=2"))
    policy = trainer.policy
    vlm_rows = count_vlm_rows(policy)
    before = {n: q.detach().clone() for n, q in policy.denoiser.named_parameters() if q.requires_grad}
    refiner_before = [q.detach().clone() for q in policy.refiner.parameters()]
    run = trainer.fit().run_dir

    lay = trainer.layout
    assert lay.groups_per_step == 2 and lay.groups_per_rank * trainer.recipe.grpo.group_size == 8
    assert sum(vlm_rows) == 2 * lay.groups_per_step  # 2 steps x 2 requests: never once per sample (x4)
    per_sample = Trainer(viva_tiny(tmp_path / "unshared", "grpo.share_encode=false"))
    unshared_rows = count_vlm_rows(per_sample.policy)
    per_sample.train_step()
    assert sum(unshared_rows) == 8  # what the counter sees when every sample is encoded
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 2 and all(r["samples/trained"] > 0 for r in rows)
    after = dict(policy.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the LoRA moved
    assert any(not torch.equal(a, b) for a, b in zip(refiner_before, policy.refiner.parameters()))

    loaded, saved = load_checkpoint(run)
    assert find_checkpoint(run).name == "step_000002" and saved.policy.name == "viva"
    sample = trainer.train_data[0]
    cond = policy.encode([sample])
    x = policy.init_noise(cond, torch.Generator().manual_seed(0))
    sigma = torch.full((1,), 0.7)
    with torch.no_grad():
        assert torch.equal(loaded.velocity(x, sigma, loaded.encode([sample])), policy.velocity(x, sigma, cond))
