"""What `editrl train` shows a person: numbered phases, skip lines for cached results, a few numbers per line, a closing
summary whose commands work as printed, and no third-party chatter (that goes to the run's libraries.log)."""

import json
import logging
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from editrl import monitor

EDITRL = Path(sys.executable).with_name("editrl")
# Lines other libraries print when editrl loads, builds or saves models (peft -> bitsandbytes, accelerate ->
# DeepSpeed, transformers' and tokenizers' progress bars, transformers' load report).
NOISE = ("kernels-community", "gemm_4bit", "publisher trust", "real_accelerator", "Setting accelerator", "[WARNING]", "Writing model shards",
         "Loading weights", "LOAD REPORT", "UNEXPECTED", "Pre-processing sequences", "Tokenize words", "Compute merges",
         "it/s]", "Traceback")
TINY = ["train.steps=2", "train.eval_every=2", "train.save_every=2", "grpo.batch_size=8", "data.train.options.n=4",
        "data.eval.options.n=4"]
TINY_SFT = ["train.steps=2", "train.eval_every=2", "train.save_every=2", "data.train.options.n=4", "data.eval.options.n=4"]


def run(args: list[str], cwd: Path, offline: bool = False) -> str:
    """A command as a user runs it (wide terminal, so paths stay on one line); its console, stdout and stderr.

    `offline`: with HF_HUB_OFFLINE=1, as offline clusters run (libraries then say more: "Skipping publisher trust
    check ...")."""
    env = {**os.environ, "COLUMNS": "250", "EDITRL_TEST_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console
    return console


def noise(console: str) -> list[str]:
    return [line for line in console.splitlines() if any(n in line for n in NOISE)]


@pytest.mark.slow
def test_quickstart_console_has_phases_numbers_and_a_summary_whose_commands_work(tmp_path):
    sft, cwd = tmp_path / "sft", tmp_path / "cwd"  # run dirs outside the working directory print whole
    cwd.mkdir()
    train = [str(EDITRL), "train", "quickstart", *TINY, "run.threads=1", f"policy.init_from={sft}",
             f"policy.warm_start_overrides={json.dumps(TINY_SFT)}"]
    first = run([*train, f"run.output_dir={tmp_path / 'run'}"], cwd)
    assert noise(first) == []
    headers = ["[1/5] synthetic data:", "[2/5] tiny preset:", "[3/5] SFT warm start: 2 steps",
               "[4/5] Edit-GRPO: 2 steps", "[5/5] held-out evaluation: 4 clips"]
    at = [first.find(h) for h in headers]
    assert -1 not in at and at == sorted(at), first  # every phase, in the order the pipeline runs them
    lines = first.splitlines()
    assert any(line.strip().startswith("SFT step 2/2  loss ") and "held-out loss" in line for line in lines), first
    assert any(line.strip().startswith("Edit-GRPO step 2/2  reward ") and "held-out total" in line for line in lines), first
    assert "train/clip_frac" not in first and "eval/oracle" not in first  # every key is in metrics.jsonl, not here
    assert any(line.split() == ["run", "directory", str(tmp_path / "run")] for line in lines), first
    assert (tmp_path / "run" / monitor.LIBRARY_LOG).is_file()

    commands = {line.split()[1]: shlex.split(line) for line in lines if line.split()[:1] in ([str(EDITRL)], ["editrl"])}
    assert set(commands) == {"edit", "eval", "sweep"}, first
    edited = run(commands["edit"], cwd)
    assert "wrote" in edited and Path(commands["edit"][commands["edit"].index("--out") + 1]).stat().st_size > 0
    assert "results.md" in run([*commands["eval"], "--limit", "2"], cwd)
    assert (tmp_path / "run" / "eval" / "grid.png").is_file()

    again = run([*train, f"run.output_dir={tmp_path / 'again'}", "train.steps=1", "train.eval_every=null"], cwd, offline=True)
    assert noise(again) == []
    lines = ["[1/4] synthetic data: skipped, cached in ", f"[2/4] SFT warm start: skipped, {sft} holds a finished warm start",
             "[3/4] tiny preset: skipped, cached in ", "[4/4] Edit-GRPO: 1 steps"]
    at = [again.find(line) for line in lines]
    assert -1 not in at and at == sorted(at), again


@pytest.mark.parametrize("offline", [False, True])
def test_a_run_prints_no_library_line_at_import_or_load(tmp_path, offline):
    """The toy run imports peft (so bitsandbytes, which asks the hub for a kernel as it is imported) and diffusers."""
    console = run([str(EDITRL), "train", "toy", "train.steps=1", f"run.output_dir={tmp_path / 'run'}"], tmp_path, offline)
    assert noise(console) == [], console
    assert "[1/1] Edit-GRPO: 1 steps" in console


@pytest.mark.parametrize("offline", [False, True])
def test_library_notices_at_import_go_to_the_log(tmp_path, offline):
    """bitsandbytes (imported by peft, pyiqa, diffusers' models) asks the hub for a CPU kernel as it is imported, and
    says it could not have it, wherever the import happens: the command line keeps that off the console from its start."""
    code = f"""
from pathlib import Path
from editrl import monitor
monitor.quiet_imports()  # what the command line does first
with monitor.library_log(Path({str(tmp_path)!r}) / "libraries.log"):
    import peft
from bitsandbytes.functional import has_avx512bf16
print("asks the hub" if has_avx512bf16() else "")
"""
    console = run([sys.executable, "-c", code], tmp_path, offline)
    assert console.strip() in ("asks the hub", ""), console
    if console.strip():  # the CPUs where bitsandbytes wants its kernel: the notice is in the log instead
        assert "gemm_4bit_forward" in (tmp_path / "libraries.log").read_text()


@pytest.mark.parametrize("offline", [False, True])
def test_building_and_loading_models_keeps_library_chatter_in_the_log(tmp_path, offline):
    """The noisiest path, the first build of the tiny preset's VLM and DiT (save_pretrained imports DeepSpeed when it
    is installed) and a load back, in a fresh process."""
    code = f"""
from pathlib import Path
from editrl import monitor
monitor.quiet_imports()  # what the command line does first
from transformers import AutoModel
from editrl.policies.viva import presets
out = Path({str(tmp_path)!r})
with monitor.library_log(out / "libraries.log"), monitor.quiet_libraries():
    presets._build_vlm(out / "vlm", "qwen2_5_vl")
    presets._build_dit(out / "dit")
    AutoModel.from_pretrained(out / "vlm", use_kernels=False)
"""
    console = run([sys.executable, "-c", code], tmp_path, offline)
    assert console.strip() == "", console
    assert (tmp_path / "libraries.log").is_file()


def test_quiet_libraries_reroutes_only_library_notices(tmp_path, capsys, caplog):
    library, own = logging.getLogger("transformers.modeling_utils"), logging.getLogger("editrl.test")
    with monitor.library_log(tmp_path / "libraries.log"), monitor.quiet_libraries(), caplog.at_level(logging.INFO):
        library.warning("a load report")
        logging.getLogger("DeepSpeed").warning("accelerator picked")
        library.error("a real problem")
        own.warning("editrl's own warning")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.warn("a Python warning", UserWarning, stacklevel=1)
    console = capsys.readouterr().err
    log = (tmp_path / "libraries.log").read_text()
    assert "a load report" in log and "accelerator picked" in log and "a real problem" in log
    assert "a load report" not in console and "accelerator picked" not in console
    assert "a real problem" in console
    assert [r.getMessage() for r in caplog.records] == ["editrl's own warning"]  # only editrl's reached the root logger
    assert [str(w.message) for w in caught] == ["a Python warning"]
    library.warning("after the block")  # the library's own handlers are back
    assert "after the block" not in (tmp_path / "libraries.log").read_text()


def test_train_without_a_recipe_name_overrides_the_quickstart():
    import typer
    from typer.testing import CliRunner

    from editrl.commands import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["train", "train.steps=3", "run.name=short", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "recipe ok: short -> runs/quickstart/grpo" in " ".join(result.output.split())
