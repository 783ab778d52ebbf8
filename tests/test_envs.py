"""Tests of the environment layer ``envs`` (gymnasium + dm-control behind ``make_env``)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import dm_env
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from imagine_rl import envs
from imagine_rl.envs.rendering import resize_frame
from imagine_rl.envs.wrappers import ActionRepeat

REPO = Path(__file__).resolve().parents[1]


def _run(env: gym.Env, actions: list, reset_seed: int | None = None) -> tuple[list, list]:
    obs, _ = env.reset(seed=reset_seed)
    observations, rewards = [obs], []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        observations.append(obs)
        rewards.append(r)
        if term or trunc:
            break
    return observations, rewards


def _assert_obs_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --------------------------------------------------------------------------------------
# Installation / import
# --------------------------------------------------------------------------------------


def test_mujoco_and_dm_control_versions_fit_together() -> None:
    """mujoco 4 renamed model fields that dm-control before 1.0.52 reads ('MjModel' object
    has no attribute 'flex_vertedge'); pyproject.toml asks for both at once."""
    from importlib.metadata import version

    import mujoco
    from packaging.version import Version

    if Version(mujoco.__version__) >= Version("4"):
        assert Version(version("dm-control")) >= Version("1.0.52"), (
            "mujoco >= 4 needs dm-control >= 1.0.52: pip install 'dm-control>=1.0.52'"
        )


def test_import_sets_mujoco_gl_when_unset() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    code = "import os; from imagine_rl import envs; print(os.environ['MUJOCO_GL'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() in ("egl", "osmesa")
    env["MUJOCO_GL"] = "glfw"  # an explicit choice is kept
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "glfw"


def test_mujoco_imported_before_envs_still_renders_headless() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    code = (
        "import mujoco\nfrom imagine_rl import envs\n"
        "e = envs.make_env('dmc:cartpole-swingup', obs='pixels', size=16)\n"
        "print(e.reset(seed=0)[0]['pixels'].std() > 5); e.close()"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error::UserWarning:imagine_rl.envs", "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "True", out.stderr


# --------------------------------------------------------------------------------------
# Ids and argument validation
# --------------------------------------------------------------------------------------


def test_list_env_ids() -> None:
    from dm_control import suite

    dmc = envs.list_env_ids("dmc")
    assert len(dmc) == len(suite.ALL_TASKS)
    for env_id in ("dmc:ball_in_cup-catch", "dmc:point_mass-easy", "dmc:walker-walk"):
        assert env_id in dmc
        assert envs.parse_env_id(env_id) == ("dmc", env_id[4:])
    assert all(envs.parse_env_id(i).suite == "dmc" for i in dmc)
    assert "gym:Pendulum-v1" in envs.list_env_ids("gym")
    with pytest.raises(ValueError, match="suite"):
        envs.list_env_ids("atari")


def test_unknown_ids() -> None:
    with pytest.raises(envs.UnknownEnvError, match=r"did you mean 'dmc:walker-walk'.*dmc has"):
        envs.make_env("dmc:walker-wlak")
    with pytest.raises(ValueError, match="did you mean 'gym:Pendulum-v1'"):
        envs.make_env("gym:Pendulm-v1")
    with pytest.raises(ValueError, match="'gym:' or 'dmc:'"):
        envs.make_env("atari:Pong-v5")
    with pytest.raises(ValueError, match="'gym:' or 'dmc:'"):
        envs.make_env("walker-walk")
    with pytest.raises(envs.UnknownEnvError, match="unknown env id 'dmc:walker'"):
        envs.make_env("dmc:walker")
    envs.check_env_id("dmc:walker-walk")
    with pytest.raises(envs.UnknownEnvError, match="'gym:' or 'dmc:'"):
        envs.check_env_id("walker-walk")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"obs": "rgb"}, "obs"),
        ({"size": 0}, "size"),
        ({"size": -3}, "size"),
        ({"action_repeat": 0}, "action_repeat"),
        ({"time_limit": 0}, "time_limit"),
        ({"render_mode": "human"}, "render_mode"),
        ({"render_quality": "ultra"}, "render_quality"),
        ({"camera": 99}, "camera"),
        ({"camera": "nope"}, "camera"),
    ],
)
def test_bad_args_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        envs.make_env("dmc:cartpole-swingup", **kwargs)


def test_camera_rejected_for_non_mujoco_gym_env() -> None:
    with pytest.raises(ValueError, match="camera"):
        envs.make_env("gym:CartPole-v1", camera=0)
    with pytest.raises(ValueError, match="num_envs"):
        envs.make_vector_env("gym:CartPole-v1", 0)


# --------------------------------------------------------------------------------------
# gymnasium compliance, spaces
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_id", "obs"),
    [
        ("gym:Pendulum-v1", "state"),
        ("dmc:cartpole-swingup", "state"),
        ("dmc:cartpole-swingup", "pixels"),
        ("dmc:walker-walk", "pixels"),
    ],
)
def test_check_env(env_id: str, obs: str) -> None:
    env = envs.make_env(env_id, obs=obs, size=32)
    with warnings.catch_warnings():
        # check_env warns that a wrapped env is not `unwrapped`; that is expected here.
        warnings.filterwarnings("ignore", message=".*unwrapped.*")
        # dm-control states are unbounded by design.
        warnings.filterwarnings("ignore", message=".*infinity.*")
        check_env(env, skip_render_check=True)
        if env_id.startswith("dmc:"):
            base = env.unwrapped
            assert isinstance(base, envs.DMCEnv)
            check_env(base, skip_render_check=True)
            base.close()


def test_spaces_dmc() -> None:
    env = envs.make_env("dmc:cartpole-swingup", obs="both", size=48)
    space = env.observation_space
    assert isinstance(space, gym.spaces.Dict) and set(space.keys()) == {"state", "pixels"}
    assert space["state"].shape == (5,) and space["state"].dtype == np.float32
    assert np.all(np.isneginf(space["state"].low)) and np.all(np.isposinf(space["state"].high))
    assert space["pixels"].shape == (3, 48, 48) and space["pixels"].dtype == np.uint8
    obs, _ = env.reset(seed=0)
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (5,)
    assert obs["pixels"].dtype == np.uint8 and obs["pixels"].shape == (3, 48, 48)
    assert space.contains(obs)
    env.close()

    walker = envs.make_env("dmc:walker-walk")
    assert set(walker.observation_space.keys()) == {"state"}
    # orientations 14 + height 1 + velocity 9, in observation_spec order.
    assert walker.observation_space["state"].shape == (24,)
    assert walker.unwrapped.state_keys == ("orientations", "height", "velocity")
    a = walker.action_space
    assert a.shape == (6,) and a.dtype == np.float32 and np.all(a.low == -1) and np.all(a.high == 1)
    # dm-control's walker spec is already [-1, 1]: no rescaling wrapper is stacked.
    assert "RescaleAction" not in str(walker)


def test_spaces_gym_and_action_rescale() -> None:
    env = envs.make_env("gym:Pendulum-v1", seed=0)
    assert env.observation_space["state"].shape == (3,)
    assert env.observation_space["state"].dtype == np.float32
    a = env.action_space
    assert isinstance(a, gym.spaces.Box) and a.dtype == np.float32
    assert np.all(a.low == -1) and np.all(a.high == 1)
    assert env.unwrapped.action_space.high[0] == 2.0  # Pendulum's native torque range
    env.reset()
    for action, torque in ((1.0, 2.0), (-0.5, -1.0), (0.0, 0.0)):
        env.step(np.array([action], np.float32))
        assert env.unwrapped.last_u == pytest.approx(torque)

    cartpole = envs.make_env("gym:CartPole-v1")
    assert cartpole.action_space == gym.spaces.Discrete(2)
    assert cartpole.observation_space["state"].shape == (4,)


# --------------------------------------------------------------------------------------
# Episode semantics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ["dmc:cartpole-swingup", "gym:Pendulum-v1"])
def test_action_repeat_sums_rewards(env_id: str) -> None:
    rng = np.random.default_rng(0)
    actions = [rng.uniform(-1, 1, size=(1,)).astype(np.float32) for _ in range(4)]
    single = envs.make_env(env_id, seed=3)
    repeated = envs.make_env(env_id, seed=3, action_repeat=3)
    obs_s, rew_s = _run(single, [a for a in actions for _ in range(3)])
    obs_r, rew_r = _run(repeated, actions)
    assert len(rew_r) == 4
    for i in range(4):
        assert rew_r[i] == pytest.approx(sum(rew_s[3 * i : 3 * i + 3]), rel=1e-6, abs=1e-9)
        _assert_obs_equal(obs_r[i + 1], obs_s[3 * (i + 1)])


class _CountingEnv(gym.Env):
    """Reward 1 per step; terminates at step ``end``."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, end: int) -> None:
        self.end, self.t = end, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, self.t >= self.end, False, {"t": self.t}


