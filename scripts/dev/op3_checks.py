"""Research checks of the OP3-like agent (scripts, not tests).

``python scripts/dev/op3_checks.py check=ari json=ari.json [minutes=25] [checkpoint=<dir>]``:
segmentation quality. Without ``checkpoint=``, the slot world model of ``preset=op3`` (plus
any ``op3.<key>=value`` given here) is trained from scratch on single frames of random
interactions with ``env=`` (``episodes`` episodes: the first frame, the goal image and
``steps`` frames after random actions each), ``batch`` frames an update, for ``updates``
updates or until ``minutes`` of training have passed. The foreground ARI of the slot masks
(argmax over slots, at the env's 64 x 64) against the ground-truth block masks is measured on
``test_scenes`` held-out scenes (first frames of episodes with other seeds) every
``eval_every`` updates, and for the untrained model (``ari_untrained``: what the colour-seeded
slot initialisation and the spatial prior give before any learning). ``save=<dir>`` writes
the trained agent as a checkpoint that ``evaluate.py`` and ``check=planning`` accept. With
``checkpoint=`` (a run directory or checkpoint of ``train.py agent=op3``) only the held-out
ARI of that model is measured.

``python scripts/dev/op3_checks.py check=planning json=plan.json [checkpoint=<dir>]``: success
rate on ``env=`` (``blocks:push-3``) over ``episodes`` episodes (the same seeds for every
planner) of three planners: ``random`` (uniform actions), ``oracle`` (CEM with the true
simulator: every candidate is rolled out in a copy of the env restored with
``set_sim_state``, cost = mean distance of the blocks to their goals, ``oracle_population`` x
``oracle_iterations`` candidates, ``oracle_horizon`` actions) and ``learned`` (the op3 agent of
``checkpoint=``, greedy: CEM in its slot world model toward the goal image's slots; skipped
without a checkpoint). ``planners=[learned]`` runs a subset. Reports per planner the success
rate at episode end, ``reached_rate`` (episodes in which success held at some step: a success
later undone counts here, not in ``success_rate``), the final mean goal distance, the return
and ``seconds_per_step`` (acting and env step). ``env.terminate_on_success=true`` ends an
episode on the step that reaches success (then the two rates agree).

``python scripts/dev/op3_checks.py check=sweep checkpoint=<dir>
grid='op3.cem_population=64,128;op3.keep_scale=0,1' json=sweep.json``: the learned planner of ``check=planning`` on
the same ``planning_episodes`` episodes for every combination of the grid's ``op3.*`` /
``env.*`` values (on top of any overrides given directly); rows sorted by success rate, then
final goal distance.

``python scripts/dev/op3_checks.py check=hits json=hits.json [checkpoint=<dir>]``: C-SWM's
latent-space ranking measures (Kipf et al. 2020) on ``test_episodes`` held-out episodes of
uniformly random actions with ``env=`` (seeds from 3,000,000 + ``seed``). From each episode's
first frame the model predicts the slots ``k`` steps ahead open loop (``rollout`` with the
episode's actions) for every ``k`` in ``hits_steps`` (1, 5, 10), and each prediction is ranked
against the slots inferred (``infer``, from the frame alone) from the true frame ``k`` of
*every* test episode: the distance is the Hungarian-matched sum over slots
(``worldmodels.slot_metrics.ranking_metrics``) of the squared Euclidean distance between
whole slot states (``latent``, C-SWM's measure) and, beside it, of the planner's slot
distance (``planner``: ``op3.position_weight``). Reports Hits@1 and MRR per ``k`` (episodes shorter
than ``k`` steps are left out of that ``k``). Without ``checkpoint=`` the untrained model of
``preset=op3`` (plus ``op3.*`` overrides) is measured.

Common keys: ``json=``, ``seed=`` (0), ``threads=`` (1). See ``DEFAULTS``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

DEFAULTS: dict[str, Any] = {
    "check": "ari",
    "json": None,
    "seed": 0,
    "threads": 1,
    "env": "blocks:push-3",
    "checkpoint": None,
    # ari
    "episodes": 1000,
    "steps": 1,
    "test_scenes": 200,
    "batch": 16,
    "updates": 0,  # 0: train until `minutes` have passed
    "minutes": 25.0,
    "eval_every": 500,
    "save": None,
    # planning (`episodes` is shared; the planning default is `planning_episodes`)
    "planning_episodes": 20,
    "oracle_population": 64,
    "oracle_iterations": 3,
    "oracle_elites": 8,
    "oracle_horizon": 1,
    "planners": ["random", "oracle", "learned"],
    # sweep: "key=v1,v2;key2=w1,w2" over op3.* / env.* keys, every combination evaluated
    "grid": "",
    # hits
    "test_episodes": 100,
    "hits_steps": [1, 5, 10],
}


def _config(args: dict[str, Any], overrides: list[str]):
    from imagine_rl.runtime.config import build_config

    if args["checkpoint"]:
        from imagine_rl.runtime.checkpoint import load_checkpoint

        loaded = load_checkpoint(Path(str(args["checkpoint"])))
        return build_config(overrides, base=loaded.config), loaded
    base = ["preset=op3", f"env={args['env']}", f"seed={args['seed']}"]
    return build_config([*base, *overrides]), None


def _env(config, seed: int):
    """One plain env of ``config.env`` as evaluation builds it (the original task, no
    intervention), observing pixels and the goal image only: the checks read nothing else."""
    from imagine_rl.runtime.factories import make_single_env

    return make_single_env(config, mode="eval", seed=seed, obs="pixels")


def _agent(config, env, loaded=None):
    from imagine_rl.agents.op3 import OP3Agent
    from imagine_rl.runtime.checkpoint import is_weights_only

    agent = OP3Agent(config, env.observation_space, env.action_space)
    if loaded is not None and is_weights_only(loaded):  # check=ari save=: weights alone
        agent.load_weights(loaded.agent_state["weights"])
    elif loaded is not None:
        agent.load_state_dict(loaded.agent_state)
    return agent


# --------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------


def collect_frames(config, episodes: int, steps: int, seed: int):
    """Random-interaction frames: per episode the first frame, the goal image and ``steps``
    frames after uniformly random actions. Returns uint8 ``[F, 3, H, W]``."""
    env = _env(config, seed)
    rng = np.random.default_rng(seed)
    frames = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        frames += [obs["pixels"], obs["goal"]]
        for _ in range(steps):
            action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            obs, *_ = env.step(action)
            frames.append(obs["pixels"])
    env.close()
    return np.stack(frames)


def test_scenes(config, scenes: int, seed: int):
    """Held-out first frames and their true masks: uint8 ``[N, 3, H, W]``, ``[N, H, W]``."""
    env = _env(config, seed)
    pixels, masks = [], []
    for scene in range(scenes):
        obs, info = env.reset(seed=seed + scene)
        pixels.append(obs["pixels"])
        masks.append(info["masks"])
    env.close()
    return np.stack(pixels), np.stack(masks)


def check_ari(args: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    import torch

    from imagine_rl.runtime.metrics import foreground_ari

    config, loaded = _config(args, overrides)
    seed = args["seed"]
    env = _env(config, seed)
    agent = _agent(config, env, loaded)
    env.close()
    test_pixels, test_masks = test_scenes(config, args["test_scenes"], 1_000_000 + seed)

    def ari() -> float:
        return foreground_ari(test_masks, agent.segment(test_pixels).argmax(1))

    report: dict[str, Any] = {"check": "ari", "env": config.env.id, "test_scenes": len(test_pixels)}
    if loaded is not None:
        report.update(checkpoint=str(loaded.path), step=loaded.step, ari=ari())
        print(f"held-out FG-ARI of {loaded.path}: {report['ari']:.3f}")
        return report

    report["ari_untrained"] = ari()
    print(f"untrained FG-ARI {report['ari_untrained']:.3f}", flush=True)
    tick = time.perf_counter()
    frames = collect_frames(config, args["episodes"], args["steps"], seed)
    report["frames"] = len(frames)
    report["collect_seconds"] = round(time.perf_counter() - tick, 1)
    print(f"collected {len(frames)} frames in {report['collect_seconds']} s", flush=True)

    rng = np.random.default_rng(seed)
    batch = args["batch"]
    action = torch.zeros(batch, 1, agent.action_dim)
    is_first = torch.ones(batch, 1)
    curve: list[dict[str, Any]] = []
    start = time.perf_counter()
    budget = 60.0 * args["minutes"]
    updates = 0
    losses: list[torch.Tensor] = []  # device tensors, read once per report
    while True:
        elapsed = time.perf_counter() - start
        done = updates >= args["updates"] if args["updates"] else elapsed >= budget
        if updates % args["eval_every"] == 0 or done:
            value = ari() if updates else report["ari_untrained"]
            # None (JSON null) before the first update: json.dumps would write NaN, not JSON.
            recon = float(torch.stack(losses).mean()) if losses else None
            curve.append(
                {"update": updates, "seconds": round(elapsed, 1), "ari": value, "recon": recon}
            )
            shown = "-" if recon is None else f"{recon:.5f}"
            print(f"update {updates} ({elapsed:.0f} s): recon {shown} FG-ARI {value:.3f}")
            losses.clear()
        if done:
            break
        index = rng.integers(0, len(frames), batch)
        pixels = torch.as_tensor(frames[index])[:, None]
        metrics = agent.update({"pixels": pixels, "action": action, "is_first": is_first})
        losses.append(torch.as_tensor(metrics["loss/reconstruction"]).float())
        updates += 1
    report.update(
        ari=curve[-1]["ari"],
        updates=updates,
        train_seconds=round(time.perf_counter() - start, 1),
        batch=batch,
        curve=curve,
    )
    if args["save"]:
        report["saved"] = str(_save(agent, config, args["save"], updates))
        print(f"checkpoint: {report['saved']}")
    return report


def _save(agent, config, run_dir: str, updates: int) -> Path:
    """The trained weights as a checkpoint ``train.py init=`` and ``evaluate.py`` accept."""
    from imagine_rl.runtime.checkpoint import save_weights

    return save_weights(run_dir, config, agent.state_dict())


# --------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------


def _goal_distance(env) -> float:
    """Mean distance of the blocks to their goals (xy for push, xyz for stack)."""
    inner = env.unwrapped
    diff = inner.block_positions.astype(np.float64) - inner.goal_positions
    if inner.task == "push":
        diff = diff[:, :2]
    return float(np.linalg.norm(diff, axis=1).mean())


class OraclePlanner:
    """CEM (``worldmodels.planning.cem``) with the true simulator: candidates are rolled out in
    a second env restored to the real env's state (``get_sim_state`` / ``set_sim_state``,
    physics only via ``simulate``)."""

    def __init__(self, config, args: dict[str, Any], seed: int) -> None:
        import torch

        self.sim = _env(config, seed).unwrapped
        self.args = args
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, env) -> np.ndarray:
        import torch

        from imagine_rl.worldmodels.planning import cem

        state = env.unwrapped.get_sim_state()
        sim = self.sim
        dim = int(np.prod(env.action_space.shape))

        def cost(actions: torch.Tensor) -> torch.Tensor:  # [1, P, H, A] -> [1, P]
            out = []
            for sequence in actions[0].numpy():
                sim.set_sim_state(state)
                for action in sequence:
                    sim.simulate(action)
                out.append(_goal_distance(sim))
            return torch.tensor([out])

        a = self.args
        best, _ = cem(
            cost,
            torch.zeros(1, a["oracle_horizon"], dim),
            1.0,
            a["oracle_population"],
            a["oracle_elites"],
            a["oracle_iterations"],
            generator=self.generator,
        )
        return best[0, 0].numpy().astype(np.float32)


def run_episodes(env, policy, episodes: int, seed: int) -> dict[str, Any]:
    """Success rate (at episode end and at any step), final goal distance, return and time per
    step of ``policy(env, obs, is_first)``."""
    successes, reached, distances, returns, steps = [], [], [], [], 0
    tick = time.perf_counter()
    for episode in range(episodes):
        obs, info = env.reset(seed=seed + episode)
        is_first, total, done, ever = True, 0.0, False, False
        while not done:
            action = policy(env, obs, is_first)
            obs, reward, terminated, truncated, info = env.step(action)
            total += float(reward)
            steps += 1
            ever |= bool(info["is_success"])
            is_first, done = False, terminated or truncated
        successes.append(bool(info["is_success"]))
        reached.append(ever)
        distances.append(_goal_distance(env))
        returns.append(total)
    return {
        "success_rate": float(np.mean(successes)),
        "reached_rate": float(np.mean(reached)),
        "final_goal_distance": float(np.mean(distances)),
        "return_mean": float(np.mean(returns)),
        "seconds_per_step": round((time.perf_counter() - tick) / max(steps, 1), 4),
        "successes": successes,
    }


def _learned_policy(agent):
    """``policy(env, obs, is_first)`` of the op3 agent, greedy, one env."""
    memory = {"state": None}

    def learned(env, obs, first):
        if first:
            memory["state"] = agent.initial_state(1)
        batch = {k: v[None] for k, v in obs.items()}
        batch["is_first"] = np.array([first])
        action, memory["state"] = agent.act(batch, memory["state"], explore=False)
        return action[0]

    return learned


def _print_result(name: str, result: dict[str, Any]) -> None:
    print(
        f"{name}: success {result['success_rate']:.2f} (reached {result['reached_rate']:.2f}), "
        f"final goal distance {result['final_goal_distance']:.3f} m, return "
        f"{result['return_mean']:.2f} ({result['seconds']} s)",
        flush=True,
    )


def check_planning(args: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    config, loaded = _config(args, overrides)
    seed, episodes = 2_000_000 + args["seed"], args["planning_episodes"]
    env = _env(config, seed)
    rng = np.random.default_rng(args["seed"])
    report: dict[str, Any] = {"check": "planning", "env": config.env.id, "episodes": episodes}
    oracle = OraclePlanner(config, args, seed) if "oracle" in args["planners"] else None
    planners: dict[str, Any] = {
        "random": lambda env, obs, first: rng.uniform(-1, 1, env.action_space.shape).astype(
            np.float32
        ),
        "oracle": lambda env, obs, first: oracle(env),
    }
    if loaded is not None:
        planners["learned"] = _learned_policy(_agent(config, env, loaded))
        report.update(checkpoint=str(loaded.path), step=loaded.step)
    elif "learned" in args["planners"]:
        report["learned"] = "skipped: pass checkpoint=<run dir of train.py agent=op3>"
    for name, policy in planners.items():
        if name not in args["planners"]:
            continue
        tick = time.perf_counter()
        result = run_episodes(env, policy, episodes, seed)
        result["seconds"] = round(time.perf_counter() - tick, 1)
        report[name] = result
        _print_result(name, result)
    env.close()
    return report


def _grid_cells(grid: str) -> list[list[str]]:
    """Every combination of ``grid`` (``"key=v1,v2;key2=w1,w2"``) as ``key=value`` lists.

    Raises:
        ConfigError: an entry without ``=`` or values, or a key outside ``op3.*`` / ``env.*``.
    """
    import itertools

    from imagine_rl.runtime.config import ConfigError

    axes = []
    for entry in filter(None, (part.strip() for part in str(grid).split(";"))):
        key, sep, values = entry.partition("=")
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not options:
            raise ConfigError(f"grid: expected 'key=v1,v2;key2=w1,w2', got entry {entry!r}")
        if not key.startswith(("op3.", "env.")):
            raise ConfigError(f"grid: only op3.* and env.* keys can be swept, got {key!r}")
        axes.append([f"{key.strip()}={v}" for v in options])
    if not axes:
        raise ConfigError("grid: expected 'key=v1,v2;key2=w1,w2' (e.g. 'op3.keep_scale=0,1')")
    return [list(cell) for cell in itertools.product(*axes)]


def check_sweep(args: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    seed, episodes = 2_000_000 + args["seed"], args["planning_episodes"]
    rows = []
    for cell in _grid_cells(args["grid"]):
        config, loaded = _config(args, [*overrides, *cell])
        env = _env(config, seed)
        tick = time.perf_counter()
        result = run_episodes(env, _learned_policy(_agent(config, env, loaded)), episodes, seed)
        result["seconds"] = round(time.perf_counter() - tick, 1)
        env.close()
        _print_result(" ".join(cell), result)
        rows.append({"overrides": cell, **result})
    rows.sort(key=lambda row: (-row["success_rate"], row["final_goal_distance"]))
    return {
        "check": "sweep",
        "env": config.env.id,
        "episodes": episodes,
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "rows": rows,
    }


# --------------------------------------------------------------------------------------
# Ranking (C-SWM's Hits@1 and MRR)
# --------------------------------------------------------------------------------------


def random_episodes(config, episodes: int, seed: int):
    """Episodes of uniformly random actions: per episode the frames ``[T + 1, 3, H, W]``
    (uint8, the first frame then one after each action) and the actions ``[T, A]``."""
    env = _env(config, seed)
    rng = np.random.default_rng(seed)
    out = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        frames, actions, done = [obs["pixels"]], [], False
        while not done:
            action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            obs, _, terminated, truncated, _ = env.step(action)
            frames.append(obs["pixels"])
            actions.append(action.reshape(-1))
            done = terminated or truncated
        out.append((np.stack(frames), np.stack(actions)))
    env.close()
    return out


def check_hits(args: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    import torch

    from imagine_rl.worldmodels.slot_metrics import ranking_metrics, slot_distances

    config, loaded = _config(args, overrides)
    seed = 3_000_000 + args["seed"]
    env = _env(config, seed)
    agent = _agent(config, env, loaded)
    env.close()
    steps = sorted({int(k) for k in args["hits_steps"]})
    if not steps or steps[0] < 1:
        raise ValueError(f"hits_steps: expected steps >= 1, got {args['hits_steps']}")
    tick = time.perf_counter()
    episodes = random_episodes(config, args["test_episodes"], seed)
    report: dict[str, Any] = {
        "check": "hits",
        "env": config.env.id,
        "test_episodes": len(episodes),
        "representation": config.op3.representation,
        "checkpoint": str(loaded.path) if loaded is not None else None,
        "step": loaded.step if loaded is not None else None,
        "collect_seconds": round(time.perf_counter() - tick, 1),
    }
    wm, o = agent.wm, config.op3

    def planner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return slot_distances(a, b, wm.spec.slot_dim, o.position_weight)

    with torch.inference_mode(), agent.cached():
        for k in steps:
            usable = [(f, a) for f, a in episodes if len(a) >= k]
            if len(usable) < 2:
                report[f"k{k}"] = {"episodes": len(usable), "skipped": "fewer than 2 episodes"}
                print(f"k={k}: skipped ({len(usable)} episodes of {k} steps or more)")
                continue
            start = wm.infer(agent._pixels(np.stack([f[0] for f, _ in usable])))
            actions = torch.as_tensor(np.stack([a[:k] for _, a in usable]), device=agent.device)
            pred = wm.rollout({"slots": start}, actions.float())["slots"][:, -1]
            target = wm.infer(agent._pixels(np.stack([f[k] for f, _ in usable])))
            result: dict[str, Any] = {"episodes": len(usable)}
            for name, distances in (("latent", None), ("planner", planner)):
                kwargs = {} if distances is None else {"distances": distances}
                ranks = ranking_metrics(pred.cpu(), target.cpu(), **kwargs)
                result[name] = {"hits_at_1": ranks["hits_at_1"], "mrr": ranks["mrr"]}
            report[f"k{k}"] = result
            print(
                f"k={k} ({len(usable)} episodes): latent Hits@1 "
                f"{result['latent']['hits_at_1']:.3f} MRR {result['latent']['mrr']:.3f}; "
                f"planner distance Hits@1 {result['planner']['hits_at_1']:.3f} "
                f"MRR {result['planner']['mrr']:.3f}",
                flush=True,
            )
    return report


CHECKS = {
    "ari": check_ari,
    "planning": check_planning,
    "hits": check_hits,
    "sweep": check_sweep,
}
PLANNERS = ("random", "oracle", "learned")


def main(argv: list[str]) -> int:
    import torch

    from imagine_rl.runtime.checkpoint import CheckpointError
    from imagine_rl.runtime.config import ConfigError

    try:
        # op3.<key>=value (and env.<key>=value) go to the agent's config, the rest are ours.
        args, overrides = harness.parse_with_rest(
            argv, DEFAULTS, __doc__, ours=lambda key: not key.startswith(("op3.", "env."))
        )
        if args["check"] not in CHECKS:
            raise ConfigError(f"check: expected one of {sorted(CHECKS)}, got {args['check']!r}")
        report_fn = CHECKS[args["check"]]
        if args["check"] == "hits" and (not args["hits_steps"] or min(args["hits_steps"]) < 1):
            raise ConfigError(f"hits_steps: expected steps >= 1, got {args['hits_steps']}")
        unknown = sorted(set(args["planners"]) - set(PLANNERS))
        if unknown or not args["planners"]:
            raise ConfigError(
                f"planners: expected some of {list(PLANNERS)}, got {args['planners']}"
            )
        if args["check"] == "sweep":
            if not args["checkpoint"]:
                raise ConfigError("check=sweep: pass checkpoint=<run dir of train.py agent=op3>")
            for cell in _grid_cells(args["grid"]):  # a bad key or value fails here, before any work
                _config(args, [*overrides, *cell])
        _config(args, overrides)  # a bad key fails here, before any work
    except (ConfigError, CheckpointError, ValueError) as error:
        return harness.error(error)
    torch.set_num_threads(max(1, args["threads"]))
    start = time.perf_counter()
    report = report_fn(args, overrides)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["args"] = args
    report["overrides"] = overrides
    if args["json"]:
        harness.write_json(args["json"], report)
    return 0


if __name__ == "__main__":
    harness.run(main)
