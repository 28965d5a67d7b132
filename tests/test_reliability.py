"""Bad inputs and faults as a new user meets them: one line naming the thing, exit code 2, no traceback, and nothing
of an existing run lost (issue 14)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from editrl.base import RecipeError
from editrl.commands import register
from editrl.monitor import read_metrics
from editrl.preflight import device_problems, load_recipe
from editrl.trainer import Trainer

FAST = ["run.threads=1", "train.progress=false"]
PLUGINS = {
    "badimport.py": "x = 1 / 0\n\ndef r(instructions, **kw):\n    return [1.0] * len(instructions)\n",
    "faulty.py": (
        "def raises(instructions, **kw):\n    raise RuntimeError('the scorer crashed')\n\n"
        "def wrong_count(instructions, **kw):\n    return [1.0]\n\n"
        "def half(instructions, edited, **kw):\n    return [None if i % 2 else float(e.mean()) for i, e in enumerate(edited)]\n"
    ),
}


class Explodes:
    """A reward whose construction fails: the run dies after its policy is built, before it writes anything."""

    needs = {"edited"}

    def __init__(self, **options):
        raise RuntimeError("cannot start the scorer")


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    for name, text in PLUGINS.items():
        (folder / name).write_text(text)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, plugins):
    """A finished two-step toy run with checkpoints: what a careless command could destroy."""
    run = tmp_path_factory.mktemp("existing") / "run"
    result = cli("toy", *FAST, "train.steps=2", "train.save_every=1", f"run.output_dir={run}")
    assert result.exit_code == 0, result.output
    return run


def cli(*args: str):
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, ["train", *args])


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run but the library log (appended to by any command): size and modification time."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run.rglob("*") if p.is_file() and p.name != "libraries.log"}


BAD = [
    # contradictory flags and resumes that would change the run
    (["--resume", "--overwrite"], "--resume continues the run and --overwrite starts it over: pass one of them"),
    (["--accept-changes"], "--accept-changes lets --resume continue with a changed recipe"),
    ([], "already holds checkpoints: continue it with --resume"),
    (["--resume", "optim.lr=0.5"], "--resume: optim.lr 0.003 -> 0.5 cannot change when resuming"),
    (["--resume", "optim.lora.rank=4"], "--resume: optim.lora.rank 8 -> 4 cannot change when resuming"),
    (["--resume", "grpo.clip_range=0.5"], "was trained with a different recipe: grpo.clip_range 0.001 -> 0.5; restore"),
    (["--resume", "train.steps=1"], "is at step 2, past train.steps=1: raise train.steps"),
    # values that used to pass validation and fail (or train wrongly) later
    (["--overwrite", "optim.grad_clip=-1"], "optim.grad_clip: Input should be greater than 0 (got -1)"),
    (["--overwrite", "optim.eps=-1"], "optim.eps: Input should be greater than 0 (got -1)"),
    (["--overwrite", "optim.lr=.inf"], "optim.lr: Input should be a finite number (got inf)"),
    (["--overwrite", "optim.lr=.nan"], "optim.lr: Input should be a finite number (got nan)"),
    (["--overwrite", "optim.betas=[1.5, 0.9]"], "optim.betas.0: Input should be less than 1 (got 1.5)"),
    (["--overwrite", "optim.lora.rank=0"], "optim.lora.rank: Input should be greater than or equal to 1 (got 0)"),
    (["--overwrite", "optim.lora.dropout=1.5"], "optim.lora.dropout: Input should be less than 1 (got 1.5)"),
    (["--overwrite", "run.device=gpu"], "run.device: 'gpu' is not a device editrl runs on: use cpu, cuda, cuda:N or mps"),
    (["--overwrite", "run.device=cuda:99"], "run.device: cuda:99, but "),
    (["--overwrite", "run.threads=0"], "run.threads: Input should be greater than or equal to 1 (got 0)"),
    (["--overwrite", "train.steps=abc"], "train.steps: Input should be a valid integer"),
    (["--overwrite", "train.eval_every=0"], "train.eval_every: Input should be greater than or equal to 1 (got 0)"),
    (["--overwrite", "sampling.steps=1"], "sampling.steps: Input should be greater than or equal to 2 (got 1)"),
    (["--overwrite", "sampling.window.stride=0"], "sampling.window.stride: Input should be greater than or equal to 1"),
    (["--overwrite", "grpo.group_size=1"], "grpo.group_size: Input should be greater than or equal to 2 (got 1)"),
    (["--overwrite", "grpo.batch_size=6"], "grpo.batch_size=6 is not a multiple of grpo.group_size=4"),
    (["--overwrite", "rewards.terms=[]"], "rewards: at least one reward is needed"),
    (["--overwrite", "rewards.terms.0.weight=0"], "rewards: every reward weight is 0"),
    (["--overwrite", "rewards.terms.0.weight=.nan"], "rewards.terms.0.weight: Input should be a finite number"),
    (["--overwrite", "rewards.terms.0.name=pixel_preservation"],
     "rewards.terms.0 (pixel_preservation) needs source videos, which data.train (kind prompts) does not have"),
    # a reward plugin that raises on import (it used to print a 114-line traceback)
    (["--overwrite", 'rewards.terms=[{name: "badimport:r"}]'],
     "rewards.terms.0.name: importing 'badimport' for 'badimport:r' raised ZeroDivisionError: division by zero ("),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(existing_run, args, expected):
    before = snapshot(existing_run)
    result = cli("toy", *FAST, f"run.output_dir={existing_run}", *args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    assert expected in result.output, result.output
    assert snapshot(existing_run) == before


def test_unwritable_output_and_empty_data_are_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    cases = [
        ([f"run.output_dir={blocker / 'run'}"], f"run.output_dir: cannot write to {blocker / 'run'} (Not a directory)"),
        ([f"run.output_dir={tmp_path / 'run'}", "data.train.options.prompts=[]"],
         "data.train.options: `prompts` is empty: give at least one instruction"),
    ]
    for args, expected in cases:
        result = cli("toy", *FAST, *args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert expected in result.output, result.output
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("args", [["optim.eps=-1"], ["run.device=cuda:99"], ["--resume", "grpo.beta=0.1"]])
def test_dry_run_refuses_what_training_would(existing_run, args):
    result = cli("toy", *FAST, f"run.output_dir={existing_run}", "--dry-run", *args)
    assert result.exit_code == 2, result.output
    assert "ready: every weight" not in result.output


def test_plugin_fault_is_one_line_in_a_real_process(existing_run, plugins):
    env = {**os.environ, "PYTHONPATH": str(plugins), "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, "-m", "editrl", "train", "toy", f"run.output_dir={existing_run}", "--overwrite",
                           'rewards.terms=[{name: "badimport:r"}]'], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: rewards.terms.0.name: importing 'badimport' for 'badimport:r' raised ZeroDivisionError: division by "
        f"zero ({plugins / 'badimport.py'}:1): fix that module"
    ]


def test_overwrite_that_fails_to_build_keeps_the_old_run(existing_run, plugins):
    before = snapshot(existing_run)
    recipe = load_recipe("toy", [*FAST, f"run.output_dir={existing_run}", 'rewards.terms=[{name: "test_reliability:Explodes"}]'])
    with pytest.raises(RecipeError, match="could not be built: RuntimeError: cannot start the scorer"):
        Trainer(recipe, overwrite=True)
    assert snapshot(existing_run) == before


def test_overwrite_replaces_the_old_run_without_mixing(tmp_path):
    run = tmp_path / "run"
    assert cli("toy", *FAST, "train.steps=2", "train.save_every=1", "train.sample_every=1", f"run.output_dir={run}").exit_code == 0
    result = cli("toy", *FAST, "train.steps=1", f"run.output_dir={run}", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    assert len(list((run / "tensorboard").iterdir())) == 1 and not (run / "samples").exists()


def test_resume_notes_safe_changes_and_accepts_others_only_when_asked(tmp_path):
    run = tmp_path / "run"
    assert cli("toy", *FAST, "train.steps=1", f"run.output_dir={run}").exit_code == 0
    longer = cli("toy", *FAST, "train.steps=2", "train.log_every=1", f"run.output_dir={run}", "--resume")
    assert longer.exit_code == 0, longer.output
    assert "note: resuming with changes: train.log_every 5 -> 1, train.steps 1 -> 2" in " ".join(longer.output.split())
    accepted = cli("toy", *FAST, "train.steps=3", "grpo.beta=0.1", f"run.output_dir={run}", "--resume", "--accept-changes")
    assert accepted.exit_code == 0, accepted.output
    assert "grpo.beta 0.0 -> 0.1" in " ".join(accepted.output.split())
    assert "train/kl" in read_metrics(run / "metrics.jsonl")[-1]  # the accepted change is the one that ran


@pytest.mark.parametrize(
    "reward,on_failure,expected",
    [
        ("faulty:raises", "skip", "nothing was trained in"),
        ("faulty:raises", "fail", "reward 'faulty:raises': 8 of 8 samples have no valid score at step 1 (RuntimeError: "
                                  "the scorer crashed); stopping because rewards.on_failure=fail"),
        ("faulty:wrong_count", "fail", "(ValueError: reward wrong_count returned 1 values for a batch of 4); stopping because"),
    ],
)
def test_reward_faults_follow_on_failure(tmp_path, plugins, reward, on_failure, expected):
    result = cli("toy", *FAST, "train.steps=1", f"run.output_dir={tmp_path / 'run'}",
                 f'rewards.terms=[{{name: "{reward}"}}]', f"rewards.on_failure={on_failure}")
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, result.output
    if on_failure == "skip":
        assert "warning: reward 'faulty:raises': 8 of 8 samples have no valid score" in result.output
        assert f"reward '{reward}' gave no score to 8 samples in 1 step" in last


def test_unscored_samples_are_counted_in_the_summary(tmp_path, plugins):
    result = cli("toy", *FAST, "train.steps=2", f"run.output_dir={tmp_path / 'run'}", 'rewards.terms=[{name: "faulty:half"}]')
    assert result.exit_code == 0, result.output
    assert "reward 'faulty:half' gave no score to 8 samples in 2 steps" in " ".join(result.output.split())


def test_cuda_devices_are_checked_against_this_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problems(load_recipe("toy", ["run.device=cuda:1"])) == []
    assert device_problems(load_recipe("toy", ["run.device=cuda:2"])) == [
        "run.device: cuda:2, but this machine has cuda:0, cuda:1: use one of those"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert device_problems(load_recipe("toy", ["run.device=cuda"])) == [
        "run.device: cuda, but torch sees no CUDA GPU on this machine: use run.device=cpu"]
