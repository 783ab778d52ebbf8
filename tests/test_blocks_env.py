"""Tests of the blocks tabletop (``envs.blocks``) behind ``envs.make_env``."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from imagine_rl import envs
from imagine_rl.envs.blocks import (
    PALETTE,
    TABLE_HALF,
    WORKSPACE_HALF,
    BlocksEnv,
)
from imagine_rl.runtime.config import ConfigError, build_config

MODES = ("pick_place", "pusher")


def _make(env_id: str, mode: str = "pick_place", **kwargs) -> gym.Env:
    kwargs.setdefault("obs", "both")
    return envs.make_env(env_id, blocks_action=mode, **kwargs)


def _far_point(env: BlocksEnv) -> np.ndarray:
    """A table point (metres) that picks no block: the corner farthest from every block."""
    corners = np.array([[x, y] for x in (-1, 1) for y in (-1, 1)]) * WORKSPACE_HALF
    dist = np.linalg.norm(corners[:, None] - env.block_positions[None, :, :2], axis=2).min(1)
    point = corners[int(np.argmax(dist))]
    assert env.picked_block(point) is None
    return point


def _chromaticity(pixels: np.ndarray) -> np.ndarray:
    rgb = pixels.astype(np.float64)
    return rgb / np.maximum(rgb.sum(-1, keepdims=True), 1.0)


def _saturation(pixels: np.ndarray) -> np.ndarray:
    rgb = pixels.astype(np.float64)
    return (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1.0)


# --------------------------------------------------------------------------------------
# Ids, spaces, gymnasium compliance
# --------------------------------------------------------------------------------------


def test_ids_listed_and_unknown_ids_suggest() -> None:
    ids = envs.list_env_ids("blocks")
    assert len(ids) == 10 and "blocks:push-3" in ids and "blocks:stack-5" in ids
    assert envs.parse_env_id("blocks:stack-2") == ("blocks", "stack-2")
    for bad, close in [
        ("blocks:push-6", "blocks:push-5"),
        ("blocks:pusj-3", "blocks:push-3"),
        ("blocks:stak-2", "blocks:stack-2"),
    ]:
        with pytest.raises(envs.UnknownEnvError, match=f"did you mean '{close}'"):
            envs.make_env(bad)
    for bad in ("blocks:push-0", "blocks:push-03", "blocks:push"):
        with pytest.raises(envs.UnknownEnvError, match="unknown env id"):
            envs.check_env_id(bad)


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="blocks_action must be one of"):
        envs.make_env("blocks:push-2", blocks_action="grasp")
    for setting in (
        {"goal_obs": True},
        {"blocks_action": "pusher"},
        {"terminate_on_success": True},
    ):
        with pytest.raises(ValueError, match="apply to blocks:<push|stack>-<n> envs only"):
            envs.make_env("gym:Pendulum-v1", **setting)
    with pytest.raises(ValueError, match=r"number of blocks must be an int in 1\.\.5"):
        BlocksEnv("push", 6)
    with pytest.raises(ValueError, match="action mode must be one of"):
        BlocksEnv("push", 2, action_mode="grasp")
    with pytest.raises(ValueError, match="blocks task must be one of"):
        BlocksEnv("sort", 2)
    with pytest.raises(ValueError, match="camera 'front' not found"):
        BlocksEnv("push", 2, camera="front")
    env = BlocksEnv("push", 2)
    with pytest.raises(gym.error.ResetNeeded):
        env.step(np.zeros(4, np.float32))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action must have shape \(4,\)"):
        env.step(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="set_sim_state: expected a state of"):
        env.set_sim_state(np.zeros(5))
    stack = BlocksEnv("stack", 2)
    stack.reset(seed=0)
    with pytest.raises(ValueError, match="from a blocks:push-2 env in pick_place mode"):
        env.set_sim_state(stack.get_sim_state())  # same size, another task
    stack.close()
    env.close()


def test_config_keys_validated() -> None:
    config = build_config(["env=blocks:push-3", "env.goal_obs=true", "env.blocks_action=pusher"])
    assert config.env.goal_obs and config.env.blocks_action == "pusher"
    with pytest.raises(ConfigError, match="env.goal_obs"):
        build_config(["env=gym:Pendulum-v1", "env.goal_obs=true"])
    with pytest.raises(ConfigError, match="env.blocks_action"):
        build_config(["env=dmc:cartpole-balance", "env.blocks_action=pusher"])
    with pytest.raises(ConfigError, match="blocks_action"):
        build_config(["env=blocks:push-3", "env.blocks_action=grasp"])
    with pytest.raises(ConfigError, match="env.terminate_on_success: needs a blocks:"):
        build_config(["env=gym:Pendulum-v1", "env.terminate_on_success=true"])


def test_env_factory_passes_blocks_settings() -> None:
    from imagine_rl.runtime.factories import make_env_factory

    config = build_config(
        ["env=blocks:push-2", "env.obs=pixels", "env.goal_obs=true", "env.blocks_action=pusher"]
    )
    vec = make_env_factory(config, video=False)("train", 1, 0)
    assert set(vec.single_observation_space.spaces) == {"pixels", "goal"}
    assert vec.single_action_space.shape == (2,)
    vec.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("env_id", ["blocks:push-3", "blocks:stack-2"])
def test_check_env(env_id: str, mode: str) -> None:
    env = _make(env_id, mode, goal_obs=True, size=32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unwrapped.*")
        warnings.filterwarnings("ignore", message=".*infinity.*")  # positions are unbounded
        check_env(env, skip_render_check=True)
        check_env(env.unwrapped, skip_render_check=True)
    env.close()


@pytest.mark.parametrize("mode", MODES)
def test_spaces_and_info(mode: str) -> None:
    n, size = 3, 48
    env = _make(f"blocks:push-{n}", mode, goal_obs=True, size=size, seed=0)
    state_dim = 3 * n + (2 if mode == "pusher" else 0)
    assert env.action_space.shape == ((4,) if mode == "pick_place" else (2,))
    assert env.observation_space["state"].shape == (state_dim,)
    obs, info = env.reset()
    for _ in range(2):
        assert obs["state"].shape == (state_dim,) and obs["state"].dtype == np.float32
        for key in ("pixels", "goal"):
            assert obs[key].shape == (3, size, size) and obs[key].dtype == np.uint8
        np.testing.assert_array_equal(obs["goal"], info["goal_pixels"])
        assert info["goal_positions"].shape == info["block_positions"].shape == (n, 3)
        assert info["goal_positions"].dtype == info["block_positions"].dtype == np.float32
        np.testing.assert_allclose(obs["state"][: 3 * n], info["block_positions"].ravel())
        assert info["masks"].shape == (size, size) and info["masks"].dtype == np.uint8
        assert isinstance(info["is_success"], bool)
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        base = env.unwrapped
        expected = -base._goal_distances().mean() + float(info["is_success"])
        assert reward == pytest.approx(expected) and not terminated and not truncated
    env.close()


@pytest.mark.parametrize(("mode", "limit"), [("pick_place", 10), ("pusher", 100)])
def test_default_time_limit(mode: str, limit: int) -> None:
    env = _make("blocks:push-1", mode, obs="state", seed=0)
    env.reset()
    action = np.zeros(env.action_space.shape, np.float32)
    for t in range(1, limit + 1):
        _, _, terminated, truncated, _ = env.step(action)
        assert not terminated and truncated == (t == limit)
    env.close()


def test_vector_env_stacks_info_and_goal() -> None:
    vec = envs.make_vector_env(
        "blocks:stack-2", 2, seed=0, obs="pixels", goal_obs=True, time_limit=2
    )
    obs, info = vec.reset()
    assert info["goal_pixels"].shape == (2, 3, 64, 64) and info["masks"].shape == (2, 64, 64)
    assert info["is_success"].dtype == bool and info["goal_positions"].shape == (2, 2, 3)
    goals = obs["goal"].copy()
    assert not np.array_equal(goals[0], goals[1])  # seeds 0 and 1: different episodes
    for t in range(3):
        obs, _, _, truncated, info = vec.step(vec.action_space.sample())
        np.testing.assert_array_equal(obs["goal"], info["goal_pixels"])
        assert info["_is_success"].all() and info["_masks"].all()
        assert truncated.all() == (t == 1)
    assert not np.array_equal(obs["goal"], goals)  # the autoreset drew new episodes
    vec.close()


# --------------------------------------------------------------------------------------
# Masks, goal image, success
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_masks_consistent_with_pixels(mode: str) -> None:
    n = 5
    env = BlocksEnv("push", n, action_mode=mode)
    palette = _chromaticity(PALETTE * 255)
    rng = np.random.default_rng(0)
    for seed in range(3):
        env.reset(seed=seed)
        masks = env.masks()
        assert set(np.unique(masks)) == set(range(n + 1))  # separated blocks are all visible
        for _ in range(4):
            frame, masks = env.render(), env.masks()
            assert masks.min() >= 0 and masks.max() <= n
            saturation = _saturation(frame)
            # Blocks are saturated palette colours; table, rim, pusher and sky are grey/black.
            assert saturation[masks > 0].min() > 0.5
            assert saturation[masks == 0].max() < 0.3
            nearest = np.argmin(
                ((_chromaticity(frame)[:, :, None] - palette[None, None]) ** 2).sum(-1), -1
            )
            for label in np.unique(masks[masks > 0]):
                assert (nearest[masks == label] == env.color_ids[label - 1]).all()
            env.simulate(rng.uniform(-1, 1, env.action_space.shape))
    env.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", ["push", "stack"])
def test_goal_image_is_the_goal_scene(task: str, mode: str) -> None:
    env = BlocksEnv(task, 3, action_mode=mode)
    _, info = env.reset(seed=4)
    assert not info["is_success"]
    assert np.abs(info["goal_pixels"].astype(int) - env.render().transpose(2, 0, 1)).max() > 0
    env.set_sim_state(env.goal_sim_state())
    assert env.is_success()
    np.testing.assert_allclose(env.block_positions, env.goal_positions, atol=1e-6)
    np.testing.assert_array_equal(env.render().transpose(2, 0, 1), env.goal_pixels)
    # The goal configuration is at rest: a step that moves nothing keeps it (towers stand).
    if mode == "pusher":
        action = np.zeros(2, np.float32)
    else:
        action = np.concatenate([_far_point(env), _far_point(env)]) / WORKSPACE_HALF
    obs, reward, _, _, info = env.step(action)
    assert info["is_success"] and reward > 0.99
    np.testing.assert_allclose(env.block_positions, env.goal_positions, atol=2e-3)
    changed = np.abs(env.render().astype(int) - env.goal_pixels.transpose(1, 2, 0)) > 40
    assert changed.mean() < 0.01
    env.close()


def test_stack_goal_is_a_tower_and_push_goals_lie_apart() -> None:
    stack = BlocksEnv("stack", 4)
    stack.reset(seed=1)
    goals = stack.goal_positions
    assert np.ptp(goals[:, :2], axis=0).max() < 1e-6
    order = np.argsort(goals[:, 2])
    tops = [goals[i, 2] + stack._shape(int(i)).half_height for i in order]
    bottoms = [goals[i, 2] - stack._shape(int(i)).half_height for i in order]
    np.testing.assert_allclose(bottoms, [0.0, *tops[:-1]], atol=1e-6)
    push = BlocksEnv("push", 5)
    push.reset(seed=1)
    xy = push.goal_positions[:, :2]
    gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(5)
    assert gaps.min() >= 0.12 - 1e-6 and np.abs(xy).max() <= WORKSPACE_HALF
    stack.close()
    push.close()


# --------------------------------------------------------------------------------------
# Actions and physics
# --------------------------------------------------------------------------------------


def test_pick_place_moves_the_picked_block() -> None:
    env = BlocksEnv("push", 3)
    env.reset(seed=2)
    before = env.block_positions.copy()
    target = _far_point(env) * 0.6
    action = np.concatenate([before[1, :2], target]) / WORKSPACE_HALF
    _, _, _, _, info = env.step(action)
    after = info["block_positions"]
    np.testing.assert_allclose(after[1, :2], target, atol=0.01)
    assert after[1, 2] == pytest.approx(env._shape(1).half_height, abs=0.003)
    np.testing.assert_allclose(after[[0, 2]], before[[0, 2]], atol=1e-3)
    # A pick near the edge of a block's footprint still takes it.
    edge = after[0, :2] + np.array([0.02, 0.0])
    assert env.picked_block(edge) == 0
    # Nothing under the pick point: nothing moves.
    empty = np.concatenate([_far_point(env), np.zeros(2)]) / WORKSPACE_HALF
    env.step(empty)
    np.testing.assert_allclose(env.block_positions, after, atol=1e-3)
    # Placing onto another block stacks it.
    env.step(np.concatenate([after[2, :2], after[0, :2]]) / WORKSPACE_HALF)
    pos = env.block_positions
    expected_z = 2 * env._shape(0).half_height + env._shape(2).half_height
    np.testing.assert_allclose(pos[2], [*after[0, :2], expected_z], atol=0.01)
    env.close()


@pytest.mark.parametrize("task", ["push", "stack"])
def test_oracle_pick_place_solves_in_n_steps(task: str) -> None:
    env = BlocksEnv(task, 3 if task == "push" else 4)
    env.reset(seed=0)
    goals = env.goal_positions
    for i in np.argsort(goals[:, 2]):  # a tower from the bottom up
        env.step(np.concatenate([env.block_positions[i, :2], goals[i, :2]]) / WORKSPACE_HALF)
    assert env.is_success()
    env.close()


@pytest.mark.parametrize("terminate", [False, True])
def test_terminate_on_success(terminate: bool) -> None:
    """Off: the episode runs to the time limit whatever happens. On: it terminates on exactly
    the step that reaches success, and not before. Both through the factory's settings."""
    from imagine_rl.runtime.factories import make_single_env

    config = build_config(
        ["env=blocks:push-3", f"env.terminate_on_success={str(terminate).lower()}"]
    )
    env = make_single_env(config, mode="eval", seed=0, obs="state")
    inner = env.unwrapped
    env.reset(seed=0)
    goals = inner.goal_positions
    ends = []
    for i in range(3):  # the oracle: one block to its goal per step, success on the third
        action = np.concatenate([inner.block_positions[i, :2], goals[i, :2]]) / WORKSPACE_HALF
        _, _, terminated, truncated, info = env.step(action.astype(np.float32))
        ends.append((terminated, info["is_success"]))
    assert ends[-1][1] and not any(success for _, success in ends[:-1])
    assert [terminated for terminated, _ in ends] == [False, False, terminate]
    assert not truncated
    env.close()


