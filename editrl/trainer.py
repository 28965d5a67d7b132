"""The GRPO loop: rollout -> score (async) -> advantages -> optimise -> log -> checkpoint.

The trainer knows flows, groups, rewards and ranks; it reaches the model only through the policy
protocol and the rewards only through `RewardSet`.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from editrl import grpo, sde
from editrl.objectives import TrainedStep, build_objective
from editrl.base import TrainingError
from editrl.config import Layout, Recipe
from editrl.evaluate import ORACLE_COLUMNS, YARDSTICKS, EvalReport, ode_editor, recipe_rewards, save_grid
from editrl.policy import train_mode
from editrl.harness import Harness, Timer, derive_seed
from editrl.monitor import console
from editrl.reward import RewardSet, reward_batch
from editrl.rollout import plan_steps, rollout
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

    @staticmethod
    def regroup(parts: list[Rollouts], order: Tensor, group_size: int) -> Rollouts:
        """The samples at `order` (whole groups) of the parts laid end to end, numbered into groups anew."""
        picks = order.tolist()
        samples = [smp for p in parts for smp in p.samples]
        rewards = {
            name: RewardOutput(
                o.scores[order], o.valid[order],
                {k: [v[i] for i in picks] for k, v in o.extras.items() if len(v) == len(samples)},
            )
            for name, o in _cat_rewards([p.rewards for p in parts]).items()
        }
        return Rollouts(
            [samples[i] for i in picks], torch.arange(len(picks) // group_size).repeat_interleave(group_size),
            Condition.cat([p.cond for p in parts]).index(order), Trajectory.cat([p.traj for p in parts]).index(order),
            torch.cat([p.edited for p in parts])[order], rewards,
        )


class Trainer(Harness):
    """Edit-GRPO: groups of rollouts scored by the recipe's rewards, group-relative advantages, a clipped update."""

    label, phase, eval_phase = "Edit-GRPO", "grpo", "eval"

    def build(self) -> None:
        recipe = self.recipe
        self.layout: Layout = recipe.layout
        if self.layout.world_size != self.backend.world_size:
            raise TrainingError(f"the recipe was laid out for {self.layout.world_size} rank(s), the backend has "
                                f"{self.backend.world_size}: read the recipe in the process that trains it")
        self.rewards: RewardSet = recipe_rewards(recipe)
        self.sigmas = sde.sigma_schedule(recipe.sampling.steps, recipe.sampling.shift)
        self.objective = build_objective(recipe)
        self._last_rollouts: Rollouts | None = None
        self.warned: set[str] = set()  # rewards whose invalid scores were reported
        self.yardsticks: dict[str, EvalReport] | None = None  # the eval split's copy and ceiling, scored once
        self.eval_picks: list[tuple[int, list[tuple[EditSample, Tensor]]]] = []  # (step, edits): first, latest eval
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")

    # ------------------------------------------------------------------ rollout

    def _requests(self) -> list[EditSample]:
        """This rank's requests for the step: the global batch is drawn identically on all ranks, then split."""
        lay = self.layout
        mine = slice(self.backend.rank * lay.groups_per_rank, (self.backend.rank + 1) * lay.groups_per_rank)
        requests = self.loader.get(self.cursor.take(lay.groups_per_step)[mine])
        self.loader.prefetch(self.cursor.peek(lay.groups_per_step)[mine])  # the next step's, decoded meanwhile
        return requests

    def collect(self, timer: Timer) -> tuple[Rollouts, list[int]]:
        """Roll out every group of this rank, scoring finished chunks while the next chunk samples."""
        r, g = self.recipe, self.recipe.grpo
        requests = self._requests()
        per_chunk = max(1, self.layout.micro_batch_size // g.group_size)
        first = self.backend.rank * self.layout.groups_per_rank
        # Seeded by the chunk's global group index: the same groups get the same noise on any number of ranks.
        seeds = [derive_seed(r.run.seed, self.step, 2, first + c) for c in range(0, len(requests), per_chunk)]
        ro = self._roll([requests[c : c + per_chunk] for c in range(0, len(requests), per_chunk)], seeds, timer)
        return ro, ro.traj.steps

    def _roll(self, chunks: list[list[EditSample]], seeds: list[int], timer: Timer) -> Rollouts:
        """Roll out and score groups of the chunks' requests, each chunk's noise from its seed."""
        r, s, g = self.recipe, self.recipe.sampling, self.recipe.grpo
        plan_gen = torch.Generator().manual_seed(derive_seed(r.run.seed, self.step, 1))
        sde_steps, trained = plan_steps(s.steps, s.window, g.trained_steps, self.step, plan_gen)
        conds, trajs, edited, scored = [], [], [], []  # scored: rewards, or futures of them
        needs = self.rewards.needs
        for chunk, seed in zip(chunks, seeds):
            with timer("encode"):
                if g.share_encode:
                    cond = self.policy.encode(chunk).repeat_interleave(g.group_size)
                else:
                    cond = self.policy.encode([smp for smp in chunk for _ in range(g.group_size)])
            # On the policy's device, so the noise never crosses from the host (CPU and CUDA draw different streams).
            gen = torch.Generator(self.device).manual_seed(seed)
            with timer("rollout"):
                traj = rollout(
                    self.policy, cond, self.sigmas, sde_steps=sde_steps, trained_steps=trained,
                    kind=s.sde, noise_level=s.noise_level, generator=gen, cps_logprob=s.cps_logprob,
                    keep_means=self.objective.keeps_means, keep_latents=self.objective.keeps_latents,
                )
                traj.extras.update(self.objective.after_rollout(self.policy, cond, traj, gen))
            with timer("decode"), torch.no_grad():
                pixels = self.policy.decode(traj.final).float()
            members = [smp for smp in chunk for _ in range(g.group_size)]
            batch = reward_batch(members, pixels, needs)
            if g.async_rewards:
                scored.append(self.pool.submit(self.rewards.score, batch))
            else:
                with timer("reward"):
                    scored.append(self.rewards.score(batch))
            conds.append(cond)
            trajs.append(traj)
            edited.append(pixels)
        with timer("reward"):
            rewards = _cat_rewards([out.result() if isinstance(out, cf.Future) else out for out in scored])
        samples = [smp for chunk in chunks for smp in chunk for _ in range(g.group_size)]
        group_ids = torch.arange(len(samples) // g.group_size).repeat_interleave(g.group_size)
        return Rollouts(samples, group_ids, Condition.cat(conds), Trajectory.cat(trajs), torch.cat(edited), rewards)

    def _total(self, ro: Rollouts) -> tuple[Tensor, Tensor]:
        """(B,) the recipe's aggregated reward and its validity."""
        scores = {n: o.scores for n, o in ro.rewards.items()}
        valid = {n: o.valid for n, o in ro.rewards.items()}
        return grpo.aggregate_rewards(scores, valid, self.rewards.weights, ro.group_ids, self.recipe.rewards.aggregation)

    def _tied(self, ro: Rollouts) -> Tensor:
        """(groups,) True where a group's aggregated rewards all tie (or fewer than two are valid)."""
        return grpo.tied_groups(*self._total(ro), ro.group_ids).view(-1, self.recipe.grpo.group_size)[:, 0]

    def resample_tied(self, ro: Rollouts, timer: Timer, metrics: dict[str, float]) -> Rollouts:
        """Dynamic sampling (DAPO's): up to `grpo.resample_tied` extra groups per step replace groups whose rewards
        all tie, in rounds until none ties or the budget is spent; an extra group that ties too leaves its slot alone.

        The same on resume and on any number of ranks: the extra requests and their noise come from the step's seed,
        never from the data cursor; the k-th extra of a round goes to the k-th tied group in global order and is rolled
        out by the rank that holds that group, so no trajectory moves between ranks.
        """
        r, g, lay = self.recipe, self.recipe.grpo, self.layout
        pick = torch.Generator().manual_seed(derive_seed(r.run.seed, self.step, 4))
        pool = torch.randint(len(self.train_data), (g.resample_tied,), generator=pick).tolist()
        first, drawn = self.backend.rank * lay.groups_per_rank, 0
        while True:
            tied = torch.nonzero(self.backend.all_gather(self._tied(ro).float())).flatten().tolist()
            targets = tied[: g.resample_tied - drawn]
            if not targets:
                break
            mine = [(drawn + k, gid - first) for k, gid in enumerate(targets) if 0 <= gid - first < lay.groups_per_rank]
            drawn += len(targets)
            if not mine:
                continue
            seeds = [derive_seed(r.run.seed, self.step, 5, j) for j, _ in mine]
            extra = self._roll([[self.train_data[pool[j]]] for j, _ in mine], seeds, timer)
            order, n = torch.arange(len(ro.samples)), g.group_size
            for i, ((_, slot), informative) in enumerate(zip(mine, (~self._tied(extra)).tolist())):
                if informative:
                    order[slot * n : (slot + 1) * n] = len(ro.samples) + i * n + torch.arange(n)
            ro = Rollouts.regroup([ro, extra], order, n)
        metrics["groups/resampled"] = float(drawn)
        metrics["groups/still_tied"] = float(len(tied))
        return ro

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
            if not n_bad:
                continue
            reasons = sorted({str(e) for e in out.extras.get("error", []) if e})
            what = (f"reward {name!r}: {n_bad} of {len(out.valid)} samples have no valid score at step {self.step + 1}"
                    + (f" ({'; '.join(reasons[:3])})" if reasons else ""))
            if rc.on_failure == "fail":
                raise TrainingError(what + "; stopping because rewards.on_failure=fail (use 'skip' to exclude them and continue)")
            # Once per reward, and only for a fault (an error recorded): a score that does not apply (a global edit has
            # no region to preserve) is no news. The run's summary counts every unscored sample.
            if reasons and name not in self.warned and self.backend.is_main:
                self.warned.add(name)
                console.print(f"warning: {what}; skipping them (rewards.on_failure=skip)", style="yellow", markup=False, soft_wrap=True)
        total, ok = self._total(ro)
        # Over the global batch (rewards all-gathered in rank order), so `scale: batch` sees every rank's groups.
        n, offset = len(total), self.backend.rank * self.layout.groups_per_rank
        gids, all_ok = self.backend.all_gather(ro.group_ids + offset), self.backend.all_gather(ok.float()).bool()
        all_total = self.backend.all_gather(total.float())
        adv = grpo.group_advantages(all_total, all_ok, gids, scale=g.scale, adv_clip=g.adv_clip)
        all_tied = grpo.tied_groups(all_total, all_ok, gids)
        all_train = all_ok & ~all_tied if g.skip_tied_groups else all_ok
        if g.shuffle_advantages:  # the no-reward-signal control: the same advantages, dealt to random samples
            deal = torch.Generator().manual_seed(derive_seed(self.recipe.run.seed, self.step, 6))
            adv = grpo.shuffle_advantages(adv, all_train, deal)
        mine = slice(self.backend.rank * n, (self.backend.rank + 1) * n)
        adv, tied, train_mask = adv[mine], all_tied[mine], all_train[mine]
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
        grad_norms: list[float] = []
        # Statistics stay on the device until the update is done: reading one back would stall every micro-step.
        stats: dict[str, list[Tensor]] = defaultdict(list)
        ratio_by_step: dict[tuple[int, str], list[Tensor]] = defaultdict(list)  # (step, "" or "raw_"): ratios
        train_mode(self.policy, True)
        with timer("train"):
            for u in range(0, len(micro), per_update):
                update = micro[u : u + per_update]
                n_real = sum(min(max(n - u, 0), per_update) for n in real)  # real micro-batches, all ranks
                n_back = n_real * len(ro.traj.steps) / self.backend.world_size
                for mb_idx, weight in update:
                    cond, traj = ro.cond.index(mb_idx), ro.traj.index(mb_idx)
                    a = adv[mb_idx].to(self.device)
                    for k, step_i in enumerate(ro.traj.steps):
                        out = self.objective.loss(self._trained_step(k, traj, cond, a))
                        self.backend.backward(out.loss * weight / n_back)
                        if not weight:
                            continue
                        stats["loss"].append(out.loss.detach())
                        if out.ratio is not None:
                            ratio_by_step[step_i, ""].append(out.ratio)
                        if out.raw_ratio is not None:
                            ratio_by_step[step_i, "raw_"].append(out.raw_ratio)
                        if out.clipped is not None:
                            stats["clip_frac"].append(out.clipped.float().mean())
                        if out.approx_kl is not None:
                            stats["approx_kl"].append(out.approx_kl)
                        for key, value in out.extra.items():
                            stats[key].append(value)
                grad_norms.append(self.backend.step())
                if self.ema is not None:
                    self.ema.step(self.policy.trainable_parameters())
        train_mode(self.policy, False)
        names, values = [f"train/{k}" for k in stats], [torch.stack(v).float().mean() for v in stats.values()]
        for (step_i, kind), ratios in sorted(ratio_by_step.items()):
            ratio = torch.cat(ratios).float()
            names += [f"ratio/t{step_i:02d}/{kind}mean", f"ratio/t{step_i:02d}/{kind}std"]
            values += [ratio.mean(), ratio.std(unbiased=False)]
        host = torch.stack(values).tolist() if values else []  # one read-back for the whole update
        metrics.update(zip(names, host))
        metrics["train/grad_norm"] = sum(grad_norms) / len(grad_norms)

    def _trained_step(self, k: int, traj: Trajectory, cond: Condition, adv: Tensor) -> TrainedStep:
        """Trained step `k` of a micro-batch, with the policy's velocity there run through the backend (DeepSpeed's
        hooks see it) and the reference's run without gradients, for the objective's loss."""
        sigma = torch.full((adv.shape[0],), float(traj.sigmas[k]), device=self.device)

        def velocity(x: Tensor) -> Tensor:
            return self.backend.forward(self.policy.velocity, x, sigma, cond)

        def reference(x: Tensor) -> Tensor:
            with torch.no_grad(), self.policy.reference():
                return self.backend.forward(self.policy.velocity, x, sigma, cond)

        return TrainedStep(k, traj, cond, adv, velocity, reference)

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict[str, float]:
        timer = Timer(self.device)
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        with self.backend.inference(self.policy):
            ro, trained = self.collect(timer)
            if self.recipe.grpo.resample_tied:
                ro = self.resample_tied(ro, timer, metrics)
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
        """The held-out benchmark (`editrl.evaluate`, as `editrl eval` runs it) with ODE edits: the recipe's rewards
        (`eval/<term>`, weighted into `eval/total`), the oracle metrics the policy was not trained on (`eval/oracle/*`)
        and the yardsticks (`eval/copy/*`, `eval/ceiling/*`)."""
        from editrl.evaluate import evaluate as benchmark, yardsticks

        assert self.eval_data is not None
        s, bs = self.recipe.sampling, self.layout.micro_batch_size
        edit_fn = ode_editor(self.policy, s.eval_steps or s.steps, s.shift, self.recipe.run.seed, bs)

        with self.scored_weights(), self.backend.inference(self.policy):
            if self.yardsticks is None:
                self.yardsticks = yardsticks(self.eval_data, self.policy, bs, progress=False, device=self.device)
            report = benchmark(edit_fn, self.eval_data, self.rewards, batch_size=bs, progress=False,
                               grid_per_category=1, yardsticks=self.yardsticks)
        overall = report.overall()
        self.eval_picks = [*self.eval_picks[:1], (self.step, report.picks[:4])]  # the frame grid's rows
        out = {f"eval/{name}": overall[f"reward_{name}"] for name in self.rewards.names}
        out |= {f"eval/oracle/{col}": overall[col] for col in ORACLE_COLUMNS if not math.isnan(overall[col])}
        out |= {f"eval/{y}/{col}": overall[f"{y}_{col}"] for y in YARDSTICKS for col in ORACLE_COLUMNS
                if not math.isnan(overall.get(f"{y}_{col}", math.nan))}
        out["eval/total"] = sum(w * out[f"eval/{name}"] for name, w in self.rewards.weights.items())
        return out

    def after_step(self, metrics: dict[str, float]) -> None:
        t = self.recipe.train
        if t.sample_every and self.step % t.sample_every == 0 and self._last_rollouts is not None:
            self.logger.save_samples(self.step, self._last_rollouts.samples, self._last_rollouts.edited.cpu())

    def counted(self, metrics: dict[str, float]) -> list[str]:
        return [k for k in metrics if k == "samples/trained" or (k.startswith("reward/") and k.endswith("/invalid"))]

    def progress_note(self, metrics: dict[str, float]) -> str:
        return f"reward {metrics.get('reward/weighted/mean', float('nan')):.3f}"

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def finish(self) -> None:
        if self.eval_data is not None and self.recipe.train.eval_every is not None and self.backend.is_main:
            from editrl.summary import print_eval_before_after

            print_eval_before_after(self.run_dir, console)
            # The first evaluation's edits (kept, not re-run) beside the last's; no grid for text-to-video data.
            kept = self.eval_picks[0][1] if len(self.eval_picks) == 2 else []
            if kept and all(s.source is not None for s, _ in kept):
                (first, before), (_, after) = self.eval_picks
                start = "SFT start" if first == 0 and self.recipe.policy.init_from else f"step {first}"
                rows = [(sample, [a, b]) for (sample, a), (_, b) in zip(before, after)]
                path = save_grid(self.run_dir / "before_after.png", rows, frames=1, labels=(start, "after GRPO"))
                console.print(f"frame grid (source | {start} | after GRPO | target, middle frame): {path}")


def _cat_rewards(outs: list[dict[str, RewardOutput]]) -> dict[str, RewardOutput]:
    """Reward outputs of consecutive chunks as one per reward."""
    return {
        name: RewardOutput(
            torch.cat([o[name].scores for o in outs]),
            torch.cat([o[name].valid for o in outs]),
            {k: [v for o in outs for v in o[name].extras.get(k, [])] for k in {k for o in outs for k in o[name].extras}},
        )
        for name in outs[0]
    }


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, accept_changes: bool = False) -> Path:
    """Edit-GRPO on a recipe to its last step (or continue it with `resume`); returns the run directory. The whole job,
    a warm start included, is `editrl.job.run`."""
    return Trainer(recipe, resume=resume, overwrite=overwrite, accept_changes=accept_changes).fit().run_dir
