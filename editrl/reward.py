"""The reward contract, and the one place that turns recipe reward entries into callables.

A reward is a class with `needs`, optional `Options` and `__call__(batch) -> RewardOutput` (may be async), or a
function in trl's convention, `fn(instructions, sources, edited, references, **kw) -> list[float | None]`, where None
means "no score" (excluded, never read as 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from editrl.base import EditrlError
from editrl.registry import is_editrl
from editrl.types import EditSample, RewardBatch, RewardOutput

ALL_NEEDS = frozenset({"instruction", "source", "edited", "reference", "target", "mask", "category"})


@runtime_checkable
class Reward(Protocol):
    needs: ClassVar[set[str]] | set[str]

    def __call__(self, batch: RewardBatch) -> RewardOutput: ...


class FunctionReward:
    """Adapts a trl-style reward function: per-sample lists in, list of float | None out."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.fn = fn
        self.options = options
        self.needs = set(ALL_NEEDS)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__name__ = getattr(fn, "__name__", "reward")

    def _kwargs(self, batch: RewardBatch) -> dict[str, Any]:
        def unbatch(t: torch.Tensor | None) -> list[Any]:
            return list(t.unbind(0)) if t is not None else [None] * len(batch)

        return dict(
            instructions=batch.instructions,
            sources=unbatch(batch.sources),
            edited=unbatch(batch.edited),
            references=batch.references or [None] * len(batch),
            targets=unbatch(batch.targets),
            masks=batch.masks or [None] * len(batch),
            categories=batch.categories or [None] * len(batch),
            **self.options,
        )

    def _wrap(self, values: Any, n: int) -> RewardOutput:
        if isinstance(values, RewardOutput):
            return values
        values = list(values)
        if len(values) != n:
            raise ValueError(f"reward {self.__name__} returned {len(values)} values for a batch of {n}")
        return RewardOutput.from_list(values)

    def __call__(self, batch: RewardBatch) -> Any:
        if self.is_async:

            async def run() -> RewardOutput:
                return self._wrap(await self.fn(**self._kwargs(batch)), len(batch))

            return run()
        return self._wrap(self.fn(**self._kwargs(batch)), len(batch))


def build_reward(name: str, options: dict[str, Any]) -> Any:
    """A reward object from a registry name or `module:attr`, with its options validated."""
    from editrl.registry import REWARDS

    obj = REWARDS.get(name)
    if inspect.isclass(obj):
        opts_cls = getattr(obj, "Options", None)
        if opts_cls is not None:
            return REWARDS.build(name, opts_cls.model_validate(options))
        return REWARDS.build(name, **options)
    if callable(obj):
        return FunctionReward(obj, options)
    raise TypeError(f"reward {name!r} resolves to {obj!r}, which is neither a class nor a function")


def reward_batch(samples: list[EditSample], edited: Tensor, needs: set[str] | frozenset[str] = ALL_NEEDS) -> RewardBatch:
    """Only what the rewards declared they need (a judge that reads no target never gets one).

    The one place that decides where rewards compute: the videos and masks go to the edited videos' device (the
    policy's), so pixel and oracle metrics run where the clips already are; judges turn what they send into CPU
    images themselves. References stay as they are (images for judges).
    """
    device = edited.device

    def stack(attr: str) -> Tensor | None:
        """The samples' videos on the device; a group's members share their request's tensors, so each distinct one
        is stacked and copied once and repeated there (at video sizes the copies were a step's largest host work)."""
        values = [getattr(s, attr) for s in samples]
        if any(v is None for v in values):
            return None
        distinct = {id(v): v for v in values}
        slot = {key: i for i, key in enumerate(distinct)}
        order = torch.tensor([slot[id(v)] for v in values], device=device)
        return torch.stack(list(distinct.values())).to(device)[order]

    return RewardBatch(
        instructions=[s.instruction for s in samples],
        edited=edited if "edited" in needs else None,
        sources=stack("source") if "source" in needs else None,
        targets=stack("target") if "target" in needs else None,
        references=[s.reference for s in samples] if "reference" in needs else None,
        masks=[None if s.mask is None else s.mask.to(device) for s in samples] if "mask" in needs else None,
        categories=[s.category for s in samples],
        ids=[s.id for s in samples],
    )


