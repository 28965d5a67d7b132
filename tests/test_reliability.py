"""Bad inputs and faults as a new user meets them: one line naming the thing, exit code 2, no traceback, and nothing
of an existing run lost (issues 14 and 26): recipes read strictly, plugins allowed and callable, one process per run
directory, rewards that fail, exit or hang."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from editrl.base import RecipeError
from editrl.commands import register
from editrl.files import LOCK_NAME
from editrl.monitor import read_metrics
from editrl.preflight import device_problems, load_recipe
from editrl.trainer import Trainer

FAST = ["run.threads=1", "train.progress=false", "run.plugins=[badimport, faulty, quits, test_reliability]"]
PLUGINS = {
    "badimport.py": "x = 1 / 0\n\ndef r(instructions, **kw):\n    return [1.0] * len(instructions)\n",
    "quits.py": "import sys\n\nclass Policy:\n    def __init__(self, *args, **kw):\n        sys.exit(0)\n",
    "faulty.py": (
        "def raises(instructions, **kw):\n    raise RuntimeError('the scorer crashed')\n\n"
        "def wrong_count(instructions, **kw):\n    return [1.0]\n\n"
        "def half(instructions, edited, **kw):\n    return [None if i % 2 else float(e.mean()) for i, e in enumerate(edited)]\n\n"
        "def exits(instructions, **kw):\n    import sys\n    sys.exit(0)\n\n"
        "def blocks(instructions, **kw):\n    import time\n    time.sleep(30)\n    return [1.0] * len(instructions)\n\n"
        "X = 5\n\n"
        "class NoCall:\n    needs = {'edited'}\n"
    ),
}


class Explodes:
    """A reward whose construction fails: the run dies after its policy is built, before it writes anything."""

    needs = {"edited"}

    def __init__(self, **options):
        raise RuntimeError("cannot start the scorer")

    def __call__(self, batch):
        raise AssertionError("never built")


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
    """Every file of a run but the library log (appended to by any command) and the run lock (signed by any process
    that gets as far as building): size and modification time."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run.rglob("*") if p.is_file() and p.name not in ("libraries.log", LOCK_NAME)}


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
    # issue 26: type confusion, overrides into a value, machine limits
    (["--overwrite", "train.steps=true"], "train.steps: a number is expected here, not true/false (got True)"),
    (["--overwrite", "grpo.beta=false"], "grpo.beta: a number is expected here, not true/false"),
    (["--overwrite", "optim.betas=[true, 0.9]"], "optim.betas: a number is expected here, not true/false"),
    (["--overwrite", "train.steps.x=1"], "train.steps.x: train.steps is 30, which has no field 'x'"),
    (["--overwrite", "rewards.terms=[{name: brightness, name: target_color}]"], "'name' is given twice"),
    (["--overwrite", "run.output_dir="], "run.output_dir: String should have at least 1 character"),
    (["--overwrite", "run.threads=100000"], "run.threads: 100000, but this machine has"),
    # plugins that are not callable (also refused by --dry-run, below), or not allowed
    (["--overwrite", 'rewards.terms=[{name: "faulty:X"}]'], "rewards.terms.0.name: 'faulty:X' is a int, not a reward class"),
    (["--overwrite", 'rewards.terms=[{name: "faulty:NoCall"}]'], "'faulty:NoCall' is a class whose instances cannot be called"),
    (["--overwrite", 'rewards.terms=[{name: "subprocess:Popen", options: {args: [touch, pwned]}}]'],
     "rewards.terms.0.name: 'subprocess:Popen' is Python's standard library, which a recipe may not call"),
    (["--overwrite", "policy.name=os:system"], "policy.name: 'os:system' is Python's standard library"),
    (["--overwrite", "policy.name=quits:Policy"], "policy 'quits:Policy' could not be built: called sys.exit(0)"),
    (["--overwrite", "run.plugins=[subprocess]"], "run.plugins: 'subprocess' is Python's standard library, not a plugin"),
    (["--overwrite", 'rewards.terms=[{name: "unlisted_pkg:r"}]'],  # typed, so trusted (test_extensions), but absent
     "rewards.terms.0.name: cannot import module 'unlisted_pkg' for 'unlisted_pkg:r'"),
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


@pytest.mark.parametrize("args", [["optim.eps=-1"], ["run.device=cuda:99"], ["--resume", "grpo.beta=0.1"],
                                  ['rewards.terms=[{name: "faulty:X"}]'], ["run.threads=100000"]])
