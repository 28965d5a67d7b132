"""Recipes: validation before any model is built, one-line errors with key paths and suggestions."""

from pathlib import Path

import pytest
import yaml

from editrl.config import RecipeError, bundled_recipes, derive_layout, parse_override, parse_recipe
from editrl.preflight import load_recipe


def _base(**changes):
    tree = yaml.safe_load(bundled_recipes()["toy"].read_text())
    for path, value in changes.items():
        node = tree
        *parents, last = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def test_bundled_recipes_validate():
    from editrl.preflight import load_sft_recipe

    for name, path in bundled_recipes().items():
        is_sft = "sft" in (yaml.safe_load(path.read_text()) or {})
        # Paths are not checked: the paper-scale recipe names weights this machine does not have (its
        # --dry-run reports them); the structure, plugin names and options are.
        loader = load_sft_recipe if is_sft else load_recipe
        assert loader(path, check_paths=False).policy.name, name


def test_overrides_apply_with_yaml_types():
    r = load_recipe("toy", ["train.steps=5", "optim.lr=1e-5", "grpo.scale=batch", "rewards.terms.0.weight=2"])
    assert r.train.steps == 5 and r.optim.lr == 1e-5 and r.grpo.scale == "batch" and r.rewards.terms[0].weight == 2.0


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["optim.lerning_rate=3"], "optim.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
        (["tran.steps=3"], "tran: unknown key (did you mean 'train'?)"),
        (["rewards.terms.0.name=brightnes"], "rewards.terms.0.name: unknown reward 'brightnes' (did you mean 'brightness'?)"),
        (["policy.name=toy_tv2"], "policy.name: unknown policy 'toy_tv2' (did you mean 'toy_t2v'?)"),
        (["policy.options.heigth=8"], "policy.options.heigth: unknown key (did you mean 'height'?)"),
        (["grpo.batch_size=6"], "grpo.batch_size=6 is not a multiple of grpo.group_size=4"),
        (["sampling.sde=flow-sde"], "sampling.sde: unknown sde kind 'flow-sde' (did you mean 'flow_sde'?)"),
        (["grpo.loss=ppo_clp"], "grpo.loss: unknown loss 'ppo_clp' (did you mean 'ppo_clip'?)"),
        (["data.train.options.prompts=null", "data.train.options.file=/no/such/file"], "data.train.options: file /no/such/file does not exist"),
        (["policy.init_from=/no/such/ckpt"], "policy.init_from: /no/such/ckpt does not exist"),
        (["sampling.window.size=20"], "sampling.window.size=20 must be between 1"),
        (["grpo.trained_steps=0"], "grpo.trained_steps: Input should be greater than or equal to 1 (got 0)"),
        (["grpo.trained_steps=9"], "grpo.trained_steps=9 must be between 1 and the 7 SDE steps"),
        (["train.steps=0"], "train.steps: Input should be greater than or equal to 1"),
        (["rewards.terms=[]"], "rewards: at least one reward is needed"),
    ],
)
def test_bad_recipes_give_one_clear_line(overrides, expected):
    with pytest.raises(RecipeError) as e:
        load_recipe("toy", overrides)
    message = str(e.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_missing_recipe_suggests_a_bundled_one(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'toy'"):
        load_recipe("toyy")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_duplicate_reward_needs_a_label():
    tree = _base()
    tree["rewards"]["terms"] = [{"name": "brightness"}, {"name": "brightness"}]
    with pytest.raises(RecipeError, match="give one of them a `label`"):
        load_recipe(tree)
    tree["rewards"]["terms"][1]["label"] = "brightness2"
    assert len(load_recipe(tree).rewards.terms) == 2


def test_reward_list_shorthand():
    tree = _base()
    tree["rewards"] = [{"name": "brightness"}]
    assert load_recipe(tree).rewards.terms[0].name == "brightness"


def test_derived_layout():
    r = load_recipe("toy", ["grpo.batch_size=16", "grpo.group_size=4", "grpo.micro_batch_size=2", "grpo.minibatches=2",
                            "sampling.steps=10", "sampling.window.size=3", "grpo.trained_steps=2"])
    lay = derive_layout(r, world_size=2)
    assert (lay.world_size, lay.groups_per_step, lay.groups_per_rank) == (2, 4, 2)
    assert r.layout.world_size == 1 and r.layout.groups_per_rank == 4  # kept on the recipe, for this process
    assert (lay.micro_batch_size, lay.micro_batches_per_update, lay.grad_accumulation) == (2, 2, 4)
    with pytest.raises(RecipeError, match="do not split over 3 ranks"):
        derive_layout(r, world_size=3)


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(RecipeError, match="section.field=value"):
        parse_override("train.steps")
    with pytest.raises(RecipeError, match="is not an index"):
        load_recipe("toy", ["rewards.terms.5.weight=1"])


def test_resolved_recipe_round_trips(tmp_path: Path):
    from editrl.config import dump_recipe

    r = load_recipe("toy", ["train.steps=7"])
    dump_recipe(r, tmp_path / "recipe.yaml")
    assert load_recipe(tmp_path / "recipe.yaml") == r


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["distributed.backend=deepspeed", "distributed.zero_stage=3", "optim.ema.enabled=true"],
         "optim.ema: not available with ZeRO-3"),
        (["distributed.backend=deepspeed", "distributed.zero_stage=3", "distributed.rollout_gather=false",
          "grpo.resample_tied=2"], "grpo.resample_tied rolls extra groups out on some ranks only"),
        (["distributed.backend=deepspeed", "distributed.zero_stage=3", "policy.options.compile=true"],
         "policy.options.compile: compiled DiT blocks cannot run under ZeRO-3"),
        (["train.sentinel={}"], "train.sentinel watches held-out evaluations"),
    ],
)
def test_checks_across_sections_run_with_the_schema(overrides, message):
    """Before any plugin is imported or model built: `--dry-run` sees them too."""
    with pytest.raises(RecipeError) as e:
        parse_recipe("toy", overrides)
    assert str(e.value).startswith(message)
