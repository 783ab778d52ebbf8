"""``scripts/dev/bench_adaptation.py`` end to end under the ``debug`` preset (tiny numbers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "dev"))

import bench_adaptation  # noqa: E402

torch.set_num_threads(1)


def test_runs_end_to_end_and_reports_curves_and_areas(tmp_path, capsys):
    out = tmp_path / "adapt.json"
    code = bench_adaptation.main(
        [
            "env=dmc:cartpole-balance",
            "preset=debug",
            "intervention=body_mass:pole_1*2",
            "models=dense,rigl,factored",
            "seeds=0,1",
            "pretrain_updates=4",
            "adapt_updates=4",
            "eval_every=2",
            "collect_steps=60",
            "eval_steps=30",
            "eval_batches=1",
            "context=4",
            "horizon=4",
            "update_every=2",
            f"json={out}",
            f"png={tmp_path / 'adapt.png'}",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert (tmp_path / "adapt.png").stat().st_size > 0
    assert "body_mass[pole_1] 0.1 -> 0.2 at env step 120" in result["intervention_log"]
    assert list(result["models"]) == ["dense", "rigl", "factored"]
    for entry in result["models"].values():
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        for run in entry["runs"]:
            assert run["updates"] == [0, 2, 4] and len(run["curve"]) == 3
            assert len(run["train_loss"]) == 4
            for metric in ("wm_loss", "openloop_mse"):
                ys = [p[metric] for p in run["curve"]]
                # The area is the trapezoid mean of the curve over the adaptation window.
                expected = ((ys[0] + ys[1]) + (ys[1] + ys[2])) / 4
                assert run[f"{metric}_area"] == pytest.approx(expected)
                assert run[f"{metric}_area_above_pre"] == pytest.approx(
                    expected - run["pre"][metric]
                )
        summary = entry["summary"]["wm_loss_area"]
        assert summary["values"] == [r["wm_loss_area"] for r in entry["runs"]]
    assert "sparse_density" in result["models"]["rigl"]["runs"][0]
    assert len(result["models"]["factored"]["runs"][0]["graph"]) == 4
    assert "| factored |" in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(capsys):
    assert bench_adaptation.main(["preset=debug", "models=dense,sparse"]) == 2
    assert "models: unknown ['sparse']" in capsys.readouterr().err
    assert bench_adaptation.main(["preset=debug", "intervention=body_mass:pole_1*2@step=3"]) == 2
    assert "without @step" in capsys.readouterr().err
