"""Learning curves: ``python scripts/plot.py <run dir>... [out=curves.png] [metric=eval/return_mean]``.

Plots ``metric`` (default ``eval/return_mean``) against env steps from each run's
``metrics.jsonl`` (runs of the same env share a panel). Runs whose ``config.yaml`` is the same
except ``seed`` and ``run.dir`` are seeds of one config: they make one curve, the mean over the
seeds with a band from the lowest to the highest seed, labelled with the seed count
(``group=false`` draws every run on its own). Any other run is one line.

For ``dmc:`` tasks, beside the repository in ``../shared/anchors/`` (``anchors=false`` hides
them): published scores from ``dmc_scores.csv`` as markers at 100k/500k/1M steps, and
DreamerV3's learning curve from ``dreamerv3_curves.csv`` (mean over its seeds per 8k-step
window, band from the lowest to the highest seed) for the task and observation type, when
present.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import yaml

ANCHORS = Path(__file__).resolve().parent.parent.parent / "shared" / "anchors" / "dmc_scores.csv"
CURVES = ANCHORS.parent / "dreamerv3_curves.csv"
# Config keys that may differ between the seeds of one config.
SEED_KEYS = (("seed",), ("run", "dir"))


def read_curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """``metric`` by env step. A step logged twice (files from before resumes dropped the
    rows a killed session logged after its last checkpoint) keeps its last value: the one of
    the session that went on."""
    by_step: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass run directories written by train.py")
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: skip it, keep the rest
        if row.get(metric) is not None:
            by_step[int(row["step"])] = float(row[metric])
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def run_info(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def config_identity(run_dir: Path) -> str | None:
    """The run's config without the keys seeds differ in (``SEED_KEYS``), as canonical JSON;
    None without a ``config.yaml`` (such a run is never grouped with another)."""
    info = run_info(run_dir)
    if not info:
        return None
    for path in SEED_KEYS:
        node = info
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return json.dumps(info, sort_keys=True, default=str)


def group_runs(runs: list[Path]) -> list[list[Path]]:
    """Runs grouped by ``config_identity``, in the order each group first appears."""
    groups: dict[str, list[Path]] = {}
    for index, run in enumerate(runs):
        identity = config_identity(run)
        groups.setdefault(identity if identity is not None else f"\0{index}", []).append(run)
    return list(groups.values())


def group_label(runs: list[Path]) -> str:
    """A run's name; for several seeds their names' common prefix (or the first name) and
    the seed count, e.g. ``walker (3 seeds)``."""
    names = [run.name for run in runs]
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names).rstrip("_-.= ")
    return f"{prefix or names[0]} ({len(names)} seeds)"


def group_curve(
    runs: list[Path], metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``steps, mean, low, high`` of ``metric`` over the runs (seeds) of one group.

    The steps are those any seed logged, from the last first step to the first last step of
    the seeds (the range every seed covers); a seed without a value at one of them is
    interpolated linearly between its neighbouring steps. ``low``/``high`` are the lowest and
    highest seed at each step. One run gives its own curve with ``low == high == mean``.

    Shapes: all four ``[S]`` float64 (S = 0 when the seeds' step ranges do not overlap).
    """
    curves = [read_curve(run, metric) for run in runs]
    curves = [(np.asarray(s, float), np.asarray(v, float)) for s, v in curves]
    if any(len(steps) == 0 for steps, _ in curves):
        empty = np.zeros(0)
        return empty, empty, empty, empty
    first = max(steps[0] for steps, _ in curves)
    last = min(steps[-1] for steps, _ in curves)
    grid = np.unique(np.concatenate([steps for steps, _ in curves]))
    grid = grid[(grid >= first) & (grid <= last)]
    values = np.stack([np.interp(grid, steps, vals) for steps, vals in curves])
    return grid, values.mean(0), values.min(0), values.max(0)


def _dmc_task(env_id: str, obs: str) -> tuple[str, str]:
    # The score files name ball_in_cup-catch 'cup_catch'.
    task = env_id[4:].replace("-", "_").replace("ball_in_cup", "cup")
    return task, "pixels" if obs in ("pixels", "both") else "state"


