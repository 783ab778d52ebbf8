"""The accelerator interface: placement, precision policies, backward/clip/step, config rules."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from imagine_rl.agents.registry import make_agent
from imagine_rl.runtime.accelerator import (
    Accelerator,
    accelerator_names,
    make_accelerator,
    register_accelerator,
    resolve_device,
    resolve_precision,
)
from imagine_rl.runtime.config import ConfigError, build_config

torch.set_num_threads(1)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _norm(model: nn.Module) -> torch.Tensor:
    return torch.stack([p.grad.norm() for p in model.parameters()]).norm()


def _model_and_loss(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(32, 8)
    return model, x


def test_backward_returns_the_norm_and_clips():
    model, x = _model_and_loss()
    ref, _ = _model_and_loss()
    acc = Accelerator("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norm = acc.backward((model(x) ** 2).mean() * 100, opt, clip=0.5)
    (ref(x) ** 2).mean().mul(100).backward()
    expected = _norm(ref)
    assert torch.allclose(norm, expected)
    clipped = _norm(model)
    assert norm > 0.5 and torch.allclose(clipped, torch.tensor(0.5), atol=1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    acc.step(opt)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_backward_with_params_leaves_other_gradients_alone():
    model, x = _model_and_loss()
    acc = Accelerator("cpu")
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = torch.optim.SGD(second, lr=0.1)
    norm = acc.backward((model(x) ** 2).mean(), opt, params=second)
    assert all(p.grad is None for p in first)
    assert all(p.grad is not None for p in second) and norm > 0


def test_fp16_scaler_unscales_before_the_norm():
    model, x = _model_and_loss()
    ref, _ = _model_and_loss()
    acc = Accelerator("cpu", "fp16")
    assert acc.scaler is not None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with acc.train_step():
        norm = acc.backward((model(x) ** 2).mean(), opt)
        acc.step(opt)
    (ref(x) ** 2).mean().backward()
    expected = _norm(ref)
    assert torch.allclose(norm, expected, rtol=1e-4)
    with acc.autocast():
        assert model(x).dtype == torch.float16


def test_bf16_autocast_and_fp32_nothing():
    x = torch.randn(4, 4)
    with Accelerator("cpu", "bf16").autocast():
        assert (x @ x).dtype == torch.bfloat16
    with Accelerator("cpu", "fp32").autocast():
        assert (x @ x).dtype == torch.float32


def test_placement_compile_seed_and_memory():
    acc = Accelerator("cpu")
    tree = acc.to_device({"a": torch.zeros(2), "b": [torch.ones(1), 3]})
    assert tree["a"].device.type == "cpu" and tree["b"][1] == 3
    fn = lambda t: t + 1  # noqa: E731
    assert acc.compile(fn) is fn
    acc.seed(5)
    a = torch.rand(3)
    acc.seed(5)
    assert torch.equal(a, torch.rand(3))
    assert acc.memory_stats()["host_max_rss_mib"] > 0
    assert acc.metrics() == {} and acc.report() == {}


def test_config_names_and_precision_rules():
    config = build_config(["accelerator=ipu-sim", "preset=debug"])
    assert config.accelerator.name == "ipu-sim" and config.ipu.preset == "ipu2"
    assert resolve_device(config.accelerator).type == "cpu"
    assert config.accelerator.precision == "auto" and resolve_precision(config) == "fp32"
    for name in ("cpu", "ipu-sim"):
        for precision in ("fp32", "fp16"):
            config = build_config([f"accelerator={name}", f"accelerator.precision={precision}"])
            assert resolve_precision(config) == precision
    assert resolve_precision(build_config(["accelerator.precision=bf16", "preset=debug"])) == "bf16"
    assert resolve_precision(build_config(["preset=debug"])) == "fp32"  # auto
    for args, words in (
        (["accelerator=ipu-sim", "accelerator.precision=bf16"], "the IPU has no bf16: use "),
        (["accelerator=ipu-sim", "agent.compile=true"], "agent.compile"),
        (["accelerator=ipu_sim", "preset=debug"], "did you mean .ipu-sim."),
        (["ipu.preset=ipu3"], "ipu.preset"),
    ):
        with pytest.raises(ConfigError, match=words):
            build_config(args)


def test_ipu_sim_refuses_bf16_in_one_line():
    for args in (
        ["accelerator=ipu-sim", "accelerator.precision=bf16"],
        {"accelerator": "ipu-sim", "accelerator.precision": "bf16"},  # an experiment file's
    ):
        with pytest.raises(ConfigError) as info:
            build_config(args)
        assert str(info.value) == (
            "accelerator.precision=bf16 with accelerator=ipu-sim: the IPU has no bf16: use "
            "accelerator.precision=fp16 or fp32"
        )


@pytest.mark.parametrize("precision", ["auto", "fp32", "fp16"])
def test_ipu_sim_device_runs_the_accelerator_precision(precision):
    """The simulated IPU's own precision comes from accelerator.precision (auto: fp32)."""
    config = build_config(
        ["accelerator=ipu-sim", f"accelerator.precision={precision}", "preset=debug"]
    )
    acc = make_accelerator(config)
    expected = "fp32" if precision == "auto" else precision
    assert acc.name == "ipu-sim" and acc.precision == expected
    assert acc.half == (expected == "fp16") and (acc.scaler is not None) == acc.half


