"""Staged runs (``run.stages``): one ``train.py`` command runs several presets in order, each
starting from the previous stage's weights; re-running it continues where it stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from imagine_rl.runtime.checkpoint import list_checkpoints, load_checkpoint
from imagine_rl.runtime.config import ConfigError, build_config, stage_dir_name

ROOT = Path(__file__).resolve().parent.parent
from imagine_rl.scripts import train as train_script  # noqa: E402

# The object-centric recipe's two stages on the tiny op3 of preset debug. The command line wins
# over the stage presets in every stage: 40 env steps each, updates from step 20 on.
TINY = [
    "preset=debug",
    "agent=op3",
    "env=blocks:push-3",
    "run.stages=[op3_perception,op3_dynamics]",
    "run.steps=40",
    "run.learning_starts=20",
    "run.replay_ratio=16",
    "replay.batch_size=4",
    "replay.batch_length=4",
    "run.eval_episodes=0",
    "run.checkpoint_every=20",
    "run.log_every=20",
    "run.video=false",
    "logging.wandb=false",
    "logging.console=false",
]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_op3_preset_runs_both_stages_and_single_stage_presets_one():
    for args in (["preset=op3"], ["agent=op3"]):
        assert build_config(args).run.stages == ["op3_perception", "op3_dynamics"]
    for stage in ("op3_perception", "op3_dynamics"):
        assert build_config([f"preset=op3,{stage}"]).run.stages == []


def test_slots_actor_critic_preset_composes_the_pretrained_recipe():
    config = build_config(["preset=op3,slots_actor_critic"])
    assert config.run.stages == ["op3_perception", "slots_actor_critic_behaviour"]
    assert (config.world_model.kind, config.agent.behaviour) == ("slots", "actor_critic")
    assert config.env.id == "blocks:push-1" and config.env.goal_obs
    stage2 = build_config(["preset=op3,slots_actor_critic,slots_actor_critic_behaviour"])
    assert stage2.run.stages == [] and stage2.op3.freeze_perception
    assert (stage2.run.steps, stage2.run.learning_starts, stage2.run.replay_ratio) == (
        6000,
        2000,
        64,
    )


def test_bad_stages_are_one_line_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="run.stages: unknown preset 'op3_perceptio'.*did you"):
        build_config(["run.stages=[op3_perceptio]"])
    with pytest.raises(ConfigError, match="'op3' sets run.stages itself.*do not nest"):
        build_config(["run.stages=[op3]"])
    nested = tmp_path / "outer.yaml"
    nested.write_text(yaml.safe_dump({"run": {"stages": ["debug"]}}))
    with pytest.raises(ConfigError, match="do not nest"):
        build_config([f"run.stages=[{nested}]"])
    with pytest.raises(ConfigError, match="'debug' is listed twice"):
        build_config(["run.stages=[debug,xs,debug]"])
    # A preset given as a path is a stage named after its file.
    assert stage_dir_name(str(nested)) == "outer" and stage_dir_name("op3") == "op3"

    run_dir = tmp_path / "run"
    code = train_script.main(["run.stages=[debug,nope]", f"run.dir={run_dir}"])
    assert code == 2 and "unknown preset 'nope'" in _one_line_error(capsys)
    assert not run_dir.exists()  # refused before anything was built

    # resume= of a staged run that stopped before its last stage: re-run the command.
    stopped = tmp_path / "stopped"
    (stopped / "op3_perception").mkdir(parents=True)
    (stopped / "op3_perception" / "config.yaml").write_text("{}")
    assert train_script.main([f"resume={stopped}"]) == 2
    assert "re-running the same command" in _one_line_error(capsys)


def _perception_and_dynamics(weights: dict[str, torch.Tensor]):
    dynamics = ("world_model.dynamics.", "world_model.cpc.")
    return (
        {k: v for k, v in weights.items() if not k.startswith(dynamics)},
        {k: v for k, v in weights.items() if k.startswith(dynamics)},
    )


def test_two_stages_in_one_command_then_the_same_command_skips_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = run_dir / "op3_perception"
    command = [*TINY, f"run.dir={run_dir}"]
    # Stage 1 half done by the two-command recipe's first command: the staged command takes
    # it over and resumes it (the stage's config is the same but for run.steps).
    single = [a for a in TINY if not a.startswith("run.stages=")]
    single = [*single, "preset=debug,op3_perception", "run.steps=20", f"run.dir={first}"]
    assert train_script.main(single) == 0, capsys.readouterr().err
    capsys.readouterr()

    assert train_script.main(command) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"stage 1/2 op3_perception -> {first} (resuming at env step 20)" in out
    assert f"stage 2/2 op3_dynamics -> {run_dir}\n" in out

    for stage_dir in (first, run_dir):
        assert (stage_dir / "config.yaml").exists()
        assert load_checkpoint(stage_dir).step == 40
    stage1 = yaml.safe_load((first / "config.yaml").read_text())
    stage2 = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stage1["preset"] == ["debug", "op3_perception"] and stage1["op3"]["epsilon"] == 1.0
    assert stage2["preset"] == ["debug", "op3_dynamics"] and stage2["run"]["stages"] == []
    # The stage preset's settings, and the command line over the stage preset's run settings.
    assert stage2["op3"]["freeze_perception"] is True and stage2["op3"]["prediction_scale"] == 0
    assert stage2["run"]["steps"] == 40 and stage2["run"]["replay_ratio"] == 16
    assert stage2["run"]["learning_starts"] == 20 and stage2["replay"]["batch_length"] == 4

    # Stage 2 started from stage 1's weights: its frozen perception is stage 1's final one,
    # and only its dynamics trained.
    before = _perception_and_dynamics(load_checkpoint(first).agent_state["weights"])
    after = _perception_and_dynamics(load_checkpoint(run_dir).agent_state["weights"])
    assert before[0].keys() == after[0].keys() and before[1]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert any(not torch.equal(before[1][k], after[1][k]) for k in before[1])

    # The same command again: both stages are done, nothing trains or is written.
    metrics = (run_dir / "metrics.jsonl").read_text()
    checkpoints = list_checkpoints(run_dir) + list_checkpoints(first)
    assert train_script.main(command) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 and "run dir:" not in out
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert list_checkpoints(run_dir) + list_checkpoints(first) == checkpoints

    # A setting that would change what a finished stage trained is refused, in one line.
    assert train_script.main([*command, "op3.slots=3"]) == 2
    assert "was trained with op3.slots=4" in _one_line_error(capsys)


def test_slots_actor_critic_stages_train_the_behaviour_only_on_the_pretrained_perception(
    tmp_path, capsys
):
    """The two stages of preset slots_actor_critic, at debug sizes: the perception stage
    leaves the actor-critic alone (no dynamics loss trains there), the second starts from its
    weights with the perception frozen and trains the actor-critic."""
    run_dir = tmp_path / "run"
    command = [
        *(a for a in TINY if not a.startswith("run.stages=")),
        "run.stages=[op3_perception,slots_actor_critic_behaviour]",
        "world_model.kind=slots",
        "agent.behaviour=actor_critic",
        "agent.horizon=3",
        "run.log_every=10",
        f"run.dir={run_dir}",
    ]
    assert train_script.main(command) == 0, capsys.readouterr().err
    first = run_dir / "op3_perception"

    def rows(stage_dir: Path) -> list[dict]:
        lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
        return [row for row in map(yaml.safe_load, lines) if "loss/reconstruction" in row]

    assert rows(first) and not any("loss/actor" in row for row in rows(first))
    assert rows(run_dir) and all("loss/actor" in row for row in rows(run_dir))
    before = load_checkpoint(first).agent_state["weights"]
    after = load_checkpoint(run_dir).agent_state["weights"]
    encoder = [k for k in before if k.startswith("world_model.encoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(k.startswith("actor.") for k in after)
