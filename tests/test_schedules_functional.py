"""Schedules inside optimizers: evaluated at the pre-increment step, traced once, vmappable.

The schedule values themselves are checked against Keras in test_golden_functional.py.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt import optimizers, schedules


def run_sgd(tx, steps, grad=1.0):
    params = jnp.zeros(1)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(jnp.array([grad]), state, params)
        params = kopt.apply_updates(params, updates)
    return params, state


def test_schedule_is_evaluated_at_the_count_before_the_update():
    lr = schedules.exponential_decay(1.0, decay_steps=1, decay_rate=0.5)
    params, state = run_sgd(kopt.sgd(lr), steps=3)
    np.testing.assert_allclose(params, [-(1.0 + 0.5 + 0.25)], rtol=1e-6)
    # The state holds the value used by the most recent update.
    np.testing.assert_allclose(kopt.get_hyperparam(state, "learning_rate"), 0.25)
    assert int(state.count) == 3


def test_init_stores_the_step_zero_value():
    state = kopt.adam(schedules.polynomial_decay(0.5, 10, end_learning_rate=0.0)).init(jnp.ones(1))
    np.testing.assert_allclose(kopt.get_hyperparam(state, "learning_rate"), 0.5)


def test_keras_time_inverse_decay():
    params, _ = run_sgd(kopt.sgd(1.0, decay=1.0), steps=3)
    np.testing.assert_allclose(params, [-(1.0 + 1.0 / 2 + 1.0 / 3)], rtol=1e-6)
    params, _ = run_sgd(kopt.adagrad(1.0, 0.0, 0.0, decay=0.5), steps=2)
    # adagrad steps g / sqrt(n): 1 / 1 then 1 / sqrt(2), with lr 1 then 1 / 1.5
    np.testing.assert_allclose(params, [-(1.0 + 1.0 / 1.5 / math.sqrt(2.0))], rtol=1e-6)


def test_any_float_hyperparameter_can_follow_a_schedule():
    momentum = lambda step: jnp.where(step < 1, 0.0, 0.5)  # noqa: E731
    params, state = run_sgd(kopt.sgd(0.1, momentum=momentum), steps=2)
    # a1 = -0.1; a2 = 0.5 * a1 - 0.1
    np.testing.assert_allclose(params, [-0.1 - 0.15], rtol=1e-6)
    assert float(kopt.get_hyperparam(state, "momentum")) == 0.5


def test_set_hyperparam_does_not_override_a_schedule():
    tx = kopt.sgd(lambda step: 0.25 + 0.0 * step)
    state = kopt.set_hyperparam(tx.init(jnp.zeros(1)), "learning_rate", 5.0)
    updates, state = tx.update(jnp.array([1.0]), state)
    np.testing.assert_allclose(updates, [-0.25])


def test_a_scheduled_step_is_traced_once():
    chex.clear_trace_counter()
    lr = schedules.piecewise_constant_decay([1, 2], [1.0, 0.5, 0.25])
    tx = kopt.sgd(lr)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        updates, state = tx.update(jnp.ones(1), state, params)
        return kopt.apply_updates(params, updates), state

    params, state = jnp.zeros(1), tx.init(jnp.zeros(1))
    for _ in range(5):
        params, state = step(params, state)
    # Steps 0 and 1 use 1.0 (boundary inclusive), step 2 uses 0.5, steps 3 and 4 use 0.25.
    np.testing.assert_allclose(params, [-(1.0 + 1.0 + 0.5 + 0.25 + 0.25)], rtol=1e-6)


def test_schedules_vmap_over_integer_steps():
    steps = np.arange(0, 40)
    cases = {
        "exponential": (
            schedules.exponential_decay(0.1, 7, 0.5, staircase=True),
            0.1 * 0.5 ** np.floor(steps / 7),
        ),
        "inverse_time": (
            schedules.inverse_time_decay(0.1, 5, 2.0),
            0.1 / (1 + 2.0 * steps / 5),
        ),
        "polynomial": (
            schedules.polynomial_decay(0.1, 20, end_learning_rate=0.01, power=2.0),
            0.09 * (1 - np.minimum(steps, 20) / 20) ** 2 + 0.01,
        ),
        "cosine": (
            schedules.cosine_decay(0.1, 30, alpha=0.1),
            0.1 * (0.9 * 0.5 * (1 + np.cos(np.pi * np.minimum(steps, 30) / 30)) + 0.1),
        ),
        "cosine_restarts_t_mul_1": (
            schedules.cosine_decay_restarts(0.1, 10, t_mul=1.0, m_mul=0.5),
            0.1 * 0.5 ** (steps // 10) * 0.5 * (1 + np.cos(np.pi * (steps % 10) / 10)),
        ),
    }
    for name, (fn, expected) in cases.items():
        values = jax.jit(jax.vmap(fn))(jnp.asarray(steps, jnp.int32))
        assert values.dtype == jnp.float32, name
        np.testing.assert_allclose(values, expected, rtol=2e-5, atol=1e-7, err_msg=name)


def numpy_cosine_restarts(step, initial, first, t_mul, alpha=0.0):
    """SGDR by walking the periods in float64: period i lasts first * t_mul**i steps."""
    start, length, i = 0.0, float(first), 0
    while step >= start + length - 1e-9:
        start, length, i = start + length, length * t_mul, i + 1
    fraction = (step - start) / length
    return initial * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * fraction)) + alpha)


def test_cosine_decay_restarts_starts_each_period_on_its_first_step_when_compiled():
    """At a period's first step ``log(...)/log(t_mul)`` can round to just under the integer
    under XLA, which missed the restart for that step (lr 0 instead of the initial one)."""
    for t_mul in (1.1177740431631642, 1.5, 2.0, 3.0):
        for first in (4, 10, 100):
            fn = jax.jit(schedules.cosine_decay_restarts(0.1, first, t_mul=t_mul))
            boundary, steps = 0.0, []
            for i in range(6):
                boundary += first * t_mul**i
                if abs(boundary - round(boundary)) < 1e-9:
                    steps += [round(boundary) - 1, round(boundary), round(boundary) + 1]
            for step in steps:
                np.testing.assert_allclose(
                    float(fn(jnp.asarray(step, jnp.int32))),
                    numpy_cosine_restarts(step, 0.1, first, t_mul),
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"t_mul={t_mul} first_decay_steps={first} step={step}",
                )


def test_numpy_and_array_arguments_are_numbers_as_in_keras():
    # tf.keras's schedules take NumPy scalars (a step count from NumPy is an np.int64); these are
    # its values for the same arguments.
    fn = schedules.exponential_decay(np.float32(0.1), np.int64(4), np.float32(0.5))
    np.testing.assert_allclose(
        [float(fn(s)) for s in (0, 3, 8)], [0.1, 0.0594603531062603, 0.025], rtol=1e-6
    )
    fn = schedules.cosine_decay_restarts(np.float32(1.0), np.int64(10), m_mul=np.float32(0.5))
    np.testing.assert_allclose(
        [float(fn(s)) for s in (5, 10, 25)], [0.5, 0.5, 0.0732233077287674], rtol=1e-6
    )
    fn = schedules.polynomial_decay(
        jnp.asarray(0.1), np.int32(10), end_learning_rate=np.float64(0.01), power=np.float32(2.0)
    )
    np.testing.assert_allclose([float(fn(s)) for s in (0, 5, 20)], [0.1, 0.0325, 0.01], rtol=1e-6)
    for bad in (np.bool_(True), np.array([0.1]), "0.1"):
        with pytest.raises(TypeError, match="initial_learning_rate"):
            schedules.exponential_decay(bad, 4, 0.5)
    with pytest.raises(ValueError, match="decay_steps"):
        schedules.exponential_decay(0.1, np.int64(0), 0.5)


def test_schedules_take_traced_arguments_under_jit_vmap_and_grad():
    """Building a schedule inside a transformation (a vmapped sweep over peaks, a learned
    warmup target) was refused: traced arguments were not counted as numbers."""
    fn = schedules.cosine_decay(0.1, 100)
    built = jax.jit(lambda lr0: schedules.cosine_decay(lr0, 100)(10.0))(0.1)
    np.testing.assert_allclose(built, fn(10.0), rtol=1e-6)
    swept = jax.vmap(lambda lr0: schedules.exponential_decay(lr0, 10, 0.5)(10.0))(
        jnp.array([0.1, 0.2])
    )
    np.testing.assert_allclose(swept, [0.05, 0.1], rtol=1e-6)
    # Linear warmup from 0 to the peak over 2 steps: at step 1 the rate is peak / 2.
    slope = jax.grad(
        lambda peak: schedules.cosine_decay(0.0, 10, warmup_target=peak, warmup_steps=2)(1.0)
    )(0.1)
    np.testing.assert_allclose(slope, 0.5, rtol=1e-6)
    boundaries = jax.vmap(lambda b: schedules.piecewise_constant_decay([b], [1.0, 0.5])(10.0))(
        jnp.array([5.0, 20.0])
    )
    np.testing.assert_array_equal(boundaries, [0.5, 1.0])
    # t_mul traced: the equal-period case (t_mul == 1) and the growing one, as when concrete.
    for t_mul in (1.0, 1.5, 2.0):
        traced = jax.jit(
            lambda t: jnp.stack(
                [
                    schedules.cosine_decay_restarts(1.0, 10, t_mul=t, m_mul=0.5)(s)
                    for s in range(0, 50, 5)
                ]
            )
        )(t_mul)
        concrete = schedules.cosine_decay_restarts(1.0, 10, t_mul=t_mul, m_mul=0.5)
        np.testing.assert_allclose(traced, [concrete(s) for s in range(0, 50, 5)], atol=1e-6)
    with pytest.raises(TypeError, match="initial_learning_rate"):
        jax.jit(lambda x: schedules.cosine_decay(x, 10)(1.0))(jnp.ones(2))


def test_a_numpy_int64_step_past_int32_does_not_wrap():
    """``jnp.asarray(np.int64(3e9))`` wraps to a negative int32 with x64 off: the schedules
    were then evaluated at a negative step. tf.keras's values at that step are the final ones."""
    step = np.int64(3_000_000_000)
    assert float(schedules.cosine_decay(0.1, 1000)(step)) == 0.0
    np.testing.assert_allclose(schedules.polynomial_decay(0.1, 1000)(step), 1e-4, rtol=1e-6)
    assert float(schedules.piecewise_constant_decay([10], [1.0, 0.5])(step)) == 0.5
    assert float(schedules.cosine_decay(0.1, 1000)(3_000_000_000)) == 0.0  # a Python int too
    assert float(schedules.cosine_decay(0.1, 1000)(np.array([step])[0])) == 0.0


