"""`editrl export RUN --to DIR [--merge]`: a run's trained weights in the formats diffusers users load.

- `pytorch_lora_weights.safetensors`: the LoRA in diffusers' LoRA format (keys `transformer.<module>.lora_A.weight`,
  its rank and alpha in the file's metadata), written by the matching pipeline's `save_lora_weights`, so that
  pipeline's `load_lora_weights(DIR)` loads it onto the base transformer.
- `transformer/` (`--merge`): the transformer with the LoRA merged, a diffusers model folder (`from_pretrained`).
  Without `--merge` it is written only when the run changed the base transformer itself (VIVA's SFT trains the whole
  DiT): the LoRA then belongs on that one, not on the published base.
- `<name>.safetensors` for every other trained module (VIVA's token refiner), with its constructor arguments in
  `<name>.json` when the module records them (`arguments`).
- `recipe.yaml` (what was trained, and on which base) and `README.md` (how to load all of it).

The weights are the ones evaluations score: a checkpoint of a run with `optim.ema.enabled` exports its EMA weights.
Only typer is imported at module level (this module is loaded for every `editrl` command).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import typer

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
# The diffusers pipeline whose LoRA loader fits each denoiser class (a policy with another denoiser adds its line).
PIPELINES = {"WanTransformer3DModel": "WanPipeline", "HunyuanVideoTransformer3DModel": "HunyuanVideoPipeline"}


def check_destination(out: Path, ckpt: Path, overwrite: bool) -> None:
    """Refuses, before anything is loaded, a destination that would overwrite the run or other files."""
    from editrl.base import DataError

    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    target, protected = out.resolve(), [run.resolve(), ckpt.resolve()]
    if any(target == p or target in p.parents or p in target.parents for p in protected):
        raise DataError(f"--to {out}: it overlaps the run {run}; export to a folder outside it")
    if out.exists() and not out.is_dir():
        raise DataError(f"--to {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"--to {out} is not empty: choose another folder, or pass --overwrite to replace it")


def apply_ema(policy: Any, ckpt: Path) -> bool:
    """Loads the checkpoint's EMA weights into the policy's trainable parameters; False when it has none."""
    import torch

    state_file = ckpt / "state.pt"
    if not state_file.is_file():
        return False
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    if state.get("ema") is None:
        return False
    from diffusers.training_utils import EMAModel

    params = policy.trainable_parameters()
    ema = EMAModel(params)
    ema.load_state_dict(state["ema"])
    ema.copy_to(params)
    return True


def pipeline_class(denoiser: Any) -> Any:
    import diffusers

    from editrl.base import CheckpointError

    name = PIPELINES.get(type(denoiser).__name__)
    if name is None:
        raise CheckpointError(
            f"no diffusers pipeline is known for a {type(denoiser).__name__} (known: {', '.join(PIPELINES)}): "
            "add it to editrl.export.PIPELINES"
        )
    return getattr(diffusers, name)


def write_export(policy: Any, recipe: Any, out: Path, merge: bool, ema: bool) -> list[str]:
    """Everything into the empty folder `out`; the names of what was written."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from editrl.base import CheckpointError
    from editrl.config import dump_recipe

    denoiser = policy.denoiser
    pipeline = pipeline_class(denoiser)
    written: list[str] = []
    if getattr(policy, "has_lora", False):
        layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}
        pipeline.save_lora_weights(
            out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=denoiser.peft_config["default"].to_dict()
        )
        written.append(LORA_FILE)
    elif merge:
        raise CheckpointError("--merge: this run trained no LoRA (optim.lora), so there is nothing to merge")
    base_changed = getattr(policy, "dit_in_checkpoint", False)
    if merge or base_changed:
        if merge:
            denoiser.fuse_lora()
            denoiser.unload_lora()
        elif policy.has_lora:
            denoiser = _without_lora(denoiser)
        denoiser.save_pretrained(out / "transformer")
        written.append("transformer/")
    extras = []
    for name, module in policy.extra_trainable.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(out / f"{name}.safetensors"))
        written.append(f"{name}.safetensors")
        arguments = getattr(module, "arguments", None)
        if arguments is not None:
            (out / f"{name}.json").write_text(json.dumps(arguments, indent=1))
            written.append(f"{name}.json")
        extras.append((name, type(module), arguments is not None))
    dump_recipe(recipe, out / "recipe.yaml")
    written.append("recipe.yaml")
    (out / "README.md").write_text(readme(recipe, pipeline.__name__, written, extras, merge, base_changed, ema))
    return written + ["README.md"]


def _without_lora(denoiser: Any) -> Any:
    """A copy of the denoiser with its LoRA layers removed (the base weights as trained), the policy's left as is."""
    import copy

    bare = copy.deepcopy(denoiser)
    bare.unload_lora()
    return bare


