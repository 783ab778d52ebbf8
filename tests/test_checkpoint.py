"""Checkpoints: exact round trip, pruning, run-dir resolution and refusal of bad files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from imagine_rl.runtime.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from imagine_rl.runtime.config import Config, to_dict
from imagine_rl.runtime.replay import SequenceReplay


def trained_state(seed: int = 0) -> tuple[dict, dict]:
    """An agent state (weights + Adam state) and a train state with RNG states."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
    weights = dict(model.state_dict())
    # Shared storage and a non-contiguous view: safetensors refuses both unless copied.
    weights["tied"] = weights["0.weight"]
    weights["transposed"] = weights["2.weight"].t()
    agent = {"weights": weights, "optimizer": optimizer.state_dict(), "updates": 3}
    generator = np.random.default_rng(seed)
    generator.random(3)
    train = {
        "counters": {"env_steps": 100, "updates": 3},
        "rng": {"torch": torch.get_rng_state(), "numpy": generator.bit_generator.state},
    }
    return agent, train


def assert_equal(a, b) -> None:
    """Deep equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    else:
        assert a == b


def save(run_dir: Path, step: int, **kwargs) -> Path:
    agent, train = trained_state(step)
    return save_checkpoint(run_dir, step, to_dict(Config()), agent, train, **kwargs)


def rewrite_manifest_hash(ckpt: Path, name: str) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_is_exact(tmp_path: Path):
    agent, train = trained_state()
    config = to_dict(Config())
    path = save_checkpoint(tmp_path, 100, config, agent, train)
    assert path == tmp_path / "checkpoints" / "step_100"
    loaded = load_checkpoint(path)
    assert loaded.step == 100 and loaded.path == path and loaded.config == config
    assert loaded.replay_path is None
    assert_equal(loaded.agent_state, agent)
    assert_equal(loaded.train_state, train)
    # The restored states are usable as such.
    generator = np.random.default_rng()
    generator.bit_generator.state = loaded.train_state["rng"]["numpy"]
    torch.set_rng_state(loaded.train_state["rng"]["torch"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model.load_state_dict({k: v for k, v in loaded.agent_state["weights"].items() if "." in k})
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(loaded.agent_state["optimizer"])

    manifest = loaded.manifest
    assert manifest["format_version"] == 1 and manifest["step"] == 100
    assert set(manifest["files"]) == {"weights.safetensors", "train_state.pt"}
    versions = manifest["versions"]
    assert {"torch", "numpy", "gymnasium", "mujoco", "dm-control", "imagine-rl"} <= set(versions)
    assert versions["numpy"] == np.__version__
    assert manifest["created"].endswith("+00:00")


def test_replay_is_saved_with_the_checkpoint(tmp_path: Path):
    replay = SequenceReplay(64, 2, 4, chunk_size=8, directory=tmp_path / "replay")
    for t in range(45):
        replay.add(
            {
                "state": np.full((2, 3), t, np.float32),
                "is_first": np.full(2, t == 0),
                "reward": np.zeros(2, np.float32),
            }
        )
    path = save(tmp_path, 90, replay=replay)
    loaded = load_checkpoint(tmp_path)
    assert loaded.replay_path == path / "replay.npz"
    assert "replay.npz" in loaded.manifest["files"]
    restored = SequenceReplay(64, 2, 4, chunk_size=8, directory=tmp_path / "replay")
    restored.load(loaded.replay_path)
    assert len(restored) == len(replay) and restored.inserted == replay.inserted
    x, y = replay.sample(), restored.sample()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_keep_prunes_old_checkpoints_and_updates_latest(tmp_path: Path):
    for step in (10, 20, 30, 40, 100):
        save(tmp_path, step, keep=3)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_30", "step_40", "step_100"]  # numeric, not lexical, order
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_100"
    assert load_checkpoint(tmp_path).step == 100
    # A resumed run saving a lower step keeps it (it is the newest) and points latest at it.
    save(tmp_path, 35, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_35", "step_100"]
    assert load_checkpoint(tmp_path).step == 35
    # No temp dirs are left behind.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step_100",
        "step_35",
    ]


def test_saving_the_same_step_replaces_it(tmp_path: Path):
    save(tmp_path, 50)
    agent, train = trained_state(7)
    save_checkpoint(tmp_path, 50, {"seed": 7}, agent, train)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == {"seed": 7}
    assert_equal(loaded.agent_state, agent)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_50"]


def test_resolves_run_dir_checkpoints_dir_and_stale_latest(tmp_path: Path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    root = tmp_path / "checkpoints"
    assert load_checkpoint(root).step == 20
    assert load_checkpoint(root / "step_10").step == 10
    # latest names a checkpoint that is gone: fall back to the newest valid one.
    (root / "latest").write_text("step_30\n")
    with pytest.warns(UserWarning, match="names no valid checkpoint"):
        assert load_checkpoint(tmp_path).step == 20
    # No latest and the newest one without a manifest (a half-written dir): skip it.
    (root / "latest").unlink()
    (root / "step_20" / "manifest.json").unlink()
    assert load_checkpoint(tmp_path).step == 10


def test_missing_checkpoint_is_explained(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*checkpoints/step_<N>"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path)  # exists but holds no checkpoints
    assert list_checkpoints(tmp_path) == []


def test_truncated_weights_are_refused(tmp_path: Path):
    save(tmp_path, 10)
    path = save(tmp_path, 20)
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert "weights.safetensors" in message and "corrupt" in message and "step_10" in message


def test_tampered_file_is_refused(tmp_path: Path):
    path = save(tmp_path, 10)
    weights = bytearray((path / "weights.safetensors").read_bytes())
    weights[-1] ^= 0x01  # same size, different content
    (path / "weights.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors does not match its sha256"):
        load_checkpoint(path)
    save(tmp_path, 20)
    (tmp_path / "checkpoints" / "step_20" / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"train_state\.pt is missing.*step_10"):
        load_checkpoint(tmp_path)


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: the file appears iff code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_executed(tmp_path: Path):
    path = save(tmp_path, 10)
    marker = tmp_path / "pwned"
    # Plain pickle via torch.save with the payload inside the train state.
    torch.save({"agent": {}, "train": {"x": _Payload(str(marker))}}, path / "train_state.pt")
    assert not marker.exists()
    rewrite_manifest_hash(path, "train_state.pt")  # so only the unpickling can stop it
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)
    assert not marker.exists()


def test_newer_format_and_bad_manifest_are_refused(tmp_path: Path):
    path = save(tmp_path, 10)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 2
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="written by a newer imagine-rl"):
        load_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid manifest"):
        load_checkpoint(path)


def test_state_that_needs_pickle_is_refused_at_save(tmp_path: Path):
    agent, train = trained_state()
    train["bad"] = object()
    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(tmp_path, 10, {}, agent, train)
    assert list_checkpoints(tmp_path) == []
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(CheckpointError, match="flat dict"):
        save_checkpoint(tmp_path, 10, {}, {"weights": {"a": {"b": torch.ones(1)}}}, {})


def test_stale_temp_dir_of_a_dead_process_is_removed(tmp_path: Path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    dead = os.getpid() + 10_000_000  # beyond pid_max: no such process
    (root / f".tmp-step_5-{dead}").mkdir()
    save(tmp_path, 10)
    assert not (root / f".tmp-step_5-{dead}").exists()
