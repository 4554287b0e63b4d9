"""Attributes assigned between facade steps, against tf.keras's legacy optimizers run eagerly
the same way (tests/golden/generate.py): numbers such as ``learning_rate`` and ``epsilon``, and
the flags that change the update's form (``amsgrad``, ``nesterov``, ``centered``), whose new
slots tf.keras creates at the next step."""

import json

import jax.numpy as jnp
import pytest
from golden_cases import FIXTURES, assert_close

import kopt

CASES = json.loads((FIXTURES / "attribute_changes.json").read_text())["cases"]


def run(case, jit_steps=False):
    opt = getattr(kopt.optimizers, case["class_name"])(**case["kwargs"])
    variables = [kopt.Variable(v["initial"], name=v["name"]) for v in case["variables"]]
    trajectory = []
    for step, grads in enumerate(case["gradients"]):
        for attr, value in case["changes"].get(str(step), {}).items():
            setattr(opt, attr, value)
        opt.apply_gradients(zip([jnp.asarray(g) for g in grads], variables, strict=True))
        trajectory.append([v.numpy() for v in variables])
    return opt, variables, trajectory


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_attribute_changes_match_keras(case):
    opt, variables, trajectory = run(case)
    expected = case["expected"]
    for step, (got, want) in enumerate(zip(trajectory, expected["trajectory"], strict=True)):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{case['id']}: variable {i} after step {step}")
    assert opt.get_slot_names() == expected["slot_names"]
    assert [w.name for w in opt.weights] == expected["weight_names"]
    for v, slots in zip(variables, expected["slots"], strict=True):
        for name, value in slots.items():
            assert_close(opt.get_slot(v, name).numpy(), value, f"{case['id']}: slot {name}")
    weights = opt.get_weights()
    assert len(weights) == len(expected["weights"])
    for w, e, n in zip(weights, expected["weights"], expected["weight_names"], strict=True):
        assert_close(w, e, f"{case['id']}: weight {n}")
    config = opt.get_config()
    for key, value in expected["config"].items():
        if isinstance(value, float):
            assert config[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert config[key] == value, key


def test_a_flag_change_compiles_once_per_form():
    # Three forms: without vhat; with vhat, used; with vhat, kept but unused (as tf.keras).
    opt = kopt.optimizers.Adam(0.1)
    var = kopt.Variable(jnp.ones(3))
    grad = jnp.full(3, 0.5)
    for amsgrad in (False, False, True, True, False, False, True):
        opt.amsgrad = amsgrad
        opt.apply_gradients([(grad, var)])
    assert opt.compile_count == 3
    assert opt.get_slot_names() == ["m", "v", "vhat"]
