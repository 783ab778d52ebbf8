"""Behaviour of the ``sparse`` package: masks, distributions, SET/RigL updates, fast path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from imagine_rl.sparse import SparseConfig, balanced_block_linear, kernels, sparsify
from imagine_rl.sparse.distribution import LayerBudget, allocate_units
from imagine_rl.sparse.masks import block_view


def mlp(sizes=(32, 64, 64, 16), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cfg(**kw) -> SparseConfig:
    base = dict(
        density=0.2,
        method="rigl",
        distribution="uniform",
        block=1,
        update_every=2,
        total_steps=1000,
        fast_path="off",
        seed=0,
    )
    base.update(kw)
    return SparseConfig(**base)


def train(model, sp, steps, opt=None, batch=16, in_dim=32, wd=0.0):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=wd)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(batch, in_dim, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sp.step(opt)
    return opt


def assert_counts(sp):
    for la in sp.sparse_layers:
        mask = la.p.mask
        assert int(mask.count_nonzero()) == la.nnz
        assert int(block_view(mask, la.block).sum()) == la.blocks
        assert int(la.original.count_nonzero()) <= la.nnz
        assert bool((la.original[mask == 0] == 0).all())
        if la.balanced:
            per_row = block_view(mask, la.block).sum(1)
            assert bool((per_row == per_row[0]).all())


# ------------------------------------------------------------------------------ counts


@pytest.mark.parametrize("method", ["set", "rigl", "static"])
@pytest.mark.parametrize("block,balanced", [(1, False), (4, False), (8, True)])
def test_exact_counts_after_init_and_updates(method, block, balanced):
    model = mlp()
    sp = sparsify(
        model,
        cfg(
            method=method,
            block=block,
            balanced=balanced,
            distribution="erk",
            drop_fraction=0.5,
            drop_schedule="constant",
        ),
    )
    before = {la.name: la.nnz for la in sp.sparse_layers}
    masks0 = {k: v.clone() for k, v in sp.masks().items()}
    assert_counts(sp)
    train(model, sp, 20)
    assert_counts(sp)
    assert {la.name: la.nnz for la in sp.sparse_layers} == before
    changed = any(not torch.equal(masks0[k], v) for k, v in sp.masks().items())
    assert changed == (method != "static")
    assert sp.metrics()["sparse/updates"] == (0 if method == "static" else 10)


def test_global_budget_exact_for_unit_blocks():
    model = mlp((40, 72, 56, 12))
    for distribution in ("uniform", "erk"):
        for density in (0.05, 0.1, 0.33):
            sp = sparsify(copy.deepcopy(model), cfg(density=density, distribution=distribution))
            total = sum(la.numel for la in sp.sparse_layers)
            assert sum(la.nnz for la in sp.sparse_layers) == round(density * total)
            assert sp.metrics()["sparse/density"] == pytest.approx(density, abs=1 / total)


def _erk_reference(shapes, density):
    """Closed form, written independently: density_l = min(1, eps * sum(dims) / prod(dims))."""
    n = [math.prod(s) for s in shapes]
    score = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        eps = (density * sum(n) - sum(n[i] for i in dense)) / sum(
            score[i] * n[i] for i in range(len(n)) if i not in dense
        )
        new = {i for i in range(len(n)) if i not in dense and eps * score[i] > 1}
        if not new:
            return [1.0 if i in dense else eps * score[i] for i in range(len(n))]
        dense |= new


def test_erk_matches_closed_form_and_budget():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3),
        nn.Conv2d(16, 32, 3),
        nn.Flatten(),
        nn.Linear(32, 512),
        nn.Linear(512, 512),
        nn.Linear(512, 4),
    )
    sp = sparsify(model, cfg(density=0.1, distribution="erk"))
    shapes = [la.shape for la in sp.sparse_layers]
    expected = _erk_reference(shapes, 0.1)
    assert expected[-1] == 1.0  # the small head is capped at dense and the budget redistributed
    for la, d in zip(sp.sparse_layers, expected):
        assert abs(la.nnz - d * la.numel) <= 1, (la.name, la.nnz, d * la.numel)
    total = sum(la.numel for la in sp.sparse_layers)
    assert sum(la.nnz for la in sp.sparse_layers) == round(0.1 * total)
    # ERK gives the large square layer a lower density than the thin ones.
    dens = {la.name: la.nnz / la.numel for la in sp.sparse_layers}
    assert dens["4.weight"] < dens["3.weight"]


def test_allocation_rounds_to_nearest_unit():
    layers = [LayerBudget("a", (64, 64), 16, 256), LayerBudget("b", (64, 128), 16, 512)]
    units = allocate_units(layers, 0.1, "uniform")
    target = 0.1 * (64 * 64 + 64 * 128)
    assert abs(sum(u * 16 for u in units) - target) <= 8


# ------------------------------------------------------------------------------ blocks


def _whole_blocks(mask: torch.Tensor, b: int) -> bool:
    out, inp = mask.shape[:2]
    k = math.prod(mask.shape[2:])
    grid = mask.reshape(out // b, b, inp // b, b, k)
    first = grid[:, :1, :, :1, :]
    return bool((grid == first).all())


def test_block_patterns_are_whole_blocks_linear_and_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 64), nn.Linear(64, 16))
    for b in (4, 8, 16):
        m = copy.deepcopy(model)
        sp = sparsify(m, cfg(block=b, density=0.25, method="set", drop_schedule="constant"))
        for la in sp.sparse_layers:
            assert _whole_blocks(la.p.mask, b), (b, la.name)
        for _ in range(3):
            sp.step()
        for la in sp.sparse_layers:
            assert _whole_blocks(la.p.mask, b), (b, la.name)
            assert int(la.p.mask.count_nonzero()) == la.nnz
    # A conv block covers b x b channels at one kernel tap: taps are independent.
    sp = sparsify(copy.deepcopy(model), cfg(block=4, density=0.25, skip=["2", "3"]))
    conv_mask = sp.sparse_layers[0].p.mask
    taps = {tuple(conv_mask[:, :, i, j].flatten().tolist()) for i in range(3) for j in range(3)}
    assert len(taps) > 1


def test_indivisible_block_dims_raise_clear_error():
    model = nn.Sequential(nn.Linear(30, 64), nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"'0\.weight'.*\(64, 30\).*divisible by 16"):
        sparsify(model, cfg(block=16))
    # Skipping the offending layers is the documented way out.
    sp = sparsify(model, cfg(block=16, skip=["0", "1"]))
    assert sp.sparse_layers == []


# ------------------------------------------------------------------------------ skip


def test_skip_patterns_keep_layers_dense():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 32)))
    model.add_module("head", nn.Linear(32, 4))
    sp = sparsify(model, cfg(skip=["encoder.0", r"he.d\.weight"]))
    kinds = {r["name"]: r["sparse"] for r in sp.report()}
    assert kinds == {"encoder.0.weight": False, "encoder.1.weight": True, "head.weight": False}
    assert not hasattr(model.encoder[0], "parametrizations")
    assert not hasattr(model.head, "parametrizations")
    assert int(model.head.weight.count_nonzero()) == model.head.weight.numel()
    sp2 = sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), cfg(skip=["*"]))
    assert sp2.sparse_layers == []
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify(model, cfg())


def test_include_sparsifies_named_parameter():
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_hh = nn.Parameter(torch.randn(32, 32))
            self.inp = nn.Linear(8, 32)

        def forward(self, x, steps=3):
            h = torch.zeros(x.shape[0], 32)
            for _ in range(steps):
                h = torch.tanh(self.inp(x) + h @ self.w_hh.t())
            return h

    cell = Cell()
    sp = sparsify(
        cell, cfg(include=["w_hh"], skip=["inp"], density=0.25), example_inputs=torch.randn(4, 8)
    )
    (layer,) = sp.sparse_layers
    assert layer.name == "w_hh" and layer.nnz == 256
    assert int(cell.w_hh.count_nonzero()) <= 256
    rows = {r["name"]: r for r in sp.report()}
    # The input projection runs once per step: 3 applications per sample.
    assert rows["inp.weight"]["dense_flops"] == 2 * 8 * 32 * 3


def test_flops_report_conv_uses_output_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 16))
    sp = sparsify(model, cfg(density=0.5), example_inputs=torch.randn(2, 4, 6, 6))
    conv, lin = sp.report()
    assert conv["flops_per"] == "sample"
    assert conv["dense_flops"] == 2 * 8 * 4 * 9 * 36
    assert conv["sparse_flops"] == 2 * conv["nnz"] * 36
    assert lin["dense_flops"] == 2 * 8 * 36 * 16
    m = sp.metrics()
    expected = (conv["sparse_flops"] + lin["sparse_flops"]) / (
        conv["dense_flops"] + lin["dense_flops"]
    )
    assert m["sparse/flops_ratio"] == pytest.approx(expected)
    sp_no = sparsify(copy.deepcopy(model.__class__(nn.Conv2d(4, 8, 3))), cfg(density=0.5))
    assert sp_no.report()[0]["flops_per"] == "position"


# ------------------------------------------------------------------------------ RigL / SET


def test_rigl_regrows_top_gradient_inactive_positions():
    torch.manual_seed(0)
    lin = nn.Linear(6, 2, bias=False)
    sp = sparsify(
        lin,
        cfg(
            density=4 / 12,
            update_every=1,
            drop_fraction=0.5,
            drop_schedule="constant",
            stop_fraction=1.0,
        ),
    )
    (layer,) = sp.sparse_layers
    mask = torch.zeros(2, 6)
    mask.view(-1)[[0, 1, 2, 3]] = 1
    layer.p.mask.copy_(mask)
    with torch.no_grad():
        layer.original.copy_(torch.tensor([[0.1, -5.0, 0.2, 3.0, 0, 0], [0, 0, 0, 0, 0, 0]]))
    # Dense gradient C: large at an active (1) and a to-be-dropped (0) position; among the
    # positions inactive before the update the top-2 |C| are 7 and 10.
    grad = torch.tensor([[9.0, 8.0, 0.5, 0.1, 1.0, -2.0], [0.3, -6.0, 0.2, 1.5, 5.0, 0.4]])
    (lin.weight * grad).sum().backward()
    assert torch.equal(layer.p.captured_grad(), grad)
    assert torch.equal(layer.original.grad, grad * mask)
    sp.step()
    new = (layer.p.mask.view(-1) != 0).nonzero().flatten().tolist()
    assert new == [1, 3, 7, 10]
    w = layer.original.detach().view(-1)
    assert w[7] == 0 and w[10] == 0 and w[1] == -5.0 and w[3] == 3.0 and w[0] == 0 and w[2] == 0


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_frozen_layers_keep_mask_and_weights(method):
    """A layer whose weights do not train (requires_grad False, e.g. a pretrained perception
    kept frozen) is left out of drop-and-regrow: its mask and weights stay as they were, the
    trained layers' topology still changes, and every count stays exact."""
    torch.manual_seed(0)
    model = mlp([32, 32, 32, 8])
    sp = sparsify(model, cfg(method=method, update_every=1, drop_fraction=0.5))
    frozen, *trained = sp.sparse_layers
    frozen.original.requires_grad_(False)
    assert sp.training_layers == trained
    before = {la.name: (la.p.mask.clone(), la.original.detach().clone()) for la in sp.layers}
    train(model, sp, 4, opt=torch.optim.Adam([p for p in model.parameters() if p.requires_grad]))
    assert torch.equal(frozen.p.mask, before[frozen.name][0])
    assert torch.equal(frozen.original, before[frozen.name][1])
    assert all(not torch.equal(la.p.mask, before[la.name][0]) for la in trained)
    assert_counts(sp)


