"""What the pixel and oracle rewards cost at paper scale, next to one plain SSIM (issue 11).

Builds 4 clips of 33x3x240x416 (edited, source, target, and edit masks made of a few rectangles) on
`--device` and times side by side, warm-up first and then the median of `--repeats` rounds:

- reference: one plain separable-Gaussian SSIM (the five maps x, y, x², y², xy, each blurred by two
  1-D convolutions, no mask), written here independently of `editrl.metrics`;
- the three PSNR-based rewards together, called as the trainer calls them (a RewardBatch):
  oracle_fidelity (psnr), oracle_preservation (psnr), temporal_consistency (reference: source);
- an SSIM reward: oracle_fidelity (ssim).

Goals: PSNR rewards <= 0.25x the reference, SSIM reward <= 1.5x. Prints a table; asserts nothing.
Usage: python benchmarks/reward_cost.py [--device cpu|cuda] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from editrl.reward import build_reward
from editrl.types import RewardBatch

PSNR_REWARDS = [
    ("oracle_fidelity", {"metric": "psnr"}),
    ("oracle_preservation", {"metric": "psnr"}),
    ("temporal_consistency", {"reference": "source"}),
]
SSIM_REWARD = ("oracle_fidelity", {"metric": "ssim"})


def plain_ssim(a: Tensor, b: Tensor) -> Tensor:
    """Textbook SSIM per sample (11-tap Gaussian, sigma 1.5, valid interior), the cost yardstick."""
    h, w = a.shape[-2:]
    x, y = a.reshape(-1, 1, h, w), b.reshape(-1, 1, h, w)
    t = torch.arange(11, dtype=a.dtype, device=a.device) - 5
    g = torch.exp(-(t**2) / (2 * 1.5**2))
    g = g / g.sum()

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(z, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.view(a.shape[0], -1).mean(1)


def make_batch(clips: int, frames: int, height: int, width: int, device: torch.device) -> RewardBatch:
    """Smooth random clips with a little noise; the target changes a few rectangles, the edit is the
    target plus noise (with a slight drift outside the mask), as a policy's output would be."""
    gen = torch.Generator(device=device).manual_seed(0)

    def smooth() -> Tensor:
        coarse = torch.rand(clips * frames, 3, height // 16, width // 16, generator=gen, device=device)
        fine = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        return fine.view(clips, frames, 3, height, width)

    def noise(scale: float) -> Tensor:
        return scale * torch.randn(clips, frames, 3, height, width, generator=gen, device=device)

    source = (smooth() + noise(0.02)).clamp_(0, 1)
    masks = torch.zeros(clips, frames, 1, height, width, dtype=torch.bool, device=device)
    corners = torch.rand(clips, 3, 2, generator=torch.Generator().manual_seed(1)).tolist()  # where the rectangles go
    for i, rects in enumerate(corners):
        for fy, fx in rects:
            y0, x0 = int(fy * height * 0.7), int(fx * width * 0.7)
            masks[i, :, :, y0 : y0 + height // 4, x0 : x0 + width // 4] = True
    target = torch.where(masks, smooth(), source)
    edited = (target + noise(0.03)).clamp_(0, 1)
    return RewardBatch(
        instructions=["edit"] * clips,
        edited=edited,
        sources=source,
        targets=target,
        masks=list(masks.unbind(0)),
    )


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=416)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = make_batch(args.clips, args.frames, args.height, args.width, device)
    psnr_rewards = [build_reward(name, options) for name, options in PSNR_REWARDS]
    ssim_reward = build_reward(*SSIM_REWARD)

    cases: dict[str, Callable[[], object]] = {
        "plain SSIM (reference)": lambda: plain_ssim(batch.edited, batch.targets),
        "PSNR rewards (3 together)": lambda: [r(batch) for r in psnr_rewards],
    }
    for (name, options), reward in zip(PSNR_REWARDS, psnr_rewards):  # the three apart, for the breakdown
        cases[f"  {name} ({', '.join(map(str, options.values()))})"] = lambda r=reward: r(batch)
    cases["SSIM reward (oracle_fidelity ssim)"] = lambda: ssim_reward(batch)
    with torch.no_grad():
        for fn in cases.values():  # warm-up: allocator, kernels, thread pools
            timed(fn, device)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved rounds, so load changes hit every case alike
            for name, fn in cases.items():
                times[name].append(timed(fn, device))
    median = {name: statistics.median(ts) for name, ts in times.items()}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.clips} clips of {args.frames}x3x{args.height}x{args.width} on {where}; median of {args.repeats} after a warm-up")
    ref = median["plain SSIM (reference)"]
    goals = {"PSNR rewards (3 together)": 0.25, "SSIM reward (oracle_fidelity ssim)": 1.5}
    print(f"| {'case':36} | {'seconds':>8} | {'x reference':>11} | goal |")
    print(f"|{'-' * 38}|{'-' * 10}:|{'-' * 12}:|------|")
    for name, seconds in median.items():
        goal = goals.get(name)
        verdict = f"<= {goal} ({'met' if seconds / ref <= goal else 'NOT met'})" if goal else ""
        print(f"| {name:36} | {seconds:8.3f} | {seconds / ref:11.3f} | {verdict} |")


if __name__ == "__main__":
    main()
