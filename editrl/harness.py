"""The training loop Edit-GRPO and SFT share: seeds, the data order, the phase timer, and `Harness`, which builds a
run from its recipe, resumes, saves and fits it the same way for both."""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from editrl.base import TrainingError
from editrl.checkpoint import find_checkpoint, load_training_state, policy_from_recipe, save_checkpoint
from editrl.config import Recipe, dump_recipe
from editrl.data.base import EditDataset, build_dataset
from editrl.distributed import make_backend
from editrl.monitor import Bar, RunLogger, announce, progress


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers: every rollout's noise is a pure function of (run seed, step, rank, chunk)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class DataCursor:
    """Endless, seeded, epoch-wise shuffled request order; its position is all that resume needs."""

    def __init__(self, size: int, seed: int, shuffle: bool, position: int = 0) -> None:
        self.size, self.seed, self.shuffle, self.position = size, seed, shuffle, position
        self._epoch, self._order = -1, torch.arange(size)

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, self.size)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
                self._order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
                self._epoch = epoch
            out.append(int(self._order[i]))
            self.position += 1
        return out


class Timer:
    """Wall time per phase, accumulated over a step.

    On a CUDA device each phase starts and ends with a synchronise: kernels run asynchronously, so without it a
    phase's time would land in whichever later phase first waits for the device.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.sync = device is not None and device.type == "cuda"

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - t0


def start_process(recipe: Recipe, seed: int, resume: bool, overwrite: bool = False) -> Path:
    """What every loop does first: refuse to mix into an occupied run directory, set threads and torch's seed."""
    run_dir = recipe.output_dir
    if not resume and not overwrite and any((run_dir / "checkpoints").glob("step_*")):
        raise TrainingError(
            f"{run_dir} already holds checkpoints: continue it with --resume, or choose another run.name / "
            "run.output_dir (`editrl train` can also start over with --overwrite)"
        )
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    torch.manual_seed(seed)
    return run_dir


