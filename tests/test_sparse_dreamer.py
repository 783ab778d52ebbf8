"""``sparse.enabled=true`` for the Dreamer agent: masks on the world model, topology updates
after world-model steps, sparse metrics, checkpoints, and one end-to-end ``train.py`` run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from imagine_rl.agents.dreamer import DreamerAgent
from imagine_rl.runtime.config import ConfigError, build_config
from imagine_rl.runtime.loop import planned_updates

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
OBS = {"state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)}
BOX = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
PIXELS = gym.spaces.Box(0, 255, (3, 64, 64), np.uint8)


def config(*overrides: str):
    return build_config(
        [
            "agent=dreamer",
            "accelerator=cpu",
            "preset=debug,dreamer_debug",
            "sparse.enabled=true",
            "sparse.density=0.1",
            "sparse.update_every=1",
            *overrides,
        ]
    )


def make(*overrides: str, obs: dict | None = None, action_space: gym.Space = BOX) -> DreamerAgent:
    return DreamerAgent(config(*overrides), gym.spaces.Dict(obs or OBS), action_space)


def make_batch(obs: dict, action_space: gym.Space, B: int = 2, T: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    batch = {}
    for key, space in obs.items():
        if space.dtype == np.uint8:
            batch[key] = torch.from_numpy(rng.integers(0, 256, (B, T, *space.shape), np.uint8))
        else:
            batch[key] = torch.from_numpy(rng.normal(size=(B, T, *space.shape)).astype(np.float32))
    shape = action_space.shape
    batch["action"] = torch.from_numpy(rng.uniform(-1, 1, (B, T, *shape)).astype(np.float32))
    batch["reward"] = torch.from_numpy(rng.normal(size=(B, T)).astype(np.float32))
    for key in ("is_first", "is_last", "is_terminal"):
        batch[key] = torch.zeros(B, T)
    batch["is_first"][:, 0] = 1
    return batch


def layer_state(agent: DreamerAgent):
    """(mask, original, effective weight) per sparse layer."""
    out = {}
    for la in agent.sparsifier.sparse_layers:
        weight = getattr(la.module, la.param_name)
        out[la.name] = (la.p.mask != 0, la.original.detach(), weight.detach())
    return out


@pytest.mark.parametrize(
    ("method", "distribution"), [("rigl", "erk"), ("set", "erk"), ("static", "uniform")]
)
def test_updates_keep_counts_zeros_and_log_metrics(method, distribution):
    agent = make(f"sparse.method={method}", f"sparse.distribution={distribution}")
    sp = agent.sparsifier
    assert sp is not None and sp.config.total_steps == planned_updates(agent.config)
    before = {name: mask.clone() for name, (mask, _, _) in layer_state(agent).items()}
    batch = make_batch(OBS, BOX)
    for _ in range(3):
        metrics = {**agent.update(batch), **agent.log_metrics()}

    after = layer_state(agent)
    assert set(after) == set(before) and len(after) == 9
    moved = False
    for name, (mask, original, weight) in after.items():
        # Exact counts: each layer keeps its number of active weights through drop/regrow.
        assert int(mask.sum()) == int(before[name].sum()), name
        assert not original[~mask].any() and not weight[~mask].any(), name
        # No optimizer state where pruned.
        adam = agent.optimizer_policy.main["world_model"].state[_raw(agent, name)]
        assert not adam["exp_avg"][~mask].any() and not adam["exp_avg_sq"][~mask].any(), name
        moved |= not torch.equal(mask, before[name])
    assert moved == (method != "static")

    assert metrics["sparse/density"] == pytest.approx(0.1, abs=1e-3)
    assert 0.0 < metrics["sparse/flops_ratio"] < 1.0
    assert metrics["sparse/step"] == 3
    assert metrics["sparse/updates"] == (0 if method == "static" else 3)
    assert metrics["sparse/rigl_missing_grad"] == 0
    if method != "static":
        assert metrics["sparse/changed"] > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    action, _ = agent.act(
        {"state": np.zeros((2, 3), np.float32), "is_first": np.ones(2, bool)}, None, True
    )
    assert action.shape == (2, 1)


def _raw(agent: DreamerAgent, name: str) -> torch.Tensor:
    return next(la.original for la in agent.sparsifier.sparse_layers if la.name == name)


def mask_round_trip(make, batch, layer: str):
    """Two updates of ``make()``'s agent, its ``state_dict`` through ``torch.save`` /
    ``torch.load(weights_only=True)`` (the masks saved as buffers beside the parametrized
    ``layer``'s weight), then into a fresh agent whose masks differed. Returns ``(agent,
    fresh, loaded)``."""
    agent = make()
    for _ in range(2):
        agent.update(batch)
    state = agent.state_dict()
    assert f"{layer}.parametrizations.weight.original" in state["weights"]
    assert f"{layer}.parametrizations.weight.0.mask" in state["weights"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = make()
    masks = agent.sparsifier.masks()
    assert any(not torch.equal(masks[k], v) for k, v in fresh.sparsifier.masks().items())
    fresh.load_state_dict(loaded)
    assert fresh.sparsifier.step_count == agent.sparsifier.step_count == 2
    return agent, fresh, loaded


def test_checkpoint_round_trip_restores_masks():
    batch = make_batch(OBS, BOX)
    agent, fresh, loaded = mask_round_trip(
        lambda: make("sparse.method=rigl"), batch, "world_model.rssm.deter_in.0"
    )
    masks = agent.sparsifier.masks()
    for name, mask in fresh.sparsifier.masks().items():
        assert torch.equal(mask, masks[name]), name
    for key, value in fresh.wm.state_dict().items():
        assert torch.equal(value, agent.wm.state_dict()[key]), key
    # Both continue identically (same RNG state for the next topology update).
    torch.manual_seed(1)
    m1 = agent.update(batch)
    torch.manual_seed(1)
    m2 = fresh.update(batch)
    assert float(m1["loss/world_model"]) == pytest.approx(float(m2["loss/world_model"]), rel=1e-5)
    for name, mask in fresh.sparsifier.masks().items():
        assert torch.equal(mask, agent.sparsifier.masks()[name]), name

    dense = DreamerAgent(config("sparse.enabled=false"), gym.spaces.Dict(OBS), BOX)
    with pytest.raises(ValueError, match="sparse.enabled=true"):
        dense.load_state_dict(loaded)


def test_block_16_masks_are_whole_blocks():
    agent = make("sparse.block=16", "sparse.method=set")
    agent.update(make_batch(OBS, BOX))
    for name, (mask, _, _) in layer_state(agent).items():
        out, inp = mask.shape
        tiles = mask.reshape(out // 16, 16, inp // 16, 16)
        assert (tiles.all(dim=(1, 3)) == tiles.any(dim=(1, 3))).all(), name
        assert int(mask.sum()) % 256 == 0 and int(mask.sum()) > 0, name


def test_bad_block_settings_name_the_key_or_the_layer():
    # Without the default skip list the 3-input encoder layer cannot be tiled by 16.
    with pytest.raises(ValueError, match=r"encoder\.mlp\.0\.0\.weight.*16x16"):
        make("sparse.block=16", "sparse.skip=[]")
    with pytest.raises(ConfigError, match="sparse.block"):
        make("sparse.block=3")


def test_default_skip_keeps_inputs_and_outputs_dense():
    obs = {"pixels": PIXELS, "state": gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)}
    agent = make(obs=obs, action_space=gym.spaces.Discrete(3))
    dense = {r["name"] for r in agent.sparsifier.report() if not r["sparse"]}
    assert dense == {
        "encoder.mlp.0.0.weight",
        "encoder.cnn.0.weight",
        "rssm.action_in.0.weight",
        "decoder.mlp_out.weight",
        "decoder.cnn.11.weight",  # the last transposed conv (`wm.decoder.cnn.out`)
        "reward_head.out.weight",
        "continue_head.out.weight",
    }
    # Module paths work as skip patterns too.
    agent = make("sparse.skip=[rssm.*]")
    names = {r["name"] for r in agent.sparsifier.report() if not r["sparse"]}
    assert names == {n for n in names if n.startswith("rssm.")} and len(names) == 7


@pytest.mark.slow
def test_train_script_logs_sparse_metrics(tmp_path):
    args = [
        "env=gym:Pendulum-v1",
        "agent=dreamer",
        "preset=debug,dreamer_debug",
        "sparse.enabled=true",
        "sparse.density=0.1",
        "sparse.method=rigl",
        "sparse.behaviour=true",
        "run.steps=400",
        "run.learning_starts=100",
        "run.eval_every=400",
        "run.eval_episodes=1",
        "env.time_limit=100",
        "logging.wandb=false",
        "logging.console=false",
        f"run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "sparse/density" in x]
    assert logged, lines
    last = logged[-1]
    assert last["sparse/density"] == pytest.approx(0.1, abs=1e-3)
    assert 0.0 < last["sparse/flops_ratio"] < 1.0
    assert last["sparse/behaviour_density"] == pytest.approx(0.1, abs=0.02)
    assert last["sparse/behaviour_step"] == last["sparse/step"] > 0
    # total_steps of the schedule is the number of updates the run really did.
    assert last["train/updates"] == planned_updates(build_config(args[:-1]))


# ------------------------------------------------------------------- sparse.behaviour


def behaviour_layers(agent: DreamerAgent) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(mask, original) per sparse layer of the actor-critic."""
    return {
        la.name: (la.p.mask != 0, la.original.detach())
        for la in agent.behaviour_sparsifier.sparse_layers
    }


