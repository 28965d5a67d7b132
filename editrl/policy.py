"""The policy contract: a flow-matching model with trainable parts.

`Policy` and `OPTIONAL` are the whole contract (tests/test_architecture.py holds the engine to them). `LoraPolicy`
implements its LoRA half with peft for a diffusers denoiser, so a new model only writes encode / init_noise /
velocity / decode, and runs the denoiser at the card's pace (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from editrl.base import RecipeError, StrictModel
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

    def save_trainable(self, directory: str | Path) -> None:
        """Writes the trainable weights (a checkpoint's); `load_trainable` reads them back into a fresh policy."""

    def load_trainable(self, directory: str | Path) -> None: ...


# What a policy may also have, and what the engine does when it has not. A policy class is built as
# `cls(options, device=..., dtype=...)`, `options` validated by its `Options` model if it has one (else the dict).
OPTIONAL: dict[str, str] = {
    "Options": "a StrictModel of the recipe's policy.options; without it they come as a dict, unchecked",
    "preflight": "classmethod (options) -> list[str]: what `--dry-run` reports missing; without it: nothing missing",
    "job_phases": "classmethod (options) -> keys of editrl.monitor.PHASES the policy announces while it is built (a "
                  "tiny preset it builds), numbered in `editrl train`'s list of phases; without it: none",
    "modules_for_training": "() -> modules whose train()/eval() follow the update, and that DeepSpeed shards: without "
                            "it no mode switches, and distributed.backend=deepspeed is refused",
    "device": "where the policy computes (the held-out evaluation's metrics): without it the recipe's run.device",
    "encode_target": "(samples) -> x0 latents of the targets: what `editrl sft` trains towards; without it SFT is refused",
    "reconstruct": "(video) -> the video through the autoencoder (`Reconstructs`): the evaluation's ceiling; without it "
                   "no ceiling yardstick",
    "conform_video": "(video) -> (video, note or None): `editrl edit` makes an input fit (an image must stay one frame, "
                     "else `--image` is refused); without it inputs go as they are",
    "edits_video": "False for a model that ignores the source (text-to-video): `editrl edit` refuses it; default True",
    "guidance_scale": "a settable float, the classifier-free guidance `editrl edit --guidance-scale` sets; without it "
                      "that flag is refused",
}


def train_mode(policy: Any, mode: bool) -> None:
    """The policy's `modules_for_training()` (OPTIONAL: without it, none) put in train() or eval() mode."""
    for module in getattr(policy, "modules_for_training", lambda: [])():
        module.train(mode)


@runtime_checkable
class Reconstructs(Protocol):
    """Optional: a policy with an autoencoder. What it reproduces of a target is the evaluation's ceiling, since an
    edit that reaches the target's exact latent still comes out through the decoder."""

    def reconstruct(self, video: Tensor) -> Tensor:
        """(B, T, C, H, W) pixels in [0, 1], encoded and decoded: the same shape back, on the policy's device."""


# `DenoiserOptions.attention` -> diffusers' attention dispatcher backend (diffusers.models.attention_dispatch).
# The torch SDPA kernels need no package: `native` lets torch pick (cuDNN on an H100/H200), the others force one.
ATTENTION_BACKENDS = {
    "native": "native", "cudnn": "_native_cudnn", "flash": "_native_flash", "efficient": "_native_efficient",
    "math": "_native_math", "flash_attn": "flash", "flash_attn_3": "_flash_3",
}
_CUDA_ONLY = ("cudnn", "flash", "efficient", "flash_attn", "flash_attn_3")
_PACKAGES = {"flash_attn": "flash_attn", "flash_attn_3": "flash_attn_interface"}


class DenoiserOptions(StrictModel):
    """How the denoiser runs, for every `LoraPolicy` (a policy's `Options` subclass this); docs/performance.md."""

    # Regional compilation of the DiT's repeated blocks (diffusers' compile_repeated_blocks). None: on for CUDA, off
    # elsewhere (on a CPU the compile costs more than it saves at the sizes that run there).
    compile: bool | None = None
    attention: Literal["auto", "native", "cudnn", "flash", "efficient", "math", "flash_attn", "flash_attn_3"] = "auto"


def attention_problem(name: str, device: torch.device) -> str | None:
    """Why attention backend `name` cannot run on `device` here (one line), or None."""
    package = _PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        return f"needs the {package} package, which is not installed: pip install it, or use native / flash"
    if name in _CUDA_ONLY and device.type != "cuda":
        return f"the {name} kernels run on CUDA GPUs only (run.device is {device}): use native"
    return None


class CastLinear(nn.Linear):
    """A LoRA factor whose float32 weight is cast to the activations' dtype inside the forward.

    The weight stays the float32 parameter Adam updates (a master copy that keeps small steps), while the matmul runs
    in the model's dtype: peft would instead cast every activation to float32 and back, which cost half of each DiT
    call in bf16 (docs/performance.md). Casting a rank-r factor is tiny; autograd casts its gradient back to float32.
    """

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def training_graph(velocity: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Decorates a `LoraPolicy`'s `velocity`: once compiled, it always runs the graph the update runs (gradients on,
    the output detached when called without them). Inductor compiles a training graph's forward and an inference graph
    into different kernels whose bf16 roundings differ, so a rollout on the inference graph would not get the
    log-probabilities the update recomputes: the on-policy ratio must be exactly 1. Eager calls are unchanged."""

    @functools.wraps(velocity)
    def call(self: Any, *args: Any, **kwargs: Any) -> Tensor:
        if not self.compiled or torch.is_grad_enabled():
            return velocity(self, *args, **kwargs)
        with torch.enable_grad():
            return velocity(self, *args, **kwargs).detach()

    return call


class LoraPolicy:
    """LoRA on `self.denoiser` (a diffusers `ModelMixin`), plus any fully trainable `extra_trainable` modules.

    Subclasses set `Options` (subclassing `DenoiserOptions`) and `default_lora_targets`, end `__init__(options,
    device, dtype)` with `self.configure_denoiser(options)` and decorate `velocity` with `@training_graph`.
    """

    Options: ClassVar[type[StrictModel]]
    default_lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    default_attention: ClassVar[str] = "native"  # what `attention: auto` means for this policy's denoiser, where it runs
    adapter_file: ClassVar[str] = "adapter.safetensors"
    extra_file: ClassVar[str] = "trainable.safetensors"

    denoiser: nn.Module
    device: torch.device
    dtype: torch.dtype

    def __init__(self) -> None:
        self.has_lora = False
        self.compiled = False
        self.extra_trainable: dict[str, nn.Module] = {}

    def configure_denoiser(self, options: DenoiserOptions) -> None:
        """The attention backend, and the repeated blocks compiled (lazily: the first call traces them, LoRA included)."""
        name = options.attention
        if name == "auto":  # the policy's default where it runs (a CUDA kernel on a GPU), else torch's own choice
            name = self.default_attention if attention_problem(self.default_attention, self.device) is None else "native"
        problem = attention_problem(name, self.device)
        if problem:
            raise RecipeError(f"policy.options.attention={name}: {problem}")
        if name != "native":
            self.denoiser.set_attention_backend(ATTENTION_BACKENDS[name])  # type: ignore[operator]
        if options.compile if options.compile is not None else self.device.type == "cuda":
            # A dropout of probability 0 is the identity in both modes, but a compiled graph guards on the mode: as
            # nn.Identity, the rollout (eval mode) and the update (train mode) share one graph per block.
            for parent in list(self.denoiser.modules()):
                for name, child in parent.named_children():
                    if isinstance(child, nn.Dropout) and child.p == 0:
                        setattr(parent, name, nn.Identity())
            # Each mode a DiT call runs in (adapter on or off, inputs that need gradients or not, a batch size) is one
            # graph per block class, shared by all its blocks; past the limit (8) torch would fall back to eager silently.
            config, key = torch._dynamo.config, "recompile_limit"
            key = key if hasattr(config, key) else "cache_size_limit"  # its name before torch 2.7
            setattr(config, key, max(getattr(config, key), 32))
            self.denoiser.compile_repeated_blocks(fullgraph=True)  # type: ignore[operator]
            self.compiled = True

    def add_lora(self, lora: LoraOptions) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        targets = lora.targets or self.default_lora_targets
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        self.denoiser.requires_grad_(False)
        self.denoiser.add_adapter(config)  # type: ignore[operator]
        # LoRA weights are float32 parameters (stable Adam updates) that run in the model's dtype (CastLinear).
        for p in self.denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        for layer in self.denoiser.modules():
            if not isinstance(layer, LoraLayer):
                continue
            factors = [*layer.lora_A.values(), *layer.lora_B.values()]
            if factors and all(type(f) is nn.Linear for f in factors):  # conv or embedding adapters keep peft's casts
                for f in factors:
                    f.__class__ = CastLinear
                layer.cast_input_dtype_enabled = False
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
        return [self.denoiser, *self.extra_trainable.values()]


def build_policy(name: str, options: dict[str, Any] | BaseModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Instantiate a registered policy with validated options; the model libraries' notices go to libraries.log."""
    from editrl.monitor import quiet_libraries
    from editrl.registry import POLICIES

    with quiet_libraries():
        opts_cls = getattr(POLICIES.get(name), "Options", None)
        if opts_cls is not None and not isinstance(options, opts_cls):
            options = opts_cls.model_validate(dict(options) if not isinstance(options, BaseModel) else options.model_dump())
        return POLICIES.build(name, options, device=torch.device(device), dtype=dtype)
