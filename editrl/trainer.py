"""The GRPO loop: rollout -> score (async) -> advantages -> optimise -> log -> checkpoint.

The trainer knows flows, groups, rewards and ranks; it reaches the model only through the policy
protocol and the rewards only through `RewardSet`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from editrl import grpo, sde
from editrl.checkpoint import find_checkpoint, load_training_state, save_checkpoint
from editrl.config import Layout, Recipe, derive_layout, dump_recipe
from editrl.data.base import EditDataset, build_dataset
from editrl.distributed import make_backend
from editrl.monitor import RunLogger
from editrl.policy import build_policy
from editrl.reward import RewardSet, build_reward
from editrl.rollout import edit_videos, plan_steps, rollout
from editrl.types import Condition, EditSample, RewardBatch, RewardOutput, Trajectory


class TrainingError(RuntimeError):
    """A run that must stop, with a message meant for the user (e.g. a judge that keeps failing)."""


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
    """Wall time per phase, accumulated over a step."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0


@dataclass
class Rollouts:
    """One step's rollouts on this rank: samples, their shared conditions and trajectories, and rewards."""

    samples: list[EditSample]
    group_ids: Tensor
    cond: Condition
    traj: Trajectory
    edited: Tensor
    rewards: dict[str, RewardOutput] = field(default_factory=dict)


def reward_batch(samples: list[EditSample], edited: Tensor, needs: set[str]) -> RewardBatch:
    """Only what the rewards declared they need (a judge that reads no target never gets one)."""

    def stack(attr: str) -> Tensor | None:
        values = [getattr(s, attr) for s in samples]
        return torch.stack(values) if all(v is not None for v in values) else None

    return RewardBatch(
        instructions=[s.instruction for s in samples],
        edited=edited if "edited" in needs else None,
        sources=stack("source") if "source" in needs else None,
        targets=stack("target") if "target" in needs else None,
        references=[s.reference for s in samples] if "reference" in needs else None,
        masks=[s.mask for s in samples] if "mask" in needs else None,
        categories=[s.category for s in samples],
        ids=[s.id for s in samples],
    )


