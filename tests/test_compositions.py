"""Agents as compositions: ``world_model.kind`` x ``agent.behaviour`` (``agents.compose``).

The config resolves and checks the pair, RSSM + planner (``DreamerAgent`` with a CEM planner
on predicted return) and slots + actor-critic (``OP3Agent`` with Dreamer's actor-critic on the
slots and the goal's slots) act, update and restore, and both train end to end.
"""

from __future__ import annotations

import io
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

from imagine_rl.agents.dreamer import DreamerAgent
from imagine_rl.agents.dreamer_config import COMPOSITIONS, composition
from imagine_rl.agents.op3 import OP3Agent
from imagine_rl.agents.registry import make_agent
from imagine_rl.runtime import run
from imagine_rl.runtime.config import ConfigError, build_config
from imagine_rl.worldmodels.actor_critic import ActorCritic

torch.set_num_threads(1)

STATE = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
BOX = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
IMAGE = gym.spaces.Box(0, 255, (3, 32, 32), np.uint8)
SLOT_ACTIONS = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)

SLOTS_AC = ["world_model.kind=slots", "agent.behaviour=actor_critic"]
RSSM_PLANNER = ["world_model.kind=rssm", "agent.behaviour=planner"]
TINY_PLANNER = ["planner.population=16", "planner.iterations=2", "planner.horizon=3"]