def test_dense_gradient_capture_follows_zero_grad_and_accumulation():
    torch.manual_seed(0)
    model = mlp((8, 16, 4))
    sp = sparsify(model, cfg(density=0.3, update_every=3))
    layer = sp.sparse_layers[0]
    ref = copy.deepcopy(model)
    with torch.no_grad():  # a dense copy with the same effective weights
        sd = {
            k.replace("parametrizations.weight.original", "weight"): v
            for k, v in model.state_dict().items()
            if not k.endswith(".mask")
        }
    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    dense.load_state_dict(sd)
    del ref
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    xs = [torch.randn(5, 8) for _ in range(4)]
    for i in range(2):  # steps 1, 2: the update comes after step 3, so step 3 is armed
        opt.zero_grad()
        model(xs[i]).sum().backward()
        opt.step()
        sp.step(opt)
        assert layer.p.captured_grad() is None
    assert layer.p.capture
    # Junk pass, then zero_grad, then two accumulated passes: only the last two count.
    model(xs[0]).pow(3).sum().backward()
    opt.zero_grad()
    model(xs[2]).sum().backward()
    model(xs[3]).sum().backward()
    dense.zero_grad()
    dense(xs[2]).sum().backward()
    dense(xs[3]).sum().backward()
    torch.testing.assert_close(layer.p.captured_grad(), dense[0].weight.grad)
    torch.testing.assert_close(layer.original.grad, dense[0].weight.grad * layer.p.mask)


