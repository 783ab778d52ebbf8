"""Learning curves: ``python scripts/plot.py <run dir>... [out=curves.png] [metric=eval/return_mean]``.

Plots ``metric`` (default ``eval/return_mean``) against env steps from each run's
``metrics.jsonl``, one line per run (runs of the same env share a panel). For ``dmc:`` tasks,
published scores from ``../shared/anchors/dmc_scores.csv`` (beside the repository) are drawn as
markers at 100k/500k/1M steps when present (``anchors=false`` to hide them).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import yaml

ANCHORS = Path(__file__).resolve().parent.parent.parent / "shared" / "anchors" / "dmc_scores.csv"


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


def anchors_for(env_id: str, obs: str) -> dict[str, list[tuple[int, float]]]:
    """Published scores for a dmc task: algorithm -> [(env steps, return)]."""
    if not env_id.startswith("dmc:") or not ANCHORS.exists():
        return {}
    # The score files name ball_in_cup-catch 'cup_catch'.
    task = env_id[4:].replace("-", "_").replace("ball_in_cup", "cup")
    kind = "pixels" if obs in ("pixels", "both") else "state"
    found: dict[str, list[tuple[int, float]]] = {}
    with ANCHORS.open() as file:
        for row in csv.DictReader(file):
            if row["task"] == task and row["obs"] == kind:
                found.setdefault(row["algorithm"], []).append(
                    (int(row["env_steps"]), float(row["return"]))
                )
    return found


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(a) for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(options) - {"out", "metric", "anchors"}
    if unknown or not runs:
        print(
            "usage: python scripts/plot.py <run dir>... [out=curves.png] "
            "[metric=eval/return_mean] [anchors=true]",
            file=sys.stderr,
        )
        return 2
    metric = options.get("metric", "eval/return_mean")
    out = Path(options.get("out", "curves.png"))
    show_anchors = options.get("anchors", "true").lower() != "false"

    panels: dict[str, list[Path]] = {}
    for run in runs:
        env_id = run_info(run).get("env", {}).get("id", "?")
        panels.setdefault(env_id, []).append(run)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (env_id, env_runs) in zip(axes[0], panels.items()):
        for run in env_runs:
            try:
                steps, values = read_curve(run, metric)
            except FileNotFoundError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            ax.plot(steps, values, marker="o", markersize=3, label=run.name)
        obs = run_info(env_runs[0]).get("env", {}).get("obs", "state")
        if show_anchors:
            for algorithm, points in sorted(anchors_for(env_id, obs).items()):
                xs, ys = zip(*sorted(points))
                ax.scatter(xs, ys, marker="x", s=25, label=f"{algorithm} (published)")
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
    sys.exit(main(sys.argv[1:]))