def test_sparse_behaviour_masks_actor_and_critic_and_evolves_them():
    agent = make("sparse.behaviour=true", "sparse.method=rigl")
    sp = agent.behaviour_sparsifier
    names = {row["name"]: row["density"] < 1 for row in sp.report()}
    # The hidden layers are sparse, the output layers (action, value bins) stay dense.
    assert names == {
        "actor.net.mlp.0.0.weight": True,
        "actor.net.out.weight": False,
        "critic.net.mlp.0.0.weight": True,
        "critic.net.out.weight": False,
    }
    assert sp.config.total_steps == planned_updates(agent.config)
    before = {name: mask.clone() for name, (mask, _) in behaviour_layers(agent).items()}
    batch = make_batch(OBS, BOX)
    for _ in range(3):
        metrics = {**agent.update(batch), **agent.log_metrics()}
    moved = False
    optimizers = {"actor": agent.optimizer_policy.main["actor"]}
    optimizers["critic"] = agent.optimizer_policy.main["critic"]
    for name, (mask, original) in behaviour_layers(agent).items():
        assert int(mask.sum()) == int(before[name].sum()), name  # exact counts through updates
        assert not original[~mask].any(), name  # pruned weights stay exactly zero
        raw = next(la.original for la in sp.sparse_layers if la.name == name)
        adam = optimizers[name.split(".")[0]].state[raw]
        assert not adam["exp_avg"][~mask].any() and not adam["exp_avg_sq"][~mask].any(), name
        moved |= not torch.equal(mask, before[name])
    assert moved  # RigL changed the topology of the actor-critic too
    assert metrics["sparse/behaviour_density"] == pytest.approx(0.1, abs=0.02)
    assert metrics["sparse/behaviour_step"] == 3 and metrics["sparse/behaviour_updates"] == 3
    assert metrics["sparse/behaviour_rigl_missing_grad"] == 0  # the dense gradient was captured
    assert metrics["sparse/step"] == 3  # the world model's schedule is its own


