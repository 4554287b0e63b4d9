"""clip_by_value, clip_by_norm and clip_by_global_norm against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np

import kopt


def gradient_tree():
    rng = np.random.default_rng(0)
    return {
        "big": rng.normal(size=(4, 3)) * 5.0,
        "small": rng.normal(size=(3,)) * 0.01,
        "scalar": np.array(-7.0),
    }


def run(tx, tree):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    updates, _ = jax.jit(tx.update)(g, tx.init(g))
    return updates


def test_clip_by_value():
    tree = gradient_tree()
    updates = run(kopt.clip_by_value(1.5), tree)
    for key, g in tree.items():
        np.testing.assert_allclose(updates[key], np.clip(g, -1.5, 1.5), rtol=1e-6)


def test_clip_by_norm_is_per_tensor():
    tree = gradient_tree()
    updates = run(kopt.clip_by_norm(2.0), tree)
    for key, g in tree.items():
        norm = np.sqrt(np.sum(g * g))
        np.testing.assert_allclose(updates[key], g * 2.0 / max(norm, 2.0), rtol=1e-5)
    assert np.linalg.norm(updates["big"]) < 2.0 + 1e-5


def test_clip_by_norm_of_a_zero_gradient_is_zero():
    updates = run(kopt.clip_by_norm(1.0), {"z": np.zeros(3)})
    np.testing.assert_array_equal(updates["z"], [0.0, 0.0, 0.0])


def test_clip_by_global_norm():
    tree = gradient_tree()
    norm = np.sqrt(sum(np.sum(g * g) for g in tree.values()))
    assert norm > 3.0
    updates = run(kopt.clip_by_global_norm(3.0), tree)
    for key, g in tree.items():
        np.testing.assert_allclose(updates[key], g * 3.0 / norm, rtol=1e-5)
    np.testing.assert_allclose(kopt.global_norm(updates), 3.0, rtol=1e-5)
    np.testing.assert_allclose(kopt.global_norm(tree), norm, rtol=1e-5)


def test_clip_by_global_norm_below_the_threshold_and_at_zero():
    tree = {"a": np.array([0.3, 0.4])}
    np.testing.assert_allclose(run(kopt.clip_by_global_norm(1.0), tree)["a"], [0.3, 0.4], rtol=1e-6)
    zero = run(kopt.clip_by_global_norm(1.0), {"a": np.zeros(2)})
    np.testing.assert_array_equal(zero["a"], [0.0, 0.0])


def test_clip_by_global_norm_turns_a_non_finite_norm_into_nan():
    updates = run(kopt.clip_by_global_norm(1.0), {"a": np.array([np.inf, 1.0]), "b": np.ones(2)})
    assert bool(jnp.all(jnp.isnan(updates["a"]))) and bool(jnp.all(jnp.isnan(updates["b"])))


def test_clipping_sparse_gradients_clips_their_values():
    values = np.array([[3.0, 4.0], [0.0, 0.5]])
    rows = kopt.IndexedSlices(jnp.asarray(values, jnp.float32), jnp.array([0, 0]), (3, 2))
    table = jnp.zeros((3, 2))
    by_value, _ = kopt.clip_by_value(1.0).update(rows, kopt.clip_by_value(1.0).init(table))
    assert isinstance(by_value, kopt.IndexedSlices)
    np.testing.assert_allclose(by_value.values, np.clip(values, -1.0, 1.0))
    by_norm, _ = kopt.clip_by_norm(1.0).update(rows, kopt.clip_by_norm(1.0).init(table))
    np.testing.assert_allclose(by_norm.values, values / np.linalg.norm(values), rtol=1e-6)
    tx = kopt.clip_by_global_norm(1.0)
    by_global, _ = tx.update({"t": rows}, tx.init({"t": table}))
    np.testing.assert_allclose(by_global["t"].values, values / np.linalg.norm(values), rtol=1e-6)


def test_clipping_keeps_low_precision_dtypes():
    g = {"h": jnp.array([3.0, -4.0], jnp.bfloat16)}
    for tx in (kopt.clip_by_value(1.0), kopt.clip_by_norm(1.0), kopt.clip_by_global_norm(1.0)):
        updates, _ = tx.update(g, tx.init(g))
        assert updates["h"].dtype == jnp.bfloat16


def test_clip_by_norm_of_float16_takes_the_norm_in_float32():
    """In float16 the sum of squares of a gradient of norm 600 overflows (the gradient came out
    zeroed), and a clipnorm of 1e-5 (1 / clipnorm overflows) gave NaN; clip_by_global_norm
    already measured in float32. Checked against NumPy in float64, rounded to float16."""
    cases = [
        (np.full(4, 300.0), 1.0),  # norm 600: its square, 360000, is past float16's 65504
        (np.array([3e-5, 4e-5]), 1e-5),
        (np.array([0.25, -0.5]), 2.0),  # below the threshold: unchanged
    ]
    for values, clipnorm in cases:
        g = jnp.asarray(values, jnp.float16)
        g64 = np.asarray(g, np.float64)
        expected = (g64 * clipnorm / max(np.linalg.norm(g64), clipnorm)).astype(np.float16)
        tx = kopt.clip_by_norm(clipnorm)
        for update in (tx.update, jax.jit(tx.update)):
            got, _ = update(g, tx.init(g))
            assert got.dtype == jnp.float16
            np.testing.assert_array_equal(got, expected)
    # bfloat16 too, and the rows of a sparse gradient.
    values = jnp.full((2, 3), 300.0, jnp.bfloat16)
    sparse = kopt.IndexedSlices(values, jnp.array([0, 2]), dense_shape=(4, 3))
    got, _ = kopt.clip_by_norm(1.0).update(sparse, kopt.clip_by_norm(1.0).init(jnp.zeros((4, 3))))
    np.testing.assert_allclose(
        np.asarray(got.values, np.float32), np.full((2, 3), 6**-0.5), rtol=1e-2
    )


def test_facade_clipnorm_of_float16_variables_stays_finite():
    """The facade's clipnorm is clip_by_norm: SGD(0.1, clipnorm=1e-5) made float16 variables
    NaN (tf.keras leaves them finite)."""
    var = kopt.Variable(jnp.ones(2, jnp.float16))
    grad = jnp.array([3e-5, 4e-5], jnp.float16)
    kopt.optimizers.SGD(0.1, clipnorm=1e-5).apply_gradients([(grad, var)])
    g64 = np.asarray(grad, np.float64)
    clipped = (g64 * 1e-5 / np.linalg.norm(g64)).astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(var.numpy(), (1.0 - 0.1 * clipped).astype(np.float16))
    var = kopt.Variable(jnp.zeros(4, jnp.float16))
    kopt.optimizers.SGD(1.0, clipnorm=1.0).apply_gradients([(jnp.full(4, 300.0, jnp.float16), var)])
    np.testing.assert_array_equal(var.numpy(), np.full(4, -0.5, np.float16))
