"""The Keras facade against tf.keras's legacy optimizers: variables, slots, weights, config."""

import pytest
from golden_cases import OPTIMIZER_CASES, assert_close, gradient_stream, tolerance_for

import kopt
from kopt.optimizers import schedules

CASES = list(OPTIMIZER_CASES)


def make_optimizer(case):
    kwargs = dict(case["kwargs"])
    if case["learning_rate_schedule"]:
        spec = case["learning_rate_schedule"]
        kwargs["learning_rate"] = schedules.deserialize(spec)
    return getattr(kopt.optimizers, case["class_name"])(**kwargs)


def run(case):
    opt = make_optimizer(case)
    variables = [kopt.Variable(v["initial"], name=v["name"]) for v in case["variables"]]
    for grads in gradient_stream(case):
        opt.apply_gradients(zip(grads, variables, strict=True))
    return opt, variables


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_facade_matches_keras(case):
    opt, variables = run(case)
    expected = case["expected"]
    rtol = tolerance_for(case)
    for i, (v, e) in enumerate(zip(variables, expected["variables"], strict=True)):
        assert_close(v.numpy(), e, f"{case['id']}: variable {i}", rtol)
        for name, value in expected["slots"][i].items():
            assert_close(opt.get_slot(v, name).numpy(), value, f"{case['id']}: slot {name}", rtol)
    assert int(opt.iterations.numpy()) == expected["iterations"]
    if case["source"] != "tf_keras_legacy":
        return
    assert opt.get_slot_names() == expected["slot_names"]
    assert [w.name for w in opt.weights] == expected["weight_names"]
    weights = opt.get_weights()
    assert len(weights) == len(expected["weights"])
    for w, e, n in zip(weights, expected["weights"], expected["weight_names"], strict=True):
        assert_close(w, e, f"{case['id']}: weight {n}", rtol)
    config = opt.get_config()
    assert list(config) == list(expected["config"])
    for key, value in expected["config"].items():
        if isinstance(value, float):
            assert config[key] == pytest.approx(value, rel=1e-7), key
        elif isinstance(value, dict):
            assert config[key]["class_name"] == value["class_name"]
            assert config[key]["config"] == value["config"]
        else:
            assert config[key] == value, key
