"""Adding an agent never means editing ``runtime/``: a toy agent defined here, with its own
config keys, presets-free defaults and checks, registers itself and trains with
``scripts/train.py agent=toy``."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

from imagine_rl.agents.base import ModelAgent
from imagine_rl.runtime import registry
from imagine_rl.runtime.config import ConfigError, at_least, build_config, config_class, load_yaml
from imagine_rl.runtime.optimizers import OptimizerPolicy, Part
from imagine_rl.runtime.registry import AgentEntry

ROOT = Path(__file__).resolve().parent.parent
from imagine_rl.scripts import train as train_script  # noqa: E402


@dataclass
class ToyAgentConfig:
    """``agent.*`` keys of the toy agent."""

    # Standard deviation of the exploration noise added to the linear policy.
    toy_noise: float = field(default=0.3, metadata=at_least(0))


@dataclass
class ToySection:
    """The ``toy`` section: a linear reward model trained by SGD."""

    lr: float = field(default=0.05, metadata=at_least(0))
    features: int = field(default=4, metadata=at_least(1))


class RewardModel(torch.nn.Module):
    """A linear reward model on fixed random features of the state: ``[..., D]`` -> ``[...]``."""

    def __init__(self, dim: int, features: int) -> None:
        super().__init__()
        self.register_buffer("features", torch.randn(dim, features))
        self.linear = torch.nn.Linear(features, 1)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(state @ self.features)).squeeze(-1)


class ToyAgent(ModelAgent):
    """Acts with noise; learns to predict the reward from the observation, reporting
    ``loss/reward``. ``ModelAgent`` brings the accelerator, checkpoints and the act wrapper;
    ``OptimizerPolicy`` the optimizer (an Adam for the one part)."""

    def __init__(self, config: Any, obs_space: gym.spaces.Dict, action_space: gym.Space) -> None:
        super().__init__(config)
        torch.manual_seed(config.seed)
        self.action_space, self.noise = action_space, config.agent.toy_noise
        self.model = RewardModel(obs_space["state"].shape[0], config.toy.features)
        part = Part(list(self.model.parameters()), lr=config.toy.lr, eps=1e-8)
        self.optimizer_policy = OptimizerPolicy(self.accelerator, {"world_model": part})
        self.rng = np.random.default_rng(config.seed)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"world_model": self.model}  # the checkpoint's weight-key prefixes

    def initial_state(self, batch_size: int) -> None:
        return None

    def _act(self, obs, state, explore, n):
        shape = (n, *self.action_space.shape)
        noise = self.rng.normal(0, self.noise, shape) if explore else np.zeros(shape)
        return np.clip(noise, -1, 1).astype(np.float32), state

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The reward received on arriving at a step, predicted from that step's observation.
        loss = (self.model(batch["state"].float()) - batch["reward"].float()).square().mean()
        metrics = self.optimizer_policy.step(loss, ["world_model"])
        return {"loss/reward": loss.detach(), **metrics}


def _validate(config: Any) -> None:
    if config.agent.name == "toy" and config.env.obs != "state":
        raise ConfigError("agent=toy reads state vectors: set env.obs=state")


TOY = AgentEntry(
    name="toy",
    make=ToyAgent,
    agent_fields=ToyAgentConfig,
    sections={"toy": ToySection},
    validate=_validate,
)


@pytest.fixture
def toy():
    with registry.registered(TOY):
        yield TOY


def test_the_toy_agent_brings_its_config(toy):
    config = build_config(["agent=toy", "toy.features=6", "agent.toy_noise=0.1"])
    assert config.toy.features == 6 and config.agent.toy_noise == 0.1
    # The shared keys and the other agents' keys are all still there.
    assert config.agent.compile == "auto" and hasattr(config, "world_model")
    with pytest.raises(ConfigError, match=r"^toy.features: must be >= 1, got 0$"):
        build_config(["agent=toy", "toy.features=0"])
    with pytest.raises(ConfigError, match="did you mean toy.features"):
        build_config(["agent=toy", "toy.feature=3"])
    with pytest.raises(ConfigError, match="agent=toy reads state vectors"):
        build_config(["agent=toy", "env.obs=pixels"])


def test_an_unregistered_agent_and_its_section_are_gone():
    with pytest.raises(ConfigError, match="unknown agent 'toy'"):
        build_config(["agent=toy"])
    with registry.registered(TOY):
        assert "toy" in {f.name for f in dataclasses.fields(config_class())}
    assert "toy" not in {f.name for f in dataclasses.fields(config_class())}


def test_registering_twice_or_a_shared_section_is_refused(toy):
    with pytest.raises(ValueError, match="already registered"):
        registry.register_agent(AgentEntry(name="toy", make=ToyAgent))
    clash = AgentEntry(name="toy2", make=ToyAgent, sections={"toy": dict})
    with pytest.raises(ValueError, match="already owned by agent 'toy'"):
        registry.register_agent(clash)


def test_train_script_trains_the_toy_agent(toy, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = train_script.main(
        [
            "agent=toy",
            "preset=debug",
            "env=gym:Pendulum-v1",
            f"run.dir={run_dir}",
            "run.steps=600",
            "run.learning_starts=100",
            "run.replay_ratio=32",
            "run.log_every=100",
            "run.eval_every=600",
            "run.eval_episodes=1",
            "run.checkpoint_every=600",
            "run.video=false",
            "env.action_repeat=1",
            "env.time_limit=100",
            "toy.lr=0.1",
            "logging.wandb=false",
            "logging.console=false",
        ]
    )
    assert code == 0, capsys.readouterr().err
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["agent"]["name"] == "toy" and saved["toy"]["lr"] == 0.1
    assert load_yaml(run_dir / "config.yaml").toy.lr == 0.1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss/reward"] for row in rows if "loss/reward" in row]
    assert len(losses) >= 4
    assert losses[-1] < losses[0]  # the reward model learns
    assert any("eval/return_mean" in row for row in rows)
    assert (run_dir / "checkpoints" / "step_600").is_dir()


def test_no_agent_name_in_the_runtime_or_train_script():
    """The runtime knows agents only through the registry."""
    from imagine_rl import agents  # noqa: F401 - registers the built-in agents

    names = registry.agent_names()
    files = [*ROOT.glob("runtime/**/*.py"), *ROOT.glob("runtime/**/*.yaml")]
    files.append(ROOT / "scripts" / "train.py")
    found = []
    for path in files:
        text = path.read_text()
        for name in names:
            quoted = rf"(agent=|agent\.name=|[\"']){re.escape(name)}\b"
            word = rf"\b{re.escape(name)}\b" if name != "random" else quoted
            for pattern in {quoted, word}:
                for match in re.finditer(pattern, text):
                    line = text.count("\n", 0, match.start()) + 1
                    found.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not found, "agent names outside the agents package:\n" + "\n".join(sorted(set(found)))
