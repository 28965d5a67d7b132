"""`editrl edit` with a GRPO checkpoint of the tiny VIVA policy: playable output, conformed inputs, clear errors."""

import av
import pytest
import torch
import typer
from typer.testing import CliRunner

from editrl.preflight import load_recipe
from editrl.data.video import read_video, write_image, write_video
from editrl.inference import register
from editrl.trainer import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("grpo") / "run"
    return train(load_recipe("viva_tiny", [
        f"run.output_dir={run}", "run.threads=null", "train.progress=false", "data.train.options.n=8",
        "train.steps=1", "train.save_every=1",
    ]))


def edit(*args):
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, ["edit", *map(str, args)])


def test_edit_writes_a_playable_mp4_of_the_right_length(checkpoint, tmp_path):
    src = write_video(tmp_path / "in.mp4", torch.rand(9, 3, 32, 48), fps=12)
    ref = write_image(tmp_path / "ref.png", torch.rand(3, 20, 20))
    out = tmp_path / "out" / "edited.mp4"
    result = edit("--checkpoint", checkpoint, "--video", src, "--instruction", "make the sky red", "--reference", ref,
                  "--out", out, "--steps", 4)
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output and "wrote" in result.output
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and float(stream.average_rate) == 12
    assert read_video(out).shape == (9, 3, 32, 48)


def test_odd_frame_counts_and_sizes_are_conformed_with_a_note(checkpoint, tmp_path):
    src = write_video(tmp_path / "odd.mp4", torch.rand(7, 3, 30, 40), fps=8)
    out = tmp_path / "odd_out.mp4"
    result = edit("--checkpoint", checkpoint, "--video", src, "--instruction", "remove the ball", "--out", out, "--steps", 2)
    assert result.exit_code == 0, result.output
    assert "note: 7 frames of 30x40 -> 5 frames of 32x40" in result.output
    assert read_video(out).shape == (5, 3, 32, 40)


def test_unreadable_inputs_are_one_line_errors(checkpoint, tmp_path):
    good = write_video(tmp_path / "good.mp4", torch.rand(5, 3, 32, 32))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01 not a video" * 50)
    bad_png = tmp_path / "bad.png"
    bad_png.write_text("not an image")
    cases = [
        (["--video", corrupt], f"cannot read video {corrupt}"),
        (["--video", tmp_path / "missing.mp4"], "video not found"),
        (["--video", good, "--reference", bad_png], f"cannot read image {bad_png}"),
        (["--video", good, "--checkpoint", tmp_path], f"no checkpoint in {tmp_path}"),
    ]
    for args, message in cases:
        if "--checkpoint" not in args:
            args = [*args, "--checkpoint", checkpoint]
        result = edit(*args, "--instruction", "x", "--out", tmp_path / "never.mp4")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "never.mp4").exists()
