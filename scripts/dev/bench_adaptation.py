"""Adaptation speed of world models after one mechanism of the task changes.

    python scripts/dev/bench_adaptation.py env=dmc:cartpole-balance preset=dreamer_tiny,dreamer_cpu \\
        intervention="body_mass:pole_1*2" models=dense,rigl,factored seeds=0,1,2 \\
        pretrain_updates=1000 adapt_updates=300 json=adaptation.json png=adaptation.png

For every seed and model: a world model (the Dreamer world model of ``agent=dreamer``; no
actor or critic is trained) learns the original task for ``pretrain_updates`` updates, then the
mechanism changes (``intervention``) and it is fine-tuned for ``adapt_updates`` updates on data
of the changed task only. Recorded over the fine-tuning: the training loss of every update and,
every ``eval_every`` updates (and at 0), two losses on fixed held-out batches of the changed
task: ``wm_loss`` (the world-model loss, its terms summed with the run's scales) and
``openloop_mse`` (squared error of ``horizon`` open-loop prior predictions after ``context``
observed steps, summed over the state dims, symlog space). The *area* of a curve is its
trapezoid area over ``[0, adapt_updates]`` divided by ``adapt_updates``, i.e. the mean loss
over the adaptation window (lower = faster adaptation); ``area_above_pre`` subtracts the
model's own loss on held-out original-task data before the change, and ``*_recovered_at`` is
the first evaluated update at which the curve is back at or below that level (null: never).

Data: a uniformly random policy (seeded) in one env built with
``env.intervention="<intervention>@step=<collect_steps * action_repeat>"``: the first
``collect_steps`` policy steps are the original task, the next ``collect_steps`` the changed
one (the switch is checked against the env's ``info["intervention"]``); held-out batches come
from a second env (seed + 1000) collecting ``eval_steps`` policy steps of each. A seed's data is
shared by every model (paired comparison); replay sampling and torch are re-seeded per model.

Models (``models=``): ``dense``; ``rigl`` (``sparse.enabled=true sparse.method=rigl
sparse.density=<density> sparse.update_every=<update_every>``); ``factored`` (``world_model.
factored.groups=<groups> graph=<graph> in_degree=<in_degree>``, plus ``update_every``);
``factored-fixed``, ``factored-dynamic`` and ``factored-l1`` name the graph explicitly. Topology
changes (RigL, dynamic graph) happen during the first 75% of pretraining only, so every model
adapts with the same procedure: weight updates on a fixed topology. Other ``key=value``
arguments are config overrides as for ``train.py`` (``agent=dreamer`` by default); the script
sets ``run.steps``/``run.replay_ratio``/``run.learning_starts`` so the schedules span exactly
``pretrain_updates + adapt_updates`` updates.

Writes ``json`` (per model: every run's curves and areas, and mean/std over seeds) and ``png``
(mean adaptation curves, shaded +-1 std over seeds), and prints a table.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import harness

os.environ.setdefault("MUJOCO_GL", "egl")

DEFAULTS: dict[str, Any] = {
    "intervention": "body_mass:pole_1*2",
    "models": ["dense", "rigl", "factored"],
    "seeds": [0, 1, 2],
    "pretrain_updates": 1000,
    "adapt_updates": 300,
    "eval_every": 25,
    "collect_steps": 5000,
    "eval_steps": 1000,
    "eval_batches": 4,
    "context": 8,
    "horizon": 8,
    "density": 0.25,
    "groups": 4,
    "graph": "dynamic",
    "in_degree": 2,
    "update_every": 50,
    "json": "adaptation.json",
    "png": "adaptation.png",
}
MODELS = ("dense", "rigl", "factored", "factored-fixed", "factored-dynamic", "factored-l1")


def parse(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(bench options, config overrides); raises ``ConfigError``/``ValueError``."""
    from imagine_rl.runtime.config import ConfigError, parse_overrides

    options, rest = harness.parse_with_rest(argv, DEFAULTS, __doc__)
    overrides = parse_overrides(rest)
    overrides.setdefault("agent", "dreamer")
    if "@" in options["intervention"]:
        raise ConfigError(
            f"intervention={options['intervention']!r}: give it without @step=, the script "
            "applies it after collect_steps policy steps"
        )
    unknown = [m for m in options["models"] if m not in MODELS]
    if unknown:
        raise ConfigError(f"models: unknown {unknown}; valid: {', '.join(MODELS)}")
    for key in ("pretrain_updates", "adapt_updates", "eval_every", "collect_steps"):
        if options[key] < 1:
            raise ConfigError(f"{key}: must be >= 1, got {options[key]}")
    if options["context"] < 1 or options["horizon"] < 1:
        raise ConfigError("context and horizon must be >= 1")
    return options, overrides


