"""``sparse.enabled=true`` for the OP3-like agent: every layer of the slot world model built by
the layer factory, masks with the counts the density/distribution prescribe, topology updates
after the optimizer's steps, the skip list, sparse metrics, checkpoints, and a ``train.py``
run. Mirrors ``tests/test_sparse_dreamer.py``."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_sparse_dreamer import mask_round_trip
from torch import nn

from imagine_rl.agents.op3 import OP3Agent
from imagine_rl.agents.op3_config import SPARSE_SKIP_DEFAULT
from imagine_rl.runtime.config import ConfigError, build_config
from imagine_rl.runtime.loop import planned_updates
from imagine_rl.sparse import LayerBudget, allocate_units
from imagine_rl.sparse.masks import grid_shape

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
IMAGE = gym.spaces.Box(0, 255, (3, 32, 32), np.uint8)
OBS = gym.spaces.Dict({"pixels": IMAGE, "goal": IMAGE})
BOX = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
# The default skip list by module path (the LayerFactory names of SPARSE_SKIP_DEFAULT).
DEFAULT_DENSE = {
    "encoder.convs.0.weight",  # op3.encoder.conv0: the pixels
    "encoder.pos.weight",  # op3.encoder.pos: 4-d token positions
    "decoder.pos.weight",  # op3.decoder.pos: 4-d broadcast coordinates
    "dynamics.action_embed.0.weight",  # op3.dynamics.action_embed.0: the action
    "decoder.net.4.weight",  # op3.decoder.out: RGB and mask logit
}


def config(*overrides: str):
    return build_config(
        [
            "preset=debug",
            "agent=op3",
            "env=blocks:push-3",
            "env.size=32",
            "sparse.enabled=true",
            "sparse.density=0.1",
            "sparse.update_every=1",
            *overrides,
        ]
    )


def make(*overrides: str) -> OP3Agent:
    return OP3Agent(config(*overrides), OBS, BOX)


def make_batch(B: int = 2, T: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixels": torch.randint(0, 255, (B, T, 3, 32, 32), dtype=torch.uint8, generator=g),
        "action": torch.rand(B, T, 4, generator=g) * 2 - 1,
        "is_first": torch.zeros(B, T, dtype=torch.bool),
    }


def layer_state(agent: OP3Agent):
    """(mask, original, effective weight) per sparse layer."""
    out = {}
    for la in agent.sparsifier.sparse_layers:
        weight = getattr(la.module, la.param_name)
        out[la.name] = (la.p.mask != 0, la.original.detach(), weight.detach())
    return out


def expected_counts(agent: OP3Agent) -> dict[str, int]:
    """Non-zeros per sparse layer by the sparse library's own accounting (block 1)."""
    cfg = agent.sparsifier.config
    layers = agent.sparsifier.sparse_layers
    budgets = []
    for la in layers:
        rows, cols = grid_shape(la.shape, 1)
        budgets.append(LayerBudget(la.name, la.shape, 1, rows * cols))
    units = allocate_units(budgets, float(cfg.density), cfg.distribution)
    return {la.name: n for la, n in zip(layers, units)}


def test_every_weight_layer_is_built_by_the_factory():
    agent = OP3Agent(config("sparse.enabled=false"), OBS, BOX)
    assert agent.sparsifier is None
    layers = {
        path: module
        for path, module in agent.wm.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))
    }
    names = {path: getattr(m, "layer_name", None) for path, m in layers.items()}
    assert all(isinstance(n, str) and n.startswith("op3.") for n in names.values()), names
    assert set(agent.factory.layers.values()) == set(layers.values())
    # Encoder, slot attention, decoder and dynamics (action attention and interactions).
    for part in ("encoder", "slot_attention", "decoder", "dynamics.action", "dynamics.pair"):
        assert any(n.startswith(f"op3.{part}") for n in names.values()), part