@pytest.mark.parametrize("shape", [(2,), (1,)])
def test_a_schedule_returning_an_array_is_refused_naming_the_hyperparameter(shape):
    """A constant of shape (2,) was refused, but a schedule returning one was stored: its
    values broadcast over the params (or a (1,) value turned a scalar param's update into
    shape (1,)), the failure showing only later, naming no schedule."""
    tx = kopt.sgd(learning_rate=lambda step: jnp.full(shape, 0.1))
    with pytest.raises(ValueError, match=r"schedule for `learning_rate` returned .* shape"):
        tx.init(jnp.zeros(2))
    calls = []

    def scalar_at_first(step):  # the update's call returns the array
        calls.append(step)
        return 0.1 if len(calls) == 1 else jnp.full(shape, 0.1)

    tx = kopt.sgd(learning_rate=scalar_at_first)
    state = tx.init(jnp.zeros(()))
    with pytest.raises(ValueError, match=r"schedule for `learning_rate` returned .* shape"):
        tx.update(jnp.ones(()), state, jnp.zeros(()))


@pytest.mark.parametrize(
    "schedule, culprit",
    [
        (lambda: 0.1, r"`learning_rate` is a callable that cannot be called with the step"),
        (lambda step: "x", r"the schedule for `learning_rate` returned str: 'x'"),
        (lambda step: None, r"the schedule for `learning_rate` returned NoneType: None"),
        (lambda step: 0.1 + 1j, r"the schedule for `learning_rate` returned complex"),
    ],
    ids=["no-argument", "str", "None", "complex"],
)
def test_a_schedule_that_is_not_one_is_named(schedule, culprit):
    """A zero-argument callable failed with Python's own "takes 0 positional arguments", and a
    schedule returning a string or None with NumPy's "could not convert string to float" or
    JAX's "None is not a valid value for jnp.array"."""
    with pytest.raises(TypeError, match=culprit):
        kopt.adam(learning_rate=schedule).init(jnp.zeros(2))