def test_pusher_pushes_a_block() -> None:
    env = BlocksEnv("push", 1, action_mode="pusher")
    env.reset(seed=0)
    env.set_sim_state(env.get_sim_state())  # no-op round trip keeps the episode
    qpos = env.data.qpos
    block, pusher = env.block_positions[0].copy(), qpos[env._pusher_qpos].copy()
    direction = (block[:2] - pusher) / np.linalg.norm(block[:2] - pusher)
    for _ in range(40):
        env.step(direction.astype(np.float32))
    moved = env.block_positions[0, :2] - block[:2]
    assert np.linalg.norm(moved) > 0.05 and moved @ direction > 0.05
    env.close()


def _assert_sane(env: BlocksEnv) -> None:
    pos = env.block_positions
    assert np.isfinite(pos).all() and np.isfinite(env.data.qvel).all()
    assert (pos[:, 2] > 0.0).all() and (pos[:, 2] < 0.5).all(), pos
    assert (np.abs(pos[:, :2]) < TABLE_HALF).all(), pos
    depth = [-env.data.contact[k].dist for k in range(env.data.ncon)]
    assert max(depth, default=0.0) < 0.005, "blocks interpenetrate"


@pytest.mark.parametrize(("task", "mode"), [("stack", "pick_place"), ("push", "pusher")])
def test_physics_stable_under_random_actions(task: str, mode: str) -> None:
    env = BlocksEnv(task, 5, action_mode=mode)
    rng = np.random.default_rng(0)
    steps = 12 if mode == "pick_place" else 100
    for episode in range(4):
        env.reset(seed=episode)
        for _ in range(steps):
            action = rng.uniform(-1, 1, env.action_space.shape)
            if mode == "pick_place":
                # Mostly real picks, often dropped onto another block (towers, topples).
                if rng.random() < 0.8:
                    action[:2] = env.block_positions[rng.integers(5), :2] / WORKSPACE_HALF
                if rng.random() < 0.5:
                    target = env.block_positions[rng.integers(5), :2] / WORKSPACE_HALF
                    action[2:] = np.clip(target + rng.normal(0, 0.1, 2), -1, 1)
            env.simulate(action)
            _assert_sane(env)
    env.close()


