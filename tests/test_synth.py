"""The procedural pair generator: exact masks for every op, references, determinism, the cached dataset."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from editrl.base import DataError
from editrl.data.base import build_dataset
from editrl.data.manifest import ManifestDataset, write_manifest, write_sample
from editrl.data.procedural import OPS, ProceduralGenerator
from editrl.data.synth import (
    GENERATORS,
    PairGenerator,
    SyntheticDataset,
    sample_rng,
    synthesize,
)
from editrl.types import EditSample

FRAMES, SIZE = 5, (32, 32)
PER_OP = 4


@pytest.fixture(scope="module")
def samples() -> dict[str, list[EditSample]]:
    gen = ProceduralGenerator(FRAMES, SIZE)
    return {op: [gen.generate(op, sample_rng(7, "test", i), f"{op}-{i}") for i in range(PER_OP)] for op in OPS}


def changed(s: EditSample) -> torch.Tensor:
    """(T, 1, H, W): pixels where the target differs from the source in any channel."""
    return (s.target != s.source).any(dim=1, keepdim=True)


@pytest.mark.parametrize("op", OPS)
def test_target_differs_from_source_only_inside_the_mask(samples, op):
    for s in samples[op]:
        assert s.category == op and s.instruction.strip()
        assert s.source.shape == s.target.shape == (FRAMES, 3, *SIZE)
        assert s.mask.shape == (FRAMES, 1, *SIZE) and s.mask.dtype == torch.bool
        diff = changed(s)
        assert not (diff & ~s.mask).any(), f"{s.id}: change outside the mask"
        assert diff.any(), f"{s.id}: the edit changes nothing"
        assert s.meta["global"] == bool(s.mask.all())
        # a local mask is tight: nearly all of it really changes; a tone change leaves some pixels (e.g. greys) as they are
        share = 0.3 if s.meta["global"] else 0.8
        assert diff.sum() >= share * s.mask.sum(), f"{s.id}: mask {int(s.mask.sum())} px, changed {int(diff.sum())} px"


def test_global_and_local_ops_say_so_in_their_masks(samples):
    for s in samples["style"]:
        assert s.mask.all() and s.meta["global"]
    for op in ("add", "remove", "replace", "recolor", "reference_add", "reference_swap"):
        for s in samples[op]:
            assert s.mask.float().mean() < 0.5, f"{s.id}: a local edit with a mask of {s.mask.float().mean():.0%}"
    for s in samples["background"]:
        # everything but the objects may change; the objects (the rest) stay
        assert 0.5 < s.mask.float().mean() < 1.0


def test_reference_ops_carry_the_reference_image_of_the_inserted_object(samples):
    for op in OPS:
        for s in samples[op]:
            assert (s.reference is not None) == op.startswith("reference_"), s.id
    for s in samples["reference_add"] + samples["reference_swap"]:
        assert s.reference.shape == (3, *SIZE)
        assert "reference" in s.instruction.lower()
        ref = (s.reference * 255).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3)
        background = torch.tensor([128, 128, 128], dtype=torch.uint8)
        ref_colors = {tuple(c.tolist()) for c in ref if not torch.equal(c, background)}
        assert ref_colors, f"{s.id}: the reference shows no object"
        tgt = (s.target * 255).round().to(torch.uint8).permute(0, 2, 3, 1)[s.mask[:, 0]]
        inserted = {tuple(c.tolist()) for c in tgt}
        assert ref_colors <= inserted, f"{s.id}: the reference object's colours are not what was inserted"


def test_instructions_vary_within_an_op(samples):
    gen = ProceduralGenerator(FRAMES, SIZE)
    texts = [gen.generate("remove", sample_rng(0, "vary", i), "x").instruction for i in range(30)]
    assert len(set(texts)) >= 25
    openings = collections.Counter(t.split()[0].lower().strip(",.") for t in texts)
    assert len(openings) >= 4, openings
    hybrid = [s.instruction for s in samples["hybrid"]]
    assert all(len(s.meta["ops"]) == 2 for s in samples["hybrid"])
    assert len(set(hybrid)) == len(hybrid)


def test_same_seed_gives_byte_identical_folders_whatever_the_worker_count(tmp_path):
    a = synthesize(tmp_path / "a", len(OPS), seed=3, frames=FRAMES, size=SIZE, workers=1, progress=False).parent
    b = synthesize(tmp_path / "b", len(OPS), seed=3, frames=FRAMES, size=SIZE, workers=2, progress=False).parent
    c = synthesize(tmp_path / "c", len(OPS), seed=4, frames=FRAMES, size=SIZE, workers=1, progress=False).parent

    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    ta, tb = tree(a), tree(b)
    assert ta.keys() == tb.keys() and len(ta) >= 3 * len(OPS)
    assert all(ta[k] == tb[k] for k in ta), [k for k in ta if ta[k] != tb[k]]
    assert (c / "manifest.jsonl").read_bytes() != (a / "manifest.jsonl").read_bytes()
    ds = ManifestDataset(ManifestDataset.Options(path=str(a)))
    assert [s for s in ds.categories] == list(OPS)  # ops taken in turn
    first = ds[0]
    again = ProceduralGenerator(FRAMES, SIZE).generate(OPS[0], sample_rng(3, "train", 0), "train-000000")
    for name in ("source", "target", "mask"):  # what was stored is exactly what was generated
        assert torch.equal(getattr(first, name), getattr(again, name)), name


def test_synthesize_refuses_bad_requests(tmp_path):
    with pytest.raises(ValueError, match=r"unknown op 'recolour' \(did you mean 'recolor'\?\)"):
        synthesize(tmp_path / "x", 2, ops=["recolour"], frames=FRAMES, size=SIZE, progress=False)
    with pytest.raises(ValueError, match="frames must be 4k\\+1"):
        synthesize(tmp_path / "x", 2, frames=6, size=SIZE, progress=False)
    with pytest.raises(ValueError, match="at least 16x16"):
        synthesize(tmp_path / "x", 2, frames=FRAMES, size=(8, 8), progress=False)
    synthesize(tmp_path / "y", 1, frames=FRAMES, size=SIZE, progress=False)
    with pytest.raises(DataError, match="already holds a manifest.jsonl"):
        synthesize(tmp_path / "y", 1, frames=FRAMES, size=SIZE, progress=False)


def test_synthetic_dataset_generates_once_into_its_cache(tmp_path, monkeypatch):
    options = {"n": 4, "seed": 1, "ops": ["add", "reference_swap"], "frames": FRAMES, "size": list(SIZE),
               "split": "test", "cache_dir": str(tmp_path)}
    ds = build_dataset("synthetic", options)
    assert isinstance(ds, SyntheticDataset) and len(ds) == 4
    assert ds.categories == ["add", "reference_swap", "add", "reference_swap"]
    assert ds[1].reference is not None and ds[0].mask is not None
    assert [p.name for p in tmp_path.iterdir()] == [ds.folder.name]  # no temporary folder left behind

    import editrl.data.synth as synth

    monkeypatch.setattr(synth, "synthesize", lambda *a, **k: pytest.fail("regenerated a cached dataset"))
    assert build_dataset("synthetic", options).folder == ds.folder
    train = SyntheticDataset.Options(**{**options, "split": "train"})
    assert train.folder() != ds.folder  # a held-out split is different data
    with pytest.raises(ValueError, match="frames must be 4k\\+1"):
        SyntheticDataset.Options(frames=8)
    with pytest.raises(ValueError, match="unknown op"):
        SyntheticDataset.Options(ops=["ad"]).check()
    with pytest.raises(ValueError, match="unknown pair generator"):
        SyntheticDataset.Options(generator="procedral").check()


def test_scene_options_make_easier_scenes_and_change_nothing_else(samples):
    """still/solid/objects change what they name; the instruction and edit of each sample stay the same."""
    easy = ProceduralGenerator(FRAMES, SIZE, objects=(4, 4), still=True, solid=True)
    assert len(easy._scene(sample_rng(7, "test", 0)).objects) == 4
    for op in ("recolor", "replace", "hybrid"):
        for i, full in enumerate(samples[op]):
            s = easy.generate(op, sample_rng(7, "test", i), f"{op}-{i}")
            assert torch.equal(s.source, s.source[:1].expand_as(s.source))  # a still camera, still objects
            objects = [e for e in s.meta["edits"] if e["op"] not in ("recolor", "background")]
            described = [e[k] for e in objects for k in ("object", "to") if k in e]
            assert all(d.startswith("solid ") for d in described)
            assert (changed(s) <= s.mask).all()
    plain = ProceduralGenerator(FRAMES, SIZE, still=True)
    for i, full in enumerate(samples["recolor"]):
        s = plain.generate("recolor", sample_rng(7, "test", i), f"recolor-{i}")
        assert s.instruction == full.instruction and s.meta["edits"] == full.meta["edits"]


def test_scene_options_are_checked_and_key_the_cache(tmp_path):
    base = {"n": 2, "frames": FRAMES, "size": list(SIZE), "cache_dir": str(tmp_path)}
    default = SyntheticDataset.Options(**base)
    assert SyntheticDataset.Options(**base, scene={}).folder() == default.folder()  # old caches stay valid
    assert SyntheticDataset.Options(**base, scene={"still": True}).folder() != default.folder()
    with pytest.raises(DataError, match="unexpected keyword argument 'stil'"):
        SyntheticDataset.Options(**base, scene={"stil": True}).check()
    with pytest.raises(DataError, match=r"objects must be a range \[lo, hi\] with 2 <= lo <= hi <= 5, got \[1, 3\]"):
        SyntheticDataset.Options(**base, scene={"objects": [1, 3]}).check()
    ds = build_dataset("synthetic", {**base, "scene": {"objects": [2, 2], "still": True, "solid": True}})
    assert len(ds) == 2 and torch.equal(ds[0].source, ds[0].source[:1].expand_as(ds[0].source))


class StripesGenerator:
    """A second generator, the shape a model-based one would have: it returns EditSamples, nothing else."""

    name = "test-stripes"
    version = "1"
    ops = ("style",)

    def __init__(self, frames: int, size: tuple[int, int]) -> None:
        self.frames, self.size = frames, size

    def generate(self, op: str, rng: np.random.Generator, sample_id: str) -> EditSample:
        level = float(rng.integers(0, 256)) / 255
        source = torch.full((self.frames, 3, *self.size), level)
        return EditSample(id=sample_id, instruction="invert it", source=source, target=1 - source,
                          mask=torch.ones(self.frames, 1, *self.size, dtype=torch.bool), category=op)


def test_a_new_generator_plugs_in_without_touching_the_loader(tmp_path):
    assert isinstance(ProceduralGenerator(), PairGenerator)
    assert isinstance(StripesGenerator(FRAMES, SIZE), PairGenerator)
    if "test-stripes" not in GENERATORS.names():
        GENERATORS.register("test-stripes", StripesGenerator)
    synthesize(tmp_path, 3, seed=0, frames=FRAMES, size=SIZE, generator="test-stripes", progress=False)
    ds = ManifestDataset(ManifestDataset.Options(path=str(tmp_path)))
    assert len(ds) == 3 and torch.allclose(ds[2].target, 1 - ds[2].source)
    with pytest.raises(ValueError, match="unknown op 'add'"):
        synthesize(tmp_path / "more", 1, ops=["add"], frames=FRAMES, size=SIZE, generator="test-stripes", progress=False)


def test_data_synth_command(tmp_path):
    import typer

    from editrl.data.cli import register

    cli = typer.Typer()
    register(cli)
    out = tmp_path / "d"
    args = ["data", "synth", "--out", str(out), "--n", "3", "--seed", "2", "--frames", "5", "--size", "32", "32"]
    result = CliRunner().invoke(cli, [*args, "--ops", "remove,style", "--ops", "hybrid"])
    assert result.exit_code == 0, result.output
    assert ManifestDataset(ManifestDataset.Options(path=str(out))).categories == ["remove", "style", "hybrid"]
    result = CliRunner().invoke(cli, [*args, "--ops", "colour"])
    assert result.exit_code == 2 and "unknown op 'colour'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "already holds" in result.output


def test_write_sample_layout_matches_the_manifest_contract(tmp_path, samples):
    s = samples["reference_add"][0]
    row = write_sample(tmp_path, s)
    write_manifest(tmp_path, [row])
    assert row.source == f"videos/{s.id}_src.mp4" and row.target == f"videos/{s.id}_tgt.mp4"
    assert row.reference == f"images/{s.id}_ref.png" and row.mask == f"masks/{s.id}.npz"
    back = ManifestDataset(ManifestDataset.Options(path=str(tmp_path)))[0]
    assert torch.equal(back.reference, s.reference) and torch.equal(back.target, s.target)
