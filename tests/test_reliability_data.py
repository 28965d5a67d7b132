"""Issue 14, part B, and issue 26: damaged checkpoints fall back (checksums, else each file's format), `data check`
decodes and refuses masks that are not masks, every writer refuses an output over an input, manifests stay in their
folder (links followed). Every failure is one line naming the thing, exit 2 (or 1 for `data check`'s list), and each
case also checks that nothing was lost: inputs unchanged, the intact checkpoint used, good rows kept."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import av
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from editrl.base import CheckpointError, DataError, EditrlError
from editrl.checkpoint import CHECKSUMS, find_checkpoint, load_checkpoint
from editrl.config import resolve_recipe_path
from editrl.data.manifest import ManifestDataset, ManifestError, load_manifest
from editrl.data.video import MediaError, probe_video, read_video, write_video
from editrl.preflight import load_recipe
from editrl.trainer import train


def cli(*modules: str) -> typer.Typer:
    import importlib

    app = typer.Typer()
    for name in modules:
        importlib.import_module(name).register(app)
    return app


def invoke(module: str, *args: object):
    return CliRunner().invoke(cli(module), [str(a) for a in args])


def one_line_error(result, code: int = 2) -> str:
    """The output of a refused command: exit `code`, no traceback, a single line."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def clip(t: int = 5, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, 3, h, w), generator=g).float() / 255


