"""Research checks of the CPC pieces (scripts, not tests): ``python scripts/dev/cpc_checks.py check=mi``.

``check=mi``: InfoNCE on correlated Gaussians with known mutual information. ``x, y`` in
``R^dims`` with per-dimension correlation ``rho`` have ``I(x; y) = -dims/2 * log(1 - rho^2)``
nats. For each target MI in ``mi=`` (0: independent pairs, the control) a separable critic
(two MLPs, dot product) is trained with ``worldmodels.info_nce`` on batches of ``batch``
pairs; the bound ``log N - loss`` is evaluated on fresh batches every ``eval_every`` steps.
The same final batches are also scored by the optimal critic, the density ratio
``log p(y|x) - log p(y)`` in closed form (no training). Findings, each of which can fail
(``log N - loss <= log N`` cannot: it holds for any non-negative loss):

- ``optimal_tracks_mi``: the optimal critic's bound lies in ``[low * m, m]`` (``m = min(MI,
  log N)``), widened by 3 standard errors of the mean over ``eval_batches``. ``low``
  (``optimal_low_fraction``) is InfoNCE's finite-N gap measured with 20,000 pairs for N =
  16..256, d = 4, 8: the optimal bound is >= 0.89 m for MI <= log N / 4 or MI >= 2 log N, and
  >= 0.70 m in between (the gap peaks at MI = log N); so ``low`` = 0.85 there, 0.65 here. MI
  = 0: the bound is 0 exactly (a constant critic).
- ``learned_not_above_mi``: the learned bound is at most MI + 3 standard errors: the bound is
  a lower bound on the MI for every critic, so only noise or a leak (e.g. a query scored
  against its own key only) lifts it above.
- ``accuracy_above_chance`` (MI > 0): the learned critic picks the positive more often than
  chance 1/N by 5 binomial standard deviations of a chance accuracy over all eval anchors.
  ``accuracy_at_chance`` (MI = 0): within 4 of them, and ``bound_near_zero``: the learned
  bound within 0.05 nats (+3 standard errors) of 0.
- ``learned_fraction_of_optimal``: the learned bound over the optimal one (reported only).

``check=probe``: linear probes from a pixel encoder to the true low-dimensional state. Frames
of ``env=`` (default ``dmc:cartpole-swingup``, 64x64, random actions) are collected with their
states; a Dreamer CNN encoder (``depth=``) is trained with the sequence CPC loss (k = 1..3,
action-conditioned) either end to end (one loss on the last stage, backprop through all) or by
Greedy InfoMax (``modules=`` modules, each with its own loss and optimizer, detached
boundaries), with the same data, steps and learning rate. A ridge regression from each stage's
output (average-pooled to 4x4, flattened) to the state is fit on the training episodes (its
strength picked on the last training episode) and scored by R^2 on ``holdout`` held-out
episodes, per state dimension and as the mean over the configuration dimensions (positions
and angles: what one frame shows; velocities need several). An untrained encoder is the
baseline. Reports each greedy module's mean R^2 as a fraction of the end-to-end encoder's last
stage.

Common keys: ``json=`` (output path), ``seed=`` (0), ``threads=`` (1). See ``DEFAULTS``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import harness
import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

DEFAULTS: dict[str, Any] = {
    "check": "mi",
    "json": None,
    "seed": 0,
    "threads": 1,
    # mi
    "mi": [0.0, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0],
    "dims": 8,
    "batch": 64,
    "steps": 600,
    "eval_every": 100,
    "eval_batches": 20,
    "lr": 1e-3,
    # probe
    "env": "dmc:cartpole-swingup",
    "episodes": 10,
    "holdout": 2,
    "action_repeat": 2,
    "time_limit": 0,  # frames per episode; 0 = the task's own limit
    "distractors": False,
    "depth": 16,
    "modules": 4,
    "train_steps": 200,
    "seq_batch": 16,
    "seq_length": 16,
    "probe_lr": 3e-4,
    "ridges": [1e-3, 1e-2, 1e-1, 1.0, 10.0],
}


# --------------------------------------------------------------------------------------
# Correlated Gaussians
# --------------------------------------------------------------------------------------


def optimal_low_fraction(mi: float, log_n: float) -> float:
    """The least fraction of ``min(MI, log N)`` the optimal critic's InfoNCE bound reaches in
    expectation (see the module docstring): 0.85 far from MI = log N, 0.65 near it."""
    return 0.85 if mi <= log_n / 4 or mi >= 2 * log_n else 0.65


def check_mi(args: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch import nn

    from imagine_rl.worldmodels import info_nce, mi_bound

    dims, N = args["dims"], args["batch"]
    log_n = math.log(N)
    chance = 1 / N
    gen = torch.Generator().manual_seed(args["seed"])

    def pairs(rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(N, dims, generator=gen)
        noise = torch.randn(N, dims, generator=gen)
        return x, rho * x + math.sqrt(1 - rho**2) * noise

    def optimal(x: torch.Tensor, y: torch.Tensor, rho: float):
        """Queries and keys whose dot product is log p(y|x) - log p(y) up to terms in x alone
        (they cancel in each row's softmax): rho x.y / s - rho^2 |y|^2 / (2 s), s = 1 - rho^2;
        the |y|^2 term, which differs between candidates, rides in an extra coordinate."""
        s = 1 - rho**2
        query = torch.cat([rho * x / s, torch.ones(len(x), 1)], -1)
        key = torch.cat([y, -(rho**2) * y.square().sum(-1, keepdim=True) / (2 * s)], -1)
        return query, key

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(dims, 128), nn.ReLU(), nn.Linear(128, 32))

    def mean_se(values: list[float]) -> tuple[float, float]:
        mean = float(np.mean(values))
        se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        return mean, se

    results = []
    for true_mi in args["mi"]:
        torch.manual_seed(args["seed"])
        rho = math.sqrt(1 - math.exp(-2 * true_mi / dims))
        f, g = mlp(), mlp()
        opt = torch.optim.Adam([*f.parameters(), *g.parameters()], lr=args["lr"])
        curve = []
        for step in range(args["steps"] + 1):
            if step % args["eval_every"] == 0 or step == args["steps"]:
                learned, optimal_bounds, learned_hits, optimal_hits = [], [], [], []
                with torch.no_grad():
                    for _ in range(args["eval_batches"]):
                        x, y = pairs(rho)
                        loss, accuracy = info_nce(f(x), g(y))
                        learned.append(mi_bound(loss, N).item())
                        learned_hits.append(accuracy.item())
                        loss, accuracy = info_nce(*optimal(x, y, rho))
                        optimal_bounds.append(mi_bound(loss, N).item())
                        optimal_hits.append(accuracy.item())
                curve.append({"step": step, "bound": round(float(np.mean(learned)), 4)})
            if step == args["steps"]:
                break
            x, y = pairs(rho)
            loss, _ = info_nce(f(x), g(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
        # The last evaluation: the learned critic and the optimal one on the same batches.
        bound, se = mean_se(learned)
        best, best_se = mean_se(optimal_bounds)
        accuracy = float(np.mean(learned_hits))
        anchors = N * args["eval_batches"]
        chance_sd = math.sqrt(chance * (1 - chance) / anchors)
        ceiling = min(true_mi, log_n)
        low = optimal_low_fraction(true_mi, log_n)
        row: dict[str, Any] = {
            "true_mi": true_mi,
            "rho": round(rho, 4),
            "curve": curve,
            "final_bound": round(bound, 4),
            "final_bound_se": round(se, 4),
            "accuracy": round(accuracy, 4),
            "chance": round(chance, 4),
            "optimal_bound": round(best, 4),
            "optimal_bound_se": round(best_se, 4),
            "optimal_accuracy": round(float(np.mean(optimal_hits)), 4),
            "optimal_expected": [round(low * ceiling, 4), round(ceiling, 4)],
            "optimal_tracks_mi": low * ceiling - 3 * best_se - 1e-6
            <= best
            <= ceiling + 3 * best_se + 1e-6,
            "learned_not_above_mi": bound <= true_mi + 3 * se + 1e-6,
            "learned_fraction_of_optimal": round(bound / best, 4) if best > 0 else None,
        }
        if true_mi > 0:
            row["accuracy_above_chance"] = accuracy > chance + 5 * chance_sd
        else:
            row["accuracy_at_chance"] = abs(accuracy - chance) < 4 * chance_sd
            row["bound_near_zero"] = abs(bound) < 0.05 + 3 * se
        results.append(row)
        verdicts = " ".join(f"{k}={v}" for k, v in row.items() if isinstance(v, bool))
        print(
            f"MI {true_mi:4.1f} nats (rho {rho:.3f}): learned bound "
            + " ".join(f"{c['bound']:.2f}" for c in curve)
            + f" | optimal {best:.3f} (expected {low * ceiling:.2f}..{ceiling:.2f})"
            + f" | accuracy {accuracy:.3f} (chance {chance:.3f}) | {verdicts}"
        )
    keys = sorted({k for r in results for k, v in r.items() if isinstance(v, bool)})
    findings = {k: all(r[k] for r in results if k in r) for k in keys}
    print("findings: " + " ".join(f"{k}={v}" for k, v in findings.items()))
    return {
        "check": "mi",
        "dims": dims,
        "batch": N,
        "log_n": round(log_n, 4),
        "findings": findings,
        "results": results,
    }


# --------------------------------------------------------------------------------------
# Linear probes on pixels
# --------------------------------------------------------------------------------------


def probe_env_config(args: dict[str, Any]):
    """The config of the probe's env: ``env=`` observed as 64x64 pixels and state, with this
    script's ``action_repeat``, ``time_limit`` and ``distractors`` (checked like ``train.py``'s
    ``env.`` keys)."""
    from imagine_rl.runtime.config import build_config

    return build_config(
        {
            "env": args["env"],
            "env.obs": "both",
            "env.size": 64,
            "env.action_repeat": args["action_repeat"],
            "env.time_limit": args["time_limit"] or None,
            "env.distractors": args["distractors"],
        }
    )


def collect(args: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Random-action episodes (pixels uint8 [T, 3, 64, 64], state [T, S], action [T, A]) and
    the name of every state dimension (``<observation key>.<i>``)."""
    from imagine_rl.runtime.factories import make_single_env

    # A plain env: the state names come from its dm-control observation spec.
    env = make_single_env(probe_env_config(args), seed=args["seed"])
    spec = env.unwrapped._env.observation_spec()
    names = [f"{k}.{i}" for k, v in spec.items() for i in range(int(np.prod(v.shape)))]
    rng = np.random.default_rng(args["seed"])
    episodes = []
    for _ in range(args["episodes"]):
        obs, _ = env.reset()
        pixels, states, actions = [], [], []
        done = False
        while not done:
            action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            pixels.append(obs["pixels"])
            states.append(obs["state"])
            actions.append(action)
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
        episodes.append(
            {"pixels": np.stack(pixels), "state": np.stack(states), "action": np.stack(actions)}
        )
    env.close()
    return episodes, names


