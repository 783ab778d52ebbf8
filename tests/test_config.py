"""Config layering, overrides, presets and one-line errors."""

from __future__ import annotations

import pytest
import yaml

from imagine_rl.runtime.config import (
    Config,
    ConfigError,
    available_presets,
    build_config,
    load_yaml,
    parse_overrides,
    save_yaml,
    to_dict,
)


def test_defaults_are_valid():
    config = build_config([])
    assert isinstance(config, Config)
    assert config.logging.mode == "offline"
    assert config.replay.steps_per_batch == config.replay.batch_size * config.replay.batch_length


def test_issue_command_line_grammar():
    config = build_config(
        [
            "env=dmc:walker-walk",
            "agent=random",
            "preset=debug",
            "run.steps=5000",
            "seed=1",
            "run.dir=runs/x",
        ]
    )
    assert config.env.id == "dmc:walker-walk"
    assert config.agent.name == "random"
    assert config.run.steps == 5000  # the override beats the preset
    assert config.seed == 1
    assert config.run.dir == "runs/x"
    assert config.preset == ["debug"]
    assert config.replay.batch_size == 4  # from the preset


def test_value_parsing_and_coercion():
    config = build_config(
        [
            "run.steps=1e4",
            "run.replay_ratio=2",
            "logging.tags=[a, b]",
            "env.time_limit=null",
            "env.asynchronous=true",
            "logging.group=123",
        ]
    )
    assert config.run.steps == 10_000 and isinstance(config.run.steps, int)
    assert config.run.replay_ratio == 2.0 and isinstance(config.run.replay_ratio, float)
    assert config.logging.tags == ["a", "b"]
    assert config.env.time_limit is None
    assert config.env.asynchronous is True
    assert config.logging.group == "123"


def test_shorthand_and_section_key_together():
    config = build_config(["env=gym:Pendulum-v1", "env.obs=pixels"])
    assert config.env.id == "gym:Pendulum-v1" and config.env.obs == "pixels"


def test_presets_layer_in_order(tmp_path):
    first = tmp_path / "a.yaml"
    second = tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"run": {"steps": 111, "eval_every": 7}}))
    second.write_text(yaml.safe_dump({"run": {"steps": 222}}))
    config = build_config([f"preset={first},{second}"])
    assert config.run.steps == 222 and config.run.eval_every == 7
    assert "debug" in available_presets()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run.stpes=5"], "unknown config key 'run.stpes': did you mean run.steps"),
        (["evn.id=x"], "unknown config key 'evn': did you mean env"),
        (["run.steps=-1"], "run.steps: must be >= 1, got -1"),
        (["env.size=0"], "env.size: must be >= 8, got 0"),
        (["run.steps=abc"], "run.steps: expected int, got 'abc'"),
        (["run.steps=1.5"], "run.steps: expected int, got 1.5"),
        (["env.asynchronous=maybe"], "env.asynchronous: expected bool"),
        (["env.obs=pixel"], "did you mean 'pixels'"),
        (["preset=dbg"], "unknown preset 'dbg': did you mean 'debug'?"),
        (["run=3"], "run: is a section"),
        (["steps"], "expected key=value"),
        (["replay.capacity=10", "replay.batch_length=64"], "exceeds replay.capacity"),
    ],
)
def test_bad_keys_and_values_give_one_line_errors(args, expected):
    with pytest.raises(ConfigError) as info:
        build_config(args)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_yaml_round_trip(tmp_path):
    config = build_config(["preset=debug", "env=dmc:cartpole-swingup", "logging.tags=[x]"])
    save_yaml(config, tmp_path / "config.yaml")
    assert to_dict(load_yaml(tmp_path / "config.yaml")) == to_dict(config)


def test_base_then_overrides():
    base = to_dict(build_config(["run.steps=300", "seed=4"]))
    config = build_config(["run.steps=600"], base=base)
    assert config.run.steps == 600 and config.seed == 4


def test_parse_overrides_keeps_env_ids_as_text():
    assert parse_overrides(["env=dmc:walker-walk"]) == {"env": "dmc:walker-walk"}
    assert parse_overrides(["x=1:30"]) == {"x": "1:30"}


def test_script_args_follow_the_train_grammar():
    from imagine_rl.runtime.config import parse_script_args

    defaults = {"sizes": [256, 512], "reps": 5, "lr": 1e-3, "json": "out.json", "tag": None}
    args = parse_script_args(
        ["size=64", "reps=3", "lr=2e-3", "json=null", "tag=x"], defaults, {"size": "sizes"}
    )
    assert args == {"sizes": [64], "reps": 3, "lr": 2e-3, "json": None, "tag": "x"}
    assert parse_script_args(["sizes=1,16"], defaults)["sizes"] == [1, 16]
    with pytest.raises(ConfigError, match="did you mean 'reps'"):
        parse_script_args(["rep=3"], defaults)
    with pytest.raises(ConfigError, match="reps: expected int"):
        parse_script_args(["reps=many"], defaults)


# --------------------------------------------------------------------------------------
# One precision key: agent.precision and ipu.precision were removed
# --------------------------------------------------------------------------------------

