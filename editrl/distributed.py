"""The only module that talks to torch.distributed / DeepSpeed.

The trainer sees a `Backend`: it owns the optimiser (so ZeRO can shard it), runs the trained forward, backward
and the update, and reduces tensors across ranks. `LocalBackend` is the single-process case; `DeepSpeedBackend`
runs the same calls on 1..N processes started by `torchrun`, `deepspeed` or `accelerate launch` (they all set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), with ZeRO-2 or ZeRO-3 sharding of the policy's
trained modules (the whole DiT under ZeRO-3, frozen base weights included).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from editrl.base import RecipeError, free_port, launch_env
from editrl.files import unique_keys
from editrl.config import OptimConfig

ZERO_DIR = "zero"  # <run>/checkpoints/zero/<step tag>/: DeepSpeed's own per-rank optimiser shards


def warmup_lambda(warmup_steps: int) -> Any:
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def all_gather_traffic(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """All-gather collectives and bytes that `fn(*args, **kwargs)` issues, from DeepSpeed's comms logger (which must
    be enabled: `comms_logger` in the DeepSpeed config, or its `enabled`/`prof_all` flags)."""
    from deepspeed.comm import comm

    comm.comms_logger.comms_dict.clear()
    fn(*args, **kwargs)
    calls = nbytes = 0
    for name, sizes in comm.comms_logger.comms_dict.items():
        if "all_gather" in name:
            for size, record in sizes.items():
                calls += record[0]
                nbytes += int(size) * record[0]
    return {"calls": calls, "bytes": nbytes}


class LocalBackend:
    """One process: torch AdamW, gradient clipping, identity collectives."""

    rank = 0
    world_size = 1

    def __init__(self, optim: OptimConfig) -> None:
        self.cfg = optim
        self.params: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, policy: Any) -> None:
        self.params = list(policy.trainable_parameters())
        if not self.params:
            raise RecipeError("the policy has no trainable parameters (set optim.lora, or train the policy's own modules)")
        c = self.cfg
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(c.warmup_steps))

    def forward(self, fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """A policy call whose output is back-propagated (DeepSpeed hooks its engine forward around it)."""
        return fn(*args, **kwargs)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, update, zero the gradients; returns the pre-clip gradient norm."""
        assert self.optimizer is not None
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def schedule_step(self) -> None:
        assert self.scheduler is not None
        self.scheduler.step()

    @property
    def lr(self) -> float:
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[0]["lr"])

    def save_shards(self, tag: str) -> None:
        """Collective: write what only each rank holds (nothing here: `state_dict` has it all)."""

    def state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None and self.scheduler is not None
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        if "optimizer" not in state:
            raise RecipeError(
                f"this checkpoint's optimiser state is sharded over {state.get('zero', {}).get('world_size', '?')} "
                "DeepSpeed ranks: resume it with distributed.backend=deepspeed on as many ranks"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def all_gather(self, t: Tensor) -> Tensor:
        """Concatenate `t` (same shape on every rank) along dim 0 in rank order."""
        return t

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def gathered(self, policy: Any) -> Iterator[None]:
        """Inside: the trainable weights are whole on every rank (to save or load them under ZeRO-3)."""
        yield

    @contextlib.contextmanager
    def inference(self, policy: Any) -> Iterator[None]:
        """Inside: no-grad policy calls (rollouts, evaluation) need no per-call parameter gathering."""
        yield


class _Trained(nn.Module):
    """The policy's trained modules under one root that DeepSpeed shards; `forward` runs any policy call, so that
    DeepSpeed's forward/backward hooks run while the policy calls its own modules as usual."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        return fn(*args, **kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(recipe: Any) -> dict[str, Any]:
    """The DeepSpeed JSON for a recipe: generated from `optim` and `distributed`, then `distributed.config` merged over.

    Gradient accumulation is the trainer's (it divides each loss by the passes of an update), so DeepSpeed's is
    unmanaged: `backward` only accumulates and `step` is the boundary. The optimiser is torch's AdamW, the one a
    single process uses, so 1 and N ranks follow the same update rule.
    """
    d, o = recipe.distributed, recipe.optim
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if d.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": o.grad_clip or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if d.config:
        path = Path(d.config)
        if not path.is_file():
            raise FileNotFoundError(f"distributed.config: {path} does not exist")
        try:
            user = json.loads(path.read_text(), object_pairs_hook=unique_keys)
        except ValueError as e:  # not JSON, a key given twice, or bytes that are not text
            raise RecipeError(f"distributed.config: {path} is not valid JSON: {e}") from None
        if not isinstance(user, dict):
            raise RecipeError(f"distributed.config: {path} must hold a JSON object")
        cfg = _merge(cfg, user)
    return cfg


class DeepSpeedBackend(LocalBackend):
    """DeepSpeed ZeRO-2/3 on every rank of a torchrun / deepspeed / accelerate launch (or on one process alone).

    Checkpoints: the trainer's consolidated checkpoint (LoRA/extra weights gathered on all ranks, written by rank 0,
    the same files a single process writes) plus DeepSpeed's own per-rank optimiser shards in
    `<run>/checkpoints/zero/<step tag>/`, written before the consolidated one so that every checkpoint `latest` can
    name has its shards. `--resume` needs the same number of ranks and ZeRO stage; inference needs only the
    consolidated directory.
    """

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe.optim)
        self.dist = recipe.distributed
        self.zero_root = recipe.output_dir / "checkpoints" / ZERO_DIR
        self.ds_config = deepspeed_config(recipe)
        self.stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        if recipe.optim.ema.enabled and self.stage == 3:  # the recipe checks its own zero_stage; this, distributed.config's
            raise RecipeError("optim.ema: not available with ZeRO-3 (the EMA would copy sharded, empty tensors); use distributed.zero_stage=2")
        self.device = torch.device(recipe.run.device)
        self._init_process_group()
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.engine: Any = None
        self.module: _Trained | None = None
        self._tag: str | None = None

    def _init_process_group(self) -> None:
        """gloo on CPU (DeepSpeed's CPU accelerator), nccl on GPUs; a lone process gets a local rendezvous."""
        _, _, local_rank = launch_env()
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cpu = self.device.type == "cpu"
        if cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError as e:
            raise RecipeError(f"distributed.backend=deepspeed needs DeepSpeed ({e}): pip install 'editrl[deepspeed]'") from None

        # DeepSpeed's ZeRO calls torch's older collective names on every step; the notice says nothing to a user.
        warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
        # DeepSpeed would otherwise compile its shared-memory collectives on first use (1-3 minutes on CPU).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if self.device.type == "cuda":
            torch.cuda.set_device(local_rank)
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", verbose=False)

    # ------------------------------------------------------------------ optimisation

    def prepare(self, policy: Any) -> None:
        import deepspeed

        super().prepare(policy)  # the AdamW and warm-up schedule one process uses; ZeRO steps it on its flat shards
        if not callable(getattr(policy, "modules_for_training", None)):
            raise RecipeError("distributed.backend=deepspeed: this policy has no modules_for_training(), the modules "
                              "DeepSpeed shards (editrl.policy.OPTIONAL); train it with distributed.backend=none")
        self.module = _Trained(list(policy.modules_for_training()))
        owned = {id(p) for p in self.module.parameters()}
        if any(id(p) not in owned for p in self.params):
            raise ValueError("a trainable parameter is outside policy.modules_for_training(): DeepSpeed cannot shard or reduce it")
        # Both ZeRO stages broadcast rank 0's weights here, so a LoRA initialised per rank starts identical.
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=self.optimizer, config=self.ds_config)

    def forward(self, fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        return self.engine(fn, *args, **kwargs)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ checkpoints

    def save_shards(self, tag: str) -> None:
        """Collective: DeepSpeed's per-rank optimiser shards for checkpoint `tag` (frozen weights left out)."""
        self.engine.save_checkpoint(str(self.zero_root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
        self._tag = tag
        self.barrier()
        if self.is_main:  # shards whose consolidated checkpoint was pruned (or never completed)
            for old in self.zero_root.glob("step_*"):
                if old.name != tag and not (self.zero_root.parent / old.name).is_dir():
                    shutil.rmtree(old, ignore_errors=True)

    def state_dict(self) -> dict[str, Any]:
        assert self.scheduler is not None
        if self._tag is None:
            raise RuntimeError("DeepSpeedBackend.state_dict() before save_shards(): the optimiser shards were not written")
        return {
            "scheduler": self.scheduler.state_dict(),
            "zero": {"tag": self._tag, "world_size": self.world_size, "stage": self.stage},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.scheduler is not None
        zero = state.get("zero")
        if zero is None:
            raise RecipeError(
                "this checkpoint was written by a single process (distributed.backend=none): resume it the same way, "
                "or start a DeepSpeed run from its weights with policy.init_from"
            )
        if (zero["world_size"], zero["stage"]) != (self.world_size, self.stage):
            raise RecipeError(
                f"this checkpoint holds ZeRO-{zero['stage']} optimiser shards of {zero['world_size']} rank(s); resume it "
                f"on {zero['world_size']} rank(s) with distributed.zero_stage={zero['stage']} (this run: {self.world_size} "
                f"rank(s), ZeRO-{self.stage}), or start a new run from its weights with policy.init_from"
            )
        shards = self.zero_root / zero["tag"]
        if not shards.is_dir():
            raise FileNotFoundError(f"{shards}: the DeepSpeed optimiser shards of this checkpoint are missing")
        path, _ = self.engine.load_checkpoint(
            str(self.zero_root), tag=zero["tag"], load_module_strict=False, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"{shards}: DeepSpeed could not load these optimiser shards")
        self.scheduler.load_state_dict(state["scheduler"])

    @contextlib.contextmanager
    def gathered(self, policy: Any) -> Iterator[None]:
        """ZeRO-3: gather the trainable weights on every rank; what rank 0 writes inside is kept (used on resume)."""
        if self.stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(policy.trainable_parameters()), modifier_rank=0):
            yield

    @contextlib.contextmanager
    def inference(self, policy: Any) -> Iterator[None]:
        """ZeRO-3: gather the sharded modules once for all the no-grad calls inside, instead of per module call.

        Each denoising step would otherwise all-gather every layer's shard and free it again. The module hooks
        come off while the weights are whole (they would release them after each layer) and go back on after;
        this is the pattern trl uses for generation under ZeRO-3. `distributed.rollout_gather=false` keeps
        per-layer gathering, for models too large to hold whole on one device.
        """
        if self.stage != 3 or not self.dist.rollout_gather:
            yield
            return
        import deepspeed

        assert self.module is not None
        offload = self.engine.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(self.module.parameters())), torch.no_grad():
            for p in self.module.parameters():
                p.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                offload._register_deepspeed_module(offload.module)

    # ------------------------------------------------------------------ collectives

    def all_gather(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Per-key mean over the ranks that logged the key (NaNs, e.g. no valid reward on a rank, left out)."""
        import torch.distributed as dist

        everyone: list[dict[str, float] | None] = [None] * self.world_size
        dist.all_gather_object(everyone, values)
        keys = dict.fromkeys(k for d in everyone if d for k in d)
        out = {}
        for k in keys:
            seen = [float(d[k]) for d in everyone if d and k in d and not math.isnan(float(d[k]))]
            out[k] = sum(seen) / len(seen) if seen else float("nan")
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def make_backend(recipe: Any) -> LocalBackend:
    """The recipe's backend; a multi-process launch with `distributed.backend: none` is refused (N copies would race)."""
    if recipe.distributed.backend == "none":
        _, world, _ = launch_env()
        if world > 1:
            raise RecipeError(
                f"launched on {world} processes but distributed.backend=none: set distributed.backend=deepspeed "
                "(or run a single process)"
            )
        return LocalBackend(recipe.optim)
    return DeepSpeedBackend(recipe)
