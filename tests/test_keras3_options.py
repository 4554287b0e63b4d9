"""Keras 3's common optimizer arguments on the facade's Keras 3 classes (AdamW, Lion, Lamb,
Adafactor): ``gradient_accumulation_steps``, ``weight_decay``, ``use_ema``, ``ema_momentum``,
``ema_overwrite_frequency``; and ``kopt.decoupled_weight_decay``.

Values are checked against NumPy re-derivations of Keras 3's update rules, Keras 3's own golden
value for weight decay, and (for accumulation) the same optimizer stepping once on the mean
gradient.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt import optimizers
from kopt.optimizers import Adafactor, AdamW, Lamb, Lion

RNG = np.random.default_rng(3)
W0 = {
    "w": RNG.normal(size=(4, 3)).astype(np.float32),
    "b": RNG.normal(size=(3,)).astype(np.float32),
}
MICRO_GRADS = [
    {k: RNG.normal(size=v.shape).astype(np.float32) for k, v in W0.items()} for _ in range(6)
]

KERAS3 = {
    "AdamW": lambda **kw: AdamW(learning_rate=0.05, **kw),
    "Lion": lambda **kw: Lion(learning_rate=0.05, weight_decay=0.1, **kw),
    "Lamb": lambda **kw: Lamb(learning_rate=0.05, weight_decay=0.1, **kw),
    "Adafactor": lambda **kw: Adafactor(learning_rate=0.05, weight_decay=0.1, **kw),
}


def make_variables():
    return {k: kopt.Variable(v, name=k) for k, v in W0.items()}


def apply(opt, variables, grads):
    opt.apply_gradients([(jnp.asarray(grads[k]), variables[k]) for k in variables])


# --- gradient accumulation ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KERAS3))
def test_accumulation_equals_one_step_on_the_mean_gradient(name):
    accumulating, acc_vars = KERAS3[name](gradient_accumulation_steps=3), make_variables()
    reference, ref_vars = KERAS3[name](), make_variables()
    for start in (0, 3):  # two updates: bias corrections must count updates, not calls
        before = {k: v.numpy() for k, v in acc_vars.items()}
        for i in range(3):
            apply(accumulating, acc_vars, MICRO_GRADS[start + i])
            if i < 2:  # the first k-1 calls change no variable
                for k, v in acc_vars.items():
                    np.testing.assert_array_equal(v.numpy(), before[k])
        mean = {k: np.mean([g[k] for g in MICRO_GRADS[start : start + 3]], axis=0) for k in W0}
        apply(reference, ref_vars, mean)
        for k in W0:
            np.testing.assert_allclose(
                acc_vars[k].numpy(), ref_vars[k].numpy(), rtol=2e-6, atol=1e-7, err_msg=k
            )
    assert int(accumulating.iterations.numpy()) == 6  # calls, as Keras 3's `_iterations`
    assert int(reference.iterations.numpy()) == 2
    for slot in reference.get_slot_names():
        for k in W0:
            np.testing.assert_allclose(
                accumulating.get_slot(acc_vars[k], slot).numpy(),
                reference.get_slot(ref_vars[k], slot).numpy(),
                rtol=2e-6,
                atol=1e-7,
            )


@pytest.mark.parametrize("clip", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_accumulation_clips_the_mean_gradient_as_keras3(clip):
    """Keras 3 clips the mean of the k gradients at the update, not each call's gradient: the
    same as one clipped step on the mean. The clip value is read at each update (0.5, then 0.2)
    without a new program, and `as_transformation` clips the same way."""
    accumulating, acc_vars = (
        AdamW(0.05, gradient_accumulation_steps=3, **{clip: 0.5}),
        make_variables(),
    )
    reference, ref_vars = AdamW(0.05, **{clip: 0.5}), make_variables()
    tx = accumulating.as_transformation()
    params, state = dict(W0), tx.init(dict(W0))
    for start, value in ((0, 0.5), (3, 0.2)):
        setattr(accumulating, clip, value)
        setattr(reference, clip, value)
        for i in range(3):
            grads = {k: 4 * g for k, g in MICRO_GRADS[start + i].items()}  # large: clipped
            apply(accumulating, acc_vars, grads)
            if start == 0:
                updates, state = tx.update(grads, state, params)
                params = kopt.apply_updates(params, updates)
        mean = {k: np.mean([4 * g[k] for g in MICRO_GRADS[start : start + 3]], axis=0) for k in W0}
        apply(reference, ref_vars, mean)
        if start == 0:
            for k in W0:
                np.testing.assert_allclose(params[k], ref_vars[k].numpy(), rtol=2e-6, atol=1e-7)
        for k in W0:
            np.testing.assert_allclose(
                acc_vars[k].numpy(), ref_vars[k].numpy(), rtol=2e-6, atol=1e-7, err_msg=k
            )
    assert accumulating.compile_count == 1


def test_facade_inner_update_runs_once_per_k_calls():
    """The functional twin records each run of its update; a learning-rate schedule sees the call
    count at the update (k - 1, then 2k - 1), as Keras 3 calls it with `_iterations`."""
    runs = []

    def record(updates, state, params=None):
        jax.debug.callback(lambda: runs.append(1))
        return updates, state

    class RecordingLion(Lion):
        def _twin(self, hp):
            return kopt.chain(kopt.GradientTransformation(lambda p: (), record), super()._twin(hp))

    opt = RecordingLion(learning_rate=lambda step: 0.01 * (step + 1), gradient_accumulation_steps=3)
    var = kopt.Variable(W0["w"])
    grads = [g["w"] for g in MICRO_GRADS] + [MICRO_GRADS[0]["w"]]
    for g in grads:
        opt.apply_gradients([(jnp.asarray(g), var)])
    jax.effects_barrier()
    assert len(runs) == 2  # 7 calls, k = 3
    assert opt.compile_count == 1

    w, m = W0["w"].astype(np.float64), np.zeros_like(W0["w"], np.float64)
    for n, calls in enumerate((2, 5)):  # Lion on the mean gradient, lr at the call count
        g = np.mean(grads[3 * n : 3 * n + 3], axis=0)
        w = w - 0.01 * (calls + 1) * np.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-6, atol=1e-7)


def test_functional_inner_update_runs_once_per_k_calls():
    runs = []

    def record(updates, state, params=None):
        jax.debug.callback(lambda: runs.append(1))
        return updates, state

    inner = kopt.chain(kopt.GradientTransformation(lambda p: (), record), kopt.sgd(1.0))
    tx = kopt.accumulate_gradients(inner, every_k=4)
    step = jax.jit(tx.update)
    state = tx.init(W0)
    for grads in MICRO_GRADS + MICRO_GRADS:
        _, state = step(grads, state, W0)
    jax.effects_barrier()
    assert len(runs) == 3  # 12 calls, k = 4


# --- weight decay --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lion, Lamb, Adafactor, AdamW], ids=lambda c: c.__name__)
def test_weight_decay_matches_keras3_golden(cls):
    """Keras 3's shared test_weight_decay: 2.0 decayed three times at lr=1, wd=0.004."""
    var = kopt.Variable(2.0)
    opt = cls(learning_rate=1.0, weight_decay=0.004)
    for _ in range(3):
        opt.apply_gradients([(jnp.zeros(()), var)])
    np.testing.assert_allclose(var.numpy(), 1.9760959, rtol=0, atol=1e-6)


