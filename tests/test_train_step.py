"""The training step at hardware speed: no host syncs, the whole-update compile, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from test_dreamer import BOX, DISCRETE, PIXELS, STATE, make, make_batch
from test_replay import Streams, fill
from test_replay import make as make_replay

from imagine_rl.runtime.accelerator import resolve_compile
from imagine_rl.runtime.config import build_config
from imagine_rl.runtime.profiling import count_dispatch, count_profiled

torch.set_num_threads(1)


# Current DreamerV3's options: one LaProp step of all losses from the stored context.
LAPROP_CONTEXT = (
    "agent.optimizer=laprop",
    "agent.replay_critic_grad_wm=true",
    "agent.imagine_start_continue=true",
    "replay.context=1",
)


def _with_context(agent, batch):
    """The batch as the replay hands it with replay.context: a stored state for some windows."""
    if agent.context is not None:
        batch["context_valid"] = torch.tensor([1.0, 0.0, 1.0])
        batch["replay_index"] = torch.zeros(3, 2, dtype=torch.long)
        for key, shape in agent.context.shapes.items():
            batch[f"context/{key}"] = torch.rand(3, *shape)
    return batch


@pytest.mark.parametrize(
    "obs, extra",
    [
        ({"state": STATE}, ()),
        ({"pixels": PIXELS}, ()),
        # Step 2 of a topology schedule of every 100 steps: a non-topology step.
        ({"state": STATE}, ("sparse.enabled=true", "sparse.update_every=100")),
        ({"state": STATE}, LAPROP_CONTEXT),
        # The joint gradient with three Adam steps (agent.replay_critic_grad_wm alone).
        ({"state": STATE}, ("agent.replay_critic_grad_wm=true",)),
    ],
    ids=["states", "pixels", "sparse", "laprop-context", "adam-joint"],
)
def test_update_makes_no_host_sync(obs, extra):
    agent = make(obs, BOX, "agent.compile=false", *extra)
    batch = _with_context(agent, make_batch(obs, BOX))
    agent.update(batch)  # warm-up: optimizer states exist
    counted = count_dispatch(lambda: agent.update(batch))
    assert counted.ops > 1000  # the counter sees the update (forward, backward, optimizers)
    assert counted.host_syncs == 0
    # The metrics come back as device tensors; reading them is the loop's one sync.
    assert all(isinstance(v, torch.Tensor) for v in counted.result.values())
    if agent.sparsifier is not None:
        assert agent.sparsifier.step_count == 2


@pytest.mark.parametrize("optimizer", [(), LAPROP_CONTEXT], ids=["adam", "laprop-context"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_update_makes_no_host_sync_at_any_precision(precision, optimizer):
    """Autocast precisions with both optimizers, counted by both counters. fp16 steps through
    torch.amp.GradScaler, which reads found_inf on the host unless the optimizer skips an
    overflowed step itself: fused Adam and LaProp (``_step_supports_amp_scaling``) do."""
    agent = make(
        {"state": STATE},
        BOX,
        "agent.compile=false",
        f"accelerator.precision={precision}",
        *optimizer,
    )
    assert (agent.accelerator.scaler is not None) == (precision == "fp16")
    assert (agent.config.agent.optimizer == "laprop") == bool(optimizer)
    assert (agent.context is not None) == bool(optimizer)
    batch = _with_context(agent, make_batch({"state": STATE}, BOX))
    agent.update(batch)  # warm-up: optimizer states exist
    counted = count_dispatch(lambda: agent.update(batch))
    assert counted.ops > 1000 and counted.host_syncs == 0
    profiled = count_profiled(lambda: agent.update(batch))
    assert profiled.ops > 1000 and profiled.host_syncs == 0


def test_replay_context_write_back_reads_the_latents_on_the_host():
    """replay.context=1: after each update the loop (``Trainer.update``) writes the window's
    latents back into the replay, which copies them to the host: one counted read per latent
    (``deter``, ``stoch``, ``action``; on cuda each a device -> host copy, the first waiting
    for the update) and one of ``replay_index`` (a host tensor, counted since on cpu a host
    tensor cannot be told from a device one). The README's speed section states it."""
    agent = make({"state": STATE}, BOX, "agent.compile=false", *LAPROP_CONTEXT)
    replay = make_replay(capacity=200, batch_size=3, batch_length=10, context=1)
    fill(replay, Streams(2), 60)
    sampled = replay.sample()
    batch = _with_context(agent, make_batch({"state": STATE}, BOX))
    batch["replay_index"] = sampled["replay_index"]
    assert count_dispatch(lambda: agent.update(batch)).host_syncs == 0
    latents = agent.replay_latents()
    assert sorted(latents) == ["action", "deter", "stoch"]

    def write_back():
        replay.update_latents(batch["replay_index"], agent.replay_latents())

    assert count_dispatch(write_back).host_syncs == len(latents) + 1
    assert count_profiled(write_back).host_syncs == len(latents) + 1
    # The write happened: every step of the 3 windows holds a latent now.
    steps = {(s, t0 + t) for s, t0 in batch["replay_index"].tolist() for t in range(10)}
    assert replay._latent_valid.sum() == len(steps) > 0


