"""Complex params: each optimizer with a complex form against a complex128 NumPy re-derivation
(second moments of ``|g|**2``) and against optax where its maths match; complex norms and
clipping; convergence; the rules with no complex form refuse complex params."""

import subprocess
import sys
import textwrap
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest
from optimizer_zoo import OPTIMIZERS

import kopt


def abs_sq(x):
    return (x * np.conj(x)).real


def complex_sign(x):
    return np.where(x == 0, 0.0, x / np.where(x == 0, 1.0, np.abs(x)))


def complex_normal(rng, shape):
    return rng.normal(size=shape) + 1j * rng.normal(size=shape)


def params_and_grads(steps=5, with_zeros=True):
    """A kernel (rank 2, so Adafactor factors it) and a bias; gradients of mixed scales, with a
    purely imaginary entry (``g * g < 0`` there) and, unless ``with_zeros`` is off, a zero."""
    rng = np.random.default_rng(3)
    params = {"kernel": complex_normal(rng, (3, 4)), "bias": complex_normal(rng, (4,))}
    grads = []
    for scale in (1.0, 0.02, 3.0, 0.5, 1.5)[:steps]:
        g = {k: complex_normal(rng, v.shape) * scale for k, v in params.items()}
        g["bias"][1] = 2j * scale
        if with_zeros:
            g["kernel"][0, 0] = 0.0
        grads.append(g)
    return params, grads


# NumPy re-derivations of each rule for one complex128 leaf: final params after all gradients.


def numpy_sgd(w, grads, lr, momentum=0.0, nesterov=False):
    a = np.zeros_like(w)
    for g in grads:
        if momentum == 0.0:
            w = w - lr * g
            continue
        a = momentum * a - lr * g
        w = w + (momentum * a - lr * g if nesterov else a)
    return w


def numpy_adam(w, grads, lr, b1=0.9, b2=0.999, eps=1e-7, amsgrad=False, weight_decay=0.0):
    m, v, vhat = np.zeros_like(w), np.zeros(w.shape), np.zeros(w.shape)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * abs_sq(g)
        vhat = np.maximum(vhat, v)
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        w = w - alpha * m / (np.sqrt(vhat if amsgrad else v) + eps) - lr * weight_decay * w
    return w


def numpy_adagrad(w, grads, lr, initial=0.1, eps=1e-7):
    acc = np.full(w.shape, initial)
    for g in grads:
        acc = acc + abs_sq(g)
        w = w - lr * g / (np.sqrt(acc) + eps)
    return w


def numpy_adadelta(w, grads, lr, rho=0.95, eps=1e-7):
    ag, av = np.zeros(w.shape), np.zeros(w.shape)
    for g in grads:
        ag = rho * ag + (1 - rho) * abs_sq(g)
        u = np.sqrt(av + eps) / np.sqrt(ag + eps) * g
        av = rho * av + (1 - rho) * abs_sq(u)
        w = w - lr * u
    return w


def numpy_adamax(w, grads, lr, b1=0.9, b2=0.999, eps=1e-7):
    m, v = np.zeros_like(w), np.zeros(w.shape)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = np.maximum(b2 * v, np.abs(g))
        w = w - lr * m / (v + eps) / (1 - b1**t)
    return w


def numpy_nadam(w, grads, lr, b1=0.9, b2=0.999, eps=1e-7, psi=0.004):
    m, v, cache = np.zeros_like(w), np.zeros(w.shape), 1.0
    for t, g in enumerate(grads, start=1):
        mu_t = b1 * (1 - 0.5 * 0.96 ** (psi * t))
        mu_next = b1 * (1 - 0.5 * 0.96 ** (psi * (t + 1)))
        cache = cache * mu_t
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * abs_sq(g)
        m_bar = (1 - mu_t) * g / (1 - cache) + mu_next * m / (1 - cache * mu_next)
        w = w - lr * m_bar / (np.sqrt(v / (1 - b2**t)) + eps)
    return w


def numpy_rmsprop(w, grads, lr, rho=0.9, momentum=0.0, eps=1e-7, centered=False):
    s, mg, a = np.zeros(w.shape), np.zeros_like(w), np.zeros_like(w)
    for g in grads:
        s = rho * s + (1 - rho) * abs_sq(g)
        mg = rho * mg + (1 - rho) * g
        denom = s - abs_sq(mg) if centered else s
        if momentum:
            a = momentum * a + lr * g / np.sqrt(denom + eps)
            w = w - a
        else:
            w = w - lr * g / (np.sqrt(denom) + eps)
    return w


