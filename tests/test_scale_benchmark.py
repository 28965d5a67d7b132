"""benchmarks/scale.py: its paper scale is the H200 probe's configuration, and its recipe passes editrl's checks.

The paper scale only runs where a GPU is, so this keeps it honest on CPU in a few seconds: the configuration it
claims, a recipe built from (tiny) saved models that `load_recipe` and the policy's preflight accept, and the
direction of the last line's step ratio. The trainer is not run.
"""

import copy
import dataclasses
import importlib.util
import io
import sys
from pathlib import Path

import pytest
from rich.console import Console

from editrl.config import derive_layout
from editrl.preflight import load_recipe
from editrl.policies.viva.policy import VivaPolicy


def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("benchmark_scale", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_paper_scale_is_the_probe_and_a_tiny_scale_makes_a_valid_recipe(tmp_path):
    bench = load_benchmark()
    paper = bench.SCALES["paper"]
    dit = paper.dit
    shape = (dit["num_layers"], dit["num_attention_heads"], dit["attention_head_dim"], dit["ffn_dim"], dit["text_dim"])
    assert shape == (30, 12, 128, 8960, 4096)
    assert dit["patch_size"] == (1, 2, 2) and paper.vae == {}  # AutoencoderKLWan's defaults: the Wan2.1 VAE
    assert (paper.frames, paper.size) == (33, (240, 416))
    assert (paper.group, paper.batch, paper.micro_batch, paper.sampling_steps, paper.lora_rank) == (4, 8, 4, 20, 32)
    assert (paper.dtype, paper.vlm_layers, paper.vlm_text["hidden_size"]) == ("bfloat16", 4, 3584)
    assert paper.policy_options["decode_dtype"] == "bfloat16"

    cpu = bench.SCALES["cpu"]
    tiny = dataclasses.replace(
        cpu, dit=dict(cpu.dit, num_attention_heads=1, attention_head_dim=8, text_dim=16, ffn_dim=16, num_layers=1),
        vae=dict(base_dim=4, num_res_blocks=1), frames=5, size=(32, 32), text_len=16,
    )
    built = bench.build_models(tiny, 1, tmp_path / "models", "cpu")
    tree = bench.recipe_tree(tiny, built["paths"], tmp_path, "cpu", threads=1)
    assert tree["policy"]["options"]["gradient_checkpointing"] and tree["grpo"]["beta"] == 0.004
    for name, overrides in bench.SCHEDULES.items():
        recipe = load_recipe(copy.deepcopy(tree), overrides)  # overrides edit the tree they are given
        layout = derive_layout(recipe)
        assert (layout.micro_batch_size, layout.groups_per_rank * tiny.group) == (tiny.micro_batch, tiny.batch)
        assert layout.trained_steps == (2 if name == "fast" else tiny.sampling_steps - 1)
        assert VivaPolicy.preflight(VivaPolicy.Options(**recipe.policy.options)) == []  # every part saved and loadable
    load_recipe(bench.recipe_tree(paper, built["paths"], tmp_path, "cuda", threads=None))  # its policy options exist

    # The last line: a fast step three times shorter than a default one is a ratio of 3 (bigger = fast is faster).
    row = {"time/encode": 1.0, "time/rollout": 2.0, "time/decode": 1.0, "time/reward": 1.0, "warmup": False}
    schedules = {name: {"setup_s": 1.0, "peak_memory_gib": 1.0, "steps": [
        dict(row, **{"time/train": train, "time/step": step, "sde/trained_steps": trained})]}
        for name, train, step, trained in (("default", 25.0, 30.0, 19), ("fast", 5.0, 10.0, 2))}
    results = {"scale": "tiny", "device": "cpu", "device_name": "cpu", "threads": 1, "warmup": 0, "steps": 1,
               "recipe": tree, "schedules": schedules,
               "floor": {"batch": 4, "dit_forward_s": 0.05, "dit_forward_backward_s": 0.2, "velocity_s": 0.05}}
    results["summary"] = bench.summarise(results)
    assert results["summary"]["default"]["share"] == 29.0 / 30.0
    assert bench.report(results, Console(file=io.StringIO())) == (
        "scale=tiny device=cpu model-compute share: default 0.97, fast 0.90; step ratio fast/default 3.00")


@pytest.mark.slow
def test_dit_floor_runs_at_cpu_scale_and_prints_its_last_line(tmp_path):
    """benchmarks/dit_floor.py end to end on CPU (the bare DiT eager and compiled, the peer-style call, the engine's
    rollout and training calls): its last line, and the engine's rollout call equal to its training forward."""
    import json
    import re
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dit_floor.py"
    proc = subprocess.run([sys.executable, str(script), "--scale", "cpu", "--repeats", "1", "--threads", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"dit-floor scale=cpu device=cpu engine/bare-compiled: forward \d+\.\d\d, train \d+\.\d\d; "
                        r"peer-style/engine \d+\.\d\d", last), last
    res = json.loads((tmp_path / "dit_floor.json").read_text())
    assert res["engine"]["rollout_equals_training"] and res["flops_forward"] > 0
    assert all(isinstance(v, float) for v in res["seconds"].values()), res["seconds"]
