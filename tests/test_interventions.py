"""``env.intervention``: the grammar, exact parameter changes at the named step, logging, and
clear errors for bad specs (``envs.interventions``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from imagine_rl import envs
from imagine_rl.envs.interventions import (
    PARAMS,
    Interventions,
    find_mujoco_model,
    parse_interventions,
)
from imagine_rl.runtime.config import ConfigError, build_config
from imagine_rl.runtime.factories import make_env_factory


def model_arrays(model) -> dict[str, np.ndarray]:
    """Copies of every array of an ``MjModel`` (and of its ``opt``)."""
    out = {}
    for prefix, obj in (("", model), ("opt.", model.opt)):
        for name in dir(obj):
            if name.startswith("_"):
                continue
            try:
                value = getattr(obj, name)
            except Exception:  # noqa: BLE001 - some properties need state we do not have
                continue
            if isinstance(value, np.ndarray):
                out[prefix + name] = value.copy()
    return out


def changed(before: dict, after: dict) -> dict[str, np.ndarray]:
    """name -> indices of changed elements."""
    return {
        k: np.argwhere(before[k] != after[k])
        for k in before
        if not np.array_equal(before[k], after[k])
    }


def test_parse_grammar():
    items = parse_interventions(
        " body_mass:pole_1*2@step=20000 ; gravity:z=-5@step=0;gravity*0.5@step=3"
    )
    assert [(i.param, i.target, i.op, i.value, i.step) for i in items] == [
        ("body_mass", "pole_1", "*", 2.0, 20000),
        ("gravity", "z", "=", -5.0, 0),
        ("gravity", None, "*", 0.5, 3),
    ]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            "bodymass:pole*2@step=1",
            "unknown intervention parameter 'bodymass'.*" + ", ".join(PARAMS),
        ),
        ("body_mass:pole*2", "expected <param>"),
        ("body_mass:pole*x@step=1", "bad value"),
        ("body_mass:pole*2@step=-1", "bad step"),
        ("body_mass*2@step=1", "needs a target"),
        ("gravity=-5@step=1", "needs an axis"),
        ("gravity:w*2@step=1", "use x, y or z"),
        ("", "empty"),
    ],
)
def test_bad_specs_raise_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_interventions(spec)


def test_body_mass_changes_exactly_one_element_from_the_named_step(caplog):
    env = envs.make_env("dmc:cartpole-balance", seed=0, intervention="body_mass:pole_1*2@step=5")
    model = find_mujoco_model(env)
    env.reset()
    start = model_arrays(model)
    pole = model.body("pole_1").id
    with caplog.at_level(logging.WARNING, logger="imagine_rl.envs.interventions"):
        for step in range(5):  # env steps 0..4: the original task
            *_, info = env.step(env.action_space.sample())
            assert "intervention" not in info and not changed(start, model_arrays(model)), step
        *_, info = env.step(env.action_space.sample())  # starts at env step 5
    diff = changed(start, model_arrays(model))
    assert list(diff) == ["body_mass"] and diff["body_mass"].tolist() == [[pole]]
    assert model.body_mass[pole] == 2 * start["body_mass"][pole]
    assert "0.1 -> 0.2 at env step 5" in info["intervention"]
    assert any("body_mass:pole_1*2@step=5" in r.getMessage() for r in caplog.records)
    after = model_arrays(model)
    for _ in range(3):  # applied once, and it stays
        *_, info = env.step(env.action_space.sample())
        assert "intervention" not in info
    assert not changed(after, model_arrays(model))


def test_several_parameters_each_change_only_their_element():
    spec = "gravity:z=-5@step=0;actuator_gear:slide*0.5@step=2;geom_friction:floor*3@step=2"
    env = envs.make_env("dmc:cartpole-balance", seed=0, intervention=spec)
    model = find_mujoco_model(env)
    env.reset()
    start = model_arrays(model)
    env.step(env.action_space.sample())
    assert changed(start, model_arrays(model)).keys() == {"opt.gravity"}
    assert model.opt.gravity.tolist() == [0.0, 0.0, -5.0]
    env.step(env.action_space.sample())
    *_, info = env.step(env.action_space.sample())
    diff = changed(start, model_arrays(model))
    floor = model.geom("floor").id
    assert diff.keys() == {"opt.gravity", "actuator_gear", "geom_friction"}
    assert diff["actuator_gear"].tolist() == [[0, 0]]
    assert diff["geom_friction"].tolist() == [[floor, 0]]  # the sliding coefficient only
    assert model.actuator_gear[0, 0] == 0.5 * start["actuator_gear"][0, 0]
    assert model.geom_friction[floor, 0] == 3 * start["geom_friction"][floor, 0]
    assert info["intervention"].count("at env step 2") == 2


def test_gym_mujoco_counts_env_steps_like_the_loop_with_action_repeat():
    # action_repeat=2: agent steps count 2 frames; resets after the first count 2 as well.
    env = envs.make_env(
        "gym:InvertedPendulum-v5", seed=0, action_repeat=2, intervention="body_mass:pole*3@step=6"
    )
    wrapper = env
    while not isinstance(wrapper, Interventions):
        wrapper = wrapper.env
    model = find_mujoco_model(env)
    pole = model.body("pole").id
    mass = float(model.body_mass[pole])
    env.reset()
    env.step(np.zeros(1, np.float32))  # env steps 0-1
    env.reset()  # the autoreset step: 2-3
    env.step(np.zeros(1, np.float32))  # 4-5
    assert wrapper.env_steps == 6 and model.body_mass[pole] == mass
    *_, info = env.step(np.zeros(1, np.float32))  # starts at 6
    assert model.body_mass[pole] == 3 * mass and "at env step 6" in info["intervention"]


def test_bad_names_and_envs_list_what_is_valid():
    with pytest.raises(
        ValueError, match="no body named 'pole'.*valid body names: world, cart, pole_1"
    ):
        envs.make_env("dmc:cartpole-balance", intervention="body_mass:pole*2@step=1")
    with pytest.raises(ValueError, match="valid actuator names: slide"):
        envs.make_env("dmc:cartpole-balance", intervention="actuator_gear:motor*2@step=1")
    with pytest.raises(ValueError, match="need a MuJoCo task"):
        envs.make_env("gym:Pendulum-v1", intervention="gravity*2@step=1")


def test_config_key_checks_syntax_and_reaches_training_envs_only():
    with pytest.raises(ConfigError, match="env.intervention: unknown intervention parameter"):
        build_config(["preset=debug", "env.intervention=mass:pole_1*2@step=1"])
    config = build_config(
        ["preset=debug", "env=dmc:cartpole-balance", "env.intervention=body_mass:pole_1*2@step=4"]
    )
    make = make_env_factory(config, video=False)
    train, evaluation = make("train", 1, 0), make("eval", 1, 0)
    assert train.call("applied") == ([],) and train.call("env_steps") == (0,)
    with pytest.raises(AttributeError):
        evaluation.call("applied")
    train.close()
    evaluation.close()


def test_one_block_mass_in_the_blocks_task():
    env = envs.make_env(
        "blocks:push-2", seed=0, blocks_action="pusher", intervention="body_mass:block0*2@step=1"
    )
    model = find_mujoco_model(env)
    env.reset()
    start = model_arrays(model)
    block = model.body("block0").id
    env.step(env.action_space.sample())
    assert not changed(start, model_arrays(model))
    env.step(env.action_space.sample())
    diff = changed(start, model_arrays(model))
    assert list(diff) == ["body_mass"] and diff["body_mass"].tolist() == [[block]]
    env.reset()  # a new episode (new block shapes) keeps the changed mass
    assert model.body_mass[block] == 2 * start["body_mass"][block]
    env.close()