class _TensorFlowDType:  # TensorFlow's tf.float32, which NumPy cannot read
    __module__ = "tensorflow.python.framework.dtypes"

    def __repr__(self):
        return "tf.float32"


class _EagerTensor:
    __module__ = "tensorflow.python.framework.ops"
    shape = ()
    dtype = _TensorFlowDType()


class _TfKerasLike:
    """Stands for a tf.keras schedule (the suite never imports TensorFlow): of the tf_keras
    package, it turns a concrete step into a TensorFlow tensor and fails on a traced one."""

    __module__ = "tf_keras.src.optimizers.schedules.learning_rate_schedule"

    def __call__(self, step):
        np.asarray(step)  # TracerArrayConversionError under jit
        return _EagerTensor()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
def test_a_tf_keras_schedule_given_to_a_functional_optimizer_is_named(compiled):
    """``kopt.sgd(tf_keras_schedule).init(params)`` failed with NumPy's "Cannot interpret
    'tf.float32' as a data type" (or, under jit, JAX's TracerArrayConversionError), naming
    neither the hyperparameter nor the schedule's library, where the facade says both."""
    init = kopt.sgd(learning_rate=_TfKerasLike(), momentum=0.9).init
    with pytest.raises(TypeError, match=r"the schedule for `learning_rate`") as info:
        (jax.jit(init) if compiled else init)(jnp.zeros(2))
    assert "A tf.keras schedule computes with TensorFlow: use kopt.schedules'" in str(info.value)


