"""Learning curves: ``python scripts/plot.py <run dir>... [out=curves.png] [metric=eval/return_mean] [labels=a,b]``.

Plots ``metric`` (default ``eval/return_mean``) against env steps from each run's
``metrics.jsonl`` (runs of the same env share a panel). Runs whose ``config.yaml`` is the same
except ``seed`` and ``run.dir`` are seeds of one config: they make one curve, the mean over the
seeds with a band from the lowest to the highest seed, labelled with the seed count
(``group=false`` draws every run on its own). Any other run is one line. Each curve is named
after its run directory (``labels=a,b,...`` names them instead: one label per curve, in the
order the runs are given). The x axis spans the runs' logged steps.

For ``dmc:`` tasks, the published results shipped in ``runtime/reference/`` (sources and
licences in its README; ``anchors=false`` hides them): the scores at 100k/500k/1M steps as
markers (those beyond the runs' steps are listed in the legend, e.g. ``DreamerV3 @1M: 963
(beyond axis)``), and DreamerV3's learning curve (mean over its seeds per 8k-step window, band
from the lowest to the highest seed) for the task and observation type. Both are returns of
training episodes (DreamerV3 samples its actions): ``metric=train/episode_return`` is the
like-for-like curve of a run, ``eval/return_mean`` the greedy policy's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import yaml

from imagine_rl.runtime import reference

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
    """The run's saved config in today's keys (an older run groups with a newer one)."""
    from imagine_rl.runtime.config import upgrade_saved_config

    path = run_dir / "config.yaml"
    info = yaml.safe_load(path.read_text()) if path.exists() else {}
    return upgrade_saved_config(info) if isinstance(info, dict) else {}


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


def _obs(obs: str) -> str:
    return "pixels" if obs in ("pixels", "both") else "state"


def anchors_for(env_id: str, obs: str) -> dict[str, list[tuple[int, float]]]:
    """Published scores for a dmc task (``runtime.reference``): algorithm -> [(env steps,
    return)], sorted by step; ``{}`` for other envs and tasks the file does not cover."""
    if not env_id.startswith("dmc:"):
        return {}
    found: dict[str, list[tuple[int, float]]] = {}
    for row in reference.load_dmc_scores(env_id, _obs(obs)):
        found.setdefault(row.algorithm, []).append((row.env_steps, row.score))
    return {algorithm: sorted(points) for algorithm, points in found.items()}


def dreamerv3_curve(
    env_id: str, obs: str, until: float | None = None
) -> reference.DreamerV3Curve | None:
    """DreamerV3's published learning curve for a dmc task and observation type, or None
    (``runtime.reference.load_dreamerv3_curves``: arrays ``[S]`` by env step, the mean return
    of the 8k-env-step window ending there over seeds, the lowest and highest seed, and the
    seed count). ``until`` keeps the windows up to the first one ending at or after it.
    """
    if not env_id.startswith("dmc:"):
        return None
    curve = reference.load_dreamerv3_curves(env_id, _obs(obs))
    if curve is None or until is None:
        return curve
    past = np.flatnonzero(curve.steps >= until)
    keep = past[0] + 1 if len(past) else len(curve.steps)
    return curve._replace(
        steps=curve.steps[:keep],
        mean=curve.mean[:keep],
        low=curve.low[:keep],
        high=curve.high[:keep],
    )


def _steps_text(steps: int) -> str:
    """``1000000`` -> ``1M``, ``500000`` -> ``500k``, ``8000`` -> ``8k``."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if steps >= size:
            return f"{steps / size:g}{suffix}"
    return str(steps)


def anchor_label(algorithm: str, points: list[tuple[int, float]], low: float, high: float) -> str:
    """The legend entry of an algorithm's published scores on an x axis from ``low`` to
    ``high``: its name, and the scores outside the axis with their steps, e.g.
    ``DreamerV3 @500k: 942, @1M: 963 (beyond axis)``."""
    name = reference.ALGORITHM_NAMES.get(algorithm, algorithm)
    outside = [(x, y) for x, y in points if not low <= x <= high]
    if not outside:
        return f"{name} (published)"
    text = ", ".join(f"@{_steps_text(x)}: {y:g}" for x, y in outside)
    if len(outside) == len(points):
        return f"{name} {text} (beyond axis)"
    return f"{name} (published; {text} beyond axis)"


def curve_names(groups: list[list[Path]]) -> list[str]:
    """One legend name per group: the run directory's name (of a resolved path, so ``.`` and
    ``runs/x/`` name the run), ``group_label`` for seeds. Where two groups would share a name
    (``runs/a/run``, ``runs/b/run``) each takes its parent's name too: ``a/run``, ``b/run``."""
    names = [group_label([run.resolve() for run in group]) for group in groups]
    if len(set(names)) == len(names):
        return names
    out = []
    for group, name in zip(groups, names):
        if names.count(name) > 1:
            name = f"{group[0].resolve().parent.name}/{name}"
        out.append(name)
    return out


