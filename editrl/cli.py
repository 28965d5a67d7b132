"""`editrl` command line: train, sft, eval, edit, sweep, data, judge, and listings."""

from __future__ import annotations

import importlib

import typer

HELP = """RL post-training of flow-matching video models: Edit-GRPO for instruction-based video editing.

Start with `editrl train`, the CPU quickstart (about 9 minutes on 2 cores the first time, 4.5 once its cache is
built): it builds a tiny VIVA editor, makes synthetic edit pairs, warms the editor up with SFT, trains it with
Edit-GRPO and ends with a held-out before/after table, where everything is, and what to try next.

A recipe is one YAML file (`editrl recipes` lists the bundled ones); override any field on the command line as
section.field=value. Each command's --help says more.
"""
EXAMPLES = """Examples:
  editrl train                                       the quickstart (recipes/quickstart.yaml)
  editrl train quickstart train.steps=20             the same, shorter
  editrl train viva_grpo --dry-run                   what the paper-scale recipe still needs on this machine
  editrl edit --checkpoint runs/quickstart/grpo --video in.mp4 --instruction "make the car red" --out out.mp4
  editrl eval --checkpoint runs/quickstart/grpo --data DIR
  editrl sweep recipes/sweeps/reward_ablation.yaml
"""

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, epilog=EXAMPLES)

# Commands that live beside the code they drive; each module exposes `register(app)`.
COMMAND_MODULES = [
    "editrl.commands",
    "editrl.inference",
    "editrl.data.cli",
    "editrl.judge",
    "editrl.export",
]


def main() -> None:
    from editrl.monitor import quiet_imports

    quiet_imports()  # before any command imports a plugin (and so bitsandbytes)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    app()