def numpy_lion(w, grads, lr, b1=0.9, b2=0.99):
    m = np.zeros_like(w)
    for g in grads:
        w = w - lr * complex_sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    return w


def numpy_lamb(w, grads, lr, b1=0.9, b2=0.999, eps=1e-7):
    m, v = np.zeros_like(w), np.zeros(w.shape)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * abs_sq(g)
        r = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        w_norm, r_norm = np.linalg.norm(w), np.linalg.norm(r)
        w = w - lr * (w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0) * r
    return w


def numpy_adafactor(w, grads, lr, decay=-0.8, eps_1=1e-30, eps_2=1e-3, threshold=1.0):
    def rms(x):
        return np.sqrt(np.mean(abs_sq(x)))

    r, c, v = np.zeros(w.shape[:-1]), np.zeros(w.shape[:-2] + w.shape[-1:]), np.zeros(w.shape)
    for t, g in enumerate(grads, start=1):
        rho = min(lr, 1 / np.sqrt(t))
        b = 1 - t**decay
        alpha = max(eps_2, rms(w)) * rho
        g2 = abs_sq(g) + eps_1
        if w.ndim >= 2:
            r = b * r + (1 - b) * g2.mean(axis=-1)
            c = b * c + (1 - b) * g2.mean(axis=-2)
            v = (r / r.mean(axis=-1, keepdims=True))[..., None] * c[..., None, :]
        else:
            v = b * v + (1 - b) * g2
        u = g / np.sqrt(v)
        w = w - alpha * u / max(1.0, rms(u) / threshold)
    return w


# (kopt optimizer, NumPy reference of one leaf), one per rule and variant with a complex form.
CASES = {
    "sgd": (kopt.sgd(0.1), lambda w, gs: numpy_sgd(w, gs, 0.1)),
    "sgd_momentum": (
        kopt.sgd(0.1, momentum=0.9),
        lambda w, gs: numpy_sgd(w, gs, 0.1, 0.9),
    ),
    "sgd_nesterov": (
        kopt.sgd(0.1, momentum=0.9, nesterov=True),
        lambda w, gs: numpy_sgd(w, gs, 0.1, 0.9, nesterov=True),
    ),
    "adam": (kopt.adam(0.1), lambda w, gs: numpy_adam(w, gs, 0.1)),
    "amsgrad": (kopt.adam(0.1, amsgrad=True), lambda w, gs: numpy_adam(w, gs, 0.1, amsgrad=True)),
    "adamw": (
        kopt.adamw(0.1, weight_decay=0.05),
        lambda w, gs: numpy_adam(w, gs, 0.1, weight_decay=0.05),
    ),
    "adagrad": (kopt.adagrad(0.1), lambda w, gs: numpy_adagrad(w, gs, 0.1)),
    "adadelta": (kopt.adadelta(1.0), lambda w, gs: numpy_adadelta(w, gs, 1.0)),
    "adamax": (kopt.adamax(0.1), lambda w, gs: numpy_adamax(w, gs, 0.1)),
    "nadam": (kopt.nadam(0.1), lambda w, gs: numpy_nadam(w, gs, 0.1)),
    "rmsprop": (kopt.rmsprop(0.1), lambda w, gs: numpy_rmsprop(w, gs, 0.1)),
    "rmsprop_centered": (
        kopt.rmsprop(0.1, centered=True),
        lambda w, gs: numpy_rmsprop(w, gs, 0.1, centered=True),
    ),
    "rmsprop_momentum": (
        kopt.rmsprop(0.1, momentum=0.5),
        lambda w, gs: numpy_rmsprop(w, gs, 0.1, momentum=0.5),
    ),
    "rmsprop_momentum_centered": (
        kopt.rmsprop(0.1, momentum=0.5, centered=True),
        lambda w, gs: numpy_rmsprop(w, gs, 0.1, momentum=0.5, centered=True),
    ),
    "lion": (kopt.lion(0.1), lambda w, gs: numpy_lion(w, gs, 0.1)),
    "lamb": (kopt.lamb(0.1), lambda w, gs: numpy_lamb(w, gs, 0.1)),
    "adafactor": (kopt.adafactor(0.1), lambda w, gs: numpy_adafactor(w, gs, 0.1)),
}

# Slots that hold |g|**2 statistics (or |g|): real values, whatever the param's dtype.
SQUARED_SLOTS = {"v", "vhat", "accumulator", "accum_grad", "accum_var", "rms", "r", "c"}


