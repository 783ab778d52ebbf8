"""Dreamer through the real scripts: train from pixels, stop, resume, evaluate the checkpoint."""

from __future__ import annotations

import json

from test_scripts import run_script


def test_dreamer_pixels_train_resume_evaluate(tmp_path):
    run_dir = tmp_path / "dreamer"
    common = [
        "logging.wandb=false",
        "logging.console=false",
        "run.eval_episodes=1",
        "run.learning_starts=100",
        "run.replay_ratio=64",
    ]
    run_script(
        "train.py",
        "agent=dreamer",
        "preset=debug,dreamer_debug",
        "env=dmc:cartpole-balance",
        "env.obs=pixels",
        "env.time_limit=200",
        "run.steps=300",
        "run.eval_every=300",
        "run.checkpoint_every=300",
        f"run.dir={run_dir}",
        *common,
    )
    first = json.loads((run_dir / "checkpoints" / "step_300" / "manifest.json").read_text())
    assert first["step"] == 300

    run_script("train.py", f"resume={run_dir}", "run.steps=400", "run.eval_every=400")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss/reconstruction" in row]
    assert losses, "no world-model losses were logged"
    assert all(row["loss/reconstruction"] is not None for row in losses)
    # Open-loop predictions are logged at eval time for pixel inputs.
    assert list(run_dir.glob("videos/world_model_openloop_pixels_*.mp4"))

    out = tmp_path / "eval.json"
    run_script("evaluate.py", f"checkpoint={run_dir}", "episodes=1", f"json={out}")
    result = json.loads(out.read_text())
    assert result["agent"] == "dreamer" and result["step"] == 400
    assert result["env"] == "dmc:cartpole-balance" and len(result["returns"]) == 1
