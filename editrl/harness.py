"""The training loop Edit-GRPO and SFT share: seeds, the data order, the phase timer, and `Harness`, which builds a
run from its recipe, resumes, saves and fits it the same way for both."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from rich.markup import escape

from editrl.base import CheckpointError, RecipeError, TrainingError
from editrl.checkpoint import (checkpoint_steps, clean_interrupted, find_checkpoint, load_training_state,
                               policy_from_recipe, save_checkpoint)
from editrl.config import Recipe, dump_recipe, read_yaml
from editrl.data.base import EditDataset, build_dataset
from editrl.distributed import make_backend
from editrl.files import RunLock, check_output, disk_full
from editrl.monitor import WANDB_ID, Bar, RunLogger, announce, console, progress
from editrl.preflight import device_problems
from editrl.sentinel import Sentinel, save_best
from editrl.types import EditSample


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

    def peek(self, n: int) -> list[int]:
        """The next `n` indices, without moving the cursor."""
        return DataCursor(self.size, self.seed, self.shuffle, self.position).take(n)

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


class Prefetcher:
    """The next step's requests read and decoded in a background thread while this step computes: at video sizes a
    request's clips take a large share of a second to decode, which the device would otherwise wait for."""

    def __init__(self, data: EditDataset) -> None:
        self.data = data
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="data")
        self.pending: dict[int, cf.Future] = {}

    def get(self, indices: list[int]) -> list[EditSample]:
        """The samples at `indices`: prefetched ones from the thread (its errors raised here), others read now."""
        return [self.pending.pop(i).result() if i in self.pending else self.data[i] for i in indices]

    def prefetch(self, indices: list[int]) -> None:
        for i in indices:
            if i not in self.pending:
                self.pending[i] = self.pool.submit(self.data.__getitem__, i)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pending.clear()


class Timer:
    """Wall time per phase, accumulated over a step. On CUDA each phase starts and ends with a synchronise: kernels
    run asynchronously, so a phase's time would otherwise land in whichever later phase first waits for the device."""

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


def start_process(recipe: Recipe, backend: Any, resume: bool, overwrite: bool = False) -> RunLock | None:
    """What every loop does first, before any model is built: refuse a device this machine does not have, a run
    directory another process writes in (its lock is taken here: the main rank's, returned) or that holds a run or an
    input this one would replace; tidy what an interrupted save left; set threads. (Contradictory flags are the
    command's to refuse, before it reads the recipe: editrl.files.check_flags.)"""
    run_dir = recipe.output_dir
    problems = device_problems(recipe)
    if problems:
        raise RecipeError(problems[0])
    lock, busy = RunLock(run_dir) if backend.is_main else None, ""
    if lock is not None:
        try:
            lock.acquire()
        except TrainingError as e:
            busy = str(e)
    if backend.mean({"busy": float(bool(busy))})["busy"]:  # every rank stops, not only the one that knows why
        raise TrainingError(busy or f"{run_dir} is in use by another process")
    try:
        if not resume:
            check_fresh(recipe, overwrite)
        if lock is not None:
            lock.sign()
            for done in clean_interrupted(run_dir / "checkpoints"):
                console.print(f"[yellow]note[/]: {escape(done)}, left by a save that was cut short", highlight=False)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    return lock


def check_fresh(recipe: Recipe, overwrite: bool) -> None:
    """A new run replaces RUN_OUTPUTS in its directory: only an earlier run's (never one's checkpoints unless
    `overwrite`), and never an input of this run or a folder of the user's own that happens to hold such names."""
    run_dir = recipe.output_dir
    if not overwrite and checkpoint_steps(run_dir / "checkpoints"):
        raise TrainingError(
            f"{run_dir} already holds checkpoints: continue it with --resume, or choose another run.name / "
            "run.output_dir (`editrl train` can also start over with --overwrite)"
        )
    check_output(run_dir, run_inputs(recipe), "run.output_dir", folder=True, writes=RUN_OUTPUTS)
    foreign = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if foreign and not any((run_dir / sign).exists() for sign in RUN_SIGNS):
        raise TrainingError(
            f"run.output_dir {run_dir} is not a run directory but holds {', '.join(foreign)}, which a new run would "
            "replace: choose a new folder"
        )