def run_steps(tx, params, grads, sparse_kernel=False):
    """Runs ``tx`` (jitted) from complex64 ``params`` over ``grads``; returns params, state.

    With ``sparse_kernel`` the kernel's gradient is an IndexedSlices that names every row, one
    of them twice (its two values sum to the dense row), so it must match the dense reference.
    """
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.complex64), params)
    state = tx.init(p)
    step = jax.jit(tx.update)
    for g in grads:
        g = jax.tree.map(lambda x: jnp.asarray(x, jnp.complex64), g)
        if sparse_kernel:
            k = g["kernel"]
            values = jnp.concatenate([k[2:], 0.25 * k[:1], k[1:2], 0.75 * k[:1]])
            g = {**g, "kernel": kopt.IndexedSlices(values, jnp.array([2, 0, 1, 0]), k.shape)}
        u, state = step(g, state, p)
        p = kopt.apply_updates(p, u)
    return p, state


def reference(numpy_rule, params, grads):
    return {k: numpy_rule(w, [g[k] for g in grads]) for k, w in params.items()}


def assert_close_to_reference(actual, expected):
    for key, want in expected.items():
        got = np.asarray(actual[key])
        assert got.dtype == np.complex64, (key, got.dtype)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=key)


@pytest.mark.parametrize("name", sorted(CASES))
def test_complex_params_follow_the_numpy_rule(name):
    tx, numpy_rule = CASES[name]
    params, grads = params_and_grads()
    actual, _ = run_steps(tx, params, grads)
    assert_close_to_reference(actual, reference(numpy_rule, params, grads))


@pytest.mark.parametrize("name", sorted(CASES))
def test_complex_sparse_gradients_follow_the_numpy_rule(name):
    tx, numpy_rule = CASES[name]
    params, grads = params_and_grads()
    actual, _ = run_steps(tx, params, grads, sparse_kernel=True)
    assert_close_to_reference(actual, reference(numpy_rule, params, grads))


@pytest.mark.parametrize("name", sorted(CASES))
def test_squared_statistics_of_complex_params_are_real_and_finite(name):
    tx, _ = CASES[name]
    params, grads = params_and_grads()
    p, state = run_steps(tx, params, grads)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
    for slot in kopt.slot_names(state):
        for leaf in jax.tree.leaves(kopt.get_slot(state, slot)):
            assert bool(jnp.all(jnp.isfinite(leaf))), slot
            if slot in SQUARED_SLOTS:
                np.testing.assert_array_equal(np.imag(leaf), 0.0, err_msg=slot)
                assert bool(jnp.all(jnp.real(leaf) >= 0)), slot


