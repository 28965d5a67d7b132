"""The manifest loader: a user's own folder, every kind of bad row (with its line number), masks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from editrl.data.base import build_dataset
from editrl.data.manifest import (
    ManifestDataset,
    ManifestError,
    load_manifest,
    load_mask,
    save_mask,
    write_manifest,
    write_sample,
)
from editrl.data.video import MediaError, write_image, write_video
from editrl.types import EditSample


def video(t: int = 5, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    """Random frames already on the 8-bit grid, so a lossless round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, 3, h, w), generator=g).float() / 255


def user_folder(root: Path, rows: list[dict | str]) -> Path:
    """A folder as a user would make it: their own file names, a manifest with some optional keys."""
    write_video(root / "clips" / "cat.mp4", video(seed=1), lossless=True)
    write_video(root / "clips" / "dog.mp4", video(seed=2), lossless=True)
    write_video(root / "clips" / "dog_edit.mp4", video(seed=3), lossless=True)
    write_image(root / "refs" / "hat.png", video(1, seed=4)[0])
    (root / "clips" / "broken.mp4").write_bytes(b"this is not a video")
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


GOOD = [
    {"id": "cat", "instruction": "give the cat a hat", "source": "clips/cat.mp4", "reference": "refs/hat.png"},
    {"id": "dog", "instruction": "make the dog blue", "source": "clips/dog.mp4", "target": "clips/dog_edit.mp4",
     "category": "recolor", "meta": {"origin": "phone"}},
]


def test_a_users_folder_loads_with_only_the_keys_it_has(tmp_path):
    root = user_folder(tmp_path, [*GOOD, ""])  # a blank line is allowed
    ds = build_dataset("manifest", {"path": str(root)})
    assert isinstance(ds, ManifestDataset) and len(ds) == 2
    cat, dog = ds[0], ds[1]
    assert cat.instruction == "give the cat a hat" and cat.target is None and cat.mask is None
    assert torch.equal(cat.source, video(seed=1))
    assert torch.equal(cat.reference, video(1, seed=4)[0])
    assert torch.equal(dog.target, video(seed=3)) and dog.category == "recolor" and dog.meta == {"origin": "phone"}
    assert ds.categories == [None, "recolor"]
    short = build_dataset("manifest", {"path": str(root / "manifest.jsonl"), "max_frames": 2})
    assert short[1].source.shape[0] == 2 and short[1].target.shape[0] == 2


def test_absolute_paths_work(tmp_path):
    root = user_folder(tmp_path / "data", [])
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "instruction": "x", "source": str(root / "clips/cat.mp4")}) + "\n")
    ds = ManifestDataset(ManifestDataset.Options(path=str(tmp_path / "m.jsonl")))
    assert torch.equal(ds[0].source, video(seed=1))


BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ('["a", "list"]', "a row must be a JSON object"),
    ({"id": "b", "source": "clips/cat.mp4"}, "missing key 'instruction'"),
    ({"id": "b", "instruction": "   ", "source": "clips/cat.mp4"}, "instruction: must not be empty"),
    ({"id": "b", "instruction": "x", "source": "clips/cat.mp4", "refrence": "refs/hat.png"}, "unknown key 'refrence'"),
    ({"id": "b", "instruction": "x", "source": "clips/nope.mp4"}, "source file clips/nope.mp4 not found"),
    ({"id": "b", "instruction": "x", "source": "clips/broken.mp4"}, "cannot read video"),
    ({"id": "b", "instruction": "x", "source": "clips/cat.mp4", "reference": "clips/broken.mp4"}, "cannot read image"),
    ({"id": "cat", "instruction": "x", "source": "clips/cat.mp4"}, "duplicate id 'cat' (first on line 1)"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_a_bad_row_is_reported_with_its_line_number(tmp_path, bad, message, caplog):
    root = user_folder(tmp_path, [GOOD[0], "", bad, GOOD[1]])  # the bad row is on line 3
    with pytest.raises(ManifestError) as err:
        load_manifest(root, on_error="fail")
    assert str(err.value).startswith(f"{root / 'manifest.jsonl'}:3: ")
    assert message in str(err.value)
    with caplog.at_level(logging.WARNING, logger="editrl.data.manifest"):
        ds = ManifestDataset(ManifestDataset.Options(path=str(root), on_error="skip"))
    assert [e.row.id for e in ds.entries] == ["cat", "dog"]
    assert any(":3: " in r.getMessage() and message in r.getMessage() for r in caplog.records)


def test_no_usable_rows_and_missing_manifest(tmp_path):
    root = user_folder(tmp_path, ["{oops"])
    with pytest.raises(ManifestError, match=r"no usable rows \(1 bad rows skipped; first: .*:1: not valid JSON"):
        load_manifest(root, on_error="skip")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_manifest(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError):
        ManifestDataset.Options(path=str(tmp_path / "elsewhere")).check()


def test_shape_mismatch_is_reported_when_the_sample_is_read(tmp_path):
    root = user_folder(tmp_path, [])
    write_video(root / "clips" / "small.mp4", video(5, 8, 8), lossless=True)
    (root / "manifest.jsonl").write_text(
        json.dumps({"id": "a", "instruction": "x", "source": "clips/cat.mp4", "target": "clips/small.mp4"}) + "\n"
    )
    ds = ManifestDataset(ManifestDataset.Options(path=str(root)))
    message = r"manifest.jsonl:1: target clips/small.mp4 is \(5, 3, 8, 8\) but source is \(5, 3, 16, 16\)"
    with pytest.raises(MediaError, match=message):
        ds[0]


def test_masks_in_every_accepted_layout(tmp_path):
    full = torch.rand(5, 1, 8, 8) > 0.5
    save_mask(tmp_path / "a.npz", full)
    assert torch.equal(load_mask(tmp_path / "a.npz"), full)
    save_mask(tmp_path / "b.npz", full[:, 0])
    assert torch.equal(load_mask(tmp_path / "b.npz"), full)
    save_mask(tmp_path / "c.npz", full[0, 0])
    assert torch.equal(load_mask(tmp_path / "c.npz", frames=5), full[0:1].expand(5, 1, 8, 8))
    np.savez(tmp_path / "d.npz", other=np.zeros((2, 2)))
    with pytest.raises(MediaError, match="has no array named 'mask'"):
        load_mask(tmp_path / "d.npz")
    save_mask(tmp_path / "again.npz", full)
    assert (tmp_path / "again.npz").read_bytes() == (tmp_path / "a.npz").read_bytes()  # no timestamp inside


def test_written_samples_read_back_exactly(tmp_path):
    mask = torch.zeros(5, 1, 16, 16, dtype=torch.bool)
    mask[:, :, 4:9, 2:7] = True
    sample = EditSample(
        id="s1", instruction="do it", source=video(seed=5), target=video(seed=6), mask=mask,
        reference=video(1, seed=7)[0], edited=video(seed=8), category="add", meta={"k": [1, 2]},
    )
    write_manifest(tmp_path, [write_sample(tmp_path, sample)])
    back = ManifestDataset(ManifestDataset.Options(path=str(tmp_path)))[0]
    for name in ("source", "target", "mask", "reference", "edited"):
        assert torch.equal(getattr(back, name), getattr(sample, name)), name
    assert (back.id, back.instruction, back.category, back.meta) == ("s1", "do it", "add", {"k": [1, 2]})


def test_data_check_command_lists_bad_rows_by_line(tmp_path):
    import typer

    from editrl.data.cli import register

    cli = typer.Typer()
    register(cli)
    root = user_folder(tmp_path, [GOOD[0], {"id": "x", "instruction": "", "source": "clips/cat.mp4"}, GOOD[1]])
    result = CliRunner().invoke(cli, ["data", "check", str(root)])
    assert result.exit_code == 1
    assert "manifest.jsonl:2: instruction: must not be empty" in result.output
    assert "2 usable rows" in result.output
    result = CliRunner().invoke(cli, ["data", "check", str(root), "--on-error", "fail"])
    assert result.exit_code == 2 and "manifest.jsonl:2:" in result.output and "Traceback" not in result.output
