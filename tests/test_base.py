"""The optax-protocol core: hyperparameters in the state, retracing, slots, chain, apply_updates."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from optimizer_zoo import OPTIMIZERS

import kopt

INT32_MAX = 2**31 - 1


def small_params():
    return {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.array([0.5, -0.5])}


def ones_like_tree(tree):
    return jax.tree.map(jnp.ones_like, tree)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_changing_the_learning_rate_never_retraces(name):
    chex.clear_trace_counter()
    tx = OPTIMIZERS[name](0.1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return (
            kopt.apply_updates(params, updates),
            state,
            kopt.get_hyperparam(state, "learning_rate"),
        )

    params = small_params()
    state = tx.init(params)
    grads = ones_like_tree(params)
    # FTRL divides by the learning rate, so 0 is not a valid value for it.
    schedule = [0.2, 0.1, 0.05] if name == "ftrl" else [0.0, 0.0, 0.05]
    for lr in schedule:
        state = kopt.set_hyperparam(state, "learning_rate", lr)
        new_params, state, used = step(params, state, grads)
        assert float(used) == np.float32(lr)
        moved = jax.tree.leaves(
            jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_params, params)
        )
        assert moved == [lr > 0] * len(moved), f"{name}: lr={lr} moved={moved}"
        params = new_params


def test_set_hyperparam_inside_jit_with_a_traced_value():
    chex.clear_trace_counter()
    tx = kopt.sgd(0.1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, lr):
        state = kopt.set_hyperparam(state, "learning_rate", lr)
        updates, state = tx.update(jnp.array([2.0]), state, params)
        return kopt.apply_updates(params, updates), state

    params, state = jnp.array([1.0]), tx.init(jnp.array([1.0]))
    for lr, expected in [(0.25, 0.5), (0.5, -0.5), (0.125, -0.75)]:
        params, state = step(params, state, jnp.float32(lr))
        np.testing.assert_allclose(params, [expected])


def test_get_slot_and_get_hyperparam_inside_jit():
    tx = kopt.adam(0.1, beta_1=0.75)

    @jax.jit
    def step(state, grads):
        _, state = tx.update(grads, state)
        return (
            kopt.get_slot(state, "m"),
            kopt.get_slot(state, "v"),
            kopt.get_hyperparam(state, "beta_1"),
        )

    m, v, beta_1 = step(tx.init({"w": jnp.zeros(2)}), {"w": jnp.array([2.0, -4.0])})
    np.testing.assert_allclose(m["w"], [0.5, -1.0])  # (1 - 0.75) * g
    np.testing.assert_allclose(v["w"], [0.004, 0.016], rtol=1e-4)  # (1 - 0.999) * g**2
    assert float(beta_1) == 0.75


def test_set_hyperparam_returns_a_new_state_and_sets_every_copy():
    tx = kopt.chain(kopt.sgd(0.1), kopt.sgd(0.2))
    state = tx.init(jnp.zeros(1))
    new = kopt.set_hyperparam(state, "learning_rate", 0.5)
    assert [float(s.hyperparams["learning_rate"]) for s in new] == [0.5, 0.5]
    assert float(state[0].hyperparams["learning_rate"]) == np.float32(0.1)
    assert float(state[1].hyperparams["learning_rate"]) == np.float32(0.2)
    assert new[0].hyperparams["learning_rate"].dtype == jnp.float32


def test_set_hyperparam_reaches_into_wrappers():
    tx = kopt.apply_if_finite(kopt.masked(kopt.sgd(0.1), {"w": True, "b": False}), 3)
    params = {"w": jnp.zeros(1), "b": jnp.zeros(1)}
    state = kopt.set_hyperparam(tx.init(params), "learning_rate", 2.0)
    updates, _ = tx.update({"w": jnp.ones(1), "b": jnp.ones(1)}, state, params)
    np.testing.assert_allclose(updates["w"], [-2.0])
    np.testing.assert_allclose(updates["b"], [1.0])


def test_hyperparameters_accept_numpy_and_jax_scalars():
    for lr in (np.float32(0.5), np.float64(0.5), jnp.float32(0.5), jnp.array(0.5), 1):
        tx = kopt.sgd(lr)
        updates, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
        np.testing.assert_allclose(updates, [-2.0 * float(lr)])


def test_an_optimizer_built_inside_jit_from_a_traced_learning_rate():
    @jax.jit
    def step(lr, params):
        tx = kopt.adagrad(lr, initial_accumulator_value=0.0, epsilon=0.0)
        updates, _ = tx.update(jnp.array([3.0]), tx.init(params), params)
        return updates

    np.testing.assert_allclose(step(0.5, jnp.zeros(1)), [-0.5])  # -lr * g / sqrt(g**2)
    np.testing.assert_allclose(step(0.25, jnp.zeros(1)), [-0.25])


def test_the_step_count_saturates_instead_of_wrapping():
    tx = kopt.adam(0.1)
    grads = jnp.array([1.0, -2.0])
    state = tx.init(jnp.zeros(2))
    state = tuple(s._replace(count=jnp.int32(INT32_MAX - 1)) for s in state)
    step = jax.jit(tx.update)
    updates, state = step(grads, state)
    updates, state = step(grads, state)
    assert [int(s.count) for s in state] == [INT32_MAX, INT32_MAX]
    assert state[0].count.dtype == jnp.int32
    # At t ~ 2**31 the bias corrections are 1; with m and v as after two steps from zero:
    m = (1 - 0.9) * 0.9 * np.array([1.0, -2.0]) + (1 - 0.9) * np.array([1.0, -2.0])
    v = (1 - 0.999) * 0.999 * np.array([1.0, 4.0]) + (1 - 0.999) * np.array([1.0, 4.0])
    np.testing.assert_allclose(updates, -0.1 * m / (np.sqrt(v) + 1e-7), rtol=1e-5)


def test_wrapper_counters_saturate_too():
    tx = kopt.apply_if_finite(kopt.sgd(0.1), max_consecutive_errors=0)
    state = tx.init(jnp.zeros(1))
    state = state._replace(total_notfinite=jnp.int32(INT32_MAX))
    _, state = tx.update(jnp.array([jnp.nan]), state)
    assert int(state.total_notfinite) == INT32_MAX

    tx = kopt.chain(kopt.sgd(0.1), kopt.ema(0.5))
    state = tx.init(jnp.zeros(1))
    state = (state[0], state[1]._replace(count=jnp.int32(INT32_MAX)))
    _, state = tx.update(jnp.ones(1), state, jnp.zeros(1))
    assert int(state[1].count) == INT32_MAX


def test_slot_names_and_get_slot():
    state = kopt.rmsprop(momentum=0.5, centered=True).init({"w": jnp.zeros(2)})
    assert kopt.slot_names(state) == ["rms", "momentum", "mg"]
    np.testing.assert_array_equal(kopt.get_slot(state, "mg")["w"], [0.0, 0.0])
    state = kopt.ftrl(initial_accumulator_value=0.25).init({"w": jnp.zeros(2)})
    assert kopt.slot_names(state) == ["accumulator", "linear"]
    np.testing.assert_array_equal(kopt.get_slot(state, "accumulator")["w"], [0.25, 0.25])
    assert kopt.slot_names(kopt.sgd(0.1).init(jnp.zeros(1))) == []


def test_chain_runs_left_to_right():
    g = jnp.array([4.0, -0.5])
    clip_then_scale = kopt.chain(kopt.clip_by_value(1.0), kopt.scale_by_learning_rate(0.5))
    scale_then_clip = kopt.chain(kopt.scale_by_learning_rate(0.5), kopt.clip_by_value(1.0))
    u1, _ = clip_then_scale.update(g, clip_then_scale.init(g))
    u2, _ = scale_then_clip.update(g, scale_then_clip.init(g))
    np.testing.assert_allclose(u1, [-0.5, 0.25])
    np.testing.assert_allclose(u2, [-1.0, 0.25])


def test_identity_and_empty_chain():
    for tx in (kopt.identity(), kopt.chain()):
        g = {"a": jnp.array([1.0, 2.0])}
        u, _ = tx.update(g, tx.init(g))
        np.testing.assert_array_equal(u["a"], [1.0, 2.0])


def test_apply_updates_keeps_dtypes_and_skips_none():
    params = {"h": jnp.array([1.0, 2.0], jnp.bfloat16), "f": jnp.array([1.0]), "fn": None}
    updates = {"h": jnp.array([0.5, 0.25], jnp.float32), "f": None, "fn": None}
    new = kopt.apply_updates(params, updates)
    assert new["h"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(new["h"].astype(jnp.float32), [1.5, 2.25])
    np.testing.assert_array_equal(new["f"], [1.0])
    assert new["fn"] is None


def test_apply_updates_scatter_adds_indexed_slices():
    table = jnp.zeros((4, 2))
    rows = kopt.IndexedSlices(jnp.array([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]), jnp.array([1, 1, 3]))
    new = kopt.apply_updates({"t": table}, {"t": rows})["t"]
    np.testing.assert_array_equal(new, [[0, 0], [3, 3], [0, 0], [4, 4]])
    # An out-of-range index (the padding of deduplicated rows) is dropped.
    padded = kopt.IndexedSlices(jnp.ones((2, 2)), jnp.array([0, 4]))
    new = kopt.apply_updates(table, padded)
    np.testing.assert_array_equal(new, [[1, 1], [0, 0], [0, 0], [0, 0]])


def test_vmap_over_models_and_learning_rates():
    w0 = np.array([[1.0, -2.0], [0.5, 0.25], [-1.0, 3.0]])
    grads_seq = [np.cos(w0 + t) for t in range(3)]
    tx = kopt.adam(0.1)
    params, state = jnp.asarray(w0, jnp.float32), jax.vmap(tx.init)(jnp.asarray(w0, jnp.float32))
    step = jax.jit(jax.vmap(tx.update))
    for g in grads_seq:
        updates, state = step(jnp.asarray(g, jnp.float32), state, params)
        params = kopt.apply_updates(params, updates)
    for i in range(3):
        expected = ref.adam(w0[i], [g[i] for g in grads_seq], lr=0.1)
        np.testing.assert_allclose(params[i], expected, rtol=1e-5)

    # A learning-rate sweep: one model, one state per learning rate.
    tx = kopt.sgd(0.0)

    def sweep(lr):
        state = kopt.set_hyperparam(tx.init(jnp.ones(2)), "learning_rate", lr)
        updates, _ = tx.update(jnp.array([1.0, -2.0]), state)
        return updates

    updates = jax.jit(jax.vmap(sweep))(jnp.array([0.1, 0.5, 1.0]))
    np.testing.assert_allclose(updates, [[-0.1, 0.2], [-0.5, 1.0], [-1.0, 2.0]], rtol=1e-6)


def test_wrapped_and_chained_states_never_retrace():
    chex.clear_trace_counter()
    inner = kopt.multi_transform(
        {"a": kopt.adam(0.1), "b": kopt.sgd(0.1, momentum=0.9)}, {"w": "a", "b": "b"}
    )
    tx = kopt.chain(
        kopt.clip_by_global_norm(1.0),
        kopt.apply_if_finite(kopt.accumulate_gradients(inner, 2), 2),
        kopt.ema(0.9, overwrite_frequency=3),
    )

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    params = small_params()
    state = tx.init(params)
    for i in range(6):
        state = kopt.set_hyperparam(state, "learning_rate", 0.05 * i)
        state = kopt.set_hyperparam(state, "global_clipnorm", 1.0 + i)
        params, state = step(params, state, ones_like_tree(params))
    assert float(kopt.get_hyperparam(state, "global_clipnorm")) == 6.0


def test_ftrl_with_a_zero_accumulator_and_a_zero_gradient_keeps_the_weight_at_zero():
    """Keras's FTRL kernel sets the weight to 0 where |linear| <= l1, without dividing: with
    ``initial_accumulator_value=0`` an element whose gradient is 0 has a zero quadratic term,
    and the division gave 0 / 0 = NaN."""
    params = jnp.array([1.0, 2.0])
    for l1 in (0.0, 0.1):
        tx = kopt.ftrl(0.1, initial_accumulator_value=0.0, l1_regularization_strength=l1)
        updates, state = tx.update(jnp.array([0.0, 0.5]), tx.init(params), params)
        new = kopt.apply_updates(params, updates)
        # Element 1 by hand: accumulator 0.25, linear 0.5 - (0.5 - 0) / 0.1 * 2 = -9.5,
        # quadratic 0.5 / 0.1 = 5, weight (clip(-9.5, -l1, l1) + 9.5) / 5.
        np.testing.assert_allclose(new, [0.0, (-l1 + 9.5) / 5.0], rtol=1e-6)
        assert np.all(np.isfinite(kopt.get_slot(state, "linear")))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_none_gradient_skips_its_param_and_keeps_its_slots(name):
    """A None gradient where the param is an array (no gradient for it this step, as a None
    gradient in Keras's apply_gradients) gives a None update and keeps that param's slots as
    they were, so the state's structure does not change. kopt's optimizers refused it, where
    optax's stateless pieces (and its momentum SGD) pass it through."""
    tx = OPTIMIZERS[name](0.1)
    params = small_params()
    state = tx.init(params)
    updates, new = jax.jit(tx.update)({"w": jnp.ones((3, 2)), "b": None}, state, params)
    assert updates["b"] is None and updates["w"].shape == (3, 2)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    for slot in kopt.slot_names(state):
        if isinstance(kopt.get_slot(state, slot), dict):  # not Nadam's scalar momentum cache
            np.testing.assert_array_equal(
                kopt.get_slot(new, slot)["b"], kopt.get_slot(state, slot)["b"]
            )


def test_adam_with_a_none_gradient_matches_keras_skipping_the_variable():
    """tf.keras skips a variable whose gradient is None; at its next gradient its first Adam
    step runs at the optimizer's step count (t = 2 here), from zero slots."""
    tx = kopt.adam(0.1)
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 3.0])}
    gw, gb = np.array([0.3, -1.0]), np.array([2.0, -0.5])
    state = tx.init(params)
    for grads in ({"w": gw, "b": None}, {"w": gw, "b": gb}):
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = kopt.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], ref.adam([1.0, -2.0], [gw, gw], lr=0.1), rtol=1e-6)
    m, v = 0.1 * gb, 0.001 * gb * gb  # Keras's Adam, t = 2, zero slots
    alpha = 0.1 * np.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    np.testing.assert_allclose(params["b"], [0.5, 3.0] - alpha * m / (np.sqrt(v) + 1e-7), rtol=1e-6)