def half_clip(path: Path, frames: int = 5, size: tuple[int, int] = (32, 32)) -> Path:
    """A clip cut in half as a download or copy cut short leaves it: index first (faststart), so its header still
    opens and says `frames`, but the second half of the frames is gone."""
    whole = write_video(path.with_suffix(".whole.mp4"), clip(frames, *size, seed=9), lossless=True)
    with av.open(str(whole)) as src, av.open(str(path), "w", options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    whole.unlink()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def folder(root: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy run with two checkpoints (step 1 and step 2, both with checksums)."""
    run = tmp_path_factory.mktemp("toy") / "run"
    return train(load_recipe("toy", [
        f"run.output_dir={run}", "run.threads=null", "train.progress=false", "train.steps=2", "train.save_every=1",
        "grpo.batch_size=4", "grpo.group_size=2",
    ]))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def not_a_table(path: Path) -> None:
    path.write_text("[1, 2]")


def cut_without_checksums(path: Path) -> None:
    """A checkpoint written before checksums existed, whose state.json was cut short."""
    (path.parent / CHECKSUMS).unlink()
    truncate(path)


def unlisted(damage):
    """`damage` to a checkpoint with no checksums.json (written before checksums existed)."""
    def apply(path: Path) -> None:
        (path.parent / CHECKSUMS).unlink()
        damage(path)

    apply.__name__ = f"{damage.__name__}_unlisted"
    return apply


def flip_with_empty_checksums(path: Path) -> None:
    (path.parent / CHECKSUMS).write_text("{}")
    flip_byte(path)


DAMAGE = [
    ("adapter.safetensors", truncate, r"adapter\.safetensors has \d+ of its \d+ bytes"),
    ("state.pt", truncate, r"state\.pt has \d+ of its \d+ bytes"),
    ("state.pt", flip_byte, r"state\.pt does not match its checksum"),
    ("recipe.yaml", Path.unlink, r"recipe\.yaml is missing"),
    (CHECKSUMS, truncate, r"checksums\.json is damaged"),
    (CHECKSUMS, not_a_table, r"checksums\.json is damaged"),
    ("state.json", cut_without_checksums, r"state\.json is damaged"),
    # no checksums.json, or an empty one: each file is checked by its format before safetensors or torch reads it
    ("adapter.safetensors", unlisted(truncate), r"adapter\.safetensors (has \d+ bytes where its header says \d+|is damaged)"),
    ("adapter.safetensors", unlisted(Path.unlink), r"it holds no weights"),
    ("state.pt", unlisted(truncate), r"state\.pt is damaged"),
    ("state.pt", flip_with_empty_checksums, r"state\.pt is damaged \(.* fails its CRC\)"),
    ("recipe.yaml", unlisted(flip_byte), r"recipe\.yaml is damaged"),
]


@pytest.mark.parametrize("name,damage,problem", DAMAGE, ids=[f"{n}-{d.__name__}" for n, d, _ in DAMAGE])
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(toy_run, tmp_path, caplog, name, damage, problem):
    run = shutil.copytree(toy_run, tmp_path / "run")
    newest, older = run / "checkpoints" / "step_000002", run / "checkpoints" / "step_000001"
    intact = {f.name: f.read_bytes() for f in older.iterdir()}
    damage(newest / name)
    with caplog.at_level(logging.WARNING, logger="editrl.checkpoint"):
        assert find_checkpoint(run) == older
        policy, _ = load_checkpoint(run)
    [record] = {r.getMessage() for r in caplog.records}  # the same line each time the run directory is resolved
    assert record.startswith(f"checkpoint {newest} (") and "is damaged; using step_000001, the newest intact one" in record
    assert re.search(problem, record), record
    assert {f.name: f.read_bytes() for f in older.iterdir()} == intact and newest.is_dir()  # nothing deleted
    with pytest.raises(CheckpointError, match=rf"checkpoint {newest} is damaged: {problem}; give the run directory {run}"):
        find_checkpoint(newest)


def test_resume_continues_from_the_intact_checkpoint(toy_run, tmp_path, capsys, caplog):
    run = shutil.copytree(toy_run, tmp_path / "run")
    truncate(run / "checkpoints" / "step_000002" / "state.pt")
    recipe = load_recipe(run / "recipe.yaml", [f"run.output_dir={run}", "train.steps=3"])
    with caplog.at_level(logging.WARNING, logger="editrl.checkpoint"):
        train(recipe, resume=True)
    assert "step_000002 (state.pt has" in caplog.text and "using step_000001" in caplog.text
    assert "continuing at step 1" in " ".join(capsys.readouterr().err.split())
    assert json.loads((find_checkpoint(run) / "state.json").read_text())["step"] == 3


def test_all_checkpoints_damaged_is_one_line(toy_run, tmp_path):
    run = shutil.copytree(toy_run, tmp_path / "run")
    for step in ("step_000001", "step_000002"):
        truncate(run / "checkpoints" / step / "adapter.safetensors")
    with pytest.raises(CheckpointError):
        find_checkpoint(run)
    line = one_line_error(invoke("editrl.data.cli", "eval", "--checkpoint", run, "--data", tmp_path))
    assert f"no intact checkpoint in {run}: step_000002 (adapter.safetensors has" in line
    assert "step_000001 (adapter.safetensors has" in line and "restore the files, or start the run over" in line


def test_checkpoints_without_checksums_still_load(toy_run, tmp_path):
    run = shutil.copytree(toy_run, tmp_path / "run")
    for ckpt in (run / "checkpoints").glob("step_*"):
        (ckpt / CHECKSUMS).unlink()
    assert find_checkpoint(run).name == "step_000002"
    load_checkpoint(run)


class Code:
    """What a state.pt written by someone else may hold: an object whose unpickling runs a command."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_state_pt_with_code_is_refused_without_advice_to_load_it(toy_run, tmp_path, monkeypatch):
    """Even with its checksums rewritten to match: torch's own error would suggest weights_only=False."""
    from editrl.checkpoint import write_checksums

    monkeypatch.chdir(tmp_path)
    run = shutil.copytree(toy_run, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_000002"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    torch.save({**state, "extra": Code()}, ckpt / "state.pt")
    (ckpt / CHECKSUMS).unlink()
    write_checksums(ckpt)
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors, which editrl never writes") as e:
        train(load_recipe(run / "recipe.yaml", [f"run.output_dir={run}", "train.steps=3"]), resume=True)
    assert "weights_only" not in str(e.value) and not (tmp_path / "pwned").exists()


def test_checkpoints_are_ordered_by_step_not_by_name(toy_run, tmp_path):
    """Past step 999,999 the names sort wrongly: step_1000000 < step_999999."""
    from editrl.checkpoint import save_checkpoint

    run = shutil.copytree(toy_run, tmp_path / "run")
    root = run / "checkpoints"
    (root / "step_000001").rename(root / "step_999999")
    (root / "step_000002").rename(root / "step_1000000")
    (root / "latest").unlink()  # without `latest`, the highest step wins
    assert find_checkpoint(run) == root / "step_1000000"
    policy, recipe = load_checkpoint(run)
    save_checkpoint(run, 1000001, recipe, policy, {}, {"cursor": 0}, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_1000000", "step_1000001"]  # 999999 pruned, not newer


# ---------------------------------------------------------------- data check


GOOD = [
    {"id": "a", "instruction": "make it red", "source": "clips/a.mp4", "target": "clips/a_tgt.mp4"},
    {"id": "b", "instruction": "make it blue", "source": "clips/b.mp4"},
]


def good_folder(root: Path) -> Path:
    for name, seed in (("a", 1), ("a_tgt", 2), ("b", 3)):
        write_video(root / "clips" / f"{name}.mp4", clip(seed=seed), lossless=True)
    return root


def with_half(root: Path) -> dict:
    half_clip(root / "clips" / "half.mp4")
    return {"id": "half", "instruction": "x", "source": "clips/half.mp4"}


def with_small(root: Path) -> dict:
    write_video(root / "clips" / "small.mp4", clip(5, 16, 24), lossless=True)
    return {"id": "small", "instruction": "x", "source": "clips/small.mp4"}


def with_short_target(root: Path) -> dict:
    write_video(root / "clips" / "short.mp4", clip(3), lossless=True)
    return {"id": "c", "instruction": "x", "source": "clips/b.mp4", "target": "clips/short.mp4"}


def with_outside(root: Path) -> dict:
    write_video(root.parent / "elsewhere.mp4", clip(), lossless=True)
    return {"id": "out", "instruction": "x", "source": "../elsewhere.mp4"}


def with_small_mask(root: Path) -> dict:
    from editrl.data.manifest import save_mask

    save_mask(root / "clips" / "m.npz", torch.zeros(5, 1, 16, 16, dtype=torch.bool))
    return {"id": "m", "instruction": "x", "source": "clips/b.mp4", "mask": "clips/m.npz"}


def with_folder_as_source(root: Path) -> dict:
    return {"id": "d", "instruction": "x", "source": "clips"}


def with_blank_source(root: Path) -> dict:
    return {"id": "e", "instruction": "x", "source": " "}


def with_fraction_mask(root: Path) -> dict:
    import numpy as np

    np.savez(root / "clips" / "f.npz", mask=np.where(np.arange(32) < 16, 0.75, 0.25) * np.ones((5, 32, 32)))
    return {"id": "f", "instruction": "x", "source": "clips/b.mp4", "target": "clips/a_tgt.mp4", "mask": "clips/f.npz"}


def with_nan_mask(root: Path) -> dict:
    import numpy as np

    mask = np.ones((5, 32, 32), dtype=np.float32)
    mask[2, 3, 4] = np.nan
    np.savez(root / "clips" / "n.npz", mask=mask)
    return {"id": "n", "instruction": "x", "source": "clips/b.mp4", "mask": "clips/n.npz"}


def with_link_outside(root: Path) -> dict:
    """A symlink inside the folder that leads out of it (frames a judge server would receive)."""
    write_video(root.parent / "secret.mp4", clip(), lossless=True)
    (root / "clips" / "link.mp4").symlink_to(root.parent / "secret.mp4")
    return {"id": "l", "instruction": "x", "source": "clips/link.mp4"}


def with_linked_folder_outside(root: Path) -> dict:
    (root.parent / "elsewhere").mkdir()
    write_video(root.parent / "elsewhere" / "c.mp4", clip(), lossless=True)
    (root / "more").symlink_to(root.parent / "elsewhere")
    return {"id": "lf", "instruction": "x", "source": "more/c.mp4"}


CHECKS = [
    (with_half, "bad row:", r"manifest.jsonl:3: cannot read video .*clips/half.mp4 after \d frames \(cut short or damaged\? re-export it\)"),
    (with_small, "mixed sizes:", r"source clips differ in size \(2 of 5 frames of 32x32, 1 of 5 frames of 16x24\).*: clips/small.mp4 \(line 3\)"),
    (with_short_target, "bad row:", r"manifest.jsonl:3: target clips/short.mp4 is 3 frames of 32x32 but source is 5 frames of 32x32"),
    (with_outside, "bad row:", r"manifest.jsonl:3: source ../elsewhere.mp4 is outside the data folder .*: move it in, or allow it with the data option allow_outside: true"),
    (with_small_mask, "bad row:", r"manifest.jsonl:3: mask clips/m.npz is \(5, 1, 16, 16\); a source of 5 frames of 32x32 needs \(5, 1, 32, 32\)"),
    (with_folder_as_source, "bad row:", r"manifest.jsonl:3: source clips is not a file"),
    (with_blank_source, "bad row:", r"manifest.jsonl:3: source: must not be empty"),
    (with_fraction_mask, "bad row:", r"manifest.jsonl:3: mask .*clips/f.npz holds values other than 0 and 1 \(e.g. 0.75\): a mask is binary"),
    (with_nan_mask, "bad row:", r"manifest.jsonl:3: mask .*clips/n.npz holds values other than 0 and 1 \(e.g. nan\)"),
    (with_link_outside, "bad row:", r"manifest.jsonl:3: source clips/link.mp4 \(a link to .*/secret.mp4\) is outside the data folder"),
    (with_linked_folder_outside, "bad row:", r"manifest.jsonl:3: source more/c.mp4 \(a link to .*/elsewhere/c.mp4\) is outside"),
]


@pytest.mark.parametrize("make,label,message", CHECKS, ids=[m.__name__ for m, _, _ in CHECKS])
def test_data_check_decodes_and_names_the_files(tmp_path, make, label, message):
    root = good_folder(tmp_path / "data")
    folder(root, [*GOOD, make(root)])
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    result = invoke("editrl.data.cli", "data", "check", root)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    problem = next(line for line in result.output.splitlines() if line.startswith(label))
    assert re.search(message, problem), problem
    usable = 3 if make is with_small else 2
    assert f"{usable} usable rows" in result.output  # the good rows are kept and counted
    fail = one_line_error(invoke("editrl.data.cli", "data", "check", root, "--on-error", "fail"))
    assert re.search(message, fail), fail
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_a_folder_of_only_bad_rows_lists_them_before_the_error(tmp_path):
    root = good_folder(tmp_path / "data")
    folder(root, [with_half(root), with_folder_as_source(root)])
    result = invoke("editrl.data.cli", "data", "check", root)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["bad row", "bad row", "error"]
    assert "clips/half.mp4 after" in lines[0] and "no usable rows" in lines[2]


def test_a_good_folder_passes_and_the_outside_opt_out_works(tmp_path):
    root = good_folder(tmp_path / "data")
    folder(root, [*GOOD, with_outside(root)])
    result = invoke("editrl.data.cli", "data", "check", root, "--allow-outside")
    assert result.exit_code == 0 and "3 usable rows" in result.output, result.output
    ds = ManifestDataset(ManifestDataset.Options(path=str(root), allow_outside=True))
    assert torch.equal(ds[2].source, clip())
    with pytest.raises(ManifestError, match="is outside the data folder"):
        ManifestDataset(ManifestDataset.Options(path=str(root)))
    absolute_inside = {"id": "abs", "instruction": "x", "source": str(root / "clips" / "b.mp4")}
    assert len(load_manifest(folder(root, [*GOOD, absolute_inside]))) == 3


def test_read_video_scales_while_decoding_as_area_averaging_does(tmp_path):
    """`editrl edit` reads a large input at its scaled size: each frame is averaged down as it is decoded."""
    blocks = clip(3, 8, 12).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 4x4 blocks of one colour
    path = write_video(tmp_path / "big.mp4", blocks, lossless=True)
    small = read_video(path, size=(8, 12))
    assert small.shape == (3, 3, 8, 12)
    expected = torch.nn.functional.avg_pool2d(read_video(path), 4)
    assert (small - expected).abs().max() < 2.5 / 255  # exact up to swscale's rounding


def test_probe_video_decodes_to_the_frame_count_and_size(tmp_path):
    path = write_video(tmp_path / "v.mp4", clip(7, 16, 24), lossless=True)
    assert probe_video(path, decode=True) == (7, 16, 24)
    half = half_clip(tmp_path / "half.mp4", frames=9)
    assert probe_video(half) == (9, 32, 32)  # its header still claims every frame: why headers are not enough
    with pytest.raises(MediaError, match="cannot read video"):
        probe_video(half, decode=True)


# ---------------------------------------------------------------- a clip that fails mid-run


@pytest.fixture(scope="module")
def viva_run(tmp_path_factory):
    """Edit-GRPO on a manifest whose second row's clip is cut in half, `on_error: skip`, two steps (both rows drawn).
    Returns (run directory, captured stderr)."""
    base = tmp_path_factory.mktemp("viva")
    root = good_folder(base / "data")
    half = with_half(root)
    folder(root, [GOOD[0], {**half, "target": "clips/a_tgt.mp4"}])
    tree = yaml.safe_load(resolve_recipe_path("viva_tiny").read_text())
    tree["data"]["train"] = {"kind": "manifest", "options": {"path": str(root), "on_error": "skip"}}
    tree["run"] |= {"output_dir": str(base / "run"), "threads": None}
    tree["train"] |= {"steps": 2, "save_every": 1, "progress": False}
    tree["grpo"] |= {"batch_size": tree["grpo"]["group_size"]}  # one request per step
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("editrl.data.manifest")
    handler = Keep()
    log.addHandler(handler)
    try:
        run = train(load_recipe(tree))
    finally:
        log.removeHandler(handler)
    return run, root, records


def test_training_skips_a_clip_that_fails_to_decode_mid_run(viva_run):
    run, root, records = viva_run
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 2
    assert find_checkpoint(run).name == "step_000002"  # nothing lost: both steps trained and saved
    [message] = records
    assert message.startswith(f"skipping row: {root / 'manifest.jsonl'}:2: cannot read video")
    assert message.endswith("; the next row takes its place")


def test_on_error_fail_names_the_row_and_the_fix(viva_run):
    _, root, _ = viva_run
    ds = ManifestDataset(ManifestDataset.Options(path=str(root)))  # headers open: the damage shows when decoding
    with pytest.raises(MediaError, match=r"manifest.jsonl:2: cannot read video .*set on_error: skip\)"):
        ds[1]
    assert isinstance(MediaError("x"), DataError) and isinstance(ManifestError("x"), EditrlError)


# ---------------------------------------------------------------- editrl edit


def edit(checkpoint: Path, video: Path, out: Path, *more: object):
    return invoke("editrl.inference", "edit", "--checkpoint", checkpoint, "--video", video, "--instruction", "x",
                  "--out", out, "--steps", 2, *more)


def test_edit_refuses_outputs_that_would_lose_work(tmp_path):
    """Checked before the checkpoint is even looked at (this one does not exist)."""
    video = write_video(tmp_path / "in.mp4", clip())
    ref = tmp_path / "ref.mp4"
    ref.write_bytes(video.read_bytes())
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "link.mp4").symlink_to(video)
    cases = [
        (video, f"--out {video} is the input {video}: choose another path"),
        (tmp_path / "link.mp4", "is the input"),
        (tmp_path / "sub" / ".." / "in.mp4", "is the input"),
        (ref, f"--out {ref} is the input {ref}"),
        (tmp_path / "a_file" / "out.mp4", "cannot write there"),
        (tmp_path / "out.avi", "give a path ending in .mp4"),
        (tmp_path / "folder.mp4", "is a folder"),
    ]
    before = video.read_bytes()
    for out, message in cases:
        line = one_line_error(edit(tmp_path / "no-checkpoint", video, out, "--reference", ref))
        assert message in line, (out, line)
    assert video.read_bytes() == before and ref.read_bytes() == before


def test_edit_refuses_a_text_to_video_checkpoint(toy_run, tmp_path):
    video = write_video(tmp_path / "in.mp4", clip())
    line = one_line_error(edit(toy_run, video, tmp_path / "out.mp4"))
    assert "holds a 'toy_t2v' policy, which makes videos from text and ignores a source" in line
    assert not (tmp_path / "out.mp4").exists()


def test_edit_scales_a_large_input_down_to_the_training_size(viva_run, tmp_path):
    run, _, _ = viva_run
    video = write_video(tmp_path / "big.mp4", clip(5, 96, 128))
    result = edit(run, video, tmp_path / "out.mp4")
    assert result.exit_code == 0, result.output
    assert "note: 96x128 scaled to 28x37, the pixel count the checkpoint was trained at (32x32)" in result.output
    assert "note: 5 frames of 28x37 -> 5 frames of 28x36 (the VAE needs" in result.output  # then the VAE's grid
    assert read_video(tmp_path / "out.mp4").shape == (5, 3, 28, 36)
    kept = edit(run, video, tmp_path / "kept.mp4", "--keep-size")
    assert kept.exit_code == 0 and "scaled" not in kept.output, kept.output
    assert read_video(tmp_path / "kept.mp4").shape == (5, 3, 96, 128)


# ---------------------------------------------------------------- every writer: outputs never over inputs


def judged_folder(root: Path) -> Path:
    """A folder of edits to score: rows with `edited` clips, a reference image named like an eval output."""
    from editrl.data.video import write_image

    good_folder(root)
    write_image(root / "clips" / "grid.png", clip(1)[0])
    rows = [{"id": "a", "instruction": "make it red", "source": "clips/a.mp4", "target": "clips/a_tgt.mp4",
             "edited": "clips/a_tgt.mp4", "reference": "clips/grid.png"},
            {"id": "b", "instruction": "make it blue", "source": "clips/b.mp4", "edited": "clips/b.mp4"}]
    return folder(root, rows)


def contents(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_writers_refuse_an_output_over_an_input(toy_run, tmp_path):
    data = judged_folder(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(resolve_recipe_path("toy").read_text())
    before, run_before = contents(tmp_path), contents(toy_run)
    cases = [
        ("editrl.judge", ["-r", recipe, "-d", data, "--out", data / "manifest.jsonl"],
         f"--out {data / 'manifest.jsonl'} is the input {data / 'manifest.jsonl'}: choose another path"),
        ("editrl.judge", ["-r", recipe, "-d", data, "--out", data / "clips" / ".." / "clips" / "b.mp4"], "is the input"),
        ("editrl.judge", ["-r", recipe, "-d", data, "--out", recipe], f"is the input {recipe}"),
        ("editrl.judge", ["-r", recipe, "--audit", data, "--out", data / "manifest.jsonl"], "is a file: give a folder"),
        ("editrl.data.cli", ["eval", "--checkpoint", toy_run, "--data", data, "--out", data / "clips"],
         f"--out {data / 'clips'}: {data / 'clips' / 'grid.png'} (which it replaces) is the input {data / 'clips' / 'grid.png'}"),
        ("editrl.data.cli", ["eval", "--checkpoint", toy_run, "--data", data, "--device", "cuda:7"], "--device: cuda:7, but"),
        ("editrl.data.cli", ["eval", "--checkpoint", toy_run, "--data", data, "--device", "cpuu"],
         "--device: 'cpuu' is not a device editrl runs on"),
        ("editrl.data.cli", ["data", "synth", "--out", recipe, "--n", 2], f"--out {recipe} is a file: give a folder"),
        ("editrl.data.cli", ["data", "synth", "--out", tmp_path / "big", "--n", 2, "--frames", 5, "--size", 100000, 100000],
         "2 samples of 5 frames of 100000x100000 need about"),
    ]
    for module, args, message in cases:
        line = one_line_error(invoke(module, *args))
        assert message in line, (args, line)
    assert contents(tmp_path) == before and contents(toy_run) == run_before


def test_edit_refuses_an_empty_instruction_and_a_missing_device(toy_run, tmp_path):
    video = write_video(tmp_path / "in.mp4", clip())
    for more, message in [(["--instruction", "  "], "--instruction is empty: say what to change"),
                          (["--instruction", "x", "--device", "cuda"], "--device: cuda, but torch sees no CUDA GPU"),
                          (["--instruction", "x", "--device", "gpu0"], "--device: 'gpu0' is not a device")]:
        result = invoke("editrl.inference", "edit", "--checkpoint", toy_run, "--video", video, "--out",
                        tmp_path / "out.mp4", *more)
        assert message in one_line_error(result)
    assert not (tmp_path / "out.mp4").exists()


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` as a folder nothing can be written in, even by root (immutable); skipped where that cannot be set."""
    path.chmod(0o555)
    locked = os.access(path, os.W_OK) and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if os.access(path, os.W_OK):
            pytest.skip("cannot make a folder read-only for this user")
        yield
    finally:
        if locked:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_eval_into_a_read_only_run_folder_is_one_line_before_the_checkpoint_loads(toy_run, tmp_path):
    run = shutil.copytree(toy_run, tmp_path / "run")
    data = judged_folder(tmp_path / "data")
    with read_only(run):
        line = one_line_error(invoke("editrl.data.cli", "eval", "--checkpoint", run, "--data", data))
    assert f"--out {run / 'eval'}: cannot write there ({run} is not writable" in line, line
    assert not (run / "eval").exists()


def test_judge_exits_2_when_a_reward_fails_on_every_edit(tmp_path, monkeypatch):
    (tmp_path / "always_fails.py").write_text("def r(instructions, **kw):\n    raise RuntimeError('no model')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = judged_folder(tmp_path / "data")
    result = invoke("editrl.judge", "-r", "toy", "-d", data, "--out", tmp_path / "scores.jsonl",
                    'rewards.terms=[{name: brightness}, {name: "always_fails:r"}]', "run.plugins=[always_fails]")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last == ("error: reward 'always_fails:r' scored none of the 2 edits (first: RuntimeError: no model): the "
                    "scores above are not usable"), last
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 2  # what was scored is still written


def test_a_key_given_twice_in_json_is_refused(tmp_path):
    """A manifest row or a DeepSpeed config with a key twice used to keep the last one without a word."""
    from editrl.distributed import deepspeed_config

    root = good_folder(tmp_path / "data")
    (root / "manifest.jsonl").write_text(json.dumps(GOOD[1]) + "\n" + '{"id": "a", "instruction": "x", '
                                         '"source": "clips/a.mp4", "source": "clips/b.mp4"}\n')
    line = one_line_error(invoke("editrl.data.cli", "data", "check", root, "--on-error", "fail"))
    assert line.endswith("manifest.jsonl:2: not valid JSON (key 'source' is given twice)"), line
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "zero_optimization": {"stage": 3}}')
    recipe = load_recipe("toy", ["distributed.backend=deepspeed", f"distributed.config={ds}"])
    with pytest.raises(EditrlError, match=r"distributed.config: .*ds.json is not valid JSON: key 'zero_optimization' is given twice"):
        deepspeed_config(recipe)


def test_eval_refuses_a_mask_that_is_not_a_mask(toy_run, tmp_path):
    """It used to score a 0.25/0.75 mask as all-true: the whole frame as the edit region (16.75 dB instead of 8.42)."""
    root = good_folder(tmp_path / "data")
    folder(root, [GOOD[0], with_fraction_mask(root)])
    before = contents(root)
    line = one_line_error(invoke("editrl.data.cli", "eval", "--checkpoint", toy_run, "--data", root, "--out", tmp_path / "ev"))
    assert re.search(r"manifest.jsonl:2: mask .*clips/f.npz holds values other than 0 and 1 \(e.g. 0.75\)", line), line
    assert contents(root) == before
