"""Committed results: every ``results/<experiment>/summary.json`` is what its run records
recompute to, with the documented schema, and every results folder the README cites exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from imagine_rl.runtime.experiment import RUN_METRICS, read_record, summarize

ROOT = Path(__file__).resolve().parent.parent
SUMMARIES = sorted((ROOT / "results").glob("*/summary.json"))


def test_results_are_committed():
    assert SUMMARIES, "no results/<experiment>/summary.json: the README's figures need them"


@pytest.mark.parametrize("path", SUMMARIES, ids=lambda p: p.parent.name)
def test_summary_recomputes_from_its_records(path):
    committed = json.loads(path.read_text())
    recomputed = summarize(path.parent)
    assert json.loads(json.dumps(recomputed, sort_keys=True)) == committed
    assert committed["experiment"] == path.parent.name
    assert len(committed["file_sha256"]) == 64 and committed["commits"]
    for variant, entry in committed["variants"].items():
        records = sorted((path.parent / "runs").glob(f"{variant}-s*.jsonl"))
        assert entry["n"] == len(records) == len(entry["seeds"])
        for name in RUN_METRICS:
            assert set(entry[name]) >= {"mean", "iqm", "ci95"}, (variant, name)
            if entry[name]["mean"] is not None:
                low, high = entry[name]["ci95"]
                assert low <= entry[name]["mean"] <= high
    for record in (path.parent / "runs").glob("*.jsonl"):
        header, rows = read_record(record)
        assert header["file_sha256"] == committed["file_sha256"]
        assert rows and header["env_steps"] == rows[-1]["step"]


def test_every_results_folder_the_readme_cites_exists():
    cited = set(re.findall(r"results/([A-Za-z0-9_.+-]+)/", (ROOT / "README.md").read_text()))
    assert cited, "the README cites no results folder"
    missing = sorted(
        name for name in cited if not (ROOT / "results" / name / "summary.json").exists()
    )
    assert not missing, f"README cites results without a summary.json: {missing}"
