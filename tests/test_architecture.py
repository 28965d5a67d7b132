"""The engine's layers import only downward (docs/architecture.md): no import cycle, imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each package of the installed `editrl` namespace lives in the repository.
PACKAGES = {"editrl": ROOT / "editrl", "editrl.policies": ROOT / "policies", "editrl.rewards": ROOT / "rewards"}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The editrl modules `name` imports anywhere in its body (`from x import y` counts y when it is a module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# The layers of docs/architecture.md, lowest first. A module may import its own layer and the ones below.
LAYERS = [
    {"base", "types", "registry", "data.video"},  # shared vocabulary, plugin registries, media I/O
    {"config", "monitor"},  # the recipe schema; the console, logs and progress bars
    {"sde", "grpo", "metrics"},  # the maths: pure tensor functions
    {"policy", "reward", "data.base", "preflight"},  # what plugins implement, and the checks of a recipe against them
    {"data.manifest", "data.prompts", "data.scenes", "data.procedural", "data.synth"},  # datasets
    {"harness", "checkpoint", "distributed", "rollout", "evaluate", "sft", "trainer", "summary", "sentinel"},  # the loop
    {"commands", "cli", "inference", "export", "judge", "audit", "sweep", "data.cli", "__main__"},  # commands: the console's owner
]


def layer_of(module: str) -> int | None:
    short = module.removeprefix("editrl.")
    return next((i for i, names in enumerate(LAYERS) if short in names), None)


def test_every_engine_module_has_a_layer():
    engine = [m for m in graph() if not m.startswith(("editrl.policies", "editrl.rewards")) and m not in ("editrl", "editrl.data")]
    assert [m for m in engine if layer_of(m) is None] == []


def test_layers_import_only_downward():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in graph().items()
        if layer_of(m) is not None
        for t in targets
        if layer_of(t) is not None and layer_of(t) > layer_of(m)  # type: ignore[operator]
    ]
    assert not upward, "\n".join(upward)


def test_plugins_never_import_the_loop():
    loop = LAYERS[5] | LAYERS[6]
    bad = [
        f"{m} imports {t}"
        for m, targets in graph().items()
        if m.startswith(("editrl.policies", "editrl.rewards"))
        for t in targets
        if t.removeprefix("editrl.") in loop
    ]
    assert not bad, "\n".join(bad)
