"""DreamerAgent: the agent contract, the actor/world-model separation, checkpoints, presets."""

from __future__ import annotations

import io
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from imagine_rl.agents.dreamer import DreamerAgent
from imagine_rl.agents.registry import available_agents, make_agent
from imagine_rl.runtime.config import build_config
from imagine_rl.worldmodels import BlockLinear

torch.set_num_threads(1)

STATE = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
PIXELS = gym.spaces.Box(0, 255, (3, 64, 64), np.uint8)
BOX = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
DISCRETE = gym.spaces.Discrete(4)


def make(obs: dict, action_space: gym.Space, *overrides: str, seed: int = 0) -> DreamerAgent:
    config = build_config(
        ["agent=dreamer", "accelerator=cpu", "preset=dreamer_debug", f"seed={seed}", *overrides]
    )
    agent = make_agent(config, gym.spaces.Dict(obs), action_space)
    assert isinstance(agent, DreamerAgent)
    return agent


def make_batch(obs: dict, action_space: gym.Space, B: int = 3, T: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    batch = {}
    for key, space in obs.items():
        if space.dtype == np.uint8:
            batch[key] = torch.from_numpy(
                rng.integers(0, 256, (B, T, *space.shape), dtype=np.uint8)
            )
        else:
            batch[key] = torch.from_numpy(rng.normal(size=(B, T, *space.shape)).astype(np.float32))
    if isinstance(action_space, gym.spaces.Discrete):
        batch["action"] = torch.from_numpy(rng.integers(0, action_space.n, (B, T)))
    else:
        batch["action"] = torch.from_numpy(
            rng.uniform(-1, 1, (B, T, *action_space.shape)).astype(np.float32)
        )
    batch["reward"] = torch.from_numpy(rng.normal(size=(B, T)).astype(np.float32))
    for key in ("is_first", "is_last", "is_terminal"):
        batch[key] = torch.zeros(B, T)
    batch["is_first"][:, 0] = 1
    batch["reward"][:, 0] = 0
    batch["is_first"][0, T // 2] = 1  # an episode boundary inside a sequence
    batch["is_last"][0, T // 2 - 1] = batch["is_terminal"][0, T // 2 - 1] = 1
    return batch


def obs_numpy(obs: dict, n: int, is_first, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {"is_first": np.asarray(is_first, bool)}
    for key, space in obs.items():
        if space.dtype == np.uint8:
            out[key] = rng.integers(0, 256, (n, *space.shape), dtype=np.uint8)
        else:
            out[key] = rng.normal(size=(n, *space.shape)).astype(np.float32)
    return out


CASES = [
    ({"state": STATE}, BOX),
    ({"state": STATE}, DISCRETE),
    ({"pixels": PIXELS}, DISCRETE),
    ({"pixels": PIXELS, "state": STATE}, BOX),
]


def assert_same_next_update(agent, other, batch) -> None:
    """``other`` (restored from ``agent``'s state) makes the same next update: same metrics
    and the same weights after it, with the same seed."""
    torch.manual_seed(3)
    m1 = agent.update(batch)
    torch.manual_seed(3)
    m2 = other.update(batch)
    assert m1 == m2
    for key, value in other.state_dict()["weights"].items():
        assert torch.equal(value, agent.state_dict()["weights"][key]), key


def test_registered():
    assert "dreamer" in available_agents()


@pytest.mark.parametrize("obs,action_space", CASES)
def test_update_metrics_and_act(obs, action_space):
    agent = make(obs, action_space)
    metrics = agent.update(make_batch(obs, action_space))
    for key in (
        "loss/reconstruction",
        "loss/reward",
        "loss/continue",
        "loss/dynamics",
        "loss/representation",
        "loss/actor",
        "loss/critic",
        "world_model/kl",
        "world_model/prior_entropy",
        "world_model/posterior_entropy",
        "train/actor_entropy",
        "train/return_scale",
        "train/grad_norm_world_model",
        "train/grad_norm_actor",
        "train/grad_norm_critic",
    ):
        assert key in metrics, key
    # 0-d device tensors: the loop reads them once per log interval.
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert all(k.split("/")[0] in ("loss", "world_model", "train") for k in metrics)

    state = agent.initial_state(2)
    for step in range(3):
        for explore in (True, False):
            action, new_state = agent.act(obs_numpy(obs, 2, [step == 0] * 2, step), state, explore)
            if isinstance(action_space, gym.spaces.Discrete):
                assert action.shape == (2,) and action.dtype == np.int64
                assert ((action >= 0) & (action < action_space.n)).all()
            else:
                assert action.shape == (2, 2) and action.dtype == np.float32
                assert (np.abs(action) <= 1).all()
        state = new_state


@pytest.mark.parametrize("action_space", [BOX, DISCRETE], ids=["dynamics", "reinforce"])
def test_actor_step_leaves_world_model_untouched(action_space):
    obs = {"state": STATE}
    agent = make(obs, action_space)
    data = agent.preprocess(make_batch(obs, action_space))
    # Give the reward and critic outputs non-zero weights so every path carries gradient.
    agent.update(make_batch(obs, action_space, seed=1))
    with torch.no_grad():
        for head in (agent.wm.reward_head.out, agent.critic.net.out):
            head.weight.normal_(0, 0.1)
    post, _ = agent.train_world_model(data)
    wm_before = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    actor_before = {k: v.clone() for k, v in agent.actor.state_dict().items()}
    critic_before = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    slow_before = {k: v.clone() for k, v in agent.slow_critic.state_dict().items()}
    assert all(p.grad is None for p in agent.wm.parameters())

    metrics = agent.train_behaviour(post, data)

    assert all(p.grad is None or not p.grad.any() for p in agent.wm.parameters())
    for key, value in agent.wm.state_dict().items():
        assert torch.equal(value, wm_before[key]), key
    assert any(not torch.equal(v, actor_before[k]) for k, v in agent.actor.state_dict().items())
    assert any(not torch.equal(v, critic_before[k]) for k, v in agent.critic.state_dict().items())
    assert any(
        not torch.equal(v, slow_before[k]) for k, v in agent.slow_critic.state_dict().items()
    )
    assert metrics["train/grad_norm_actor"] > 0 and metrics["train/grad_norm_critic"] > 0


def imagined_losses(agent):
    """(actor loss, critic loss, posterior, data) of imagination from a state-task batch, with
    non-zero critic and reward outputs so that every gradient path carries a signal."""
    with torch.no_grad():
        for head in (agent.wm.reward_head.out, agent.critic.net.out):
            head.weight.normal_(0, 0.1)
    data = agent.preprocess(make_batch({"state": STATE}, BOX))
    post, _ = agent.train_world_model(data)
    start = {"deter": post["deter"].flatten(0, 1), "stoch": post["stoch"].flatten(0, 1)}
    traj, actor_raw = agent.behaviour.imagine(agent.wm, start)
    terms, _, _ = agent.behaviour.imagination_loss(
        agent.wm, traj, actor_raw, 1 - data["is_terminal"].reshape(-1)
    )
    return terms["actor"], terms["critic"], post, data


def test_dynamics_backprop_reaches_actor_through_the_model():
    """With continuous actions the actor's loss differentiates the imagined returns: its
    gradient exceeds what the entropy bonus alone gives."""
    agent = make({"state": STATE}, BOX, "agent.actor_entropy=0")
    actor_loss, _, _, _ = imagined_losses(agent)
    grads = torch.autograd.grad(actor_loss, list(agent.actor.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


@pytest.mark.parametrize("actor_grad", ["dynamics", "reinforce"])
def test_one_backward_pass_keeps_actor_and_critic_gradients_apart(actor_grad):
    """The actor's and the critic's losses are summed into one backward pass: each reaches only
    its own parameters (the critic's loss never trains the actor through the features, the
    actor's returns never train the critic's weights), and neither reaches the world model."""
    agent = make({"state": STATE}, BOX, f"agent.actor_grad={actor_grad}", "agent.actor_entropy=0")
    actor_loss, critic_loss, post, data = imagined_losses(agent)
    actor, critic = list(agent.actor.parameters()), list(agent.critic.parameters())
    world_model = [p for p in agent.wm.parameters() if p.requires_grad]

    def reached(loss, params):
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        return any(g is not None and bool(g.abs().sum() > 0) for g in grads)

    assert reached(actor_loss, actor) and not reached(actor_loss, critic)
    assert reached(critic_loss, critic) and not reached(critic_loss, actor)
    assert not reached(critic_loss, world_model)
    # The world model is frozen while train_behaviour builds its graph.
    agent.train_behaviour(post, data)
    assert all(p.grad is None for p in agent.wm.parameters())
    assert all(p.requires_grad for p in world_model)


@pytest.mark.parametrize("starts", [0, 7])
def test_replay_critic_loss_trains_only_the_critic(starts):
    """DreamerV3's replay value loss: on by default, its gradient reaches the critic alone; with
    imagination from a subset of starts it bootstraps with the critic's own values."""
    obs = {"state": STATE}
    agent = make(obs, BOX, f"agent.imagine_starts={starts}")
    assert agent.config.agent.replay_critic_scale == pytest.approx(0.3)
    data = agent.preprocess(make_batch(obs, BOX))
    post, _ = agent.train_world_model(data)
    boot = torch.randn(data["reward"].numel() if starts == 0 else starts)
    loss, metrics = agent.behaviour.replay_critic_loss(agent.wm, post, data, boot)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(metrics) == {"train/replay_critic_nll", "train/replay_return"}
    params = {
        "critic": list(agent.critic.parameters()),
        "actor": list(agent.actor.parameters()),
        "world_model": list(agent.wm.parameters()),
    }
    flat = [p for group in params.values() for p in group]
    grads = dict(zip(map(id, flat), torch.autograd.grad(loss, flat, allow_unused=True)))
    for name, group in params.items():
        reached = any(grads[id(p)] is not None and grads[id(p)].abs().sum() > 0 for p in group)
        assert reached == (name == "critic"), name
    assert "train/replay_return" in agent.train_behaviour(post, data)
    off = make(obs, BOX, "agent.replay_critic_scale=0")
    assert "train/replay_return" not in off.train_behaviour(post, data)


def test_state_dict_round_trip_is_exact():
    obs, space = {"state": STATE}, DISCRETE
    agent = make(obs, space)
    batch = make_batch(obs, space)
    agent.update(batch)
    agent.update(make_batch(obs, space, seed=1))
    state = agent.state_dict()
    assert set(state) == {"weights", "optimizers", "updates"}
    prefixes = {k.split(".")[0] for k in state["weights"]}
    assert prefixes == {"world_model", "actor", "critic", "slow_critic", "return_norm"}
    assert all(isinstance(v, torch.Tensor) for v in state["weights"].values())
    # Everything but the weights loads with weights_only=True (as the checkpointer does).
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items() if k != "weights"}, buffer)
    buffer.seek(0)
    rest = torch.load(buffer, weights_only=True)

    other = make(obs, space, seed=7)
    other.load_state_dict({"weights": state["weights"], **rest})
    assert other.updates == 2
    for key, value in other.state_dict()["weights"].items():
        assert torch.equal(value, state["weights"][key]), key
    # Continuing from the restored state gives the same update as the original.
    assert_same_next_update(agent, other, batch)


def test_act_resets_state_on_is_first():
    obs = {"state": STATE}
    agent = make(obs, BOX)
    fresh_obs = obs_numpy(obs, 2, [True, True], seed=5)
    _, fresh = agent.act(fresh_obs, agent.initial_state(2), explore=False)
    state = agent.initial_state(2)
    for step in range(4):
        _, state = agent.act(obs_numpy(obs, 2, [step == 0] * 2, step), state, explore=True)
    # Env 0 restarts; env 1 continues its episode.
    mixed = dict(fresh_obs, is_first=np.array([True, False]))
    _, after = agent.act(mixed, state, explore=False)
    assert torch.allclose(after["deter"][0], fresh["deter"][0], atol=1e-6)
    assert not torch.allclose(after["deter"][1], fresh["deter"][1], atol=1e-4)


def test_report_open_loop_video():
    obs = {"pixels": PIXELS}
    agent = make(obs, DISCRETE)
    videos = agent.report(make_batch(obs, DISCRETE, B=2, T=8))
    (video,) = videos.values()
    assert video.dtype == np.uint8 and video.shape == (8, 2 * 64, 3 * 64, 3)
    state_agent = make({"state": STATE}, DISCRETE)
    assert state_agent.report(make_batch({"state": STATE}, DISCRETE)) == {}


def test_all_weight_layers_come_from_the_layer_factory():
    agent = make({"state": STATE, "pixels": PIXELS}, BOX)
    registered = {id(m) for m in agent.factory.layers.values()}
    for module in (agent.wm, agent.actor, agent.critic):
        for m in module.modules():
            if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d | BlockLinear):
                assert id(m) in registered, m


@pytest.mark.parametrize(
    "overrides",
    [
        ("world_model.latent=gaussian",),
        ("accelerator.precision=bf16",),
        ("agent.actor_grad=reinforce", "world_model.norm=rms", "world_model.initial=zero"),
    ],
)
def test_variants_update(overrides):
    obs = {"state": STATE}
    agent = make(obs, BOX, *overrides)
    metrics = agent.update(make_batch(obs, BOX))
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(
    "preset", ["xs", "s", "m", "dreamer_debug", "dreamer_tiny", "dreamer_tiny,dreamer_cpu"]
)
def test_presets_build(preset):
    config = build_config(["agent=dreamer", f"preset={preset}"])
    assert config.world_model.deter % config.world_model.blocks == 0
    if preset == "dreamer_tiny,dreamer_cpu":  # the CPU learning-curve settings, layered
        assert config.world_model.latent == "gaussian" and config.run.replay_ratio == 256
        assert config.world_model.deter == 128
    if preset not in ("s", "m"):  # building the larger ones takes a while
        agent = make_agent(
            build_config(["agent=dreamer", "accelerator=cpu", f"preset={preset}"]),
            gym.spaces.Dict({"state": STATE}),
            DISCRETE,
        )
        assert agent.num_parameters()["total"] > 0


def test_world_model_loss_falls_on_a_fixed_batch():
    obs = {"state": STATE}
    agent = make(obs, DISCRETE)
    batch = make_batch(obs, DISCRETE, B=4, T=16)
    history = [agent.update(batch) for _ in range(30)]
    first = sum(m["loss/world_model"] for m in history[:3]) / 3
    last = sum(m["loss/world_model"] for m in history[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    assert history[-1]["loss/reconstruction"] < 0.8 * history[0]["loss/reconstruction"]
    assert agent.updates == 30


# Trainable parameters (world model + actor + critic, DreamerAgent.num_parameters()) of the size
# presets, as README.md publishes them ("Size presets mirror DreamerV3's table") and xs.yaml
# lists them: a 5-d state with 1 continuous action (dmc:cartpole-balance, as in the README's
# training-step speed table) and 64x64 pixels with 6 discrete actions.
STATE_TASK = ({"state": STATE}, gym.spaces.Box(-1.0, 1.0, (1,), np.float32))
PIXEL_TASK = ({"pixels": PIXELS}, gym.spaces.Discrete(6))
PUBLISHED_PARAMETERS = {
    # preset: (state task, pixel task); None where nothing is published
    "xs": (3_129_350, 8_230_824),
    "s": (9_607_686, 17_798_024),
    "m": (19_100_678, 35_348_936),
    "dreamer_tiny": (548_230, None),
}


def _readme_sizes() -> str:
    """The README's size-preset sentence, whitespace collapsed (it wraps across lines)."""
    text = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    start = text.index("Size presets mirror DreamerV3's table")
    return text[start : text.index("`dreamer_debug`", start)]


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count < 1e6 else f"{count / 1e6:.1f}M"


@pytest.mark.parametrize("preset", list(PUBLISHED_PARAMETERS))
def test_size_presets_have_the_published_parameter_counts(preset):
    """Building is fast (modules only, no update): M takes about 2 s on one CPU thread."""
    config = build_config(["agent=dreamer", "accelerator=cpu", f"preset={preset}"])
    counts = []
    for (obs, action_space), published in zip(
        (STATE_TASK, PIXEL_TASK), PUBLISHED_PARAMETERS[preset]
    ):
        if published is None:
            continue
        parts = make_agent(config, gym.spaces.Dict(obs), action_space).num_parameters()
        assert parts["total"] == published, (preset, sorted(obs), parts)
        counts.append(_millions(published))
    # The README rounds them: `xs` (3.1M / 8.2M), `dreamer_tiny` (0.55M, ...).
    assert f"`{preset}` ({' / '.join(counts)}" in _readme_sizes()


# ----------------------------------------------------------------------------------------
# Current DreamerV3 options: agent.optimizer=laprop, agent.imagine_start_continue,
# agent.replay_critic_grad_wm, replay.context
# ----------------------------------------------------------------------------------------
def _parts(agent: DreamerAgent) -> dict[str, nn.Module]:
    return {"world_model": agent.wm, "actor": agent.actor, "critic": agent.critic}


def _snapshot(agent: DreamerAgent) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: p.detach().clone() for k, p in module.named_parameters()}
        for name, module in _parts(agent).items()
    }


def _changed(agent: DreamerAgent, before) -> dict[str, bool]:
    return {
        name: any(not torch.equal(p, before[name][k]) for k, p in module.named_parameters())
        for name, module in _parts(agent).items()
    }


def _save_load(state: dict) -> dict:
    """What the checkpointer does: weights as tensors, the rest through weights_only."""
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items() if k != "weights"}, buffer)
    buffer.seek(0)
    return {"weights": state["weights"], **torch.load(buffer, weights_only=True)}


@pytest.mark.parametrize("action_space", [BOX, DISCRETE], ids=["box", "discrete"])
def test_laprop_is_one_step_of_one_optimizer_after_all_losses(action_space):
    """agent.optimizer=laprop: one LaProp over world model, actor and critic; the behaviour
    losses are built on the world model before its step; one step per update trains all three;
    its state round-trips through a checkpoint and an Adam agent refuses it."""
    obs = {"state": STATE}
    agent = make(obs, action_space, "agent.optimizer=laprop", "agent.warmup=0")
    assert set(agent.optimizer_policy.main) == {"all"}  # no world-model/actor/critic Adam
    opt = agent.optimizer_policy.main["all"]
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for m in _parts(agent).values() for p in m.parameters()}
    events = []
    opt.register_step_pre_hook(lambda *_: events.append("step"))
    behaviour_forward = agent._behaviour_forward

    def recording(post, data):
        events.append("behaviour")
        wm_now = {k: p.detach().clone() for k, p in agent.wm.named_parameters()}
        assert all(torch.equal(p, before["world_model"][k]) for k, p in wm_now.items())
        return behaviour_forward(post, data)

    agent._behaviour_forward = recording
    before = _snapshot(agent)
    batch = make_batch(obs, action_space)
    metrics = agent.update(batch)
    assert events == ["behaviour", "step"]
    assert _changed(agent, before) == {"world_model": True, "actor": True, "critic": True}
    assert all(math.isfinite(float(v)) for v in metrics.values())
    for key in ("train/grad_norm", "train/grad_norm_world_model", "train/grad_norm_actor"):
        assert float(metrics[key]) > 0, key
    assert float(metrics["train/lr"]) == pytest.approx(4e-5)
    del agent._behaviour_forward

    state = agent.state_dict()
    assert set(state["optimizers"]) == {"all"}
    other = make(obs, action_space, "agent.optimizer=laprop", "agent.warmup=0", seed=7)
    other.load_state_dict(_save_load(state))
    assert_same_next_update(agent, other, batch)
    with pytest.raises(ValueError, match="agent.optimizer=laprop"):
        make(obs, action_space).load_state_dict(_save_load(state))