class Trainer:
    def __init__(self, recipe: Recipe, resume: bool = False, overwrite: bool = False) -> None:
        self.recipe = recipe
        self.backend = make_backend(recipe)
        self.layout: Layout = derive_layout(recipe, self.backend.world_size)
        self.run_dir = recipe.output_dir
        if not resume and not overwrite and any((self.run_dir / "checkpoints").glob("step_*")):
            raise TrainingError(
                f"{self.run_dir} already holds checkpoints: continue it with --resume, start over with --overwrite, "
                "or choose another run.name / run.output_dir"
            )
        if overwrite and self.backend.is_main:
            shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        if recipe.run.threads:
            torch.set_num_threads(recipe.run.threads)
        torch.manual_seed(derive_seed(recipe.run.seed, self.backend.rank))
        self.device = torch.device(recipe.run.device)
        self.policy = build_policy(
            recipe.policy.name, recipe.policy.options, device=self.device, dtype=getattr(torch, recipe.run.dtype)
        )
        if recipe.optim.lora is not None:
            self.policy.add_lora(recipe.optim.lora)
        if recipe.policy.init_from:
            if recipe.policy.warm_start and not resume:
                if self.backend.is_main:  # one process builds it; the other ranks wait, then load it
                    warm_start(recipe)
                self.backend.barrier()
            self.policy.load_trainable(find_checkpoint(recipe.policy.init_from))
        self.backend.prepare(self.policy)
        self.ema = self._make_ema()
        self.train_data: EditDataset = build_dataset(recipe.data.train.kind, recipe.data.train.options)
        self.eval_data: EditDataset | None = (
            build_dataset(recipe.data.eval.kind, recipe.data.eval.options) if recipe.data.eval else None
        )
        self.rewards = RewardSet(
            [(t.key, t.weight, build_reward(t.name, t.options)) for t in recipe.rewards.terms]
        )
        self.sigmas = sde.sigma_schedule(recipe.sampling.steps, recipe.sampling.shift)
        self.cursor = DataCursor(len(self.train_data), recipe.run.seed, recipe.data.shuffle)
        self.step = 0
        self._last_rollouts: Rollouts | None = None
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")
        if resume:
            self._resume()
        elif self.backend.is_main:
            dump_recipe(recipe, self.run_dir / "recipe.yaml")
        self.logger = RunLogger(
            self.run_dir, enabled=self.backend.is_main, start_step=self.step, log_every=recipe.train.log_every
        )

    def _make_ema(self) -> Any:
        if not self.recipe.optim.ema.enabled:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(self.policy.trainable_parameters(), decay=self.recipe.optim.ema.decay)

    # ------------------------------------------------------------------ resume / save

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
                self.run_dir,
                self.step,
                self.recipe,
                self.policy,
                state,
                {"cursor": self.cursor.position},
                keep=self.recipe.train.keep_checkpoints,
            )

    # ------------------------------------------------------------------ rollout

    def _requests(self) -> list[EditSample]:
        """This rank's requests for the step: the global batch is drawn identically on all ranks, then split."""
        lay = self.layout
        idx = self.cursor.take(lay.groups_per_step)
        mine = idx[self.backend.rank * lay.groups_per_rank : (self.backend.rank + 1) * lay.groups_per_rank]
        return [self.train_data[i] for i in mine]

    def collect(self, timer: Timer) -> tuple[Rollouts, list[int]]:
        """Roll out every group of this rank, scoring finished chunks while the next chunk samples."""
        r, s, g = self.recipe, self.recipe.sampling, self.recipe.grpo
        plan_gen = torch.Generator().manual_seed(derive_seed(r.run.seed, self.step, 1))
        sde_steps, trained = plan_steps(s.steps, s.window, g.trained_steps, self.step, plan_gen)
        requests = self._requests()
        per_chunk = max(1, self.layout.micro_batch_size // g.group_size)
        conds, trajs, edited, futures = [], [], [], []
        needs = self.rewards.needs
        for c in range(0, len(requests), per_chunk):
            chunk = requests[c : c + per_chunk]
            with timer("encode"):
                if g.share_encode:
                    cond = self.policy.encode(chunk).repeat_interleave(g.group_size)
                else:
                    cond = self.policy.encode([smp for smp in chunk for _ in range(g.group_size)])
            # Seeded by the chunk's global group index: the same groups get the same noise on any number of ranks.
            gen = torch.Generator().manual_seed(derive_seed(r.run.seed, self.step, 2, self.backend.rank * self.layout.groups_per_rank + c))
            with timer("rollout"):
                traj = rollout(
                    self.policy, cond, self.sigmas, sde_steps=sde_steps, trained_steps=trained,
                    kind=s.sde, noise_level=s.noise_level, generator=gen,
                )
            with timer("decode"), torch.no_grad():
                pixels = self.policy.decode(traj.final).float().cpu()
            members = [smp for smp in chunk for _ in range(g.group_size)]
            batch = reward_batch(members, pixels, needs)
            if g.async_rewards:
                futures.append(self.pool.submit(self.rewards.score, batch))
            else:
                with timer("reward"):
                    futures.append(_done(self.rewards.score(batch)))
            conds.append(cond)
            trajs.append(traj)
            edited.append(pixels)
        with timer("reward"):
            outs = [f.result() for f in futures]
        rewards = {
            name: RewardOutput(
                torch.cat([o[name].scores for o in outs]),
                torch.cat([o[name].valid for o in outs]),
                {k: [v for o in outs for v in o[name].extras.get(k, [])] for k in outs[0][name].extras},
            )
            for name in self.rewards.names
        }
        samples = [smp for smp in requests for _ in range(g.group_size)]
        group_ids = torch.arange(len(requests)).repeat_interleave(g.group_size)
        ro = Rollouts(samples, group_ids, Condition.cat(conds), Trajectory.cat(trajs), torch.cat(edited), rewards)
        return ro, trained

    # ------------------------------------------------------------------ optimisation

    def advantages(self, ro: Rollouts, metrics: dict[str, float]) -> tuple[Tensor, Tensor]:
        """(advantages, which samples to train) with invalid samples excluded and tied groups skipped."""
        rc, g = self.recipe.rewards, self.recipe.grpo
        for name, out in ro.rewards.items():
            n_bad = int((~out.valid).sum())
            valid_scores = out.scores[out.valid]
            metrics[f"reward/{name}/mean"] = float(valid_scores.mean()) if valid_scores.numel() else float("nan")
            metrics[f"reward/{name}/std"] = float(valid_scores.std(unbiased=False)) if valid_scores.numel() else float("nan")
            metrics[f"reward/{name}/invalid"] = float(n_bad)
            if n_bad and rc.on_failure == "fail":
                reasons = sorted({str(e) for e in out.extras.get("error", []) if e})
                raise TrainingError(
                    f"reward {name!r}: {n_bad} of {len(out.valid)} samples have no valid score at step {self.step + 1}"
                    + (f" ({'; '.join(reasons[:3])})" if reasons else "")
                    + "; stopping because rewards.on_failure=fail (use 'skip' to exclude them and continue)"
                )
        scores = {n: o.scores for n, o in ro.rewards.items()}
        valid = {n: o.valid for n, o in ro.rewards.items()}
        total, ok = grpo.aggregate_rewards(scores, valid, self.recipe.rewards.weights(), ro.group_ids, rc.aggregation)
        # Over the global batch (rewards all-gathered in rank order), so `scale: batch` sees every rank's groups.
        n, offset = len(total), self.backend.rank * self.layout.groups_per_rank
        gids, all_ok = self.backend.all_gather(ro.group_ids + offset), self.backend.all_gather(ok.float()).bool()
        adv = grpo.group_advantages(self.backend.all_gather(total.float()), all_ok, gids, scale=g.scale, adv_clip=g.adv_clip)
        adv = adv[self.backend.rank * n : (self.backend.rank + 1) * n]
        tied = grpo.tied_groups(total, ok, ro.group_ids)
        train_mask = ok & ~tied if g.skip_tied_groups else ok
        metrics["reward/total/mean"] = float(total[ok].mean()) if bool(ok.any()) else float("nan")
        metrics["reward/total/std"] = float(total[ok].std(unbiased=False)) if bool(ok.any()) else float("nan")
        metrics["adv/mean"] = float(adv.mean())
        metrics["adv/std"] = float(adv.std(unbiased=False))
        metrics["adv/abs_max"] = float(adv.abs().max())
        metrics["groups/zero_std_frac"] = float(tied.view(-1, g.group_size)[:, 0].float().mean())
        metrics["samples/trained"] = float(train_mask.sum())
        return adv, train_mask

    def optimise(self, ro: Rollouts, adv: Tensor, train_mask: Tensor, timer: Timer, metrics: dict[str, float]) -> None:
        r, g = self.recipe, self.recipe.grpo
        lay = self.layout
        idx = torch.nonzero(train_mask).flatten()
        mb = lay.micro_batch_size
        # ZeRO's collectives pair up across ranks: every rank runs as many micro-batches as the busiest one (the
        # extra ones at zero weight), and the loss is scaled so that the rank-averaged gradient is the global mean.
        real = [-(-int(n) // mb) for n in self.backend.all_gather(torch.tensor([idx.numel()]))]
        if max(real) == 0:
            metrics["train/skipped"] = 1.0
            return
        order_gen = torch.Generator().manual_seed(derive_seed(r.run.seed, self.step, 3, self.backend.rank))
        idx = idx[torch.randperm(idx.numel(), generator=order_gen)]
        micro = [(idx[i : i + mb], 1.0) for i in range(0, idx.numel(), mb)]
        micro += [(torch.arange(mb), 0.0)] * (max(real) - len(micro))
        per_update = max(1, -(-len(micro) // g.minibatches))
        loss_fn = grpo.LOSSES.get(g.loss)
        stats: dict[str, list[float]] = defaultdict(list)
        ratio_by_step: dict[int, list[Tensor]] = defaultdict(list)
        for m in self.policy.modules_for_training():
            m.train()
        with timer("train"):
            for u in range(0, len(micro), per_update):
                update = micro[u : u + per_update]
                n_real = sum(min(max(n - u, 0), per_update) for n in real)  # real micro-batches, all ranks
                n_back = n_real * len(ro.traj.steps) / self.backend.world_size
                for mb_idx, weight in update:
                    cond = ro.cond.index(mb_idx)
                    a = adv[mb_idx]
                    for k, step_i in enumerate(ro.traj.steps):
                        loss, out = self._step_loss(ro.traj, mb_idx, k, cond, a, loss_fn)
                        self.backend.backward(loss * weight / n_back)
                        if not weight:
                            continue
                        stats["loss"].append(float(loss.detach()))
                        stats["clip_frac"].append(float(out.clipped.float().mean()))
                        stats["approx_kl"].append(float(out.approx_kl))
                        ratio_by_step[step_i].append(out.ratio)
                        for key in ("kl", "pg_loss"):
                            if key in out.extra:
                                stats[key].append(out.extra[key])
                stats["grad_norm"].append(self.backend.step())
                if self.ema is not None:
                    self.ema.step(self.policy.trainable_parameters())
        for m in self.policy.modules_for_training():
            m.eval()
        for key, values in stats.items():
            metrics[f"train/{key}"] = sum(values) / len(values)
        for step_i, ratios in sorted(ratio_by_step.items()):
            ratio = torch.cat(ratios)
            metrics[f"ratio/t{step_i:02d}/mean"] = float(ratio.mean())
            metrics[f"ratio/t{step_i:02d}/std"] = float(ratio.std(unbiased=False))

    def _step_loss(self, traj: Trajectory, mb_idx: Tensor, k: int, cond: Condition, adv: Tensor, loss_fn: Any) -> tuple[Tensor, Any]:
        s, g = self.recipe.sampling, self.recipe.grpo
        x = traj.latents[mb_idx, k].to(self.device)
        sigma = float(traj.sigmas[k])
        sigma_next = float(traj.sigmas_next[k])
        sigma_vec = torch.full((x.shape[0],), sigma, device=self.device)
        v = self.backend.forward(self.policy.velocity, x, sigma_vec, cond)
        out = sde.step(s.sde, x, v, sigma, sigma_next, noise_level=s.noise_level, prev_sample=traj.next_latents[mb_idx, k])
        pg = loss_fn(out.log_prob, traj.log_probs[mb_idx, k].to(self.device), adv.to(self.device), g.clip_range)
        pg.extra = {"pg_loss": float(pg.loss.detach())}
        loss = pg.loss
        if g.beta > 0:
            with torch.no_grad(), self.policy.reference():
                v_ref = self.backend.forward(self.policy.velocity, x, sigma_vec, cond)
            ref = sde.step(s.sde, x, v_ref, sigma, sigma_next, noise_level=s.noise_level, prev_sample=out.prev_sample)
            kl = grpo.kl_to_reference(out.mean, ref.mean, out.std).mean()
            loss = loss + g.beta * kl
            pg.extra["kl"] = float(kl.detach())
        return loss, pg

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict[str, float]:
        timer = Timer()
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        with self.backend.inference(self.policy):
            ro, trained = self.collect(timer)
        adv, mask = self.advantages(ro, metrics)
        self.optimise(ro, adv, mask, timer, metrics)
        if "train/skipped" not in metrics:
            self.backend.schedule_step()
        self.step += 1
        metrics["lr"] = self.backend.lr
        metrics["sde/trained_steps"] = float(len(trained))
        for name, seconds in timer.totals.items():
            metrics[f"time/{name}"] = seconds
        metrics["time/step"] = time.perf_counter() - t0
        self._last_rollouts = ro
        out = self.backend.mean(metrics)
        # The recipe's weighted reward in its own units (eval/total's training twin), from the rank-reduced term means:
        # under normalize_then_sum the aggregated total is centred in every group, so it cannot show progress.
        out["reward/weighted/mean"] = sum(w * out[f"reward/{n}/mean"] for n, w in self.rewards.weights.items())
        return out

    def evaluate(self) -> dict[str, float]:
        """Deterministic (ODE) edits of the eval split, scored by the recipe's rewards and, where the split has
        ground truth, by the benchmark's oracle metrics (`eval/oracle/*`: PSNR and SSIM of fidelity and
        preservation, temporal) — held-out numbers that include metrics the policy was not trained on."""
        from editrl.evaluate import oracle_scores

        assert self.eval_data is not None
        s = self.recipe.sampling
        samples = [self.eval_data[i] for i in range(len(self.eval_data))]
        scores: dict[str, list[Tensor]] = defaultdict(list)
        bs = self.layout.micro_batch_size
        ema_ctx = self._ema_weights() if self.ema is not None else contextlib.nullcontext()
        with ema_ctx, self.backend.inference(self.policy):
            for i in range(0, len(samples), bs):
                chunk = samples[i : i + bs]
                edited = edit_videos(self.policy, chunk, s.eval_steps or s.steps, s.shift, self.recipe.run.seed + i).float().cpu()
                for name, out in self.rewards.score(reward_batch(chunk, edited, self.rewards.needs)).items():
                    scores[name].append(out.scores[out.valid])
                for name, values in oracle_scores(edited, chunk).items():
                    if bool(values.isfinite().any()):
                        scores[f"oracle/{name}"].append(values[values.isfinite()])
        out = {f"eval/{name}": float(torch.cat(v).mean()) for name, v in scores.items()}
        # The recipe's weighted reward on held-out edits (time-to-target benchmarks compare schedules on it).
        out["eval/total"] = sum(w * out[f"eval/{name}"] for name, w in self.rewards.weights.items())
        return out

    @contextmanager
    def _ema_weights(self) -> Iterator[None]:
        params = self.policy.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def fit(self) -> Path:
        t = self.recipe.train
        evaluating = self.eval_data is not None and t.eval_every is not None
        try:
            if evaluating and self.step == 0:
                self.logger.log(0, self.evaluate())
            with self.logger.progress(t.steps, self.step) as progress:
                while self.step < t.steps:
                    metrics = self.train_step()
                    if evaluating and (self.step % t.eval_every == 0 or self.step == t.steps):
                        metrics.update(self.evaluate())
                    self.logger.log(self.step, metrics)
                    if t.sample_every and self.step % t.sample_every == 0 and self._last_rollouts is not None:
                        self.logger.save_samples(self.step, self._last_rollouts.samples, self._last_rollouts.edited)
                    if self.step % t.save_every == 0 or self.step == t.steps:
                        self.save()
                    progress(self.step, metrics)
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.logger.close()
        if evaluating and self.backend.is_main:
            from editrl.monitor import console
            from editrl.summary import print_eval_before_after

            print_eval_before_after(self.run_dir, console)
        return self.run_dir


def _done(value: Any) -> cf.Future:
    f: cf.Future = cf.Future()
    f.set_result(value)
    return f


def warm_start(recipe: Recipe) -> Path:
    """Make `policy.init_from` with the `policy.warm_start` SFT recipe, unless a finished one is there.

    Several runs (a sweep's variants and seeds) share one warm start: a file lock lets the first build it,
    and an interrupted warm start resumes from its own checkpoint. It always runs as a single process.
    """
    from filelock import FileLock

    from editrl.distributed import LocalBackend
    from editrl.sft import SftTrainer, load_sft_recipe

    pc = recipe.policy
    out = Path(pc.init_from)  # type: ignore[arg-type]
    sft = load_sft_recipe(pc.warm_start, [*pc.warm_start_overrides, f"run.output_dir={out}"])  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        try:
            done = json.loads((find_checkpoint(out) / "state.json").read_text())["step"] >= sft.train.steps
        except FileNotFoundError:
            done = False
        if not done:
            resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*"))
            SftTrainer(sft, resume=resume, backend=LocalBackend(sft.optim)).fit()
    return out


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Run a recipe to its last step (or continue it with `resume`); returns the run directory."""
    return Trainer(recipe, resume=resume, overwrite=overwrite).fit()
