"""Factored RSSM dynamics (``world_model.factored.*``): the transition and the prior read only
what the graph allows (exactly), RigL-style rewiring on the group grid, the l1 gates, and the
Dreamer agent's use of them (metrics, adjacency image, checkpoints)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from imagine_rl.agents.dreamer import DreamerAgent
from imagine_rl.runtime.config import ConfigError, build_config
from imagine_rl.runtime.logging import JsonlBackend, Logger
from imagine_rl.worldmodels import RSSM, LayerFactory, RSSMConfig
from imagine_rl.worldmodels.factored import FactoredSpec, FactorGraphLinear

torch.set_num_threads(1)

G = 4


def make_rssm(latent: str = "categorical", graph: str = "fixed", in_degree: int = 2) -> RSSM:
    torch.manual_seed(0)
    spec = FactoredSpec(groups=G, graph=graph, in_degree=in_degree, seed=3)
    config = RSSMConfig(deter=16, hidden=16, stoch=4, classes=3, latent=latent, factored=spec)
    return RSSM(config, action_dim=2, embed_dim=8, factory=LayerFactory())


def random_state(rssm: RSSM, B: int = 5):
    c = rssm.config
    deter = torch.randn(B, c.deter)
    if c.latent == "categorical":
        stoch = torch.nn.functional.one_hot(torch.randint(0, c.classes, (B, c.stoch)), c.classes)
        stoch = stoch.float()
    else:
        stoch = torch.randn(B, c.stoch)
    action_feat = rssm.action_features(torch.rand(B, 2) * 2 - 1)
    return deter, stoch, action_feat


def perturb_group(deter, stoch, j: int):
    """Copies with group ``j`` of ``h`` and of ``z`` replaced by other values."""
    deter, stoch = deter.clone(), stoch.clone()
    s, k = deter.shape[1] // G, stoch.shape[1] // G
    deter[:, j * s : (j + 1) * s] += 3.0 * torch.randn_like(deter[:, j * s : (j + 1) * s])
    stoch[:, j * k : (j + 1) * k] = stoch[:, j * k : (j + 1) * k].flip(0) + 0.5
    return deter, stoch


@pytest.mark.parametrize("latent", ["categorical", "gaussian"])
@pytest.mark.parametrize("graph", ["fixed", "dynamic"])
def test_transition_ignores_excluded_groups_exactly(latent, graph):
    rssm = make_rssm(latent, graph)
    adjacency = rssm.graph.adjacency
    assert adjacency.diagonal().all() and (adjacency.sum(1) == 2).all()
    deter, stoch, action_feat = random_state(rssm)
    with torch.no_grad():
        base = rssm.core(deter, stoch, action_feat).reshape(-1, G, 4)
        for j in range(G):
            d2, z2 = perturb_group(deter, stoch, j)
            out = rssm.core(d2, z2, action_feat).reshape(-1, G, 4)
            for g in range(G):
                if adjacency[g, j]:
                    assert not torch.equal(out[:, g], base[:, g]), (g, j)  # parents matter
                else:
                    assert torch.equal(out[:, g], base[:, g]), (g, j)  # bit-for-bit unchanged


@pytest.mark.parametrize("latent", ["categorical", "gaussian"])
def test_prior_of_a_group_reads_only_its_own_deter(latent):
    rssm = make_rssm(latent)
    deter = torch.randn(3, 7, 16)  # any leading axes
    with torch.no_grad():
        base = rssm.prior_stats(deter)
        for j in range(G):
            changed = deter.clone()
            changed[..., j * 4 : (j + 1) * 4] += 1.0
            stats = rssm.prior_stats(changed)
            for key, value in stats.items():
                # stoch = 4 latents over 4 groups: latent g belongs to group g.
                same = value.eq(base[key]).reshape(*value.shape[:2], G, -1).all(-1).all(0).all(0)
                assert same.tolist() == [g != j for g in range(G)], (key, j)


def test_l1_gate_at_zero_cuts_the_edge_exactly():
    rssm = make_rssm(graph="l1")
    graph = rssm.graph
    assert graph.adjacency.all() and graph.gate is not None
    assert float(graph.penalty().detach()) == pytest.approx(0.01 * G * (G - 1))
    with torch.no_grad():
        graph.gate[2, 0] = 0.0
    deter, stoch, action_feat = random_state(rssm)
    with torch.no_grad():
        base = rssm.core(deter, stoch, action_feat).reshape(-1, G, 4)
        d2, z2 = perturb_group(deter, stoch, 0)
        out = rssm.core(d2, z2, action_feat).reshape(-1, G, 4)
    assert torch.equal(out[:, 2], base[:, 2])
    assert not torch.equal(out[:, 1], base[:, 1])
    assert graph.binary()[2].tolist() == [False, True, True, True]
    # The penalty's gradient reaches the gates (sign of each gate, off the diagonal only).
    graph.penalty().backward()
    expected = 0.01 * (1 - torch.eye(G)) * torch.sign(graph.gate.detach())
    assert torch.allclose(graph.gate.grad, expected)


def test_rewiring_grows_where_the_dense_gradient_is_and_keeps_the_in_degree():
    torch.manual_seed(0)
    spec = FactoredSpec(
        groups=G, graph="dynamic", in_degree=2, update_every=2, drop_fraction=0.5, seed=1
    )
    layer = FactorGraphLinear(spec, node_size=3, out=5, factory=LayerFactory())
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    before = layer.adjacency.clone()
    # Only node 3 carries signal: the dense gradient lives in column 3 of the tile grid.
    nodes = torch.zeros(8, G, 3)
    nodes[:, 3] = torch.randn(8, 3)
    target = torch.randn(8, G, 5)
    infos = []
    for _ in range(2):
        opt.zero_grad()
        (layer(nodes) - target).square().sum().backward()
        opt.step()
        infos.append(layer.step(opt))
    assert infos[0] is None and infos[1]["world_model/graph_changed"] > 0
    after = layer.adjacency
    assert after.diagonal().all() and (after.sum(1) == 2).all()
    for g in range(G):
        if not before[g, 3]:
            assert after[g, 3], (g, before, after)  # grown where the gradient is
    # Absent tiles hold zero weights and zero Adam state; new ones start at zero.
    tiles = layer._tiles(layer.linear.weight.detach())
    state = opt.state[layer.linear.weight]
    for g in range(G):
        for j in range(G):
            if not after[g, j] or not before[g, j]:
                assert not tiles[g, j].any(), (g, j)
                assert not layer._tiles(state["exp_avg"])[g, j].any(), (g, j)


def config(*overrides: str):
    return build_config(
        [
            "agent=dreamer",
            "accelerator=cpu",
            "preset=debug,dreamer_debug",
            "world_model.factored.groups=4",
            *overrides,
        ]
    )


OBS = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)})
BOX = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


def batch(B: int = 2, T: int = 8):
    rng = np.random.default_rng(0)
    out = {
        "state": torch.from_numpy(rng.normal(size=(B, T, 3)).astype(np.float32)),
        "action": torch.from_numpy(rng.uniform(-1, 1, (B, T, 1)).astype(np.float32)),
        "reward": torch.from_numpy(rng.normal(size=(B, T)).astype(np.float32)),
    }
    for key in ("is_first", "is_last", "is_terminal"):
        out[key] = torch.zeros(B, T)
    out["is_first"][:, 0] = 1
    return out


def test_agent_rewires_logs_and_checkpoints_the_graph():
    cfg = config("world_model.factored.graph=dynamic", "world_model.factored.update_every=1")
    agent = DreamerAgent(cfg, OBS, BOX)
    graph = agent.wm.rssm.graph
    assert graph.spec.total_steps > 1
    start = graph.adjacency.clone()
    for _ in range(3):
        metrics = agent.update(batch())
    assert int(graph.steps) == 3
    assert metrics["world_model/graph_edges"] == G  # in_degree 2: one non-self parent each
    assert not torch.equal(graph.adjacency, start)  # rewired (update_every=1)
    image = agent.report(batch())["world_model/graph"]
    assert image.dtype == np.uint8 and image.shape == (G * 16, G * 16, 3)

    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    buffer.seek(0)
    fresh = DreamerAgent(cfg, OBS, BOX)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.wm.rssm.graph.adjacency, graph.adjacency)
    assert int(fresh.wm.rssm.graph.steps) == 3
    # Armed again after loading: the next step rewires with a captured gradient.
    assert fresh.wm.rssm.graph._probe is not None


def test_agent_l1_graph_adds_its_loss_and_trains_the_gates():
    agent = DreamerAgent(config("world_model.factored.graph=l1"), OBS, BOX)
    gate = agent.wm.rssm.graph.gate
    before = gate.detach().clone()
    metrics = agent.update(batch())
    assert metrics["loss/graph"] == pytest.approx(0.01 * G * (G - 1), rel=1e-4)
    assert "world_model/graph_gate_mean" in metrics
    assert not torch.equal(gate.detach(), before)


def test_bad_factored_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"world_model.deter \(32\).*factored.groups \(3\)"):
        config("world_model.factored.groups=3")
    with pytest.raises(ConfigError, match="in_degree"):
        config("world_model.factored.in_degree=5")
    with pytest.raises(ConfigError, match="did you mean"):
        config("world_model.factored.grups=4")


def test_logger_writes_images_as_png(tmp_path):
    logger = Logger(tmp_path, [JsonlBackend(tmp_path)])
    image = np.zeros((8, 8, 3), np.uint8)
    path = logger.media("world_model/graph", image, step=5)
    logger.close()
    assert path.suffix == ".png" and path.exists()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line == {"step": 5, "world_model/graph_path": str(path)}


def test_training_run_logs_the_graph_image_and_applies_the_intervention(tmp_path, caplog):
    from imagine_rl.scripts import train

    run_dir = tmp_path / "run"
    args = [
        "env=gym:InvertedPendulum-v5",
        "agent=dreamer",
        "preset=debug",
        "world_model.factored.groups=4",
        "world_model.factored.graph=dynamic",
        "world_model.factored.update_every=2",
        "env.intervention=body_mass:pole*2@step=100",
        f"run.dir={run_dir}",
        "run.steps=300",
        "run.learning_starts=100",
        "run.eval_every=300",
        "run.eval_episodes=1",
        "run.video=false",
        "env.time_limit=60",
        "logging.wandb=false",
        "logging.console=false",
    ]
    with caplog.at_level(logging.WARNING, logger="imagine_rl.envs.interventions"):
        assert train.main(args) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    image = [r["world_model/graph_path"] for r in rows if "world_model/graph_path" in r]
    assert len(image) == 1 and Path(image[0]).name == "world_model_graph_300.png"
    assert Path(image[0]).exists()
    assert any(r.get("world_model/graph_edges") == G for r in rows)
    messages = [r.getMessage() for r in caplog.records if r.name == "imagine_rl.envs.interventions"]
    assert len(messages) == 1 and "at env step 100" in messages[0]