def readme(
    recipe: Any, pipeline: str, written: list[str], extras: list[tuple[str, type, bool]], merge: bool,
    base_changed: bool, ema: bool,
) -> str:
    """How to load what `write_export` wrote, in diffusers, with the base the run trained on."""
    options = recipe.policy.options
    named = options.get("dit") or options.get("pretrained")
    base = f"`{named}`" if named else "built by the policy from recipe.yaml's policy.options"
    lines = [
        f"# {recipe.run.name}: exported from editrl",
        "",
        f"Policy `{recipe.policy.name}`, trained by editrl (recipe.yaml holds the whole recipe)"
        + (", with the EMA of its weights (optim.ema)." if ema else "."),
        "",
        "Files: " + ", ".join(f"`{w}`" for w in written + ["README.md"]) + ".",
        "",
    ]
    if merge:
        lines += ["`transformer/` holds the transformer with the LoRA merged into it:", "", "```python",
                  f"from diffusers import {pipeline}, AutoModel", "",
                  'transformer = AutoModel.from_pretrained("DIR/transformer")',
                  f'pipe = {pipeline}.from_pretrained("BASE_PIPELINE", transformer=transformer)', "```", ""]
    if LORA_FILE in written:
        host = '"DIR/transformer"' if base_changed and not merge else None
        lines += [f"`{LORA_FILE}` is the LoRA (rank {recipe.optim.lora.rank}, alpha {recipe.optim.lora.alpha}) in "
                  f"diffusers' format, for `{pipeline}.load_lora_weights`"
                  + (" on the transformer in `transformer/` (this run trained the base transformer too):" if host
                     else f" on the base transformer ({base}):"), "", "```python"]
        if host:
            lines += [f"from diffusers import AutoModel, {pipeline}", "", f"transformer = AutoModel.from_pretrained({host})",
                      f'pipe = {pipeline}.from_pretrained("BASE_PIPELINE", transformer=transformer)']
        else:
            lines += [f"from diffusers import {pipeline}", "", f'pipe = {pipeline}.from_pretrained("BASE_PIPELINE")']
        lines += ['pipe.load_lora_weights("DIR")', "```", "",
                  "`BASE_PIPELINE` is the diffusers pipeline repo or folder of that base (its VAE, scheduler, ...). "
                  f'Without a pipeline: `transformer.load_lora_adapter("DIR", weight_name="{LORA_FILE}", '
                  'prefix="transformer")`.', ""]
    for name, cls, has_arguments in extras:
        build = f"{cls.__name__}(**json.load(open(\"DIR/{name}.json\")))" if has_arguments else f"{cls.__name__}(...)"
        lines += [f"`{name}.safetensors` holds the trained `{name}` ({cls.__module__}.{cls.__name__}):", "", "```python",
                  "import json", "", "from safetensors.torch import load_file", f"from {cls.__module__} import {cls.__name__}", "",
                  f"{name} = {build}", f'{name}.load_state_dict(load_file("DIR/{name}.safetensors"))', "```", ""]
    if extras:
        lines += ["The whole editor (these parts wired together as the policy does) runs in editrl: "
                  "`editrl edit --checkpoint RUN ...` with the run directory this was exported from.", ""]
    return "\n".join(lines)


def export_run(run: Path, out: Path, merge: bool = False, overwrite: bool = False) -> tuple[Path, list[str], bool]:
    """(the checkpoint exported, what was written into `out`, whether the weights are the EMA's)."""
    from editrl.checkpoint import find_checkpoint, load_checkpoint
    from editrl.monitor import quiet_libraries

    ckpt = find_checkpoint(run)
    check_destination(out, ckpt, overwrite)
    policy, recipe = load_checkpoint(ckpt)
    ema = apply_ema(policy, ckpt)
    # Written under a temporary name and swapped in: a failed export leaves the old folder (or none).
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with quiet_libraries():
            written = write_export(policy, recipe, tmp, merge, ema)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return ckpt, written, ema


def export(
    run: Path = typer.Argument(..., help="a run directory (its newest intact checkpoint) or a checkpoint directory"),
    to: Path = typer.Option(..., "--to", help="the folder to write (must be empty or new)"),
    merge: bool = typer.Option(False, "--merge", help="also write transformer/: the transformer with the LoRA merged"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --to folder"),
) -> None:
    """Export a run's weights for diffusers: the LoRA in diffusers' format (`load_lora_weights`), with --merge the
    merged transformer, the other trained modules (VIVA's refiner), and a README saying how to load them.

    Examples:
      editrl export runs/quickstart/grpo --to exports/quickstart
      editrl export runs/quickstart/grpo --to exports/quickstart-merged --merge
    """
    from editrl.commands import console, run_cli

    def go() -> None:
        ckpt, written, ema = export_run(run, to, merge, overwrite)
        weights = "EMA weights" if ema else "weights"
        console.print(f"exported the {weights} of {ckpt} to {to}: {', '.join(written)}", highlight=False)

    run_cli(go)


def register(app: typer.Typer) -> None:
    app.command()(export)
