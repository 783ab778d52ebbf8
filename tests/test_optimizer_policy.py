"""``runtime.optimizers.OptimizerPolicy`` / ``Part`` / ``grad_norm`` alone, on a real cpu
accelerator, against norms and steps computed by hand (plain ``torch.optim.Adam`` on copies
with hand-clipped gradients)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.testing import assert_close

from imagine_rl.runtime.accelerator import make_accelerator
from imagine_rl.runtime.config import build_config
from imagine_rl.runtime.optimizers import LaProp, OptimizerPolicy, Part, grad_norm

torch.set_num_threads(1)

LR, EPS = 0.1, 1e-8
W1 = [3.0, -4.0]  # loss 0.5 * |w1|^2: gradient w1, norm 5
W2 = [1.0, 2.0, 2.0]  # loss 0.5 * |w2|^2: gradient w2, norm 3


@pytest.fixture(scope="module")
def acc():
    return make_accelerator(build_config(["accelerator=cpu", "preset=debug"]))


def params():
    return torch.nn.Parameter(torch.tensor(W1)), torch.nn.Parameter(torch.tensor(W2))


def quad(*ps):
    return sum(0.5 * p.square().sum() for p in ps)


def adam_reference(values, grad, clip=None, steps=1):
    """Plain (unfused) Adam on a copy, the gradient clipped to ``clip`` by hand."""
    p = torch.nn.Parameter(torch.tensor(values))
    opt = torch.optim.Adam([p], lr=LR, eps=EPS)
    for _ in range(steps):
        g = grad(p.detach())
        norm = math.sqrt(float(g.square().sum()))
        if clip is not None and norm > clip:
            g = g * (clip / (norm + 1e-6))  # clip_grad_norm_'s factor
        p.grad = g
        opt.step()
    return p.detach()


def test_grad_norm_is_global_l2_and_zero_without_gradients():
    w1, w2 = params()
    assert_close(grad_norm([w1, w2], torch.device("cpu")), torch.tensor(0.0))
    quad(w1, w2).backward()
    assert_close(grad_norm([w1, w2], torch.device("cpu")), torch.tensor(math.sqrt(25.0 + 9.0)))
    w3 = torch.nn.Parameter(torch.ones(2))  # no gradient: skipped
    assert_close(grad_norm([w1, w3], torch.device("cpu")), torch.tensor(5.0))


def test_adam_steps_only_the_named_part_and_reports_its_norm(acc):
    w1, w2 = params()
    policy = OptimizerPolicy(acc, {"a": Part([w1], LR, EPS), "b": Part([w2], LR, EPS)})
    assert set(policy.optimizers) == {"a", "b"}
    assert policy.optimizer_of("a") is policy.main["a"]
    metrics = policy.step(quad(w1), ["a"])
    assert set(metrics) == {"train/grad_norm_a"}
    assert_close(metrics["train/grad_norm_a"], torch.tensor(5.0))
    assert_close(w1.detach(), adam_reference(W1, lambda p: p))
    # Adam's first step moves each element by lr (times sign): exact check of the reference.
    assert_close(w1.detach(), torch.tensor(W1) - LR * torch.tensor([1.0, -1.0]))
    assert_close(w2.detach(), torch.tensor(W2))
    assert w1.grad is None and w2.grad is None  # cleared


def test_adam_clip_scales_the_gradient_of_its_part(acc):
    """Two steps, so Adam's normalisation does not hide the clip: the second step's gradient
    is clipped relative to the first's (the norm reported is the one before clipping)."""
    clip = 1.0
    w1, w2 = params()
    policy = OptimizerPolicy(acc, {"a": Part([w1], LR, EPS, clip), "b": Part([w2], LR, EPS)})
    norms = []
    for scale in (1.0, 0.1):  # second loss: scaled, so its gradient is 0.1 * w1
        norms.append(policy.step(scale * quad(w1), ["a"])["train/grad_norm_a"])
    first = torch.tensor(W1)
    assert_close(norms[0], torch.tensor(5.0))
    # Reference: the same two gradients, clipped by hand.
    p = torch.nn.Parameter(first.clone())
    opt = torch.optim.Adam([p], lr=LR, eps=EPS)
    for scale, expected_norm in zip((1.0, 0.1), norms):
        g = scale * p.detach().clone()
        norm = float(g.norm())
        assert_close(expected_norm, torch.tensor(norm))
        if norm > clip:
            g = g * (clip / (norm + 1e-6))
        p.grad = g
        opt.step()
    assert_close(w1.detach(), p.detach())
    # Unclipped, the result differs (the clip is in effect).
    unclipped = torch.nn.Parameter(first.clone())
    opt = torch.optim.Adam([unclipped], lr=LR, eps=EPS)
    for scale in (1.0, 0.1):
        unclipped.grad = scale * unclipped.detach().clone()
        opt.step()
    assert not torch.allclose(unclipped.detach(), w1.detach(), atol=1e-5, rtol=0)