def test_laprop_warmup_starts_from_a_zero_learning_rate():
    """DreamerV3's warm-up reads the schedule at the count before the step: the first update
    fills the moments and moves nothing, the second moves every part by lr / warmup."""
    obs = {"state": STATE}
    agent = make(obs, BOX, "agent.optimizer=laprop", "agent.warmup=10")
    before = _snapshot(agent)
    metrics = agent.update(make_batch(obs, BOX))
    assert float(metrics["train/lr"]) == 0.0
    assert _changed(agent, before) == {"world_model": False, "actor": False, "critic": False}
    metrics = agent.update(make_batch(obs, BOX, seed=1))
    assert float(metrics["train/lr"]) == pytest.approx(4e-6)
    assert all(_changed(agent, before).values())


def test_laprop_rejects_greedy_infomax():
    from imagine_rl.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="agent.optimizer=laprop cannot train"):
        build_config(
            [
                "agent=dreamer",
                "preset=dreamer_debug",
                "agent.optimizer=laprop",
                "world_model.greedy_infomax.modules=2",
            ]
        )


def test_laprop_keeps_sparse_masks():
    """Sparse masks follow the single optimizer: pruned weights and their moments stay 0."""
    obs = {"state": STATE}
    agent = make(
        obs,
        BOX,
        "agent.optimizer=laprop",
        "agent.warmup=0",
        "sparse.enabled=true",
        "sparse.density=0.2",
        "sparse.method=rigl",
        "sparse.update_every=1",
    )
    batch = make_batch(obs, BOX)
    for _ in range(2):
        metrics = agent.update(batch)
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert agent.sparsifier.step_count == 2
    for la in agent.sparsifier.sparse_layers:
        pruned = la.p.mask == 0
        state = agent.optimizer_policy.main["all"].state[la.original]
        assert not la.original.detach()[pruned].any(), la.name
        assert not state["exp_avg"][pruned].any() and not state["exp_avg_sq"][pruned].any()