@pytest.mark.parametrize(
    ("method", "distribution"), [("rigl", "erk"), ("set", "erk"), ("static", "uniform")]
)
def test_updates_keep_counts_zeros_and_log_metrics(method, distribution):
    agent = make(f"sparse.method={method}", f"sparse.distribution={distribution}")
    sp = agent.sparsifier
    assert sp is not None and sp.config.total_steps == planned_updates(agent.config)
    expected = expected_counts(agent)
    before = {name: mask.clone() for name, (mask, _, _) in layer_state(agent).items()}
    assert {k: int(v.sum()) for k, v in before.items()} == expected
    assert sum(expected.values()) == round(0.1 * sum(v.numel() for v in before.values()))
    batch = make_batch()
    for _ in range(3):
        metrics = {**agent.update(batch), **agent.log_metrics()}

    after = layer_state(agent)
    assert set(after) == set(before) and len(after) == len(sp.layers) - len(DEFAULT_DENSE)
    moved = False
    for name, (mask, original, weight) in after.items():
        # Exact counts: each layer keeps its number of active weights through drop/regrow.
        assert int(mask.sum()) == expected[name], name
        assert not original[~mask].any() and not weight[~mask].any(), name
        adam = agent.opt.state[original_of(agent, name)]  # no optimizer state where pruned
        assert not adam["exp_avg"][~mask].any() and not adam["exp_avg_sq"][~mask].any(), name
        moved |= not torch.equal(mask, before[name])
    assert moved == (method != "static")

    assert metrics["sparse/density"] == pytest.approx(0.1, abs=1e-3)
    assert 0.0 < metrics["sparse/flops_ratio"] < 1.0
    assert metrics["sparse/step"] == 3
    assert metrics["sparse/updates"] == (0 if method == "static" else 3)
    assert metrics["sparse/rigl_missing_grad"] == 0
    assert metrics["sparse/layers"] == len(after)
    if method != "static":
        assert metrics["sparse/changed"] > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    rng = np.random.default_rng(0)
    obs = {
        "pixels": rng.integers(0, 255, (2, 3, 32, 32), dtype=np.uint8),
        "goal": rng.integers(0, 255, (2, 3, 32, 32), dtype=np.uint8),
        "is_first": np.ones(2, bool),
    }
    action, _ = agent.act(obs, None, True)  # plans (updates > 0) through the masked model
    assert action.shape == (2, 4) and np.isfinite(action).all()


def original_of(agent: OP3Agent, name: str) -> torch.Tensor:
    return next(la.original for la in agent.sparsifier.sparse_layers if la.name == name)


def test_masked_weights_get_no_gradient():
    agent = make("sparse.method=rigl")
    losses, _, _ = agent.wm.loss_and_states(agent.preprocess(make_batch()))
    sum(losses.values()).backward()
    reached = 0
    for name, (mask, _, _) in layer_state(agent).items():
        grad = original_of(agent, name).grad
        assert grad is not None, name
        assert not grad[~mask].any(), name  # weight = original * mask: nothing reaches them
        reached += bool(grad[mask].any())
    assert reached == len(layer_state(agent))


def test_default_skip_keeps_inputs_and_outputs_dense():
    agent = make()
    dense = {r["name"] for r in agent.sparsifier.report() if not r["sparse"]}
    assert dense == DEFAULT_DENSE
    # Three patterns name layers this model does not build: the reward and continue heads'
    # outputs (op3.heads) and the goal pairs' pooling scores (op3.goal_features).
    assert len(SPARSE_SKIP_DEFAULT) == len(DEFAULT_DENSE) + 3
    for name in dense:
        weight = agent.wm.get_parameter(name)
        assert weight.count_nonzero() == weight.numel(), name  # untouched, dense init
    # With the heads (their loss forward counts the FLOPs), their output layers stay dense.
    headed = make("op3.heads=true")
    dense = {r["name"] for r in headed.sparsifier.report() if not r["sparse"]}
    assert dense == DEFAULT_DENSE | {"reward_head.2.weight", "continue_head.2.weight"}
    assert {"reward_head.0.weight", "continue_head.0.weight"} <= set(headed.sparsifier.masks())
    # sparse.skip=[] sparsifies every linear/conv layer.
    agent = make("sparse.skip=[]")
    assert all(r["sparse"] for r in agent.sparsifier.report())
    assert len(agent.sparsifier.sparse_layers) == len(agent.factory.layers)
    # Module paths and factory names both work as patterns.
    agent = make("sparse.skip=[dynamics.*]")
    names = {r["name"] for r in agent.sparsifier.report() if not r["sparse"]}
    assert names and all(n.startswith("dynamics.") for n in names)
    assert len(names) == sum(n.startswith("op3.dynamics.") for n in agent.factory.layers)
    agent = make("sparse.skip=[op3.slot_attention.*]")
    names = {r["name"] for r in agent.sparsifier.report() if not r["sparse"]}
    assert names and all(n.startswith("attention.") for n in names)


