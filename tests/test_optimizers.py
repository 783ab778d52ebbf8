"""``runtime.optimizers.LaProp`` (``agent.optimizer=laprop``) against steps computed by hand."""

from __future__ import annotations

import io
import math

import pytest
import torch

from imagine_rl.runtime.optimizers import LaProp
from imagine_rl.runtime.profiling import count_dispatch

torch.set_num_threads(1)

# Two tensors: a matrix whose step-1 gradient AGC clips (|g| = 5 > 0.3 |p| = 0.91), and a zero
# vector, whose parameter norm is below the floor (0.3 * max(1e-3, 0) = 3e-4 bounds |g|).
P1 = [[1.0, -2.0], [0.5, 2.0]]
P2 = [0.0, 0.0, 0.0]
GRADS = [
    ([[3.0, 0.0], [-4.0, 0.0]], [1e-4, -2e-4, 0.0]),  # step 1: clips P1's, not P2's (2.2e-4)
    ([[0.1, 0.2], [-0.1, 0.4]], [0.3, 0.4, 0.0]),  # step 2: clips P2's (0.5), P1's not
]


def _flat(x):
    return [v for row in x for v in row] if isinstance(x[0], list) else list(x)


def hand_steps(lr, warmup, eps, steps, agc=0.3, floor=1e-3, beta1=0.9, beta2=0.999):
    """The same steps in plain Python floats, one element at a time: DreamerV3's
    ``clip_by_agc`` -> ``scale_by_rms`` -> ``scale_by_momentum`` -> warm-up learning rate."""
    params = [_flat(P1), _flat(P2)]
    m = [[0.0] * len(p) for p in params]
    v = [[0.0] * len(p) for p in params]
    history = []
    for t, grads in enumerate(GRADS[:steps], start=1):
        rate = lr * min(1.0, (t - 1) / warmup) if warmup else lr  # count before the step
        for i, g in enumerate(map(_flat, grads)):
            gnorm = math.sqrt(sum(x * x for x in g))
            pnorm = math.sqrt(sum(x * x for x in params[i]))
            g = [x / max(1.0, gnorm / (agc * max(floor, pnorm))) for x in g]
            v[i] = [beta2 * a + (1 - beta2) * x * x for a, x in zip(v[i], g)]
            u = [x / (math.sqrt(a / (1 - beta2**t)) + eps) for x, a in zip(g, v[i])]
            m[i] = [beta1 * a + (1 - beta1) * x for a, x in zip(m[i], u)]
            params[i] = [p - rate * a / (1 - beta1**t) for p, a in zip(params[i], m[i])]
        history.append(([list(p) for p in params], [list(a) for a in m], [list(a) for a in v]))
    return history


def run(steps, **kwargs):
    p1 = torch.nn.Parameter(torch.tensor(P1))
    p2 = torch.nn.Parameter(torch.tensor(P2))
    opt = LaProp([p1, p2], **kwargs)
    out = []
    for g1, g2 in GRADS[:steps]:
        p1.grad, p2.grad = torch.tensor(g1), torch.tensor(g2)
        opt.step()
        out.append([p1.detach().flatten().tolist(), p2.detach().flatten().tolist()])
    return opt, (p1, p2), out


def test_first_step_is_minus_lr_times_sign():
    """Step 1 by hand: v = (1 - beta2) g^2 so the bias-corrected RMS is |g| and u = g / (|g| +
    eps) = sign(g) (AGC rescales g, not its sign); m_hat = u. So p moves by -lr * sign(g)."""
    _, _, out = run(1, lr=0.1, warmup=0)
    assert out[0][0] == pytest.approx([1.0 - 0.1, -2.0, 0.5 + 0.1, 2.0], abs=1e-7)
    assert out[0][1] == pytest.approx([-0.1, 0.1, 0.0], abs=1e-7)
    # eps sits outside the square root: u = g / (|g| + eps), with the AGC-clipped g.
    _, _, out = run(1, lr=0.1, warmup=0, eps=0.5)
    clipped = 3.0 * 0.3 * math.sqrt(9.25) / 5.0  # P1's first element after AGC
    assert out[0][0][0] == pytest.approx(1.0 - 0.1 * clipped / (clipped + 0.5), rel=1e-6)