def test_imagine_start_continue_weights_step_zero_by_the_continue_head():
    obs = {"state": STATE}
    on = make(obs, BOX, "agent.imagine_start_continue=true")
    off = make(obs, BOX)  # same seed, same weights
    feat = torch.randn(4, 3, on.wm.feat_size)
    start = torch.tensor([1.0, 0.0, 1.0, 0.0])
    predicted = on.wm.continue_prob(feat)
    assert torch.equal(on.behaviour.imagined_continue(on.wm, feat, start), predicted)
    default = off.behaviour.imagined_continue(off.wm, feat, start)
    assert torch.equal(default[:, 0], start) and torch.equal(default[:, 1:], predicted[:, 1:])
    metrics = on.update(make_batch(obs, BOX))
    assert all(math.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("optimizer", ["adam", "laprop"])
def test_replay_critic_grad_reaches_the_world_model(optimizer):
    """agent.replay_critic_grad_wm: the replay value loss backpropagates through the posterior
    into the world model (DreamerV3's repval_grad) and the critic, never into the actor; the
    imagination still leaves the world model alone."""
    obs = {"state": STATE}
    extra = (f"agent.optimizer={optimizer}", "agent.warmup=0")
    agent = make(obs, BOX, "agent.replay_critic_grad_wm=true", *extra)
    with torch.no_grad():  # a zero-initialised output layer passes no gradient to its input
        agent.critic.net.out.weight.normal_(0, 0.1)
    data = agent.preprocess(make_batch(obs, BOX))
    _, _, post = agent._world_model_forward(data)
    assert post["deter"].requires_grad
    boot = torch.randn(data["reward"].numel())
    loss, _ = agent.behaviour.replay_critic_loss(agent.wm, post, data, boot)
    groups = {name: list(m.parameters()) for name, m in _parts(agent).items()}
    flat = [p for group in groups.values() for p in group]
    grads = dict(zip(map(id, flat), torch.autograd.grad(loss, flat, allow_unused=True)))
    for name, group in groups.items():
        reached = any(grads[id(p)] is not None and grads[id(p)].abs().sum() > 0 for p in group)
        assert reached == (name != "actor"), name
    encoder = list(agent.wm.encoder.parameters())
    assert any(grads[id(p)] is not None and grads[id(p)].abs().sum() > 0 for p in encoder)

    # Without the replay value loss the behaviour losses do not reach the world model.
    quiet = make(obs, BOX, "agent.replay_critic_grad_wm=true", "agent.replay_critic_scale=0")
    data = quiet.preprocess(make_batch(obs, BOX))
    _, _, post = quiet._world_model_forward(data)
    behaviour, _ = quiet._behaviour_forward(post, data)
    wm = list(quiet.wm.parameters())
    assert all(g is None for g in torch.autograd.grad(behaviour, wm, allow_unused=True))

    before = _snapshot(agent)
    metrics = agent.update(make_batch(obs, BOX, seed=1))
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert all(_changed(agent, before).values())
    assert "train/grad_norm_world_model" in metrics and "train/grad_norm_critic" in metrics


def _context_batch(agent: DreamerAgent, B: int = 3, T: int = 10):
    """A state-task batch as the replay hands it with replay.context=1: windows mid-episode
    (row 2 starts an episode), stored states for rows 0 and 2, none for row 1."""
    batch = make_batch({"state": STATE}, BOX, B=B, T=T)
    batch["is_first"][:, 0] = 0
    batch["is_first"][2, 0] = 1
    c = agent.wm.rssm.config
    gen = torch.Generator().manual_seed(5)
    classes = torch.randint(0, c.classes, (B, c.stoch), generator=gen)
    context = {
        "deter": torch.randn(B, c.deter, generator=gen).tanh(),
        "stoch": torch.nn.functional.one_hot(classes, c.classes).float(),
        "action": torch.rand(B, 2, generator=gen) * 2 - 1,
    }
    batch.update({f"context/{k}": v for k, v in context.items()})
    batch["context_valid"] = torch.tensor([1.0, 0.0, 1.0])
    batch["replay_index"] = torch.tensor([[0, 5], [1, 7], [0, 40]])
    return batch, context


def test_replay_context_starts_observe_from_the_stored_state():
    agent = make({"state": STATE}, BOX, "replay.context=1")
    assert agent.context is not None and agent.replay_latents() is None
    batch, context = _context_batch(agent)
    rssm = agent.wm.rssm
    with torch.no_grad():
        init = {k: v.clone() for k, v in rssm.initial(3).items()}
        # Step 0 of rows 0 and 1 (no reset there): h_0 = GRU(h_-1, z_-1, a_-1) is sampling-free.
        action_0 = torch.stack([context["action"][0], torch.zeros(2)])
        expected_deter = rssm.core(
            torch.stack([context["deter"][0], init["deter"][1]]),
            torch.stack([context["stoch"][0], init["stoch"][1]]),
            rssm.action_features(action_0),
        )
    seen = []
    observe = rssm.observe

    def recording(embed, action, is_first, state=None, sample=True):
        post, prior = observe(embed, action, is_first, state, sample)
        seen.append(({k: v.detach().clone() for k, v in state.items()}, post))
        return post, prior

    rssm.observe = recording
    metrics = agent.update(batch)
    del rssm.observe
    assert all(math.isfinite(float(v)) for v in metrics.values())
    ((state, post),) = seen
    for key in ("deter", "stoch", "action"):
        base = init[key] if key != "action" else torch.zeros(3, 2)
        for row, valid in enumerate((True, False, True)):
            want = context[key][row] if valid else base[row]
            assert torch.equal(state[key][row], want), (key, row)
    torch.testing.assert_close(post["deter"][:2, 0], expected_deter)

    latents = agent.replay_latents()
    c = rssm.config
    assert latents["deter"].shape == (3, 10, c.deter)
    assert latents["stoch"].shape == (3, 10, c.stoch, c.classes)
    assert latents["action"].shape == (3, 10, 2)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in latents.values())
    assert torch.equal(latents["deter"], post["deter"].detach())
    assert torch.equal(latents["stoch"], post["stoch"].detach())
    assert torch.equal(latents["action"], batch["action"])