# Shapes no other test uses: an eager operation compiled for one of them by an earlier test
# in the process would hide the compile counted here.
UNUSUAL_SHAPES = [(7, 13), (29,), (3, 5, 11), (31, 2), (2, 3, 17)]


EAGER_INITS = {
    "adam": lambda: kopt.adam(),
    "adagrad": lambda: kopt.adagrad(initial_accumulator_value=0.1),
    "adafactor": lambda: kopt.adafactor(),
    "ema": lambda: kopt.chain(kopt.sgd(0.1), kopt.ema(0.9)),
}


@pytest.mark.parametrize("name", list(EAGER_INITS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_an_eager_init_compiles_nothing_per_param_shape(name, dtype, backend_compiles):
    """``jnp.full``, ``jnp.zeros`` and ``jnp.copy`` compiled a program per shape: the first
    init over a few hundred small params of distinct shapes took seconds."""
    tx = EAGER_INITS[name]()
    tx.init({"warm": jnp.ones((2, 2), dtype)})  # what does not depend on the shapes
    rng = np.random.default_rng(0)
    params = {
        f"p{i}": jax.device_put(rng.normal(size=shape).astype(dtype))
        for i, shape in enumerate(UNUSUAL_SHAPES)
    }
    backend_compiles.clear()
    state = tx.init(params)
    assert backend_compiles == []
    for key, p in params.items():
        p = np.asarray(p)
        if name == "adam":
            for slot in ("m", "v"):
                np.testing.assert_array_equal(kopt.get_slot(state, slot)[key], np.zeros_like(p))
        elif name == "adagrad":
            got = kopt.get_slot(state, "accumulator")[key]
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, np.full(p.shape, 0.1, dtype))
        elif name == "adafactor":  # factored over the last two axes; a vector keeps scalars
            r_shape, c_shape = (
                (p.shape[:-1], p.shape[:-2] + p.shape[-1:]) if p.ndim > 1 else ((), ())
            )
            np.testing.assert_array_equal(kopt.get_slot(state, "r")[key], np.zeros(r_shape))
            np.testing.assert_array_equal(kopt.get_slot(state, "c")[key], np.zeros(c_shape))
        else:  # the average starts as a copy of the params, in their dtype
            got = kopt.get_slot(state, "average")[key]
            assert got.dtype == dtype and not got.weak_type
            np.testing.assert_array_equal(got, p)
