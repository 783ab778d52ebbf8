"""Data-parallel training on torch.distributed: 2 CPU processes (gloo) launched inside the test.

Each worker is a spawned process that sets the variables torchrun would set and runs the real
loop (``runtime.loop.train``) with a tiny Dreamer (``preset=debug``) on the counting toy env.
Results come back as files in ``tmp_path``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
from toy_env import make_counting_vector_env

from imagine_rl.runtime import distributed
from imagine_rl.runtime.checkpoint import list_checkpoints, load_checkpoint
from imagine_rl.runtime.config import build_config
from imagine_rl.runtime.logging import make_logger
from imagine_rl.runtime.loop import train

WORLD = 2
# Extra overrides for a run of this file on a GPU machine, e.g. "accelerator=cuda" (gloo moves
# cuda tensors too, so both ranks may share one GPU).
EXTRA = os.environ.get("IMAGINE_RL_DIST_TEST_ARGS", "").split()
# Global env steps: 2 ranks x 1 env x action repeat 2 = 4 per lockstep vector step.
STEPS, RESUMED_STEPS = 160, 200


def _config(run_dir: Path, *extra: str):
    return build_config(
        [
            "preset=debug",
            f"run.dir={run_dir}",
            f"run.steps={STEPS}",
            "run.learning_starts=40",
            "run.replay_ratio=4",
            "run.eval_every=80",
            "run.eval_episodes=1",
            "run.video=false",
            "run.checkpoint_every=80",
            "run.log_every=40",
            "env.num_envs=1",
            "replay.batch_size=2",
            "replay.batch_length=8",
            "replay.chunk_size=16",
            "accelerator=cpu",
            "logging.wandb=false",
            "logging.console=false",
            "distributed.timeout=120",
            *EXTRA,
            *extra,
        ]
    )


class _Pieces:
    """The factories ``train`` takes, as ``scripts/train.py`` builds them (rank-aware replay)."""

    def __init__(self, config, run_dir: Path, crash_at: int | None = None) -> None:
        self.config, self.run_dir, self.crash_at = config, run_dir, crash_at
        self.agent = None
        self.env_seed: int | None = None

    def make_env(self, mode, num_envs, seed):
        if mode == "train":
            self.env_seed = seed
        crash = self.crash_at if mode == "train" else None
        return make_counting_vector_env(num_envs, seed, crash_at=crash)

    def make_agent(self, obs_space, action_space):
        from imagine_rl import agents

        self.agent = agents.make_agent(self.config, obs_space, action_space)
        return self.agent

    def make_replay(self):
        from imagine_rl.runtime.factories import make_replay_factory

        return make_replay_factory(self.config, self.run_dir)()

    def run(self, checkpoint=None):
        logger = make_logger(self.config, self.run_dir)  # every rank gets one; rank 0 uses it
        try:
            return train(
                self.config,
                self.make_env,
                self.make_agent,
                self.make_replay,
                logger,
                self.run_dir,
                checkpoint=checkpoint,
            )
        finally:
            logger.close()


# --------------------------------------------------------------------------------------
# Workers (module-level so the spawn start method can import them)
# --------------------------------------------------------------------------------------


def _entry(target, rank: int, world: int, port: int, out: str, *args) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        target(rank, Path(out), *args)
    except BaseException as error:
        record = {"type": type(error).__name__, "message": str(error)}
        record["peer_failure"] = distributed.is_peer_failure(error)
        record["traceback"] = traceback.format_exc()
        (Path(out) / f"error_{rank}.json").write_text(json.dumps(record))
        raise SystemExit(1) from None


def _train_worker(rank: int, out: Path, run_dir: str) -> None:
    import imagine_rl.runtime.loop as loop
    from imagine_rl.runtime.accelerator import seed_everything

    saving = loop.save_checkpoint

    def recorded_save(*args, **kwargs):
        (out / f"saved_by_rank{rank}_{time.monotonic_ns()}").touch()
        return saving(*args, **kwargs)

    loop.save_checkpoint = recorded_save
    config = _config(Path(run_dir))
    with distributed.session("gloo", config.distributed.timeout) as ctx:
        seed_everything(distributed.rank_seed(config.seed, ctx.rank))
        pieces = _Pieces(config, Path(run_dir))
        summary = pieces.run()
        state = pieces.agent.state_dict()
    optimizer_tensors = {
        f"{name}.{index}.{key}": value
        for name, opt in state["optimizers"].items()
        for index, slots in opt["state"].items()
        for key, value in slots.items()
        if isinstance(value, torch.Tensor)
    }
    torch.save(
        {"weights": state["weights"], "optimizers": optimizer_tensors}, out / f"state_{rank}.pt"
    )
    summary["env_seed"] = pieces.env_seed
    (out / f"summary_{rank}.json").write_text(json.dumps(summary))


def _mismatch_worker(rank: int, out: Path) -> None:
    with distributed.session("gloo", 60):
        config = {"run": {"steps": 100 + rank, "dir": "runs/x"}, "seed": 0}
        distributed.check_same_config(config)


def _failing_worker(rank: int, out: Path, run_dir: str) -> None:
    config = _config(Path(run_dir), "run.steps=100000", "run.eval_episodes=0")
    from imagine_rl.runtime.accelerator import seed_everything

    seed_everything(distributed.rank_seed(config.seed, rank))
    try:
        with distributed.session("gloo", config.distributed.timeout):
            # Rank 1's env crashes a few steps into learning; rank 0 trains on.
            _Pieces(config, Path(run_dir), crash_at=30 if rank == 1 else None).run()
    except Exception:
        if rank == 1:
            # Stay alive (the test kills it): only the session's teardown can release rank 0.
            (out / "rank1_failed").touch()
            time.sleep(600)
        raise


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(target, out: Path, *args, wait_for: tuple[int, ...] = (0, 1), timeout: float = 120):
    """Start ``WORLD`` spawned ranks; wait for ranks ``wait_for``; kill whatever remains.
    Returns the exit codes (None: still running when killed)."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_entry, args=(target, rank, WORLD, port, str(out), *args))
        for rank in range(WORLD)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    try:
        for rank in wait_for:
            processes[rank].join(max(0.0, deadline - time.monotonic()))
        return [p.exitcode for p in processes]
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)