def test_adam_joint_step_steps_both_with_norms_per_part(acc):
    w1, w2 = params()
    policy = OptimizerPolicy(acc, {"a": Part([w1], LR, EPS, 2.0), "b": Part([w2], LR, EPS)})
    metrics = policy.step(quad(w1, w2), ["a", "b"])
    assert set(metrics) == {"train/grad_norm_a", "train/grad_norm_b"}
    assert_close(metrics["train/grad_norm_a"], torch.tensor(5.0))
    assert_close(metrics["train/grad_norm_b"], torch.tensor(3.0))
    assert_close(w1.detach(), adam_reference(W1, lambda p: p, clip=2.0))
    assert_close(w2.detach(), adam_reference(W2, lambda p: p))
    assert w1.grad is None and w2.grad is None


def test_after_step_runs_after_the_steps_before_grads_are_cleared(acc):
    w1, w2 = params()
    policy = OptimizerPolicy(acc, {"a": Part([w1], LR, EPS), "b": Part([w2], LR, EPS)})
    seen = {}

    def after():
        seen["grad"] = w1.grad is not None and w2.grad is not None
        seen["stepped"] = not torch.equal(w1.detach(), torch.tensor(W1)) and not torch.equal(
            w2.detach(), torch.tensor(W2)
        )

    policy.step(quad(w1, w2), ["a", "b"], after_step=after)
    assert seen == {"grad": True, "stepped": True}
    assert w1.grad is None and w2.grad is None


def test_laprop_steps_everything_and_reports_lr(acc):
    w1, w2 = params()
    laprop = dict(lr=0.01, agc=0.0, warmup=0, eps=1e-20)
    policy = OptimizerPolicy(
        acc, {"a": Part([w1], LR, EPS), "b": Part([w2], LR, EPS)}, "laprop", laprop
    )
    assert set(policy.optimizers) == {"all"}
    assert isinstance(policy.optimizer_of("a"), LaProp)
    assert policy.optimizer_of("a") is policy.optimizer_of("b")
    metrics = policy.step(quad(w1, w2), ["b", "a"])
    assert set(metrics) == {
        "train/grad_norm",
        "train/grad_norm_a",
        "train/grad_norm_b",
        "train/lr",
    }
    assert_close(metrics["train/grad_norm"], torch.tensor(math.sqrt(34.0)))
    # Per-part norms are read before the step clears the gradients.
    assert_close(metrics["train/grad_norm_a"], torch.tensor(5.0))
    assert_close(metrics["train/grad_norm_b"], torch.tensor(3.0))
    assert_close(metrics["train/lr"], torch.tensor(0.01))
    # First LaProp step without warm-up: u = g / |g| elementwise (bias-corrected), m_hat = u,
    # so every element moves by lr * sign(g).
    assert_close(w1.detach(), torch.tensor(W1) - 0.01 * torch.tensor([1.0, -1.0]))
    assert_close(w2.detach(), torch.tensor(W2) - 0.01)
    assert w1.grad is None and w2.grad is None


def test_laprop_warmup_lr_metric_starts_at_zero(acc):
    w1, w2 = params()
    policy = OptimizerPolicy(
        acc, {"a": Part([w1], LR, EPS), "b": Part([w2], LR, EPS)}, "laprop", dict(warmup=4)
    )
    first = policy.step(quad(w1, w2), ["a", "b"])
    assert_close(first["train/lr"], torch.tensor(0.0))
    assert_close(w1.detach(), torch.tensor(W1))  # the first step moves nothing
    second = policy.step(quad(w1, w2), ["a", "b"])
    assert_close(second["train/lr"], torch.tensor(4e-5 / 4))


