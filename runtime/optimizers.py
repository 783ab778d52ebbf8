"""Optimizers the agents build beside ``Accelerator.optimizer``'s Adam.

``LaProp``: the optimizer of current DreamerV3 (``embodied/jax/opt.py`` and the chain in
``dreamerv3/agent.py`` ``Agent._make_opt``), for ``agent.optimizer=laprop``. Per parameter
tensor ``p`` with gradient ``g``, at step ``t = 1, 2, ...``:

1. adaptive gradient clipping (AGC), per tensor:
   ``g <- g / max(1, |g| / (agc * max(agc_floor, |p|)))`` (Frobenius norms; ``agc = 0`` is off);
2. RMS scaling with a bias-corrected second moment:
   ``v <- beta2 * v + (1 - beta2) * g^2``, ``u = g / (sqrt(v / (1 - beta2^t)) + eps)``;
3. momentum on the scaled update (LaProp's order: scale first, then average):
   ``m <- beta1 * m + (1 - beta1) * u``, ``m_hat = m / (1 - beta1^t)``;
4. ``p <- p - lr_t * m_hat`` with a linear warm-up from 0:
   ``lr_t = lr * min(1, (t - 1) / warmup)`` (``lr`` when ``warmup = 0``). The schedule is read
   at the count before the step, as optax's ``scale_by_learning_rate`` does, so the first step
   moves nothing (it only fills the moments).

Every step is a few ``torch._foreach_*`` kernels over all tensors of a device and dtype, and
nothing is read back to the host: the step counters are device tensors, the clip factors, bias
corrections and scheduled rates are computed on the device. The state (``step``, ``exp_avg`` =
``m``, ``exp_avg_sq`` = ``v``) is plain tensors, so ``state_dict()`` loads with
``torch.load(weights_only=True)``.

fp16 (``torch.amp.GradScaler``): LaProp declares ``_step_supports_amp_scaling``, so the scaler
hands it ``found_inf`` (and ``grad_scale`` where the gradients are still scaled) instead of
reading ``found_inf`` on the host to decide whether to step, which is a sync per update. A
step with ``found_inf`` set changes nothing: its gradients are zeroed and every change (step
counter, moments, parameters) is multiplied by ``keep = (found_inf == 0)`` on the device.
With ``found_inf = 0`` it computes what the plain step computes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch


def _one_minus_power(beta: float, t: torch.Tensor) -> torch.Tensor:
    """``1 - beta ** t`` for ``0 <= beta < 1`` and step numbers ``t >= 1`` (any shape)."""
    if beta == 0:
        return torch.ones_like(t)
    return -torch.expm1(t * math.log(beta))


class LaProp(torch.optim.Optimizer):
    """AGC, then RMS scaling, then momentum, with linear warm-up; see the module docstring.

    A parameter whose ``.grad`` is None is skipped (its moments and step stay as they are).
    ``.grad`` is read, never written.
    """

    # GradScaler.step then passes found_inf / grad_scale instead of syncing on found_inf.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 4e-5,
        *,
        agc: float = 0.3,
        agc_floor: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-20,
        warmup: int = 1000,
    ) -> None:
        for name, value in (("lr", lr), ("agc", agc), ("agc_floor", agc_floor), ("eps", eps)):
            if value < 0:
                raise ValueError(f"LaProp: {name} must be >= 0, got {value}")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise ValueError(f"LaProp: {name} must be in [0, 1), got {value}")
        if warmup < 0:
            raise ValueError(f"LaProp: warmup must be >= 0, got {warmup}")
        defaults = dict(
            lr=lr,
            agc=agc,
            agc_floor=agc_floor,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            warmup=int(warmup),
        )
        super().__init__(params, defaults)

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            # float32 counter on the parameter's device (exact up to 2^24 steps), as Adam's.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure=None,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ):
        """One step. ``found_inf`` (0-d, > 0 where the fp16 gradients overflowed): a step that
        changes nothing, decided on the device; ``grad_scale`` (0-d): the gradients are still
        multiplied by it. ``torch.amp.GradScaler.step`` sets both as attributes of the
        optimizer (its contract for ``_step_supports_amp_scaling``); arguments override them.
        """
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # foreach kernels need one device and dtype per list.
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LaProp does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                states = [self._state(p) for p in params]
                self._update(
                    group,
                    params,
                    [p.grad for p in params],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                )
        return loss

    @staticmethod
    def _update(
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        steps: list[torch.Tensor],
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> None:
        """One step for tensors of one device and dtype.

        Shapes: each ``grads[i]``, ``exp_avgs[i]``, ``exp_avg_sqs[i]`` like ``params[i]``;
        ``steps[i]``, ``grad_scale`` and ``found_inf`` 0-d. Per-tensor scalars are computed as
        one ``[n]`` vector, then handed to the foreach kernels as a list of 0-d tensors.

        With ``found_inf`` every change is made on the device whatever its value, and
        multiplied away where it is set: step += keep; v and m decay by ``where(skip, 1,
        beta)`` and take zeroed gradients; p moves by ``keep * lr_t * m / bias1``. At
        ``found_inf = 0`` these are the plain step's numbers (``x * 1`` and ``where`` are exact).
        """
        beta1, beta2 = group["beta1"], group["beta2"]
        dtype, device = grads[0].dtype, grads[0].device
        copied = False  # whether grads is a list of our own tensors (not the .grad ones)
        skip = keep = None
        if found_inf is not None:
            skip = found_inf.to(device) > 0
            keep = (~skip).to(torch.float32)
            # An overflowed step's gradients hold inf or nan: zero them, so that every
            # quantity below stays finite and is then multiplied by keep = 0.
            zero = torch.zeros((), dtype=dtype, device=device)
            grads = [torch.where(skip, zero, g) for g in grads]
            copied = True
        if grad_scale is not None:  # gradients of the scaled loss: unscale a copy
            scale = grad_scale.to(device=device, dtype=dtype)
            if copied:
                torch._foreach_div_(grads, scale)
            else:
                grads = torch._foreach_div(grads, scale)
                copied = True

        def unless_skipped(value: float) -> float | torch.Tensor:
            """``value``, or 1 where the step is skipped (a decay that keeps the moment)."""
            if skip is None:
                return value
            return torch.where(skip, 1.0, value).to(dtype)

        # 1. AGC: a new list of clipped gradients (the .grad tensors stay untouched).
        if group["agc"] > 0:
            gnorm = torch.stack(torch._foreach_norm(grads)).float()
            pnorm = torch.stack(torch._foreach_norm(params)).float()
            upper = group["agc"] * pnorm.clamp(min=group["agc_floor"])
            factor = (1.0 / torch.clamp(gnorm / upper, min=1.0)).to(dtype)
            if copied:
                torch._foreach_mul_(grads, list(factor.unbind(0)))
            else:
                grads = torch._foreach_mul(grads, list(factor.unbind(0)))
                copied = True
        # (A list of 0-d tensors: the single-tensor overload reads it on the host on cpu.)
        torch._foreach_add_(steps, 1.0 if keep is None else [keep] * len(steps))
        t = torch.stack(steps)  # [n], the step number after this step's increment
        if keep is not None:
            t = t.clamp(min=1.0)  # a skipped first step leaves t = 0: keep the rates finite
        # 1 - beta^t as -expm1(t log beta): exact to float32 rounding where 1 - pow(beta, t)
        # loses digits to cancellation (1e-5 relative at beta2 = 0.999, t = 1).
        bias1 = _one_minus_power(beta1, t)
        bias2 = _one_minus_power(beta2, t)
        # The learning rate scheduled at the count before this step (optax's convention).
        if group["warmup"] > 0:
            rate = group["lr"] * torch.clamp((t - 1.0) / group["warmup"], max=1.0)
        else:
            rate = torch.full_like(t, group["lr"])
        # 2. RMS: v <- beta2 v + (1 - beta2) g^2; u = g / (sqrt(v / bias2) + eps).
        torch._foreach_mul_(exp_avg_sqs, unless_skipped(beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, list(bias2.to(dtype).unbind(0)))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        if copied:  # grads is already a copy: divide it in place
            torch._foreach_div_(grads, denom)
            scaled = grads
        else:
            scaled = torch._foreach_div(grads, denom)
        del denom
        # 3. Momentum on the scaled update: m <- beta1 m + (1 - beta1) u.
        torch._foreach_mul_(exp_avgs, unless_skipped(beta1))
        torch._foreach_add_(exp_avgs, scaled, alpha=1.0 - beta1)
        # 4. p <- p - lr_t * m / bias1 (times keep: 0 on a skipped step).
        step_size = rate / bias1
        if keep is not None:
            step_size = step_size * keep
        step_size = list(step_size.to(dtype).unbind(0))
        torch._foreach_sub_(params, torch._foreach_mul(exp_avgs, step_size))

    @torch.no_grad()
    def scheduled_lr(self) -> torch.Tensor:
        """The learning rate the last step used (0-d device tensor; no host sync): ``lr *
        min(1, (t - 1) / warmup)`` of the first group's first stepped parameter, ``0`` before
        any step."""
        group = self.param_groups[0]
        for p in group["params"]:
            state = self.state.get(p)
            if state:
                t = state["step"]
                if group["warmup"] > 0:
                    return group["lr"] * torch.clamp((t - 1.0) / group["warmup"], 0.0, 1.0)
                return torch.full_like(t, group["lr"])
        return torch.zeros((), device=group["params"][0].device)


def grad_norm(params: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (0-d, on the device; no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@dataclass
class Part:
    """One trainable part of an agent: its parameters and (for ``adam``) its Adam settings
    and global-norm clip (None: no clip)."""

    params: list[torch.Tensor]
    lr: float
    eps: float
    clip: float | None = None


class OptimizerPolicy:
    """How an agent's parts are optimised, in one place: ``adam`` / ``laprop``, separate or
    joint gradients, and Greedy InfoMax's per-module optimizers.

    - ``adam``: one Adam per part (``accelerator.optimizer``: fused, device-side), each part's
      gradients clipped to its own norm. ``step(loss, parts)`` takes one gradient of ``loss``
      for the named parts and steps each; an agent that steps parts one after the other (the
      DreamerV3 paper: world model, then behaviour) calls it once per stage, a joint agent once
      for all parts.
    - ``laprop``: one ``LaProp`` over every part (current DreamerV3); ``step`` must then name
      every part (one gradient of all losses), and adds ``train/grad_norm`` (before AGC),
      each part's norm and ``train/lr``.
    - ``greedy``: parameter lists of encoder modules that step their own Adam inside the
      forward pass (``greedy_step``), named ``greedy_<i>``; they need ``adam``.

    ``optimizers`` (name -> optimizer) is what checkpoints save: ``all`` (laprop) or the part
    names, then ``greedy_<i>``. ``load_state_dict`` refuses another policy's optimizers in one
    line naming the setting to use. Nothing here reads a tensor back to the host.
    """

    def __init__(
        self,
        accelerator: Any,
        parts: dict[str, Part],
        kind: str = "adam",
        laprop: dict[str, Any] | None = None,
        greedy: list[Part] | None = None,
    ) -> None:
        if kind not in ("adam", "laprop"):
            raise ValueError(f"optimizer: expected adam or laprop, got {kind!r}")
        if kind == "laprop" and greedy:
            raise ValueError(
                "agent.optimizer=laprop cannot train world_model.greedy_infomax.modules>0 "
                "(their optimizers step inside the forward pass); use agent.optimizer=adam"
            )
        self.accelerator = accelerator
        self.kind = kind
        self.parts = parts
        self.main: dict[str, torch.optim.Optimizer] = {}
        if kind == "laprop":
            params = [p for part in parts.values() for p in part.params]
            self.main["all"] = LaProp(params, **(laprop or {}))
        else:
            for name, part in parts.items():
                self.main[name] = accelerator.optimizer(part.params, lr=part.lr, eps=part.eps)
        self.greedy = [
            (accelerator.optimizer(part.params, lr=part.lr, eps=part.eps), part.clip)
            for part in greedy or []
        ]

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out = dict(self.main)
        out.update({f"greedy_{i}": opt for i, (opt, _) in enumerate(self.greedy)})
        return out

    def optimizer_of(self, part: str) -> torch.optim.Optimizer:
        """The optimizer that steps ``part`` (``all`` under laprop)."""
        return self.main["all"] if self.kind == "laprop" else self.main[part]

    def zero_grad(self) -> None:
        """Clear the gradients of every part (not of the greedy modules)."""
        for opt in self.main.values():
            opt.zero_grad(set_to_none=True)

    def step(
        self,
        loss: torch.Tensor,
        parts: list[str],
        after_step: Callable[[], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One gradient of ``loss`` for ``parts``, their steps, ``after_step()`` (e.g. sparse
        masks and factored graphs following the world model's step), then their gradients
        cleared. Returns ``train/grad_norm_<part>`` (and, under laprop, ``train/grad_norm`` and
        ``train/lr``) as 0-d device tensors.

        Each part's gradients come from the one backward pass; ``loss`` must not reach a part
        it does not name with a gradient it should not get (freeze it while building ``loss``).
        """
        accelerator = self.accelerator
        metrics: dict[str, torch.Tensor] = {}
        if self.kind == "laprop":
            if sorted(parts) != sorted(self.parts):
                raise ValueError(
                    f"optimizer=laprop steps every part at once ({sorted(self.parts)}), "
                    f"got {sorted(parts)}"
                )
            opt = self.main["all"]
            (metrics["train/grad_norm"],) = accelerator.backward_groups(loss, [(opt, None)])
            for name in parts:
                device = metrics["train/grad_norm"].device
                metrics[f"train/grad_norm_{name}"] = grad_norm(self.parts[name].params, device)
            opts = [opt]
        else:
            opts = [self.main[name] for name in parts]
            groups = [(self.main[name], self.parts[name].clip) for name in parts]
            for name, norm in zip(parts, accelerator.backward_groups(loss, groups)):
                metrics[f"train/grad_norm_{name}"] = norm
        for opt in opts:
            accelerator.step(opt)
        if after_step is not None:
            after_step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if self.kind == "laprop":
            metrics["train/lr"] = self.main["all"].scheduled_lr()
        return metrics

    def greedy_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Backward and step of one Greedy InfoMax module (inside the encoder's forward pass);
        returns its gradient norm."""
        clip = dict((id(opt), clip) for opt, clip in self.greedy)[id(optimizer)]
        norm = self.accelerator.backward(loss, optimizer, clip=clip)
        self.accelerator.step(optimizer)
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, now = set(state), set(self.optimizers)
        if saved != now:
            was = "laprop" if "all" in saved else "adam"
            raise ValueError(
                f"checkpoint was saved with agent.optimizer={was} (optimizers {sorted(saved)}), "
                f"this agent has {sorted(now)}: load it with agent.optimizer={was}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


__all__ = ["LaProp", "OptimizerPolicy", "Part", "grad_norm"]