def roundtrip(state: dict) -> dict:
    """A checkpoint's agent state through torch.save / torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def test_auto_resolves_by_agent_name():
    assert COMPOSITIONS == {"dreamer": ("rssm", "actor_critic"), "op3": ("slots", "planner")}
    assert composition(build_config([])) == ("rssm", "actor_critic")
    assert composition(build_config(["agent=op3"])) == ("slots", "planner")
    # Either key alone overrides only its half.
    assert composition(build_config(["agent.behaviour=planner"])) == ("rssm", "planner")


def test_slot_part_brings_its_env_settings_and_the_command_line_wins():
    args = ["preset=debug", "env=blocks:push-1", *SLOTS_AC]
    config = build_config(args)
    assert config.agent.name == "dreamer"
    assert composition(config) == ("slots", "actor_critic")
    assert config.env.obs == "pixels" and config.env.goal_obs is True
    assert config.env.action_repeat == 1
    config = build_config([*args, "env.action_repeat=2"])
    assert config.env.action_repeat == 2  # the command line is applied again after them
    assert config.env.obs == "pixels" and config.env.goal_obs is True


def test_rssm_planner_keeps_state_observations():
    config = build_config(["preset=debug", "env=dmc:cartpole-balance", *RSSM_PLANNER])
    assert composition(config) == ("rssm", "planner")
    assert config.env.obs == "state"
    assert config.agent.name == "dreamer"


@pytest.mark.parametrize(
    "args,match",
    [
        (["agent.behaviour=plan"], "agent.behaviour"),
        (["world_model.kind=slot"], "world_model.kind"),
        (["planner.elites=20", "planner.population=16"], "planner.elites"),
        (
            ["preset=debug", "env=blocks:push-1", *SLOTS_AC, "agent.optimizer=laprop"],
            "agent.optimizer",
        ),
    ],
)
def test_bad_compositions_are_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        build_config(args)


# --------------------------------------------------------------------------------------
# RSSM + planner
# --------------------------------------------------------------------------------------


def planner_agent(*extra: str, action_space: gym.Space = BOX) -> DreamerAgent:
    config = build_config(
        ["accelerator=cpu", "preset=dreamer_debug", *RSSM_PLANNER, *TINY_PLANNER, *extra]
    )
    return make_agent(config, gym.spaces.Dict({"state": STATE}), action_space)


def state_batch(B: int = 3, T: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    batch = {
        "state": torch.from_numpy(rng.normal(size=(B, T, 5)).astype(np.float32)),
        "action": torch.from_numpy(rng.uniform(-1, 1, (B, T, 2)).astype(np.float32)),
        "reward": torch.from_numpy(rng.normal(size=(B, T)).astype(np.float32)),
    }
    for key in ("is_first", "is_last", "is_terminal"):
        batch[key] = torch.zeros(B, T)
    batch["is_first"][:, 0] = 1
    batch["reward"][:, 0] = 0
    return batch


def state_obs(n: int, is_first, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "state": rng.normal(size=(n, 5)).astype(np.float32),
        "is_first": np.asarray(is_first, bool),
    }


def test_rssm_planner_builds_without_a_behaviour():
    agent = planner_agent()
    assert isinstance(agent, DreamerAgent)
    assert agent.planning and agent.planner is not None
    assert agent.behaviour is None
    assert set(agent.modules()) == {"world_model"}
    assert set(agent.optimizer_policy.optimizers) == {"world_model"}
    assert "generator" in agent.state_dict()


def test_rssm_planner_updates_the_world_model_only_and_plans():
    agent = planner_agent()
    before = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    metrics = agent.update(state_batch())
    for key in ("loss/reconstruction", "loss/reward", "loss/continue", "loss/dynamics"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert "train/grad_norm_world_model" in metrics
    assert not any("actor" in k or "critic" in k for k in metrics), sorted(metrics)
    assert any(not torch.equal(v, agent.wm.state_dict()[k]) for k, v in before.items())

    n, H = 3, agent.config.planner.horizon
    assert H == 3
    for explore in (True, False):
        action, state = agent.act(state_obs(n, [True] * n), None, explore)
        assert action.dtype == np.float32 and action.shape == (n, 2)
        assert np.all(np.abs(action) <= 1)
        assert state["plan"].shape == (n, H, 2)
        if not explore:  # greedy: the first action of the plan
            torch.testing.assert_close(state["plan"][:, 0], torch.as_tensor(action))
        # The next step (not the first of an episode) warm-starts from the plan.
        action, state = agent.act(state_obs(n, [False] * n, seed=1), state, explore)
        assert action.shape == (n, 2) and np.all(np.abs(action) <= 1)
        assert state["plan"].shape == (n, H, 2)


def test_rssm_planner_greedy_act_is_deterministic_given_the_generator():
    """The plan samples from the agent's generator; the posterior step of ``act`` samples its
    stochastic state from torch's global RNG (as the actor-critic's act does), so both are
    fixed here."""
    agent = planner_agent()
    agent.update(state_batch())
    obs = state_obs(2, [True, True])
    saved = agent.generator.get_state()
    torch.manual_seed(7)
    a1, s1 = agent.act(obs, None, explore=False)
    agent.generator.set_state(saved)
    torch.manual_seed(7)
    a2, s2 = agent.act(obs, None, explore=False)
    np.testing.assert_array_equal(a1, a2)
    torch.testing.assert_close(s1["plan"], s2["plan"])
    # The generator moved on (CEM samples from it), and its state alone changes the plan.
    assert not torch.equal(agent.generator.get_state(), saved)
    torch.manual_seed(7)
    a3, s3 = agent.act(obs, None, explore=False)
    assert not torch.equal(s3["plan"], s1["plan"])


def test_rssm_planner_checkpoint_restores_weights_and_generator():
    agent = planner_agent()
    agent.update(state_batch())
    agent.act(state_obs(2, [True, True]), None, explore=True)  # advance the generator
    state = roundtrip(agent.state_dict())
    restored = planner_agent()
    restored.load_state_dict(state)
    assert restored.updates == 1
    torch.testing.assert_close(restored.generator.get_state(), agent.generator.get_state())
    obs = state_obs(2, [True, True], seed=5)
    torch.manual_seed(7)  # the posterior sample (global RNG); the plan: the generators
    a1, s1 = agent.act(obs, None, explore=False)
    torch.manual_seed(7)
    a2, s2 = restored.act(obs, None, explore=False)
    np.testing.assert_array_equal(a1, a2)
    torch.testing.assert_close(s1["plan"], s2["plan"])
    # Exploration noise comes from the same stream too.
    torch.manual_seed(8)
    a1, _ = agent.act(obs, s1, explore=True)
    torch.manual_seed(8)
    a2, _ = restored.act(obs, s2, explore=True)
    np.testing.assert_array_equal(a1, a2)


def test_rssm_planner_refuses_discrete_actions():
    with pytest.raises(ValueError, match="agent.behaviour=planner"):
        planner_agent(action_space=gym.spaces.Discrete(3))


# --------------------------------------------------------------------------------------
# Slots + actor-critic
# --------------------------------------------------------------------------------------


def slots_agent(*extra: str) -> OP3Agent:
    config = build_config(
        [
            "accelerator=cpu",
            "preset=debug",
            "env=blocks:push-3",
            "env.size=32",
            *SLOTS_AC,
            "agent.horizon=3",
            *extra,
        ]
    )
    assert config.agent.name == "dreamer"
    obs_space = gym.spaces.Dict({"pixels": IMAGE, "goal": IMAGE})
    return make_agent(config, obs_space, SLOT_ACTIONS)


def slot_batch(B: int = 3, T: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "pixels": torch.randint(0, 255, (B, T, 3, 32, 32), dtype=torch.uint8, generator=gen),
        "goal": torch.randint(0, 255, (B, 1, 3, 32, 32), dtype=torch.uint8, generator=gen).expand(
            B, T, 3, 32, 32
        ),
        "action": torch.rand(B, T, 4, generator=gen) * 2 - 1,
        "reward": torch.rand(B, T, generator=gen),
    }
    for key in ("is_first", "is_last", "is_terminal"):
        batch[key] = torch.zeros(B, T)
    batch["is_first"][:, 0] = 1
    batch["reward"][:, 0] = 0
    batch["is_last"][0, -1] = batch["is_terminal"][0, -1] = 1
    return batch


def slot_obs(n: int, is_first, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pixels": rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8),
        "goal": rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8),
        "is_first": np.asarray(is_first, bool),
    }


def test_slots_actor_critic_builds_heads_goal_features_and_behaviour():
    agent = slots_agent()
    assert isinstance(agent, OP3Agent)
    assert isinstance(agent.behaviour, ActorCritic)
    assert agent.wm.spec.heads and agent.wm.spec.goal_features
    assert set(agent.modules()) == {
        "world_model",
        "actor",
        "critic",
        "slow_critic",
        "return_norm",
    }
    assert set(agent.optimizer_policy.optimizers) >= {"world_model", "actor", "critic"}


def test_slots_actor_critic_updates_acts_and_restores():
    agent = slots_agent()
    obs = slot_obs(2, [True, True])
    action, state = agent.act(obs, agent.initial_state(2), explore=True)  # random at first
    assert action.shape == (2, 4) and action.dtype == np.float32

    actor_before = {k: v.clone() for k, v in agent.behaviour.actor.state_dict().items()}
    critic_before = {k: v.clone() for k, v in agent.behaviour.critic.state_dict().items()}
    metrics = agent.update(slot_batch())
    assert agent.updates == 1
    for key in (
        "loss/actor",
        "loss/critic",
        "loss/reward",
        "loss/continue",
        "loss/world_model",
        "train/grad_norm_actor",
    ):
        assert key in metrics, (key, sorted(metrics))
        assert np.isfinite(float(metrics[key])), key
    actor_after = agent.behaviour.actor.state_dict()
    assert any(not torch.equal(v, actor_after[k]) for k, v in actor_before.items())
    critic_after = agent.behaviour.critic.state_dict()
    assert any(not torch.equal(v, critic_after[k]) for k, v in critic_before.items())

    for explore in (True, False):  # the actor now, not random actions
        action, state = agent.act({**obs, "is_first": np.array([False, True])}, state, explore)
        assert action.shape == (2, 4) and action.dtype == np.float32
        assert np.all(np.abs(action) <= 1)
        assert state["slots"].shape == (2, agent.wm.num_slots, agent.wm.state_dim)

    restored = slots_agent()
    restored.load_state_dict(roundtrip(agent.state_dict()))
    assert restored.updates == 1
    for name in ("world_model", "actor", "critic", "slow_critic", "return_norm"):
        mine, theirs = agent.modules()[name].state_dict(), restored.modules()[name].state_dict()
        unrestored = [k for k, v in mine.items() if not torch.equal(theirs[k], v)]
        assert not unrestored, f"{name} not restored from the checkpoint: {unrestored}"
    fresh = slot_obs(2, [True, True], seed=3)
    a1, _ = agent.act(fresh, agent.initial_state(2), explore=False)
    a2, _ = restored.act(fresh, restored.initial_state(2), explore=False)
    np.testing.assert_array_equal(a1, a2)


def test_slots_actor_critic_starts_from_a_planner_perception():
    """``init=`` from the planner composition (agent=op3: no reward or continue head, no goal
    pooling): its weights come over, the parts only the actor-critic composition has start
    fresh, and a model of other sizes is still refused."""
    planner = slots_agent("agent.behaviour=planner")
    assert planner.behaviour is None and planner.wm.reward_head is None
    planner.wm.encoder.convs[0].weight.data.add_(1.0)  # trained weights, to tell them apart
    agent = slots_agent()
    fresh = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    agent.load_weights(planner.state_dict()["weights"])
    loaded = agent.wm.state_dict()
    theirs = planner.wm.state_dict()
    for key, value in loaded.items():
        if key.startswith(("reward_head.", "continue_head.", "goal_attention.")):
            assert key not in theirs and torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, theirs[key]), key
    other = slots_agent("op3.slot_dim=8")
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_weights(planner.state_dict()["weights"])


def test_slots_actor_critic_waits_while_no_dynamics_loss_trains():
    """The perception stage (op3.dynamics_scale=0, op3.prediction_scale=0: preset
    op3_perception) trains the world model only: imagined rollouts of an untrained dynamics
    teach the actor-critic nothing."""
    agent = slots_agent("op3.dynamics_scale=0", "op3.prediction_scale=0")
    assert not agent.dynamics_trained and slots_agent().dynamics_trained
    behaviour = {
        name: {k: v.clone() for k, v in agent.modules()[name].state_dict().items()}
        for name in ("actor", "critic", "slow_critic")
    }
    encoder = {k: v.clone() for k, v in agent.wm.encoder.state_dict().items()}
    metrics = agent.update(slot_batch())
    assert "loss/actor" not in metrics and "loss/critic" not in metrics
    assert "loss/reconstruction" in metrics and "loss/reward" in metrics
    for name, before in behaviour.items():
        after = agent.modules()[name].state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items()), name
    assert any(not torch.equal(v, agent.wm.encoder.state_dict()[k]) for k, v in encoder.items())


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------

E2E = [
    "run.steps=300",
    "run.eval_every=300",
    "run.checkpoint_every=300",
    "run.eval_episodes=1",
    "run.log_every=50",
    "logging.wandb=false",
    "logging.console=false",
]


def _train(tmp_path, *args: str) -> tuple[list[dict], dict]:
    run_dir = tmp_path / "run"
    result = run.train([*args, *E2E, f"run.dir={run_dir}"])
    assert result.status == 0 and result.ok, result.error
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("train/updates", 0) or 0 for row in rows) > 0
    assert any(row.get("eval/return_mean") is not None for row in rows)
    assert (run_dir / "checkpoints" / "step_300").exists()
    return rows, saved


def test_slots_actor_critic_trains_end_to_end(tmp_path):
    rows, saved = _train(
        tmp_path,
        "preset=debug",
        "env=blocks:push-1",
        *SLOTS_AC,
        "replay.batch_length=4",
        "agent.horizon=3",
    )
    assert saved["world_model"]["kind"] == "slots"
    assert saved["agent"]["behaviour"] == "actor_critic"
    assert saved["env"]["obs"] == "pixels" and saved["env"]["goal_obs"] is True
    assert any("loss/actor" in row for row in rows)
    assert any("loss/reward" in row for row in rows)


def test_rssm_planner_trains_end_to_end(tmp_path):
    rows, saved = _train(
        tmp_path,
        "preset=debug",
        "env=dmc:cartpole-balance",
        *RSSM_PLANNER,
        *TINY_PLANNER,
    )
    assert saved["world_model"]["kind"] == "rssm"
    assert saved["agent"]["behaviour"] == "planner" and saved["env"]["obs"] == "state"
    assert any("loss/reconstruction" in row for row in rows)
    assert not any("loss/actor" in row for row in rows)


def test_slots_actor_critic_with_a_sparse_actor_critic_updates_and_restores():
    extra = ("sparse.enabled=true", "sparse.behaviour=true", "sparse.update_every=1")
    agent = slots_agent(*extra)
    assert agent.sparsifier is not None and agent.behaviour_sparsifier is not None
    batch = slot_batch()
    for _ in range(2):
        metrics = agent.update(batch)
    assert all(bool(torch.isfinite(v)) for v in metrics.values() if torch.is_tensor(v))
    for la in agent.behaviour_sparsifier.sparse_layers:
        mask = la.p.mask != 0
        assert 0 < int(mask.sum()) < mask.numel() and not la.original[~mask].any(), la.name
    assert agent.log_metrics()["sparse/behaviour_step"] == 2
    restored = slots_agent(*extra)
    restored.load_state_dict(agent.state_dict())
    theirs = agent.behaviour_sparsifier.masks()
    for name, mask in restored.behaviour_sparsifier.masks().items():
        assert torch.equal(mask, theirs[name]), name