def model_overrides(kind: str, options: dict[str, Any], total: int) -> dict[str, Any]:
    """Config overrides for one model kind; rewiring stops at 75% of pretraining."""
    stop = 0.75 * options["pretrain_updates"] / total
    if kind == "dense":
        return {}
    if kind == "rigl":
        return {
            "sparse.enabled": True,
            "sparse.method": "rigl",
            "sparse.density": options["density"],
            "sparse.update_every": options["update_every"],
            "sparse.stop_fraction": stop,
        }
    graph = options["graph"] if kind == "factored" else kind.split("-", 1)[1]
    return {
        "world_model.factored.groups": options["groups"],
        "world_model.factored.graph": graph,
        "world_model.factored.in_degree": options["in_degree"],
        "world_model.factored.update_every": options["update_every"],
        "world_model.factored.stop_fraction": stop,
    }


def collect(config, spec: str | None, steps: int, seed: int, switch: int | None):
    """``steps`` random-policy steps of one env; returns (steps before the switch, steps from
    it, the intervention log text). Each step is a dict of ``[1, ...]`` arrays as replay takes,
    recorded by ``runtime.collect`` (the rule every producer of replay data follows)."""
    import copy

    from imagine_rl.runtime.collect import Collector, RandomPolicy
    from imagine_rl.runtime.factories import make_env_factory

    env_config = copy.deepcopy(config)
    env_config.env.intervention = spec
    env = make_env_factory(env_config, video=False)("train", 1, seed)
    collector = Collector(env, RandomPolicy(env.action_space, seed))
    collector.reset(seed=seed)
    before, after, message = [], [], None
    try:
        for t in range(steps):
            if switch is not None and t == switch:
                # The changed task's data is a replay of its own: its stream starts here.
                collector.recorder.begin_stream()
            recorded = collector.step()
            if "intervention" in recorded.info:
                message = str(recorded.info["intervention"][0])
                if switch is not None and t != switch:
                    raise RuntimeError(f"intervention at policy step {t}, expected {switch}")
            (before if switch is None or t < switch else after).append(recorded.step)
    finally:
        env.close()
    if switch is not None and message is None:
        raise RuntimeError("the intervention never fired; is collect_steps > 0?")
    return before, after, message


def make_replay(config, steps: list[dict], seed: int):
    from imagine_rl.runtime.replay import SequenceReplay

    replay = SequenceReplay(
        capacity=max(len(steps), config.replay.batch_length),
        batch_size=config.replay.batch_size,
        batch_length=config.replay.batch_length,
        seed=seed,
    )
    for step in steps:
        replay.add(step)
    return replay


def evaluate(agent, batches: list[dict], context: int, horizon: int, seed: int) -> dict:
    """Held-out ``wm_loss`` and ``openloop_mse`` (module docstring), averaged over batches."""
    import torch

    from imagine_rl.worldmodels import symlog

    wm = agent.wm
    totals: dict[str, float] = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[]), agent.cached():
        torch.manual_seed(seed)  # the same latent samples for every eval point
        for batch in batches:
            data = agent.preprocess(batch)
            losses, _ = wm.loss(data)
            values = {k: float(v) for k, v in losses.items()}
            values["wm_loss"] = sum(agent.loss_scales[k] * v for k, v in values.items())
            window = {k: v[:, : context + horizon] for k, v in data.items()}
            pred = wm.open_loop(window, context)
            err = 0.0
            for key in wm.vector_keys:
                diff = pred[key][:, context:].float() - symlog(window[key][:, context:].float())
                err += float(diff.square().sum(-1).mean())
            values["openloop_mse"] = err
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / len(batches)
    return totals


def area(xs: list[float], ys: list[float]) -> float:
    """Trapezoid area under ``ys(xs)`` divided by the span of ``xs`` (the mean level)."""
    total = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return total / (xs[-1] - xs[0])


def recovered_at(xs: list[int], ys: list[float], level: float) -> int | None:
    """First update at which the curve is back at or below ``level`` (None: never)."""
    return next((x for x, y in zip(xs, ys) if y <= level), None)


