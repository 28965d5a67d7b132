"""The policy contract: a flow-matching model with trainable parts, seen by the engine through 8 calls.

`Policy` is the protocol the trainer relies on. `LoraPolicy` is an optional base class that implements
the LoRA half of it (trainable parameters, reference model, save/load) with peft for any policy whose
denoiser is a diffusers model, so a new model only writes encode / init_noise / velocity / decode.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from editrl.base import StrictModel
from editrl.config import LoraOptions
from editrl.types import Condition, EditSample


@runtime_checkable
class Policy(Protocol):
    def encode(self, samples: list[EditSample]) -> Condition:
        """Work that depends only on the request; called once per request and shared by its group."""

    def init_noise(self, cond: Condition, generator: torch.Generator) -> Tensor:
        """x at sigma = 1 for each row of `cond`."""

    def velocity(self, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        """Predicted v = eps - x0 at noise level `sigma` (B,), guidance included if configured."""

    def decode(self, x0: Tensor) -> Tensor:
        """Pixels (B, T, C, H, W) in [0, 1]."""

    def add_lora(self, lora: LoraOptions) -> None:
        """Wrap the denoiser's target modules with a fresh LoRA; the base weights freeze."""

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def reference(self) -> contextlib.AbstractContextManager[None]:
        """Within this context the policy is the frozen reference (adapter disabled)."""

    def save_trainable(self, directory: str | Path) -> None: ...

    def load_trainable(self, directory: str | Path) -> None: ...


@runtime_checkable
class Reconstructs(Protocol):
    """Optional: a policy with an autoencoder. What it reproduces of a target is the evaluation's ceiling, since an
    edit that reaches the target's exact latent still comes out through the decoder."""

    def reconstruct(self, video: Tensor) -> Tensor:
        """(B, T, C, H, W) pixels in [0, 1], encoded and decoded: the same shape back, on the policy's device."""


class LoraPolicy:
    """LoRA on `self.denoiser` (a diffusers `ModelMixin`), plus any fully trainable `extra_trainable` modules.

    Subclasses set `Options` (a StrictModel with their recipe options), `default_lora_targets`, build their
    modules in `__init__(options, device, dtype)` and call `self.add_lora(lora)` when training with LoRA.
    """

    Options: ClassVar[type[StrictModel]]
    default_lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    adapter_file: ClassVar[str] = "adapter.safetensors"
    extra_file: ClassVar[str] = "trainable.safetensors"

    denoiser: nn.Module
    device: torch.device
    dtype: torch.dtype

    def __init__(self) -> None:
        self.has_lora = False
        self.extra_trainable: dict[str, nn.Module] = {}

    def add_lora(self, lora: LoraOptions) -> None:
        from peft import LoraConfig

        targets = lora.targets or self.default_lora_targets
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        self.denoiser.requires_grad_(False)
        self.denoiser.add_adapter(config)  # type: ignore[operator]
        # LoRA weights train in float32 even when the base runs in bf16 (stable Adam updates).
        for p in self.denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.has_lora = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        for module in self.extra_trainable.values():
            params += [p for p in module.parameters() if p.requires_grad]
        return params

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        if not self.has_lora:
            raise RuntimeError("the reference policy is the adapter-disabled model: add a LoRA first (optim.lora)")
        self.denoiser.disable_adapters()  # type: ignore[operator]
        try:
            yield
        finally:
            self.denoiser.enable_adapters()  # type: ignore[operator]

    def trainable_state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Adapter and extra weights as CPU copies (never views of live weights; gathered first under ZeRO-3)."""
        out: dict[str, dict[str, Tensor]] = {}
        if self.has_lora:
            from peft.utils import get_peft_model_state_dict

            out["adapter"] = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.denoiser).items()}
        extra = {
            f"{name}.{k}": v.detach().cpu().clone()
            for name, module in self.extra_trainable.items()
            for k, v in module.state_dict().items()
        }
        if extra:
            out["extra"] = extra
        return out

    def save_trainable(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.trainable_state_dict()
        if "adapter" in state:
            save_file(state["adapter"], str(directory / self.adapter_file))
        if "extra" in state:
            save_file(state["extra"], str(directory / self.extra_file))

    def load_trainable(self, directory: str | Path) -> None:
        directory = Path(directory)
        adapter, extra = directory / self.adapter_file, directory / self.extra_file
        if not adapter.exists() and not extra.exists():
            raise FileNotFoundError(f"no {self.adapter_file} or {self.extra_file} in {directory}")
        if adapter.exists():
            from peft.utils import set_peft_model_state_dict

            if not self.has_lora:
                raise RuntimeError(f"{adapter} holds a LoRA but this policy has none: set optim.lora in the recipe")
            result = set_peft_model_state_dict(self.denoiser, load_file(str(adapter)))
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise RuntimeError(f"{adapter} does not match this policy's LoRA (unexpected keys, e.g. {unexpected[0]})")
        if extra.exists():
            state = load_file(str(extra))
            for name, module in self.extra_trainable.items():
                prefix = name + "."
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def modules_for_training(self) -> list[nn.Module]:
        """Modules whose train()/eval() mode follows the trainer's phase."""
        return [self.denoiser, *self.extra_trainable.values()]


def build_policy(name: str, options: dict[str, Any] | BaseModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Instantiate a registered policy with validated options.

    Building imports the model libraries and loads (or first builds) weights: their notices and progress bars go
    to the run's libraries.log, not the console.
    """
    from editrl.monitor import quiet_libraries
    from editrl.registry import POLICIES

    with quiet_libraries():
        opts_cls = getattr(POLICIES.get(name), "Options", None)
        if opts_cls is not None and not isinstance(options, opts_cls):
            options = opts_cls.model_validate(dict(options) if not isinstance(options, BaseModel) else options.model_dump())
        return POLICIES.build(name, options, device=torch.device(device), dtype=dtype)