def test_make_accelerator_kinds():
    cpu = make_accelerator(build_config(["accelerator=cpu", "preset=debug"]))
    assert type(cpu) is Accelerator and cpu.name == "cpu"
    sim = make_accelerator(build_config(["accelerator=ipu-sim", "preset=debug"]))
    assert sim.name == "ipu-sim" and sim.device.type == "cpu"


def test_accelerators_are_looked_up_by_name(monkeypatch):
    import imagine_rl.runtime.accelerator as registry

    assert accelerator_names() == ("auto", "cpu", "cuda", "ipu-sim")
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    config = build_config(["accelerator=cpu", "preset=debug"])
    config.accelerator.name = "tpu"
    with pytest.raises(ConfigError, match="unknown accelerator 'tpu'; use one of auto, cpu, cuda"):
        make_accelerator(config)
    built = []
    register_accelerator("tpu", lambda cfg, updates: built.append(updates) or Accelerator())
    assert type(make_accelerator(config, 7)) is Accelerator and built == [7]
    with pytest.raises(ValueError, match="'tpu' is already registered"):
        register_accelerator("tpu", lambda cfg, updates: Accelerator())


# --------------------------------------------------------------------------------------
# cuda (skipped without a GPU)
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
def test_cuda_bf16_tf32_and_measured_time():
    acc = make_accelerator(build_config(["accelerator=cuda", "preset=debug"]))
    assert acc.device.type == "cuda"
    assert torch.backends.cuda.matmul.allow_tf32  # fp32 matmuls on TF32 cores
    model = nn.Linear(64, 64).to(acc.device)
    opt = torch.optim.Adam(model.parameters())
    with acc.train_step():
        loss = model(torch.randn(32, 64, device=acc.device)).square().mean()
        acc.backward(loss, opt, clip=1.0)
        acc.step(opt)
    metrics = acc.metrics()
    assert metrics["perf/cuda/step_time_s"] > 0
    assert metrics["perf/cuda/max_memory_allocated_mib"] > 0
    bf16 = make_accelerator(build_config(["accelerator=cuda", "accelerator.precision=bf16"]))
    with bf16.autocast():
        assert model(torch.randn(2, 64, device=acc.device)).dtype == torch.bfloat16


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_dreamer_update(precision):
    config = build_config(
        ["accelerator=cuda", f"accelerator.precision={precision}", "preset=dreamer_debug"]
    )
    obs = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)})
    agent = make_agent(config, obs, gym.spaces.Box(-1.0, 1.0, (2,), np.float32))
    rng = np.random.default_rng(0)
    batch = {
        "state": torch.from_numpy(rng.normal(size=(3, 10, 5)).astype(np.float32)),
        "action": torch.from_numpy(rng.uniform(-1, 1, (3, 10, 2)).astype(np.float32)),
        "reward": torch.zeros(3, 10),
        "is_first": torch.zeros(3, 10),
        "is_last": torch.zeros(3, 10),
        "is_terminal": torch.zeros(3, 10),
    }
    batch["is_first"][:, 0] = 1
    for _ in range(2):
        metrics = agent.update(batch)
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss/"))
    assert metrics["perf/cuda/step_time_s"] > 0
