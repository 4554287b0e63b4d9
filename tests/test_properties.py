"""Property-based tests (hypothesis): random pytrees, dtypes and hyperparameters.

The "ci" profile (tests/conftest.py) runs 200 examples for the cheap properties, 25 per
optimizer for those that compile programs (300 in all for jit/eager) and 10 per class for the
facade (each example builds and compiles a new optimizer), to stay within the suite's time
budget on 2 cores; HYPOTHESIS_PROFILE=long runs 2000 (500 for the facade). Jitted update
functions are cached per optimizer and hyperparameters are set in the state, so examples reuse
compiled programs.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_zoo import OPTIMIZERS

import kopt

_CI = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci"
COMPILING = settings(max_examples=25 if _CI else 2000)
BUILDS_OPTIMIZERS = settings(max_examples=10 if _CI else 500)

SHAPES = [(), (0,), (3,), (2, 3)]
DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
TOLERANCE = {jnp.float32: 1e-5, jnp.float16: 2e-2, jnp.bfloat16: 5e-2}


@functools.cache
def transformation(name):
    return OPTIMIZERS[name](0.1)


@functools.cache
def jitted_update(name):
    return jax.jit(transformation(name).update)


@st.composite
def param_trees(draw):
    """A dict of 1-3 leaves (one maybe nested in a list, one maybe None), shared dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 3))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    tree = {f"p{i}": jnp.asarray(rng.normal(size=s), dtype) for i, s in enumerate(shapes)}
    if draw(st.booleans()):
        tree = {"nested": [tree.pop("p0")], **tree}
    if draw(st.booleans()):
        tree["frozen"] = None
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), tree)
    return dtype, tree, grads


def run(name, params, grads, learning_rate, steps, jit):
    tx = transformation(name)
    update = jitted_update(name) if jit else tx.update
    state = kopt.set_hyperparam(tx.init(params), "learning_rate", learning_rate)
    for _ in range(steps):
        updates, state = update(grads, state, params)
        params = kopt.apply_updates(params, updates)
    return params, state


def assert_trees_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        finite = y[np.isfinite(y)]  # infinities must match exactly; they set no scale
        scale = float(np.max(np.abs(finite))) if finite.size else 0.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * max(scale, 1.0))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@COMPILING
@given(data=param_trees(), lr=st.floats(1e-4, 1.0), steps=st.integers(1, 3))
def test_jit_and_eager_agree(name, data, lr, steps):
    dtype, params, grads = data
    jitted = run(name, params, grads, lr, steps, jit=True)
    eager = run(name, params, grads, lr, steps, jit=False)
    assert_trees_close(jitted[0], eager[0], TOLERANCE[dtype])
    assert jax.tree.structure(jitted[1]) == jax.tree.structure(eager[1])
    for p, q in zip(jax.tree.leaves(jitted[0]), jax.tree.leaves(params), strict=True):
        assert p.dtype == q.dtype and p.shape == q.shape


FACADE = {
    "SGD": dict(momentum=st.floats(0.0, 0.99), nesterov=st.booleans()),
    "Adam": dict(beta_1=st.floats(0.0, 0.99), beta_2=st.floats(0.5, 0.999), amsgrad=st.booleans()),
    "Adagrad": dict(initial_accumulator_value=st.floats(0.0, 1.0)),
    "RMSprop": dict(rho=st.floats(0.1, 0.99), momentum=st.floats(0.0, 0.9), centered=st.booleans()),
    "Ftrl": dict(
        l1_regularization_strength=st.floats(0.0, 0.1),
        l2_regularization_strength=st.floats(0.0, 0.1),
    ),
}


@pytest.mark.parametrize("class_name", sorted(FACADE))
@BUILDS_OPTIMIZERS
@given(data=st.data(), lr=st.floats(1e-3, 0.5), seed=st.integers(0, 2**16))
def test_facade_agrees_with_its_transformation(class_name, data, lr, seed):
    kwargs = {k: data.draw(s, label=k) for k, s in FACADE[class_name].items()}
    rng = np.random.default_rng(seed)
    shapes = [(3,), (2, 2)]
    initial = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes] for _ in range(2)]

    opt = getattr(kopt.optimizers, class_name)(learning_rate=lr, **kwargs)
    variables = [kopt.Variable(x) for x in initial]
    for g in grads:
        opt.apply_gradients(zip(g, variables, strict=True))

    tx = opt.as_transformation()
    params = [jnp.asarray(x) for x in initial]
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = kopt.apply_updates(params, updates)
    for v, p in zip(variables, params, strict=True):
        np.testing.assert_allclose(v.numpy(), np.asarray(p), rtol=1e-5, atol=1e-6)


ROW_SPARSE = ["sgd", "adagrad", "adadelta", "adamax", "rmsprop", "ftrl"]


@pytest.mark.parametrize("name", ROW_SPARSE)
@COMPILING
@given(indices=st.lists(st.integers(0, 5), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_sparse_rows_agree_with_dense(name, indices, seed):
    rng = np.random.default_rng(seed)
    params = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(len(indices), 3)), jnp.float32)
    idx = jnp.asarray(indices, jnp.int32)
    sparse = kopt.IndexedSlices(values, idx, (6, 3))
    tx = transformation(name)
    sparse_params, sparse_state = run(name, params, sparse, 0.1, 1, jit=True)
    dense_params, dense_state = run(name, params, sparse.to_dense(), 0.1, 1, jit=False)
    rows = np.unique(indices)
    untouched = np.setdiff1d(np.arange(6), rows)
    np.testing.assert_allclose(
        np.asarray(sparse_params)[rows], np.asarray(dense_params)[rows], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(
        np.asarray(sparse_params)[untouched], np.asarray(params)[untouched]
    )
    del tx, sparse_state, dense_state


CONFIGS = {
    "SGD": dict(
        learning_rate=st.floats(0.0, 1.0), momentum=st.floats(0.0, 1.0), nesterov=st.booleans()
    ),
    "Adam": dict(
        learning_rate=st.floats(0.0, 1.0),
        beta_1=st.floats(0.0, 1.0),
        epsilon=st.floats(1e-9, 1.0),
        amsgrad=st.booleans(),
    ),
    "Nadam": dict(learning_rate=st.floats(0.0, 1.0), beta_2=st.floats(0.0, 1.0)),
    "Ftrl": dict(
        learning_rate=st.floats(0.0, 1.0),
        l1_regularization_strength=st.floats(0.0, 5.0),
        beta=st.floats(0.0, 1.0),
    ),
}


@pytest.mark.parametrize("class_name", sorted(CONFIGS))
@given(data=st.data(), clip=st.one_of(st.none(), st.floats(0.0, 10.0)))
def test_config_round_trip(class_name, data, clip):
    kwargs = {k: data.draw(s, label=k) for k, s in CONFIGS[class_name].items()}
    cls = getattr(kopt.optimizers, class_name)
    opt = cls(clipnorm=clip, **kwargs)
    config = opt.get_config()
    again = cls.from_config(config)
    assert again.get_config() == config
    assert kopt.optimizers.deserialize(kopt.optimizers.serialize(opt)).get_config() == config


BAD_VALUES = st.one_of(
    st.text(max_size=3),
    st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
    st.just(float("nan")),
    st.none(),
    st.lists(st.floats(0, 1), min_size=2, max_size=2),
)


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "adagrad", "lion"])
@given(value=BAD_VALUES)
def test_invalid_learning_rate_is_rejected(name, value):
    factory = getattr(kopt, name)
    with pytest.raises((TypeError, ValueError), match="learning_rate"):
        factory(learning_rate=value)
