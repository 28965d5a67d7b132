"""The DiT call inside the engine against the bare model and the peers' recipe, side by side in one run.

At a named scale (benchmarks/scale.py's models: a Wan2.1-T2V-1.3B-config DiT at paper scale, random weights, the
micro-batch of the scale's recipe), each timed as the fastest of `--repeats` calls after a warm-up, synchronised:

    bare eager        the DiT alone in the run's dtype: forward; forward+backward to its input (checkpointing as the recipe)
    bare compiled     the same with its repeated blocks compiled (compile_repeated_blocks(fullgraph=True))
    peer-style        the same DiT with a peft LoRA of the engine's rank and targets in float32 adapter weights, under
                      bf16 autocast, eager: accelerate's mixed precision, how flow_grpo runs its Wan2.1 call
    engine            editrl's own Trainer (the scale's recipe, the policy's defaults: compile on CUDA): the rollout's
                      call, `policy.velocity` without gradients (token refiner + DiT), and a training micro-step, its
                      forward+backward (velocity, the SDE step's log-probability, backward to every trained weight)

TFLOP/s use the bare DiT's model FLOPs from torch's FlopCounterMode (forward; forward+backward to the input with no
recomputation); the LoRA's and the refiner's own FLOPs are not counted, so a slower call shows as a lower rate.
`--targets` adds an engine row with another LoRA target list, to price the adapter's size. The engine's numerics are
checked too: the rollout call and the training forward must return the same bits (an on-policy ratio of exactly 1).

    .venv/bin/python benchmarks/dit_floor.py --scale cpu          # a few minutes on 2 CPU cores (compiles once)
    python benchmarks/dit_floor.py --scale paper --out "$OUT"     # one H200: about 3 minutes

The last line (2 decimals; x, y: the engine's seconds over the compiled bare DiT's, smaller is better, 1.00 is the
bare model; z: the peer-style call's seconds over the engine's, bigger is better):

    dit-floor scale=<name> device=<device> engine/bare-compiled: forward <x>, train <y>; peer-style/engine <z>
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from rich.console import Console
from rich.table import Table

_spec = importlib.util.spec_from_file_location("editrl_bench_scale", Path(__file__).with_name("scale.py"))
scale = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules[_spec.name] = scale  # type: ignore[union-attr]
_spec.loader.exec_module(scale)  # type: ignore[union-attr]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def bare_dit(path: str, device: torch.device, dtype: torch.dtype, checkpointing: bool) -> Any:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype).to(device).eval().requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def calls(model: Any, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, params: list[torch.Tensor] | None,
          autocast: torch.dtype | None = None) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward without gradients, forward+backward) of a DiT; gradients to `params`, else to the input."""

    def run(inp: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            return model(inp, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return run(x)

    def forward_backward() -> None:
        inp = x if params else x.detach().requires_grad_(True)
        torch.autograd.grad(run(inp).float().mean(), params or [inp])

    return forward, forward_backward


def engine_calls(trainer: Any) -> tuple[Callable[[], Any], Callable[[], Any], dict[str, Any]]:
    """The trainer's rollout call and one training micro-step's forward+backward, at a micro-batch of the step's shapes;
    and what they are (input shape, whether the rollout and the training forward agree bit for bit)."""
    from editrl import sde

    p, mb, g = trainer.policy, trainer.layout.micro_batch_size, trainer.recipe.grpo.group_size
    s = trainer.recipe.sampling
    requests = [trainer.train_data[i] for i in range(mb // g)]
    with torch.no_grad():
        cond = p.encode(requests).repeat_interleave(g)
        x = p.init_noise(cond, torch.Generator(trainer.device).manual_seed(0))
    sigma, sigma_next = 0.6, 0.55
    sigmas = torch.full((mb,), sigma, device=trainer.device)
    params = p.trainable_parameters()

    def rollout_call() -> torch.Tensor:
        with torch.no_grad():
            return p.velocity(x, sigmas, cond)

    gen = torch.Generator(trainer.device).manual_seed(1)
    with torch.no_grad():
        old = sde.step(s.sde, x, rollout_call(), sigma, sigma_next, noise_level=s.noise_level, generator=gen)

    def train_forward() -> tuple[torch.Tensor, torch.Tensor]:
        v = p.velocity(x, sigmas, cond)
        step = sde.step(s.sde, x, v, sigma, sigma_next, noise_level=s.noise_level, prev_sample=old.prev_sample)
        return v, step.log_prob

    def train_call() -> None:
        _, log_prob = train_forward()
        torch.autograd.grad(log_prob.mean(), params)

    for m in p.modules_for_training():
        m.train()
    v_train, log_prob = train_forward()
    for m in p.modules_for_training():
        m.eval()
    info = {
        "velocity_input": list(x.shape), "trainable_m": round(sum(q.numel() for q in params) / 1e6, 2),
        "compiled": bool(getattr(p, "compiled", False)), "dtype": str(p.dtype).removeprefix("torch."),
        "rollout_equals_training": bool(torch.equal(rollout_call(), v_train.detach())),
        "max_abs_log_ratio": float((log_prob.detach() - old.log_prob).abs().max()),
    }
    return rollout_call, train_call, info


def profile(name: str, fn: Callable[[], Any], device: torch.device, out: Path, calls: int = 2) -> None:
    """torch.profiler's tables (by self device time, then by total CPU time) of `calls` calls of `fn`: prof_<name>.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    fn()
    scale.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        for _ in range(calls):
            fn()
        scale.synchronize(device)
    table = prof.key_averages()
    by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = table.table(sort_by=by, row_limit=40, max_name_column_width=90)
    text += "\n\n" + table.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=90)
    (out / f"prof_{name}.txt").write_text(f"{calls} calls of {name}\n{text}")


def train_modes(trainer: Any, call: Callable[[], Any]) -> Callable[[], Any]:
    """`call` with the policy's trained modules in training mode, as the trainer's update runs them."""

    def run() -> Any:
        for m in trainer.policy.modules_for_training():
            m.train()
        try:
            return call()
        finally:
            for m in trainer.policy.modules_for_training():
                m.eval()

    return run


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from editrl.preflight import load_recipe
    from editrl.trainer import Trainer

    sc = scale.SCALES[args.scale]
    device = torch.device(args.device)
    dtype = getattr(torch, sc.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"scale": args.scale, "device": args.device, "torch": torch.__version__,
                           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "repeats": args.repeats, "seconds": {}, "compile_s": {}}

    def save() -> None:
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        (out / "dit_floor.json").write_text(json.dumps(res, indent=1))

    def timed(key: str, fn: Callable[[], Any], repeats: int | None = None) -> None:
        try:
            res["seconds"][key] = scale.seconds(fn, device, repeats or args.repeats)
        except Exception as e:  # one failing row must not cost the others (and a GPU's minutes)
            res["seconds"][key] = f"error: {type(e).__name__}: {str(e)[:300]}"
        save()
        value = res["seconds"][key]
        console.log(f"{key}: {value:.4f} s" if isinstance(value, float) else f"{key}: {value}")

    with tempfile.TemporaryDirectory(prefix="editrl-dit-floor-") as tmp:
        root = Path(tmp)
        built = scale.build_models(sc, sc.vlm_layers, root / "models", args.device)
        tree = scale.recipe_tree(sc, built["paths"], root, args.device, args.threads)
        (root / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        res["params_m"] = built["params_m"]
        ckpt = tree["policy"]["options"]["gradient_checkpointing"]

        def engine(key: str, overrides: list[str]) -> Any:
            t0 = time.perf_counter()
            trainer = Trainer(load_recipe(root / "recipe.yaml", [f"run.output_dir={root / key}", *overrides]), overwrite=True)
            rollout_call, train_call, info = engine_calls(trainer)  # runs each once: the compile happens here
            res["compile_s"][key] = round(time.perf_counter() - t0, 1)
            res[key] = info
            timed(f"{key}_forward", rollout_call)
            timed(f"{key}_train", train_modes(trainer, train_call), max(1, args.repeats // 2 + 1))
            if args.profile:
                profile(f"{key}_forward", rollout_call, device, out)
                profile(f"{key}_train", train_modes(trainer, train_call), device, out, calls=1)
            trainer.close()
            trainer.logger.close()
            return info

        info = engine("engine", [f"policy.options.compile={args.compile}"] if args.compile else [])
        shape = info["velocity_input"]
        free(device)

        # The DiT's input at the engine's shapes: the reference frame joins the clip as one more latent frame.
        gen = torch.Generator(device).manual_seed(0)
        frames = shape[2] + (1 if tree["policy"]["options"]["use_reference"] else 0)
        x = torch.randn(shape[0], shape[1], frames, *shape[3:], generator=gen, device=device).to(dtype)
        t = torch.full((shape[0],), 600.0, device=device)
        text = torch.randn(shape[0], sc.text_len, sc.dit["text_dim"], generator=gen, device=device).to(dtype)
        res["dit_input"] = list(x.shape)

        bare = bare_dit(built["paths"]["dit"], device, dtype, ckpt)
        forward, forward_backward = calls(bare, x, t, text, None)
        leaf = x.detach().requires_grad_(True)
        res["flops_forward"], res["flops_forward_backward"] = scale.model_flops(
            bare, forward, lambda: bare(leaf, timestep=t, encoder_hidden_states=text, return_dict=False)[0].float().mean())
        timed("bare_eager_forward", forward)
        timed("bare_eager_train", forward_backward, max(1, args.repeats // 2 + 1))
        if args.profile:
            profile("bare_eager_forward", forward, device, out)
        t0 = time.perf_counter()
        bare.compile_repeated_blocks(fullgraph=True)
        forward()
        res["compile_s"]["bare"] = round(time.perf_counter() - t0, 1)
        timed("bare_compiled_forward", forward)
        timed("bare_compiled_train", forward_backward, max(1, args.repeats // 2 + 1))
        if args.profile:
            profile("bare_compiled_forward", forward, device, out)
        del bare, forward, forward_backward
        free(device)

        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer

        from editrl.policies.viva.backbones import BACKBONES

        lora = tree["optim"]["lora"]
        peer = bare_dit(built["paths"]["dit"], device, dtype, ckpt)
        peer.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=BACKBONES["wan"].lora_targets))
        params = [q for q in peer.parameters() if q.requires_grad]
        for q in params:
            q.data = q.data.float()
        res["peer_lora_layers"] = sum(isinstance(m, LoraLayer) for m in peer.modules())
        forward, forward_backward = calls(peer, x, t, text, params, autocast=torch.bfloat16)
        timed("peer_forward", forward)
        peer.train()
        timed("peer_train", forward_backward, max(1, args.repeats // 2 + 1))
        del peer, forward, forward_backward, params
        free(device)

        if args.attention_sweep:  # the bare DiT, eager, under each attention backend that runs here
            from editrl.policy import ATTENTION_BACKENDS, attention_problem

            bare = bare_dit(built["paths"]["dit"], device, dtype, ckpt)
            forward, forward_backward = calls(bare, x, t, text, None)
            for name, backend in ATTENTION_BACKENDS.items():
                if attention_problem(name, device) is None:
                    bare.set_attention_backend(backend)
                    timed(f"attention_{name}_forward", forward)
                    timed(f"attention_{name}_train", forward_backward, max(1, args.repeats // 2 + 1))
            del bare, forward, forward_backward
            free(device)
        if args.targets:  # last: the rows above do not wait for its compile
            engine("engine_targets", [f"optim.lora.targets={args.targets}"])
            free(device)
    res["peak_tflops"] = scale.dense_peak_tflops(device)
    save()
    return res


def report(res: dict[str, Any], console: Console) -> str:
    sec, peak = res["seconds"], res.get("peak_tflops")
    fwd, both = res["flops_forward"], res["flops_forward_backward"]
    table = Table(f"DiT call (batch {res['dit_input'][0]}, {res['scale']})", "forward s", "TFLOP/s", "train s",
                  "TFLOP/s", "/ bare compiled")
    rows = [("bare, eager", "bare_eager"), ("bare, compiled", "bare_compiled"),
            ("peer-style (fp32 LoRA, bf16 autocast, eager)", "peer"), ("engine", "engine"),
            ("engine, LoRA on --targets", "engine_targets")]
    rows += [(f"bare, eager, attention {k[len('attention_'):-len('_forward')]}", k[:-len("_forward")])
             for k in sec if k.startswith("attention_") and k.endswith("_forward")]
    base = sec.get("bare_compiled_forward"), sec.get("bare_compiled_train")

    def cell(value: Any, flops: float) -> tuple[str, str]:
        if not isinstance(value, float):
            return ("-" if value is None else "error", "")
        return f"{value:.4f}", f"{flops / value / 1e12:.3g}"

    for label, key in rows:
        f, tr = sec.get(f"{key}_forward"), sec.get(f"{key}_train")
        if f is None and tr is None:
            continue
        ratio = " / ".join(f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "-"
                           for a, b in zip((f, tr), base))
        table.add_row(label, *cell(f, fwd), *cell(tr, both), ratio)
    console.print(table)
    if peak:
        console.print(f"dense peak measured here: {peak:.3g} TFLOP/s ({res['device_name']}); one forward = "
                      f"{fwd / 1e12:.3g} TFLOP, forward+backward = {both / 1e12:.3g} TFLOP (model FLOPs)")
    e = res["engine"]
    console.print(f"engine: {e['dtype']}, compiled={e['compiled']}, {e['trainable_m']} M trained weights; rollout call "
                  f"== training forward: {e['rollout_equals_training']} (max |log ratio| {e['max_abs_log_ratio']:.1e}); "
                  f"compile seconds {res['compile_s']}")

    def ratio(a: str, b: str) -> str:
        x, y = sec.get(a), sec.get(b)
        return f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) else "nan"

    return (f"dit-floor scale={res['scale']} device={res['device']} engine/bare-compiled: "
            f"forward {ratio('engine_forward', 'bare_compiled_forward')}, train {ratio('engine_train', 'bare_compiled_train')}; "
            f"peer-style/engine {ratio('peer_forward', 'engine_forward')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=list(scale.SCALES), default="cpu", help="named configuration (default: cpu)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row; the fastest counts (default 5)")
    ap.add_argument("--compile", choices=["true", "false"], default=None,
                    help="the engine's policy.options.compile (default: the policy's, on for CUDA)")
    ap.add_argument("--profile", action="store_true",
                    help="also write torch.profiler tables of the engine's calls and the bare forward (prof_*.txt)")
    ap.add_argument("--attention-sweep", action="store_true",
                    help="also time the bare DiT (eager) under each attention backend that runs here")
    ap.add_argument("--targets", default=None, help="also time the engine with these LoRA targets, e.g. '[to_q,to_k,to_v,to_out.0]'")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="dit_floor.json goes here (default: $OUT, else a temp dir)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    args.out = args.out or tempfile.mkdtemp(prefix="editrl-dit-floor-")
    console = Console(width=130)
    res = run(args, console)
    console.log(f"results: {Path(args.out) / 'dit_floor.json'} ({res['elapsed_s']:.0f} s in all)")
    print(report(res, console), flush=True)


if __name__ == "__main__":
    main()
