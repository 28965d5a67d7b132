import os

import pytest
import torch

# Two cores: keep each test process to its share so parallel helpers and CI are predictable.
torch.set_num_threads(int(os.environ.get("EDITRL_TEST_THREADS", "2")))


@pytest.fixture
def toy_overrides(tmp_path):
    """A fast toy run in a temporary directory."""
    return [f"run.output_dir={tmp_path / 'run'}", "train.progress=false", "run.threads=null"]
