"""kopt's functional optimizers against tf.keras (legacy) and Keras 3 golden trajectories."""

import jax
import pytest
from golden_cases import (
    OPTIMIZER_CASES,
    SCHEDULE_CASES,
    SCHEDULES,
    assert_close,
    functional_optimizer,
    gradient_stream,
    initial_params,
    tolerance_for,
)

import kopt


def run_case(case, jit):
    tx = functional_optimizer(case)
    params = initial_params(case)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for grads in gradient_stream(case):
        updates, state = update(grads, state, params)
        params = kopt.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=[c["id"] for c in OPTIMIZER_CASES])
def test_matches_keras_after_all_steps(case, jit):
    assert case["steps"] >= 10
    params, state = run_case(case, jit)
    rtol = tolerance_for(case)
    expected = case["expected"]
    for i, (p, e) in enumerate(zip(params, expected["variables"], strict=True)):
        assert_close(p, e, f"{case['id']}: variable {i}", rtol)
        for name, value in expected["slots"][i].items():
            assert_close(
                kopt.get_slot(state, name)[i], value, f"{case['id']}: slot {name}[{i}]", rtol
            )
    if "momentum_cache" in expected:
        assert_close(
            kopt.get_slot(state, "momentum_cache"), expected["momentum_cache"], "momentum_cache"
        )


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=[c["id"] for c in SCHEDULE_CASES])
def test_schedule_values_match_keras(case):
    kwargs = {k: v for k, v in case["kwargs"].items() if k != "name"}
    fn = SCHEDULES[case["class_name"]](**kwargs)
    jitted = jax.jit(fn)
    for step, value in zip(case["steps"], case["values"], strict=True):
        assert_close(fn(step), value, f"{case['id']} at step {step}")
        assert_close(jitted(float(step)), value, f"{case['id']} at step {step} (jit)")
