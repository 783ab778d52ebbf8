"""A MuJoCo tabletop with 1-5 coloured blocks to push or stack toward a goal configuration.

Ids ``blocks:push-<n>`` (move every block to its own random table position) and
``blocks:stack-<n>`` (build one tower in a given order), n = 1..5. The scene is built from
MJCF in code. Each block body carries one geom per shape (cube, cylinder, brick, disc) and a
reset shows one of them (the others move to a hidden geom group and stop colliding), so a new
episode re-draws shapes and colours without recompiling the model or recreating the GL context.

Two action modes (fixed per env):

- ``pick_place``: (pick_x, pick_y, place_x, place_y) in [-1, 1], table coordinates scaled to
  the workspace. The block under the pick point (topmost if several; else the nearest centre
  within a small radius; else nothing) is lifted, turned upright (keeping its yaw) and dropped
  just above whatever lies under the place point; physics then runs until every block is at
  rest (at most 2 s of simulated time).
- ``pusher``: (vx, vy) in [-1, 1], a planar velocity command for a cylinder that slides on the
  table and pushes blocks. Its speed is force-limited, so pinning a block against the rim of the
  table cannot blow the simulation up.

Observations from ``BlocksEnv`` itself are a float32 vector of block centre positions (plus the
pusher's xy); ``envs.make_env`` adds the usual ``pixels`` / ``goal`` keys. Every ``reset`` and
``step`` returns ``info`` with the goal image, goal and current positions, ground-truth
segmentation masks (MuJoCo segmentation rendering of the same camera as the pixels) and
``is_success``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from imagine_rl.envs.rendering import RENDER_QUALITIES, MujocoFrameRenderer

BLOCKS_TASKS: tuple[str, ...] = ("push", "stack")
BLOCKS_ACTIONS: tuple[str, ...] = ("pick_place", "pusher")
MAX_BLOCKS = 5
# Default episode lengths (env steps) per action mode; make_env applies them when
# time_limit is None.
DEFAULT_TIME_LIMITS: dict[str, int] = {"pick_place": 10, "pusher": 100}

# Geometry (metres). The table top is the plane z = 0 inside a low rim.
TABLE_HALF = 0.26
RIM_HALF_THICKNESS = 0.01
RIM_HALF_HEIGHT = 0.03
WALL_HALF_HEIGHT = 0.4
# Pick/place coordinates in [-1, 1] map to [-WORKSPACE_HALF, WORKSPACE_HALF].
WORKSPACE_HALF = 0.22
# Initial and push-goal positions are drawn in this square, with centres this far apart.
SPAWN_HALF = 0.17
# Twice the largest footprint radius (the brick), so no two footprints overlap at any yaw.
MIN_SEPARATION = 0.12
# Stack goals: the tower's base is drawn in this central square.
TOWER_HALF = 0.08
PICK_SLACK = 0.02
DROP_GAP = 0.003
PUSHER_RADIUS = 0.025
PUSHER_HALF_HEIGHT = 0.03
PUSHER_MAX_SPEED = 0.3  # m/s at |action| = 1
TIMESTEP = 0.005
# pick_place: after a drop, physics runs in chunks of SETTLE_CHUNK substeps until every block
# is at rest (SETTLE_SPEED m/s, SETTLE_SPIN rad/s) or SETTLE_MAX_SUBSTEPS have passed.
SETTLE_CHUNK = 25
SETTLE_MAX_SUBSTEPS = 400
SETTLE_SPEED = 0.01
SETTLE_SPIN = 0.2
PUSHER_SUBSTEPS = 20  # pusher: 0.1 s per action
HIDDEN_GROUP = 5  # geom group not drawn by the default mjvOption (groups 0-2 are)


@dataclass(frozen=True)
class _Shape:
    name: str
    mj_type: str  # "box" or "cylinder"
    size: tuple[float, ...]  # MJCF size: box half-extents; cylinder (radius, half-height)

    @property
    def half_height(self) -> float:
        return self.size[2] if self.mj_type == "box" else self.size[1]

    @property
    def footprint_radius(self) -> float:
        """Radius of the circle around the top-down footprint."""
        if self.mj_type == "box":
            return float(np.hypot(self.size[0], self.size[1]))
        return self.size[0]


SHAPES: tuple[_Shape, ...] = (
    _Shape("cube", "box", (0.035, 0.035, 0.035)),
    _Shape("cylinder", "cylinder", (0.035, 0.035)),
    _Shape("brick", "box", (0.05, 0.028, 0.028)),
    _Shape("disc", "cylinder", (0.045, 0.02)),
)
# Saturated, well-separated hues, so a block's colour names it (and tests can check masks).
PALETTE: np.ndarray = np.array(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.75, 0.15],  # green
        [0.15, 0.30, 0.95],  # blue
        [0.95, 0.85, 0.10],  # yellow
        [0.85, 0.15, 0.85],  # magenta
        [0.10, 0.85, 0.85],  # cyan
        [1.00, 0.50, 0.05],  # orange
    ],
    dtype=np.float32,
)
TABLE_RGBA = "0.45 0.42 0.40 1"
RIM_RGBA = "0.30 0.28 0.27 1"
PUSHER_RGBA = "0.15 0.15 0.15 1"

# contype/conaffinity bits: 1 = everything that rests on the table, 2 = the pusher. The pusher
# touches blocks and rims but never the table top, so it slides without friction from it.
# Every block geom is compiled solid (the compiler ORs geom bits into body_contype, which the
# broad phase filters on) and the hidden shape variants are switched off at reset.
_SOLID = 'contype="1" conaffinity="3"'

_ID_PATTERN = re.compile(r"^(push|stack)-(\d+)$")


def parse_blocks_name(name: str) -> tuple[str, int] | None:
    """``"push-3"`` -> ``("push", 3)``; None unless the name is a valid blocks task."""
    match = _ID_PATTERN.match(name)
    if match is None:
        return None
    n = int(match.group(2))
    if not 1 <= n <= MAX_BLOCKS or match.group(2) != str(n):
        return None
    return match.group(1), n


def blocks_names() -> list[str]:
    """Every valid suite-local blocks name, e.g. ``["push-1", ..., "stack-5"]``."""
    return [f"{task}-{n}" for task in BLOCKS_TASKS for n in range(1, MAX_BLOCKS + 1)]


def _camera_axes(pos: tuple[float, float, float], target: tuple[float, float, float]) -> str:
    """MJCF ``xyaxes`` of a camera at ``pos`` looking at ``target`` with x along world x."""
    back = np.asarray(pos, dtype=float) - np.asarray(target, dtype=float)
    back /= np.linalg.norm(back)
    x_axis = np.array([1.0, 0.0, 0.0])
    y_axis = np.cross(back, x_axis)
    y_axis /= np.linalg.norm(y_axis)
    return " ".join(f"{v:.6f}" for v in (*x_axis, *y_axis))


def build_mjcf(num_blocks: int, pusher: bool) -> str:
    """The scene's MJCF: table, rim, ``num_blocks`` free blocks (all shape variants), cameras."""
    parts: list[str] = []
    for i in range(num_blocks):
        geoms = []
        for shape in SHAPES:
            size = " ".join(f"{s:g}" for s in shape.size)
            geoms.append(
                f'<geom name="block{i}_{shape.name}" type="{shape.mj_type}" size="{size}" '
                f'group="{HIDDEN_GROUP}" {_SOLID} rgba="1 1 1 1"/>'
            )
        # Mass and inertia are given explicitly: the hidden variants must not add to them.
        parts.append(
            f'<body name="block{i}" pos="{0.1 * i:g} 0 0.1">'
            f'<freejoint name="block{i}"/>'
            '<inertial pos="0 0 0" mass="0.1" diaginertia="6e-5 6e-5 6e-5"/>'
            f"{''.join(geoms)}</body>"
        )
    if pusher:
        z = PUSHER_HALF_HEIGHT + 0.002
        limit = TABLE_HALF - PUSHER_RADIUS - 0.005
        parts.append(
            f'<body name="pusher" pos="0 0 {z:g}">'
            f'<joint name="pusher_x" type="slide" axis="1 0 0" limited="true" '
            f'range="{-limit:g} {limit:g}" damping="1"/>'
            f'<joint name="pusher_y" type="slide" axis="0 1 0" limited="true" '
            f'range="{-limit:g} {limit:g}" damping="1"/>'
            f'<geom name="pusher" type="cylinder" size="{PUSHER_RADIUS} {PUSHER_HALF_HEIGHT}" '
            f'mass="0.5" contype="2" conaffinity="0" friction="0.3 0.005 0.0001" '
            f'rgba="{PUSHER_RGBA}"/></body>'
        )
    rim = []
    offset = TABLE_HALF + RIM_HALF_THICKNESS
    length = TABLE_HALF + 2 * RIM_HALF_THICKNESS
    for k, (x, y, sx, sy) in enumerate(
        [
            (offset, 0, RIM_HALF_THICKNESS, length),
            (-offset, 0, RIM_HALF_THICKNESS, length),
            (0, offset, length, RIM_HALF_THICKNESS),
            (0, -offset, length, RIM_HALF_THICKNESS),
        ]
    ):
        rim.append(
            f'<geom name="rim{k}" type="box" pos="{x:g} {y:g} {RIM_HALF_HEIGHT:g}" '
            f'size="{sx:g} {sy:g} {RIM_HALF_HEIGHT:g}" {_SOLID} rgba="{RIM_RGBA}"/>'
        )
        # An invisible wall above the rim keeps a block toppling off a tower on the table.
        rim.append(
            f'<geom name="wall{k}" type="box" pos="{x:g} {y:g} {WALL_HALF_HEIGHT:g}" '
            f'size="{sx:g} {sy:g} {WALL_HALF_HEIGHT:g}" {_SOLID} group="{HIDDEN_GROUP}" '
            'rgba="0 0 0 0"/>'
        )
    actuators = ""
    if pusher:
        actuators = (
            "<actuator>"
            '<velocity name="pusher_vx" joint="pusher_x" kv="20" ctrllimited="true" '
            f'ctrlrange="{-PUSHER_MAX_SPEED:g} {PUSHER_MAX_SPEED:g}" forcelimited="true" '
            'forcerange="-10 10"/>'
            '<velocity name="pusher_vy" joint="pusher_y" kv="20" ctrllimited="true" '
            f'ctrlrange="{-PUSHER_MAX_SPEED:g} {PUSHER_MAX_SPEED:g}" forcelimited="true" '
            'forcerange="-10 10"/>'
            "</actuator>"
        )
    side_pos = (0.0, -0.45, 0.72)
    table_half = TABLE_HALF + 2 * RIM_HALF_THICKNESS
    return f"""
<mujoco model="blocks">
  <option timestep="{TIMESTEP:g}" integrator="implicitfast"/>
  <visual>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.45 0.45 0.45" specular="0 0 0"/>
  </visual>
  <default>
    <geom condim="6" friction="0.8 0.01 0.005" solref="0.01 1"/>
  </default>
  <worldbody>
    <light name="sun" directional="true" pos="0 0 2" dir="0.2 0.4 -1" diffuse="0.5 0.5 0.5"
           specular="0.05 0.05 0.05" castshadow="false"/>
    <camera name="side" pos="{" ".join(f"{v:g}" for v in side_pos)}"
            xyaxes="{_camera_axes(side_pos, (0.0, 0.03, 0.06))}" fovy="45"/>
    <camera name="top" pos="0 0 0.95" xyaxes="1 0 0 0 1 0" fovy="40"/>
    <geom name="table" type="box" pos="0 0 -0.02" size="{table_half:g} {table_half:g} 0.02"
          contype="1" conaffinity="1" rgba="{TABLE_RGBA}"/>
    {"".join(rim)}
    {"".join(parts)}
  </worldbody>
  {actuators}
</mujoco>
"""