def _errors(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.glob("error_*.json")))


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_two_ranks_train_identically_and_resume_with_one(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    codes = _launch(_train_worker, out, str(run_dir))
    assert codes == [0, 0], _errors(out)

    summaries = [json.loads((out / f"summary_{r}.json").read_text()) for r in range(WORLD)]
    counters = [s["counters"] for s in summaries]
    for c in counters:
        c.pop("wall_seconds")  # each rank's own clock
        c.pop("update_seconds")  # likewise
    # Global counters: the same on both ranks, and the sum of what each rank stepped.
    assert counters[0] == counters[1]
    assert counters[0]["env_steps"] == STEPS == sum(s["local_env_steps"] for s in summaries)
    assert counters[0]["policy_steps"] == STEPS // 2  # action_repeat 2
    # Learning starts after 40 global env steps (vector step 11 of 40 per rank); an update
    # replays one 2 x 8 batch per rank, at 4 replayed steps per global policy step.
    assert counters[0]["learn_policy_steps"] == 2 * (40 - 10)
    assert counters[0]["updates"] == 60 * 4 // (2 * 8 * WORLD) > 0
    assert counters[0]["replayed_steps"] == counters[0]["updates"] * 2 * 8 * WORLD
    # Each rank stepped its own envs with its own seed.
    assert summaries[0]["env_seed"] != summaries[1]["env_seed"]

    # Parameters, buffers (return normaliser, slow critic) and Adam states: bit-identical.
    states = [torch.load(out / f"state_{r}.pt", weights_only=True) for r in range(WORLD)]
    for part in ("weights", "optimizers"):
        assert states[0][part].keys() == states[1][part].keys() and states[0][part]
        for key, value in states[0][part].items():
            assert torch.equal(value, states[1][part][key]), f"{part} {key} differs across ranks"
    assert float(states[0]["weights"]["return_norm.high"]) != 0.0  # the normaliser did move

    # Only rank 0 logged and wrote checkpoints.
    assert sorted(p.name.split("_")[2] for p in out.glob("saved_by_rank*")) == ["rank0", "rank0"]
    assert summaries[0]["checkpoint"] and summaries[1]["checkpoint"] is None
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_80", "step_160"]
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logs if "train/env_steps" in line] == [40, 80, 120, 160]

    # Resume that checkpoint in this (single) process and train a little further.
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.step == STEPS and checkpoint.train_state["world_size"] == WORLD
    config = _config(run_dir, f"run.steps={RESUMED_STEPS}")
    pieces = _Pieces(config, run_dir)
    summary = pieces.run(checkpoint=checkpoint)
    resumed = summary["counters"]
    assert summary["world_size"] == 1 and resumed["env_steps"] == RESUMED_STEPS
    # The clock stays exact across the change of world size: 20 more policy steps at ratio 4,
    # now one 2 x 8 batch per update.
    replayed = counters[0]["replayed_steps"]
    assert resumed["updates"] == counters[0]["updates"] + (80 * 4 - replayed) // 16
    assert resumed["replayed_steps"] == replayed + 16 * (
        resumed["updates"] - counters[0]["updates"]
    )
    assert load_checkpoint(run_dir).step == RESUMED_STEPS