def test_dense_gradient_capture_with_recurrent_reuse():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    sp = sparsify(lin, cfg(density=0.25, update_every=1))
    dense = nn.Linear(16, 16)
    with torch.no_grad():
        dense.weight.copy_(lin.weight)
        dense.bias.copy_(lin.bias)
    x = torch.randn(3, 16)

    def unroll(f):
        h = x
        for _ in range(4):
            h = torch.tanh(f(h))
        return h.sum()

    unroll(lin).backward()
    unroll(dense).backward()
    torch.testing.assert_close(sp.sparse_layers[0].p.captured_grad(), dense.weight.grad)


def test_set_regrows_zero_weights_among_inactive():
    model = mlp()
    sp = sparsify(
        model,
        cfg(method="set", density=0.2, update_every=5, drop_fraction=0.3, drop_schedule="constant"),
    )
    train(model, sp, 4)
    before = {la.name: la.p.mask.clone() for la in sp.sparse_layers}
    train(model, sp, 1)
    for la in sp.sparse_layers:
        old, new = before[la.name] != 0, la.p.mask != 0
        grown = new & ~old
        assert int(grown.sum()) == math.floor(0.3 * la.nnz + 0.5)
        assert bool((la.original.detach()[grown] == 0).all())


def test_optimizer_state_of_new_and_pruned_connections_is_zero():
    model = mlp()
    sp = sparsify(model, cfg(method="rigl", density=0.2, update_every=5, drop_fraction=0.3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, sp, 4, opt=opt)
    before = {la.name: la.p.mask.clone() for la in sp.sparse_layers}
    train(model, sp, 1, opt=opt)
    for la in sp.sparse_layers:
        old, new = before[la.name] != 0, la.p.mask != 0
        changed = old ^ new
        assert changed.any()
        state = opt.state[la.original]
        for key in ("exp_avg", "exp_avg_sq"):
            assert bool((state[key][changed] == 0).all()), key
            assert bool((state[key][~new] == 0).all()), key
            assert state[key][old & new].abs().sum() > 0


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.5),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.5),
    ],
)
def test_pruned_weights_stay_zero_with_weight_decay(make_opt):
    model = mlp()
    opt = make_opt(model.parameters())  # built before sparsify: same Parameter objects
    sp = sparsify(model, cfg(method="set", density=0.2, update_every=3))
    gen = torch.Generator().manual_seed(0)
    for i in range(10):
        opt.zero_grad()
        model(torch.randn(8, 32, generator=gen)).pow(2).mean().backward()
        opt.step()
        for la in sp.sparse_layers:  # zero right after the optimizer step (post-hook)
            assert bool((la.original[la.p.mask == 0] == 0).all()), (i, la.name)
        sp.step(opt)
    assert_counts(sp)
    for la in sp.sparse_layers:
        assert la.original.grad[la.p.mask == 0].abs().max() == 0