def numpy_lamb(w, grads_seq, lr, wd, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras 3: decay first, then Lamb's step with the trust ratio of the decayed weights."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k in w:
            w[k] = w[k] - w[k] * wd * lr
            m[k] = beta_1 * m[k] + (1 - beta_1) * grads[k]
            v[k] = beta_2 * v[k] + (1 - beta_2) * grads[k] ** 2
            r = (m[k] / (1 - beta_1**t)) / (np.sqrt(v[k] / (1 - beta_2**t)) + epsilon)
            w_norm, r_norm = np.linalg.norm(w[k]), np.linalg.norm(r)
            ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            w[k] = w[k] - lr * ratio * r
    return w


def test_lamb_weight_decay_comes_before_the_trust_ratio():
    opt, variables = Lamb(learning_rate=0.2, weight_decay=0.5), make_variables()
    for grads in MICRO_GRADS[:3]:
        apply(opt, variables, grads)
    expected = numpy_lamb(W0, MICRO_GRADS[:3], lr=0.2, wd=0.5)
    for k in W0:
        np.testing.assert_allclose(variables[k].numpy(), expected[k], rtol=1e-5, atol=1e-6)


def test_decoupled_weight_decay_functional_with_schedule():
    lr = kopt.schedules.exponential_decay(0.5, decay_steps=1, decay_rate=0.5)
    tx = kopt.decoupled_weight_decay(kopt.lion(lr), weight_decay=0.2, learning_rate=lr)
    params = {k: jnp.asarray(v) for k, v in W0.items()}
    state = tx.init(params)
    expected = {k: v.astype(np.float64) for k, v in W0.items()}
    m = {k: np.zeros_like(v) for k, v in expected.items()}
    for step, grads in enumerate(MICRO_GRADS[:3]):
        updates, state = tx.update(grads, state, params)
        params = kopt.apply_updates(params, updates)
        rate = 0.5 * 0.5**step
        for k in W0:  # Keras 3 Lion with decay first
            expected[k] = expected[k] - expected[k] * 0.2 * rate
            expected[k] = expected[k] - rate * np.sign(0.9 * m[k] + 0.1 * grads[k])
            m[k] = 0.99 * m[k] + 0.01 * grads[k]
    for k in W0:
        np.testing.assert_allclose(params[k], expected[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs `params`"):
        tx.update(MICRO_GRADS[0], state)
    with pytest.raises(ValueError, match="weight_decay"):
        kopt.decoupled_weight_decay(kopt.lion(), weight_decay=-1.0)


# --- EMA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite_frequency", [None, 3])
def test_ema_average_and_overwrite_match_keras3(overwrite_frequency):
    opt = Lion(
        learning_rate=0.1,
        use_ema=True,
        ema_momentum=0.8,
        ema_overwrite_frequency=overwrite_frequency,
    )
    var = kopt.Variable(W0["w"])
    grads = [g["w"] for g in MICRO_GRADS[:5]]
    for g in grads:
        opt.apply_gradients([(jnp.asarray(g), var)])
    expected_w, expected_average = numpy_lion_ema_accumulated(
        W0["w"], grads, 1, 0.1, 0.8, overwrite_frequency
    )
    np.testing.assert_allclose(var.numpy(), expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        opt.get_slot(var, "average").numpy(), expected_average, rtol=1e-5, atol=1e-6
    )
    opt.finalize_variable_values([var])
    np.testing.assert_allclose(var.numpy(), expected_average, rtol=1e-5, atol=1e-6)


def numpy_lion_ema_accumulated(w, grads_seq, k, lr, momentum, overwrite_frequency):
    """Keras 3 (JAX backend) Lion with ``use_ema`` and ``gradient_accumulation_steps=k`` (k=1:
    no accumulation): Lion runs on the mean gradient every k-th call, but the average moves on
    every call (it is outside the accumulation cond), with ``iterations = calls // k``; so does
    the overwrite check."""
    w = w.astype(np.float64)
    m, average, total = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    for call, g in enumerate(grads_seq):
        total = total + g
        if (call + 1) % k == 0:
            mean, total = total / k, np.zeros_like(w)
            w = w - lr * np.sign(0.9 * m + 0.1 * mean)
            m = 0.99 * m + 0.01 * mean
        iterations = call // k
        mu = momentum if iterations != 0 else 0.0
        average = mu * average + (1 - mu) * w
        if overwrite_frequency and (iterations + 1) % overwrite_frequency == 0:
            w = average.copy()
    return w, average


@pytest.mark.parametrize("overwrite_frequency", [None, 2])
def test_ema_moves_on_every_call_under_gradient_accumulation_as_keras3(overwrite_frequency):
    """The facade and its ``as_transformation()`` alike."""
    kwargs = dict(
        learning_rate=0.1,
        use_ema=True,
        ema_momentum=0.7,
        ema_overwrite_frequency=overwrite_frequency,
        gradient_accumulation_steps=2,
    )
    grads = [g["w"] for g in MICRO_GRADS] * 2
    expected_w, expected_average = numpy_lion_ema_accumulated(
        W0["w"], grads, 2, 0.1, 0.7, overwrite_frequency
    )
    opt = Lion(**kwargs)
    var = kopt.Variable(W0["w"])
    for g in grads:
        opt.apply_gradients([(jnp.asarray(g), var)])
    np.testing.assert_allclose(var.numpy(), expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        opt.get_slot(var, "average").numpy(), expected_average, rtol=1e-5, atol=1e-6
    )
    assert opt.compile_count == 1

    tx = Lion(**kwargs).as_transformation()
    params = jnp.asarray(W0["w"])
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(jnp.asarray(g), state, params)
        params = kopt.apply_updates(params, updates)
    np.testing.assert_allclose(params, expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        kopt.get_slot(state, "average"), expected_average, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", list(KERAS3))
def test_slot_dtype_keeps_the_average_of_bfloat16_variables(name):
    """``slot_dtype=float32`` left the ``average`` of bfloat16 variables in bfloat16, where a
    momentum of 0.999 rounds to 1: the average stayed at the first step's variable (AdamW:
    0.988 where the EMA of its variables was 0.572 after 300 steps)."""
    opt = KERAS3[name](use_ema=True, ema_momentum=0.999, slot_dtype=jnp.float32)
    var = kopt.Variable(jnp.ones(4, jnp.bfloat16), name="v")
    trajectory = []
    for _ in range(200):
        opt.apply_gradients([(jnp.ones(4, jnp.bfloat16), var)])
        trajectory.append(np.asarray(var.numpy(), np.float64))
    assert var.dtype == jnp.bfloat16
    for slot_name in opt.get_slot_names():
        assert opt.get_slot(var, slot_name).dtype == jnp.float32, slot_name
    average = trajectory[0]  # Keras 3's first step copies the variable
    for w in trajectory[1:]:
        average = 0.999 * average + 0.001 * w
    assert not np.allclose(average, trajectory[0], rtol=0.1)  # the variables moved
    np.testing.assert_allclose(opt.get_slot(var, "average").numpy(), average, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(KERAS3))
def test_slot_dtype_keeps_the_gradient_accumulators(name):
    """``slot_dtype=float32`` left the accumulators of bfloat16 variables in bfloat16, where
    1 + 2**-8 rounds to 1."""
    opt = KERAS3[name](gradient_accumulation_steps=3, slot_dtype=jnp.float32)
    var = kopt.Variable(jnp.ones(4, jnp.bfloat16), name="v")
    for g in (1.0, 2.0**-8):  # two calls of three: no update yet
        opt.apply_gradients([(jnp.full(4, g, jnp.bfloat16), var)])
    slots = [opt.get_slot(var, n) for n in opt.get_slot_names()]
    accumulators = [
        w for w in opt.variables() if w.shape == var.shape and all(w is not s for s in slots)
    ]
    assert [a.dtype for a in accumulators] == [jnp.float32]
    np.testing.assert_array_equal(accumulators[0].numpy(), np.full(4, 1 + 2.0**-8, np.float32))
    np.testing.assert_array_equal(var.numpy(), np.ones(4, jnp.bfloat16))


def test_ema_momentum_changes_without_recompiling():
    opt = Lion(learning_rate=0.1, use_ema=True, ema_momentum=0.8)
    var = kopt.Variable(W0["w"])
    grads = [g["w"] for g in MICRO_GRADS[:3]]
    opt.apply_gradients([(jnp.asarray(grads[0]), var)])
    opt.ema_momentum = 0.5
    for g in grads[1:]:
        opt.apply_gradients([(jnp.asarray(g), var)])
    w = W0["w"].astype(np.float64)
    m = average = np.zeros_like(w)
    for i, g in enumerate(grads):
        w = w - 0.1 * np.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        average = w if i == 0 else 0.5 * average + 0.5 * w
    np.testing.assert_allclose(opt.get_slot(var, "average").numpy(), average, rtol=1e-5)
    assert opt.compile_count == 1


# --- weight decay exclusions ------------------------------------------------------------------


def numpy_lion(w, grads_seq, lr, wd, beta_1=0.9, beta_2=0.99):
    w, m = w.astype(np.float64), np.zeros_like(w, np.float64)
    for g in grads_seq:
        w = w - w * wd * lr
        w = w - lr * np.sign(beta_1 * m + (1 - beta_1) * g)
        m = beta_2 * m + (1 - beta_2) * g
    return w


@pytest.mark.parametrize("cls", [Lion, AdamW], ids=lambda c: c.__name__)
def test_exclude_from_weight_decay_by_variable_and_by_name(cls):
    """Keras 3's ``exclude_from_weight_decay(var_list, var_names)``: the excluded variables
    step without decay, the others with it (NumPy re-derivations; AdamW against the
    functional AdamW given the same mask)."""
    names = ["dense/kernel", "dense/bias", "embedding"]
    values = [RNG.normal(size=(3, 2)).astype(np.float32) for _ in names]
    grads = [[RNG.normal(size=(3, 2)).astype(np.float32) for _ in names] for _ in range(3)]
    variables = [kopt.Variable(v, name=n) for v, n in zip(values, names, strict=True)]
    opt = cls(learning_rate=0.1, weight_decay=0.3)
    opt.exclude_from_weight_decay(var_list=[variables[2]], var_names=["bias"])
    for step in grads:
        opt.apply_gradients(zip([jnp.asarray(g) for g in step], variables, strict=True))
    decays = [True, False, False]
    if cls is Lion:
        expected = [
            numpy_lion(v, [step[i] for step in grads], 0.1, 0.3 if decays[i] else 0.0)
            for i, v in enumerate(values)
        ]
    else:
        tx = kopt.adamw(0.1, weight_decay=0.3, mask=decays)
        params, state = [jnp.asarray(v) for v in values], tx.init([jnp.asarray(v) for v in values])
        for step in grads:
            updates, state = tx.update([jnp.asarray(g) for g in step], state, params)
            params = kopt.apply_updates(params, updates)
        undecayed = kopt.adam(0.1)  # an excluded variable steps as plain Adam
        p, s = jnp.asarray(values[1]), undecayed.init(jnp.asarray(values[1]))
        for step in grads:
            u, s = undecayed.update(jnp.asarray(step[1]), s, p)
            p = kopt.apply_updates(p, u)
        np.testing.assert_allclose(params[1], p, rtol=1e-6)
        expected = params
    for v, e in zip(variables, expected, strict=True):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6, err_msg=v.name)
    assert opt.compile_count == 1

    with pytest.raises(TypeError, match="`var_names` must be a list of strings"):
        cls().exclude_from_weight_decay(var_names="bias")  # not the letters b, i, a, s
    with pytest.raises(ValueError, match="mask="):
        opt.as_transformation()

    # Set again after the first steps (Keras 3 refuses; a restored optimizer needs it): the
    # next step compiles once with the new exclusions, here none, so every variable decays.
    opt.exclude_from_weight_decay()
    before = [v.numpy() for v in variables]
    opt.apply_gradients(zip([jnp.zeros((3, 2))] * 3, variables, strict=True))
    if cls is Lion:  # a zero gradient after momentum: compare the decay through the moment
        assert not np.allclose(variables[1].numpy(), before[1])
    else:
        for v, b in zip(variables, before, strict=True):
            assert not np.array_equal(v.numpy(), b)
    assert opt.compile_count == 2


def test_exclusions_set_on_a_restored_optimizer_apply_to_its_next_steps():
    """``exclude_from_weight_decay`` is not in the config (as in Keras 3); set on an optimizer
    rebuilt from config and weights, it gives the uninterrupted run's numbers."""
    names = ["kernel", "bias"]
    values = [np.full((2,), 1.0, np.float32), np.full((2,), -1.0, np.float32)]
    grads = [[np.full((2,), 0.5, np.float32)] * 2 for _ in range(4)]

    def fresh():
        return [kopt.Variable(v, name=n) for v, n in zip(values, names, strict=True)]

    whole_vars = fresh()
    whole = Lion(learning_rate=0.1, weight_decay=0.5)
    whole.exclude_from_weight_decay(var_names=["bias"])
    for step in grads:
        whole.apply_gradients(zip([jnp.asarray(g) for g in step], whole_vars, strict=True))

    first_vars = fresh()
    first = Lion(learning_rate=0.1, weight_decay=0.5)
    first.exclude_from_weight_decay(var_names=["bias"])
    for step in grads[:2]:
        first.apply_gradients(zip([jnp.asarray(g) for g in step], first_vars, strict=True))
    resumed_vars = [
        kopt.Variable(v.numpy(), name=n) for v, n in zip(first_vars, names, strict=True)
    ]
    resumed = Lion.from_config(first.get_config())
    resumed._create_all_weights(resumed_vars)
    resumed.set_weights(first.get_weights())
    resumed.exclude_from_weight_decay(var_names=["bias"])
    for step in grads[2:]:
        resumed.apply_gradients(zip([jnp.asarray(g) for g in step], resumed_vars, strict=True))
    for a, b in zip(resumed_vars, whole_vars, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# --- loss_scale_factor ---------------------------------------------------------------------------


def test_loss_scale_factor_divides_the_gradients_before_clipping_as_keras3():
    """Keras 3: ``apply`` divides the gradients by ``loss_scale_factor`` first, then clips;
    ``scale_loss`` multiplies, and ``minimize`` scales the loss it differentiates."""
    factor = 8.0
    opt = Lion(learning_rate=0.1, loss_scale_factor=factor, clipnorm=1.0)
    assert opt.get_config()["loss_scale_factor"] == factor
    assert float(opt.scale_loss(jnp.float32(2.0))) == 16.0
    var = kopt.Variable([1.0, -2.0])
    # ... and so does the optimizer as a pure transformation.
    tx = Lion(learning_rate=0.1, loss_scale_factor=factor, clipnorm=1.0).as_transformation()
    params = jnp.array([1.0, -2.0])
    state = tx.init(params)
    w, m = np.array([1.0, -2.0]), np.zeros(2)
    for g in ([3.0, 4.0], [0.5, -0.1], [8.0, 8.0]):
        opt.apply_gradients([(jnp.array(g), var)])
        updates, state = tx.update(jnp.array(g), state, params)
        params = kopt.apply_updates(params, updates)
        g = np.array(g) / factor
        g = g * min(1.0, 1.0 / np.linalg.norm(g))
        w = w - 0.1 * np.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-6)
        np.testing.assert_allclose(params, w, rtol=1e-6)
    np.testing.assert_allclose(opt.get_slot(var, "m").numpy(), m, rtol=1e-5)

    scaled, plain = Lion(learning_rate=0.1, loss_scale_factor=4.0), Lion(learning_rate=0.1)
    a, b = kopt.Variable([1.0, -2.0]), kopt.Variable([1.0, -2.0])
    scaled.minimize(lambda: jnp.sum(a * a), [a])
    plain.minimize(lambda: jnp.sum(b * b), [b])
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(scaled.get_slot(a, "m").numpy(), plain.get_slot(b, "m").numpy())


@pytest.mark.parametrize(
    "value, error", [(0.0, ValueError), (-2.0, ValueError), ("8", TypeError), (True, TypeError)]
)
def test_loss_scale_factor_is_checked(value, error):
    with pytest.raises(error, match="loss_scale_factor"):
        Lion(loss_scale_factor=value)
    opt = Lion()
    with pytest.raises(error, match="loss_scale_factor"):
        opt.loss_scale_factor = value
    assert opt.loss_scale_factor is None


def test_a_keras3_config_with_loss_scale_factor_none_loads():
    """Every Keras 3 optimizer config has ``loss_scale_factor`` (None by default)."""
    config = {"name": "adamw", "learning_rate": 0.01, "weight_decay": 0.1, "beta_1": 0.8}
    config.update(loss_scale_factor=None, use_ema=False, ema_momentum=0.99)
    opt = kopt.optimizers.deserialize({"class_name": "AdamW", "config": config})
    assert isinstance(opt, AdamW) and opt.loss_scale_factor is None and opt.beta_1 == 0.8


def test_decoupled_weight_decay_mask_leaves_unselected_params_undecayed():
    params = {"w": jnp.full(2, 2.0), "b": jnp.full(2, 2.0)}
    for mask in ({"w": True, "b": False}, lambda p: {"w": True, "b": False}):
        tx = kopt.decoupled_weight_decay(
            kopt.sgd(0.5), weight_decay=0.1, learning_rate=0.5, mask=mask
        )
        updates, _ = tx.update({"w": jnp.ones(2), "b": jnp.ones(2)}, tx.init(params), params)
        new = kopt.apply_updates(params, updates)
        np.testing.assert_allclose(new["w"], 2.0 - 2.0 * 0.1 * 0.5 - 0.5)
        np.testing.assert_allclose(new["b"], 2.0 - 0.5)


# --- clipping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attr", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_a_clipping_argument_of_zero_means_no_clipping_as_in_keras3(attr):
    """Keras 3 clips only by a positive value (``if self.clipnorm and self.clipnorm > 0``); a
    tf.keras legacy class clips to zero. Lion's step is ``lr * sign(...)``, so an unclipped
    gradient moves every element by exactly lr."""
    var = kopt.Variable([1.0, -2.0])
    opt = Lion(learning_rate=0.1, **{attr: 0.0})
    opt.apply_gradients([(jnp.array([3.0, -4.0]), var)])
    np.testing.assert_allclose(var.numpy(), [0.9, -1.9], rtol=1e-6)
    assert getattr(opt, attr) == 0.0
    setattr(opt, attr, 0.5)  # now on: still lr * sign for Lion, so check the clipped slot
    opt.apply_gradients([(jnp.array([3.0, -4.0]), var)])
    clipped = {"clipnorm": np.array([3.0, -4.0]) * 0.5 / 5.0, "clipvalue": np.array([0.5, -0.5])}
    clipped["global_clipnorm"] = clipped["clipnorm"]
    np.testing.assert_allclose(
        opt.get_slot(var, "m").numpy(),
        0.99 * 0.01 * np.array([3.0, -4.0]) + 0.01 * clipped[attr],
        rtol=1e-5,
    )
    legacy = kopt.optimizers.SGD(learning_rate=0.1, **{attr: 0.0})
    legacy_var = kopt.Variable([1.0, -2.0])
    legacy.apply_gradients([(jnp.array([3.0, -4.0]), legacy_var)])
    np.testing.assert_array_equal(legacy_var.numpy(), [1.0, -2.0])  # tf.keras: clipped to zero


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clipnorm": 1.0, "clipvalue": 0.5},
        {"clipvalue": 0.5, "global_clipnorm": 1.0},
        {"clipnorm": 1.0, "global_clipnorm": 1.0},
    ],
)
@pytest.mark.parametrize("cls", [Lion, Lamb, Adafactor, AdamW], ids=lambda c: c.__name__)
def test_only_one_clipping_argument_as_in_keras3(cls, kwargs):
    with pytest.raises(
        ValueError, match="Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"
    ):
        cls(**kwargs)
    first, second = kwargs
    opt = cls(**{first: kwargs[first]})
    var = kopt.Variable(W0["w"])
    opt.apply_gradients([(jnp.asarray(MICRO_GRADS[0]["w"]), var)])
    weights, value = opt.get_weights(), var.numpy()
    with pytest.raises(ValueError, match=f"Only one of .*{second}={kwargs[second]}"):
        setattr(opt, second, kwargs[second])
    assert getattr(opt, second) is None
    for w, before in zip(opt.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, before)
    np.testing.assert_array_equal(var.numpy(), value)


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps"),
        ({"gradient_accumulation_steps": 2.5}, "gradient_accumulation_steps"),
        ({"use_ema": True, "ema_momentum": 1.5}, "ema_momentum"),
        ({"use_ema": True, "ema_overwrite_frequency": -1}, "ema_overwrite_frequency"),
        ({"use_ema": True, "ema_overwrite_frequency": 1.5}, "ema_overwrite_frequency"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lion(**kwargs)


def test_ema_arguments_are_only_checked_with_use_ema():
    """As Keras 3: without use_ema the EMA arguments are not validated."""
    opt = Lion(ema_momentum=1.5, ema_overwrite_frequency=-1)
    assert opt.get_config()["ema_momentum"] == 1.5
    assert Lion(gradient_accumulation_steps=0).gradient_accumulation_steps is None


@pytest.mark.parametrize("name", list(KERAS3))
def test_config_round_trip(name):
    opt = KERAS3[name](
        use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5, gradient_accumulation_steps=4
    )
    config = opt.get_config()
    for key, value in {
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 5,
        "gradient_accumulation_steps": 4,
    }.items():
        assert config[key] == value
    assert config["weight_decay"] == (0.004 if name == "AdamW" else 0.1)
    clone = type(opt).from_config(config)
    assert clone.get_config() == config
    assert Lion().get_config()["weight_decay"] is None


def test_config_has_keras3s_keys_with_the_unset_clips_as_none():
    # keras.optimizers.AdamW(weight_decay=0.1, clipnorm=1.0).get_config() in Keras 3.15, but
    # for the name and the learning rate (Keras 3 writes its float32 value, 0.0010000000474974513).
    keras3 = {
        "weight_decay": 0.1,
        "clipnorm": 1.0,
        "global_clipnorm": None,
        "clipvalue": None,
        "use_ema": False,
        "ema_momentum": 0.99,
        "ema_overwrite_frequency": None,
        "loss_scale_factor": None,
        "gradient_accumulation_steps": None,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-07,
        "amsgrad": False,
    }
    config = AdamW(weight_decay=0.1, clipnorm=1.0).get_config()
    assert {k: v for k, v in config.items() if k not in ("name", "learning_rate")} == keras3
    assert AdamW.from_config(config).get_config() == config
    # keras.optimizers.Lion().get_config()'s keys
    assert set(Lion(clipvalue=0.5).get_config()) == {
        "name", "learning_rate", "weight_decay", "clipnorm", "global_clipnorm", "clipvalue",
        "use_ema", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
        "gradient_accumulation_steps", "beta_1", "beta_2",
    }  # fmt: skip
    assert Lion(clipvalue=0.5).get_config()["clipvalue"] == 0.5


# --- attributes set after the first step -----------------------------------------------------


def numpy_adamw(w, grads_seq, lr, wd, beta_2, amsgrad_from, beta_1=0.9, epsilon=1e-7):
    """Keras 3's AdamW; AMSGrad switched on before step ``amsgrad_from`` (from 0), with
    ``vhat`` starting at zero there."""
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    vhat = np.zeros_like(w)
    for i, g in enumerate(grads_seq):
        t = i + 1
        w = w - w * wd * lr
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        m = m + (g - m) * (1 - beta_1)
        v = v + (g * g - v) * (1 - beta_2)
        denominator = v
        if i >= amsgrad_from:
            vhat = np.maximum(vhat, v)
            denominator = vhat
        w = w - alpha * m / (np.sqrt(denominator) + epsilon)
    return w, vhat


def test_amsgrad_switched_on_later_makes_vhat_and_uses_it():
    opt = AdamW(learning_rate=0.05, weight_decay=0.1, beta_2=0.5)
    var = kopt.Variable(W0["w"])
    grads = [g["w"] * s for g, s in zip(MICRO_GRADS, (4, 4, 1, 0.5, 0.25, 0.1), strict=True)]
    for i, g in enumerate(grads):
        if i == 2:
            opt.amsgrad = True
        opt.apply_gradients([(jnp.asarray(g), var)])
    expected_w, expected_vhat = numpy_adamw(W0["w"], grads, 0.05, 0.1, 0.5, amsgrad_from=2)
    never, _ = numpy_adamw(W0["w"], grads, 0.05, 0.1, 0.5, amsgrad_from=len(grads))
    assert np.max(np.abs(expected_w - never)) > 1e-3  # the data makes AMSGrad matter
    np.testing.assert_allclose(var.numpy(), expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.get_slot(var, "vhat").numpy(), expected_vhat, rtol=1e-5)
    assert [w.name.split("/")[-1] for w in opt.weights] == ["iter:0", "m:0", "v:0", "vhat:0"]


def test_ema_switched_on_later_starts_from_the_variable():
    opt = Lion(learning_rate=0.1, ema_momentum=0.8)
    var = kopt.Variable(W0["w"])
    grads = [g["w"] for g in MICRO_GRADS[:5]]
    for i, g in enumerate(grads):
        if i == 2:
            opt.use_ema = True
        opt.apply_gradients([(jnp.asarray(g), var)])
    w = W0["w"].astype(np.float64)
    m = np.zeros_like(w)
    for i, g in enumerate(grads):
        if i == 2:
            average = w.copy()  # made from the variable's value when EMA is switched on
        w = w - 0.1 * np.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        if i >= 2:
            average = 0.8 * average + 0.2 * w
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.get_slot(var, "average").numpy(), average, rtol=1e-5)


def test_weight_decay_set_later_decays_from_then_on():
    opt = Lion(learning_rate=0.1)
    var = kopt.Variable(W0["w"])
    grads = [g["w"] for g in MICRO_GRADS[:4]]
    for i, g in enumerate(grads):
        if i == 2:
            opt.weight_decay = 0.5
        opt.apply_gradients([(jnp.asarray(g), var)])
    w = W0["w"].astype(np.float64)
    m = np.zeros_like(w)
    for i, g in enumerate(grads):
        if i >= 2:
            w = w - w * 0.5 * 0.1
        w = w - 0.1 * np.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_cannot_change_after_the_first_step():
    opt = Lion(learning_rate=0.1)
    var = kopt.Variable(W0["w"])
    opt.apply_gradients([(jnp.asarray(MICRO_GRADS[0]["w"]), var)])
    before = [np.asarray(w) for w in opt.get_weights()], var.numpy()
    opt.gradient_accumulation_steps = 2
    with pytest.raises(ValueError, match=r"`gradient_accumulation_steps` \(None -> 2\)"):
        opt.apply_gradients([(jnp.asarray(MICRO_GRADS[1]["w"]), var)])
    after = [np.asarray(w) for w in opt.get_weights()], var.numpy()
    assert len(after[0]) == len(before[0])
    for b, a in zip(before[0], after[0], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(after[1], before[1])
    opt.gradient_accumulation_steps = None  # set back: training goes on
    opt.apply_gradients([(jnp.asarray(MICRO_GRADS[1]["w"]), var)])
    assert int(opt.iterations.numpy()) == 2


def test_gradient_accumulation_refuses_a_call_without_every_variable_naming_it():
    """The accumulators are made for every variable of the first call: a later call without a
    gradient for one of them is refused, naming it (it failed inside the step), and nothing
    changes; Keras 3 keeps an accumulator per variable and takes such a call."""
    opt = AdamW(learning_rate=0.1, gradient_accumulation_steps=2)
    variables = make_variables()
    apply(opt, variables, MICRO_GRADS[0])
    before = [np.asarray(w) for w in opt.get_weights()], [v.numpy() for v in variables.values()]
    with pytest.raises(ValueError, match=r"no gradient for \['b:0'\]"):
        opt.apply_gradients([(jnp.asarray(MICRO_GRADS[1]["w"]), variables["w"])])
    after = [np.asarray(w) for w in opt.get_weights()], [v.numpy() for v in variables.values()]
    for b, a in zip(before[0] + before[1], after[0] + after[1], strict=True):
        np.testing.assert_array_equal(a, b)
    apply(opt, variables, MICRO_GRADS[1])  # every variable again: the update runs
    assert int(opt.iterations.numpy()) == 2
    assert not np.array_equal(variables["w"].numpy(), W0["w"])


@pytest.mark.parametrize(
    ("cls", "expected_a", "expected_b"),
    [
        (AdamW, [0.31253597, -1.1991215], [1.8603821, 0.17538723]),
        (Lion, [0.3, -1.2], [2.0, 0.15]),
        (Lamb, [0.34485072, -1.1663812], [1.7157629, 0.08834326]),
        (Adafactor, [0.38192132, -1.1680607], [1.9244878, 0.075128496]),
    ],
    ids=["AdamW", "Lion", "Lamb", "Adafactor"],
)
def test_gradient_accumulation_takes_the_variables_in_another_order_as_keras_3(
    cls, expected_a, expected_b
):
    """Keras 3 matches its accumulators to the variables by identity; kopt refused a call that
    gave the first call's variables in another order. The expected values are Keras 3.15.1's
    (JAX backend), with the second and third calls reversed; kopt's `1 - beta` rounds
    differently (docs/deviations.md), hence the tolerance."""
    a = kopt.Variable(np.array([0.5, -1.0], np.float32), name="a")
    b = kopt.Variable(np.array([2.0, 0.25], np.float32), name="b")
    opt = cls(learning_rate=0.1, gradient_accumulation_steps=2)
    grads_a = [[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25], [2.0, 1.0]]
    grads_b = [[-0.5, 1.0], [4.0, -1.0], [0.75, 0.5], [-2.0, 3.0]]
    for call, (ga, gb) in enumerate(zip(grads_a, grads_b, strict=True)):
        pairs = [(jnp.asarray(ga), a), (jnp.asarray(gb), b)]
        opt.apply_gradients(pairs if call in (0, 3) else pairs[::-1])
    np.testing.assert_allclose(a.numpy(), expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.numpy(), expected_b, rtol=1e-5, atol=1e-6)
    assert int(opt.iterations.numpy()) == 4
    assert opt.compile_count == 1  # stepped in the first call's order


def test_numpy_and_jax_scalars_are_numbers_for_ema_momentum_and_lion_betas():
    """Keras 3 takes them; kopt refused ``np.float32(0.9)`` as "out of the range [0, 1]"."""
    for value in (np.float32(0.9), jnp.float32(0.9), np.float64(0.9)):
        opt = AdamW(use_ema=True, ema_momentum=value)
        assert type(opt.ema_momentum) is float
        opt.ema_momentum = np.float32(0.5)
        assert opt.ema_momentum == 0.5 and type(opt.ema_momentum) is float
        lion = Lion(beta_1=value, beta_2=np.float32(0.99))
        assert type(lion.beta_1) is float and type(lion.get_config()["beta_2"]) is float
    with pytest.raises(ValueError, match="ema_momentum"):
        AdamW(use_ema=True, ema_momentum=np.float32(1.5))
    # NumPy counts and flags set as attributes stay whole numbers and bools (JSON configs).
    opt = AdamW()
    opt.gradient_accumulation_steps = np.int64(2)
    opt.use_ema = np.True_
    opt.ema_overwrite_frequency = np.int32(5)
    assert (type(opt.gradient_accumulation_steps), type(opt.use_ema)) == (int, bool)
    assert type(opt.ema_overwrite_frequency) is int
    json.dumps(opt.get_config())


@pytest.mark.parametrize("pattern", ["bias", "bias$", "^bias$"])
def test_excluded_names_match_as_keras_3_names_without_the_suffix(pattern):
    """kopt's names end in tf.keras's ":0"; Keras 3's do not, so "bias$" excluded nothing and
    the bias decayed. Keras 3 leaves it at 2.0."""
    kernel, bias = kopt.Variable([2.0], name="kernel"), kopt.Variable([2.0], name="bias")
    opt = AdamW(learning_rate=1.0, weight_decay=0.1)
    opt.exclude_from_weight_decay(var_names=[pattern])
    opt.apply_gradients([(jnp.zeros(1), kernel), (jnp.zeros(1), bias)])
    np.testing.assert_allclose(bias.numpy(), [2.0])
    np.testing.assert_allclose(kernel.numpy(), [1.8], rtol=1e-6)


def test_decay_warns_and_is_ignored_as_in_keras_3():
    with pytest.warns(UserWarning, match="`decay` is no longer supported"):
        opt = Lion(learning_rate=0.1, decay=0.5)
    assert "decay" not in opt.get_config()


def test_a_variable_joining_an_accumulating_optimizer_is_named():
    """The message said the optimizer "wraps a transformation", which an AdamW user did not
    write, and named no variable."""
    a, b = kopt.Variable(jnp.ones(2), name="a"), kopt.Variable(jnp.ones(3), name="b")
    c = kopt.Variable(jnp.ones(2), name="c")
    opt = AdamW(gradient_accumulation_steps=2)
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(3), b)])
    with pytest.raises(
        ValueError, match=r"first step \(\['a:0', 'b:0'\]\), and this step adds \['c:0'\]"
    ):
        opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(3), b), (jnp.ones(2), c)])
    assert int(opt.iterations.numpy()) == 1
    with pytest.raises(
        ValueError, match=r"first step \(\['a:0', 'b:0'\]\), and this step adds \['c:0'\]"
    ):
        opt.apply_gradients([(jnp.ones(2), c)])