def test_checkpoint_round_trip_restores_masks():
    batch = make_batch()
    agent, fresh, loaded = mask_round_trip(
        lambda: make("sparse.method=rigl"), batch, "world_model.dynamics.pair.0"
    )
    masks = agent.sparsifier.masks()
    assert fresh.updates == 2
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
    for key, value in fresh.wm.state_dict().items():
        torch.testing.assert_close(value, agent.wm.state_dict()[key], rtol=1e-5, atol=1e-6)

    dense = OP3Agent(config("sparse.enabled=false"), OBS, BOX)
    with pytest.raises(ValueError, match="sparse.enabled=true"):
        dense.load_state_dict(loaded)
    with pytest.raises(ValueError, match="sparse.enabled=false"):
        make().load_state_dict(dense.state_dict())


def test_load_weights_brings_the_masks_with_fresh_counters():
    """``train.py init=<sparse run>``: weights and masks come over, the schedule starts fresh."""
    trained = make("sparse.method=set")
    trained.update(make_batch())
    started = make("sparse.method=set")
    started.load_weights(trained.state_dict()["weights"])
    assert started.updates == 0 and started.sparsifier.step_count == 0
    for name, mask in started.sparsifier.masks().items():
        assert torch.equal(mask, trained.sparsifier.masks()[name]), name
    with pytest.raises(ValueError, match="sparse.enabled=false"):
        started.load_weights(
            OP3Agent(config("sparse.enabled=false"), OBS, BOX).state_dict()["weights"]
        )
    with pytest.raises(ValueError, match="keeps"):  # another density: other counts per layer
        make("sparse.density=0.2", "sparse.method=set").load_weights(
            trained.state_dict()["weights"]
        )


def test_config_rules():
    assert config().sparse.enabled and config("op3.freeze_perception=true").sparse.enabled
    with pytest.raises(ConfigError, match="sparse.block"):
        make("sparse.block=3")


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_frozen_perception_keeps_its_masks_while_the_dynamics_rewires(method):
    """Stage 2 on a sparse perception (op3.freeze_perception=true): topology updates skip the
    frozen perception (its masks and weights stay those it was given), the dynamics' layers
    drop and regrow, and every layer keeps its exact count."""
    agent = make("op3.freeze_perception=true", f"sparse.method={method}")
    expected = expected_counts(agent)
    before = {
        name: (mask, original.clone()) for name, (mask, original, _) in layer_state(agent).items()
    }
    for _ in range(3):
        agent.update(make_batch())
    after = layer_state(agent)
    dynamics = [name for name in after if name.startswith("dynamics.")]
    assert dynamics and len(dynamics) < len(after)
    for name, (mask, original, _) in after.items():
        assert int(mask.sum()) == expected[name], name
        if name.startswith("dynamics."):
            continue
        assert torch.equal(mask, before[name][0]), name
        assert torch.equal(original, before[name][1]), name
    assert any(not torch.equal(after[name][0], before[name][0]) for name in dynamics)


def _train_main():
    from imagine_rl.scripts.train import main

    return main


def test_train_script_runs_sparse_op3(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "preset=debug",
        "agent=op3",
        "env=blocks:push-3",
        "sparse.enabled=true",
        "sparse.density=0.1",
        "sparse.method=rigl",
        "sparse.update_every=5",
        "run.steps=40",
        "run.learning_starts=20",
        "run.eval_every=40",
        "run.checkpoint_every=40",
        "run.eval_episodes=1",
        "run.log_every=10",
        "replay.batch_length=3",
        "logging.wandb=false",
        "logging.console=false",
        f"run.dir={run_dir}",
    ]
    assert _train_main()(args) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in rows if "sparse/density" in x]
    assert logged, rows
    last = logged[-1]
    assert last["sparse/density"] == pytest.approx(0.1, abs=1e-3)
    assert 0.0 < last["sparse/flops_ratio"] < 1.0
    # total_steps of the schedule is the number of updates the run really did.
    assert last["train/updates"] == planned_updates(build_config(args[:-1])) > 5
    assert last["sparse/step"] == last["train/updates"] and last["sparse/updates"] > 0
    assert (run_dir / "checkpoints" / "step_40" / "manifest.json").exists()
