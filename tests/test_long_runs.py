"""Long runs: 10,000 steps of every optimizer stay finite and converge; counts never wrap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt

# A well-posed least-squares problem with a known optimum x* = A^-1 b.
A = jnp.array([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]])
X_STAR = jnp.array([1.0, -2.0, 0.5])
B = A @ X_STAR

OPTIMIZERS = {
    "sgd": kopt.sgd(0.05, momentum=0.9),
    "sgd_nesterov": kopt.sgd(0.05, momentum=0.9, nesterov=True),
    "adam": kopt.adam(0.01),
    "adam_amsgrad": kopt.adam(0.01, amsgrad=True),
    "adagrad": kopt.adagrad(0.5),
    "adadelta": kopt.adadelta(1.0),
    "adamax": kopt.adamax(0.02),
    "nadam": kopt.nadam(0.01),
    "rmsprop": kopt.rmsprop(0.01),
    "rmsprop_centered_momentum": kopt.rmsprop(0.005, momentum=0.9, centered=True),
    "ftrl": kopt.ftrl(0.5),
    "adamw": kopt.adamw(0.01, weight_decay=0.0),
    "lion": kopt.lion(kopt.schedules.cosine_decay(0.01, 10_000)),
    "lamb": kopt.lamb(kopt.schedules.cosine_decay(0.05, 10_000)),
    "adafactor": kopt.adafactor(0.5),
}


def loss(x):
    r = A @ x - B
    return 0.5 * jnp.dot(r, r)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_ten_thousand_steps_converge(name):
    tx = OPTIMIZERS[name]
    x0 = jnp.zeros(3)

    @jax.jit
    def train(x):
        def step(carry, _):
            x, state = carry
            updates, state = tx.update(jax.grad(loss)(x), state, x)
            return (kopt.apply_updates(x, updates), state), None

        (x, state), _ = jax.lax.scan(step, (x, tx.init(x)), None, length=10_000)
        return x, state

    x, state = train(x0)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state))
    assert float(loss(x)) < 1e-3 * float(loss(x0)), f"{name} did not converge: {x}"
    np.testing.assert_allclose(np.asarray(x), np.asarray(X_STAR), atol=0.05)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_count_saturates_and_updates_stay_finite_past_2_31(name):
    tx = OPTIMIZERS[name]
    x = jnp.ones(3)
    state = tx.init(x)
    near_limit = jnp.asarray(2**31 - 2, jnp.int32)
    state = jax.tree.map(
        lambda s: s._replace(count=near_limit) if isinstance(s, kopt.OptimizerState) else s,
        state,
        is_leaf=lambda s: isinstance(s, kopt.OptimizerState),
    )
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(jax.grad(loss)(x), state, x)
        x = kopt.apply_updates(x, updates)
    counts = [
        s.count
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, kopt.OptimizerState))
        if isinstance(s, kopt.OptimizerState)
    ]
    assert counts and all(int(c) == 2**31 - 1 for c in counts)
    assert bool(jnp.all(jnp.isfinite(x)))


def test_facade_iterations_saturate():
    var = kopt.Variable([1.0])
    opt = kopt.optimizers.Adam(0.1)
    opt.apply_gradients([(jnp.ones(1), var)])
    opt.iterations.assign(2**31 - 2)
    for _ in range(3):
        opt.apply_gradients([(jnp.ones(1), var)])
    assert int(opt.iterations.numpy()) == 2**31 - 1
    assert np.isfinite(var.numpy()).all()
