"""Images as one-frame videos in the data layer and the commands: synthetic image pairs written as PNG, manifests of
png/jpg/webp with image masks, `editrl data check` on them, mixed folders refused, `editrl edit --image` at the input's
size, `editrl eval` and the reward audit on an image folder (temporal metrics n/a, never NaN in a mean)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from editrl.audit import audit
from editrl.data.manifest import ManifestDataset, load_manifest, load_mask, load_sample
from editrl.data.procedural import OPS
from editrl.data.synth import synthesize
from editrl.data.video import MediaError, probe_media, read_image, read_media, write_image, write_media, write_video
from editrl.evaluate import OVERALL, evaluate, yardsticks
from editrl.reward import RewardSet, build_reward


def picture(h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    """(3, H, W) in [0, 1], exactly representable in 8 bits (PNG round trips are exact)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float() / 255


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def write_rows(folder: Path, rows: list[dict]) -> Path:
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def invoke(module: str, *args) -> object:
    import importlib

    app = typer.Typer()
    importlib.import_module(module).register(app)
    app.command("noop", hidden=True)(lambda: None)  # a second command keeps each one a subcommand
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def image_pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "test"
    synthesize(out, 2 * len(OPS), seed=3, frames=1, size=(32, 32), split="test", progress=False)
    return out


# ---------------------------------------------------------------- media I/O


def test_images_read_as_one_frame_videos_in_every_format(tmp_path):
    image = picture()
    write_image(tmp_path / "a.png", image)
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "a.webp", lossless=True)
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "a.JPEG", quality=100, subsampling=0)
    for name, lossless in (("a.png", True), ("a.webp", True), ("a.JPEG", False)):
        frames = read_media(tmp_path / name)
        assert frames.shape == (1, 3, 32, 48) and probe_media(tmp_path / name, decode=True) == (1, 32, 48), name
        error = (frames[0] - image).abs()
        assert error.max() == 0 if lossless else 0 < error.mean() < 0.02, (name, error.mean())
    assert read_image(tmp_path / "a.png", size=(16, 24)).allclose(torch.nn.functional.avg_pool2d(image, 2), atol=1 / 255)
    assert write_media(tmp_path / "one", image[None]).name == "one.png"
    assert write_media(tmp_path / "two", image[None].repeat(5, 1, 1, 1)).name == "two.mp4"


