"""scripts/plot.py's data functions: seeds of one config grouped into a mean and a min-max
band, and DreamerV3's published curve for a dmc task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from scripts import plot


def make_run(root: Path, name: str, rows: list[tuple[int, float]], seed: int = 0, **config) -> Path:
    """A run dir as train.py writes it: config.yaml and metrics.jsonl (eval/return_mean)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "seed": seed,
        "env": {"id": "dmc:cartpole-balance", "obs": "pixels"},
        "replay": {"context": 0},
        "run": {"dir": str(run), "steps": 1000},
    }
    for key, value in config.items():
        section, field = key.split("__")
        cfg[section][field] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [json.dumps({"step": step, "eval/return_mean": value}) for step, value in rows]
    lines.insert(1, json.dumps({"step": 50, "train/episode_return": 1.0}))  # another metric
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_seeds_of_one_config_are_one_group(tmp_path: Path):
    a0 = make_run(tmp_path, "ctx_s0", [(100, 1.0)], seed=0)
    b = make_run(tmp_path, "noctx", [(100, 1.0)], seed=0, replay__context=1)
    a1 = make_run(tmp_path, "ctx_s1", [(100, 2.0)], seed=1)
    a2 = make_run(tmp_path, "ctx_s2", [(100, 3.0)], seed=2)
    longer = make_run(tmp_path, "ctx_long", [(100, 3.0)], seed=3, run__steps=2000)
    bare = tmp_path / "bare"
    bare.mkdir()  # no config.yaml: never grouped
    bare2 = tmp_path / "bare2"
    bare2.mkdir()
    groups = plot.group_runs([a0, b, a1, bare, a2, longer, bare2])
    assert groups == [[a0, a1, a2], [b], [bare], [longer], [bare2]]
    assert plot.group_label([a0, a1, a2]) == "ctx_s (3 seeds)"
    assert plot.group_label([b]) == "noctx"


def test_group_curve_is_the_mean_with_a_min_max_band(tmp_path: Path):
    runs = [
        make_run(tmp_path, "s0", [(100, 1.0), (200, 4.0), (300, 7.0)], seed=0),
        make_run(tmp_path, "s1", [(100, 3.0), (200, 2.0), (300, 9.0), (400, 5.0)], seed=1),
        make_run(tmp_path, "s2", [(100, 5.0), (300, 2.0)], seed=2),  # no eval at 200
    ]
    steps, mean, low, high = plot.group_curve(runs, "eval/return_mean")
    # Steps every seed covers (up to 300, the shortest); s2 at 200 is interpolated: 3.5.
    np.testing.assert_array_equal(steps, [100, 200, 300])
    np.testing.assert_allclose(mean, [3.0, (4.0 + 2.0 + 3.5) / 3, 6.0])
    np.testing.assert_allclose(low, [1.0, 2.0, 2.0])
    np.testing.assert_allclose(high, [5.0, 4.0, 9.0])
    # One run: its own curve, no band.
    steps, mean, low, high = plot.group_curve(runs[1:2], "eval/return_mean")
    np.testing.assert_array_equal(steps, [100, 200, 300, 400])
    assert (low == mean).all() and (high == mean).all()
    # A metric a seed never logged: nothing to draw.
    assert len(plot.group_curve(runs, "eval/missing")[0]) == 0


def test_group_curve_keeps_the_last_value_of_a_step_logged_twice(tmp_path: Path):
    run = make_run(tmp_path, "resumed", [(100, 1.0), (200, 5.0), (200, 6.0)])
    other = make_run(tmp_path, "other", [(100, 3.0), (200, 2.0)], seed=1)
    steps, mean, _, high = plot.group_curve([run, other], "eval/return_mean")
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(high, [3.0, 6.0])


def test_dreamerv3_curve_matches_task_and_obs(tmp_path: Path):
    path = tmp_path / "dreamerv3_curves.csv"
    path.write_text(
        "obs,task,env_steps,return_mean,return_min_seed,return_max_seed,seeds\n"
        "pixels,cartpole_balance,16000,290.0,267.6,317.2,10\n"
        "pixels,cartpole_balance,8000,100.0,90.0,110.0,10\n"
        "state,cartpole_balance,8000,500.0,400.0,600.0,5\n"
        "pixels,cup_catch,8000,50.0,40.0,60.0,10\n"
    )
    curve = plot.dreamerv3_curve("dmc:cartpole-balance", "pixels", path)
    np.testing.assert_array_equal(curve["steps"], [8000, 16000])
    np.testing.assert_allclose(curve["mean"], [100.0, 290.0])
    np.testing.assert_allclose(curve["low"], [90.0, 267.6])
    np.testing.assert_allclose(curve["high"], [110.0, 317.2])
    assert curve["seeds"] == 10
    # Up to the first window ending at or after a run's last step.
    until = plot.dreamerv3_curve("dmc:cartpole-balance", "pixels", path, until=8000)
    np.testing.assert_array_equal(until["steps"], [8000])
    until = plot.dreamerv3_curve("dmc:cartpole-balance", "pixels", path, until=9000)
    np.testing.assert_array_equal(until["steps"], [8000, 16000])
    assert plot.dreamerv3_curve("dmc:cartpole-balance", "state", path)["seeds"] == 5
    assert plot.dreamerv3_curve("dmc:ball_in_cup-catch", "both", path)["mean"][0] == 50.0
    assert plot.dreamerv3_curve("dmc:walker-walk", "pixels", path) is None
    assert plot.dreamerv3_curve("gym:Pendulum-v1", "state", path) is None
    assert plot.dreamerv3_curve("dmc:cartpole-balance", "pixels", tmp_path / "none.csv") is None


@pytest.mark.skipif(not plot.CURVES.exists(), reason="no ../shared/anchors/dreamerv3_curves.csv")
def test_the_shared_dreamerv3_curves_are_read():
    curve = plot.dreamerv3_curve("dmc:cartpole-balance", "pixels")
    assert curve is not None and len(curve["steps"]) > 10
    assert (np.diff(curve["steps"]) > 0).all()
    assert (curve["low"] <= curve["mean"]).all() and (curve["mean"] <= curve["high"]).all()


def test_main_draws_groups_and_anchors(tmp_path: Path):
    pytest.importorskip("matplotlib")
    runs = [
        make_run(tmp_path, f"s{i}", [(8000, 100.0 * i), (16000, 200.0 + i)], seed=i)
        for i in range(2)
    ]
    single = make_run(tmp_path, "other", [(8000, 5.0)], replay__context=1)
    out = tmp_path / "curves.png"
    assert plot.main([*map(str, runs), str(single), f"out={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(runs[0]), "group=false", f"out={out}"]) == 0
    assert plot.main([str(tmp_path / "missing"), f"out={out}"]) == 2
    assert plot.main([str(runs[0]), "colour=red"]) == 2
