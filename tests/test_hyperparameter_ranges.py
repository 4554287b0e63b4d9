"""Learning rates that are negative or not finite are refused by both APIs, at construction and
later; NaN gradients propagate through plain optimizers as in tf.keras."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt import optimizers

BAD = [-1.0, float("nan"), float("inf")]


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("factory", [kopt.sgd, kopt.adam, kopt.rmsprop, kopt.lion])
def test_functional_optimizers_refuse_the_learning_rate(factory, value):
    with pytest.raises(ValueError, match="learning_rate"):
        factory(learning_rate=value)


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("cls", [optimizers.SGD, optimizers.Adam, optimizers.AdamW])
def test_facade_refuses_the_learning_rate_at_construction(cls, value):
    with pytest.raises(ValueError, match="learning_rate"):
        cls(learning_rate=value)


@pytest.mark.parametrize("value", BAD)
def test_facade_refuses_the_learning_rate_later_and_keeps_the_old_one(value):
    opt = optimizers.Adam(learning_rate=0.1)
    var = kopt.Variable([1.0])
    opt.apply_gradients([(jnp.ones(1), var)])
    before = var.numpy()
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = value
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.1)
    np.testing.assert_array_equal(var.numpy(), before)


@pytest.mark.parametrize("cls", [optimizers.SGD, optimizers.Adam, optimizers.RMSprop])
def test_nan_gradients_propagate_like_tf_keras(cls):
    # tf.keras's plain optimizers apply a NaN gradient: the variable becomes NaN.
    opt = cls(learning_rate=0.1)
    var = kopt.Variable([1.0, 2.0])
    opt.apply_gradients([(jnp.array([jnp.nan, 1.0]), var)])
    value = var.numpy()
    assert np.isnan(value[0]) and np.isfinite(value[1])


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_centered_rmsprop_with_rho_zero_divides_by_epsilon_under_jit(momentum):
    """With ``rho=0`` the centered variance ``ms - mg**2`` is ``g**2 - g**2 = 0``, and tf.keras
    divides by epsilon (``sqrt(0) + eps``, or ``sqrt(0 + eps)`` with momentum). Under
    ``jax.jit`` XLA fused ``ms - mg * mg`` into one multiply-add, whose unrounded product left
    rounding noise: NaN for about half the elements, far too small steps for the rest."""
    g = (np.random.default_rng(0).normal(size=64) * 3.7).astype(np.float32)
    lr, eps = np.float32(0.1), np.float32(1e-7)
    root = np.sqrt(eps) if momentum else eps  # sqrt(0 + eps), or sqrt(0) + eps
    expected = -(lr * g) / root
    tx = kopt.rmsprop(0.1, rho=0.0, momentum=momentum, centered=True)
    params = jnp.zeros(64)
    for grads in (g, kopt.IndexedSlices(g, jnp.arange(64), (64,))):
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        np.testing.assert_allclose(kopt.apply_updates(params, updates), expected, rtol=1e-6)
    opt = optimizers.RMSprop(0.1, rho=0.0, momentum=momentum, centered=True)
    var = kopt.Variable(np.zeros(64, np.float32))
    opt.apply_gradients([(g, var)])
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("attr", ["clipnorm", "clipvalue", "global_clipnorm"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [optimizers.Adam, optimizers.AdamW])
def test_facade_refuses_a_clip_threshold_that_is_not_finite(cls, attr, value):
    """A NaN or infinite threshold was taken, and the next step made every weight NaN."""
    with pytest.raises(ValueError, match=attr):
        cls(0.1, **{attr: value})
    opt = cls(0.1, **{attr: 1.0})
    var = kopt.Variable([1.0, 2.0])
    with pytest.raises(ValueError, match=attr):
        setattr(opt, attr, value)
    assert getattr(opt, attr) == 1.0
    opt.apply_gradients([(jnp.ones(2), var)])
    assert np.all(np.isfinite(var.numpy()))


@pytest.mark.parametrize("built_with", [0.0, 0.5])
@pytest.mark.parametrize("cls", [optimizers.SGD, optimizers.RMSprop])
def test_facade_refuses_a_momentum_out_of_range_also_when_built_without_momentum(cls, built_with):
    """Built with momentum=0 (no momentum slot), `opt.momentum = 1.5` was accepted, and the
    checkpoint it saved could not be restored; built with momentum=0.5 it was refused."""
    opt = cls(learning_rate=0.1, momentum=built_with)
    var = kopt.Variable([1.0, 2.0])
    opt.apply_gradients([(jnp.ones(2), var)])
    before = (opt.get_config(), [w.copy() for w in opt.get_weights()])
    with pytest.raises(ValueError, match=r"`momentum` must be <= 1\.0, received 1\.5"):
        opt.momentum = 1.5
    assert opt.get_config() == before[0]
    for old, new in zip(before[1], opt.get_weights(), strict=True):
        np.testing.assert_array_equal(new, old)