@pytest.mark.parametrize(
    "boundaries, values, error, culprit",
    [
        (
            [5, 2],
            [0.1, 0.2, 0.3],
            ValueError,
            r"`boundaries` must increase strictly, .*\[5.0, 2.0\]",
        ),
        ([2, 2], [0.1, 0.2, 0.3], ValueError, r"`boundaries` must increase strictly"),
        (["a"], [0.1, 0.2], TypeError, r"`boundaries` must be a sequence of numbers, .*'a'"),
        ([1], [0.1, None], TypeError, r"`values` must be a sequence of numbers, .*None"),
        (3, [0.1, 0.2], TypeError, r"`boundaries` must be a sequence of numbers, received int"),
    ],
    ids=["decreasing", "repeated", "str", "None-value", "not-a-sequence"],
)
def test_piecewise_constant_decay_names_bad_boundaries_and_values(
    boundaries, values, error, culprit
):
    """Boundaries that did not increase were taken, and the schedule gave a value at every step
    that no boundary order means (tf.keras fails at the step); a string failed with NumPy's
    "could not convert string to float". The facade's class builds the same function."""
    with pytest.raises(error, match="^piecewise_constant_decay: " + culprit):
        schedules.piecewise_constant_decay(boundaries, values)
    with pytest.raises(error, match="^piecewise_constant_decay: " + culprit):
        optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


