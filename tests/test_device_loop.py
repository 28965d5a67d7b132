"""The sampling loop and the update's micro-steps never read a device value back to the host.

On a GPU every such read (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()`) makes the host wait for the
device, which then idles while the host launches the next kernels. CPU tests cannot see a sync, so the policy's
tensors are marked here: a `torch.Tensor` subclass that every op propagates, and that raises on a read-back while
the loop under test runs. Host-side values (sigmas, the VIVA token counts) stay plain tensors and may be read.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import pytest
import torch

from editrl import trainer as trainer_mod
from editrl.preflight import load_recipe
from editrl.trainer import Trainer
from editrl.types import Condition

READS = {
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
}
STRICT = threading.local()  # per thread: rewards score in a worker thread, outside the loop under test


class DeviceValue(torch.Tensor):
    """A tensor that stands for data on the device: reading it back inside the loop under test is an error."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(STRICT, "on", False) and func in READS:
            raise AssertionError(f"{func.__name__} read a device value back inside the loop")
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out.as_subclass(torch.Tensor) if func is torch.Tensor.cpu else out  # a host copy is host data


@contextlib.contextmanager
def strict() -> Iterator[None]:
    STRICT.on = True
    try:
        yield
    finally:
        STRICT.on = False


def strict_call(fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with strict():
            return fn(*args, **kwargs)

    return wrapper


def watch(trainer: Trainer, monkeypatch: pytest.MonkeyPatch, host_keys: tuple[str, ...] = ()) -> list[str]:
    """Mark the policy's device data (noise, condition) and make the rollout and each training micro-step strict."""
    policy, calls = trainer.policy, []
    init_noise, encode = policy.init_noise, policy.encode

    def marked_noise(cond: Condition, generator: torch.Generator) -> torch.Tensor:
        return init_noise(cond, generator).as_subclass(DeviceValue)

    def marked_encode(samples: list) -> Condition:
        cond = encode(samples)
        data = {k: v.as_subclass(DeviceValue) if torch.is_tensor(v) and k not in host_keys else v for k, v in cond.data.items()}
        return Condition(data, cond.batch_size)

    monkeypatch.setattr(policy, "init_noise", marked_noise)
    monkeypatch.setattr(policy, "encode", marked_encode)
    rollout = strict_call(trainer_mod.rollout)

    def counted_rollout(*args: Any, **kwargs: Any) -> Any:
        calls.append("rollout")
        return rollout(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "rollout", counted_rollout)
    step_loss = strict_call(trainer.objective.loss)

    def counted_step_loss(*args: Any, **kwargs: Any) -> Any:
        calls.append("step_loss")
        return step_loss(*args, **kwargs)

    monkeypatch.setattr(trainer.objective, "loss", counted_step_loss)
    monkeypatch.setattr(trainer.backend, "backward", strict_call(trainer.backend.backward))
    return calls


def test_the_marker_catches_a_read_back():
    x = torch.ones(3).as_subclass(DeviceValue)
    y = (x * 2).sum()
    assert isinstance(y, DeviceValue)
    with strict(), pytest.raises(AssertionError, match="read a device value back"):
        float(y)
    assert float(y) == 6.0  # outside the loop under test, reading is allowed


@pytest.mark.parametrize("sde_kind", ["flow_sde", "cps", "dance"])
def test_toy_rollout_and_update_read_nothing_back(sde_kind, toy_overrides, monkeypatch):
    recipe = load_recipe("toy", [*toy_overrides, f"sampling.sde={sde_kind}", "grpo.beta=0.01", "sampling.window={size: 2}"])
    trainer = Trainer(recipe)
    calls = watch(trainer, monkeypatch)
    metrics = trainer.train_step()
    assert "rollout" in calls and "step_loss" in calls  # the strict sections ran
    ratios = [v for k, v in metrics.items() if k.startswith("ratio/") and k.endswith("/mean")]
    assert len(ratios) == 2 and all(r == pytest.approx(1.0, abs=1e-5) for r in ratios)  # on-policy


def test_viva_rollout_and_update_read_nothing_back(tmp_path, monkeypatch):
    recipe = load_recipe("viva_tiny", [
        f"run.output_dir={tmp_path / 'run'}", "run.threads=null", "train.progress=false", "data.train.options.n=4",
        "grpo.beta=0.01",
    ])
    trainer = Trainer(recipe)
    calls = watch(trainer, monkeypatch, host_keys=("counts",))
    metrics = trainer.train_step()
    assert "rollout" in calls and "step_loss" in calls
    ratios = [v for k, v in metrics.items() if k.startswith("ratio/") and k.endswith("/mean")]
    assert ratios and all(r == pytest.approx(1.0, abs=1e-5) for r in ratios)