def test_adafactor_stays_finite_where_a_gradient_row_and_column_are_zero():
    """An input feature that is always 0 and a dead unit: the factored moment of their common
    element underflows to 0 (1e-30 times 1e-30), and Keras 3's 0 / 0 spread NaN through the RMS
    clip to the whole kernel. That element's update is 0 now; the others are as Keras's."""
    rng = np.random.default_rng(0)
    grad = rng.normal(size=(4, 3)).astype(np.float32)
    grad[2, :] = 0.0
    grad[:, 1] = 0.0
    kernel = rng.normal(size=(4, 3)).astype(np.float32)
    tx = kopt.adafactor(0.01)
    updates, _ = tx.update(jnp.asarray(grad), tx.init(jnp.asarray(kernel)), jnp.asarray(kernel))
    assert np.all(np.isfinite(updates))
    np.testing.assert_array_equal(np.asarray(updates)[grad == 0], 0.0)
    assert np.all(np.asarray(updates)[grad != 0] != 0)
    var = kopt.Variable(kernel, name="kernel")
    Adafactor(learning_rate=0.01).apply_gradients([(jnp.asarray(grad), var)])
    np.testing.assert_allclose(var.numpy(), kernel + np.asarray(updates), rtol=1e-6)


def test_accumulation_follows_an_assigned_iterations_and_k_cannot_change():
    """Keras 3 places the window by its call count: after ``iterations`` is assigned 4 with
    k = 3, its updates come at the 1st and 4th calls (kopt's own window counter put them at
    the 2nd and 5th). Changing k after the first step was taken silently (2 to 4) though the
    docs said it raises."""
    w = kopt.Variable(jnp.zeros(1), name="w")
    opt = Lion(learning_rate=1.0, gradient_accumulation_steps=3)
    opt.apply_gradients([(jnp.ones(1), w)])
    opt.iterations.assign(4)
    moved = []
    for _ in range(6):
        before = float(w.numpy()[0])
        opt.apply_gradients([(jnp.ones(1), w)])
        moved.append(float(w.numpy()[0]) != before)
    assert moved == [False, True, False, False, True, False]  # calls 5..10: (n + 1) % 3 == 0
    opt.gradient_accumulation_steps = 4
    before = (w.numpy(), int(opt.iterations.numpy()))
    with pytest.raises(ValueError, match=r"`gradient_accumulation_steps` \(3 -> 4\) changed"):
        opt.apply_gradients([(jnp.ones(1), w)])
    assert (w.numpy(), int(opt.iterations.numpy())) == before
    opt.gradient_accumulation_steps = 3
    opt.apply_gradients([(jnp.ones(1), w)])