class BlocksEnv(gym.Env[np.ndarray, np.ndarray]):
    """Blocks on a table, moved by pick-and-place or a pusher toward a goal configuration.

    Per episode (drawn from ``np_random``, so a seeded reset repeats the episode): a shape and
    a distinct palette colour per block, non-overlapping initial positions with random yaw,
    and goal positions (push: random non-overlapping table positions; stack: one tower in a
    random order at a random place). The goal image is a render of the blocks at their goals.

    Reward: minus the mean distance of blocks to their goals (xy for push, xyz for stack) plus
    1 while ``is_success`` (every block within ``success_tolerance`` of its goal). Episodes
    end by an outer time limit (truncation, see ``DEFAULT_TIME_LIMITS``), or, with
    ``terminate_on_success=True``, terminate on the step that reaches success (the task is
    then "reach the goal configuration", and a success cannot be undone by later actions).

    Oracle access for evaluation: ``get_sim_state`` / ``set_sim_state`` (the episode's shapes,
    colours and goal plus the full MuJoCo integration state; restorable into any env of the
    same id and action mode), ``goal_sim_state``, ``simulate`` (physics only, no rendering)
    and the ``goal_positions`` / ``block_positions`` attributes.

    Shapes:
        observation: float32 (3 n,) block centres (pick_place) or (3 n + 2,) plus pusher xy;
        action: float32 (4,) pick_place or (2,) pusher, in [-1, 1];
        ``render()``: uint8 (size, size, 3);
        info: goal_pixels uint8 (3, size, size), goal_positions / block_positions float32
        (n, 3), masks uint8 (size, size) with 0 = table/rim/pusher/sky and i = block i
        (1..n), is_success bool.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        task: str,
        num_blocks: int,
        *,
        action_mode: str = "pick_place",
        size: int = 64,
        camera: int | str | None = None,
        render_quality: str = "fast",
        render_mode: str | None = "rgb_array",
        success_tolerance: float = 0.05,
        terminate_on_success: bool = False,
    ) -> None:
        import mujoco

        if task not in BLOCKS_TASKS:
            raise ValueError(f"blocks task must be one of {BLOCKS_TASKS}, got {task!r}")
        if not isinstance(num_blocks, (int, np.integer)) or not 1 <= num_blocks <= MAX_BLOCKS:
            raise ValueError(
                f"blocks: number of blocks must be an int in 1..{MAX_BLOCKS}, got {num_blocks!r}"
            )
        if action_mode not in BLOCKS_ACTIONS:
            raise ValueError(
                f"blocks action mode must be one of {BLOCKS_ACTIONS} "
                f"(env.blocks_action), got {action_mode!r}"
            )
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if render_quality not in RENDER_QUALITIES:
            raise ValueError(
                f"render_quality must be one of {RENDER_QUALITIES}, got {render_quality!r}"
            )
        if not success_tolerance > 0:
            raise ValueError(f"success_tolerance must be > 0, got {success_tolerance!r}")
        self.task, self.num_blocks, self.action_mode = task, int(num_blocks), action_mode
        self.size, self.render_mode = int(size), render_mode
        self.success_tolerance = float(success_tolerance)
        self.terminate_on_success = bool(terminate_on_success)
        self._pusher = action_mode == "pusher"

        self.model = mujoco.MjModel.from_xml_string(build_mjcf(self.num_blocks, self._pusher))
        self.data = mujoco.MjData(self.model)
        self._mujoco = mujoco
        self.camera = _resolve_camera(self.model, "side" if camera is None else camera)
        # Renders happen regardless of render_mode: info always carries masks and the goal.
        self._renderer = MujocoFrameRenderer(self.model, self.size, self.camera, render_quality)

        name2id = self._name2id
        self._block_body = np.array([name2id("body", f"block{i}") for i in range(num_blocks)])
        self._block_geoms = np.array(
            [
                [name2id("geom", f"block{i}_{s.name}") for s in SHAPES]
                for i in range(self.num_blocks)
            ]
        )
        joint_ids = [name2id("joint", f"block{i}") for i in range(self.num_blocks)]
        self._block_qpos = np.array([self.model.jnt_qposadr[j] for j in joint_ids])
        self._block_qvel = np.array([self.model.jnt_dofadr[j] for j in joint_ids])
        self._pusher_qpos = np.array(
            [self.model.jnt_qposadr[name2id("joint", f"pusher_{a}")] for a in "xy"]
            if self._pusher
            else [],
            dtype=int,
        )
        # Segmentation geom id -> mask label (0 for everything that is not a block).
        self._geom_label = np.zeros(self.model.ngeom + 1, dtype=np.uint8)
        for i in range(self.num_blocks):
            self._geom_label[self._block_geoms[i]] = i + 1
        self._geom_obj_type = int(mujoco.mjtObj.mjOBJ_GEOM)
        self._state_spec = int(mujoco.mjtState.mjSTATE_INTEGRATION)
        self._physics_size = mujoco.mj_stateSize(self.model, self._state_spec)

        state_dim = 3 * self.num_blocks + (2 if self._pusher else 0)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4 if not self._pusher else 2,), np.float32)

        self.shape_ids = np.zeros(self.num_blocks, dtype=np.int64)
        self.color_ids = np.zeros(self.num_blocks, dtype=np.int64)
        self.goal_positions = np.zeros((self.num_blocks, 3), dtype=np.float32)
        self.goal_pixels = np.zeros((3, self.size, self.size), dtype=np.uint8)
        self._goal_qpos = np.zeros(self.model.nq)
        self._frame: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        self._needs_reset = True

    def _name2id(self, kind: str, name: str) -> int:
        obj = getattr(self._mujoco.mjtObj, f"mjOBJ_{kind.upper()}")
        idx = self._mujoco.mj_name2id(self.model, obj, name)
        assert idx >= 0, f"blocks MJCF lacks {kind} {name!r}"
        return int(idx)

    # ------------------------------------------------------------------ episode set-up

    def _apply_appearance(self) -> None:
        """Show each block's chosen shape in its chosen colour; hide and disable the rest."""
        model = self.model
        for i in range(self.num_blocks):
            for k, geom in enumerate(self._block_geoms[i]):
                active = k == self.shape_ids[i]
                model.geom_group[geom] = 0 if active else HIDDEN_GROUP
                model.geom_contype[geom] = 1 if active else 0
                model.geom_conaffinity[geom] = 3 if active else 0
                model.geom_rgba[geom, :3] = PALETTE[self.color_ids[i]]

    def _shape(self, i: int) -> _Shape:
        return SHAPES[int(self.shape_ids[i])]

    def _sample_separated(
        self, count: int, rng: np.random.Generator, avoid: np.ndarray | None = None
    ) -> np.ndarray:
        """``count`` xy points in the spawn square, at least MIN_SEPARATION apart from each
        other and from the points in ``avoid``.

        Shapes:
            avoid: (k, 2) or None -> (count, 2)
        """
        fixed = [] if avoid is None else list(avoid)
        for _ in range(1000):
            points: list[np.ndarray] = []
            for _ in range(200 * count):
                p = rng.uniform(-SPAWN_HALF, SPAWN_HALF, size=2)
                if all(np.linalg.norm(p - q) >= MIN_SEPARATION for q in fixed + points):
                    points.append(p)
                    if len(points) == count:
                        return np.stack(points)
        raise RuntimeError(f"blocks: could not place {count} separated objects")  # unreachable

    def _set_block_pose(self, qpos: np.ndarray, i: int, xyz: np.ndarray, yaw: float) -> None:
        adr = self._block_qpos[i]
        qpos[adr : adr + 3] = xyz
        qpos[adr + 3 : adr + 7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        rng = self.np_random
        n = self.num_blocks
        self.shape_ids = rng.integers(0, len(SHAPES), size=n)
        self.color_ids = rng.permutation(len(PALETTE))[:n]
        self._apply_appearance()
        yaws = rng.uniform(-np.pi, np.pi, size=n)
        # One draw for the blocks' (and pusher's) start, one for the goals.
        # A tower stands near the middle of the table (a tall one at the back would leave the
        # camera's view), its base clear of every start point, so stacking takes n
        # pick-and-places in goal order.
        stack = self.task == "stack"
        base = rng.uniform(-TOWER_HALF, TOWER_HALF, size=(1, 2)) if stack else None
        # Start points for the blocks, then the pusher.
        starts = self._sample_separated(n + int(self._pusher), rng, avoid=base)
        goals = np.zeros((n, 3))
        if base is None:
            # Clear of the pusher's start, where the goal image shows the pusher.
            goals[:, :2] = self._sample_separated(n, rng, avoid=starts[n:])
            goals[:, 2] = [self._shape(i).half_height for i in range(n)]
        else:
            height = 0.0
            for i in rng.permutation(n):
                half = self._shape(int(i)).half_height
                goals[i] = [base[0, 0], base[0, 1], height + half]
                height += 2 * half
        self.goal_positions = goals.astype(np.float32)

        mujoco = self._mujoco
        mujoco.mj_resetData(self.model, self.data)
        qpos = self.data.qpos.copy()
        if self._pusher:
            qpos[self._pusher_qpos] = starts[n]
        for i in range(n):
            self._set_block_pose(qpos, i, goals[i], yaws[i])
        self._goal_qpos = qpos.copy()
        self.data.qpos[:] = qpos
        mujoco.mj_forward(self.model, self.data)
        self.goal_pixels = np.ascontiguousarray(self._renderer.render(self.data).transpose(2, 0, 1))

        for i in range(n):
            xyz = np.array([*starts[i], self._shape(i).half_height])
            self._set_block_pose(qpos, i, xyz, yaws[i])
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:] = qpos
        mujoco.mj_forward(self.model, self.data)
        self._frame = None
        self._needs_reset = False
        return self._observation(), self._info()

    # ------------------------------------------------------------------ stepping

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise gym.error.ResetNeeded("BlocksEnv.step() called before reset()")
        self.simulate(action)
        info = self._info()
        reward = -self._mean_goal_distance() + float(info["is_success"])
        terminated = self.terminate_on_success and info["is_success"]
        return self._observation(), reward, terminated, False, info

    def simulate(self, action: np.ndarray) -> np.ndarray:
        """Apply ``action`` to the physics only (no rendering): the oracle planner's step.

        Shapes:
            action: (4,) or (2,) in [-1, 1] -> block centres float32 (n, 3)
        """
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != self.action_space.shape:
            raise ValueError(
                f"blocks {self.action_mode} action must have shape {self.action_space.shape}, "
                f"got {action.shape}"
            )
        action = np.clip(np.nan_to_num(action), -1.0, 1.0)
        if self._pusher:
            self.data.ctrl[:] = action * PUSHER_MAX_SPEED
            self._advance(PUSHER_SUBSTEPS)
        else:
            self._pick_place(action[:2] * WORKSPACE_HALF, action[2:] * WORKSPACE_HALF)
        self._frame = None
        return self.block_positions

    def _advance(self, substeps: int) -> None:
        self._mujoco.mj_step(self.model, self.data, nstep=substeps)

    def _vertical_half_extent(self, i: int) -> float:
        """Half of block i's current vertical extent (exact for its box/cylinder)."""
        shape = self._shape(i)
        up = self.data.geom_xmat[self._block_geoms[i, self.shape_ids[i]]].reshape(3, 3)[2]
        if shape.mj_type == "box":
            return float(np.abs(up) @ np.asarray(shape.size))
        radius, half = shape.size
        return float(abs(up[2]) * half + np.sqrt(max(0.0, 1.0 - up[2] ** 2)) * radius)

    def _contains(self, i: int, point: np.ndarray) -> bool:
        """Whether ``point`` (xy) lies in block i's top-down footprint (tilt ignored)."""
        shape = self._shape(i)
        geom = self._block_geoms[i, self.shape_ids[i]]
        rot = self.data.geom_xmat[geom].reshape(3, 3)
        offset = np.array([*(point - self.data.geom_xpos[geom, :2]), 0.0])
        local = rot.T @ offset
        if shape.mj_type == "box":
            return bool(abs(local[0]) <= shape.size[0] and abs(local[1]) <= shape.size[1])
        return bool(np.hypot(local[0], local[1]) <= shape.size[0])

    def picked_block(self, pick_xy: np.ndarray) -> int | None:
        """Index of the block a pick at table point ``pick_xy`` (metres) takes, or None."""
        centres = self.data.xpos[self._block_body]
        inside = [i for i in range(self.num_blocks) if self._contains(i, pick_xy)]
        if inside:
            return max(inside, key=lambda i: centres[i, 2])
        dist = np.linalg.norm(centres[:, :2] - pick_xy, axis=1)
        reach = np.array([self._shape(i).footprint_radius for i in range(self.num_blocks)])
        i = int(np.argmin(dist - reach))
        return i if dist[i] <= reach[i] + PICK_SLACK else None

    def _pick_place(self, pick_xy: np.ndarray, place_xy: np.ndarray) -> None:
        block = self.picked_block(pick_xy)
        if block is not None:
            centres = self.data.xpos[self._block_body]
            radius = self._shape(block).footprint_radius
            # A drop into the rim would start interpenetrating and be shot out.
            edge = TABLE_HALF - radius - DROP_GAP
            place_xy = np.clip(place_xy, -edge, edge)
            support = 0.0
            for j in range(self.num_blocks):
                if j == block:
                    continue
                reach = radius + self._shape(j).footprint_radius
                if np.linalg.norm(centres[j, :2] - place_xy) < reach:
                    support = max(support, centres[j, 2] + self._vertical_half_extent(j))
            quat = self.data.xquat[self._block_body[block]]
            # Yaw of the body's x axis in the table plane; the drop puts the block upright.
            yaw = float(
                np.arctan2(
                    2 * (quat[0] * quat[3] + quat[1] * quat[2]),
                    1 - 2 * (quat[2] ** 2 + quat[3] ** 2),
                )
            )
            z = support + self._shape(block).half_height + DROP_GAP
            self._set_block_pose(self.data.qpos, block, np.array([*place_xy, z]), yaw)
            adr = self._block_qvel[block]
            self.data.qvel[adr : adr + 6] = 0.0
            self._mujoco.mj_forward(self.model, self.data)
        self._settle()

    def _settle(self) -> None:
        velocities = self.data.qvel[self._block_qvel[:, None] + np.arange(6)]
        for _ in range(SETTLE_MAX_SUBSTEPS // SETTLE_CHUNK):
            self._advance(SETTLE_CHUNK)
            velocities = self.data.qvel[self._block_qvel[:, None] + np.arange(6)]
            speed = np.linalg.norm(velocities[:, :3], axis=1).max()
            spin = np.linalg.norm(velocities[:, 3:], axis=1).max()
            if speed < SETTLE_SPEED and spin < SETTLE_SPIN:
                return

    # ------------------------------------------------------------------ observation, info

    @property
    def block_positions(self) -> np.ndarray:
        """Block centres, float32 (n, 3)."""
        return self.data.xpos[self._block_body].astype(np.float32)

    def _observation(self) -> np.ndarray:
        parts = [self.block_positions.ravel()]
        if self._pusher:
            parts.append(self.data.qpos[self._pusher_qpos].astype(np.float32))
        return np.concatenate(parts).astype(np.float32)

    def _goal_distances(self) -> np.ndarray:
        diff = self.block_positions.astype(np.float64) - self.goal_positions
        if self.task == "push":
            diff = diff[:, :2]
        return np.linalg.norm(diff, axis=1)

    def _mean_goal_distance(self) -> float:
        return float(self._goal_distances().mean())

    def is_success(self) -> bool:
        """Every block within ``success_tolerance`` of its goal (xy for push, xyz for stack)."""
        return bool((self._goal_distances() <= self.success_tolerance).all())

    def _render_frame_and_masks(self) -> None:
        if self._frame is None:
            self._frame = self._renderer.render(self.data)
            seg = self._renderer.segmentation()
            ids, types = seg[..., 0], seg[..., 1]
            is_geom = (types == self._geom_obj_type) & (ids >= 0)
            # ids of -1 (sky) index the extra trailing 0 of _geom_label.
            self._masks = np.where(is_geom, self._geom_label[ids], 0).astype(np.uint8)

    def masks(self) -> np.ndarray:
        """Ground-truth segmentation of the current frame: uint8 (size, size), 0..n."""
        self._render_frame_and_masks()
        assert self._masks is not None
        return self._masks.copy()

    def _info(self) -> dict[str, Any]:
        return {
            "goal_pixels": self.goal_pixels.copy(),
            "goal_positions": self.goal_positions.copy(),
            "block_positions": self.block_positions,
            "masks": self.masks(),
            "is_success": self.is_success(),
        }

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        self._render_frame_and_masks()
        assert self._frame is not None
        return self._frame.copy()

    # ------------------------------------------------------------------ oracle state

    def _header(self) -> np.ndarray:
        return np.concatenate(
            [
                [self.num_blocks, BLOCKS_TASKS.index(self.task), int(self._pusher)],
                self.shape_ids,
                self.color_ids,
                self.goal_positions.ravel(),
                self._goal_qpos,
            ]
        ).astype(np.float64)

    def get_sim_state(self) -> np.ndarray:
        """The episode (shapes, colours, goal) and the full MuJoCo integration state.

        Shapes:
            -> float64 (state_size,), fixed per env id and action mode
        """
        physics = np.empty(self._physics_size)
        self._mujoco.mj_getState(self.model, self.data, physics, self._state_spec)
        return np.concatenate([self._header(), physics])

    def set_sim_state(self, state: np.ndarray) -> None:
        """Restore a ``get_sim_state`` vector (from this env or one of the same id and mode).

        The goal image is re-rendered only when the episode (shapes, colours, goal) changes.
        """
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        header_size = len(self._header())
        expected = header_size + self._physics_size
        n = self.num_blocks
        if state.shape != (expected,) or tuple(state[:3]) != (
            n,
            BLOCKS_TASKS.index(self.task),
            int(self._pusher),
        ):
            raise ValueError(
                f"set_sim_state: expected a state of {expected} values from a blocks:"
                f"{self.task}-{n} env in {self.action_mode} mode (see get_sim_state), "
                f"got {state.shape[0]} values"
            )
        header, physics = state[:header_size], state[header_size:]
        same_episode = np.array_equal(header, self._header())
        offset = 3
        self.shape_ids = header[offset : offset + n].astype(np.int64)
        self.color_ids = header[offset + n : offset + 2 * n].astype(np.int64)
        offset += 2 * n
        self.goal_positions = header[offset : offset + 3 * n].reshape(n, 3).astype(np.float32)
        self._goal_qpos = header[offset + 3 * n :].copy()
        self._apply_appearance()
        mujoco = self._mujoco
        if not same_episode:
            mujoco.mj_resetData(self.model, self.data)
            self.data.qpos[:] = self._goal_qpos
            mujoco.mj_forward(self.model, self.data)
            frame = self._renderer.render(self.data)
            self.goal_pixels = np.ascontiguousarray(frame.transpose(2, 0, 1))
        mujoco.mj_setState(self.model, self.data, physics, self._state_spec)
        mujoco.mj_forward(self.model, self.data)
        self._frame = None
        self._needs_reset = False

    def goal_sim_state(self) -> np.ndarray:
        """A ``get_sim_state`` vector of this episode with every block at rest at its goal."""
        saved = self.get_sim_state()
        mujoco = self._mujoco
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:] = self._goal_qpos
        mujoco.mj_forward(self.model, self.data)
        goal = self.get_sim_state()
        self.set_sim_state(saved)
        return goal

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None  # type: ignore[assignment]


def _resolve_camera(model: Any, camera: int | str) -> int:
    import mujoco

    if isinstance(camera, str):
        cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if cam_id < 0:
            raise ValueError(f"blocks: camera {camera!r} not found; use 'side' or 'top' (0 or 1)")
        return int(cam_id)
    if not 0 <= int(camera) < model.ncam:
        raise ValueError(
            f"blocks: camera must be in [0, {model.ncam}) ('side'=0, 'top'=1), got {camera}"
        )
    return int(camera)