@pytest.mark.parametrize(
    "lr, warmup, eps", [(0.1, 0, 1e-20), (0.1, 2, 1e-20), (0.05, 0, 1e-3)], ids=str
)
def test_matches_the_hand_computed_steps(lr, warmup, eps):
    opt, params, out = run(2, lr=lr, warmup=warmup, eps=eps)
    expected = hand_steps(lr, warmup, eps, 2)
    for step in range(2):
        for got, want in zip(out[step], expected[step][0]):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (step, got, want)
    for p, m, v in zip(params, expected[-1][1], expected[-1][2]):
        state = opt.state[p]
        assert float(state["step"]) == 2.0
        assert state["exp_avg"].flatten().tolist() == pytest.approx(m, rel=1e-5, abs=1e-9)
        assert state["exp_avg_sq"].flatten().tolist() == pytest.approx(v, rel=1e-5, abs=1e-15)
    if warmup:
        # The schedule is read at the count before the step: lr 0 at step 1, lr / 2 at step 2.
        assert out[0][0] == pytest.approx(_flat(P1)) and out[0][1] == pytest.approx(P2)
        assert float(opt.scheduled_lr()) == pytest.approx(lr / warmup)


def test_leaves_grads_alone_skips_missing_ones_and_makes_no_host_sync():
    opt, (p1, p2), _ = run(1, lr=0.1, warmup=0)
    p1.grad, p2.grad = torch.tensor(GRADS[1][0]), None
    before = p2.detach().clone()
    counted = count_dispatch(opt.step)
    assert counted.host_syncs == 0
    assert torch.equal(p1.grad, torch.tensor(GRADS[1][0]))  # read, never written
    assert torch.equal(p2.detach(), before) and float(opt.state[p2]["step"]) == 1.0
    assert float(opt.state[p1]["step"]) == 2.0


def test_state_dict_round_trips_with_weights_only():
    opt, (p1, p2), _ = run(2, lr=0.1, warmup=3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    q1, q2 = (torch.nn.Parameter(p.detach().clone()) for p in (p1, p2))
    other = LaProp([q1, q2], lr=1.0, warmup=0)  # the loaded groups carry lr and warmup
    other.load_state_dict(state)
    assert other.param_groups[0]["lr"] == 0.1 and other.param_groups[0]["warmup"] == 3
    for a, b in ((p1, q1), (p2, q2)):
        a.grad = b.grad = torch.full_like(a, 0.25)
    opt.step()
    other.step()
    assert torch.equal(p1, q1) and torch.equal(p2, q2)


def test_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="beta2"):
        LaProp(p, beta2=1.0)
    with pytest.raises(ValueError, match="warmup"):
        LaProp(p, warmup=-1)


# fp16: torch.amp.GradScaler steps LaProp (accelerator.precision=fp16, agent.optimizer=laprop).


def _scaled_backward(scaler, params, grads):
    """Backward of a loss whose gradient is ``grads``, scaled by ``scaler`` (a power of 2, so
    the scaled gradients are exactly ``scale * grads``)."""
    loss = sum((p * torch.tensor(g)).sum() for p, g in zip(params, grads))
    scaler.scale(loss).backward()


def _snapshot(opt, params):
    """Parameters, then each one's step, m and v (zeros before its first step, as created)."""
    tensors = [p.detach().clone() for p in params]
    for p in params:
        tensors += [t.clone() for t in opt._state(p).values()]
    return tensors