def run_inputs(recipe: Recipe) -> list[Path]:
    """What a fresh run reads that its outputs must not replace: the `init_from` checkpoint and manifest data."""
    inputs = [Path(src.options["path"]) for src in (recipe.data.train, recipe.data.eval)
              if src is not None and src.kind == "manifest" and isinstance(src.options.get("path"), str)]
    init = recipe.policy.init_from
    if init is not None and Path(init).exists():
        inputs.append(Path(init))
        with suppress(FileNotFoundError, CheckpointError):
            inputs.append(find_checkpoint(init))
    return inputs


# Outputs of a run, removed when a fresh run starts writing in its directory (so nothing of the old one mixes in).
RUN_OUTPUTS = ("checkpoints", "tensorboard", "wandb", WANDB_ID, "samples", "eval", "metrics.jsonl", "recipe.yaml",
               "sentinel.log", "before_after.png")
# What only a run directory holds: a fresh run replaces RUN_OUTPUTS only in a folder that has one of these.
RUN_SIGNS = ("metrics.jsonl", "checkpoints", "tensorboard")
# Recipe keys a resumed run may change (with a note): when and what it logs and saves, how long it runs, where.
RESUME_SAFE = ("run.name", "run.output_dir", "run.threads", "run.loggers", "run.wandb", "run.plugins", "rewards.timeout_s",
               "train.steps", "train.log_every", "train.save_every", "train.eval_every", "train.sample_every",
               "train.keep_checkpoints", "train.progress", "train.sentinel", "grpo.async_rewards",
               "distributed.rollout_gather")
# Keys the checkpoint itself fixes (the model, its adapter, the optimiser's state): never changed by a resume.
RESUME_FIXED = ("policy.name", "policy.options", "optim.lora", "optim.lr", "optim.betas", "optim.eps",
                "optim.weight_decay", "optim.ema.enabled", "distributed.backend", "distributed.zero_stage")