# optax's rules where they are Keras's: epsilon 0 takes away the one difference (its placement).
OPTAX_CASES = {
    "sgd": (kopt.sgd(0.1), optax.sgd(0.1)),
    "sgd_momentum": (kopt.sgd(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
    "sgd_nesterov": (
        kopt.sgd(0.1, momentum=0.9, nesterov=True),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    ),
    "adam": (kopt.adam(0.1, epsilon=0.0), optax.adam(0.1, eps=0.0)),
    "adamw": (
        kopt.adamw(0.1, weight_decay=0.05, epsilon=0.0),
        optax.adamw(0.1, eps=0.0, weight_decay=0.05),
    ),
    "adagrad": (
        kopt.adagrad(0.1, epsilon=0.0),
        optax.adagrad(0.1, initial_accumulator_value=0.1, eps=0.0),
    ),
    "adamax": (kopt.adamax(0.1, epsilon=0.0), optax.adamax(0.1, eps=0.0)),
    "rmsprop": (kopt.rmsprop(0.1, epsilon=0.0), optax.rmsprop(0.1, decay=0.9, eps=0.0)),
    "rmsprop_centered": (
        kopt.rmsprop(0.1, epsilon=0.0, centered=True),
        optax.rmsprop(0.1, decay=0.9, eps=0.0, centered=True),
    ),
    "rmsprop_momentum": (
        kopt.rmsprop(0.1, momentum=0.5, epsilon=0.0),
        optax.rmsprop(0.1, decay=0.9, eps=0.0, momentum=0.5),
    ),
    "lion": (kopt.lion(0.1), optax.lion(0.1, weight_decay=0.0)),
}


@pytest.mark.parametrize("name", sorted(OPTAX_CASES))
def test_complex_params_match_optax(name):
    tx, optax_tx = OPTAX_CASES[name]
    params, grads = params_and_grads(with_zeros=False)  # epsilon 0: no zero gradients
    actual, _ = run_steps(tx, params, grads)
    expected, _ = run_steps(optax_tx, params, grads)
    chex.assert_trees_all_close(actual, expected, rtol=2e-5, atol=2e-5)


def test_global_norm_of_a_complex_tree():
    rng = np.random.default_rng(0)
    dense = complex_normal(rng, (3, 2))
    rows = complex_normal(rng, (2, 2))
    tree = {
        "a": jnp.asarray([1j, 1 + 1j], jnp.complex64),
        "b": jnp.asarray(dense, jnp.complex64),
        "c": kopt.IndexedSlices(jnp.asarray(rows, jnp.complex64), jnp.array([0, 3]), (5, 2)),
    }
    norm = kopt.global_norm(tree)
    assert norm.dtype == jnp.float32
    expected = np.sqrt(3 + np.sum(abs_sq(dense)) + np.sum(abs_sq(rows)))
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)
    np.testing.assert_allclose(float(kopt.global_norm(tree["a"])), np.sqrt(3.0), rtol=1e-6)
    np.testing.assert_allclose(float(optax.tree.norm(tree["a"])), np.sqrt(3.0), rtol=1e-6)


def test_clip_by_global_norm_scales_complex_gradients():
    g = {"a": jnp.asarray([1j, 1 + 1j], jnp.complex64), "b": jnp.asarray([-2.0], jnp.complex64)}
    norm = np.sqrt(3.0 + 4.0)
    tx = kopt.clip_by_global_norm(1.0)
    u, _ = tx.update(g, tx.init(g))
    for key in g:
        np.testing.assert_allclose(np.asarray(u[key]), np.asarray(g[key]) / norm, rtol=1e-6)
    optax_tx = optax.clip_by_global_norm(1.0)
    chex.assert_trees_all_close(u, optax_tx.update(g, optax_tx.init(g))[0], rtol=1e-6)


def test_clip_by_norm_measures_complex_gradients_by_their_modulus():
    g = {
        "big": jnp.asarray([3j, 4.0 + 0j], jnp.complex64),  # norm 5
        "small": jnp.asarray([0.3j, -0.4j], jnp.complex64),  # norm 0.5, g * g sums to -0.25
        "rows": kopt.IndexedSlices(jnp.asarray([[6j, 8.0]], jnp.complex64), jnp.array([1]), (3, 2)),
    }
    tx = kopt.clip_by_norm(2.0)
    params = {"big": g["big"], "small": g["small"], "rows": jnp.zeros((3, 2), jnp.complex64)}
    u, _ = tx.update(g, tx.init(params))
    np.testing.assert_allclose(np.asarray(u["big"]), [1.2j, 1.6], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["small"]), [0.3j, -0.4j], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["rows"].values), [[1.2j, 1.6]], rtol=1e-6)


def test_adam_minimises_a_complex_least_squares_loss():
    target = jnp.array([3.0 - 2.0j, 1.0 + 4.0j, -0.5j], jnp.complex64)
    w = jnp.array([1.0 + 1.0j, -2.0 + 0.5j, 0.3 - 0.7j], jnp.complex64)

    def loss(w):
        return jnp.sum(jnp.abs(w - target) ** 2)

    tx = kopt.adam(kopt.schedules.exponential_decay(0.1, 100, 0.5))

    @jax.jit
    def step(w, state):
        # JAX's gradient of a real loss in complex w is the conjugate of the ascent direction.
        u, state = tx.update(jnp.conj(jax.grad(loss)(w)), state, w)
        return kopt.apply_updates(w, u), state

    state = tx.init(w)
    for _ in range(500):
        w, state = step(w, state)
    assert float(loss(w)) < 1e-5, float(loss(w))


