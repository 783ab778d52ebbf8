"""Interventions: change one mechanism of a MuJoCo task at a chosen env step.

Grammar (``env.intervention=...``, ``make_env(..., intervention=...)``)::

    spec  := item (";" item)*
    item  := param [":" target] op value "@step=" N
    op    := "*" (multiply the current value) | "=" (set it)
    value := a number;  N := an integer >= 0

| param | target | what changes (``mujoco.MjModel`` array) |
| --- | --- | --- |
| ``body_mass`` | a body name | ``body_mass[body]`` (inertia unchanged) |
| ``gravity`` | ``x``, ``y`` or ``z``; none = the whole vector (``*`` only) | ``opt.gravity`` |
| ``actuator_gear`` | an actuator name | ``actuator_gear[actuator, 0]``: the actuator's gain (force = gear * control for motors) |
| ``geom_friction`` | a geom name | ``geom_friction[geom, 0]``: the sliding friction coefficient |

Examples: ``body_mass:pole_1*2@step=20000`` (dmc cartpole's pole twice as heavy after 20k
steps), ``gravity:z=-5@step=0;actuator_gear:slide*0.5@step=1000``.

When: each env counts its *own* env steps exactly as the training loop counts
``train/env_steps`` for one env: every agent step (``step()``) adds ``action_repeat`` frames,
and so does every ``reset()`` after the first (the loop counts the autoreset step as a full
step). An intervention at step ``N`` is applied right before the first agent step that starts
at a count ``>= N`` (so at exactly ``N`` when ``N`` is a multiple of the action repeat): every
earlier step runs the original task, every later one the changed task; it is applied once and
stays. With ``num_envs = E`` envs each counts its own steps, so the change happens at global
``train/env_steps`` ``E * N``. The count starts at 0 whenever the env is built (a resumed run
counts again from its restart).

Logged: the ``info`` of that step carries ``info["intervention"]`` (a text with the old and new
values), and the ``envs.interventions`` logger writes one warning line. The names of bodies,
actuators and geoms are resolved when the wrapper is built; a bad name raises a ``ValueError``
that lists the valid ones.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

PARAMS = ("body_mass", "gravity", "actuator_gear", "geom_friction")
AXES = ("x", "y", "z")
_ITEM = re.compile(
    r"(?P<param>[A-Za-z_]\w*)(?::(?P<target>[^*=@]+))?(?P<op>[*=])(?P<value>[^@]+)"
    r"@step=(?P<step>[^@]+)"
)
_GRAMMAR = "expected <param>[:<target>]<*|=><number>@step=<N>, e.g. body_mass:pole_1*2@step=20000"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intervention:
    """One parsed item of a spec."""

    param: str
    target: str | None
    op: str  # "*" or "="
    value: float
    step: int
    text: str


def parse_interventions(spec: str) -> list[Intervention]:
    """Parse a spec (see the module docstring); raises ``ValueError`` naming the bad item."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty intervention spec {spec!r}: {_GRAMMAR}")
    items = []
    for raw in spec.split(";"):
        text = "".join(raw.split())
        if not text:
            continue
        match = _ITEM.fullmatch(text)
        if match is None:
            raise ValueError(f"bad intervention {text!r}: {_GRAMMAR}")
        param, target, op = match["param"], match["target"], match["op"]
        if param not in PARAMS:
            raise ValueError(
                f"unknown intervention parameter {param!r} in {text!r}; valid: {', '.join(PARAMS)}"
            )
        try:
            value = float(match["value"])
        except ValueError:
            raise ValueError(f"bad value {match['value']!r} in {text!r}: {_GRAMMAR}") from None
        if not np.isfinite(value):
            raise ValueError(f"intervention value must be finite, got {value} in {text!r}")
        try:
            step = int(match["step"])
        except ValueError:
            step = -1
        if step < 0:
            raise ValueError(f"bad step {match['step']!r} in {text!r}: an integer >= 0")
        if param == "gravity":
            if target is not None and target not in AXES:
                raise ValueError(
                    f"gravity target {target!r} in {text!r}: use x, y or z (or none, with *)"
                )
            if target is None and op == "=":
                raise ValueError(
                    f"{text!r}: gravity=<number> needs an axis (gravity:z=-5); without one "
                    "only * (scaling the whole vector) is defined"
                )
        elif target is None:
            raise ValueError(f"{text!r}: {param} needs a target name ({param}:<name>{op}...)")
        items.append(Intervention(param, target, op, value, step, text))
    if not items:
        raise ValueError(f"empty intervention spec {spec!r}: {_GRAMMAR}")
    return items