def test_pusher_pinning_a_block_against_the_rim_stays_stable() -> None:
    env = BlocksEnv("push", 1, action_mode="pusher")
    env.reset(seed=0)
    qpos = env.data.qpos
    for _ in range(60):  # push the block toward +x and keep pressing
        block, pusher = env.block_positions[0, :2], qpos[env._pusher_qpos]
        behind = block - np.array([0.06, 0.0])
        command = np.clip((behind - pusher) * 20, -1, 1)
        if np.linalg.norm(behind - pusher) < 0.02:
            command = np.array([1.0, 0.0])
        env.simulate(command)
        _assert_sane(env)
    assert env.block_positions[0, 0] > TABLE_HALF - 0.08  # it reached the rim
    env.close()


# --------------------------------------------------------------------------------------
# Seeding and oracle state
# --------------------------------------------------------------------------------------


def _rollout(env: gym.Env, seed: int | None, actions: np.ndarray) -> list:
    obs, info = env.reset(seed=seed)
    out = [(obs, info)]
    for action in actions:
        obs, reward, _, _, info = env.step(action)
        out.append((obs, info, reward))
    return out


def _assert_same(a: list, b: list) -> None:
    for step_a, step_b in zip(a, b, strict=True):
        for part_a, part_b in zip(step_a, step_b, strict=True):
            if isinstance(part_a, dict):
                assert part_a.keys() == part_b.keys()
                for key in part_a:
                    np.testing.assert_array_equal(part_a[key], part_b[key], err_msg=key)
            else:
                assert part_a == part_b


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_episode(mode: str) -> None:
    actions = np.random.default_rng(0).uniform(-1, 1, (3, 4 if mode == "pick_place" else 2))
    first = _rollout(_make("blocks:push-3", mode, seed=7, goal_obs=True), None, actions)
    second = _rollout(_make("blocks:push-3", mode, goal_obs=True), 7, actions)
    _assert_same(first, second)
    other = _rollout(_make("blocks:push-3", mode, goal_obs=True), 8, actions)
    assert not np.array_equal(first[0][1]["goal_positions"], other[0][1]["goal_positions"])


@pytest.mark.parametrize("mode", MODES)
def test_sim_state_round_trip(mode: str) -> None:
    env = BlocksEnv("stack", 3, action_mode=mode)
    env.reset(seed=5)
    rng = np.random.default_rng(1)
    for _ in range(2):
        env.step(rng.uniform(-1, 1, env.action_space.shape))
    state = env.get_sim_state()
    action = rng.uniform(-1, 1, env.action_space.shape)
    expected = env.step(action)
    env.set_sim_state(state)
    again = env.step(action)
    # Into another env of the same id: shapes, colours, goal and physics all come along.
    other = BlocksEnv("stack", 3, action_mode=mode)
    other.reset(seed=99)
    other.set_sim_state(state)
    np.testing.assert_array_equal(other.goal_pixels, env.goal_pixels)
    copied = other.step(action)
    for result in (again, copied):
        np.testing.assert_array_equal(result[0], expected[0])
        assert result[1] == expected[1]
        for key in expected[4]:
            np.testing.assert_array_equal(result[4][key], expected[4][key], err_msg=key)
    other.close()
    env.close()