def test_mismatched_configs_fail_on_every_rank_naming_the_key(tmp_path):
    codes = _launch(_mismatch_worker, tmp_path, timeout=60)
    assert codes == [1, 1]
    for rank in range(WORLD):
        error = json.loads((tmp_path / f"error_{rank}.json").read_text())
        assert error["type"] == "DistributedError"
        assert "run.steps: rank 0 has 100, rank 1 has 101" in error["message"]
        assert "run.dir" not in error["message"]


def test_a_failing_rank_stops_the_other(tmp_path):
    run_dir = tmp_path / "run"
    # Wait for rank 0 only, for less than distributed.timeout (120 s): rank 1 stays alive after
    # its failure (see _failing_worker), so only its session's teardown can stop rank 0 in time.
    codes = _launch(_failing_worker, tmp_path, str(run_dir), wait_for=(0,), timeout=60)
    assert codes[0] == 1, f"rank 0 did not stop: exit code {codes[0]}"
    assert (tmp_path / "rank1_failed").exists()
    error = json.loads((tmp_path / "error_0.json").read_text())
    assert error["peer_failure"], error


def test_single_process_helpers_are_no_ops():
    assert not distributed.context().enabled
    assert distributed.rank_seed(5) == 5
    assert distributed.rank_seed(5, rank=1) == 5 + distributed.RANK_SEED_STRIDE
    x = torch.arange(4.0)
    distributed.all_reduce_mean_([x])
    assert torch.equal(x, torch.arange(4.0))
    assert distributed.all_gather_cat(x) is x
    assert distributed.all_reduce_sums([1.0, 2.0]) == [1.0, 2.0]
    distributed.check_same_config({"a": 1})


def test_launch_errors_are_one_line(monkeypatch):
    with pytest.raises(distributed.DistributedError, match="nccl needs the cuda accelerator"):
        distributed.resolve_backend("nccl", "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(distributed.DistributedError, match="launch with torchrun"):
        distributed.init_distributed()


def test_rigl_grows_where_the_reduced_dense_gradient_points():
    # Data-parallel RigL: the sparsifier scores the gradient its grad_reduce returns (the mean
    # over ranks in training), not this process's own.
    from imagine_rl.sparse import SparseConfig, sparsify

    lin = torch.nn.Linear(6, 2, bias=False)
    config = SparseConfig(
        density=4 / 12,
        method="rigl",
        distribution="uniform",
        update_every=1,
        drop_fraction=0.5,
        drop_schedule="constant",
        stop_fraction=1.0,
        total_steps=1000,
        fast_path="off",
    )
    sparsifier = sparsify(lin, config)
    (layer,) = sparsifier.sparse_layers
    mask = torch.zeros(2, 6)
    mask.view(-1)[[0, 1, 2, 3]] = 1
    layer.p.mask.copy_(mask)
    with torch.no_grad():
        layer.original.copy_(torch.tensor([[0.1, -5.0, 0.2, 3.0, 0, 0], [0, 0, 0, 0, 0, 0]]))
    local = torch.ones(2, 6)  # this process's gradient prefers no position
    mean = torch.zeros(2, 6)
    mean.view(-1)[[8, 11]] = torch.tensor([4.0, -3.0])
    seen = []

    def reduce(grad):
        seen.append(grad.clone())
        return mean

    sparsifier.grad_reduce = reduce
    (lin.weight * local).sum().backward()
    sparsifier.step()
    assert len(seen) == 1 and torch.equal(seen[0], local)
    # Drops the two smallest active weights (positions 0 and 2), grows the reduced top-2.
    assert (layer.p.mask.view(-1) != 0).nonzero().flatten().tolist() == [1, 3, 8, 11]