def find_mujoco_model(env: gym.Env) -> Any:
    """The ``mujoco.MjModel`` behind a dmc task, a gymnasium MuJoCo task or any env whose
    ``unwrapped`` has ``physics`` (dm-control) or ``model`` (an ``MjModel``)."""
    import mujoco

    inner = env.unwrapped
    physics = getattr(inner, "physics", None)
    if physics is not None and hasattr(physics, "model"):
        return physics.model.ptr
    model = getattr(inner, "model", None)
    if isinstance(model, mujoco.MjModel):
        return model
    raise ValueError(
        f"interventions need a MuJoCo task (dmc:, blocks: or a gym MuJoCo env); "
        f"{type(inner).__name__} has no MuJoCo model"
    )


_OBJECTS = {"body_mass": "body", "actuator_gear": "actuator", "geom_friction": "geom"}


def _names(model: Any, kind: str) -> list[str]:
    count = {"body": model.nbody, "actuator": model.nu, "geom": model.ngeom}[kind]
    accessor = getattr(model, kind)
    return [accessor(i).name for i in range(count)]


def _resolve(model: Any, item: Intervention) -> tuple[np.ndarray, tuple[int, ...]]:
    """The array view and index the item writes to."""
    import mujoco

    if item.param == "gravity":
        index = (AXES.index(item.target),) if item.target else ()
        return model.opt.gravity, index
    kind = _OBJECTS[item.param]
    obj = {
        "body": mujoco.mjtObj.mjOBJ_BODY,
        "actuator": mujoco.mjtObj.mjOBJ_ACTUATOR,
        "geom": mujoco.mjtObj.mjOBJ_GEOM,
    }[kind]
    idx = mujoco.mj_name2id(model, obj, item.target)
    if idx < 0:
        valid = [n for n in _names(model, kind) if n]
        raise ValueError(
            f"{item.text!r}: no {kind} named {item.target!r} in this model; "
            f"valid {kind} names: {', '.join(valid) or '(none are named)'}"
        )
    array = getattr(model, item.param)
    return array, (idx,) if array.ndim == 1 else (idx, 0)


class Interventions(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Applies a parsed intervention spec to the env's MuJoCo model (module docstring).

    ``env_steps`` is this env's step count; ``applied`` lists the texts logged so far.
    ``frames_per_step``: the action repeat of the wrapped env (wrap ``ActionRepeat``).
    """

    def __init__(self, env: gym.Env, spec: str, frames_per_step: int = 1) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, spec=spec, frames_per_step=frames_per_step)
        gym.Wrapper.__init__(self, env)
        self.items = parse_interventions(spec)
        self.model = find_mujoco_model(env)
        self._targets = [_resolve(self.model, item) for item in self.items]
        self._pending = list(range(len(self.items)))
        self.frames_per_step = int(frames_per_step)
        self.env_steps = 0
        self._reset_before = False
        self.applied: list[str] = []

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        if self._reset_before:
            self.env_steps += self.frames_per_step
        self._reset_before = True
        return self.env.reset(**kwargs)

    def _apply_due(self) -> list[str]:
        done, messages = [], []
        for i in self._pending:
            item = self.items[i]
            if self.env_steps < item.step:
                continue
            array, index = self._targets[i]
            old = np.array(array[index], dtype=np.float64)
            new = old * item.value if item.op == "*" else np.full_like(old, item.value)
            array[index] = new
            message = (
                f"{item.text}: {item.param}"
                f"{f'[{item.target}]' if item.target else ''} "
                f"{np.round(old, 6).tolist()} -> {np.round(new, 6).tolist()} "
                f"at env step {self.env_steps}"
            )
            logger.warning("intervention %s", message)
            self.applied.append(message)
            messages.append(message)
            done.append(i)
        self._pending = [i for i in self._pending if i not in done]
        return messages

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        messages = self._apply_due() if self._pending else []
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.env_steps += self.frames_per_step
        if messages:
            info = {**info, "intervention": "; ".join(messages)}
        return obs, reward, terminated, truncated, info


__all__ = [
    "AXES",
    "PARAMS",
    "Intervention",
    "Interventions",
    "find_mujoco_model",
    "parse_interventions",
]