def test_dry_run_refuses_what_training_would(existing_run, args):
    result = cli("toy", *FAST, f"run.output_dir={existing_run}", "--dry-run", *args)
    assert result.exit_code == 2, result.output
    assert "ready: every weight" not in result.output


def test_plugin_fault_is_one_line_in_a_real_process(existing_run, plugins):
    env = {**os.environ, "PYTHONPATH": str(plugins), "COLUMNS": "250"}
    proc = subprocess.run([sys.executable, "-m", "editrl", "train", "toy", f"run.output_dir={existing_run}", "--overwrite",
                           'rewards.terms=[{name: "badimport:r"}]', "run.plugins=[badimport]"], env=env,
                          capture_output=True, text=True, timeout=300)
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
        ("faulty:exits", "fail", "8 of 8 samples have no valid score at step 1 (it called sys.exit(0)); stopping because"),
        ("faulty:blocks", "fail", "(no answer within rewards.timeout_s=0.5s (the call was left running)); stopping because"),
        ("faulty:exits", "skip", "nothing was trained in"),
    ],
)
def test_reward_faults_follow_on_failure(tmp_path, plugins, reward, on_failure, expected):
    """A reward that raises, miscounts, calls sys.exit(0) (it used to end training with exit 0 and no word) or never
    answers (it used to hang the run) scores nothing; rewards.on_failure decides."""
    result = cli("toy", *FAST, "train.steps=1", f"run.output_dir={tmp_path / 'run'}", "rewards.timeout_s=0.5",
                 f'rewards.terms=[{{name: "{reward}"}}]', f"rewards.on_failure={on_failure}")
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, result.output
    if on_failure == "skip":
        assert f"warning: reward '{reward}': 8 of 8 samples have no valid score" in result.output
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


# ---------------------------------------------------------------- issue 26: recipes read strictly


RECIPE_FILES = [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10", "not a text file (byte 0 is not UTF-8): a recipe is YAML text"),
    (b"policy: {name: toy_t2v}\ntrain: {steps: 30, steps: 2}\n", ":2: not valid YAML: 'steps' is given twice (first on line 2)"),
    (b"policy: {name: toy_t2v}\ntrain:\n  steps: 3\ntrain:\n  steps: 2\n", ":4: not valid YAML: 'train' is given twice (first on line 2)"),
    (b"policy: {name: toy_t2v}\ntrain: {steps: 3\n", "not valid YAML: "),
    (b"- policy\n- train\n", "a recipe is a mapping of sections, got list"),
]


@pytest.mark.parametrize("content,expected", RECIPE_FILES, ids=["binary", "duplicate key", "duplicate section",
                                                                 "unclosed", "a list"])
def test_a_recipe_file_is_read_strictly(existing_run, tmp_path, content, expected):
    before = snapshot(existing_run)
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    for extra in ([], ["--dry-run"]):
        result = cli(str(path), f"run.output_dir={existing_run}", *extra)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"error: {path}") and expected in result.output, result.output
    assert snapshot(existing_run) == before


# ---------------------------------------------------------------- one process per run directory

@pytest.fixture
def held(existing_run, hold_lock):
    """Another process holding the existing run's lock, as a training process does."""
    return hold_lock(existing_run)


@pytest.mark.parametrize("args", [[], ["--resume"], ["--overwrite"], ["--resume", "train.steps=3"]])
def test_a_run_directory_in_use_is_refused_at_once(existing_run, held, args):
    before = snapshot(existing_run)
    result = cli("toy", *FAST, f"run.output_dir={existing_run}", *args)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"error: {existing_run} is in use by process {held.pid} on " in result.output, result.output
    assert "wait for it to end (or stop it), or choose another run.output_dir" in result.output
    assert snapshot(existing_run) == before


def test_sft_refuses_a_run_directory_in_use(existing_run, held):
    from editrl.inference import register as register_sft

    app = typer.Typer()
    register_sft(app)
    result = CliRunner().invoke(app, ["sft", "viva_sft_tiny", f"run.output_dir={existing_run}"])
    assert result.exit_code == 2 and f"is in use by process {held.pid}" in result.output, result.output


