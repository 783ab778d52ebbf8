"""scripts/plot.py's data functions: seeds of one config grouped into a mean and a min-max
band, DreamerV3's published curve for a dmc task (runtime.reference, shipped with the
package), the x axis kept to the runs' steps and curves named after their runs."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml

from imagine_rl.runtime import reference
from imagine_rl.scripts import plot


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


def test_dreamerv3_curve_matches_task_and_obs():
    # The first rows of runtime/reference/dreamerv3_curves.csv for cartpole_balance, pixels:
    # 16000,290.0,267.6,317.2,10 and 24000,239.1,186.1,269.2,10.
    curve = plot.dreamerv3_curve("dmc:cartpole-balance", "pixels")
    np.testing.assert_array_equal(curve.steps[:2], [16000, 24000])
    np.testing.assert_allclose(curve.mean[:2], [290.0, 239.1])
    np.testing.assert_allclose(curve.low[:2], [267.6, 186.1])
    np.testing.assert_allclose(curve.high[:2], [317.2, 269.2])
    assert curve.seeds == 10
    # Up to the first window ending at or after a run's last step.
    np.testing.assert_array_equal(
        plot.dreamerv3_curve("dmc:cartpole-balance", "pixels", 16000).steps, [16000]
    )
    until = plot.dreamerv3_curve("dmc:cartpole-balance", "pixels", until=17000)
    np.testing.assert_array_equal(until.steps, [16000, 24000])
    assert plot.dreamerv3_curve("dmc:cartpole-balance", "state").seeds == 5
    both = plot.dreamerv3_curve("dmc:cartpole-balance", "both")  # pixels reach the agent
    np.testing.assert_array_equal(both.mean, curve.mean)
    assert plot.dreamerv3_curve("dmc:manipulator-bring_ball", "pixels") is None
    assert plot.dreamerv3_curve("gym:Pendulum-v1", "state") is None


def test_the_shipped_dreamerv3_curves_are_read():
    curve = plot.dreamerv3_curve("dmc:cartpole-balance", "pixels")
    assert curve is not None and len(curve.steps) > 10
    assert (np.diff(curve.steps) > 0).all()
    assert (curve.low <= curve.mean).all() and (curve.mean <= curve.high).all()


def test_reference_loaders_return_the_files_values():
    """runtime.reference reads the CSVs shipped in the package (no ../shared needed)."""
    data = resources.files("imagine_rl.runtime.reference")
    scores = data.joinpath("dmc_scores.csv").read_text()
    curves = data.joinpath("dreamerv3_curves.csv").read_text()
    for line in (
        "pixels,walker_walk,dreamerv3,1000000,963",
        "state,walker_walk,sac,500000,953",
        "pixels,cup_catch,dreamerv1,100000,74",
    ):
        assert line in scores.splitlines()
    assert "pixels,cartpole_balance,16000,290.0,267.6,317.2,10" in curves.splitlines()
    assert data.joinpath("README.md").read_text().count("MIT") >= 2  # sources and licences

    walker = reference.load_dmc_scores("dmc:walker-walk", "pixels")
    assert reference.DMCScore("pixels", "walker_walk", "dreamerv3", 1_000_000, 963.0) in walker
    assert {s.obs for s in walker} == {"pixels"} and len(walker) == 18  # 6 agents x 3 steps
    sac = reference.load_dmc_scores("walker_walk", "proprio")
    assert reference.DMCScore("state", "walker_walk", "sac", 500_000, 953.0) in sac
    cup = reference.load_dmc_scores("dmc:ball_in_cup-catch", "vision")
    assert reference.DMCScore("pixels", "cup_catch", "dreamerv1", 100_000, 74.0) in cup
    everything = reference.load_dmc_scores()
    assert len(everything) == len(scores.splitlines()) - 1
    assert all(type(s.env_steps) is int and type(s.score) is float for s in everything)
    assert reference.load_dmc_scores("dmc:no-task") == []
    curve = reference.load_dreamerv3_curves("cartpole-balance", "pixels")
    assert (curve.steps[0], curve.mean[0], curve.low[0], curve.high[0]) == (
        16000,
        290.0,
        267.6,
        317.2,
    )
    assert curve.steps.shape == curve.mean.shape == curve.low.shape == curve.high.shape
    with pytest.raises(ValueError, match="obs"):
        reference.load_dreamerv3_curves("cartpole-balance", "rgb")


def _legend(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_the_axis_keeps_to_the_runs_range(tmp_path: Path):
    """A 50k-step run is not squeezed into 5% of the width by the published 500k/1M markers:
    those are listed in the legend, the x axis spans the run's steps."""
    pytest.importorskip("matplotlib")
    rows = [(step, step / 100) for step in range(10_000, 50_001, 10_000)]
    run = make_run(tmp_path, "walker_50k", rows, env__id="dmc:walker-walk")
    fig = plot.draw([run])
    (ax,) = fig.axes
    assert ax.get_xlim() == (10_000, 50_000)
    labels = _legend(ax)
    assert labels[0] == "walker_50k"
    assert "DreamerV3 @100k: 586, @500k: 942, @1M: 963 (beyond axis)" in labels
    assert "TD-MPC2 @100k: 464, @500k: 949, @1M: 940 (beyond axis)" in labels
    for collection in ax.collections:  # markers and bands: nothing drawn beyond the run
        offsets = np.asarray(collection.get_offsets())
        assert len(offsets) == 0 or offsets[:, 0].max() <= 50_000 + 8_000  # one curve window
    # A run past 500k: the markers it reaches are on the axis, the 1M one in the legend.
    rows = [(step, 900.0) for step in range(100_000, 600_001, 100_000)]
    longer = make_run(tmp_path, "walker_600k", rows, env__id="dmc:walker-walk")
    (ax,) = plot.draw([run, longer], grouped=False).axes
    assert ax.get_xlim() == (10_000, 600_000)
    assert "DreamerV3 (published; @1M: 963 beyond axis)" in _legend(ax)
    assert plot.anchor_label("dreamerv3", [(100_000, 586.0)], 0, 1e6) == "DreamerV3 (published)"


def test_curves_are_named_after_their_runs(tmp_path: Path, monkeypatch):
    pytest.importorskip("matplotlib")
    a = make_run(tmp_path / "dense", "run", [(1000, 1.0), (2000, 2.0)])
    b = make_run(tmp_path / "sparse", "run", [(1000, 3.0), (2000, 4.0)], replay__context=1)
    assert _legend(plot.draw([a, b], anchors=False).axes[0]) == ["dense/run", "sparse/run"]
    labels = _legend(plot.draw([a, b], labels=["mine", "theirs"]).axes[0])
    assert labels[:2] == ["mine", "theirs"]
    monkeypatch.chdir(a)
    assert _legend(plot.draw([Path(".")], anchors=False).axes[0]) == ["run"]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "named.png"
    assert plot.main(["dense/run", "sparse/run", "labels=x,y", f"out={out}"]) == 0
    assert plot.main(["dense/run", "sparse/run", "labels=x", f"out={out}"]) == 2


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