def test_the_counters_see_a_sync():
    x = torch.ones(3)
    assert count_dispatch(lambda: float(x.sum())).host_syncs == 1
    assert count_profiled(lambda: x.sum().item()).host_syncs == 1
    assert count_profiled(lambda: x + 1).host_syncs == 0


def test_compile_auto_resolves_by_device_and_run_length():
    def config(*extra):
        return build_config(["agent=dreamer", "accelerator=cpu", *extra])

    assert resolve_compile(config("agent.compile=true")) is True
    assert resolve_compile(config("agent.compile=false"), 10**6) is False
    # auto on cpu: only a run long enough to repay the cold compile.
    assert resolve_compile(config(), 10) is False
    assert resolve_compile(config(), 10**6) is True
    assert resolve_compile(config(), None) is False
    assert resolve_compile(build_config(["accelerator=ipu-sim"]), 10**6) is False
    with pytest.raises(ValueError, match="agent.compile=true cannot compile world_model.greedy"):
        make({"state": STATE}, BOX, "agent.compile=true", "world_model.greedy_infomax.modules=1")


def _losses(metrics):
    return {k: float(v) for k, v in metrics.items()}


# Current DreamerV3's options together: one LaProp step of all losses (the replay value loss's
# gradient crossing from the behaviour graph into the world model's), from stored contexts.
DV3_OPTIONS = (
    "agent.optimizer=laprop",
    "agent.warmup=0",
    "agent.replay_critic_grad_wm=true",
    "agent.imagine_start_continue=true",
    "replay.context=1",
)


