"""The GRPO loop: rollout -> score (async) -> advantages -> optimise -> log -> checkpoint.

The trainer knows flows, groups, rewards and ranks; it reaches the model only through the policy
protocol and the rewards only through `RewardSet`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import math
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from editrl import grpo, sde
from editrl.base import TrainingError
from editrl.checkpoint import find_checkpoint
from editrl.config import Layout, Recipe, derive_layout
from editrl.evaluate import ORACLE_COLUMNS
from editrl.harness import Harness, Timer, derive_seed
from editrl.monitor import skipped
from editrl.reward import RewardSet, build_reward, reward_batch
from editrl.rollout import edit_videos, plan_steps, rollout
from editrl.types import Condition, EditSample, RewardOutput, Trajectory


@dataclass
class Rollouts:
    """One step's rollouts on this rank: samples, their shared conditions and trajectories, and rewards."""

    samples: list[EditSample]
    group_ids: Tensor
    cond: Condition
    traj: Trajectory
    edited: Tensor
    rewards: dict[str, RewardOutput] = field(default_factory=dict)


class Trainer(Harness):
    """Edit-GRPO: groups of rollouts scored by the recipe's rewards, group-relative advantages, a clipped update."""

    label, phase, eval_phase = "Edit-GRPO", "grpo", "eval"

    def make_init(self, resume: bool) -> None:
        if self.recipe.policy.warm_start and not resume:
            if self.backend.is_main:  # one process builds it; the other ranks wait, then load it
                warm_start(self.recipe)
            self.backend.barrier()

    def build(self) -> None:
        recipe = self.recipe
        self.layout: Layout = derive_layout(recipe, self.backend.world_size)
        self.rewards = RewardSet([(t.key, t.weight, build_reward(t.name, t.options)) for t in recipe.rewards.terms])
        self.sigmas = sde.sigma_schedule(recipe.sampling.steps, recipe.sampling.shift)
        self._last_rollouts: Rollouts | None = None
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")

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
            # On the policy's device, so the noise never crosses from the host (CPU and CUDA draw different streams).
            gen = torch.Generator(self.device).manual_seed(
                derive_seed(r.run.seed, self.step, 2, self.backend.rank * self.layout.groups_per_rank + c)
            )
            with timer("rollout"):
                traj = rollout(
                    self.policy, cond, self.sigmas, sde_steps=sde_steps, trained_steps=trained,
                    kind=s.sde, noise_level=s.noise_level, generator=gen,
                )
            with timer("decode"), torch.no_grad():
                pixels = self.policy.decode(traj.final).float()
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
        total, ok = grpo.aggregate_rewards(scores, valid, self.rewards.weights, ro.group_ids, rc.aggregation)
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
        grad_norms: list[float] = []
        # Statistics stay on the device until the update is done: reading one back would stall every micro-step.
        stats: dict[str, list[Tensor]] = defaultdict(list)
        ratio_by_step: dict[int, list[Tensor]] = defaultdict(list)
        for m in self.policy.modules_for_training():
            m.train()
        with timer("train"):
            for u in range(0, len(micro), per_update):
                update = micro[u : u + per_update]
                n_real = sum(min(max(n - u, 0), per_update) for n in real)  # real micro-batches, all ranks
                n_back = n_real * len(ro.traj.steps) / self.backend.world_size
                for mb_idx, weight in update:
                    cond, traj = ro.cond.index(mb_idx), ro.traj.index(mb_idx)
                    a = adv[mb_idx].to(self.device)
                    for k, step_i in enumerate(ro.traj.steps):
                        loss, out, extra = self._step_loss(traj, k, cond, a, loss_fn)
                        self.backend.backward(loss * weight / n_back)
                        if not weight:
                            continue
                        stats["loss"].append(loss.detach())
                        stats["clip_frac"].append(out.clipped.float().mean())
                        stats["approx_kl"].append(out.approx_kl)
                        ratio_by_step[step_i].append(out.ratio)
                        for key, value in extra.items():
                            stats[key].append(value)
                grad_norms.append(self.backend.step())
                if self.ema is not None:
                    self.ema.step(self.policy.trainable_parameters())
        for m in self.policy.modules_for_training():
            m.eval()
        names, values = [f"train/{k}" for k in stats], [torch.stack(v).float().mean() for v in stats.values()]
        for step_i, ratios in sorted(ratio_by_step.items()):
            ratio = torch.cat(ratios).float()
            names += [f"ratio/t{step_i:02d}/mean", f"ratio/t{step_i:02d}/std"]
            values += [ratio.mean(), ratio.std(unbiased=False)]
        host = torch.stack(values).tolist() if values else []  # one read-back for the whole update
        metrics.update(zip(names, host))
        metrics["train/grad_norm"] = sum(grad_norms) / len(grad_norms)

    def _step_loss(
        self, traj: Trajectory, k: int, cond: Condition, adv: Tensor, loss_fn: Any
    ) -> tuple[Tensor, Any, dict[str, Tensor]]:
        """Loss of trained step `k` for a micro-batch's trajectory; the KL's reference forward only when beta > 0."""
        s, g = self.recipe.sampling, self.recipe.grpo
        x = traj.latents[:, k]
        sigma, sigma_next = float(traj.sigmas[k]), float(traj.sigmas_next[k])
        sigma_vec = torch.full((x.shape[0],), sigma, device=x.device)
        v = self.backend.forward(self.policy.velocity, x, sigma_vec, cond)
        out = sde.step(s.sde, x, v, sigma, sigma_next, noise_level=s.noise_level, prev_sample=traj.next_latents[:, k])
        pg = loss_fn(out.log_prob, traj.log_probs[:, k], adv, g.clip_range)
        extra = {**pg.extra, "pg_loss": pg.loss.detach()}
        loss = pg.loss
        if g.beta > 0:
            with torch.no_grad(), self.policy.reference():
                v_ref = self.backend.forward(self.policy.velocity, x, sigma_vec, cond)
            ref = sde.step(s.sde, x, v_ref, sigma, sigma_next, noise_level=s.noise_level, prev_sample=out.prev_sample)
            kl = grpo.kl_to_reference(out.mean, ref.mean, out.std).mean()
            loss = loss + g.beta * kl
            extra["kl"] = kl.detach()
        return loss, pg, extra

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict[str, float]:
        timer = Timer(self.device)
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
        """The held-out benchmark (`editrl.evaluate`, as `editrl eval` runs it) on the eval split with deterministic
        (ODE) edits: the recipe's rewards (`eval/<term>`) and, where the split has ground truth, the oracle metrics
        (`eval/oracle/*`: PSNR and SSIM of fidelity and preservation, temporal, smoothness), numbers that include
        metrics the policy was not trained on; `eval/total` is the recipe's weighted reward."""
        from editrl.evaluate import evaluate as benchmark

        assert self.eval_data is not None
        s, bs = self.recipe.sampling, self.layout.micro_batch_size
        seeds = itertools.count(self.recipe.run.seed, bs)  # each batch's seed: the run's seed + its first index

        def edit_fn(chunk: list[EditSample]) -> Tensor:
            return edit_videos(self.policy, chunk, s.eval_steps or s.steps, s.shift, next(seeds)).float()

        ema_ctx = self._ema_weights() if self.ema is not None else contextlib.nullcontext()
        with ema_ctx, self.backend.inference(self.policy):
            overall = benchmark(edit_fn, self.eval_data, self.rewards, batch_size=bs, progress=False).overall()
        out = {f"eval/{name}": overall[f"reward_{name}"] for name in self.rewards.names}
        out |= {f"eval/oracle/{col}": overall[col] for col in ORACLE_COLUMNS if not math.isnan(overall[col])}
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

    def after_step(self, metrics: dict[str, float]) -> None:
        t = self.recipe.train
        if t.sample_every and self.step % t.sample_every == 0 and self._last_rollouts is not None:
            self.logger.save_samples(self.step, self._last_rollouts.samples, self._last_rollouts.edited.cpu())

    def progress_note(self, metrics: dict[str, float]) -> str:
        return f"reward {metrics.get('reward/weighted/mean', float('nan')):.3f}"

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def finish(self) -> None:
        if self.eval_data is not None and self.recipe.train.eval_every is not None and self.backend.is_main:
            from editrl.monitor import console
            from editrl.summary import print_eval_before_after

            print_eval_before_after(self.run_dir, console)


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

    from editrl.data.synth import prepare_synthetic
    from editrl.distributed import LocalBackend
    from editrl.sft import SftTrainer
    from editrl.preflight import load_sft_recipe

    pc = recipe.policy
    out = Path(pc.init_from)  # type: ignore[arg-type]
    sft = load_sft_recipe(pc.warm_start, [*pc.warm_start_overrides, f"run.output_dir={out}"])  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        try:
            done = json.loads((find_checkpoint(out) / "state.json").read_text())["step"] >= sft.train.steps
        except FileNotFoundError:
            done = False
        prepare_synthetic(recipe, *([] if done else [sft]))  # the job's data in one phase, before the SFT phase
        if done:
            skipped("sft", f"{out} holds a finished warm start ({sft.train.steps} steps)")
        else:
            resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*"))
            SftTrainer(sft, resume=resume, backend=LocalBackend(sft.optim)).fit()
    return out


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Run a recipe to its last step (or continue it with `resume`); returns the run directory."""
    return Trainer(recipe, resume=resume, overwrite=overwrite).fit()