def stage_features(encoder, pixels: np.ndarray, chunk: int = 256) -> list[np.ndarray]:
    """Each CNN stage's output, average-pooled to 4x4 and flattened: list of [N, D]."""
    import torch
    import torch.nn.functional as F

    per_stage: list[list[np.ndarray]] = [[] for _ in range(len(encoder.cnn) // 3)]
    with torch.no_grad():
        for start in range(0, len(pixels), chunk):
            x = torch.from_numpy(pixels[start : start + chunk]).float() / 255.0 - 0.5
            for i in range(len(per_stage)):
                x = encoder.cnn[3 * i : 3 * i + 3](x)
                per_stage[i].append(F.adaptive_avg_pool2d(x, 4).flatten(1).numpy())
    return [np.concatenate(parts) for parts in per_stage]


def ridge_r2(train_x, train_y, test_x, test_y, ridge: float) -> np.ndarray:
    """Held-out R^2 per target dimension of a ridge regression on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    a = np.concatenate([a, np.ones((len(a), 1))], 1)
    b = np.concatenate([b, np.ones((len(b), 1))], 1)
    penalty = ridge * len(a) * np.eye(a.shape[1])
    penalty[-1, -1] = 0
    w = np.linalg.solve(a.T @ a + penalty, a.T @ train_y)
    residual = ((b @ w - test_y) ** 2).sum(0)
    total = ((test_y - test_y.mean(0)) ** 2).sum(0) + 1e-12
    return 1 - residual / total


def probe(train_x, train_y, test_x, test_y, ridges: list[float], val_frames: int):
    """``(test R^2 per dim, ridge)``: the ridge strength is picked on the last ``val_frames``
    training frames (a held-out training episode), then refit on all training frames."""
    fit_x, fit_y = train_x[:-val_frames], train_y[:-val_frames]
    val_x, val_y = train_x[-val_frames:], train_y[-val_frames:]
    best = max(ridges, key=lambda r: ridge_r2(fit_x, fit_y, val_x, val_y, r).mean())
    return ridge_r2(train_x, train_y, test_x, test_y, best), best


def check_probe(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from imagine_rl.worldmodels import CPCSpec, Encoder, GreedyInfoMax, LayerFactory, SequenceCPC

    start = time.perf_counter()
    episodes, state_names = collect(args)
    collect_s = time.perf_counter() - start
    train_eps, test_eps = episodes[: -args["holdout"]], episodes[-args["holdout"] :]
    action_dim = episodes[0]["action"].shape[-1]
    spec = CPCSpec(horizons=3, dim=64)
    rng = np.random.default_rng(args["seed"] + 1)

    def sample_batch():
        B, T = args["seq_batch"], args["seq_length"]
        pix, act = [], []
        for _ in range(B):
            ep = train_eps[rng.integers(len(train_eps))]
            t0 = rng.integers(len(ep["pixels"]) - T + 1)
            pix.append(ep["pixels"][t0 : t0 + T])
            act.append(ep["action"][t0 : t0 + T])
        pixels = torch.from_numpy(np.stack(pix)).float() / 255.0 - 0.5
        is_first = torch.zeros(B, T)
        is_first[:, 0] = 1
        return {"pixels": pixels}, torch.from_numpy(np.stack(act)), is_first

    def build(seed: int):
        torch.manual_seed(seed)
        factory = LayerFactory()
        encoder = Encoder({"pixels": (3, 64, 64)}, 64, 1, args["depth"], factory)
        return encoder, factory

    encoders: dict[str, Any] = {}
    timings: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    # Untrained baseline.
    encoders["random_init"], _ = build(args["seed"])
    # End to end: one CPC loss on the last stage, backprop through every stage.
    encoder, factory = build(args["seed"])
    head = SequenceCPC(encoder.embed_dim, encoder.embed_dim, action_dim, spec, factory, "e2e_")
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=args["probe_lr"])
    losses["end_to_end"] = []
    t0 = time.perf_counter()
    for _ in range(args["train_steps"]):
        obs, action, is_first = sample_batch()
        z = encoder(obs)
        loss, _ = head(z, z, action, is_first)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses["end_to_end"].append(loss.item())
    timings["end_to_end"] = time.perf_counter() - t0
    encoders["end_to_end"] = encoder
    # Greedy InfoMax: each module its own loss and optimizer.
    encoder, factory = build(args["seed"])
    gim = GreedyInfoMax(encoder, args["modules"], action_dim, spec, factory)
    opts = [
        torch.optim.Adam(gim.module_parameters(i), lr=args["probe_lr"])
        for i in range(gim.num_modules)
    ]
    losses["greedy"] = []
    t0 = time.perf_counter()
    for _ in range(args["train_steps"]):
        obs, action, is_first = sample_batch()
        _, metrics = gim.train_step(obs, action, is_first, opts)
        losses["greedy"].append(metrics[f"gim{gim.num_modules - 1}_loss"].item())
    timings["greedy"] = time.perf_counter() - t0
    encoders["greedy"] = encoder

    train_pix = np.concatenate([e["pixels"] for e in train_eps])
    test_pix = np.concatenate([e["pixels"] for e in test_eps])
    # Targets: the configuration (positions, angles), which one frame shows; velocities need
    # several frames and are reported per dimension only.
    targets = [i for i, n in enumerate(state_names) if "velocity" not in n]
    train_y = np.concatenate([e["state"] for e in train_eps])
    test_y = np.concatenate([e["state"] for e in test_eps])
    val_frames = len(train_eps[-1]["pixels"])
    probes: dict[str, list[dict[str, Any]]] = {}
    for name, enc in encoders.items():
        probes[name] = []
        for stage, (a, b) in enumerate(
            zip(stage_features(enc, train_pix), stage_features(enc, test_pix))
        ):
            r2, ridge = probe(a, train_y, b, test_y, args["ridges"], val_frames)
            probes[name].append(
                {
                    "stage": stage,
                    "features": a.shape[1],
                    "ridge": ridge,
                    "r2": {n: round(float(v), 4) for n, v in zip(state_names, r2)},
                    "r2_mean": round(float(r2[targets].mean()), 4),
                }
            )
    # Greedy module i ends at the last stage of its range.
    module_ends = [stop // 3 - 1 for _, stop in gim.bounds]
    e2e_final = probes["end_to_end"][-1]["r2_mean"]
    fractions = [
        round(probes["greedy"][end]["r2_mean"] / e2e_final, 4) if e2e_final > 0 else None
        for end in module_ends
    ]
    for name, rows in probes.items():
        print(f"{name:>12}: R^2 mean per stage " + " ".join(f"{r['r2_mean']:.3f}" for r in rows))
    print(f"greedy module R^2 / end-to-end last stage: {fractions}")
    return {
        "check": "probe",
        "env": args["env"],
        "distractors": args["distractors"],
        "frames": {"train": len(train_pix), "test": len(test_pix)},
        "state_dims": state_names,
        "r2_mean_over": [state_names[i] for i in targets],
        "train_steps": args["train_steps"],
        "batch": [args["seq_batch"], args["seq_length"]],
        "modules": gim.num_modules,
        "module_end_stages": module_ends,
        "probes": probes,
        "greedy_fraction_of_end_to_end": fractions,
        "final_losses": {k: round(float(np.mean(v[-20:])), 4) for k, v in losses.items()},
        "first_losses": {k: round(float(np.mean(v[:20])), 4) for k, v in losses.items()},
        "seconds": {"collect": round(collect_s, 1), **{k: round(v, 1) for k, v in timings.items()}},
    }


def main(argv: list[str]) -> int:
    import torch

    from imagine_rl.runtime.config import ConfigError

    try:
        args = harness.parse(argv, DEFAULTS, __doc__)
        if args["check"] not in ("mi", "probe"):
            raise ConfigError(f"check: expected 'mi' or 'probe', got {args['check']!r}")
        if args["check"] == "probe":
            probe_env_config(args)  # a bad env setting fails here, before any work
    except ConfigError as error:
        return harness.error(error)
    torch.set_num_threads(max(1, args["threads"]))
    start = time.perf_counter()
    report = check_mi(args) if args["check"] == "mi" else check_probe(args)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["args"] = args
    if args["json"]:
        harness.write_json(args["json"], report)
    return 0


if __name__ == "__main__":
    harness.run(main)