def clear_outputs(run_dir: Path) -> None:
    """Removes a previous run's outputs; only what runs write (the directory may hold the user's own files)."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def flat_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A recipe's leaves by key path: {"optim.lr": 0.001, "rewards.terms.0.name": "brightness", ...}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat_keys(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        return {k: v for i, sub in enumerate(tree) for k, v in flat_keys(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def resume_point(recipe: Recipe, accept_changes: bool, shown: bool = True) -> Path:
    """The checkpoint `--resume` continues, once the recipe agrees with the one it was trained with.

    A resumed run must be the run it continues: changed keys are refused (listed), except RESUME_SAFE ones, which
    pass with a note, and any others `accept_changes` lets through, never RESUME_FIXED ones (the checkpoint's
    weights and optimiser state would silently keep their old values).
    """
    run_dir = recipe.output_dir
    try:
        ckpt = find_checkpoint(run_dir)
    except FileNotFoundError:
        raise TrainingError(f"--resume: no checkpoint in {run_dir} to resume from (start it without --resume)") from None
    saved = flat_keys(read_yaml(ckpt / "recipe.yaml") or {})
    now = flat_keys(recipe.model_dump(mode="json"))
    changed = {k: f"{json.dumps(saved.get(k))} -> {json.dumps(now.get(k))}"
               for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}

    def under(key: str, roots: tuple[str, ...]) -> bool:
        return any(key == r or key.startswith(r + ".") for r in roots)

    def listed(keys: list[str]) -> str:
        return ", ".join(f"{k} {changed[k]}" for k in keys)

    fixed = [k for k in changed if under(k, RESUME_FIXED)]
    if fixed:
        raise TrainingError(
            f"--resume: {listed(fixed)} cannot change when resuming (the checkpoint's weights and optimiser hold "
            f"them): restore them, or start a new run from its weights with policy.init_from={ckpt}"
        )
    refused = [k for k in changed if not under(k, RESUME_SAFE)]
    if refused and not accept_changes:
        raise TrainingError(
            f"--resume: {ckpt} was trained with a different recipe: {listed(refused)}; restore those values, or "
            "pass --accept-changes to continue with the new ones"
        )
    step = json.loads((ckpt / "state.json").read_text())["step"]
    if step > recipe.train.steps:
        raise TrainingError(f"--resume: {ckpt} is at step {step}, past train.steps={recipe.train.steps}: raise train.steps")
    if changed and shown:
        console.print(f"[yellow]note[/]: resuming with changes: {escape(listed(list(changed)))}", highlight=False)
    if step == recipe.train.steps and shown:
        console.print(f"[yellow]note[/]: {escape(str(ckpt))} is the last step, {step}: nothing is left to train "
                      "(raise train.steps to go on)", highlight=False)
    return ckpt


@dataclass
class RunResult:
    """What a finished (or resumed and finished) run returns: where it is, its last step, and counts over all its
    steps and ranks (Edit-GRPO: `samples/trained`, `reward/<term>/invalid`), kept in its checkpoints across resumes."""

    run_dir: Path
    step: int
    totals: dict[str, float] = field(default_factory=dict)


class Harness:
    """A run built from its recipe: policy, backend, data, cursor; resumed, saved and fitted one way for every loop.

    A subclass names its phase and implements `train_step() -> metrics` and, with an eval split, `evaluate()`.
    """

    label: ClassVar[str]  # the phase's name on the console
    phase: ClassVar[str]  # its key in the job's list of phases
    headline: ClassVar[dict[str, str] | None] = None  # the numbers its periodic lines show (None: RunLogger's)
    eval_phase: ClassVar[str | None] = None  # held-out evaluations announced as a phase of their own, with a progress row

    def __init__(
        self, recipe: Recipe, resume: bool = False, overwrite: bool = False, backend: Any = None,
        accept_changes: bool = False,
    ) -> None:
        self.recipe = recipe
        self.backend = backend or make_backend(recipe)
        self.run_dir = recipe.output_dir
        self.lock = start_process(recipe, self.backend, resume, overwrite)
        try:
            self._build(resume, accept_changes)
            self.logger = RunLogger(
                self.run_dir, enabled=self.backend.is_main, start_step=self.step, log_every=recipe.train.log_every,
                label=self.label, total=recipe.train.steps, headline=self.headline, recipe=recipe.model_dump(mode="json"),
            )
        except BaseException:
            self.release()
            raise

    def _build(self, resume: bool, accept_changes: bool) -> None:
        recipe = self.recipe
        torch.manual_seed(self.seed())
        self.resume_from = resume_point(recipe, accept_changes, self.backend.is_main) if resume else None
        self.device = torch.device(recipe.run.device)
        init = recipe.policy.init_from
        if init is not None and not Path(init).exists():
            raise TrainingError(f"policy.init_from: {init} does not exist; its warm start (policy.warm_start) is made by "
                                "`editrl train` (editrl.job.run) before this run starts")
        self.policy = policy_from_recipe(recipe)
        self.check_policy()
        self.backend.prepare(self.policy)
        self.ema = self._make_ema()
        self.train_data: EditDataset = build_dataset(recipe.data.train.kind, recipe.plugin_options("data.train", recipe.data.train.options))
        self.eval_data: EditDataset | None = (
            build_dataset(recipe.data.eval.kind, recipe.plugin_options("data.eval", recipe.data.eval.options))
            if recipe.data.eval else None
        )
        self.cursor = DataCursor(len(self.train_data), recipe.run.seed, recipe.data.shuffle)
        self.loader = Prefetcher(self.train_data)
        self.step = 0
        self.totals: dict[str, float] = {}  # counts summed over the run's steps and ranks (RunResult.totals)
        self.sentinel = Sentinel(recipe.train.sentinel) if recipe.train.sentinel else None
        self.stopping = False  # set by the sentinel's alarm when train.sentinel.stop
        self.build()  # before resuming: whatever it draws from torch's RNG, an uninterrupted run drew too
        if self.resume_from is not None:
            self._resume(self.resume_from)
        elif self.backend.is_main:  # the run starts writing only now that all of it is built
            clear_outputs(self.run_dir)
            dump_recipe(recipe, self.run_dir / "recipe.yaml")

    # ------------------------------------------------------------------ what a loop adds

    def seed(self) -> int:
        """torch's global seed for this process."""
        return derive_seed(self.recipe.run.seed, self.backend.rank)

    def check_policy(self) -> None:
        """Refuses a policy the loop cannot train (one line)."""

    def counted(self, metrics: dict[str, float]) -> list[str]:
        """The step's metrics that are counts, summed into `totals` (what a run returns for its summary)."""
        return []

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

    def release(self) -> None:
        """Lets another process write in the run directory (the end of `fit`, or a run that failed to build)."""
        if self.lock is not None:
            self.lock.release()

    def finish(self) -> None:
        """Runs after the last step (a before/after table)."""

    # ------------------------------------------------------------------ resume / save / fit

    def _make_ema(self) -> Any:
        if not self.recipe.optim.ema.enabled:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(self.policy.trainable_parameters(), decay=self.recipe.optim.ema.decay)

    def _resume(self, ckpt: Path) -> None:
        state, info = load_training_state(ckpt)
        with self.backend.gathered(self.policy):
            self.policy.load_trainable(ckpt)
        self.backend.load_state_dict(state["backend"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        if self.sentinel is not None and "sentinel" in state:
            self.sentinel.state = state["sentinel"]
        self.step = int(info["step"])
        self.cursor.position = int(info["cursor"])
        self.totals = dict(info.get("totals", {}))

    def save(self) -> Path | None:
        self.backend.save_shards(f"step_{self.step:06d}")  # collective, before `latest` can name this step
        with self.backend.gathered(self.policy):
            if not self.backend.is_main:
                return None
            state = {"backend": self.backend.state_dict()}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            if self.sentinel is not None:
                state["sentinel"] = self.sentinel.state
            return save_checkpoint(
                self.run_dir, self.step, self.recipe, self.policy, state,
                {"cursor": self.cursor.position, "totals": self.totals},
                keep=self.recipe.train.keep_checkpoints,
            )

    def fit(self) -> RunResult:
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
            try:
                self._loop(evals)
            except OSError as e:
                if not disk_full(e):
                    raise
                raise TrainingError(f"the disk is full writing to {self.run_dir} ({e.strerror}): the checkpoints saved "
                                    "before are intact; free some space, then continue with --resume") from None
            finally:
                self.close()
                self.loader.close()
                self.logger.close()
            self.finish()
        finally:
            self.release()
        return RunResult(self.run_dir, self.step, dict(self.totals))

    def _loop(self, evals: list[int]) -> None:
        t, main = self.recipe.train, self.backend.is_main
        with progress(self.label, t.steps, self.step, enabled=main and t.progress) as bar:
            held_out = bar.add("held-out evaluation", len(evals)) if evals and self.eval_phase else None
            if 0 in evals:
                self.logger.log(0, self._evaluate(held_out))
            while self.step < t.steps and not self.stopping:
                metrics = self.train_step()
                for key in self.counted(metrics):  # rank means: times the ranks, a total
                    self.totals[key] = self.totals.get(key, 0.0) + metrics[key] * self.backend.world_size
                if self.sentinel is not None:
                    self.sentinel.record(metrics)
                if self.step in evals:
                    metrics.update(self._evaluate(held_out))
                self.logger.log(self.step, metrics)
                self.after_step(metrics)
                if self.step % t.save_every == 0 or self.step == t.steps or self.stopping:
                    self.save()
                bar.update(self.step, self.progress_note(metrics))

    def _evaluate(self, row: Bar | None) -> dict[str, float]:
        out = self.backend.mean(self.evaluate())  # identical on every rank, so is what the sentinel decides
        if row is not None:
            row.update(advance=1, note=f"total {out.get('eval/total', float('nan')):.3f}")
        if self.sentinel is not None:
            out.update(self._watch(out))
        return out

    def _watch(self, held_out: dict[str, float]) -> dict[str, float]:
        """The sentinel's verdict on an evaluation, acted on: alarms shown and logged, best weights kept, a stop."""
        assert self.sentinel is not None
        verdict, cfg = self.sentinel.observe(self.step, held_out), self.sentinel.cfg
        if verdict.new_best:
            with self.backend.gathered(self.policy), self.scored_weights():
                if self.backend.is_main:
                    info = {"metric": cfg.best, "value": held_out[f"eval/{cfg.best}"]}
                    save_best(self.run_dir, self.step, self.recipe, self.policy, info)
        self.stopping = verdict.stop
        lines = verdict.alarms + ([f"train.sentinel.stop: ending the run at step {self.step}"] if verdict.stop else [])
        if lines and self.backend.is_main:
            with (self.run_dir / "sentinel.log").open("a") as log:
                log.write("".join(line + "\n" for line in lines))
            for line in lines:
                console.print(f"sentinel: {line}", style="bold yellow", highlight=False, markup=False)
        return verdict.metrics

    @contextmanager
    def scored_weights(self) -> Iterator[None]:
        """Inside, the trainable weights are the ones evaluations score: the EMA's when optim.ema is on."""
        if self.ema is None:
            yield
            return
        params = self.policy.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)