def draw(
    runs: list[Path],
    metric: str = "eval/return_mean",
    anchors: bool = True,
    grouped: bool = True,
    labels: list[str] | None = None,
):
    """The figure ``main`` saves: one panel per env, ``metric`` against env steps for each
    group of runs (see the module's doc), named by ``labels`` (one per group, in the order
    groups first appear) or by ``curve_names``. Each panel's x axis spans its runs' steps,
    from the first logged step to the last; published scores at steps outside it are listed
    in their legend entry instead of stretching the axis. Returns a matplotlib ``Figure``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(runs) if grouped else [[run] for run in runs]
    if labels is not None and len(labels) != len(groups):
        raise ValueError(
            f"labels: {len(labels)} given for {len(groups)} curves "
            f"({', '.join(curve_names(groups))})"
        )
    names = dict(zip(map(id, groups), labels if labels is not None else curve_names(groups)))
    panels: dict[str, list[list[Path]]] = {}
    for group in groups:
        env_id = run_info(group[0]).get("env", {}).get("id", "?")
        panels.setdefault(env_id, []).append(group)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (env_id, env_groups) in zip(axes[0], panels.items()):
        drawn: list[np.ndarray] = []
        for group in env_groups:
            if len(group) == 1:
                steps, values = read_curve(group[0], metric)
                ax.plot(steps, values, marker="o", markersize=3, label=names[id(group)])
                drawn.append(np.asarray(steps, float))
                continue
            steps, mean, low, high = group_curve(group, metric)
            (line,) = ax.plot(steps, mean, label=f"{names[id(group)]}, mean and min-max")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            drawn.append(steps)
        drawn = [steps for steps in drawn if len(steps)]
        # The runs' range: published points past it go to the legend, not onto the axis.
        x_low = min(steps[0] for steps in drawn) if drawn else 0.0
        x_high = max(steps[-1] for steps in drawn) if drawn else np.inf
        obs = run_info(env_groups[0][0]).get("env", {}).get("obs", "state")
        if anchors:
            for algorithm, points in anchors_for(env_id, obs).items():
                inside = [(x, y) for x, y in points if x_low <= x <= x_high]
                xs, ys = zip(*inside) if inside else ((), ())
                ax.scatter(
                    xs, ys, marker="x", s=25, label=anchor_label(algorithm, points, x_low, x_high)
                )
            curve = dreamerv3_curve(env_id, obs, until=x_high if drawn else None)
            if curve is not None:
                beyond = " (beyond axis)" if curve.steps[0] > x_high else ""
                ax.plot(
                    curve.steps,
                    curve.mean,
                    linestyle="--",
                    marker="x",  # a curve cut to one or two windows is still visible
                    color="0.3",
                    label=f"DreamerV3 curve (published, training episodes, {curve.seeds} "
                    f"seeds){beyond}",
                )
                ax.fill_between(curve.steps, curve.low, curve.high, color="0.3", alpha=0.12, lw=0)
        if drawn:
            pad = 0.0 if x_high > x_low else max(1.0, 0.05 * abs(x_high))  # one logged step
            ax.set_xlim(x_low - pad, x_high + pad)
        ax.xaxis.set_major_formatter(lambda x, _: _steps_text(int(x)) if x >= 0 else f"{x:g}")
        ax.set_title(env_id)
        ax.set_xlabel("env steps")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.16), frameon=False)
    return fig


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    runs = [Path(a) for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(options) - {"out", "metric", "anchors", "group", "labels"}
    if unknown or not runs:
        print(
            "usage: python scripts/plot.py <run dir>... [out=curves.png] "
            "[metric=eval/return_mean] [anchors=true] [group=true] [labels=a,b,...]",
            file=sys.stderr,
        )
        return 2
    out = Path(options.get("out", "curves.png"))
    for run in runs:
        if not (run / "metrics.jsonl").exists():
            print(
                f"error: {run / 'metrics.jsonl'} not found: pass run directories written by "
                "train.py",
                file=sys.stderr,
            )
            return 2
    labels = options["labels"].split(",") if "labels" in options else None
    try:
        fig = draw(
            runs,
            metric=options.get("metric", "eval/return_mean"),
            anchors=options.get("anchors", "true").lower() != "false",
            grouped=options.get("group", "true").lower() != "false",
            labels=labels,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from imagine_rl.runtime.config import run_script

    sys.exit(run_script(main, sys.argv[1:]))
