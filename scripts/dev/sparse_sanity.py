"""Sanity check of sparse training: an MLP at 90% sparsity trained with RigL, SET and a static
mask against the dense MLP, on a synthetic supervised task, over a few seeds.

    python scripts/dev/sparse_sanity.py [json=sparse_sanity.json] [seeds=3] [steps=3000]
        [density=0.1] [hidden=256] [distribution=erk] [methods=dense,static,set,rigl]

Task (generated, no download): inputs ``x ~ N(0, I_256)``, labels ``argmax`` of a fixed random
teacher MLP (16 -> 16 -> 4 classes, tanh) that reads only 16 of the 256 features (the rest are
distractors, so which connections a sparse first layer keeps matters); every batch is fresh (no
overfitting: capacity and optimization decide), 10k fixed test samples. Student: 256 -> hidden ->
hidden -> 4, Adam, batch 128. Sparse runs use ``sparse.sparsify`` on all three layers with the
given distribution (update every 100 steps, drop fraction 0.3 cosine-decayed to 0 at 75% of
training). Prints test accuracies and writes them with mean/std per method to the JSON file.
Runs on one CPU thread in about 2-3 minutes with the defaults.
"""

from __future__ import annotations

import statistics
import time

import harness
import torch
from torch import nn

from imagine_rl.sparse import SparseConfig, sparsify

DEFAULTS = {
    "json": "sparse_sanity.json",
    "seeds": 3,
    "steps": 3000,
    "density": 0.1,
    "hidden": 256,
    "distribution": "erk",
    "methods": "dense,static,set,rigl",
    "batch": 128,
    "lr": 2e-3,
    "threads": 1,
}


def parse_args(argv: list[str]) -> dict:
    from imagine_rl.runtime.config import ConfigError

    try:
        return harness.parse(argv, DEFAULTS, __doc__)
    except ConfigError as error:
        raise SystemExit(f"sparse_sanity: {error}") from None


class Teacher:
    """Labels ``argmax(tanh(x_S W1) W2)`` of a fixed random MLP that reads only ``informative``
    of the ``dim`` input features (the subset ``S``; the rest are distractors). Fresh inputs
    every batch."""

    def __init__(self, dim=256, informative=16, width=16, classes=4, seed=1234):
        gen = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.features = torch.randperm(dim, generator=gen)[:informative]
        self.w1 = torch.randn(informative, width, generator=gen) / informative**0.5
        self.w2 = torch.randn(width, classes, generator=gen) / width**0.5

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.dim, generator=gen)
        logits = torch.tanh(x[:, self.features] @ self.w1) @ self.w2
        return x, logits.argmax(dim=1)


def student(dim: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def run(method: str, seed: int, args: dict, teacher: Teacher, test) -> dict:
    torch.manual_seed(seed)
    model = student(teacher.dim, args["hidden"], teacher.w2.shape[1])
    sp = None
    if method != "dense":
        cfg = SparseConfig(
            density=args["density"],
            method=method,
            distribution=args["distribution"],
            block=1,
            drop_fraction=0.3,
            drop_schedule="cosine",
            update_every=100,
            stop_fraction=0.75,
            total_steps=args["steps"],
            seed=seed,
            fast_path="off",
        )
        sp = sparsify(model, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args["lr"])
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for _ in range(args["steps"]):
        x, y = teacher.sample(args["batch"], gen)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if sp is not None:
            sp.step(opt)
    with torch.no_grad():
        acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    out = {"method": method, "seed": seed, "test_acc": acc, "seconds": time.perf_counter() - t0}
    if sp is not None:
        m = sp.metrics()
        out.update(
            density=m["sparse/density"],
            flops_ratio=m["sparse/flops_ratio"],
            updates=m["sparse/updates"],
        )
    return out


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args["threads"])
    teacher = Teacher()
    test = teacher.sample(10_000, torch.Generator().manual_seed(99))
    methods = [m for m in args["methods"].split(",") if m]
    runs = []
    for seed in range(args["seeds"]):
        for method in methods:
            r = run(method, seed, args, teacher, test)
            runs.append(r)
            print(
                f"seed={seed} {method:>6}: test acc {r['test_acc']:.4f} ({r['seconds']:.1f} s)",
                flush=True,
            )
    summary = {}
    for method in methods:
        accs = [r["test_acc"] for r in runs if r["method"] == method]
        summary[method] = {
            "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accs": accs,
        }
        print(f"{method:>6}: {summary[method]['mean']:.4f} +- {summary[method]['std']:.4f}")
    result = {"args": args, "summary": summary, "runs": runs}
    harness.write_json(args["json"], result)
    return result


if __name__ == "__main__":
    harness.run(main)
