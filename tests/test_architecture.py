"""docs/architecture.md held against the code: the engine's layers import only downward (no import cycle, imports
inside functions too), the engine calls nothing of a policy beyond the `Policy` protocol, and the document's table of
extension points is the registries that exist."""

from __future__ import annotations

import ast
import importlib
import re
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
    {"base", "types", "registry", "files", "data.video"},  # shared vocabulary, plugin registries, the user's files, media I/O
    {"config", "monitor"},  # the recipe schema; the console, logs and progress bars
    {"sde", "grpo", "metrics"},  # the maths: pure tensor functions
    {"policy", "reward", "objectives", "data.base", "preflight"},  # what plugins implement; a recipe's checks against them
    {"data.manifest", "data.prompts", "data.scenes", "data.procedural", "data.synth"},  # datasets
    {"harness", "checkpoint", "distributed", "rollout", "evaluate", "sft", "trainer", "summary", "sentinel", "job"},  # the loop
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


# ---------------------------------------------------------------------------------------------- the policy contract

# `editrl export` writes a LoRA in diffusers' format: it works on LoraPolicy's members (its denoiser, adapter, extra
# modules) and refuses any other policy in one line.
LORA_POLICY_ONLY = {"editrl.export"}
# In the schema, `self.policy` is the recipe's policy section (PolicyConfig), not a policy.
SCHEMA = {"editrl.config"}


def policy_members_used() -> dict[str, set[str]]:
    """What each engine module reads of a policy, from its syntax tree: `policy.x` and `self.policy.x`,
    `getattr(policy, "x")` / `hasattr(...)`, and `isinstance(policy, Reconstructs)` (its `reconstruct`)."""

    def is_policy(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id == "policy") or (
            isinstance(node, ast.Attribute) and node.attr == "policy" and isinstance(node.value, ast.Name) and node.value.id == "self")

    out: dict[str, set[str]] = {}
    for name, path in modules().items():
        if layer_of(name) is None or name in LORA_POLICY_ONLY | SCHEMA:
            continue
        used = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and is_policy(node.value):
                used.add(node.attr)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2 and is_policy(node.args[0]):
                second = node.args[1]
                if node.func.id in ("getattr", "hasattr") and isinstance(second, ast.Constant):
                    used.add(second.value)
                elif node.func.id == "isinstance" and isinstance(second, ast.Name) and second.id == "Reconstructs":
                    used.add("reconstruct")
        if used:
            out[name] = used
    return out


def test_the_engine_calls_nothing_of_a_policy_beyond_the_protocol():
    from editrl.policy import OPTIONAL, Policy

    contract = {n for n in vars(Policy) if not n.startswith("_")} | set(OPTIONAL)
    assert {"encode", "velocity", "decode", "save_trainable", "modules_for_training", "encode_target"} <= contract
    found = policy_members_used()
    assert "editrl.trainer" in found and "velocity" in found["editrl.trainer"]  # the scan sees the engine's calls
    beyond = {m: sorted(used - contract) for m, used in found.items() if used - contract}
    assert not beyond, f"engine modules call policy members outside editrl.policy.Policy / OPTIONAL: {beyond}"


# ---------------------------------------------------------------------------------------------- extension points


def test_architecture_doc_lists_every_extension_point():
    """Each row of the document's table names a registry (`module:NAME`) and its entry-point group, and every registry
    of the engine has a row."""
    from editrl.registry import Registry

    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| [^|]+ \| `(editrl[\w.]*:[A-Z_]+)` \| `(editrl\.\w+)` \|", doc, flags=re.M)
    assert len(rows) >= 6, rows
    documented = {}
    for where, group in rows:
        module, _, attr = where.partition(":")
        registry = getattr(importlib.import_module(module), attr)
        assert isinstance(registry, Registry) and registry.group == group, (where, group)
        documented[id(registry)] = where
    existing = {}
    for name in modules():
        if layer_of(name) is not None and not name.endswith("__main__"):  # importing __main__ would run the CLI
            for attr, value in vars(importlib.import_module(name)).items():
                if isinstance(value, Registry):
                    existing[id(value)] = f"{name}:{attr}"
    assert set(existing) == set(documented), sorted(set(existing.values()) ^ set(documented.values()))
