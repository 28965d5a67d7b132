"""A real vLLM server of a tiny random Qwen2-VL, started once per session when .venv-vllm exists.

CI creates that environment with scripts/vllm_env.sh; elsewhere these tests skip, saying so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from editrl.rewards.vlm_judge.local_server import DEFAULT_PYTHON, REPO, LocalVllmServer

SKIP_REASON = f"{DEFAULT_PYTHON} not found: create the vLLM test environment with `bash scripts/vllm_env.sh`"


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    if not DEFAULT_PYTHON.exists():
        pytest.skip(SKIP_REASON)
    out = tmp_path_factory.mktemp("tiny_vlm")
    subprocess.run([str(DEFAULT_PYTHON), str(REPO / "scripts" / "tiny_vlm.py"), str(out)], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def judge_server(tiny_vlm, tmp_path_factory):
    server = LocalVllmServer(tiny_vlm, log_path=tmp_path_factory.mktemp("vllm_log") / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def disposable_server(tiny_vlm, tmp_path):
    """A server of its own, for tests that kill it."""
    server = LocalVllmServer(tiny_vlm, log_path=tmp_path / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def invoke_judge():
    return _invoke_judge


def _invoke_judge(tmp_path: Path, recipe: dict, *args: str):
    """`editrl judge -r <recipe> ARGS` through typer's runner, the recipe written to tmp_path."""
    import yaml
    import typer
    from typer.testing import CliRunner

    from editrl import judge as judge_cmd

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    app = typer.Typer()
    judge_cmd.register(app)
    app.command("noop", hidden=True)(lambda: None)  # a second command keeps `judge` a subcommand
    return CliRunner().invoke(app, ["judge", "-r", str(tmp_path / "r.yaml"), *args], env={"COLUMNS": "200"})