@pytest.mark.parametrize("unscale_first", [False, True], ids=["in-step", "unscale_-first"])
def test_grad_scaler_steps_laprop_on_the_device_as_the_plain_steps(unscale_first):
    """``GradScaler.step`` reads ``found_inf`` on the host (one sync per step) unless the
    optimizer declares ``_step_supports_amp_scaling``; LaProp takes ``found_inf`` (and
    ``grad_scale`` when the gradients are still scaled) on the device. The steps equal the
    unscaled ones: with ``unscale_first`` (as ``Accelerator`` does, to clip) the scaler
    unscales; without, LaProp divides by ``grad_scale``."""
    assert LaProp._step_supports_amp_scaling
    params = [torch.nn.Parameter(torch.tensor(P1)), torch.nn.Parameter(torch.tensor(P2))]
    opt = LaProp(params, lr=0.1, warmup=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _, _, plain = run(2, lr=0.1, warmup=0)
    for step in range(2):
        _scaled_backward(scaler, params, GRADS[step])
        assert torch.equal(params[0].grad, torch.tensor(GRADS[step][0]) * 2.0**10)  # scaled
        if unscale_first:
            scaler.unscale_(opt)
        counted = count_dispatch(lambda: scaler.step(opt))
        assert counted.host_syncs == 0
        scaler.update()
        opt.zero_grad()
        got = [p.detach().flatten().tolist() for p in params]
        assert got[0] == pytest.approx(plain[step][0], rel=1e-6, abs=1e-7)
        assert got[1] == pytest.approx(plain[step][1], rel=1e-6, abs=1e-7)
    assert float(opt.state[params[0]]["step"]) == 2.0
    assert float(scaler.get_scale()) == 2.0**10  # no overflow: the scale stays


def test_an_overflowed_step_changes_nothing_and_leaves_no_trace():
    """inf/nan gradients: the step is skipped on the device (no sync); parameters, moments
    and step counters stay bit for bit, the scale backs off, and the finite steps around the
    skipped ones are exactly the plain LaProp steps (also when the first step overflows)."""
    params = [torch.nn.Parameter(torch.tensor(P1)), torch.nn.Parameter(torch.tensor(P2))]
    opt = LaProp(params, lr=0.1, warmup=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _, _, plain = run(2, lr=0.1, warmup=0)
    overflow = ([[math.inf, 1.0], [0.0, 0.0]], [math.nan, 0.0, 0.0])
    for step in range(2):
        before = _snapshot(opt, params)
        _scaled_backward(scaler, params, overflow)
        counted = count_dispatch(lambda: scaler.step(opt))
        assert counted.host_syncs == 0
        scale = float(scaler.get_scale())
        scaler.update()
        assert float(scaler.get_scale()) == scale / 2  # backed off
        opt.zero_grad()
        after = _snapshot(opt, params)
        assert len(after) == len(before) and all(map(torch.equal, after, before))
        # The finite step after it is the plain LaProp step.
        _scaled_backward(scaler, params, GRADS[step])
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        got = [p.detach().flatten().tolist() for p in params]
        assert got[0] == pytest.approx(plain[step][0], rel=1e-6, abs=1e-7)
        assert got[1] == pytest.approx(plain[step][1], rel=1e-6, abs=1e-7)
        assert float(opt.state[params[0]]["step"]) == step + 1


def test_grad_scale_and_found_inf_as_arguments():
    """The same contract through ``step``'s arguments: ``found_inf = 0`` and ``grad_scale``
    compute the unscaled step bit for bit (a power-of-2 scale divides exactly); ``found_inf
    = 1`` changes nothing."""
    scaled = [torch.nn.Parameter(torch.tensor(P1)), torch.nn.Parameter(torch.tensor(P2))]
    opt = LaProp(scaled, lr=0.1, warmup=1)
    reference, (q1, q2), _ = run(2, lr=0.1, warmup=1)
    for grads in GRADS[:2]:
        for p, g in zip(scaled, grads):
            p.grad = torch.tensor(g) * 2.0**12
        opt.step(grad_scale=torch.tensor(2.0**12), found_inf=torch.zeros(()))
    assert torch.equal(scaled[0], q1) and torch.equal(scaled[1], q2)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[scaled[0]][key], reference.state[q1][key]), key
    before = _snapshot(opt, scaled)
    opt.step(grad_scale=torch.tensor(2.0**12), found_inf=torch.ones(()))
    assert all(map(torch.equal, _snapshot(opt, scaled), before))
