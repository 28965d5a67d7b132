"""The reward audit on constructed edits whose orderings are known: rank correlation against a hand-computed case and
scipy, preferences of oracle and pixel rewards over each foil, the report files and `editrl judge --audit`."""

import math

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from editrl.audit import FOILS, ORACLE, audit, candidates, prefers, ranks, spearman, write_audit
from editrl.base import DataError
from editrl.reward import RewardSet, build_reward
from editrl.types import EditSample

COLORS = [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0), (1.0, 0.0, 1.0)]


def recolor(i: int, category: str) -> EditSample:
    """A random background sliding one pixel per frame; the target paints a static square in the mask."""
    g = torch.Generator().manual_seed(i)
    base = torch.rand(3, 16, 16, generator=g)
    source = torch.stack([base.roll(t, -1) for t in range(5)])
    mask = torch.zeros(5, 1, 16, 16, dtype=torch.bool)
    mask[..., 4:10, 4:10] = True
    target = torch.where(mask, torch.tensor(COLORS[i]).view(1, 3, 1, 1), source)
    return EditSample(id=f"s{i}", instruction=f"paint the square {i}", source=source, target=target, mask=mask, category=category)


DATA = [recolor(i, "recolor" if i < 3 else "add") for i in range(5)]


def rewards() -> RewardSet:
    terms = [
        ("fidelity", build_reward("oracle_fidelity", {"metric": "psnr"})),
        ("preservation", build_reward("oracle_preservation", {"metric": "psnr"})),
        ("copy", build_reward("pixel_preservation", {"metric": "psnr", "outside_mask": False})),  # prefers no edit
    ]
    return RewardSet([(name, 1.0, r) for name, r in terms])


def test_ranks_share_ties_and_spearman_matches_a_hand_computed_case():
    assert ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    # ranks of b: 1, 2, 3.5, 5, 3.5; centred products sum to 8, squares to 10 and 9.5
    assert spearman(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 6, 7, 8, 7])) == pytest.approx(8 / math.sqrt(95))
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 1, 1])))  # a constant has no order
    assert math.isnan(spearman(torch.tensor([1.0, math.nan, 3]), torch.tensor([1.0, 2, 3])))  # two pairs left


def test_spearman_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = torch.randint(0, 5, (9,), generator=g).double()  # many ties
        b = a + torch.randn(9, generator=g)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)


def test_prefers_counts_ties_half_and_skips_missing_scores():
    assert [prefers(2, 1), prefers(1, 1), prefers(1, 2)] == [1.0, 0.5, 0.0]
    assert math.isnan(prefers(math.nan, 1.0)) and math.isnan(prefers(1.0, math.nan))


def test_candidates_are_the_target_and_its_foils():
    s, t = DATA[0].source[None], DATA[0].target[None]
    c = candidates(s, t, None, torch.Generator().manual_seed(0))
    assert list(c) == ["target", *(f for f in FOILS if f != "wrong_edit")]
    assert torch.equal(c["half_edit"], (s + t) / 2) and torch.equal(c["frozen"][0, 4], t[0, 0])
    assert all(v.shape == t.shape for v in c.values()) and 0 <= float(c["noisy"].min()) <= float(c["noisy"].max()) <= 1


def test_pixel_and_oracle_rewards_prefer_what_they_measure():
    reports = audit(DATA, rewards(), batch_size=2, progress=False)
    assert list(reports) == [ORACLE, "fidelity", "preservation", "copy"]
    overall = {term: r.overall() for term, r in reports.items()}
    # The oracle scores the target perfectly and every foil lower, and orders candidates as itself.
    assert all(overall[ORACLE][f"vs_{f}"] == 1.0 for f in FOILS) and overall[ORACLE]["spearman"] == pytest.approx(1.0)
    # Fidelity (inside the mask) beats every foil but the frozen target: the painted square does not move.
    assert {f: overall["fidelity"][f"vs_{f}"] for f in FOILS} == {f: 0.5 if f == "frozen" else 1.0 for f in FOILS}
    # Preservation (outside the mask) cannot tell the target from the source or the half-done edit.
    assert {f: overall["preservation"][f"vs_{f}"] for f in FOILS} == {
        f: 0.5 if f in ("source", "half_edit") else 1.0 for f in FOILS
    }
    # Whole-frame closeness to the source rewards doing nothing: it prefers both to the target, every time.
    assert overall["copy"]["vs_source"] == 0.0 and overall["copy"]["vs_half_edit"] == 0.0
    assert [(e["category"], e["n"]) for e in reports["fidelity"].table()] == [("add", 2), ("recolor", 3), ("overall", 5)]


def test_a_batch_of_one_takes_its_wrong_edit_from_an_earlier_batch():
    rows = audit(DATA, rewards(), batch_size=1, progress=False)["preservation"].rows
    assert math.isnan(rows[0]["vs_wrong_edit"])  # the first sample has no other target yet
    assert [r["vs_wrong_edit"] for r in rows[1:]] == [1.0] * 4


def test_data_without_ground_truth_is_refused():
    unpaired = [EditSample(id="u", instruction="x", source=DATA[0].source)]
    with pytest.raises(DataError, match="no sample has both a source and a target"):
        audit(unpaired, rewards(), progress=False)


def test_report_files(tmp_path):
    paths = write_audit(audit(DATA, rewards(), progress=False), tmp_path, title="constructed")
    md = paths["markdown"].read_text()
    assert md.startswith("# Reward audit: constructed") and "| term | n | vs_source |" in md and "## copy" in md
    lines = paths["table"].read_text().splitlines()
    assert lines[0] == "term,category,n,vs_source,vs_wrong_edit,vs_half_edit,vs_blurred,vs_noisy,vs_frozen,spearman"
    assert len(lines) == 1 + 4 * 3  # 4 terms x (2 categories + overall)
    assert len(paths["samples"].read_text().splitlines()) == 1 + 4 * 5
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_judge_audit_command(tmp_path):
    from editrl import judge as judge_cmd
    from editrl.data.manifest import write_manifest, write_sample

    write_manifest(tmp_path / "data", [write_sample(tmp_path / "data", s) for s in DATA])
    recipe = {
        "run": {"name": "audited"},
        "policy": {"name": "toy_t2v"},
        "data": {"train": {"kind": "manifest", "options": {"path": str(tmp_path / "data")}}},
        "rewards": [{"name": "oracle_fidelity", "options": {"metric": "psnr"}}, {"name": "temporal_consistency"}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    app = typer.Typer()
    judge_cmd.register(app)
    app.command("noop", hidden=True)(lambda: None)
    runner = CliRunner()
    args = ["judge", "-r", str(tmp_path / "r.yaml"), "--audit", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "| oracle_fidelity | 5 |" in result.output and "| temporal_consistency | 5 |" in result.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"audit.md", "audit.csv", "audit_samples.csv", "audit.png"}
    both = runner.invoke(app, [*args, "--data", str(tmp_path / "data")])
    assert both.exit_code == 2 and "one of them" in both.output
