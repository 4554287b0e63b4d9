"""Many options at once, against tf.keras and Keras 3 (tests/golden/combos.py draws the cases).

Each legacy case combines an optimizer's own arguments with a learning rate that is a number, a
schedule or a callable, ``decay``, a clip argument, attributes assigned between steps, steps
that update only some of the variables (the others get their slots later), sparse rows with
duplicate indices, or ``minimize``. The loss-scaled cases add tf.keras's dynamic
``LossScaleOptimizer`` with steps whose gradients are not finite. The Keras 3 cases combine
``weight_decay`` (with ``exclude_from_weight_decay``), ``use_ema``, ``gradient_accumulation_steps``,
clipping, ``loss_scale_factor`` and schedules. Every third case runs again with its variables
on two devices, where the numbers must be the same and the variables and their slots must keep
their shardings.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_cases import FIXTURES, KERAS3_BETA_COMPLEMENT_RTOL, assert_close
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kopt
from kopt.optimizers import schedules

CASES = json.loads((FIXTURES / "combos.json").read_text())["cases"]
LEGACY = [c for c in CASES if c["source"] == "tf_keras_legacy"]
KERAS3 = [c for c in CASES if c["source"] == "keras3"]
# Every third case again, with the variables on two devices (split along their first axis where
# it divides evenly, else replicated).
SHARDED = CASES[::3]


def array(values):
    """A float32 array from the fixture's lists, where "inf", "-inf" and "nan" are strings."""
    return jnp.asarray(np.asarray(values, dtype=object).astype(np.float32))


def learning_rate(spec):
    if spec["kind"] == "callable":
        value = spec["value"]
        return lambda: value
    return getattr(schedules, spec["class_name"])(**spec["config"])


def make_optimizer(case):
    kwargs = dict(case["kwargs"])
    if case["learning_rate"] is not None:
        kwargs["learning_rate"] = learning_rate(case["learning_rate"])
    opt = getattr(kopt.optimizers, case["class_name"])(**kwargs)
    if case.get("loss_scale"):
        opt = kopt.optimizers.LossScaleOptimizer(opt, **case["loss_scale"])
    if case.get("exclude_from_weight_decay"):
        opt.exclude_from_weight_decay(var_names=case["exclude_from_weight_decay"])
    return opt


def gradient(g, shape):
    if isinstance(g, dict):
        return kopt.IndexedSlices(array(g["values"]), jnp.asarray(g["indices"]), tuple(shape))
    return array(g)


def scaled(g, scale):
    if isinstance(g, kopt.IndexedSlices):
        return kopt.IndexedSlices(g.values * scale, g.indices, g.dense_shape)
    return g * scale


def sharding_of(shape, mesh):
    return NamedSharding(mesh, P("x") if shape and shape[0] % 2 == 0 else P())


def make_variables(case, mesh=None):
    if mesh is None:
        return [kopt.Variable(v["initial"], name=v["name"]) for v in case["variables"]]
    return [
        kopt.Variable(
            jax.device_put(np.asarray(v["initial"], np.float32), sharding_of(v["shape"], mesh)),
            name=v["name"],
        )
        for v in case["variables"]
    ]


def run_legacy(case, mesh=None):
    opt = make_optimizer(case)
    variables = make_variables(case, mesh)
    shapes = [v["shape"] for v in case["variables"]]
    for t, step in enumerate(case["steps"]):
        for attr, value in case["changes"].get(str(t), {}).items():
            setattr(opt, attr, value)
        which = step["variables"]
        var_list = [variables[i] for i in which]
        if step["minimize"]:
            cs = [array(c) for c in step["gradients"]]

            def loss(cs=cs, var_list=var_list):
                return sum(jnp.sum(c * v * v) for c, v in zip(cs, var_list, strict=True))

            opt.minimize(loss, var_list)
            continue
        grads = [gradient(g, shapes[i]) for g, i in zip(step["gradients"], which, strict=True)]
        if case.get("loss_scale"):
            scale = opt.loss_scale.value
            grads = opt.get_unscaled_gradients([scaled(g, scale) for g in grads])
        opt.apply_gradients(zip(grads, var_list, strict=True))
    return opt, variables