def test_adamw_weight_decay_set_to_none_stops_the_decay_as_in_keras_3():
    """It was accepted, then every step raised kopt.adamw's "use kopt.adam" error. Keras 3:
    with zero gradients the first step decays 1 -> 0.95 and the next ones leave 0.95."""
    opt = optimizers.AdamW(learning_rate=0.1, weight_decay=0.5)
    var = kopt.Variable(np.ones(3, np.float32))
    opt.apply_gradients([(jnp.zeros(3), var)])
    opt.weight_decay = None
    opt.apply_gradients([(jnp.zeros(3), var)])
    np.testing.assert_allclose(var.numpy(), 0.95, rtol=1e-6)
    assert opt.get_config()["weight_decay"] is None


@pytest.mark.parametrize("value", [np.float32(0.42), jnp.asarray(0.42), np.float16(0.42)])
def test_keras_3_configs_give_float32_numbers_as_they_print(value):
    """`beta_1=np.float32(0.42)` showed as 0.41999998688697815 in the Keras 3 classes' configs,
    as `weight_decay` and Adafactor's `clip_threshold` did (docs/deviations.md: "0.42")."""
    # float32 as it prints; a float16 value exactly (0.42 in float32 would be another value)
    expected = 0.42 if value.dtype == np.float32 else float(value)
    for cls, name in [
        (optimizers.AdamW, "beta_1"),
        (optimizers.AdamW, "weight_decay"),
        (optimizers.Lion, "beta_1"),
        (optimizers.Lamb, "beta_1"),
        (optimizers.Adafactor, "clip_threshold"),
    ]:
        opt = cls(**{name: value})
        assert opt.get_config()[name] == expected, (cls.__name__, name)
        assert np.float32(getattr(opt, name)) == np.float32(value)
        setattr(opt, name, value)
        assert opt.get_config()[name] == expected


