"""Published DeepMind Control Suite results shipped with the package, to compare runs against.

Two CSV files beside this module (package data; where they come from, and their licences, in
``README.md`` here):

- ``dmc_scores.csv``: mean episode return of published agents at 100k, 500k and 1M env steps.
  Columns ``obs, task, algorithm, env_steps, return``.
- ``dreamerv3_curves.csv``: DreamerV3's learning curves, the mean training-episode return in
  each 8k-env-step window, over seeds, with the lowest and highest seed. Columns ``obs, task,
  env_steps, return_mean, return_min_seed, return_max_seed, seeds``.

Tasks are named as in the files (``cartpole_swingup``; ``cup_catch`` for ball_in_cup-catch);
the loaders also take an env id or a dashed name (``dmc:ball_in_cup-catch``,
``cartpole-swingup``). Observation types are ``pixels`` and ``state``; ``vision`` and ``both``
(pixels reach the agent) mean ``pixels``, ``proprio`` means ``state``.

    from imagine_rl.runtime import reference
    curve = reference.load_dreamerv3_curves("dmc:cartpole-balance", "pixels")  # or None
    curve.steps[:2], curve.mean[:2]  # array([16000., 24000.]), array([290. , 239.1])
    [s for s in reference.load_dmc_scores("walker_walk", "pixels") if s.env_steps == 1_000_000]

Reads nothing but these files (importlib.resources, so it works from a wheel or a zip).
"""

from __future__ import annotations

import csv
import io
from functools import cache
from importlib import resources
from typing import NamedTuple

import numpy as np

__all__ = [
    "ALGORITHM_NAMES",
    "DMCScore",
    "DreamerV3Curve",
    "load_dmc_scores",
    "load_dreamerv3_curves",
    "obs_name",
    "task_name",
]

# How each ``algorithm`` of dmc_scores.csv is written in a legend or a table.
ALGORITHM_NAMES = {
    "dreamerv1": "DreamerV1",
    "dreamerv2": "DreamerV2",
    "dreamerv3": "DreamerV3",
    "drqv2": "DrQ-v2",
    "curl": "CURL",
    "tdmpc2": "TD-MPC2",
    "sac": "SAC",
}
_OBS = {"pixels": "pixels", "vision": "pixels", "both": "pixels", "state": "state"}
_OBS["proprio"] = "state"


class DMCScore(NamedTuple):
    """One row of ``dmc_scores.csv``: ``algorithm``'s mean return after ``env_steps``."""

    obs: str  # "pixels" or "state"
    task: str  # e.g. "walker_walk"
    algorithm: str  # a key of ALGORITHM_NAMES
    env_steps: int  # 100_000, 500_000 or 1_000_000
    score: float  # mean episode return over the publication's seeds


class DreamerV3Curve(NamedTuple):
    """DreamerV3's published learning curve for one task and observation type.

    Shapes: ``steps``, ``mean``, ``low``, ``high`` are float64 ``[S]``, sorted by env step:
    the 8k-env-step window ending at ``steps[i]`` has mean training-episode return
    ``mean[i]`` over the seeds, and ``low[i]``/``high[i]`` are its lowest and highest seed.
    ``seeds`` (int) is how many seeds were averaged (10 for pixels, 5 for state).
    """

    steps: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    seeds: int


def task_name(task: str) -> str:
    """The files' name of a DMC task: ``dmc:ball_in_cup-catch`` / ``ball_in_cup-catch`` ->
    ``cup_catch``, ``cartpole-swingup`` -> ``cartpole_swingup``."""
    name = task.removeprefix("dmc:").replace("-", "_")
    return name.replace("ball_in_cup", "cup")


def obs_name(obs: str) -> str:
    """``pixels`` or ``state`` for an observation type (see the module's doc); ValueError
    for any other."""
    if obs not in _OBS:
        raise ValueError(f"obs: expected one of {', '.join(sorted(_OBS))}, got {obs!r}")
    return _OBS[obs]


@cache
def _rows(name: str) -> tuple[dict[str, str], ...]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return tuple(csv.DictReader(io.StringIO(text)))


def load_dmc_scores(task: str | None = None, obs: str | None = None) -> list[DMCScore]:
    """Published scores (``dmc_scores.csv``), in the file's order; with ``task`` and/or
    ``obs``, those of that task / observation type only (an unknown task gives ``[]``)."""
    task = None if task is None else task_name(task)
    obs = None if obs is None else obs_name(obs)
    return [
        DMCScore(
            row["obs"], row["task"], row["algorithm"], int(row["env_steps"]), float(row["return"])
        )
        for row in _rows("dmc_scores.csv")
        if (task is None or row["task"] == task) and (obs is None or row["obs"] == obs)
    ]


def load_dreamerv3_curves(task: str, obs: str) -> DreamerV3Curve | None:
    """DreamerV3's learning curve for ``task`` from ``obs`` (``dreamerv3_curves.csv``), or
    None where the file has none (it covers 11 tasks from pixels, 10 from state)."""
    task, obs = task_name(task), obs_name(obs)
    rows = [
        row for row in _rows("dreamerv3_curves.csv") if (row["task"], row["obs"]) == (task, obs)
    ]
    if not rows:
        return None
    rows.sort(key=lambda row: float(row["env_steps"]))

    def column(key: str) -> np.ndarray:
        return np.array([float(row[key]) for row in rows])

    return DreamerV3Curve(
        steps=column("env_steps"),
        mean=column("return_mean"),
        low=column("return_min_seed"),
        high=column("return_max_seed"),
        seeds=max(int(row["seeds"]) for row in rows),
    )