def test_complex128_keeps_double_precision():
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np, kopt
        g = np.array([1e-9 + 2j, 3.0 - 1e-12j])
        norm = kopt.global_norm(jnp.asarray(g))
        assert norm.dtype == jnp.float64, norm.dtype
        np.testing.assert_allclose(float(norm), np.linalg.norm(g), rtol=1e-15)
        w = jnp.array([1.0 + 1.0j, -2.0 + 0.5j])
        tx = kopt.lamb(0.5)
        u, _ = tx.update(jnp.asarray(g), tx.init(w), w)
        assert u.dtype == jnp.complex128, u.dtype
        r = g / np.abs(g)  # the first step's r: m / sqrt(v) = g / |g| (epsilon aside)
        expected = -0.5 * np.linalg.norm(np.asarray(w)) / np.linalg.norm(r) * r
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize(
    "build, owner",
    [
        (lambda: kopt.ftrl(0.1), "scale_by_ftrl"),
        (lambda: kopt.scale_by_ftrl(), "scale_by_ftrl"),
        (lambda: kopt.clip_by_value(1.0), "clip_by_value"),
        (lambda: kopt.chain(kopt.clip_by_value(1.0), kopt.adam(0.1)), "clip_by_value"),
    ],
)
def test_rules_without_a_complex_form_refuse_complex_params(build, owner):
    params = {"real": jnp.ones(2), "z": jnp.ones(2, jnp.complex64)}
    tx = build()
    for init in (tx.init, jax.jit(tx.init)):  # refused while tracing, before any slot exists
        with pytest.raises(TypeError, match=rf"^{owner}: param \['z'\] has complex dtype"):
            init(params)
    tx.init({"real": params["real"]})  # real params are still accepted


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.adam(0.1, slot_dtype=jnp.float32),
        lambda: kopt.rmsprop(0.1, slot_dtype=jnp.float32),
        lambda: kopt.adagrad(0.1, slot_dtype=jnp.float32),
        lambda: kopt.sgd(0.1, momentum=0.9, slot_dtype=jnp.float32),
    ],
    ids=["adam", "rmsprop", "adagrad", "sgd_momentum"],
)
def test_a_real_slot_dtype_for_complex_params_is_refused(make):
    """The gradient cast to a real slot lost its imaginary part: a purely imaginary gradient
    moved nothing, silently."""
    with pytest.raises(TypeError, match=r"param \['z'\] is complex64, but its slot '\w+' would "):
        make().init({"z": jnp.ones(2, jnp.complex64)})
    make().init({"z": jnp.ones(2, jnp.float32)})  # real params are unaffected


def test_a_complex_slot_dtype_keeps_a_real_params_update_real():
    """slot_dtype=complex64 over a tree mixing float32 and complex64 params gave the real
    param complex slots and a complex update, which apply_updates cast to float32 with JAX's
    deprecated complex-to-real cast (a warning now, an error soon). The real param's slots
    now take the matching real dtype, float32."""
    params = {"r": jnp.array([1.0, -2.0]), "c": jnp.array([1.0 + 1.0j, 2.0 - 1.0j], jnp.complex64)}
    grads = [{"r": jnp.array([0.5, -1.5]), "c": jnp.array([0.5 + 0.5j, -1.0j], jnp.complex64)}] * 2
    for name, make in OPTIMIZERS.items():
        if name in ("ftrl", "adafactor"):  # no complex form; real statistics only
            continue
        tx = make(0.1, slot_dtype=jnp.complex64)
        state = tx.init(params)
        p = params
        for g in grads:
            updates, state = jax.jit(tx.update)(g, state, p)
            assert updates["r"].dtype == jnp.float32, (name, updates["r"].dtype)
            assert updates["c"].dtype == jnp.complex64, name
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no complex-to-real cast
                p = kopt.apply_updates(p, updates)
        for slot in kopt.slot_names(state):
            leaf = kopt.get_slot(state, slot)
            if isinstance(leaf, dict):
                assert not jnp.iscomplexobj(leaf["r"]), (name, slot)
        if name == "adam":  # AMSGrad, whose first steps match Adam's here (v grows)
            r = ref.adam(params["r"], [g["r"] for g in grads], lr=0.1)
            np.testing.assert_allclose(p["r"], r, rtol=1e-6)
            c = numpy_adam(np.asarray(params["c"], np.complex128), [g["c"] for g in grads], 0.1)
            np.testing.assert_allclose(p["c"], c, rtol=1e-5)
        if name == "sgd":  # Nesterov momentum
            r = ref.sgd_momentum(params["r"], [g["r"] for g in grads], 0.1, 0.9, nesterov=True)
            np.testing.assert_allclose(p["r"], r, rtol=1e-6)
    # ema and accumulate_gradients: a real average and a real accumulator, real updates.
    for tx in (
        kopt.chain(kopt.sgd(0.1), kopt.ema(0.5, 1, slot_dtype=jnp.complex64)),
        kopt.accumulate_gradients(kopt.sgd(0.1), 1, slot_dtype=jnp.complex64),
    ):
        updates, state = tx.update(grads[0], tx.init(params), params)
        assert updates["r"].dtype == jnp.float32 and updates["c"].dtype == jnp.complex64
