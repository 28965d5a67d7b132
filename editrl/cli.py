"""`editrl` command line: train, sft, eval, edit, sweep, data, judge, and listings."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RL post-training of flow-matching video models.")

# Commands that live beside the code they drive; each module exposes `register(app)`.
COMMAND_MODULES = [
    "editrl.commands",
    "editrl.inference",
    "editrl.data.cli",
    "editrl.judge",
]


def main() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    app()