REMOVED = {
    "agent.precision=bf16": (
        "agent.precision was removed: use accelerator.precision=bf16 (one key for every "
        "accelerator)"
    ),
    "ipu.precision=fp16": (
        "ipu.precision was removed: use accelerator.precision=fp16 (one key for every "
        "accelerator; the IPU runs fp32 or fp16)"
    ),
}


def _one_line_refusal(build) -> str:
    with pytest.raises(ConfigError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("arg", list(REMOVED))
def test_removed_precision_keys_are_refused_on_the_command_line(arg):
    key, value = arg.split("=")
    assert _one_line_refusal(lambda: parse_overrides(["preset=debug", arg])) == REMOVED[arg]
    assert _one_line_refusal(lambda: build_config({key: value})) == REMOVED[arg]  # experiment
    # A value that is no precision still names the key that replaces it.
    assert "use accelerator.precision=fp32|bf16|fp16" in _one_line_refusal(
        lambda: parse_overrides([f"{key}=x"])
    )


@pytest.mark.parametrize("arg", list(REMOVED))
def test_removed_precision_keys_are_refused_in_a_preset(arg, tmp_path):
    (section, name), value = arg.split("=")[0].split("."), arg.split("=")[1]
    preset = tmp_path / "old.yaml"
    preset.write_text(yaml.safe_dump({section: {name: value}}))
    assert _one_line_refusal(lambda: build_config([f"preset=debug,{preset}"])) == REMOVED[arg]


@pytest.mark.parametrize("arg", list(REMOVED))
def test_train_refuses_removed_precision_keys_before_anything_else(arg, tmp_path, capsys):
    """One line on stderr, exit 2, before resume= looks at the run (none exists here)."""

    from imagine_rl.scripts import train as train_script

    for argv in ([arg, "preset=debug"], [f"resume={tmp_path / 'none'}", arg]):
        assert train_script.main(argv) == 2
        assert capsys.readouterr().err == f"error: {REMOVED[arg]}\n"


def _old_run_config(*overrides: str, agent: str = "fp32", ipu: str = "fp32") -> dict:
    """A config.yaml as a run saved it before the one precision key: agent.precision and
    ipu.precision beside accelerator.precision."""
    data = to_dict(build_config(["preset=debug", *overrides]))
    data["agent"]["precision"] = agent
    data["ipu"]["precision"] = ipu
    return data


def test_an_old_run_config_with_the_removed_keys_still_loads(tmp_path):
    new = to_dict(build_config(["preset=debug"]))
    old = _old_run_config()  # the defaults every old run saved: dropped silently
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    assert to_dict(load_yaml(path)) == new
    assert to_dict(build_config([], base=old)) == new  # a checkpoint manifest's config
    assert "precision" not in to_dict(load_yaml(path))["agent"]
    assert old["agent"]["precision"] == "fp32"  # the caller's dict is left as it was


@pytest.mark.parametrize(
    "overrides,agent,ipu,expected",
    [
        ((), "bf16", "fp32", "bf16"),  # auto was agent.precision: the run trained in bf16
        (("accelerator=cuda",), "bf16", "fp16", "bf16"),  # ipu.precision ignored off ipu-sim
        (("accelerator=cpu",), "fp32", "fp16", "auto"),
        (("accelerator=ipu-sim",), "fp32", "fp16", "fp16"),  # ipu-sim ran ipu.precision
        (("accelerator=ipu-sim",), "fp32", "fp32", "auto"),
        (("accelerator.precision=fp16",), "fp32", "fp32", "fp16"),  # an explicit key stays
    ],
)
def test_an_old_run_keeps_the_precision_it_trained_with(overrides, agent, ipu, expected):
    old = _old_run_config(*overrides, agent=agent, ipu=ipu)
    config = build_config(["run.steps=600"], base=old)
    assert config.accelerator.precision == expected and config.run.steps == 600


def test_an_old_run_with_the_removed_keys_resumes(tmp_path, capsys):

    from imagine_rl.runtime.checkpoint import load_checkpoint
    from imagine_rl.scripts import train as train_script

    runs = {}
    for name, agent in (("fp32", "fp32"), ("bf16", "bf16")):
        run_dir = tmp_path / name
        args = ["agent=random", "preset=debug", "env=gym:Pendulum-v1", f"run.dir={run_dir}"]
        args += ["run.steps=40", "run.eval_episodes=0", "run.checkpoint_every=20"]
        args += ["run.log_every=20", "logging.console=false", "logging.wandb=false"]
        assert train_script.main(args) == 0, capsys.readouterr().err
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["agent"]["precision"], config["ipu"]["precision"] = agent, "fp32"
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        runs[name] = run_dir
    for name, run_dir in runs.items():
        assert train_script.main([f"resume={run_dir}", "run.steps=60"]) == 0, (
            capsys.readouterr().err
        )
        assert load_checkpoint(run_dir).step == 60
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert "precision" not in saved["agent"] and "precision" not in saved["ipu"]
        assert saved["accelerator"]["precision"] == ("auto" if name == "fp32" else "bf16")