def test_photo_orientation_and_16_bit_grey_are_read_as_shown(tmp_path):
    """A phone photo stored sideways with an EXIF orientation, and a 16-bit PNG that PIL's RGB would turn white."""
    pixels = (picture(20, 30).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif)
    assert probe_media(tmp_path / "photo.jpg") == (1, 30, 20) == probe_media(tmp_path / "photo.jpg", decode=True)
    assert read_media(tmp_path / "photo.jpg").shape == (1, 3, 30, 20)
    Image.fromarray(np.full((4, 6), 30000, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert read_image(tmp_path / "deep.png").allclose(torch.full((3, 4, 6), 30000 / 65535))


def test_image_masks_must_be_black_and_white(tmp_path):
    on = np.zeros((8, 8), dtype=np.uint8)
    on[2:5, 3:6] = 255
    Image.fromarray(on).save(tmp_path / "l.png")
    Image.fromarray(on).convert("1").save(tmp_path / "bits.png")
    Image.fromarray(on // 255).save(tmp_path / "ones.png")
    Image.fromarray(np.stack([on] * 3, -1)).save(tmp_path / "rgb.png")
    for name in ("l.png", "bits.png", "ones.png", "rgb.png"):
        mask = load_mask(tmp_path / name, frames=1)
        assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool and int(mask.sum()) == 9, name
    assert load_mask(tmp_path / "l.png", frames=5).shape == (5, 1, 8, 8)  # one mask for every frame of a video
    grey = on.copy()
    grey[0, 0] = 128
    Image.fromarray(grey).save(tmp_path / "grey.png")
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = on
    Image.fromarray(red).save(tmp_path / "red.png")
    for name, value in (("grey.png", 128), ("red.png", 76)):
        with pytest.raises(MediaError, match=rf"mask .*{name} holds values other than black and white \(e.g. {value}\)"):
            load_mask(tmp_path / name)


# ---------------------------------------------------------------- synthetic image pairs and manifests


def test_synthetic_image_pairs_are_pngs_with_every_category_and_mask(image_pairs):
    rows = rows_of(image_pairs)
    assert sorted({r["category"] for r in rows}) == sorted(OPS)
    assert all(r["source"].endswith(".png") and r["target"].endswith(".png") for r in rows)
    assert not (image_pairs / "videos").exists() and not list(image_pairs.rglob("*.mp4"))
    assert not any("video" in r["instruction"] or "footage" in r["instruction"] for r in rows)
    data = ManifestDataset(ManifestDataset.Options(path=str(image_pairs)))
    for i, row in enumerate(rows):
        sample = data[i]
        assert sample.source.shape == sample.target.shape == (1, 3, 32, 32)
        assert sample.mask.shape == (1, 1, 32, 32) and sample.mask.any()
        assert (sample.reference is not None) == row["category"].startswith("reference")
        # the target differs from the source only inside the mask: the same ground truth as for videos
        assert torch.equal(sample.source[~sample.mask.expand_as(sample.source)], sample.target[~sample.mask.expand_as(sample.target)])


def test_data_check_decodes_images_and_names_bad_rows_by_line(image_pairs, tmp_path):
    folder = tmp_path / "mine"
    (folder / "img").mkdir(parents=True)
    good = write_image(folder / "img" / "a.png", picture())
    write_image(folder / "img" / "b.png", picture(seed=1))
    write_image(folder / "img" / "small.png", picture(16, 16))
    (folder / "img" / "cut.png").write_bytes(good.read_bytes()[:200])
    Image.fromarray(np.full((32, 48), 128, dtype=np.uint8)).save(folder / "img" / "grey_mask.png")
    write_video(folder / "img" / "clip.mp4", picture()[None].repeat(5, 1, 1, 1))
    rows = [
        {"id": "ok", "instruction": "x", "source": "img/a.png", "target": "img/b.png"},
        {"id": "cut", "instruction": "x", "source": "img/cut.png"},
        {"id": "size", "instruction": "x", "source": "img/a.png", "target": "img/small.png"},
        {"id": "mask", "instruction": "x", "source": "img/a.png", "mask": "img/grey_mask.png"},
        {"id": "kind", "instruction": "x", "source": "img/a.png", "target": "img/clip.mp4"},
    ]
    write_rows(folder, rows)
    result = invoke("editrl.data.cli", "data", "check", folder)
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    for line, problem in ((2, "cannot read image"), (3, "target img/small.png is an image of 16x16 but source is an "
                          "image of 32x48"), (4, "mask"), (4, "holds values other than black and white (e.g. 128)"),
                          (5, "target img/clip.mp4 is a video but source img/a.png is an image")):
        assert f"manifest.jsonl:{line}: " in out and problem in out.split(f"manifest.jsonl:{line}: ")[1].split("bad row")[0], (line, out)
    assert "1 usable rows" in out
    clean = invoke("editrl.data.cli", "data", "check", image_pairs)
    assert clean.exit_code == 0 and f"{2 * len(OPS)} usable rows" in clean.output, clean.output


def test_a_manifest_of_images_and_videos_is_refused_in_one_line(tmp_path):
    write_image(tmp_path / "a.png", picture())
    write_video(tmp_path / "b.mp4", picture()[None].repeat(5, 1, 1, 1))
    write_rows(tmp_path, [{"id": "a", "instruction": "x", "source": "a.png"}, {"id": "b", "instruction": "y", "source": "b.mp4"}])
    result = invoke("editrl.data.cli", "data", "check", tmp_path)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert "mixes images and videos (line 1: a.png, line 2: b.mp4)" in " ".join(result.output.split())
    with pytest.raises(Exception, match="mixes images and videos"):
        load_manifest(tmp_path, on_error="skip")  # skipping rows does not make a mixed folder usable


def test_image_rows_load_with_image_masks_and_references(tmp_path):
    write_image(tmp_path / "a.jpg", picture())
    write_image(tmp_path / "ref.webp", picture(10, 10))
    on = np.zeros((32, 48), dtype=np.uint8)
    on[:8] = 255
    Image.fromarray(on).save(tmp_path / "m.png")
    write_rows(tmp_path, [{"id": "a", "instruction": "x", "source": "a.jpg", "target": "a.jpg", "mask": "m.png",
                           "reference": "ref.webp"}])
    sample = load_sample(load_manifest(tmp_path, decode=True)[0])
    assert sample.source.shape == (1, 3, 32, 48) and sample.reference.shape == (3, 10, 10)
    assert sample.mask.shape == (1, 1, 32, 48) and int(sample.mask.sum()) == 8 * 48


# ---------------------------------------------------------------- editrl edit --image, eval, audit


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """The tiny VIVA editor trained one step on image pairs (its Wan VAE takes 4k+1 frames: 1 = 4*0+1), with a
    held-out evaluation on images before and after."""
    from editrl.preflight import load_recipe
    from editrl.trainer import train

    run = tmp_path_factory.mktemp("grpo") / "run"
    return train(load_recipe("viva_tiny", [
        f"run.output_dir={run}", "run.threads=null", "train.progress=false", "data.train.options.n=8",
        "data.train.options.frames=1", "train.steps=1", "train.save_every=1", "train.eval_every=1",
        "data.eval={kind: synthetic, options: {n: 4, frames: 1, size: [32, 32], split: eval}}",
    ]))


def test_training_on_images_logs_no_temporal_metric(image_run):
    rows = [json.loads(line) for line in (image_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/oracle/fidelity_ssim" in r]
    assert len(evals) == 2  # before and after the step
    for r in evals:
        assert not any(k.endswith(("temporal", "smoothness")) for k in r), r  # n/a: left out, never NaN
        assert all(not isinstance(v, float) or math.isfinite(v) for v in r.values()), r
        assert "eval/ceiling/fidelity_ssim" in r and "eval/copy/fidelity_ssim" in r


def test_edit_image_writes_a_png_of_the_input_size(image_run, tmp_path):
    pixels = (picture(30, 41).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.jpg")
    out = tmp_path / "edits" / "out.png"
    result = invoke("editrl.inference", "edit", "--checkpoint", image_run, "--image", tmp_path / "in.jpg",
                    "--instruction", "remove the star", "--out", out, "--steps", 2)
    assert result.exit_code == 0, result.output
    assert "note: edited at 32x40 (the size the policy takes), resized back to the input's 30x41" in result.output
    with Image.open(out) as img:
        assert (img.format, img.size, img.mode) == ("PNG", (41, 30), "RGB")
    exact = write_image(tmp_path / "exact.png", picture(32, 32))
    result = invoke("editrl.inference", "edit", "--checkpoint", image_run, "--image", exact, "--instruction", "x",
                    "--out", tmp_path / "exact_out.png", "--steps", 2)
    assert result.exit_code == 0 and "note" not in result.output, result.output
    assert read_media(tmp_path / "exact_out.png").shape == (1, 3, 32, 32)


def test_edit_image_refuses_bad_combinations_in_one_line(image_run, tmp_path, monkeypatch):
    image = write_image(tmp_path / "in.png", picture(32, 32))
    video = write_video(tmp_path / "in.mp4", picture(32, 32)[None].repeat(5, 1, 1, 1))
    cases = [
        (["--image", image, "--video", video, "--out", tmp_path / "o.png"], "give --video (a video to edit) or --image"),
        (["--out", tmp_path / "o.png"], "give --video (a video to edit) or --image"),
        (["--image", image, "--out", tmp_path / "o.mp4"], "give a path ending in .png"),
        (["--image", image, "--out", image], "is the input"),
        (["--image", video, "--out", tmp_path / "o.png"], "give an image file (.png, .jpg, .jpeg, .webp)"),
        (["--video", image, "--out", tmp_path / "o.mp4"], "is an image: give it as --image"),
    ]
    for args, message in cases:
        result = invoke("editrl.inference", "edit", "--checkpoint", image_run, "--instruction", "x", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()) and len(result.output.strip().splitlines()) == 1, (args, result.output)
    from editrl.policies.viva.policy import VivaPolicy

    # A video policy whose VAE cannot take one frame: its conform step leaves no frame to edit.
    monkeypatch.setattr(VivaPolicy, "conform_video", lambda self, v: (v[:0], "1 frame -> 0 frames (the VAE needs 8k+5)"))
    result = invoke("editrl.inference", "edit", "--checkpoint", image_run, "--image", image, "--instruction", "x",
                    "--out", tmp_path / "o.png")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "holds a 'viva' policy, which cannot edit a single frame (1 frame -> 0 frames" in " ".join(result.output.split())
    assert not (tmp_path / "o.png").exists()


def test_eval_on_an_image_folder_prints_tables_with_yardsticks_and_no_temporal_numbers(image_run, image_pairs, tmp_path):
    out = tmp_path / "eval"
    result = invoke("editrl.data.cli", "eval", "--checkpoint", image_run, "--data", image_pairs, "--out", out,
                    "--steps", 2, "--batch-size", 6)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("| category") and "temporal" in line)
    cells = [c.strip() for c in header.strip("|").split("|")]
    body = [line for line in lines[lines.index(header) + 2:] if line.startswith("|")][: len(OPS) + 1]
    assert [row.split("|")[1].strip() for row in body] == [*OPS, f"**{OVERALL}**"]
    for row in body:
        values = dict(zip(cells, (c.strip() for c in row.strip("|").split("|"))))
        assert values["temporal"] == values["smoothness"] == "n/a", row
        assert values["fidelity_psnr"] != "n/a" and values["fidelity_ssim"] != "n/a", row
    yard = next(line for line in lines if line.startswith("| category") and "copy" in line)
    assert "ceiling" in yard and "gap closed" in yard
    overall = next(line for line in lines[lines.index(yard):] if "**overall**" in line)
    assert "n/a" not in overall.split("|")[3:5]  # copy and ceiling of fidelity_psnr
    assert "nan" not in result.output.lower()
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table[-1]["category"] == OVERALL and table[-1]["temporal"] == "" and table[-1]["copy_temporal"] == ""
    assert float(table[-1]["ceiling_fidelity_psnr"]) > float(table[-1]["copy_fidelity_psnr"])
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 3 * 96 and grid.height > len(OPS) * 96  # source | edited | target (| reference), per category


def test_evaluate_and_audit_leave_temporal_columns_out_of_every_mean(image_pairs):
    data = ManifestDataset(ManifestDataset.Options(path=str(image_pairs)))
    report = evaluate(lambda s: torch.stack([x.target for x in s]), data, batch_size=4, progress=False,
                      yardsticks=yardsticks(data, batch_size=4, progress=False))
    overall = report.overall()
    assert overall["fidelity_ssim"] == 1.0 and math.isnan(overall["temporal"]) and math.isnan(overall["copy_temporal"])
    assert overall["copy_fidelity_ssim"] < 1.0
    terms = RewardSet([("fidelity", 1.0, build_reward("oracle_fidelity", {"metric": "psnr"}))])
    reports = audit(data, terms, batch_size=4, progress=False)
    for term, r in reports.items():
        row = r.table()[-1]
        assert math.isnan(row["vs_frozen"]), term  # an image frozen on its first frame is the target itself
        assert row["vs_source"] > 0.5 and math.isfinite(row["spearman"]), term


@pytest.mark.parametrize("name", ["qwen_image_edit", "flux_kontext"])
def test_image_policies_edit_an_image_at_its_size_and_evaluate_on_images(name, image_pairs, tmp_path):
    """The image editors' tiny pipelines after one Edit-GRPO step: `editrl edit --image` of an odd-sized JPEG (the
    policy edits at its 16-pixel grid, the PNG comes back at the input's size) and `editrl eval` with both yardsticks."""
    from editrl.preflight import load_recipe
    from editrl.trainer import train

    run = train(load_recipe(f"{name}_tiny", [f"run.output_dir={tmp_path / 'run'}", "run.threads=null",
                                             "train.progress=false", "data.train.options.n=8", "train.steps=1",
                                             "train.save_every=1"]))
    pixels = (picture(30, 41).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.jpg")
    result = invoke("editrl.inference", "edit", "--checkpoint", run, "--image", tmp_path / "in.jpg", "--instruction",
                    "remove the star", "--out", tmp_path / "out.png", "--steps", 2)
    assert result.exit_code == 0, result.output
    assert "resized back to the input's 30x41" in result.output
    with Image.open(tmp_path / "out.png") as img:
        assert (img.format, img.size) == ("PNG", (41, 30))
    result = invoke("editrl.data.cli", "eval", "--checkpoint", run, "--data", image_pairs, "--out", tmp_path / "eval",
                    "--steps", 2, "--limit", 4)
    assert result.exit_code == 0, result.output
    with (tmp_path / "eval" / "results.csv").open() as f:
        overall = list(csv.DictReader(f))[-1]
    assert overall["temporal"] == "" and float(overall["ceiling_fidelity_psnr"]) > float(overall["copy_fidelity_psnr"])
