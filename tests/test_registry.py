"""Registries: lazy strings, entry points, duplicates, did-you-mean."""

import sys
import textwrap

import pytest

from editrl.registry import Registry, RegistryError


def test_lazy_strings_and_decorator():
    reg = Registry("thing", builtins={"path": "pathlib:Path"})
    import pathlib

    assert reg.get("path") is pathlib.Path

    @reg.register("mine")
    class Mine:
        pass

    assert reg.get("mine") is Mine and reg.names() == ["mine", "path"]
    assert reg.get("os.path:join") is __import__("os").path.join


def test_duplicates_raise():
    reg = Registry("thing")
    reg.register("a", int)
    reg.register("a", int)  # the same object again is harmless
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a", float)


def test_unknown_names_suggest():
    reg = Registry("reward", builtins={"vlm_fidelity": "x:y", "vlm_aesthetics": "x:z"})
    with pytest.raises(RegistryError, match="did you mean 'vlm_fidelity'"):
        reg.get("vlm_fidelty")
    with pytest.raises(RegistryError, match="no attribute"):
        reg.get("os:no_such_thing")
    with pytest.raises(RegistryError, match="cannot import"):
        reg.get("no_such_module_xyz:thing")


def test_entry_points_are_discovered(tmp_path, monkeypatch):
    """A user's installed package adds a reward without touching editrl."""
    (tmp_path / "user_rewards.py").write_text("def sharpness(instructions, **kw):\n    return [1.0] * len(instructions)\n")
    dist = tmp_path / "user_rewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-rewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [editrl.test_rewards]
        sharpness = user_rewards:sharpness
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("reward", "editrl.test_rewards")
    assert "sharpness" in reg.names()
    assert reg.get("sharpness")(["a", "b"]) == [1.0, 1.0]
    clash = Registry("reward", "editrl.test_rewards", builtins={"sharpness": "os:getcwd"})
    with pytest.raises(RegistryError, match="clashes"):
        clash.names()
    sys.modules.pop("user_rewards", None)


def test_build_turns_a_user_plugins_start_up_fault_into_one_line_and_keeps_editrls_own():
    from editrl.base import RecipeError

    def user_factory(path: str) -> None:
        raise FileNotFoundError(f"no such file: {path}")

    def own_factory() -> None:
        raise RuntimeError("a bug")

    own_factory.__module__ = "editrl.policies.viva.policy"
    reg: Registry = Registry("policy", "editrl.test")
    reg.register("mine")(user_factory)
    reg.register("ours")(own_factory)
    with pytest.raises(RecipeError, match=r"^policy 'mine' could not be built: FileNotFoundError: no such file: w.pt$"):
        reg.build("mine", "w.pt")
    with pytest.raises(RuntimeError, match="a bug"):  # editrl's own plugin: a bug keeps its traceback
        reg.build("ours")
