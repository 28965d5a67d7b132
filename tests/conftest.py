import os

import pytest
import torch

# Two cores: keep each test process to its share so parallel helpers and CI are predictable.
torch.set_num_threads(int(os.environ.get("EDITRL_TEST_THREADS", "2")))


@pytest.fixture(scope="session", autouse=True)
def editrl_cache(tmp_path_factory):
    """Tiny presets and synthetic data are built once per test session in a temporary cache, never the user's:
    every CI run exercises the build, and subprocesses inherit the variable. EDITRL_TEST_CACHE names a persistent
    cache instead, so a developer running a few tests at a time pays the ~3 min build once."""
    cache = os.environ.get("EDITRL_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "editrl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITRL_CACHE", cache)
        yield


@pytest.fixture
def toy_overrides(tmp_path):
    """A fast toy run in a temporary directory."""
    return [f"run.output_dir={tmp_path / 'run'}", "train.progress=false", "run.threads=null"]


HOLD = ("import sys, pathlib; from editrl.files import RunLock; lock = RunLock(pathlib.Path(sys.argv[1])); lock.acquire(); "
        "lock.sign(); print('held', flush=True); sys.stdin.read()")


@pytest.fixture
def hold_lock():
    """`hold_lock(run_dir)` starts another process that holds the run directory's lock, as a training process does,
    until the test ends; returns that process."""
    import subprocess
    import sys

    procs = []

    def hold(run_dir):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=60)
