"""Why does SFT not learn the edits? Probes of the tiny VIVA editor's SFT on the quickstart's data (issue 13).

Trains the refiner + DiT of `quickstart_sft.yaml` with the flow-matching loss, as `editrl sft` does, but encodes
every pair once up front (the VLM and VAE are frozen): a step is then the refiner + DiT alone, ~0.04 s on one core
against ~0.4 s in `SftTrainer`, which re-encodes each batch. It then samples (ODE, the recipe's steps and shift)
and reports fidelity / preservation PSNR inside / outside the edit mask, overall and per category, on the first
32 training pairs (the fit) and on the quickstart's 32 held-out pairs (generalisation). `--baselines` adds three yardsticks:
copying the source, the VAE's reconstruction of the target (the editor's ceiling) and of the source.

Probes: `--tokens zero` (the instruction path carries nothing), `--tokens words` (a fixed random vector per word:
token identity without the random VLM), `--dit '{"num_layers": 4}'` (a larger tiny DiT, built into the cache),
`--vae '{"steps": 2000, "scale_factor_spatial": 2, ...}'` (another VAE config or pre-fit, likewise), `--mask-weight`
(a loss weighting the latents the edit mask touches), any recipe override (`--set data.train.options.n=512`), and
the optimisation knobs below; `--device cuda` and `--time-limit` for the GPU grid in probes_gpu.sh. One JSON line
per probe is appended to `--out`.

    EDITRL_CACHE=/tmp/probe-cache .venv/bin/python benchmarks/probes.py base --baselines
    EDITRL_CACHE=/tmp/probe-cache .venv/bin/python benchmarks/probes.py zero --tokens zero --steps 3000
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from editrl.data.base import build_dataset
from editrl.evaluate import oracle_scores
from editrl.rollout import sample_ode
from editrl.sft import sample_sigmas
from editrl.types import Condition, EditSample

Scores = dict[str, tuple[float, float]]  # category -> (fidelity PSNR, preservation PSNR)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--recipe", default="quickstart_sft")
    p.add_argument("--set", nargs="*", default=[], help="recipe overrides, section.field=value")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--cosine", action="store_true", help="cosine decay of the learning rate to 0")
    p.add_argument("--timesteps", choices=["logit_normal", "uniform"], default="logit_normal")
    p.add_argument("--shift", type=float, default=None, help="training sigma shift (default: the recipe's)")
    p.add_argument("--tokens", choices=["vlm", "zero", "words"], default="vlm")
    p.add_argument("--dit", default=None, help="JSON overrides of the tiny preset's TINY_DIT")
    p.add_argument("--vae", default=None, help="JSON overrides of TINY_VAE and VAE_FIT (its pre-fit), one object")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mask-weight", type=float, default=1.0, help="loss weight of latents inside the edit mask")
    p.add_argument("--time-limit", type=float, default=math.inf, help="stop training after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--baselines", action="store_true")
    p.add_argument("--out", default="probes.jsonl")
    return p.parse_args()


def use_dit(overrides: str) -> None:
    """Point the tiny preset's DiT at a config with `overrides`, built once into its own cache directory."""
    from editrl.policies.viva import presets

    extra = json.loads(overrides)
    presets.TINY_DIT.update(extra)
    presets.PARTS["dit/wan"] = "probe-dit-" + "-".join(f"{k}{v}" for k, v in sorted(extra.items())) + "/dit"


def use_vae(overrides: str, device: str) -> None:
    """Point the tiny preset's VAE at a config (and pre-fit) with `overrides`, built once into its own directory."""
    from editrl.policies.viva import presets

    extra = json.loads(overrides)
    presets.TINY_VAE.update({k: v for k, v in extra.items() if k not in presets.VAE_FIT})
    presets.VAE_FIT.update({k: v for k, v in extra.items() if k in presets.VAE_FIT}, device=device)
    presets.PARTS["vae/wan"] = "probe-vae-" + "-".join(f"{k}{v}" for k, v in sorted(extra.items())).replace(" ", "") + "/vae"


