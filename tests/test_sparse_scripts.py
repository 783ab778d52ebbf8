"""The sparse scripts run end to end on tiny settings and write the documented JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dev" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=True,
    )


def test_bench_sparse_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    run(
        "bench_sparse.py",
        f"json={out}",
        "sizes=64",
        "batches=4",
        "densities=0.25",
        "blocks=1,16",
        "reps=1",
    )
    rows = json.loads(out.read_text())
    assert len(rows) == 2
    keys = {
        "size",
        "batch",
        "density",
        "block",
        "dense_fwd_ms",
        "dense_fwd_bwd_ms",
        "masked_fwd_ms",
        "masked_fwd_bwd_ms",
        "fast_path",
        "fast_fwd_ms",
        "fast_fwd_bwd_ms",
        "fast_fwd_bwd_ratio",
    }
    for row in rows:
        assert keys <= set(row)
        assert row["fast_path"] in ("dense-masked", "balanced-bsr-bmm")
        assert row["fast_fwd_bwd_ratio"] > 0


def test_sparse_sanity_writes_summary(tmp_path):
    out = tmp_path / "sanity.json"
    result = run(
        "sparse_sanity.py",
        f"json={out}",
        "seeds=1",
        "steps=30",
        "hidden=32",
        "methods=dense,static,set,rigl",
    )
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"dense", "static", "set", "rigl"}
    assert all(0.0 <= s["mean"] <= 1.0 for s in data["summary"].values())
    assert "rigl" in result.stdout
    assert run("sparse_sanity.py", "--help").stdout.startswith("Sanity check")