def test_replay_context_before_the_first_write_and_off():
    """Before the replay stored any latent its batches carry no context/<key>: the update
    starts from the initial state, with the same inputs as later updates."""
    obs = {"state": STATE}
    agent = make(obs, BOX, "replay.context=1", "agent.optimizer=laprop")
    batch = make_batch(obs, BOX)
    batch["context_valid"] = torch.zeros(3)
    batch["replay_index"] = torch.zeros(3, 2, dtype=torch.long)
    agent.update(batch)
    latents = agent.replay_latents()
    assert set(latents) == {"deter", "stoch", "action"}
    full, _ = _context_batch(agent)
    assert all(math.isfinite(float(v)) for v in agent.update(full).values())
    assert make(obs, BOX).replay_latents() is None


# DreamerV3's size presets (agents/presets/size*.yaml; table in size1m.yaml) on the same two
# tasks, for the sizes whose build takes under 5 s on one CPU thread (size50m about 4 s; larger
# ones are listed in size1m.yaml only).
DREAMERV3_SIZE_PARAMETERS = {
    "size1m": (639_238, 959_160),
    "size12m": (9_731_590, 14_857_416),
    "size25m": (21_773_318, 33_308_200),
    "size50m": (38_599_174, 59_107_208),
}


@pytest.mark.parametrize("preset", list(DREAMERV3_SIZE_PARAMETERS))
def test_dreamerv3_size_presets_parameter_counts(preset):
    config = build_config(["agent=dreamer", "accelerator=cpu", f"preset={preset}"])
    for (obs, action_space), expected in zip(
        (STATE_TASK, PIXEL_TASK), DREAMERV3_SIZE_PARAMETERS[preset]
    ):
        parts = make_agent(config, gym.spaces.Dict(obs), action_space).num_parameters()
        assert parts["total"] == expected, (preset, sorted(obs), parts)


