"""The ipu-sim report as a text table (``IPUSimAccelerator.report()`` -> str)."""

from __future__ import annotations

from typing import Any

from .memory import KINDS, fmt_bytes


def fmt_seconds(s: float) -> str:
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def fmt_flops(f: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(f) >= size:
            return f"{f / size:.3g} {unit}"
    return f"{f:.0f} FLOP"


def _value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ",".join(str(x) for x in v)
    if isinstance(v, float) and (abs(v) >= 1e5 or (v and abs(v) < 1e-2)):
        return f"{v:.4g}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_report(report: dict[str, Any], constants: bool = True) -> str:
    """Readable lines of a report dict. Every time and FLOP figure is an estimate."""
    lines = [
        "ipu-sim report: ESTIMATES from a host emulation of a Graphcore IPU "
        "(nothing here was measured on an IPU)",
        f"device: {report['preset']} ({report['device']}); {report['num_ipus']} IPU(s); "
        f"precision {report['precision']}"
        + (
            f", stochastic rounding {'on' if report['stochastic_rounding'] else 'off'}"
            if report.get("stochastic_rounding") is not None
            else ""
        )
        + f"; pipeline stages {report['pipeline_stages']}, micro-batches "
        f"{report['micro_batches']}",
    ]
    if report.get("placement") and report["pipeline_stages"] > 1:
        lines.append(
            "placement: " + ", ".join(f"{p['module']}:{p['ipu']}" for p in report["placement"])
        )
    est = report.get("estimate")
    if est is None:
        lines.append("estimated step: none yet (no update ran on the simulated IPU)")
    else:
        lines += [
            f"estimated step time: {fmt_seconds(est['step_time_s'])} "
            f"(~{1.0 / max(est['step_time_s'], 1e-30):,.0f} steps/s estimated)",
            f"  estimated compute {fmt_seconds(est['compute_s'])}, exchange "
            f"{fmt_seconds(est['exchange_s'])}, sync {fmt_seconds(est['sync_s'])}, inter-IPU "
            f"{fmt_seconds(est['inter_ipu_s'])}, host I/O {fmt_seconds(est['host_io_s'])}, "
            f"pipeline fill/drain {fmt_seconds(est['fill_drain_s'])}",
            f"  estimated FLOPs per step {fmt_flops(est['flops'])} (dense equivalent "
            f"{fmt_flops(est['dense_flops'])}); "
            f"{est['flops'] / max(est['step_time_s'], 1e-30) / 1e12:.3g} TFLOP/s estimated",
        ]
        if est.get("top_ops"):
            lines.append(
                "  top ops by estimated time: "
                + ", ".join(
                    f"{o['op']} x{o['count']} {fmt_seconds(o['estimated_time_s'])}"
                    for o in est["top_ops"][:6]
                )
            )
    memory = report.get("memory") or {}
    if memory:
        budget = memory["budget_bytes_per_ipu"]
        lines.append(f"estimated memory per IPU (budget {fmt_bytes(budget)}):")
        for ipu, row in memory["per_ipu"].items():
            parts = ", ".join(f"{k} {fmt_bytes(row[k])}" for k in KINDS if row.get(k))
            lines.append(
                f"  IPU {ipu}: {fmt_bytes(row['total'])} ({row['total'] / budget:.1%} of budget)"
                + (f" = {parts}" if parts else "")
            )
    if report.get("sparse_layers"):
        lines.append(f"block-sparse layers: {len(report['sparse_layers'])} (fixed non-zeros)")
    if constants and report.get("constants"):
        lines.append("device constants (tag: sourced = vendor figure, derived, assumed):")
        for c in report["constants"]:
            lines.append(
                f"  {c['name']:<22} {_value(c['value']):>12} {c['unit']:<14} "
                f"{c['tag']:<8} {c['source']}"
            )
    for a in report.get("assumptions", []):
        lines.append(f"assumption: {a}")
    return "\n".join(lines)
