"""The simulated IPU: identical results, enforced limits, emulated numerics, labelled estimates."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from test_dreamer import BOX, STATE, make, make_batch
from test_scripts import ROOT, run_script
from torch import nn

from imagine_rl import sparse
from imagine_rl.runtime.ipu_sim import (
    PRESETS,
    IPUConstraintError,
    IPUMemoryError,
    IPUShapeError,
    IPUSimAccelerator,
    SignatureGuard,
    estimate,
    estimate_pipeline,
    format_report,
    get_preset,
    round_fp16,
    stochastic_round_fp16,
)
from imagine_rl.runtime.ipu_sim.constraints import check_sparse_nnz, find_sparse_layers

torch.set_num_threads(1)
OBS = {"state": STATE}


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


def test_presets_are_tagged_and_match_the_vendor_figures():
    for preset in PRESETS.values():
        for name, constant in preset.constants().items():
            assert constant.tag in ("sourced", "derived", "assumed"), name
            assert constant.source, name
    ipu2, bow, ipu1, small = (get_preset(n) for n in ("ipu2", "bow", "ipu1", "small"))
    assert (ipu2.tiles.value, ipu2.tile_memory.value) == (1472, 624 * 1024)
    assert (ipu2.fp16_flops.value, ipu2.fp32_flops.value) == (250e12, 62.5e12)
    assert abs(ipu2.clock.value - 1.33e9) < 0.01e9
    assert (bow.clock.value, bow.fp16_flops.value, bow.tiles.value) == (1.85e9, 350e12, 1472)
    assert (ipu1.tiles.value, ipu1.tile_memory.value) == (1216, 256 * 1024)
    assert (ipu1.clock.value, ipu1.fp16_flops.value) == (1.6e9, 124.5e12)
    assert small.tiles.value == 4
    assert bow.fp32_flops.tag == "derived" and ipu2.sync_cycles.tag == "assumed"


# --------------------------------------------------------------------------------------
# Results are the host's: identical to cpu in fp32
# --------------------------------------------------------------------------------------


def test_dreamer_update_identical_on_cpu_and_ipu_sim_fp32():
    cpu = make(OBS, BOX)
    sim = make(OBS, BOX, "accelerator=ipu-sim")
    assert isinstance(sim.accelerator, IPUSimAccelerator)
    for step in range(2):  # the first step is recorded for the estimate, the second is not
        batch = make_batch(OBS, BOX, seed=step)
        torch.manual_seed(step)
        on_cpu = cpu.update(batch)
        torch.manual_seed(step)
        on_sim = {**sim.update(batch), **sim.log_metrics()}
        losses = [k for k in on_cpu if k.startswith("loss/")]
        assert len(losses) >= 7
        assert {k: float(on_cpu[k]) for k in losses} == {k: float(on_sim[k]) for k in losses}
    for key, value in cpu.state_dict()["weights"].items():
        assert torch.equal(value, sim.state_dict()["weights"][key]), key
    # The estimates come once per log interval (log_metrics), every one labelled as an estimate.
    perf = {k: v for k, v in on_sim.items() if k.startswith("perf/ipu_sim/")}
    assert perf["perf/ipu_sim/estimated_step_time_s"] > 0
    assert all("estimated" in k for k in perf), perf
    assert not any(k.startswith("perf/") for k in on_cpu)


# --------------------------------------------------------------------------------------
# Emulated numerics
# --------------------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased_and_plain_rounding_is_not():
    ulp = 2.0**-10  # fp16 spacing in [1, 2)
    x = torch.full((200_000,), 1.0 + ulp / 3)
    generator = torch.Generator().manual_seed(0)
    sr = stochastic_round_fp16(x, generator)
    plain = round_fp16(x)
    # Every result is an fp16 value next to x.
    assert torch.equal(sr, sr.half().float())
    assert set(sr.unique().tolist()) == {1.0, 1.0 + ulp}
    sr_bias = (sr - x).double().mean().item() / ulp
    plain_bias = (plain - x).double().mean().item() / ulp
    assert abs(plain_bias + 1 / 3) < 1e-3  # always rounds down by a third of an ulp
    assert abs(sr_bias) < 0.01  # ~0 (std of the mean ~0.001 ulp here)
    # Over values spread across magnitudes (relative error, in units of each value's ulp).
    values = torch.exp(torch.empty(100_000).uniform_(-8, 8, generator=generator))
    spacing = (
        torch.nextafter(values.half(), torch.tensor(float("inf")).half()).float()
        - values.half().float()
    ).abs()
    many = torch.stack([stochastic_round_fp16(values, generator) for _ in range(20)])
    rel = ((many - values) / spacing).double().mean().item()
    assert abs(rel) < 0.01
    # Seeded: the same generator seed gives the same rounding; representable values stay.
    again = stochastic_round_fp16(x, torch.Generator().manual_seed(0))
    assert torch.equal(sr, again)
    exact = torch.tensor([0.0, 1.0, -2.5, 65504.0])
    assert torch.equal(stochastic_round_fp16(exact, generator), exact)


def test_fp16_dreamer_keeps_weights_in_fp16_and_trains():
    agent = make(OBS, BOX, "accelerator=ipu-sim", "accelerator.precision=fp16")
    assert agent.accelerator.precision == "fp16" and agent.accelerator.half
    for step in range(3):
        metrics = {**agent.update(make_batch(OBS, BOX, seed=step)), **agent.log_metrics()}
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss/"))
    assert metrics["perf/ipu_sim/loss_scale"] > 0
    for p in [*agent.wm.parameters(), *agent.actor.parameters(), *agent.critic.parameters()]:
        assert torch.equal(p, p.half().float())


# --------------------------------------------------------------------------------------
# Enforced limits
# --------------------------------------------------------------------------------------


def test_shape_change_after_the_first_step_raises():
    agent = make(OBS, BOX, "accelerator=ipu-sim")
    agent.update(make_batch(OBS, BOX, B=3, T=10))
    agent.update(make_batch(OBS, BOX, B=3, T=10, seed=1))  # same signature: fine
    with pytest.raises(
        IPUShapeError,
        match=r"static shapes.*batch\['action'\] float32\[3, 10, 2\] -> float32\[2, 10, 2\]",
    ):
        agent.update(make_batch(OBS, BOX, B=2, T=10))
    guard = SignatureGuard()
    guard.check("p", {"x": torch.zeros(2)})
    with pytest.raises(IPUShapeError, match="float32.*-> float64"):
        guard.check("p", {"x": torch.zeros(2, dtype=torch.float64)})


def test_model_too_large_for_the_small_preset_names_the_largest_items():
    # Weights, gradients and Adam state alone overflow 4 tiles: refused when the agent is built.
    with pytest.raises(IPUMemoryError) as info:
        make(OBS, BOX, "accelerator=ipu-sim", "ipu.preset=small", "world_model.units=256")
    message = str(info.value)
    assert "\n" not in message
    assert "out of memory on IPU 0" in message and "preset small" in message
    assert "weights" in message and "optimizer state" in message and "gradients" in message
    assert "largest items: world_model.reward_head.out.weight" in message
    # A model whose weights fit but whose stashed activations do not: refused at the first step.
    agent = make(OBS, BOX, "accelerator=ipu-sim", "ipu.preset=small")
    with pytest.raises(IPUMemoryError, match="largest items: activations of stage 0"):
        agent.update(make_batch(OBS, BOX, B=4, T=16))


def test_pipeline_placement_and_accumulation_rules():
    agent = make(OBS, BOX, "accelerator=ipu-sim", "ipu.num_ipus=2")
    assert agent.accelerator.stages == 2 and agent.accelerator.micro_batches == 2
    metrics = {**agent.update(make_batch(OBS, BOX)), **agent.log_metrics()}
    assert metrics["perf/ipu_sim/estimated_inter_ipu_s"] > 0
    placement = "ipu.placement=[world_model:0,actor:1,critic:1,slow_critic:1]"
    agent = make(OBS, BOX, "accelerator=ipu-sim", "ipu.num_ipus=2", placement)
    assert agent.accelerator.ipu_of("critic.net.out.weight") == 1
    for extra, words in (
        (["ipu.num_ipus=2", "ipu.gradient_accumulation=1"], "gradient_accumulation=1 is below"),
        (["ipu.num_ipus=2", "ipu.placement=[actor:1,world_model:0]"], "non-decreasing"),
        (["ipu.num_ipus=2", "ipu.placement=[world_model:0,actor:2]"], "num_ipus=2"),
        (["ipu.num_ipus=2", "ipu.placement=[world_model:0,actr:1]"], "no module named 'actr'"),
        (["ipu.num_ipus=2", "ipu.placement=[world_model:0,actor:1]"], "parameters on no IPU"),
    ):
        with pytest.raises(IPUConstraintError, match=words):
            make(OBS, BOX, "accelerator=ipu-sim", *extra)


def _sparse_mlp(block: int, density: float = 0.1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    config = sparse.SparseConfig(
        density=density, block=block, distribution="uniform", skip=[], fast_path="off", seed=seed
    )
    sparse.sparsify(model, config)
    return model


def test_block_sparse_limits():
    model = _sparse_mlp(16)
    opt = torch.optim.Adam(model.parameters())
    words = "fp32 block-sparse supports blocks up to 8x8.*or accelerator.precision=fp16"
    with pytest.raises(IPUConstraintError, match=words):
        IPUSimAccelerator("ipu2", precision="fp32").prepare({"mlp": model}, {"adam": opt})
    IPUSimAccelerator("ipu2", precision="fp16").prepare({"mlp": model}, {"adam": opt})
    IPUSimAccelerator("ipu2").prepare({"mlp": _sparse_mlp(8)}, {"adam": opt})
    # The number of non-zeros is fixed: a topology update must keep it.
    layers = find_sparse_layers({"mlp": model})
    assert len(layers) == 2 and all(layer.block == 16 for layer in layers)
    check_sparse_nnz(layers)
    with torch.no_grad():
        layers[0].mask[:16, :16] = 1.0 - layers[0].mask[:16, :16]  # flip one block
    with pytest.raises(IPUConstraintError, match="changed its non-zeros"):
        check_sparse_nnz(layers)


def test_block_sparse_memory_counts_non_zeros_and_metadata():
    dense = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    sim_dense, sim_sparse = IPUSimAccelerator("ipu2"), IPUSimAccelerator("ipu2")
    sim_dense.prepare({"mlp": dense}, {})
    sim_sparse.prepare({"mlp": _sparse_mlp(8)}, {})
    d, s = sim_dense.plan.per_ipu()[0], sim_sparse.plan.per_ipu()[0]
    assert s["sparse index metadata"] > 0
    assert s["weights"] < 0.12 * d["weights"]


# --------------------------------------------------------------------------------------
# Estimates
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,precision", [("ipu2", "fp32"), ("bow", "fp16")])
def test_matmul_estimate_equals_the_hand_roofline(preset, precision):
    m, k, n = 64, 128, 256
    dtype = torch.float16 if precision == "fp16" else torch.float32
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    result, est = estimate(torch.mm, a, b, preset=preset, precision=precision)
    assert torch.equal(result, a @ b)
    p = get_preset(preset)
    width = 2 if precision == "fp16" else 4
    flops = 2 * m * k * n
    moved = (m * k + k * n + m * n) * width
    exchanged = (m * k + k * n) * width
    peak = p.fp16_flops.value if precision == "fp16" else p.fp32_flops.value
    hand = (
        max(flops / peak, moved / p.memory_bandwidth.value)
        + exchanged / p.exchange_bandwidth.value
        + p.sync_cycles.value / p.clock.value
    )
    assert est.flops == flops
    assert est.step_time_s == pytest.approx(hand, rel=1e-12)
    if preset == "ipu2":  # the same with the GC200's numbers written out
        literal = max(flops / 62.5e12, moved / 47.5e12) + exchanged / 8e12 + 150 / 1.325e9
        assert est.step_time_s == pytest.approx(literal, rel=1e-12)


def test_block_sparse_estimate_at_density_0_1_with_16x16_blocks():
    torch.manual_seed(0)
    x = torch.randn(64, 256)

    def step(model):
        def run():
            model(x).square().mean().backward()

        return run

    model = _sparse_mlp(16)
    dense = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    _, est_sparse = estimate(step(model), preset="ipu2", precision="fp16", modules={"m": model})
    _, est_dense = estimate(step(dense), preset="ipu2", precision="fp16", modules={"m": dense})
    ratio = est_sparse.flops / est_dense.flops
    layers = find_sparse_layers({"m": model})
    assert ratio == pytest.approx(0.1, abs=0.01)
    # Savings never beyond the density ratio (each layer's FLOPs scale by its own density).
    assert ratio >= min(la.density for la in layers) * (1 - 1e-9)
    assert est_sparse.dense_flops == est_dense.flops
    assert est_sparse.step_time_s < est_dense.step_time_s


def _gim_modules(count: int = 4) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.SiLU()) for _ in range(count)]


def test_greedy_infomax_pipeline_over_4_ipus_beats_1_ipu():
    stages = _gim_modules()
    x = torch.randn(32, 128)

    def local_loss(index, output):  # each module's own loss; no gradient between modules
        return output.square().mean()

    one = estimate_pipeline(stages, x, loss_fn=local_loss, num_ipus=1, micro_batches=8)
    four = estimate_pipeline(stages, x, loss_fn=local_loss, num_ipus=4, micro_batches=8)
    assert four.step_time_s < one.step_time_s
    assert four.ipu_of_stage == [0, 1, 2, 3] and one.ipu_of_stage == [0, 0, 0, 0]
    assert one.inter_ipu_bytes == 0 and four.inter_ipu_bytes > 0
    # End-to-end backprop sends gradients back too: twice the traffic, and it waits for them.
    backprop = estimate_pipeline(stages, x, num_ipus=4, micro_batches=8, detach_boundaries=False)
    assert backprop.inter_ipu_bytes == 2 * four.inter_ipu_bytes
    assert backprop.step_time_s > four.step_time_s
    assert all(p.grad is not None for p in stages[0].parameters())
    with pytest.raises(IPUConstraintError, match="below the 4 pipeline stages"):
        estimate_pipeline(stages, x, num_ipus=4, micro_batches=2)
    with pytest.raises(IPUConstraintError, match="non-decreasing"):
        estimate_pipeline(stages, x, num_ipus=2, ipu_of_stage=[0, 1, 0, 1])


def test_report_says_estimate_and_lists_tagged_constants():
    agent = make(OBS, BOX, "accelerator=ipu-sim", "ipu.preset=bow")
    agent.update(make_batch(OBS, BOX))
    report = agent.accelerator.report()
    json.dumps(report)  # JSON-serialisable
    assert "estimate" in report["kind"] and "no time here is measured" in report["kind"]
    text = format_report(report)
    assert "ESTIMATES" in text and "estimated step time" in text and "sourced" in text
    assert "measured on an IPU)" in text  # "(nothing here was measured on an IPU)"


# --------------------------------------------------------------------------------------
# The scripts
# --------------------------------------------------------------------------------------


def _train_args(run_dir, *extra):
    return [
        "accelerator=ipu-sim",
        "preset=debug",
        "env=gym:Pendulum-v1",
        f"run.dir={run_dir}",
        "run.steps=160",
        "run.learning_starts=100",
        "run.log_every=80",
        "run.eval_every=160",
        "run.eval_episodes=1",
        "env.time_limit=50",
        "run.video=false",
        "logging.wandb=false",
        "logging.console=false",
        *extra,
    ]


def test_train_script_on_ipu_sim_logs_estimates_and_prints_the_report(tmp_path, capsys):
    run_dir = tmp_path / "ipu"
    result = run_script("train.py", *_train_args(run_dir))
    assert "ipu-sim report: ESTIMATES" in result.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "perf/ipu_sim/estimated_step_time_s" in row]
    assert logged and logged[-1]["perf/ipu_sim/estimated_step_time_s"] > 0
    assert "perf/ipu_sim/estimated_memory_fraction" in logged[-1]
    assert json.loads((run_dir / "ipu_report.json").read_text())["preset"] == "ipu2"
    assert _ipu_report_main()([f"run={run_dir}"]) == 0
    assert "estimated step time" in capsys.readouterr().out


def test_train_script_stops_with_the_budget_error_on_the_small_preset(tmp_path):
    result = run_script(
        "train.py", *_train_args(tmp_path / "small", "ipu.preset=small"), check=False
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ipu-sim: out of memory on IPU 0")
    assert "largest items:" in errors[0]


def _ipu_report_main():
    dev = ROOT / "scripts" / "dev"
    if str(dev) not in sys.path:  # the tool imports the harness beside it
        sys.path.insert(0, str(dev))
    spec = importlib.util.spec_from_file_location("ipu_report", dev / "ipu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_ipu_report_script_estimates_a_config_and_a_gim_pipeline(tmp_path, capsys):
    main = _ipu_report_main()
    out = tmp_path / "report.json"
    args = ["preset=debug", "env=gym:Pendulum-v1", "ipu.preset=ipu1", f"json={out}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "estimated step time" in printed and "GC2" in printed
    assert json.loads(out.read_text())["preset"] == "ipu1"
    assert main(["gim=true", "ipu.num_ipus=4", "gim.batch=2", "gim.micro_batches=4"]) == 0
    assert "gim_4_ipus: estimated step" in capsys.readouterr().out
    assert main(["run=/nonexistent"]) == 2