def test_reinforce_scores_the_raw_sample_not_the_clipped_action():
    """A one-step bandit through the agent's own imagination and actor loss: a Gaussian policy
    (mean 0.9, std 0.5) whose reward is the executed (clipped) action. The true gradient is
    dE[clip(a)]/dmu = P(-1 < a < 1) = Phi(0.2) - Phi(-3.8) = 0.5792; scoring the clipped
    action instead gives about 0.42. The REINFORCE estimate must be within 3% of the truth."""
    from scipy.stats import norm

    torch.manual_seed(0)
    mean, std = 0.9, 0.5
    agent = make(
        {"state": STATE},
        gym.spaces.Box(-1.0, 1.0, (1,), np.float32),
        "agent.actor_grad=reinforce",
        "agent.actor_entropy=0",
        "agent.horizon=1",
    )
    a = agent.config.agent
    # The actor's raw outputs, one learnable pair: tanh(mean_raw) = 0.9 and the std squashing
    # of Actor.dist mapped back to 0.5.
    squash = (std - a.actor_min_std) / (a.actor_max_std - a.actor_min_std)
    raw = torch.tensor([math.atanh(mean), math.log(squash / (1 - squash)) - 2.0])

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.raw = nn.Parameter(raw.clone())

        def forward(self, feat):
            return self.raw.expand(*feat.shape[:-1], 2)

    agent.actor.net = Constant()
    wm = agent.wm
    executed = {}

    def imagine(policy, start, horizon):
        action = policy(start)
        executed["action"] = action
        return {
            "deter": torch.stack([start["deter"]] * 2, 1),
            "stoch": torch.stack([start["stoch"]] * 2, 1),
            "action": action[:, None],
        }

    wm.imagine = imagine
    wm.reward = lambda feat: torch.cat(
        [torch.zeros_like(executed["action"]), executed["action"]], 1
    )
    wm.continue_prob = lambda feat: torch.ones(feat.shape[:-1])
    n = 200_000
    start = wm.rssm.initial(n, torch.device("cpu"))
    traj, actor_raw = agent.behaviour.imagine(wm, start)
    assert (traj["action"].abs() <= 1).all() and (traj["policy_sample"].abs() > 1).any()
    terms, _, _ = agent.behaviour.imagination_loss(wm, traj, actor_raw, torch.ones(n))
    actor_loss = terms["actor"]
    (grad,) = torch.autograd.grad(actor_loss, [agent.actor.net.raw])
    # d loss / d mean_raw = -actor_scale * dE/dmu * (1 - tanh^2): the critic predicts exactly 0
    # and the return scale is 1 on the first update, so the advantage is the reward itself.
    estimate = -grad[0].item() / (a.actor_scale * (1 - mean**2))
    truth = norm.cdf((1 - mean) / std) - norm.cdf((-1 - mean) / std)
    assert truth == pytest.approx(0.5792, abs=1e-4)
    assert estimate == pytest.approx(truth, rel=0.03)