def anchors_for(env_id: str, obs: str) -> dict[str, list[tuple[int, float]]]:
    """Published scores for a dmc task: algorithm -> [(env steps, return)]."""
    if not env_id.startswith("dmc:") or not ANCHORS.exists():
        return {}
    task, kind = _dmc_task(env_id, obs)
    found: dict[str, list[tuple[int, float]]] = {}
    with ANCHORS.open() as file:
        for row in csv.DictReader(file):
            if row["task"] == task and row["obs"] == kind:
                found.setdefault(row["algorithm"], []).append(
                    (int(row["env_steps"]), float(row["return"]))
                )
    return found


def dreamerv3_curve(
    env_id: str, obs: str, path: Path | None = None, until: float | None = None
) -> dict | None:
    """DreamerV3's published learning curve for a dmc task and observation type, or None.

    Returns ``{"steps", "mean", "low", "high"}`` (arrays ``[S]``, sorted by env step: the
    mean return of the 8k-env-step window ending there, over seeds, and the lowest and highest
    seed) and ``"seeds"`` (int), from ``dreamerv3_curves.csv`` (``path``, default beside the
    repository). ``until`` keeps the windows up to the first one ending at or after it.
    """
    path = CURVES if path is None else path
    if not env_id.startswith("dmc:") or not path.exists():
        return None
    task, kind = _dmc_task(env_id, obs)
    rows = []
    with path.open() as file:
        for row in csv.DictReader(file):
            if row["task"] == task and row["obs"] == kind:
                rows.append(row)
    if not rows:
        return None
    rows.sort(key=lambda row: int(row["env_steps"]))
    if until is not None:
        past = [i for i, row in enumerate(rows) if int(row["env_steps"]) >= until]
        rows = rows[: past[0] + 1] if past else rows
    column = lambda name: np.array([float(row[name]) for row in rows])  # noqa: E731
    return {
        "steps": column("env_steps"),
        "mean": column("return_mean"),
        "low": column("return_min_seed"),
        "high": column("return_max_seed"),
        "seeds": max(int(row["seeds"]) for row in rows),
    }


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(a) for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(options) - {"out", "metric", "anchors", "group"}
    if unknown or not runs:
        print(
            "usage: python scripts/plot.py <run dir>... [out=curves.png] "
            "[metric=eval/return_mean] [anchors=true] [group=true]",
            file=sys.stderr,
        )
        return 2
    metric = options.get("metric", "eval/return_mean")
    out = Path(options.get("out", "curves.png"))
    show_anchors = options.get("anchors", "true").lower() != "false"
    grouped = options.get("group", "true").lower() != "false"

    for run in runs:
        if not (run / "metrics.jsonl").exists():
            print(
                f"error: {run / 'metrics.jsonl'} not found: pass run directories written by "
                "train.py",
                file=sys.stderr,
            )
            return 2
    groups = group_runs(runs) if grouped else [[run] for run in runs]
    panels: dict[str, list[list[Path]]] = {}
    for group in groups:
        env_id = run_info(group[0]).get("env", {}).get("id", "?")
        panels.setdefault(env_id, []).append(group)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (env_id, env_groups) in zip(axes[0], panels.items()):
        for group in env_groups:
            if len(group) == 1:
                steps, values = read_curve(group[0], metric)
                ax.plot(steps, values, marker="o", markersize=3, label=group[0].name)
                continue
            steps, mean, low, high = group_curve(group, metric)
            (line,) = ax.plot(steps, mean, label=f"{group_label(group)}, mean and min-max")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        obs = run_info(env_groups[0][0]).get("env", {}).get("obs", "state")
        if show_anchors:
            for algorithm, points in sorted(anchors_for(env_id, obs).items()):
                xs, ys = zip(*sorted(points))
                ax.scatter(xs, ys, marker="x", s=25, label=f"{algorithm} (published)")
            # Up to the panel's last step: the published curve goes on to 500k env steps.
            last = [read_curve(run, metric)[0][-1:] for group in env_groups for run in group]
            ends = [steps[0] for steps in last if steps]
            curve = dreamerv3_curve(env_id, obs, until=max(ends) if ends else None)
            if curve is not None:
                (line,) = ax.plot(
                    curve["steps"],
                    curve["mean"],
                    linestyle="--",
                    marker="x",  # a curve cut to one or two windows is still visible
                    color="0.3",
                    label=f"DreamerV3 curve (published, {curve['seeds']} seeds)",
                )
                ax.fill_between(
                    curve["steps"], curve["low"], curve["high"], color="0.3", alpha=0.12, lw=0
                )
        ax.set_title(env_id)
        ax.set_xlabel("env steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from runtime.config import run_script

    sys.exit(run_script(main, sys.argv[1:]))