def test_sparse_behaviour_slow_critic_starts_from_the_masked_critic():
    agent = make("sparse.behaviour=true")
    critic, slow = agent.behaviour.critic, agent.behaviour.slow_critic
    layer = critic.net.mlp[0][0]
    mask = layer.parametrizations.weight[0].mask
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.equal(slow.net.mlp[0][0].weight, layer.weight)  # zero where masked
    assert torch.equal(slow.net.out.weight, critic.net.out.weight)
    feat = torch.randn(5, agent.wm.feat_size)
    torch.testing.assert_close(slow.net(feat), critic.net(feat))


@pytest.mark.parametrize("fast_path", ["off", "on"])
def test_sparse_update_has_no_host_sync_between_topology_steps(monkeypatch, fast_path):
    from imagine_rl.runtime.profiling import count_dispatch
    from imagine_rl.sparse import kernels

    monkeypatch.setattr(kernels, "_MIN_ROWS", [0])  # the compressed kernel at this tiny batch
    agent = make(
        "sparse.behaviour=true",
        "sparse.method=rigl",
        "sparse.update_every=50",
        "sparse.block=4",
        "sparse.balanced=true",
        f"sparse.fast_path={fast_path}",
    )
    fast = [la.kernel == "balanced-bsr-bmm" for la in agent.sparsifier.sparse_layers]
    assert any(fast) == (fast_path == "on")
    batch = make_batch(OBS, BOX)
    agent.update(batch)
    counted = count_dispatch(lambda: agent.update(batch))
    assert counted.ops > 100 and counted.host_syncs == 0


def test_sparse_behaviour_checkpoint_round_trip_and_refusals():
    batch = make_batch(OBS, BOX)
    agent, fresh, loaded = mask_round_trip(
        lambda: make("sparse.behaviour=true", "sparse.method=rigl"),
        batch,
        "world_model.rssm.deter_in.0",
    )
    assert "actor.net.mlp.0.0.parametrizations.weight.0.mask" in loaded["weights"]
    theirs = agent.behaviour_sparsifier.masks()
    for name, mask in fresh.behaviour_sparsifier.masks().items():
        assert torch.equal(mask, theirs[name]), name
    assert fresh.behaviour_sparsifier.step_count == 2
    # A world-model-only sparse agent refuses it in one line, before touching its weights.
    plain = make()
    before = {k: v.clone() for k, v in plain.behaviour.actor.state_dict().items()}
    with pytest.raises(ValueError, match="sparse.behaviour=true"):
        plain.load_state_dict(loaded)
    for key, value in plain.behaviour.actor.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="sparse.behaviour=false"):
        fresh.load_state_dict(plain.state_dict())


def test_sparse_behaviour_needs_a_sparse_world_model_and_an_actor_critic():
    with pytest.raises(ValueError, match="set sparse.enabled=true"):
        make("sparse.enabled=false", "sparse.behaviour=true")
    with pytest.raises(ValueError, match="agent.behaviour=planner has none"):
        make("sparse.behaviour=true", "agent.behaviour=planner")
