"""`editrl judge --audit` through a real vLLM judge (the tiny random Qwen2-VL): the machinery, not the numbers: every
candidate of every sample gets a valid judge score, and the report is written."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.judge


def square_edit(i: int):
    """A square sliding over a gradient; the target recolours it inside the mask."""
    from editrl.types import EditSample

    colors = [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)]
    y = torch.linspace(0, 1, 32).view(1, 32, 1).expand(3, 32, 32)
    source = y.unsqueeze(0).repeat(5, 1, 1, 1) * 0.6
    target, mask = source.clone(), torch.zeros(5, 1, 32, 32, dtype=torch.bool)
    for t in range(5):
        source[t, :, 8:20, 2 + 3 * t : 14 + 3 * t] = torch.tensor(colors[i]).view(3, 1, 1)
        target[t, :, 8:20, 2 + 3 * t : 14 + 3 * t] = torch.tensor(colors[(i + 1) % 3]).view(3, 1, 1)
        mask[t, :, 8:20, 2 + 3 * t : 14 + 3 * t] = True
    return EditSample(id=f"e{i}", instruction="make the square another colour", source=source, target=target,
                      mask=mask, category="recolor")


def test_audit_scores_every_candidate_through_the_server(judge_server, tmp_path, invoke_judge):
    from editrl.audit import COLUMNS, ORACLE
    from editrl.data.manifest import write_manifest, write_sample

    write_manifest(tmp_path / "data", [write_sample(tmp_path / "data", square_edit(i)) for i in range(3)])
    opts = {"model": judge_server.served_name, "base_urls": [judge_server.base_url], "frames": 3, "image_size": 64,
            "cache_dir": None}
    recipe = {
        "run": {"name": "judged"},
        "policy": {"name": "toy_t2v"},
        "data": {"train": {"kind": "manifest", "options": {"path": str(tmp_path / "data")}}},
        "rewards": [{"name": "vlm_fidelity", "options": opts}, {"name": "vlm_aesthetics", "options": opts}],
    }
    out = tmp_path / "audit"
    result = invoke_judge(tmp_path, recipe, "--audit", str(tmp_path / "data"), "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in (out / "audit_samples.csv").read_text().splitlines()[1:]]
    by_term = {term: [r for r in rows if r[0] == term] for term in (ORACLE, "vlm_fidelity", "vlm_aesthetics")}
    assert [len(v) for v in by_term.values()] == [3, 3, 3]
    for term in ("vlm_fidelity", "vlm_aesthetics"):  # a missing judge score would leave a preference column empty
        for r in by_term[term]:
            prefs = [float(v) for v in r[3 : 3 + len(COLUMNS) - 1]]
            assert all(p in (0.0, 0.5, 1.0) for p in prefs), r
            assert r[-1] == "" or -1 <= float(r[-1]) <= 1  # Spearman (n/a when the judge gives one score to all)
    assert not math.isnan(float(by_term[ORACLE][0][-1]))
    assert {p.name for p in out.iterdir()} == {"audit.md", "audit.csv", "audit_samples.csv", "audit.png"}