@pytest.mark.parametrize(
    "obs, action_space, extra",
    # Cold compiles on a 2-core CI machine: about 2 minutes (states), 1.5-4 (pixels).
    [
        pytest.param({"state": STATE}, BOX, (), marks=pytest.mark.slow),
        pytest.param({"pixels": PIXELS}, DISCRETE, (), marks=pytest.mark.slow),
        pytest.param({"state": STATE}, BOX, DV3_OPTIONS, marks=pytest.mark.slow),
    ],
    ids=["states-box", "pixels-discrete", "states-laprop-context"],
)
def test_compiled_update_equals_eager_and_round_trips(obs, action_space, extra):
    """``agent.compile=true`` builds each step as one graph (``fullgraph=True``: a graph break
    is an error) and computes what eager computes on the same batch and seed: on cpu the
    compiled graph draws its random numbers through torch's generator, as eager does."""
    torch._dynamo.reset()
    # Short unrolls keep the cold compile of this test near a minute on CI.
    batch = make_batch(obs, action_space, B=2, T=4)
    if "replay.context=1" in extra:  # a stored state for the first window, none for the second
        batch["context_valid"] = torch.tensor([1.0, 0.0])
        batch["replay_index"] = torch.zeros(2, 2, dtype=torch.long)
        batch["context/deter"] = torch.rand(2, 32)
        batch["context/stoch"] = torch.nn.functional.one_hot(torch.arange(4) % 4, 4)[None]
        batch["context/stoch"] = batch["context/stoch"].float().expand(2, 4, 4).clone()
        batch["context/action"] = torch.rand(2, 2)
    results = {}
    for choice in ("false", "true"):
        agent = make(obs, action_space, f"agent.compile={choice}", "agent.horizon=3", *extra)
        assert agent.compiled == (choice == "true")
        history = []
        for step in range(2):
            torch.manual_seed(step)
            history.append(_losses(agent.update(batch)))
        results[choice] = (agent, history)
    eager_agent, eager = results["false"]
    compiled_agent, compiled = results["true"]
    for eager_metrics, compiled_metrics in zip(eager, compiled):
        assert eager_metrics.keys() == compiled_metrics.keys()
        for key, value in eager_metrics.items():
            assert compiled_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for key, value in eager_agent.state_dict()["weights"].items():
        torch.testing.assert_close(
            compiled_agent.state_dict()["weights"][key], value, rtol=1e-4, atol=1e-5
        )

    if eager_agent.context is not None:  # the write-back latents of the last update agree too
        latents = compiled_agent.replay_latents()
        for key, value in eager_agent.replay_latents().items():
            torch.testing.assert_close(latents[key], value, rtol=1e-4, atol=1e-5)

    # Checkpoints are unchanged by compiling: an eager agent resumes the compiled one's state
    # and both continue identically.
    buffer = io.BytesIO()
    torch.save(compiled_agent.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = make(obs, action_space, "agent.compile=false", "agent.horizon=3", *extra)
    resumed.load_state_dict(state)
    assert resumed.updates == compiled_agent.updates == 2
    torch.manual_seed(7)
    after_compiled = _losses(compiled_agent.update(batch))
    torch.manual_seed(7)
    after_resumed = _losses(resumed.update(batch))
    for key, value in after_resumed.items():
        assert after_compiled[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_compiled_sparse_update_equals_eager_without_recompiling_on_topology_steps(monkeypatch):
    """Sparse masks (world model and actor-critic, RigL every 2 updates, the compressed
    kernel) under ``agent.compile=true``: the same losses, weights and masks as eager through
    two topology updates; the armed updates run eagerly, and a topology step rebuilds no
    graph."""
    from torch._dynamo.utils import counters

    from imagine_rl.sparse import kernels

    monkeypatch.setattr(kernels, "_MIN_ROWS", [0])  # the compressed kernel at this tiny batch
    torch._dynamo.reset()
    obs = {"state": STATE}
    batch = make_batch(obs, BOX, B=2, T=4)
    sparse = (
        "sparse.enabled=true",
        "sparse.behaviour=true",
        "sparse.method=rigl",
        "sparse.update_every=2",
        "sparse.block=4",
        "sparse.balanced=true",
        "sparse.fast_path=on",
        "agent.horizon=3",
    )
    results = {}
    for choice in ("false", "true"):
        agent = make(obs, BOX, f"agent.compile={choice}", *sparse)
        assert agent.compiled == (choice == "true")
        history, graphs, before = [], [], counters["stats"]["unique_graphs"]
        for step in range(5):
            torch.manual_seed(step)
            history.append(_losses(agent.update(batch)))
            graphs.append(counters["stats"]["unique_graphs"] - before)
        results[choice] = (agent, history, graphs)
    eager_agent, eager, _ = results["false"]
    compiled_agent, compiled, graphs = results["true"]
    for agent in (eager_agent, compiled_agent):
        assert agent.sparsifier.sparse_layers[0].kernel == "balanced-bsr-bmm"
        assert agent.behaviour_sparsifier.sparse_layers[0].kernel == "balanced-bsr-bmm"
    assert compiled_agent.sparsifier.metrics()["sparse/updates"] == 2
    assert compiled_agent.behaviour_sparsifier.metrics()["sparse/updates"] == 2
    # Update 1 compiles the two graphs (world-model step, behaviour step); the armed updates
    # (2 and 4) run eagerly, and after their topology steps the same two graphs serve again.
    assert graphs == [2] * 5, graphs
    for eager_metrics, compiled_metrics in zip(eager, compiled):
        for key, value in eager_metrics.items():
            assert compiled_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for sparsifier in ("sparsifier", "behaviour_sparsifier"):
        theirs = getattr(eager_agent, sparsifier).masks()
        for name, mask in getattr(compiled_agent, sparsifier).masks().items():
            assert torch.equal(mask, theirs[name]), name
    for key, value in eager_agent.state_dict()["weights"].items():
        torch.testing.assert_close(
            compiled_agent.state_dict()["weights"][key], value, rtol=1e-4, atol=1e-5
        )


def test_bench_reports_ops_and_syncs_per_update(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    script = "scripts/bench_train_step.py"
    args = ["preset=debug", "env=gym:Pendulum-v1", "accelerator.threads=1"]
    run = subprocess.run(
        [
            sys.executable,
            script,
            *args,
            "compile=false",
            "updates=2",
            "warmup=1",
            "parts=true",
            f"json={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    update = result["update"]
    assert update["compiled"] is False and update["compile_seconds"] == 0.0
    assert update["host_syncs_per_update"] == 0 and update["aten_ops_per_update"] > 1000
    assert result["seconds_per_update"] == update["seconds_per_update"] > 0
    # parts=true: the world-model and behaviour steps, each on both clocks, and the top ops.
    assert set(update["parts"]) == {
        f"{part}_{clock}_seconds"
        for part in ("world_model", "behaviour")
        for clock in ("wall", "cpu")
    }
    assert all(value > 0 for value in update["parts"].values())
    assert len(update["top_ops"]) == 15 and update["top_ops"][0]["calls"] >= 1
    bad = subprocess.run(
        [sys.executable, script, *args, "compile=sometimes"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "compile: expected one of both" in bad.stderr