def test_a_var_names_entry_that_is_no_regular_expression_is_named():
    """It raised Python's re.error (neither a ValueError nor naming `var_names`)."""
    opt = AdamW(learning_rate=0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_names=["bias"])
    with pytest.raises(ValueError, match=r"`var_names` must hold regular expressions; 'bias\(' "):
        opt.exclude_from_weight_decay(var_names=["kernel", "bias("])
    bias, kernel = kopt.Variable([1.0], name="bias"), kopt.Variable([1.0], name="kernel")
    opt.apply_gradients([(jnp.zeros(1), bias), (jnp.zeros(1), kernel)])
    assert float(bias.numpy()[0]) == 1.0  # the exclusions set before are kept
    np.testing.assert_allclose(kernel.numpy(), [0.95], rtol=1e-6)


@pytest.mark.parametrize("value", ["0.9", None, [0.9]])
def test_an_ema_momentum_that_is_no_number_is_a_type_error(value):
    """A string got "must be in the range [0, 1]. Received: ema_momentum=0.9"."""
    with pytest.raises(TypeError, match=r"`ema_momentum` must be a number"):
        AdamW(use_ema=True, ema_momentum=value)
    opt = Lion(0.1, use_ema=True, ema_momentum=0.8)
    with pytest.raises(TypeError, match=r"`ema_momentum` must be a number"):
        opt.ema_momentum = value
    assert opt.ema_momentum == 0.8