def run_one(kind: str, seed: int, options: dict, overrides: dict, data: dict) -> dict:
    """Pretrain, intervene, adapt one model; returns its curves and areas."""
    import torch

    from imagine_rl import agents
    from imagine_rl.runtime.config import build_config
    from imagine_rl.runtime.loop import planned_updates

    pre_n, adapt_n = options["pretrain_updates"], options["adapt_updates"]
    total = pre_n + adapt_n
    config = build_config({**overrides, **model_overrides(kind, options, total), "seed": seed})
    if planned_updates(config) != total:
        raise RuntimeError(f"schedule spans {planned_updates(config)} updates, expected {total}")
    torch.manual_seed(seed)
    agent = agents.make_agent(config, data["obs_space"], data["action_space"])
    pre = make_replay(config, data["pre"], seed)
    post = make_replay(config, data["post"], seed + 1)
    ctx, hor = options["context"], options["horizon"]

    def step(replay) -> float:
        _, metrics = agent.train_world_model(agent.preprocess(replay.sample()))
        return float(metrics["loss/world_model"])

    start = time.time()
    pretrain_loss = [step(pre) for _ in range(pre_n)]
    before = evaluate(agent, data["eval_pre"], ctx, hor, seed)
    updates, curve, train_loss = [0], [evaluate(agent, data["eval_post"], ctx, hor, seed)], []
    for u in range(1, adapt_n + 1):
        train_loss.append(step(post))
        if u % options["eval_every"] == 0 or u == adapt_n:
            updates.append(u)
            curve.append(evaluate(agent, data["eval_post"], ctx, hor, seed))
    result: dict[str, Any] = {
        "model": kind,
        "seed": seed,
        "seconds": time.time() - start,
        "world_model_parameters": sum(p.numel() for p in agent.wm.parameters()),
        "pretrain_loss_last": sum(pretrain_loss[-20:]) / len(pretrain_loss[-20:]),
        "pre": before,
        "updates": updates,
        "curve": curve,
        "train_loss": train_loss,
    }
    for metric in ("wm_loss", "openloop_mse"):
        ys = [point[metric] for point in curve]
        result[f"{metric}_shock"] = ys[0]
        result[f"{metric}_final"] = ys[-1]
        result[f"{metric}_area"] = area(updates, ys)
        result[f"{metric}_area_above_pre"] = result[f"{metric}_area"] - before[metric]
        result[f"{metric}_recovered_at"] = recovered_at(updates, ys, before[metric])
    result["train_loss_area"] = sum(train_loss) / len(train_loss)
    if agent.sparsifier is not None:
        result["sparse_density"] = agent.sparsifier.metrics()["sparse/density"]
    graph = agent.wm.rssm.graph
    if graph is not None:
        result["graph"] = graph.binary().int().tolist()
        result["graph_strength"] = graph.strength().tolist()
    return result


SUMMARY_KEYS = (
    "wm_loss_area",
    "wm_loss_area_above_pre",
    "wm_loss_shock",
    "wm_loss_final",
    "openloop_mse_area",
    "openloop_mse_area_above_pre",
    "openloop_mse_shock",
    "openloop_mse_final",
    "train_loss_area",
)