def _run(reward: Any, batch: RewardBatch) -> Any:
    """A reward's answer, awaited on an event loop of its own when it is async."""
    out = reward(batch)
    return asyncio.run(out) if inspect.iscoroutine(out) else out


async def _in_thread(fn: Callable[[], Any], timeout: float | None, name: str) -> Any:
    """`fn()` in a daemon thread, awaited at most `timeout` seconds (asyncio.TimeoutError after). A thread that never
    returns is left behind and never holds up the process's exit; its answer, if it comes, is dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def work() -> None:
        try:
            value, error = fn(), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting loop, which decides
            value, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop has moved on (the reward was late): nobody waits for it
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=work, name=f"reward {name}", daemon=True).start()
    return await asyncio.wait_for(done, timeout)


async def _call(reward: Any, batch: RewardBatch, timeout: float | None = None) -> RewardOutput:
    """One reward's scores on the host, within `timeout` seconds. A plugin that raises, exits, answers with the wrong
    shape, or is late scores nothing: every sample invalid, the error in `extras["error"]`, and `rewards.on_failure`
    decides whether the run skips those samples or stops. editrl's own rewards are not excused a fault (a bug keeps
    its traceback), nor is an EditrlError (a judge server that is down: the run stops with its one line)."""
    who = getattr(reward, "__name__", type(reward).__name__)
    try:
        out = await _in_thread(lambda: _run(reward, batch), timeout, who)
        if not isinstance(out, RewardOutput):
            raise TypeError(f"reward {who} returned {type(out).__name__}, expected RewardOutput")
        if out.scores.numel() != len(batch):
            raise ValueError(f"reward {who} returned {out.scores.numel()} scores for {len(batch)} samples")
    except EditrlError:
        raise
    except asyncio.TimeoutError:
        return _failed(len(batch), f"no answer within rewards.timeout_s={timeout:g}s (the call was left running)")
    except (Exception, SystemExit) as e:
        if not isinstance(e, SystemExit) and is_editrl(getattr(getattr(reward, "fn", reward), "__module__", "")):
            raise
        error = f"it called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
        return _failed(len(batch), error)
    # Scores leave the device once per reward call: the group statistics over them are a few numbers on the host.
    return RewardOutput(out.scores.cpu(), out.valid.cpu(), out.extras)


def _is_async(reward: Any) -> bool:
    return bool(getattr(reward, "is_async", False)) or inspect.iscoroutinefunction(getattr(type(reward), "__call__", None))


def _failed(n: int, error: str) -> RewardOutput:
    return RewardOutput(torch.zeros(n), torch.zeros(n, dtype=torch.bool), {"error": [error] * n})


class RewardSet:
    """The recipe's weighted rewards; scores a batch with all of them, async ones concurrently, each within `timeout_s`
    seconds (`rewards.timeout_s`; None: no limit)."""

    def __init__(self, terms: list[tuple[str, float, Any]], timeout_s: float | None = None) -> None:
        self.names = [n for n, _, _ in terms]
        self.weights = {n: w for n, w, _ in terms}
        self.rewards = {n: r for n, _, r in terms}
        self.timeout_s = timeout_s

    @property
    def needs(self) -> set[str]:
        return set().union(*(set(getattr(r, "needs", ALL_NEEDS)) for r in self.rewards.values()))

    async def ascore(self, batch: RewardBatch) -> dict[str, RewardOutput]:
        """In the recipe's order: an async reward starts and runs on while the next ones do; a plain one finishes
        before the next starts (so a reward may rely on the ones named before it having run)."""
        pending: dict[str, Any] = {}
        for name, reward in self.rewards.items():
            call = _call(reward, batch, self.timeout_s)
            if _is_async(reward):
                pending[name] = asyncio.ensure_future(call)
            else:
                pending[name] = await call
        return {name: await out if isinstance(out, asyncio.Future) else out for name, out in pending.items()}

    def score(self, batch: RewardBatch) -> dict[str, RewardOutput]:
        return asyncio.run(self.ascore(batch))
