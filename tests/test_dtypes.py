"""Param dtypes survive every optimizer; slot dtypes follow the params or ``slot_dtype``."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import numpy_reference as ref
import pytest
from optimizer_zoo import OPTIMIZERS, WITH_SLOT_DTYPE

import kopt


def params_in(dtype):
    return {
        "w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(4, 3).astype(dtype),
        "b": jnp.full((3,), 0.5, dtype),
    }


def grads_for(params, step):
    return jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size) + step).reshape(p.shape), params)


def param_shaped_slots(state, params):
    out = {}
    for slot in kopt.slot_names(state):
        tree = kopt.get_slot(state, slot)
        if jax.tree.structure(tree) == jax.tree.structure(params) and jax.tree.all(
            jax.tree.map(lambda a, p: a.shape == p.shape, tree, params)
        ):
            out[slot] = tree
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_low_precision_params_keep_their_dtype(name):
    tx = OPTIMIZERS[name](0.01)
    dtypes = {"bf16": jnp.bfloat16, "f16": jnp.float16}
    params = {key: params_in(dtype) for key, dtype in dtypes.items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        grads = jax.tree.map(lambda p, g: g.astype(p.dtype), params, grads_for(params, i))
        updates, state = tx.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    for i in range(3):
        params, state = step(params, state, i)
    for key, dtype in dtypes.items():
        for leaf_name, p in params[key].items():
            assert p.dtype == dtype, (key, leaf_name)
            if (name, key) == ("nadam", "bf16"):  # NaN, as tf.keras: see the test below
                continue
            assert bool(jnp.all(jnp.isfinite(p.astype(jnp.float32)))), (key, leaf_name)
    for slot, tree in param_shaped_slots(state, params).items():
        for key, dtype in dtypes.items():
            for leaf_name, leaf in tree[key].items():
                assert leaf.dtype == dtype, (
                    f"{name}: slot {slot}[{key}][{leaf_name}] is {leaf.dtype}"
                )


def test_bfloat16_moments_and_their_bias_corrections_use_the_same_rounded_betas():
    """bfloat16 rounds the default ``beta_2=0.999`` to 1, so ``v`` stays 0. tf.keras computes
    the bias corrections with that rounded beta too: Adam's ``sqrt(1 - beta_2**t)`` is 0 and
    the variable does not move; Nadam's ``v / (1 - beta_2**t)`` is 0/0, NaN (tf.keras legacy
    gives [1, -2] and [nan, nan] for these). A float32 correction divided a first moment by a
    zero ``v``: steps of about 1e5 learning rates. Float32 slots avoid the rounding."""
    assert float(jnp.asarray(0.999, jnp.bfloat16)) == 1.0
    w = jnp.array([1.0, -2.0], jnp.bfloat16)
    g = jnp.array([0.5, 0.25], jnp.bfloat16)
    for make, expected in ((kopt.adam, [1.0, -2.0]), (kopt.nadam, [np.nan, np.nan])):
        tx = make(0.001)
        updates, _ = jax.jit(tx.update)(g, tx.init(w), w)
        np.testing.assert_array_equal(kopt.apply_updates(w, updates).astype(np.float32), expected)
        tx = make(0.001, slot_dtype=jnp.float32)  # a step of about the learning rate
        updates, _ = jax.jit(tx.update)(g, tx.init(w), w)
        step = np.abs(np.asarray(updates, np.float32))
        assert np.all((step > 5e-4) & (step < 2e-2)), (make.__name__, step)


@pytest.mark.parametrize("name", WITH_SLOT_DTYPE)
def test_float32_slots_for_bfloat16_params(name):
    tx = OPTIMIZERS[name](0.01, slot_dtype=jnp.float32)
    params = params_in(jnp.bfloat16)
    state = tx.init(params)
    slots = param_shaped_slots(state, params)
    assert slots or name in ("sgd",), name
    for slot, tree in slots.items():
        assert all(leaf.dtype == jnp.float32 for leaf in tree.values()), slot
    step = jax.jit(tx.update)
    for i in range(2):
        updates, state = step(grads_for(params, i), state, params)
        params = kopt.apply_updates(params, updates)
    assert all(p.dtype == jnp.bfloat16 for p in params.values())
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in params.values())
    for slot, tree in param_shaped_slots(state, params).items():
        assert all(leaf.dtype == jnp.float32 for leaf in tree.values()), slot


def test_adam_with_float32_slots_on_bfloat16_params_matches_numpy():
    tx = kopt.adam(0.1, slot_dtype=jnp.float32)
    params = jnp.array([1.0, -0.5, 0.25, 2.0], jnp.bfloat16)
    grads_seq = [np.array([0.5, -1.0, 2.0, 0.1]), np.array([-0.3, 0.2, 1.0, 0.4])] * 2
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads_seq:
        updates, state = update(jnp.asarray(g, jnp.bfloat16), state, params)
        params = kopt.apply_updates(params, updates)
    assert params.dtype == jnp.bfloat16
    rounded = [np.asarray(g).astype(ml_dtypes.bfloat16).astype(np.float64) for g in grads_seq]
    expected = ref.adam(
        [1.0, -0.5, 0.25, 2.0], rounded, lr=0.1, round_to=ml_dtypes.bfloat16
    )  # params rounded to bfloat16 after every step
    np.testing.assert_allclose(params.astype(jnp.float32), expected, rtol=2**-8, atol=2**-9)


def test_mixed_dtype_tree_gets_matching_slots():
    params = {"h": jnp.ones(2, jnp.bfloat16), "f": jnp.ones(2, jnp.float32)}
    state = kopt.adam().init(params)
    assert kopt.get_slot(state, "m")["h"].dtype == jnp.bfloat16
    assert kopt.get_slot(state, "m")["f"].dtype == jnp.float32
    updates, _ = jax.jit(kopt.adam().update)(jax.tree.map(jnp.ones_like, params), state, params)
    new = kopt.apply_updates(params, updates)
    assert new["h"].dtype == jnp.bfloat16 and new["f"].dtype == jnp.float32


@pytest.mark.parametrize("name", ["sgd", "adagrad", "ftrl", "nadam"])
def test_sparse_rows_keep_bfloat16(name):
    tx = OPTIMIZERS[name](0.1)
    table = jnp.ones((6, 3), jnp.bfloat16)
    grad = kopt.IndexedSlices(jnp.ones((2, 3), jnp.bfloat16), jnp.array([0, 2]), (6, 3))
    updates, state = jax.jit(tx.update)(grad, tx.init(table), table)
    new = kopt.apply_updates(table, updates)
    assert new.dtype == jnp.bfloat16
    assert bool(jnp.all(new[1] == 1)) and not bool(jnp.all(new[0] == 1))


def test_float64_params_with_x64_enabled():
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np, kopt
        # Hyperparameters exactly representable in float32, where kopt stores them.
        lr, b1, b2, eps = 0.125, 0.875, 0.9375, 2.0**-20
        tx = kopt.adam(lr, beta_1=b1, beta_2=b2, epsilon=eps)
        w = jnp.array([1.0, -2.0, 0.3], jnp.float64)
        state = tx.init(w)
        gs = [np.array([0.1, -0.2, 0.7]), np.array([1e-3, 0.5, -0.25]), np.array([2.0, 0.0, 1e-9])]
        for g in gs:
            u, state = jax.jit(tx.update)(jnp.asarray(g), state, w)
            w = kopt.apply_updates(w, u)
        assert w.dtype == jnp.float64, w.dtype
        assert kopt.get_slot(state, "v").dtype == jnp.float64
        x, m, v = np.array([1.0, -2.0, 0.3]), np.zeros(3), np.zeros(3)
        for t, g in enumerate(gs, start=1):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            x = x - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
        # The step's scalar coefficients (bias corrections) are computed in float32.
        np.testing.assert_allclose(np.asarray(w), x, rtol=1e-7)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_lamb_on_bfloat16_params_keeps_a_second_moment():
    """bfloat16 rounds 0.999 to 1, and Lamb took `1 - beta_2` from the rounded value: `v` stayed
    0 while the float32 bias correction was not, so every step was m / epsilon, normalised (not
    Lamb's). `1 - beta` is taken before rounding, as Keras 3 does: `v` follows the float32 one."""
    rng = np.random.default_rng(0)
    p32 = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    grads = [jnp.asarray(rng.normal(size=(8, 6)) * 0.1, jnp.float32) for _ in range(5)]
    tx = kopt.lamb(0.01)
    p16, s16, s32 = p32.astype(jnp.bfloat16), tx.init(p32.astype(jnp.bfloat16)), tx.init(p32)
    for g in grads:
        u16, s16 = tx.update(g.astype(jnp.bfloat16), s16, p16)
        _, s32 = tx.update(g, s32, p32)
    v16 = np.asarray(kopt.get_slot(s16, "v"), np.float64)
    v32 = np.asarray(kopt.get_slot(s32, "v"), np.float64)
    np.testing.assert_allclose(v16, v32, rtol=3e-2, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(u16, np.float32)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_lamb_on_float16_params_takes_its_trust_ratio_in_float32(jit):
    # A gradient of 4e-3 leaves v at 0 in float16, so r is about 4e3 there: r**2 overflows
    # float16, and a float16 trust ratio would be 0 (no update at all). Epsilon 1e-7 is
    # subnormal in float16, which XLA may flush to zero (r infinite, the update NaN).
    p = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).astype(jnp.float16)
    g = jnp.cos(jnp.arange(12.0)).astype(jnp.float16)
    tx = kopt.lamb(0.01)
    update = jax.jit(tx.update) if jit else tx.update
    u, state = update(g, tx.init(p), p)
    assert u.dtype == jnp.float16
    # NumPy, in float64 from the float16 slots the step stored.
    m = np.asarray(kopt.get_slot(state, "m"), np.float64)
    v = np.asarray(kopt.get_slot(state, "v"), np.float64)
    assert v[-1] == 0.0
    r = (m / (1 - 0.9)) / (np.sqrt(v / (1 - 0.999)) + 1e-7)
    expected = -0.01 * np.linalg.norm(np.asarray(p, np.float64)) / np.linalg.norm(r) * r
    np.testing.assert_allclose(np.asarray(u, np.float64), expected, rtol=2e-3, atol=1e-7)
    assert abs(float(u[-1])) > 1e-2


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_adafactor_on_float16_params_takes_its_rms_in_float32(jit):
    # RMS(w) = 300: w**2 = 9e4 overflows float16, which would make the step infinite.
    p = jnp.full((4,), 300.0, jnp.float16)
    tx = kopt.adafactor(learning_rate=0.001)
    update = jax.jit(tx.update) if jit else tx.update
    u, _ = update(jnp.ones(4, jnp.float16), tx.init(p), p)
    assert u.dtype == jnp.float16
    # Step 1: v = g**2, so u_t = 1 and RMS(u_t) = 1; u = -RMS(w) * min(lr, 1) * u_t.
    np.testing.assert_allclose(np.asarray(u, np.float32), -0.3, rtol=1e-3)


def test_nadam_momentum_cache_stays_float32_for_float16_variables():
    """tf_keras 2.21's legacy Nadam makes ``momentum_cache`` in the variable's dtype and
    computes its schedule there; kopt keeps it, like the other step coefficients, in float32
    (docs/deviations.md). These are tf_keras's weights after five float16 steps: ``m`` and
    ``v`` agree bit for bit, the variable to one float16 spacing, and the cache is the one
    tf_keras's float32 run gives (its float16 cache is 0.0184783935546875)."""
    var = kopt.Variable(jnp.asarray([1.0, -0.5, 0.25], jnp.float16))
    opt = kopt.optimizers.Nadam(learning_rate=0.01)
    for g in ([0.5, -1.0, 2.0], [-0.3, 0.2, 1.0], [0.05, 0.4, -0.7], [1.5, -0.01, 0.3], [0.2] * 3):
        opt.apply_gradients([(jnp.asarray(g, jnp.float16), var)])
    iterations, cache, m, v = opt.get_weights()
    assert cache.dtype == np.float32 and m.dtype == v.dtype == np.float16
    assert float(cache) == 0.01849803514778614
    np.testing.assert_array_equal(
        m, np.float16([0.1700439453125, 0.0004730224609375, 0.194580078125])
    )
    np.testing.assert_array_equal(
        v, np.float16([0.002567291259765625, 0.0012073516845703125, 0.005474090576171875])
    )
    tf_keras_var = np.float16([0.97900390625, -0.49658203125, 0.2325439453125])
    np.testing.assert_array_max_ulp(var.numpy(), tf_keras_var, maxulp=1)
    # tf_keras's float16 cache loads (into float32) with set_weights.
    opt.set_weights([iterations, np.float16(0.0184783935546875), m, v])
    assert opt.weights[1].dtype == jnp.float32
    assert float(opt.weights[1].numpy()) == 0.0184783935546875
