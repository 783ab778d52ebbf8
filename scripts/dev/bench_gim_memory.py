"""Peak activation memory of one update, end-to-end vs Greedy InfoMax.

``python scripts/dev/bench_gim_memory.py modules=4 json=out.json [config overrides ...]``

Builds a Dreamer agent on a synthetic pixel task (``3 x size x size`` images, a 1-d continuous
action; no env needed) for every ``representation`` in ``representations=`` and
``world_model.greedy_infomax.modules`` in ``{0, modules}``, runs ``warmup`` updates, then
measures one world-model step (``train_world_model``) and one full update (world model and
behaviour) on a fixed replay-shaped batch.

"Activation memory" is the bytes of the tensors autograd keeps for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``; parameters excluded, a storage counted once
while any saved reference to it lives). Greedy InfoMax frees each module's activations before
the next module runs and the world model consumes the detached encoder output, so its peak is
the largest single part rather than their sum. On CUDA the allocator's peak
(``torch.cuda.max_memory_allocated`` above the memory in use before the step) is reported too.

Keys: ``modules`` (4), ``representations`` (``reconstruction,cpc``), ``size`` (64),
``warmup`` (1), ``json`` (output path), ``threads`` (1); anything else is a ``train.py``
config override (default ``preset=dreamer_tiny``, ``accelerator=cpu``).
"""

from __future__ import annotations

import gc
import json
from typing import Any

import harness
import numpy as np

BENCH_DEFAULTS: dict[str, Any] = {
    "modules": 4,
    "representations": ["reconstruction", "cpc"],
    "size": 64,
    "warmup": 1,
    "json": None,
    "threads": 1,
}


class SavedActivations:
    """Live and peak bytes of tensors saved for backward inside the ``with`` block.

    Each saved tensor is wrapped in a holder that autograd keeps until the graph is freed;
    storages are counted once however many holders share them. Parameters are not counted.
    """

    def __init__(self, params) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in params}
        self._live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0
        self._hooks = None

    def _add(self, ptr: int, nbytes: int) -> None:
        entry = self._live.get(ptr)
        if entry is None:
            self._live[ptr] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1

    def _remove(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[ptr]

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._params or storage.nbytes() == 0:
            return tensor
        return _Held(self, tensor, ptr, storage.nbytes())

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def __enter__(self) -> SavedActivations:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Held:
    __slots__ = ("__weakref__", "meter", "ptr", "tensor")

    def __init__(self, meter: SavedActivations, tensor, ptr: int, nbytes: int) -> None:
        # A detached alias: holding the tensor itself would, for a saved output, close a cycle
        # (output -> grad_fn -> saved variable -> holder -> output) that Python cannot free.
        self.meter, self.tensor, self.ptr = meter, tensor.detach(), ptr
        meter._add(ptr, nbytes)

    def __del__(self) -> None:
        self.meter._remove(self.ptr)


def synthetic_batch(B: int, T: int, size: int, seed: int) -> dict[str, Any]:
    import torch

    rng = np.random.default_rng(seed)
    batch = {
        "pixels": torch.from_numpy(rng.integers(0, 256, (B, T, 3, size, size), dtype=np.uint8)),
        "action": torch.from_numpy(rng.uniform(-1, 1, (B, T, 1)).astype(np.float32)),
        "reward": torch.from_numpy(rng.normal(size=(B, T)).astype(np.float32)),
    }
    for key in ("is_first", "is_last", "is_terminal"):
        batch[key] = torch.zeros(B, T)
    batch["is_first"][:, 0] = 1
    return batch


def measure(overrides: dict[str, Any], size: int, warmup: int) -> dict[str, Any]:
    import gymnasium as gym
    import torch

    from imagine_rl import agents
    from imagine_rl.runtime.config import build_config

    config = build_config(overrides)
    obs_space = gym.spaces.Dict({"pixels": gym.spaces.Box(0, 255, (3, size, size), np.uint8)})
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    agent = agents.make_agent(config, obs_space, action_space)
    B, T = config.replay.batch_size, config.replay.batch_length
    batch = synthetic_batch(B, T, size, config.seed)
    for _ in range(warmup):
        agent.update(batch)
    cuda = agent.device.type == "cuda"
    params = [p for m in (agent.wm, agent.actor, agent.critic) for p in m.parameters()]
    out: dict[str, Any] = {
        "representation": config.world_model.representation,
        "greedy_modules": config.world_model.greedy_infomax.modules,
        "batch": [B, T],
        "image_size": size,
        "device": str(agent.device),
        "world_model_parameters": agent.num_parameters()["world_model"],
    }
    for phase in ("world_model", "update"):
        data = agent.preprocess(batch)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with SavedActivations(params) as meter:
            if phase == "world_model":
                agent.train_world_model(data)
            else:
                agent.update(batch)
        gc.collect()
        out[f"{phase}_peak_activation_bytes"] = meter.peak
        out[f"{phase}_peak_activation_mib"] = round(meter.peak / 2**20, 3)
        assert meter.current == 0, f"{meter.current} saved bytes still alive after the step"
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            out[f"{phase}_cuda_peak_bytes"] = peak
            out[f"{phase}_cuda_peak_mib"] = round(peak / 2**20, 3)
    return out


def main(argv: list[str]) -> int:
    import torch

    from imagine_rl.runtime.config import ConfigError, parse_overrides

    try:
        args, rest = harness.parse_with_rest(argv, BENCH_DEFAULTS, __doc__)
        overrides = parse_overrides(rest)
        overrides.setdefault("preset", "dreamer_tiny")
        overrides.setdefault("accelerator", "cpu")
        overrides.setdefault("agent", "dreamer")
    except ConfigError as error:
        return harness.error(error)
    torch.set_num_threads(max(1, args["threads"]))
    runs = []
    try:
        for representation in args["representations"]:
            for modules in (0, args["modules"]):
                run_overrides = {
                    **overrides,
                    "world_model.representation": representation,
                    "world_model.greedy_infomax.modules": modules,
                }
                result = measure(run_overrides, args["size"], args["warmup"])
                runs.append(result)
                print(
                    f"{representation:>20} modules={modules}: world-model step "
                    f"{result['world_model_peak_activation_mib']:.1f} MiB, full update "
                    f"{result['update_peak_activation_mib']:.1f} MiB"
                )
    except (ConfigError, ValueError) as error:
        return harness.error(error)
    ratios = {}
    for representation in args["representations"]:
        e2e, greedy = (r for r in runs if r["representation"] == representation)
        for phase in ("world_model", "update"):
            key = f"{phase}_peak_activation_bytes"
            ratios[f"{representation}/{phase}"] = round(greedy[key] / e2e[key], 4)
    report = {"overrides": overrides, "modules": args["modules"], "runs": runs, "ratios": ratios}
    print("greedy / end-to-end peak:", json.dumps(ratios))
    if args["json"]:
        harness.write_json(args["json"], report)
    return 0


if __name__ == "__main__":
    harness.run(main)