def test_action_repeat_stops_at_episode_end() -> None:
    env = ActionRepeat(_CountingEnv(end=5), 4)
    env.reset()
    obs, reward, term, trunc, info = env.step(0)
    assert (reward, term, info["t"]) == (4.0, False, 4)
    obs, reward, term, trunc, info = env.step(0)
    assert (reward, term, trunc, info["t"]) == (1.0, True, False, 5)
    with pytest.raises(ValueError, match="action_repeat"):
        ActionRepeat(_CountingEnv(5), 0)


@pytest.mark.parametrize("env_id", ["dmc:cartpole-swingup", "gym:Pendulum-v1"])
def test_time_limit_counts_frames_and_truncates(env_id: str) -> None:
    # 10 frames with repeat 4: agent steps of 4, 4, 2 frames.
    env = envs.make_env(env_id, seed=0, time_limit=10, action_repeat=4)
    env.reset()
    flags = [env.step(np.zeros(1, np.float32))[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    if env_id.startswith("dmc:"):
        frames = env.unwrapped.physics.data.time / env.unwrapped._env.control_timestep()
        assert frames == pytest.approx(10)


def test_dmc_suite_time_limit_is_truncation() -> None:
    env = envs.make_env("dmc:cartpole-swingup", seed=0, action_repeat=8)
    env.reset()
    steps, term, trunc = 0, False, False
    while not (term or trunc):
        _, _, term, trunc, info = env.step(np.zeros(1, np.float32))
        steps += 1
    assert (steps, term, trunc) == (125, False, True)  # 1000 frames / 8
    assert info["discount"] == 1.0


def test_time_limit_can_extend_dmc_episode() -> None:
    env = envs.make_env("dmc:cartpole-swingup", seed=0, time_limit=1010, action_repeat=101)
    env.reset()
    flags = [env.step(np.zeros(1, np.float32))[2:4] for _ in range(10)]
    assert flags[-1] == (False, True) and all(f == (False, False) for f in flags[:-1])


def test_dmc_discount_zero_is_termination() -> None:
    env = envs.make_env("dmc:cartpole-swingup", seed=0)
    env.reset()
    dm = env.unwrapped._env
    real_step = dm.step
    dm.step = lambda a: dm_env.termination(0.5, real_step(a).observation)
    _, reward, term, trunc, info = env.step(np.zeros(1, np.float32))
    assert (reward, term, trunc, info["discount"]) == (0.5, True, False, 0.0)
    with pytest.raises(gym.error.ResetNeeded):
        env.unwrapped.step(np.zeros(1, np.float32))


def test_gym_termination_is_terminated() -> None:
    env = envs.make_env("gym:CartPole-v1", seed=0)
    env.reset()
    for _ in range(100):
        _, _, term, trunc, _ = env.step(0)
        if term or trunc:
            break
    assert term and not trunc


def test_physics_error_dmc_truncates() -> None:
    env = envs.make_env("dmc:cartpole-swingup", obs="both", seed=0)
    obs0, _ = env.reset()
    env.unwrapped.physics.data.qvel[:] = np.nan
    obs, reward, term, trunc, info = env.step(np.zeros(1, np.float32))
    assert (reward, term, trunc, info.get("physics_error")) == (0.0, False, True, True)
    assert np.isfinite(obs["state"]).all()
    _assert_obs_equal(obs, obs0)  # the last good observation, pixels included
    obs, _ = env.reset()
    _, _, term, trunc, info = env.step(np.zeros(1, np.float32))
    assert not (term or trunc or info.get("physics_error"))
    env.close()


def test_physics_error_gym_mujoco_truncates() -> None:
    env = envs.make_env("gym:HalfCheetah-v5", seed=0)
    env.reset()
    env.unwrapped.data.qvel[:] = 1e30
    _, reward, term, trunc, info = env.step(np.zeros(6, np.float32))
    assert (reward, term, trunc, info.get("physics_error")) == (0.0, False, True, True)
    env.reset()
    _, _, term, trunc, info = env.step(np.zeros(6, np.float32))
    assert not (term or trunc or info.get("physics_error"))
    env.close()


# --------------------------------------------------------------------------------------
# Seeding / determinism
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_id", "obs"),
    [("dmc:walker-walk", "both"), ("gym:Pendulum-v1", "state")],
)
def test_same_seed_same_trajectory(env_id: str, obs: str) -> None:
    def rollout(seed: int, reset_seed: int | None = None) -> tuple[list, list]:
        env = envs.make_env(env_id, obs=obs, size=32, seed=seed)
        rng = np.random.default_rng(1)
        actions = [rng.uniform(-1, 1, env.action_space.shape).astype(np.float32) for _ in range(8)]
        out = _run(env, actions, reset_seed)
        env.close()
        return out

    obs_a, rew_a = rollout(7)
    obs_b, rew_b = rollout(7)
    assert rew_a == rew_b
    for a, b in zip(obs_a, obs_b):
        _assert_obs_equal(a, b)
    obs_c, _ = rollout(8)
    assert not np.array_equal(obs_a[0]["state"], obs_c[0]["state"])
    obs_d, _ = rollout(123, reset_seed=7)  # an explicit reset seed wins, same mapping
    _assert_obs_equal(obs_d[0], obs_a[0])


# --------------------------------------------------------------------------------------
# Vector envs
# --------------------------------------------------------------------------------------


def test_vector_env_next_step_autoreset() -> None:
    vec = envs.make_vector_env("dmc:cartpole-swingup", 2, seed=5, time_limit=3)
    assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    obs, _ = vec.reset()
    assert obs["state"].shape == (2, 5) and obs["state"].dtype == np.float32
    for i in range(2):  # env i is seeded seed + i
        single, _ = envs.make_env("dmc:cartpole-swingup", seed=5 + i).reset()
        np.testing.assert_array_equal(obs["state"][i], single["state"])
    act = np.zeros((2, 1), np.float32)
    for _ in range(2):
        _, _, term, trunc, _ = vec.step(act)
        assert not (term.any() or trunc.any())
    final, reward, term, trunc, _ = vec.step(act)
    assert trunc.all() and not term.any() and (reward > 0).all()
    first, reward, term, trunc, _ = vec.step(act)  # the reset step
    assert (reward == 0).all() and not (term.any() or trunc.any())
    assert not np.array_equal(first["state"], final["state"])
    vec.close()


def test_async_vector_env_pixels() -> None:
    kwargs = {"obs": "pixels", "size": 32, "seed": 0}
    vec = envs.make_vector_env("dmc:cartpole-swingup", 2, asynchronous=True, **kwargs)
    try:
        assert isinstance(vec, gym.vector.AsyncVectorEnv)
        obs, _ = vec.reset()
        obs, *_ = vec.step(np.zeros((2, 1), np.float32))
    finally:
        vec.close()
    sync = envs.make_vector_env("dmc:cartpole-swingup", 2, **kwargs)
    sync.reset()
    expected, *_ = sync.step(np.zeros((2, 1), np.float32))
    sync.close()
    assert obs["pixels"].shape == (2, 3, 32, 32) and obs["pixels"].std() > 10
    np.testing.assert_array_equal(obs["pixels"], expected["pixels"])


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def test_pixels_show_the_scene(tmp_path_factory: pytest.TempPathFactory) -> None:
    env = envs.make_env("dmc:cartpole-swingup", obs="pixels", seed=0)
    obs, _ = env.reset()
    first = obs["pixels"]
    assert first.std() > 10 and len(np.unique(first)) > 20
    for _ in range(30):
        obs, *_ = env.step(np.ones(1, np.float32))
    assert np.abs(obs["pixels"].astype(int) - first).mean() > 0.5  # the cart moved
    # The cart is orange (r > b) on a blue background.
    hwc = first.transpose(1, 2, 0).astype(int)
    assert ((hwc[..., 0] - hwc[..., 2]) > 80).sum() > 20
    import imageio.v3 as iio

    iio.imwrite(tmp_path_factory.mktemp("frames") / "cartpole.png", hwc.astype(np.uint8))
    env.close()


def test_render_quality_default_matches_fast_roughly() -> None:
    frames = {}
    for quality in ("fast", "default"):
        env = envs.make_env("dmc:cartpole-swingup", obs="pixels", seed=0, render_quality=quality)
        frames[quality] = env.reset()[0]["pixels"].astype(float)
        env.close()
    assert np.abs(frames["fast"].mean() - frames["default"].mean()) < 20
    assert not np.array_equal(frames["fast"], frames["default"])  # shadows/MSAA differ


@pytest.mark.parametrize(
    ("env_id", "size"),
    [("dmc:cartpole-swingup", 64), ("dmc:walker-walk", 40), ("gym:HalfCheetah-v5", 48)],
)
def test_render_frame_for_state_env(env_id: str, size: int) -> None:
    env = envs.make_env(env_id, obs="state", size=size, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (size, size, 3) and frame.dtype == np.uint8 and frame.std() > 5
    env.close()


def test_render_frame_pygame_env() -> None:
    pytest.importorskip("pygame")
    env = envs.make_env("gym:Pendulum-v1", obs="both", size=64, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs["pixels"].shape == (3, 64, 64) and env.render().shape == (64, 64, 3)


def test_dmc_cameras() -> None:
    quad = envs.DMCEnv("quadruped", "walk")
    assert quad.camera == 2
    quad.close()
    env = envs.DMCEnv("cartpole", "swingup", camera="fixed", render_mode="rgb_array", size=32)
    assert env.camera == 0 and env.render().shape == (32, 32, 3)
    env.close()


def test_resize_frame() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (500, 400, 3), dtype=np.uint8)
    small = resize_frame(frame, 64)
    assert small.shape == (64, 64, 3) and small.dtype == np.uint8
    assert abs(small.astype(float).mean() - frame.mean()) < 1.0
    np.testing.assert_array_equal(resize_frame(np.full((90, 70, 3), 7, np.uint8), 16), 7)
    block = np.kron(np.array([[0, 200], [100, 50]]), np.ones((4, 4)))[..., None].repeat(3, -1)
    np.testing.assert_array_equal(
        resize_frame(block.astype(np.uint8), 2)[..., 0], [[0, 200], [100, 50]]
    )
    assert resize_frame(frame[:64, :64], 64) is not None


def test_closing_one_renderer_leaves_the_others_intact() -> None:
    # mujoco.Renderer.close frees its GL objects in the current context, which was another
    # live renderer's; envs.rendering makes the closing renderer's own context current first.
    import gc

    first = envs.DMCEnv("cartpole", "balance", render_mode="rgb_array", size=32)
    second = envs.DMCEnv("walker", "walk", render_mode="rgb_array", size=32)
    third = envs.DMCEnv("cartpole", "swingup", render_mode="rgb_array", size=32)
    for env in (first, second, third):
        env.reset(seed=0)
    first.render()
    before = second.render()
    third.render()
    first.close()
    del third  # dropped without close(), as a garbage-collected env would be
    gc.collect()
    np.testing.assert_array_equal(second.render(), before)
    second.close()
