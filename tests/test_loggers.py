"""Where a run's metrics go besides metrics.jsonl: TensorBoard (default) and Weights & Biases (optional, offline here)."""

import json
import re
import struct
from pathlib import Path

import pytest
import yaml

from editrl.base import RecipeError
from editrl.monitor import read_metrics
from editrl.preflight import load_recipe
from editrl.sweep import expand, load_spec
from editrl.trainer import train

WANDB = ["run.loggers=[tensorboard,wandb]", "run.wandb.mode=offline"]


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_records(run: Path) -> list:
    """The records of an offline W&B run's `run-ID.wandb` log, what `wandb sync` uploads (recent wandb versions keep
    the summary and config only there). Its format is LevelDB's log: a 7-byte header (":W&B", magic, version), then
    32 KiB blocks of chunks (crc32, length, kind: 1 whole, 2 first, 3 middle, 4 last), each record a protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run.glob("run-*.wandb")
    data, block = log.read_bytes(), 32768
    assert struct.unpack("<4s", data[:4])[0] == b":W&B"
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def wandb_summary_and_config(run: Path) -> tuple[dict, dict]:
    summary, config = {}, {}
    records = wandb_records(run)
    assert records[-1].HasField("exit")  # the whole run is written once the logger has closed
    for record in records:
        if record.HasField("summary"):
            for u in record.summary.update:
                summary[".".join(u.nested_key) or u.key] = json.loads(u.value_json)
        if record.HasField("run"):
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update if u.key != "_wandb"})
    return summary, config


def test_wandb_offline_run_holds_the_metrics_and_the_recipe(toy_overrides, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra: pip install 'editrl[wandb]'")
    monkeypatch.setenv("WANDB_DIR", "/nonexistent")  # the run's own directory wins
    run = train(load_recipe("toy", toy_overrides + WANDB + ["train.steps=3", "run.name=toy-wandb"]))
    (offline,) = offline_runs(run)
    summary, config = wandb_summary_and_config(offline)
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["step"] == 3 and summary["_step"] == 3
    assert summary["reward/weighted/mean"] == pytest.approx(last["reward/weighted/mean"], rel=1e-6)
    assert {k for k, v in last.items() if v is not None} - {"step", "time"} <= set(summary)
    assert config["run"]["name"] == "toy-wandb" and config == yaml.safe_load((run / "recipe.yaml").read_text())
    assert (run / "tensorboard").is_dir()


def test_a_resumed_run_continues_its_wandb_run(toy_overrides):
    pytest.importorskip("wandb", reason="the wandb extra: pip install 'editrl[wandb]'")
    first = train(load_recipe("toy", toy_overrides + WANDB + ["train.steps=2", "train.save_every=1"]))
    run_id = (first / "wandb-run-id").read_text()
    train(load_recipe("toy", toy_overrides + WANDB + ["train.steps=3"]), resume=True)
    assert (first / "wandb-run-id").read_text() == run_id
    # offline-run-<second>-<id>, with "-1" after the id when both starts fall in one second (wandb's own suffix)
    names = [p.name for p in offline_runs(first)]
    assert len(names) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", n) for n in names), names


def test_tensorboard_only_by_default_and_wandb_alone_writes_no_tensorboard(toy_overrides):
    assert load_recipe("toy", toy_overrides).run.loggers == ["tensorboard"]
    run = train(load_recipe("toy", toy_overrides + ["run.loggers=[]", "train.steps=1"]))
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()
    assert len(read_metrics(run / "metrics.jsonl")) == 1


def test_a_misspelt_logger_or_missing_wandb_is_one_line(toy_overrides, monkeypatch):
    with pytest.raises(RecipeError, match="run.loggers"):
        load_recipe("toy", toy_overrides + ["run.loggers=[tensorbord]"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(RecipeError, match=r"run.loggers: wandb is not installed: pip install 'editrl\[wandb\]'"):
        load_recipe("toy", toy_overrides + WANDB)


def test_sweep_runs_share_a_wandb_group_named_after_the_sweep(tmp_path):
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "lr_scan", "base": "toy", "output_dir": str(tmp_path / "out"),
                                         "grid": {"optim.lr": [0.01, 0.02]}}))
    spec, base = load_spec(spec_file)
    groups = {load_recipe(base, run.overrides).run.wandb.group for run in expand(spec, base)}
    assert groups == {"lr_scan"}
    spec, base = load_spec(spec_file, ["run.wandb.group=mine"])
    assert {load_recipe(base, run.overrides).run.wandb.group for run in expand(spec, base)} == {"mine"}
