"""kopt inside optax, flax and equinox code, and optax inside kopt."""

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest
from flax.training import train_state

import kopt


def regression_data():
    x = jax.random.normal(jax.random.key(0), (64, 3))
    y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3
    return x, y


def test_kopt_inside_optax_chain():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads_seq = [np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, -1.0])]
    tx = optax.chain(kopt.adam(0.1), optax.scale(0.5))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads_seq:
        updates, state = step({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    # Halving every Adam step equals Adam with half the learning rate.
    expected = ref.adam([1.0, -2.0, 3.0], grads_seq, lr=0.05)
    np.testing.assert_allclose(params["w"], expected, rtol=1e-6)
    assert float(kopt.get_hyperparam(state, "learning_rate")) == np.float32(0.1)


def test_optax_inside_kopt_chain():
    tx = kopt.chain(optax.clip_by_global_norm(1.0), kopt.sgd(0.1))
    params = {"a": jnp.array([0.0]), "b": jnp.array([0.0])}
    updates, state = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, tx.init(params))
    np.testing.assert_allclose(updates["a"], [-0.06], rtol=1e-6)  # -0.1 * 3 / 5
    np.testing.assert_allclose(updates["b"], [-0.08], rtol=1e-6)
    # Below the threshold the gradient passes unchanged.
    updates, _ = tx.update({"a": jnp.array([0.3]), "b": jnp.array([0.4])}, state)
    np.testing.assert_allclose(updates["a"], [-0.03], rtol=1e-6)


def test_set_hyperparam_reaches_optax_inject_hyperparams():
    tx = kopt.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), kopt.clip_by_value(5))
    params = jnp.zeros(2)
    state = kopt.set_hyperparam(tx.init(params), "learning_rate", 2.0)
    assert float(kopt.get_hyperparam(state, "learning_rate")) == 2.0
    updates, _ = jax.jit(tx.update)(jnp.array([1.0, -1.0]), state, params)
    np.testing.assert_allclose(updates, [-2.0, 2.0])


def test_kopt_update_accepts_optax_extra_args_in_kopt_chain():
    # optax.chain passes extra keyword arguments only to pieces that accept them.
    tx = optax.chain(optax.scale_by_adam(), kopt.scale_by_learning_rate(1.0))
    g = jnp.array([1.0, -1.0])
    updates, _ = tx.update(g, tx.init(g), g, value=jnp.float32(0.0))
    np.testing.assert_allclose(updates, [-1.0, 1.0], rtol=1e-5)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


def test_flax_train_state_trains():
    x, y = regression_data()
    model = LinenMLP()
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(1), x), tx=kopt.adam(3e-2)
    )

    @jax.jit
    def step(state):
        def loss_fn(params):
            return jnp.mean((state.apply_fn(params, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    state, first = step(state)
    for _ in range(60):
        state, loss = step(state)
    assert float(loss) < 0.1 * float(first)
    assert int(state.step) == 61
    assert int(state.opt_state[0].count) == 61


@pytest.mark.parametrize("flat", [False, True], ids=["adam", "flatten(adam)"])
def test_nnx_optimizer_trains(flat):
    """``nnx.Optimizer`` initialises with the model's ``Variable`` boxes and updates with the bare
    arrays; ``kopt.flatten`` takes both for the same leaves and trains as the plain optimizer."""
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 16, rngs=rngs)
            self.out = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.tanh(self.hidden(x)))

    x, y = regression_data()
    model = MLP(nnx.Rngs(0))
    reference = MLP(nnx.Rngs(0))
    tx = kopt.flatten(kopt.adam(3e-2)) if flat else kopt.adam(3e-2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    first = step(model, optimizer)
    for _ in range(60):
        loss = step(model, optimizer)
    assert float(loss) < 0.1 * float(first)

    # The same 61 steps as the plain functional loop over the model's arrays.
    graphdef, params = nnx.split(reference, nnx.Param)
    plain = kopt.adam(3e-2)
    state = plain.init(params)
    for _ in range(61):
        grads = jax.grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2))(params)
        updates, state = plain.update(grads, state, params)
        params = kopt.apply_updates(params, updates)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        nnx.to_pure_dict(params),
        rtol=1e-4,
        atol=1e-5,
    )


def test_equinox_model_trains_with_none_leaves():
    x, y = regression_data()
    model = eqx.nn.MLP(3, 1, 16, 1, activation=jax.nn.tanh, key=jax.random.key(2))
    tx = kopt.chain(kopt.clip_by_global_norm(10.0), kopt.adam(3e-2))
    params = eqx.filter(model, eqx.is_inexact_array)
    assert None in jax.tree.leaves(params, is_leaf=lambda v: v is None)
    state = tx.init(params)

    @eqx.filter_jit
    def step(model, state):
        def loss_fn(m):
            return jnp.mean((jax.vmap(m)(x) - y) ** 2)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, loss

    model, state, first = step(model, state)
    for _ in range(60):
        model, state, loss = step(model, state)
    assert float(loss) < 0.1 * float(first)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: kopt.accumulate_gradients(tx, 2),
        lambda tx: kopt.apply_if_finite(tx, 2),
        lambda tx: kopt.chain(tx, kopt.ema(0.9, overwrite_frequency=2)),
    ],
    ids=["accumulate", "apply_if_finite", "ema"],
)
def test_wrappers_accept_equinox_trees(wrap):
    model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    tx = wrap(kopt.sgd(0.1))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(grads, state, params)
        model = eqx.apply_updates(model, updates)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(updates))