# ------------------------------------------------------------------------------ schedule


def test_cosine_and_constant_drop_schedule():
    c = SparseConfig(
        drop_fraction=0.4,
        drop_schedule="cosine",
        total_steps=1000,
        stop_fraction=0.5,
        update_every=100,
    )
    assert c.stop_step == 500
    assert c.drop_fraction_at(0) == pytest.approx(0.4)
    assert c.drop_fraction_at(250) == pytest.approx(0.2)
    assert c.drop_fraction_at(125) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert c.drop_fraction_at(500) == 0.0 and c.drop_fraction_at(900) == 0.0
    assert [s for s in range(1, 1001) if c.is_update_step(s)] == [100, 200, 300, 400]
    k = SparseConfig(drop_fraction=0.4, drop_schedule="constant", total_steps=1000)
    assert k.drop_fraction_at(10) == k.drop_fraction_at(700) == 0.4
    assert k.drop_fraction_at(750) == 0.0
    assert not SparseConfig(method="static").is_update_step(100)


def test_config_validation_and_mapping():
    with pytest.raises(ValueError, match="sparse.block"):
        SparseConfig(block=3)
    with pytest.raises(ValueError, match="sparse.density"):
        SparseConfig(density=0.0)
    with pytest.raises(ValueError, match="sparse.method"):
        SparseConfig(method="prune")
    c = SparseConfig.from_dict({"enabled": True, "density": 0.05, "method": "set", "block": 16})
    assert (c.density, c.method, c.block) == (0.05, "set", 16)
    with pytest.raises(ValueError, match="unknown key"):
        SparseConfig.from_dict({"densty": 0.1})


