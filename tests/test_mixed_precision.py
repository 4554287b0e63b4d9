"""Mixed precision: bfloat16 models trained with float32 slots (functional ``slot_dtype`` and the
facade's ``slot_dtype``), loss scaling that skips non-finite steps, and ``kopt.apply_if_finite``.

References are NumPy re-derivations (tests/numpy_reference.py) with the params rounded to bfloat16
after every step, as a bfloat16 variable is.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from numpy_reference import adam as numpy_adam

import kopt
from kopt import optimizers

RNG = np.random.default_rng(4)
X = RNG.normal(size=(32, 4)).astype(np.float32)
W_TRUE = np.array([1.0, -2.0, 0.5, 0.25], np.float32)
Y = X @ W_TRUE


def as_bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def loss_fn(w, x, y):
    """Mean squared error, computed in float32 from bfloat16 weights (a mixed-precision model)."""
    return jnp.mean((x @ w.astype(jnp.float32) - y) ** 2)


def numpy_gradient(w, x, y):
    return 2 * x.T @ (x @ w - y) / len(y)


def test_functional_bfloat16_model_trains_with_float32_slots():
    tx = kopt.adam(0.05, slot_dtype=jnp.float32)
    w = jnp.zeros(4, jnp.bfloat16)
    state = tx.init(w)
    assert kopt.get_slot(state, "m").dtype == jnp.float32
    step = jax.jit(lambda w, s: tx.update(jax.grad(loss_fn)(w, X, Y).astype(w.dtype), s, w))
    losses, grads_seen = [], []
    for _ in range(30):
        losses.append(float(loss_fn(w, X, Y)))
        grads_seen.append(as_bf16(numpy_gradient(np.asarray(w, np.float64), X, Y)))
        updates, state = step(w, state)
        w = kopt.apply_updates(w, updates)
    assert w.dtype == jnp.bfloat16
    assert kopt.get_slot(state, "v").dtype == jnp.float32
    assert losses[-1] < 0.1 * losses[0]
    expected = numpy_adam(np.zeros(4), grads_seen, lr=0.05, round_to=ml_dtypes.bfloat16)
    np.testing.assert_allclose(np.asarray(w, np.float64), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optimizers.SGD(0.1, momentum=0.9, slot_dtype="float32"),
        lambda: optimizers.Adam(0.05, slot_dtype=jnp.float32),
        lambda: optimizers.RMSprop(0.05, slot_dtype=jnp.float32),
        lambda: optimizers.AdamW(0.05, slot_dtype=jnp.float32),
        lambda: optimizers.Lion(0.1, slot_dtype=jnp.float32),
    ],
    ids=["SGD", "Adam", "RMSprop", "AdamW", "Lion"],
)
def test_facade_bfloat16_variable_trains_with_float32_slots(make):
    opt = make()
    var = kopt.Variable(jnp.zeros(4, jnp.bfloat16))
    losses = []
    for _ in range(30):
        losses.append(float(loss_fn(var.value, X, Y)))
        opt.minimize(lambda: loss_fn(var, X, Y), [var])
    assert var.dtype == jnp.bfloat16
    for name in opt.get_slot_names():
        assert opt.get_slot(var, name).dtype == jnp.float32, name
    assert losses[-1] < 0.2 * losses[0]
    assert opt.get_config()["slot_dtype"] == "float32"
    assert type(opt).from_config(opt.get_config()).slot_dtype == "float32"


def test_facade_adam_float32_slots_match_numpy():
    opt = optimizers.Adam(0.05, slot_dtype=jnp.float32)
    var = kopt.Variable(jnp.zeros(4, jnp.bfloat16))
    grads_seen = []
    for _ in range(10):
        grad = jnp.asarray(numpy_gradient(np.asarray(var.numpy(), np.float64), X, Y), jnp.bfloat16)
        grads_seen.append(np.asarray(grad, np.float64))
        opt.apply_gradients([(grad, var)])
    expected = numpy_adam(np.zeros(4), grads_seen, lr=0.05, round_to=ml_dtypes.bfloat16)
    np.testing.assert_allclose(np.asarray(var.numpy(), np.float64), expected, rtol=1e-2, atol=1e-3)


def test_slot_dtype_is_validated():
    with pytest.raises(TypeError, match="slot_dtype"):
        optimizers.Adam(slot_dtype=jnp.int32)
    with pytest.raises(TypeError, match="slot_dtype"):
        optimizers.Lion(slot_dtype="not a dtype")
    with pytest.raises(ValueError, match="slot_dtype"):
        optimizers.Adafactor(slot_dtype=jnp.float32)
    assert "slot_dtype" not in optimizers.Adam().get_config()  # tf.keras's keys when unset


def test_loss_scale_non_finite_step_changes_no_variable_and_lowers_the_scale():
    inner = optimizers.Adam(0.05, slot_dtype=jnp.float32)
    opt = optimizers.LossScaleOptimizer(inner, initial_scale=2.0**10, dynamic_growth_steps=100)
    var = kopt.Variable(jnp.ones(4, jnp.float16), name="kernel")
    bias = kopt.Variable(jnp.zeros((), jnp.float16), name="bias")

    def loss():
        pred = jnp.asarray(X, jnp.float16) @ var + bias
        return jnp.mean((pred - jnp.asarray(Y, jnp.float16)) ** 2)

    opt.minimize(loss, [var, bias])  # a finite step: builds the slots
    before = {w.name: np.asarray(w.numpy()) for w in [var, bias, *opt.weights]}
    scale = float(opt.loss_scale.numpy())

    big = jnp.float16(6e4)  # the scaled gradients overflow float16
    opt.minimize(lambda: loss() * big, [var, bias])
    after = {w.name: np.asarray(w.numpy()) for w in [var, bias, *opt.weights] if w.name in before}
    assert after.keys() == before.keys()
    for name, value in before.items():
        if name.startswith("LossScaleOptimizer/"):
            continue
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert float(opt.loss_scale.numpy()) == scale / 2
    assert int(opt.iterations.numpy()) == 1


def test_apply_if_finite_skips_bad_steps_in_training():
    tx = kopt.apply_if_finite(kopt.adam(0.05, slot_dtype=jnp.float32), max_consecutive_errors=3)
    w = jnp.zeros(4, jnp.bfloat16)
    state = tx.init(w)
    update = jax.jit(tx.update)
    applied = []
    for i in range(8):
        grad = numpy_gradient(np.asarray(w, np.float64), X, Y)
        if i in (2, 5):
            grad = grad * np.array([1.0, np.inf, 1.0, 1.0])  # a non-finite step
        grad = jnp.asarray(grad, jnp.bfloat16)
        before = np.asarray(w)
        updates, state = update(grad, state, w)
        w = kopt.apply_updates(w, updates)
        if i in (2, 5):
            np.testing.assert_array_equal(np.asarray(w), before)
        else:
            applied.append(np.asarray(grad, np.float64))
    assert int(state.total_notfinite) == 2
    expected = numpy_adam(np.zeros(4), applied, lr=0.05, round_to=ml_dtypes.bfloat16)
    np.testing.assert_allclose(np.asarray(w, np.float64), expected, rtol=1e-2, atol=1e-3)