def summarize(runs: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in runs]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        out[key] = {"mean": mean, "std": std, "values": values}
    for key in ("wm_loss", "openloop_mse"):
        out[f"pre_{key}"] = sum(r["pre"][key] for r in runs) / len(runs)
        out[f"{key}_recovered_at"] = [r[f"{key}_recovered_at"] for r in runs]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in (
        (axes[0], "wm_loss", "held-out world-model loss"),
        (axes[1], "openloop_mse", "held-out open-loop MSE"),
    ):
        for kind, entry in result["models"].items():
            runs = entry["runs"]
            xs = runs[0]["updates"]
            ys = np.array([[p[metric] for p in r["curve"]] for r in runs])
            mean, std = ys.mean(0), ys.std(0)
            line = ax.plot(
                xs, mean, label=f"{kind} (area {entry['summary'][metric + '_area']['mean']:.3g})"
            )
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2, color=line[0].get_color())
            pre = entry["summary"][f"pre_{metric}"]
            ax.axhline(pre, color=line[0].get_color(), linestyle=":", linewidth=1)
        ax.set_xlabel("updates after the intervention")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{result['env']}: {result['intervention']} ({len(result['seeds'])} seeds; dotted: "
        "loss on the original task before the change)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    import torch

    from imagine_rl.runtime.accelerator import configure_threads
    from imagine_rl.runtime.config import ConfigError, build_config, to_dict

    try:
        options, overrides = parse(argv)
        base = build_config(dict(overrides))
        base.env.intervention = None  # the script builds its own spec below
        for kind in options["models"]:
            total = options["pretrain_updates"] + options["adapt_updates"]
            build_config({**overrides, **model_overrides(kind, options, total)})
        if base.replay.batch_length < options["context"] + options["horizon"]:
            raise ConfigError(
                f"replay.batch_length ({base.replay.batch_length}) must be >= context + horizon "
                f"({options['context']} + {options['horizon']}): held-out windows hold both"
            )
    except (ConfigError, ValueError) as error:
        return harness.error(error)
    configure_threads(base.accelerator)
    ar = base.env.action_repeat
    total = options["pretrain_updates"] + options["adapt_updates"]
    # One update per policy step from the first: planned_updates == total (the schedules).
    overrides.update(
        {
            "run.steps": total * ar,
            "run.learning_starts": 0,
            "run.replay_ratio": base.replay.steps_per_batch,
            "env.num_envs": 1,
        }
    )
    n = options["collect_steps"]
    items = [i.strip() for i in options["intervention"].split(";") if i.strip()]
    spec = ";".join(f"{item}@step={n * ar}" for item in items)
    eval_spec = ";".join(f"{item}@step={options['eval_steps'] * ar}" for item in items)
    result: dict[str, Any] = {
        "env": base.env.id,
        "intervention": options["intervention"],
        "env_intervention": spec,
        "seeds": options["seeds"],
        "options": options,
        "threads": torch.get_num_threads(),
        "models": {kind: {"runs": []} for kind in options["models"]},
    }
    try:
        for seed in options["seeds"]:
            pre, post, message = collect(base, spec, 2 * n, seed, switch=n)
            e = options["eval_steps"]
            eval_pre, eval_post, _ = collect(base, eval_spec, 2 * e, seed + 1000, switch=e)
            result.setdefault("intervention_log", message)
            spaces = _spaces(base)
            eval_cfg = build_config(dict(overrides))
            data = {
                "pre": pre,
                "post": post,
                "eval_pre": _fixed_batches(eval_cfg, eval_pre, options["eval_batches"], seed),
                "eval_post": _fixed_batches(eval_cfg, eval_post, options["eval_batches"], seed),
                "obs_space": spaces[0],
                "action_space": spaces[1],
            }
            for kind in options["models"]:
                run = run_one(kind, seed, options, overrides, data)
                result["models"][kind]["runs"].append(run)
                print(
                    f"seed {seed} {kind:>16}: wm_loss area {run['wm_loss_area']:.4f} "
                    f"(pre {run['pre']['wm_loss']:.4f}, shock {run['wm_loss_shock']:.4f}, final "
                    f"{run['wm_loss_final']:.4f}), open-loop area {run['openloop_mse_area']:.4f} "
                    f"[{run['seconds']:.0f} s]",
                    flush=True,
                )
    except (ConfigError, ValueError) as error:
        return harness.error(error)
    for entry in result["models"].values():
        entry["summary"] = summarize(entry["runs"])
    result["config"] = to_dict(build_config(dict(overrides)))
    harness.write_json(options["json"], result)
    plot(result, Path(options["png"]))
    print_table(result)
    print(f"png: {options['png']}")
    return 0


def _spaces(config):
    from imagine_rl.runtime.factories import make_env_factory

    env = make_env_factory(config, video=False)("eval", 1, config.seed)
    spaces = env.single_observation_space, env.single_action_space
    env.close()
    return spaces


def _fixed_batches(config, steps: list[dict], count: int, seed: int) -> list[dict]:
    replay = make_replay(config, steps, seed + 7)
    return [replay.sample() for _ in range(count)]


def print_table(result: dict) -> None:
    rows = [
        "| model | wm_loss area | above pre | open-loop area | above pre | pre -> shock -> final "
        "(wm_loss) | back at pre (wm_loss, per seed) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, entry in result["models"].items():
        s = entry["summary"]

        def fmt(key: str, s: dict = s) -> str:
            return f"{s[key]['mean']:.4f} ± {s[key]['std']:.4f}"

        rows.append(
            f"| {kind} | {fmt('wm_loss_area')} | {fmt('wm_loss_area_above_pre')} | "
            f"{fmt('openloop_mse_area')} | {fmt('openloop_mse_area_above_pre')} | "
            f"{s['pre_wm_loss']:.4f} -> {s['wm_loss_shock']['mean']:.4f} -> "
            f"{s['wm_loss_final']['mean']:.4f} | "
            f"{', '.join('never' if u is None else str(u) for u in s['wm_loss_recovered_at'])} |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    harness.run(main)