def word_tokens(cond: Condition, samples: list[EditSample]) -> None:
    """Replace the VLM's tokens by one fixed random vector per (lower-cased) word of the instruction."""
    tokens, mask = torch.zeros_like(cond.data["tokens"]), torch.zeros_like(cond.data["mask"])
    for i, s in enumerate(samples):
        words = [w.strip(".,?!").lower() for w in s.instruction.split()][: tokens.shape[1]]
        for k, w in enumerate(words):
            tokens[i, k] = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
        mask[i, : len(words)] = True
    cond.data.update(tokens=tokens, mask=mask, counts=mask.sum(1))


def main() -> None:
    a = parse()
    torch.set_num_threads(1)
    from editrl.policies.viva import presets

    presets.VAE_FIT["device"] = a.device  # the pre-fit of a preset VAE this run builds
    if a.dit:
        use_dit(a.dit)
    if a.vae:
        use_vae(a.vae, a.device)
    from editrl.checkpoint import policy_from_recipe
    from editrl.preflight import load_sft_recipe

    rec = load_sft_recipe(a.recipe, ["data.eval.options.n=32", *a.set])  # the quickstart's held-out split
    shift = rec.sampling.shift if a.shift is None else a.shift
    eval_steps = rec.sampling.eval_steps or rec.sampling.steps
    torch.manual_seed(a.seed)
    policy = policy_from_recipe(rec, device=a.device, init_from=False)
    data = {
        split: [ds[i] for i in range(len(ds))]
        for split, spec in (("train", rec.data.train), ("held", rec.data.eval))
        for ds in [build_dataset(spec.kind, spec.options)]
    }

    def encode(samples: list[EditSample]) -> tuple[Condition, Tensor]:
        conds, x0 = [], []
        for i in range(0, len(samples), 16):
            part = samples[i : i + 16]
            cond = policy.encode(part)
            if a.tokens == "zero":
                cond.data["tokens"] = torch.zeros_like(cond.data["tokens"])
            elif a.tokens == "words":
                word_tokens(cond, part)
            conds.append(cond)
            x0.append(policy.encode_target(part).float())
        return Condition.cat(conds), torch.cat(x0)

    enc = {split: encode(samples) for split, samples in data.items()}
    cfg = rec.sft.model_copy(update={"timesteps": a.timesteps})

    def latent_weights(samples: list[EditSample], x0: Tensor) -> Tensor:
        """(N, 1, T', H', W') loss weights: `--mask-weight` where the edit mask touches a latent, 1 elsewhere."""
        masks = torch.stack([s.mask[:, 0].float() for s in samples]).to(x0.device)  # type: ignore[index]
        touched = torch.nn.functional.adaptive_max_pool3d(masks, x0.shape[2:])
        return (1 + (a.mask_weight - 1) * touched).unsqueeze(1)

    weights = {split: latent_weights(data[split], enc[split][1]) for split in data}

    def fm_loss(cond: Condition, x0: Tensor, gen: torch.Generator, w: Tensor | None = None) -> Tensor:
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        sigma = sample_sigmas(x0.shape[0], cfg, shift, gen).to(x0.device)
        s = sigma.view(-1, 1, 1, 1, 1)
        err = (policy.velocity((1 - s) * x0 + s * eps, sigma, cond).float() - (eps - x0)) ** 2
        return err.mean() if w is None else (err * w).sum() / (w.expand_as(err).sum())

    @torch.no_grad()
    def held_loss(split: str) -> float:
        gen = torch.Generator().manual_seed(12345)
        cond, x0 = enc[split]
        n = min(len(x0), 256)
        return sum(float(fm_loss(cond.index(slice(0, n)), x0[:n], gen)) for _ in range(4)) / 4

    @torch.no_grad()
    def score(split: str, mode: str = "policy", limit: int = 32) -> Scores:
        """mode: policy (ODE samples), copy (the source), recon (VAE round trip of the target), recon_source."""
        samples, (cond, x0) = data[split][:limit], enc[split]
        rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for i in range(0, len(samples), 16):
            part, c = samples[i : i + 16], cond.index(slice(i, i + 16))
            if mode == "policy":
                video = policy.decode(sample_ode(policy, c, eval_steps, rec.sampling.shift, torch.Generator().manual_seed(1000 + i)))
            elif mode == "copy":
                video = torch.stack([s.source for s in part])  # type: ignore[misc]
            else:
                video = policy.decode(x0[i : i + 16] if mode == "recon" else c["source"])
            sc = oracle_scores(video, part)
            for j, s in enumerate(part):
                pair = (float(sc["fidelity_psnr"][j]), float(sc["preservation_psnr"][j]))
                rows[s.category or "?"].append(pair)
                rows["overall"].append(pair)

        def mean(values: list[float]) -> float:
            values = [v for v in values if not math.isnan(v)]
            return sum(values) / len(values) if values else math.nan

        return {k: (mean([f for f, _ in v]), mean([p for _, p in v])) for k, v in rows.items()}

    def line(res: Scores) -> str:
        cats = " ".join(f"{k}={v[0]:.1f}" for k, v in sorted(res.items()) if k != "overall")
        return f"fidelity {res['overall'][0]:.2f} preservation {res['overall'][1]:.2f} | {cats}"

    out: dict[str, Any] = {"name": a.name, "args": vars(a)}
    out["params"] = {"refiner": sum(p.numel() for p in policy.refiner.parameters()),
                     "dit": sum(p.numel() for p in policy.denoiser.parameters())}
    if a.baselines:
        for mode in ("copy", "recon", "recon_source"):
            for split in data:
                out[f"{split}_{mode}"] = score(split, mode)
                print(f"{mode:12s} {split:5s} {line(out[f'{split}_{mode}'])}", flush=True)

    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)

    def factor(step: int, elapsed: float) -> float:
        """Warm-up, then cosine decay over the steps or the time limit, whichever ends first."""
        warm = min(1.0, (step + 1) / a.warmup) if a.warmup else 1.0
        done = min(1.0, max(step / a.steps, elapsed / a.time_limit))
        return warm * (0.5 * (1 + math.cos(math.pi * done)) if a.cosine else 1.0)

    gen = torch.Generator().manual_seed(a.seed)
    n = len(data["train"])
    order: list[int] = []
    losses = []
    t0 = time.perf_counter()
    for step in range(a.steps):
        if time.perf_counter() - t0 > a.time_limit:
            print(f"[{a.name}] time limit: stopped after {step} steps", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = a.lr * factor(step, time.perf_counter() - t0)
        if len(order) < a.batch_size:
            order = torch.randperm(n, generator=gen).tolist()
        idx, order = order[: a.batch_size], order[a.batch_size :]
        for m in policy.modules_for_training():
            m.train()
        w = weights["train"][idx] if a.mask_weight != 1 else None  # unweighted: the plain mean, as before the option
        loss = fm_loss(enc["train"][0].index(idx), enc["train"][1][idx], gen, w)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, rec.optim.grad_clip or math.inf)
        opt.step()
        for m in policy.modules_for_training():
            m.eval()
        losses.append(loss.detach())
        if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
            print(f"  step {step + 1}: held-out loss {held_loss('held'):.4f} held-out {line(score('held'))}", flush=True)
    out["train_s"], out["steps_done"] = round(time.perf_counter() - t0, 1), len(losses)
    out.update(train_loss=held_loss("train"), held_loss=held_loss("held"), train=score("train"), held=score("held"))
    print(f"[{a.name}] {out['params']} {out['train_s']} s; loss train {out['train_loss']:.4f} held-out {out['held_loss']:.4f}")
    print(f"  train    {line(out['train'])}\n  held-out {line(out['held'])}", flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