def test_laprop_subset_of_parts_and_greedy_are_refused(acc):
    w1, w2 = params()
    parts = {"a": Part([w1], LR, EPS), "b": Part([w2], LR, EPS)}
    policy = OptimizerPolicy(acc, parts, "laprop")
    with pytest.raises(ValueError, match="laprop"):
        policy.step(quad(w1), ["a"])
    w3 = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="laprop"):
        OptimizerPolicy(acc, parts, "laprop", greedy=[Part([w3], LR, EPS)])
    with pytest.raises(ValueError, match="adam or laprop"):
        OptimizerPolicy(acc, parts, "sgd")


def run_steps(policy, w1, w2, n):
    for i in range(n):
        policy.step((1.0 + i) * quad(w1, w2), ["a", "b"])


@pytest.mark.parametrize("kind", ["adam", "laprop"])
def test_state_dict_round_trip_continues_identically(acc, kind):
    laprop = dict(warmup=0, lr=0.01) if kind == "laprop" else None
    w1, w2 = params()
    first = OptimizerPolicy(acc, {"a": Part([w1], LR, EPS), "b": Part([w2], LR, EPS)}, kind, laprop)
    run_steps(first, w1, w2, 2)
    v1 = torch.nn.Parameter(w1.detach().clone())
    v2 = torch.nn.Parameter(w2.detach().clone())
    second = OptimizerPolicy(
        acc, {"a": Part([v1], LR, EPS), "b": Part([v2], LR, EPS)}, kind, laprop
    )
    # Through a checkpoint's bytes (an in-memory state_dict shares its moment tensors).
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    first.step(3.0 * quad(w1, w2), ["a", "b"])
    second.step(3.0 * quad(v1, v2), ["a", "b"])
    assert_close(v1.detach(), w1.detach(), rtol=0, atol=0)
    assert_close(v2.detach(), w2.detach(), rtol=0, atol=0)


def test_loading_adam_state_into_laprop_names_the_setting(acc):
    w1, w2 = params()
    adam = OptimizerPolicy(acc, {"a": Part([w1], LR, EPS), "b": Part([w2], LR, EPS)})
    adam.step(quad(w1, w2), ["a", "b"])
    laprop = OptimizerPolicy(acc, {"a": Part([w1], LR, EPS), "b": Part([w2], LR, EPS)}, "laprop")
    with pytest.raises(ValueError, match="agent.optimizer=adam"):
        laprop.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="agent.optimizer=laprop"):
        adam.load_state_dict(laprop.state_dict())


def test_greedy_step_steps_only_its_module_with_its_clip(acc):
    w1, w2 = params()
    g0 = torch.nn.Parameter(torch.tensor(W1))  # gradient norm 5, clip 1
    g1 = torch.nn.Parameter(torch.tensor(W2))
    policy = OptimizerPolicy(
        acc,
        {"a": Part([w1], LR, EPS)},
        greedy=[Part([g0], LR, EPS, clip=1.0), Part([g1], LR, EPS, clip=None)],
    )
    assert set(policy.optimizers) == {"a", "greedy_0", "greedy_1"}
    opt0 = policy.optimizers["greedy_0"]
    # Two steps (the second with a scaled loss) so that the clip shows in Adam's update.
    norms = []
    for scale in (1.0, 0.1):
        opt0.zero_grad(set_to_none=True)
        norms.append(policy.greedy_step(scale * quad(g0), opt0))
    assert_close(norms[0], torch.tensor(5.0))
    p = torch.nn.Parameter(torch.tensor(W1))
    ref = torch.optim.Adam([p], lr=LR, eps=EPS)
    for scale, norm in zip((1.0, 0.1), norms):
        g = scale * p.detach().clone()
        assert_close(norm, g.norm())
        p.grad = g * min(1.0, 1.0 / (float(g.norm()) + 1e-6))
        ref.step()
    assert_close(g0.detach(), p.detach())
    assert_close(w1.detach(), torch.tensor(W1))
    assert_close(g1.detach(), torch.tensor(W2))
    # zero_grad of the policy clears the parts, not the greedy modules.
    quad(w1).backward()
    policy.zero_grad()
    assert w1.grad is None and g0.grad is not None
