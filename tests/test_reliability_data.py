"""Issue 14, part B: damaged checkpoints fall back, `data check` decodes, `editrl edit` refuses what would lose work,
manifests stay in their folder. Every failure is one line naming the thing, exit 2 (or 1 for `data check`'s list),
and each case also checks that nothing was lost: inputs unchanged, the intact checkpoint used, good rows kept."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

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


DAMAGE = [
    ("adapter.safetensors", truncate, r"adapter\.safetensors has \d+ of its \d+ bytes"),
    ("state.pt", truncate, r"state\.pt has \d+ of its \d+ bytes"),
    ("state.pt", flip_byte, r"state\.pt does not match its checksum"),
    ("recipe.yaml", Path.unlink, r"recipe\.yaml is missing"),
    (CHECKSUMS, truncate, r"checksums\.json is damaged"),
    (CHECKSUMS, not_a_table, r"checksums\.json is damaged"),
    ("state.json", cut_without_checksums, r"state\.json is damaged"),
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


CHECKS = [
    (with_half, "bad row:", r"manifest.jsonl:3: cannot read video .*clips/half.mp4 after \d frames \(cut short or damaged\? re-export it\)"),
    (with_small, "mixed sizes:", r"source clips differ in size \(2 of 5 frames of 32x32, 1 of 5 frames of 16x24\).*: clips/small.mp4 \(line 3\)"),
    (with_short_target, "bad row:", r"manifest.jsonl:3: target clips/short.mp4 is 3 frames of 32x32 but source is 5 frames of 32x32"),
    (with_outside, "bad row:", r"manifest.jsonl:3: source ../elsewhere.mp4 is outside the data folder .*: move it in, or allow it with the data option allow_outside: true"),
    (with_small_mask, "bad row:", r"manifest.jsonl:3: mask clips/m.npz is \(5, 1, 16, 16\); a source of 5 frames of 32x32 needs \(5, 1, 32, 32\)"),
    (with_folder_as_source, "bad row:", r"manifest.jsonl:3: source clips is not a file"),
    (with_blank_source, "bad row:", r"manifest.jsonl:3: source: must not be empty"),
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