def test_critic_predicts_exactly_zero_at_initialisation():
    """DreamerV3's symmetric two-hot sum: a zero-initialised critic (uniform probabilities
    over symmetric bins) decodes to exactly 0, not to rounding error."""
    agent = make({"state": STATE}, BOX)
    start = agent.wm.rssm.initial(4 * 7, torch.device("cpu"))
    feat = torch.randn_like(agent.wm.feat(start)).reshape(4, 7, -1)
    assert torch.equal(agent.critic.value(feat), torch.zeros(4, 7))
    assert torch.equal(agent.critic.twohot.bins, -agent.critic.twohot.bins.flip(0))


def test_replay_critic_loss_ignores_the_last_step_of_an_episode():
    """The replay value loss weights each step by 1 - is_last (DreamerV3): the step that ends
    an episode has no return of its own, so what the critic says there cannot change the
    loss, while any other step's can."""
    obs = {"state": STATE}
    agent = make(obs, BOX)
    data = agent.preprocess(make_batch(obs, BOX))
    assert data["is_last"][0, 4] == 1 and data["is_first"][0, 5] == 1
    post, _ = agent.train_world_model(data)
    post = {k: v.detach() for k, v in post.items()}
    with torch.no_grad():
        agent.critic.net.out.weight.normal_(0, 0.1)
    boot = torch.randn(data["reward"].numel())

    def loss_with_deter_changed_at(t):
        changed = {k: v.clone() for k, v in post.items()}
        changed["deter"][0, t] += 1.0
        return agent.behaviour.replay_critic_loss(agent.wm, changed, data, boot)[0]

    base = agent.behaviour.replay_critic_loss(agent.wm, post, data, boot)[0]
    assert torch.equal(loss_with_deter_changed_at(4), base)  # the episode's last step
    assert not torch.equal(loss_with_deter_changed_at(3), base)