class Harness:
    """A run built from its recipe: policy, backend, data, cursor; resumed, saved and fitted one way for every loop.

    A subclass names its phase and implements `train_step() -> metrics` and, for recipes with an eval split,
    `evaluate() -> metrics`. Held-out evaluations run before training, every `train.eval_every` steps and at the end.
    """

    label: ClassVar[str]  # the phase's name on the console
    phase: ClassVar[str]  # its key in the job's list of phases
    headline: ClassVar[dict[str, str] | None] = None  # the numbers its periodic lines show (None: RunLogger's)
    eval_phase: ClassVar[str | None] = None  # held-out evaluations announced as a phase of their own, with a progress row

    def __init__(self, recipe: Recipe, resume: bool = False, overwrite: bool = False, backend: Any = None) -> None:
        self.recipe = recipe
        self.backend = backend or make_backend(recipe)
        self.run_dir = start_process(recipe, self.seed(), resume, overwrite)
        if overwrite and self.backend.is_main:
            shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        self.device = torch.device(recipe.run.device)
        self.policy = policy_from_recipe(recipe, init_from=False)
        if recipe.policy.init_from:
            self.make_init(resume)
            self.policy.load_trainable(find_checkpoint(recipe.policy.init_from))
        self.check_policy()
        self.backend.prepare(self.policy)
        self.ema = self._make_ema()
        self.train_data: EditDataset = build_dataset(recipe.data.train.kind, recipe.data.train.options)
        self.eval_data: EditDataset | None = (
            build_dataset(recipe.data.eval.kind, recipe.data.eval.options) if recipe.data.eval else None
        )
        self.cursor = DataCursor(len(self.train_data), recipe.run.seed, recipe.data.shuffle)
        self.step = 0
        self.build()  # before resuming: whatever it draws from torch's RNG, an uninterrupted run drew too
        if resume:
            self._resume()
        elif self.backend.is_main:
            dump_recipe(recipe, self.run_dir / "recipe.yaml")
        self.logger = RunLogger(
            self.run_dir, enabled=self.backend.is_main, start_step=self.step, log_every=recipe.train.log_every,
            label=self.label, total=recipe.train.steps, headline=self.headline,
        )

    # ------------------------------------------------------------------ what a loop adds

    def seed(self) -> int:
        """torch's global seed for this process."""
        return derive_seed(self.recipe.run.seed, self.backend.rank)

    def make_init(self, resume: bool) -> None:
        """Runs before `policy.init_from` is loaded (Edit-GRPO makes it with its warm start)."""

    def check_policy(self) -> None:
        """Refuses a policy the loop cannot train (one line)."""

    def build(self) -> None:
        """The loop's own parts (rewards, schedules, worker pools)."""

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def after_step(self, metrics: dict[str, float]) -> None:
        """Per-step outputs besides the metrics (sample videos)."""

    def progress_note(self, metrics: dict[str, float]) -> str:
        return ""

    def close(self) -> None:
        """Releases what `build` started; runs however the loop ends."""

    def finish(self) -> None:
        """Runs after the last step (a before/after table)."""

    # ------------------------------------------------------------------ resume / save / fit

    def _make_ema(self) -> Any:
        if not self.recipe.optim.ema.enabled:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(self.policy.trainable_parameters(), decay=self.recipe.optim.ema.decay)

    def _resume(self) -> None:
        try:
            ckpt = find_checkpoint(self.run_dir)
        except FileNotFoundError:
            raise TrainingError(f"--resume: no checkpoint in {self.run_dir} to resume from") from None
        state, info = load_training_state(ckpt)
        with self.backend.gathered(self.policy):
            self.policy.load_trainable(ckpt)
        self.backend.load_state_dict(state["backend"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(info["step"])
        self.cursor.position = int(info["cursor"])

    def save(self) -> Path | None:
        self.backend.save_shards(f"step_{self.step:06d}")  # collective, before `latest` can name this step
        with self.backend.gathered(self.policy):
            if not self.backend.is_main:
                return None
            state = {"backend": self.backend.state_dict()}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            return save_checkpoint(
                self.run_dir, self.step, self.recipe, self.policy, state, {"cursor": self.cursor.position},
                keep=self.recipe.train.keep_checkpoints,
            )

    def fit(self) -> Path:
        t = self.recipe.train
        main = self.backend.is_main
        evals: list[int] = []  # held-out evaluations: before training, every eval_every steps and at the last step
        if self.eval_data is not None and t.eval_every is not None:
            evals = [0] if self.step == 0 else []
            evals += [s for s in range(self.step + 1, t.steps + 1) if s % t.eval_every == 0 or s == t.steps]
        if main:
            continuing = f", continuing at step {self.step}" if self.step else ""
            announce(self.phase, f"{t.steps} steps -> {self.run_dir}{continuing}")
            if evals and self.eval_phase:
                at = ", ".join(map(str, evals)) if len(evals) <= 5 else f"{evals[0]} to {t.steps}, every {t.eval_every}"
                announce(self.eval_phase, f"{len(self.eval_data)} clips at steps {at}")  # type: ignore[arg-type]
        try:
            with progress(self.label, t.steps, self.step, enabled=main and t.progress) as bar:
                held_out = bar.add("held-out evaluation", len(evals)) if evals and self.eval_phase else None
                if 0 in evals:
                    self.logger.log(0, self._evaluate(held_out))
                while self.step < t.steps:
                    metrics = self.train_step()
                    if self.step in evals:
                        metrics.update(self._evaluate(held_out))
                    self.logger.log(self.step, metrics)
                    self.after_step(metrics)
                    if self.step % t.save_every == 0 or self.step == t.steps:
                        self.save()
                    bar.update(self.step, self.progress_note(metrics))
        finally:
            self.close()
            self.logger.close()
        self.finish()
        return self.run_dir

    def _evaluate(self, row: Bar | None) -> dict[str, float]:
        out = self.evaluate()
        if row is not None:
            row.update(advance=1, note=f"total {out.get('eval/total', float('nan')):.3f}")
        return out