@pytest.mark.slow
def test_two_real_trainings_into_one_directory(tmp_path):
    """The second refuses at once naming the first; SIGTERM stops the first with Ctrl-C's line; then it resumes."""
    import signal
    import time

    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "editrl", "train", "toy", *FAST[:2], "train.steps=100000", "train.save_every=1",
         f"run.output_dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        while not read_metrics(run / "metrics.jsonl"):
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.2)
        second = cli("toy", *FAST, f"run.output_dir={run}")
        assert second.exit_code == 2 and second.output.count("\n") == 1, second.output
        assert f"is in use by process {first.pid} on " in second.output and "editrl train toy" in second.output
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, out
    assert out.strip().splitlines()[-1] == "interrupted: continue later with --resume" and "Traceback" not in out
    done = max(r["step"] for r in read_metrics(run / "metrics.jsonl"))
    resumed = cli("toy", *FAST, f"run.output_dir={run}", "--resume", f"train.steps={done + 1}", "train.save_every=1")
    assert resumed.exit_code == 0, resumed.output


# ---------------------------------------------------------------- a resume after a crash


def test_resume_tidies_what_a_crash_left(existing_run, tmp_path):
    """A save cut short by another process's crash (its PID in the names), and a metrics row cut short."""
    import json
    import shutil

    run = shutil.copytree(existing_run, tmp_path / "run")
    root = run / "checkpoints"
    shutil.copytree(root / "step_000002", root / ".tmp-step_000003-99999")
    (root / "latest.tmp-99999").write_text("step_000003")
    shutil.copytree(root / "step_000001", root / ".old-best-99999")  # `best` moved aside, its replacement never landed
    rows = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(rows + '{"step": 3, "time": 1.0, "reward/bri')
    result = cli("toy", *FAST, f"run.output_dir={run}", "--resume", "train.steps=3")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "note: removed .tmp-step_000003-99999, left by a save that was cut short" in text
    assert "note: restored best, left by a save that was cut short" in text
    assert "ended in a row cut short (the run stopped while writing it): dropped it" in text
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step_000002", "step_000003"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_damaged_metrics_row_is_one_line(existing_run, tmp_path):
    import shutil

    run = shutil.copytree(existing_run, tmp_path / "run")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([rows[0], "{not json", *rows[1:]]) + "\n")
    before = snapshot(run)
    result = cli("toy", *FAST, f"run.output_dir={run}", "--resume", "train.steps=3")
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith(
        f"error: {run / 'metrics.jsonl'}:2: damaged metrics row"), result.output
    assert snapshot(run) == before


# ---------------------------------------------------------------- a run's outputs never replace its inputs


def test_a_run_directory_that_would_replace_an_input_is_refused(existing_run, tmp_path):
    before = snapshot(existing_run)
    init = existing_run / "checkpoints" / "step_000001"
    result = cli("toy", *FAST, f"run.output_dir={existing_run}", "--overwrite", f"policy.init_from={init}")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"run.output_dir {existing_run}: {existing_run / 'checkpoints'} (which it replaces) holds the input {init}" \
        in result.output
    assert snapshot(existing_run) == before

    mine = tmp_path / "my_project"
    (mine / "eval").mkdir(parents=True)
    (mine / "recipe.yaml").write_text("# my notes\n")
    result = cli("toy", *FAST, f"run.output_dir={mine}")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"run.output_dir {mine} is not a run directory but holds eval, recipe.yaml" in result.output
    assert (mine / "recipe.yaml").read_text() == "# my notes\n" and (mine / "eval").is_dir()


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB filesystem (tmpfs); skipped where this process may not mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(small_disk):
    run = small_disk / "run"
    assert cli("toy", *FAST, "train.steps=1", f"run.output_dir={run}").exit_code == 0
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # every block but a few KiB: the next checkpoint cannot fit
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - 16 * 1024)
    intact = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_000001").iterdir()}
    result = cli("toy", *FAST, "train.steps=2", f"run.output_dir={run}", "--resume")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("cannot write checkpoint" in last or "the disk is full" in last), last
    assert "free some space, then continue with --resume" in last
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_000001").iterdir()} == intact
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000001"]  # no half-written one


def test_resuming_a_finished_run_says_nothing_is_left(existing_run, tmp_path):
    import shutil

    run = shutil.copytree(existing_run, tmp_path / "run")
    result = cli("toy", *FAST, f"run.output_dir={run}", "--resume", "train.steps=2", "train.save_every=1")
    assert result.exit_code == 0, result.output
    assert "is the last step, 2: nothing is left to train (raise train.steps to go on)" in " ".join(
        result.output.split())