# ------------------------------------------------------------------------------ checkpoints


def test_state_dict_round_trip_weights_only(tmp_path):
    model = mlp()
    sp = sparsify(model, cfg(method="set", density=0.2, update_every=2))
    train(model, sp, 7)
    path = tmp_path / "sparse.pt"
    torch.save({"sparse": sp.state_dict(), "model": model.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)

    fresh = mlp(seed=5)
    sp2 = sparsify(fresh, cfg(method="set", density=0.2, update_every=2, seed=123))
    assert any(not torch.equal(a, b) for a, b in zip(sp.masks().values(), sp2.masks().values()))
    sp2.load_state_dict(loaded["sparse"])
    fresh.load_state_dict(loaded["model"])
    for (k, a), b in zip(sp.masks().items(), sp2.masks().values()):
        assert torch.equal(a, b), k
    assert sp2.step_count == 7
    # Same RNG and schedule position: the next SET update picks the same connections.
    sp.step()
    sp2.step()
    for a, b in zip(sp.masks().values(), sp2.masks().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ fast path


@pytest.fixture(autouse=True)
def fast_path_at_any_rows():
    """The fast-path tests feed a few rows; the kernel's row floor would send them dense."""
    floor = kernels.min_rows()
    kernels.set_min_rows(0)
    yield
    kernels.set_min_rows(floor)


def test_flop_counter_counts_the_fast_kernel_by_its_kept_blocks():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    out_f, in_f, block, k, n = 64, 128, 16, 2, 10
    active = torch.zeros(out_f // block, in_f // block, dtype=torch.bool)
    active[:, :k] = True
    idx = kernels.indices_from_mask(active)
    w = torch.randn(out_f, in_f, requires_grad=True)
    x = torch.randn(n, in_f, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        balanced_block_linear(x, w, idx, None, block).sum().backward()
    kept = out_f * k * block  # weights in the kept blocks
    # forward, then the input's and the weight's gradients: 2 FLOPs per kept weight per row.
    assert counter.get_total_flops() == 3 * 2 * n * kept


def test_fast_layer_runs_dense_masked_below_the_row_floor(monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    sp = sparsify(layer, cfg(block=16, balanced=True, density=0.25, fast_path="on", skip=[]))
    assert sp.sparse_layers[0].kernel == kernels.BALANCED_BMM
    calls = []
    kernel = kernels.balanced_block_linear
    monkeypatch.setattr(
        kernels, "balanced_block_linear", lambda *a: calls.append(a[0].shape) or kernel(*a)
    )
    kernels.set_min_rows(128)
    small, large = torch.randn(4, 31, 64), torch.randn(2, 64, 64)  # 124 and 128 rows
    reference = [nn.functional.linear(x, layer.weight, layer.bias) for x in (small, large)]
    outputs = [layer(small), layer(large)]
    assert calls == [large.shape]
    for output, ref in zip(outputs, reference):
        torch.testing.assert_close(output, ref)


@pytest.mark.parametrize(
    "block,shape,lead", [(16, (64, 128), (5,)), (4, (32, 48), (3, 7)), (1, (12, 20), (4,))]
)
def test_fast_kernel_matches_dense_masked(block, shape, lead):
    torch.manual_seed(0)
    out_f, in_f = shape
    rows, cols = out_f // block, in_f // block
    k = max(1, cols // 4)
    active = torch.zeros(rows, cols, dtype=torch.bool)
    active.scatter_(1, torch.rand(rows, cols).topk(k, dim=1).indices, True)
    idx = kernels.indices_from_mask(active)
    mask = active.repeat_interleave(block, 0).repeat_interleave(block, 1).double()
    w = torch.randn(out_f, in_f, dtype=torch.double).requires_grad_()
    b = torch.randn(out_f, dtype=torch.double, requires_grad=True)
    x = torch.randn(*lead, in_f, dtype=torch.double, requires_grad=True)
    y_ref = nn.functional.linear(x, w * mask, b)
    y = balanced_block_linear(x, w, idx, b, block)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y)
    g_ref = torch.autograd.grad(y_ref, (x, w, b), gy)
    g = torch.autograd.grad(y, (x, w, b), gy)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r)
    assert g[1][mask == 0].abs().max() == 0
    # Chunked (tiny workspace) gives the same numbers.
    limit = kernels.workspace_limit()
    kernels.set_workspace_limit(1)
    try:
        y2 = balanced_block_linear(x, w, idx, b, block)
        g2 = torch.autograd.grad(y2, (x, w, b), gy)
    finally:
        kernels.set_workspace_limit(limit)
    torch.testing.assert_close(y2, y_ref)
    for a, r in zip(g2, g_ref):
        torch.testing.assert_close(a, r)


def test_fast_path_layers_match_dense_masked_and_follow_updates():
    torch.manual_seed(0)
    model = mlp((64, 128, 128, 16))
    c = cfg(
        block=16,
        balanced=True,
        density=0.25,
        method="rigl",
        update_every=2,
        fast_path="on",
        skip=["4"],
    )
    sp = sparsify(model, c)
    assert [la.kernel for la in sp.sparse_layers] == [kernels.BALANCED_BMM] * 2
    assert sp.metrics()["sparse/fast_layers"] == 2
    x = torch.randn(4, 6, 64)

    def run(m):
        for p in m.parameters():
            p.grad = None
        xx = x.clone().requires_grad_()
        y = m(xx)
        y.pow(2).sum().backward()
        return [y.detach(), xx.grad] + [p.grad.clone() for p in m.parameters()]

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):  # through topology updates (armed steps run dense-masked)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sp.step(opt)
    for la in sp.sparse_layers:
        assert torch.equal(la.p.idx, kernels.indices_from_mask(block_view(la.p.mask, 16)))
    sp.step()  # the next step is not armed: fast path active
    assert not sp.sparse_layers[0].p.capture
    fast = run(model)
    ref = copy.deepcopy(model)
    assert ref[0].forward.__self__ is ref[0]  # the kernel-forward follows the copy
    for layer in ref.modules():
        if hasattr(layer, "parametrizations"):
            layer.parametrizations.weight[0].fast = False
    dense = run(ref)
    for a, r in zip(fast, dense):
        torch.testing.assert_close(a, r)


def test_choose_kernel_is_measured_and_cached():
    kernels.clear_decisions()
    name = kernels.choose_kernel(32, 32, 1, 16, batch=8, reps=1)
    assert name in (kernels.BALANCED_BMM, kernels.DENSE_MASKED)
    assert kernels.choose_kernel(32, 32, 1, 16, batch=8, reps=1) == name
    (row,) = kernels.decisions()
    assert row["kernel"] == name and row["dense_masked_ms"] > 0 and row["fast_ms"] > 0


def test_remove_bakes_masks():
    model = mlp()
    sp = sparsify(model, cfg(density=0.2))
    masks = sp.masks()
    x = torch.randn(3, 32)
    y = model(x)
    sp.remove()
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    torch.testing.assert_close(model(x), y)
    assert int(model[0].weight.count_nonzero()) <= int(masks["0.weight"].sum())


def test_fast_path_training_equals_dense_masked_training():
    def build(fast):
        torch.manual_seed(0)
        model = mlp((32, 64, 64, 16))
        c = cfg(block=8, balanced=True, density=0.25, update_every=3, fast_path=fast, skip=["4"])
        return model, sparsify(model, c)

    runs = []
    for fast in ("on", "off"):
        model, sp = build(fast)
        train(model, sp, 8)
        runs.append((model, sp))
    (a, sa), (b, sb) = runs
    assert sa.sparse_layers[0].kernel == kernels.BALANCED_BMM
    assert sb.sparse_layers[0].kernel == kernels.DENSE_MASKED
    for (k, m1), m2 in zip(sa.masks().items(), sb.masks().values()):
        assert torch.equal(m1, m2), k
    for p1, p2 in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)


def test_linear_subclass_with_own_forward_stays_dense_masked():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    layer = Scaled(32, 32)
    sp = sparsify(layer, cfg(block=16, balanced=True, density=0.5, fast_path="on"))
    assert sp.sparse_layers[0].kernel == kernels.DENSE_MASKED
    x = torch.randn(2, 32)
    torch.testing.assert_close(layer(x), 2.0 * nn.functional.linear(x, layer.weight, layer.bias))


def test_parametrize_cached_and_frozen_model():
    model = mlp((16, 32, 8))
    sparsify(model, cfg(method="set", density=0.25, update_every=2))
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.nn.utils.parametrize.cached():
        w = model[0].weight
        assert model[0].weight is w
        y = model(x)
    torch.testing.assert_close(model(x), y)
    frozen = copy.deepcopy(model).requires_grad_(False)
    xx = x.clone().requires_grad_()
    frozen(xx).sum().backward()  # gradients to the inputs through a frozen sparse model
    assert xx.grad is not None


def test_block_structure_refuses_included_3d_parameters():
    class GroupedLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 16, 16))

    model = torch.nn.Sequential(GroupedLinear())
    config = SparseConfig(density=0.5, method="static", block=4, include=["0.weight"])
    with pytest.raises(ValueError, match="sparse.block=1"):
        sparsify(model, config)
    # Unstructured sparsity of the same parameter is fine.
    sparsifier = sparsify(model, SparseConfig(density=0.5, method="static", include=["0.weight"]))
    assert sparsifier.metrics()["sparse/density"] == pytest.approx(0.5)