def check_config(config, expected):
    assert list(config) == list(expected)
    for key, value in expected.items():
        if isinstance(value, float):
            assert config[key] == pytest.approx(value, rel=1e-7), key
        elif isinstance(value, dict):
            assert config[key]["class_name"] == value["class_name"], key
            assert config[key]["config"] == value["config"], key
        else:
            assert config[key] == value, key


def check_values(case, opt, variables, rtol):
    expected, cid = case["expected"], case["id"]
    for i, (v, e) in enumerate(zip(variables, expected["variables"], strict=True)):
        assert_close(v.numpy(), e, f"{cid}: variable {i}", rtol)
        for name, value in expected["slots"][i].items():
            assert_close(opt.get_slot(v, name).numpy(), value, f"{cid}: slot {name}", rtol)


def rtol_of(case):
    if case["source"] != "keras3":
        return 2e-6
    return KERAS3_BETA_COMPLEMENT_RTOL if case["class_name"] in ("AdamW", "Lamb") else 3e-6


@pytest.mark.parametrize("case", LEGACY, ids=[c["id"] for c in LEGACY])
def test_legacy_combination_matches_tf_keras(case):
    opt, variables = run_legacy(case)
    expected = case["expected"]
    check_values(case, opt, variables, rtol_of(case))
    assert int(opt.iterations.numpy()) == expected["iterations"]
    assert opt.get_slot_names() == expected["slot_names"]
    names, weights = [w.name for w in opt.weights], opt.get_weights()
    config = opt.get_config()
    if case.get("loss_scale"):
        # kopt's weights end with the scale and its counter (docs/deviations.md).
        assert names[-2:] == [
            "LossScaleOptimizer/current_loss_scale:0",
            "LossScaleOptimizer/good_steps:0",
        ]
        assert float(weights[-2]) == expected["loss_scale"]
        assert int(weights[-1]) == expected["dynamic_counter"]
        assert float(opt.loss_scale.numpy()) == expected["loss_scale"]
        assert int(opt.dynamic_counter.numpy()) == expected["dynamic_counter"]
        names, weights = names[:-2], weights[:-2]
        config = {k: v for k, v in config.items() if k != "inner_optimizer"}
    assert names == expected["weight_names"]
    for w, e, n in zip(weights, expected["weights"], names, strict=True):
        assert_close(w, e, f"{case['id']}: weight {n}", 2e-6)
    check_config(config, expected["config"])


def run_keras3(case, mesh=None):
    opt = make_optimizer(case)
    variables = make_variables(case, mesh)
    for step in case["steps"]:
        opt.apply_gradients(zip([array(g) for g in step["gradients"]], variables, strict=True))
    return opt, variables


@pytest.mark.parametrize("case", KERAS3, ids=[c["id"] for c in KERAS3])
def test_keras3_combination_matches_keras3(case):
    opt, variables = run_keras3(case)
    expected = case["expected"]
    check_values(case, opt, variables, rtol_of(case))
    # kopt's `iterations` counts calls, Keras 3's `_iterations` (docs: the Keras 3 options).
    assert int(opt.iterations.numpy()) == expected["calls"]
    config = opt.get_config()
    for key, value in expected["config"].items():
        if key in ("name", "learning_rate"):  # Keras 3's auto name is snake case
            continue
        if isinstance(value, float):
            assert config[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert config[key] == value, key


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
@pytest.mark.parametrize("case", SHARDED, ids=[c["id"] for c in SHARDED])
def test_combination_on_two_devices_matches_and_keeps_the_shardings(case):
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    run = run_keras3 if case["source"] == "keras3" else run_legacy
    opt, variables = run(case, mesh)
    check_values(case, opt, variables, rtol_of(case))
    for v in variables:
        assert v.value.sharding.is_equivalent_to(sharding_of(v.shape, mesh), v.ndim), v.name
        for name in opt.get_slot_names():
            slot = opt.get_slot(v, name)
            if slot.shape == v.shape:  # not Adafactor's factored r and c
                assert slot.value.sharding.is_equivalent_to(v.value.sharding, v.ndim), name