@pytest.mark.parametrize("decay_steps", [97, 41, 1000, 2.5])
def test_staircase_and_cycle_boundaries_hold_under_vmap(decay_steps):
    """Under ``vmap`` the divisor is broadcast and XLA:CPU multiplies by its reciprocal, which
    put ``97 * (1 / 97)`` just under 1: staircase and cycle boundaries fell a step late."""
    k = np.arange(1, 12)
    steps = np.concatenate([k * decay_steps - 1, k * decay_steps, k * decay_steps + 1])
    steps = steps[steps >= 0].astype(np.float32)
    quotient = np.floor(steps.astype(np.float64) / decay_steps)
    cases = {
        "exponential": (
            schedules.exponential_decay(1.0, decay_steps, 0.5, staircase=True),
            0.5**quotient,
        ),
        "inverse_time": (
            schedules.inverse_time_decay(1.0, decay_steps, 1.0, staircase=True),
            1.0 / (1.0 + quotient),
        ),
        "polynomial_cycle": (
            schedules.polynomial_decay(1.0, decay_steps, end_learning_rate=0.0, cycle=True),
            1.0 - steps / (decay_steps * np.maximum(np.ceil(steps / decay_steps), 1.0)),
        ),
        "cosine_restarts_t_mul_1": (
            schedules.cosine_decay_restarts(1.0, decay_steps, t_mul=1.0),
            0.5 * (1 + np.cos(np.pi * (steps / decay_steps - quotient))),
        ),
    }
    for name, (fn, expected) in cases.items():
        batched = jax.jit(jax.vmap(fn))(jnp.asarray(steps))
        one_by_one = np.array([float(fn(s)) for s in steps])
        np.testing.assert_allclose(batched, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(one_by_one, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_cosine_decay_restarts_meets_decimal_t_mul_period_bounds():
    """t_mul=1.1 is 1.1000000238 in float32, and the float32 sum of the first periods put the
    start of the fourth (3310 for 1000 steps) a few roundings past 3310: that step returned
    the end of the third period (0) instead of a restart (1, as Keras and SGDR give)."""
    fn = jax.jit(jax.vmap(schedules.cosine_decay_restarts(1.0, 1000, t_mul=1.1)))
    steps = jnp.asarray([2099.0, 2100.0, 3309.0, 3310.0, 3311.0, 4640.0, 4641.0, 4642.0])
    expected = [numpy_cosine_restarts(float(s), 1.0, 1000, 1.1) for s in steps]
    np.testing.assert_allclose(fn(steps), expected, rtol=1e-4, atol=1e-5)
    assert float(fn(jnp.asarray([3310.0]))[0]) == pytest.approx(1.0)


def test_piecewise_constant_decay_takes_an_array_of_steps():
    """It compared the step with every boundary by broadcasting, which an array of steps does
    not fit ("gt got incompatible shapes"); the other schedules (and optax's and Keras 3's
    piecewise ones) give each step's value."""
    fn = schedules.piecewise_constant_decay([10, 20], [1.0, 0.5, 0.1])
    steps = np.arange(0, 30, 5)
    expected = np.float32([1.0, 1.0, 1.0, 0.5, 0.5, 0.1])
    np.testing.assert_array_equal(fn(jnp.asarray(steps)), expected)
    np.testing.assert_array_equal(fn(steps.reshape(2, 3)), expected.reshape(2, 3))
    np.testing.assert_array_equal(jax.jit(jax.vmap(fn))(jnp.asarray(steps)), expected)
    np.testing.assert_array_equal(schedules.piecewise_constant_decay([], [0.5])(steps), [0.5] * 6)


# tf_keras 2.21: its staircase floors the float32 quotient step / decay_steps (0.3 is
# 0.30000001 in float32, 9 / 0.30000001 rounds to 29.999998, 27 / 0.30000001 to 90.0).
@pytest.mark.parametrize(
    "make, steps, expected",
    [
        (
            lambda: schedules.inverse_time_decay(1.0, 0.3, 0.5, staircase=True),
            [9.0, 15.0, 27.0],
            [0.06451612710952759, 0.03921568766236305, 0.021739130839705467],
        ),
        (
            lambda: schedules.inverse_time_decay(1.0, 0.001, 0.5, staircase=True),
            [1.0],
            [0.001998001942411065],
        ),
        (
            lambda: schedules.exponential_decay(1.0, 1000 / 3, 0.5, staircase=True),
            [20999.0, 21000.0, 21001.0, 42000.0],
            [2.168404344971009e-19, 2.168404344971009e-19, 1.0842021724855044e-19, 2**-125],
        ),
        (
            lambda: schedules.cosine_decay_restarts(1.0, 1000, t_mul=1.0),
            [134644992.0],
            [0.0006022751331329346],
        ),
        (
            lambda: schedules.cosine_decay_restarts(1.0, 97, t_mul=1.0),
            [59510952.0],
            [1.0],
        ),
        (
            lambda: schedules.cosine_decay_restarts(1.0, 3, t_mul=1.0),
            [25171922.0],
            [1.0],
        ),
    ],
    ids=["0.3", "0.001", "1000/3", "restarts-1000", "restarts-97", "restarts-3"],
)
def test_the_quotient_is_floored_as_keras_floors_it(make, steps, expected):
    """The floor was corrected by products ``q * d`` taken as exact, which they are not for a
    decay_steps such as 0.3 or 1000 / 3 (nor past 2**24 steps): the staircase fell a step
    early or late. Past 2**24 steps, cosine_decay_restarts with ``t_mul=1`` took the restart
    from that floor but the fraction from the rounded quotient, which went negative there (the
    top of the period, 1.0, near its end). Keras floors the float32 quotient itself."""
    fn = make()
    one_by_one = [float(fn(s)) for s in steps]
    batched = jax.jit(jax.vmap(fn))(jnp.asarray(steps, jnp.float32))
    np.testing.assert_allclose(one_by_one, expected, rtol=1e-6)
    np.testing.assert_allclose(batched, expected, rtol=1e-6)


def test_cosine_decay_restarts_takes_a_t_mul_that_float32_makes_1_for_1():
    """``t_mul`` was compared with 1.0 as the Python value, then used as float32: one a hair
    above 1 (1.0000000149, read back from a float32) took the growing periods' formula with
    ``log(1.0) = 0`` and gave NaN at every step. Keras compares the float32 value."""
    t_mul = float(np.float32(0.1)) * 10
    # tf_keras 2.21's values (those of t_mul=1.0).
    expected = [0.10000000149011612, 0.07938926666975021, 0.10000000149011612, 0.04999999701976776]
    for m_mul in (1.0, t_mul):
        fn = schedules.cosine_decay_restarts(0.1, 10, t_mul=t_mul, m_mul=m_mul)
        steps = [0.0, 3.0, 10.0, 25.0]
        np.testing.assert_allclose([float(fn(s)) for s in steps], expected, rtol=1e-6)
        np.testing.assert_allclose(jax.vmap(fn)(jnp.asarray(steps)), expected, rtol=1e-6)
    assert float(schedules.cosine_decay_restarts(0.1, 10, t_mul=1 + 1e-9)(0.0)) == pytest.approx(
        0.1
    )


@pytest.mark.parametrize(
    "t_mul, m_mul, steps, expected",
    [
        (2.0, 1.0, [-1.0, -5.0, -9.0], [0.009549147449433804, 0.1, 0.03454909473657608]),
        (3.0, 0.5, [-1.0, -2.0], [0.04122148081660271, 0.13090172410011292]),
    ],
)
def test_cosine_decay_restarts_at_a_negative_step_is_keras(t_mul, m_mul, steps, expected):
    """The slack that lets a step just short of a period's computed first step count as in it
    scaled the bound towards 0, which for a negative bound put it past the step: -5 with
    ``t_mul=2`` gave 0.0 where tf.keras and Keras 3 give 0.1 (tf_keras 2.21's values)."""
    fn = schedules.cosine_decay_restarts(0.1, 10, t_mul=t_mul, m_mul=m_mul)
    np.testing.assert_allclose([float(fn(s)) for s in steps], expected, rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(fn)(jnp.asarray(steps)), expected, rtol=1e-4)
