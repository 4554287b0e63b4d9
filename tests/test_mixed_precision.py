"""Mixed precision: bfloat16 models trained with float32 slots (functional ``slot_dtype`` and the
facade's ``slot_dtype``), loss scaling that skips non-finite steps, and ``kopt.apply_if_finite``.

References are NumPy re-derivations (tests/numpy_reference.py) with the params rounded to bfloat16
after every step, as a bfloat16 variable is.
"""

import functools
import re

import facade_zoo
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
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


@pytest.mark.parametrize(
    "tx, slot_dtype, var_dtype",
    [
        (kopt.adam(0.05, slot_dtype=jnp.float32), jnp.float32, jnp.bfloat16),
        (kopt.sgd(0.1, momentum=0.9, slot_dtype=jnp.float32), jnp.float32, jnp.bfloat16),
        (kopt.adam(0.05, slot_dtype=jnp.bfloat16), jnp.bfloat16, jnp.float32),
    ],
    ids=["adam-f32-slots", "sgd-f32-slots", "adam-bf16-slots"],
)
def test_from_transformation_keeps_the_transformations_slot_dtype(tx, slot_dtype, var_dtype):
    """The facade made the slots in the variable's dtype, as tf.keras's add_slot does, so a
    bfloat16 Adam with float32 slots never moved (the bf16 second moment)."""
    opt = optimizers.from_transformation(tx)
    var = kopt.Variable(jnp.zeros(4, var_dtype))
    params = jnp.zeros(4, var_dtype)
    state = tx.init(params)
    for _ in range(5):
        grad = jnp.asarray(numpy_gradient(np.asarray(params, np.float64), X, Y), var_dtype)
        opt.apply_gradients([(grad, var)])
        updates, state = tx.update(grad, state, params)
        params = kopt.apply_updates(params, updates)
    for name in opt.get_slot_names():
        assert opt.get_slot(var, name).dtype == slot_dtype, name
        np.testing.assert_allclose(
            opt.get_slot(var, name).numpy(), kopt.get_slot(state, name), rtol=1e-5, atol=1e-7
        )
    assert var.dtype == var_dtype
    np.testing.assert_allclose(var.numpy(), params, rtol=1e-2)
    if slot_dtype == jnp.float32:  # with bfloat16 slots, Adam cannot step (see the docs)
        assert np.all(np.asarray(var.numpy(), np.float32) != 0)


def assert_steps_compile_once_with_float32_slots(opt, grads, var_list, backend_compiles):
    """Four steps compile once, and every slot is float32, a variable-shaped one placed (and
    committed) as its variable is."""
    opt.apply_gradients(zip(grads, var_list, strict=True))
    first = len(backend_compiles)
    for _ in range(3):
        opt.apply_gradients(zip(grads, var_list, strict=True))
    assert len(backend_compiles) == first
    for var in var_list:
        for slot_name in opt.get_slot_names():
            slot = opt.get_slot(var, slot_name)
            assert slot.dtype == jnp.float32, (var.name, slot_name)
            if slot.shape == var.shape:
                assert slot.value.committed == var.value.committed, (var.name, slot_name)


@pytest.mark.parametrize("committed", [False, True], ids=["uncommitted", "on-a-device"])
@pytest.mark.parametrize("name", facade_zoo.NAMES)
def test_facade_slot_dtype_step_compiles_once(name, committed, backend_compiles):
    """Slots made in ``slot_dtype`` were committed to the device while uncommitted variables
    were not, so the step compiled again at the second and third steps (without tracing again).
    They are placed as slots of the variable's dtype are: committed only beside a committed
    variable."""
    place = functools.partial(jax.device_put, device=jax.devices()[-1])
    var_list = []
    for v in facade_zoo.make_variables():
        value = v.value.astype(jnp.bfloat16)
        var_list.append(kopt.Variable(place(value) if committed else value, name=v.name))
    grads = [jnp.asarray(g, jnp.bfloat16) for g in facade_zoo.gradients(1)[0]]
    opt = facade_zoo.make(name, slot_dtype=jnp.float32)
    assert_steps_compile_once_with_float32_slots(opt, grads, var_list, backend_compiles)


@pytest.mark.parametrize("committed", [False, True], ids=["uncommitted", "on-a-device"])
def test_from_transformation_slot_dtype_step_compiles_once(committed, backend_compiles):
    """A wrapped transformation's slots in their own dtype (kopt.adam(slot_dtype=...)) were
    committed to the device beside uncommitted variables, so the step compiled again at the
    second step."""
    place = functools.partial(jax.device_put, device=jax.devices()[-1])
    var_list = []
    for i in range(3):
        value = jnp.full((4, 4), 0.5 + i, jnp.bfloat16)
        var_list.append(kopt.Variable(place(value) if committed else value, name=f"w{i}"))
    grads = [jnp.full((4, 4), 0.25, jnp.bfloat16)] * 3
    opt = optimizers.from_transformation(kopt.adam(1e-3, slot_dtype=jnp.float32))
    assert_steps_compile_once_with_float32_slots(opt, grads, var_list, backend_compiles)
    assert opt.get_slot_names() == ["m", "v"]


def test_loss_scaled_minimize_with_slot_dtype_compiles_once(backend_compiles):
    """The documented recipe: LossScaleOptimizer over Adam(slot_dtype=float32) with float16
    variables compiled its step twice."""
    var = kopt.Variable(jnp.full((4, 4), 0.5, jnp.float16), name="w")
    opt = optimizers.LossScaleOptimizer(optimizers.Adam(1e-3, slot_dtype=jnp.float32))

    def loss():
        return jnp.sum(var.value.astype(jnp.float32) ** 2)

    opt.minimize(loss, [var])
    first = len(backend_compiles)
    for _ in range(3):
        opt.minimize(loss, [var])
    assert len(backend_compiles) == first


def test_slot_dtype_is_validated():
    with pytest.raises(TypeError, match="slot_dtype"):
        optimizers.Adam(slot_dtype=jnp.int32)
    with pytest.raises(TypeError, match="slot_dtype"):
        optimizers.Lion(slot_dtype="not a dtype")
    with pytest.raises(TypeError, match="slot_dtype"):
        optimizers.Adafactor(slot_dtype=jnp.int32)
    # Adafactor's factored statistics too (the API's "slot dtype is settable" for every one).
    var = kopt.Variable(jnp.ones((4, 3), jnp.bfloat16))
    opt = optimizers.Adafactor(slot_dtype=jnp.float32)
    opt.apply_gradients([(jnp.ones((4, 3), jnp.bfloat16), var)])
    assert {opt.get_slot(var, s).dtype for s in ("r", "c", "v")} == {jnp.dtype(jnp.float32)}
    assert var.dtype == jnp.bfloat16 and opt.get_config()["slot_dtype"] == "float32"
    assert "slot_dtype" not in optimizers.Adam().get_config()  # tf.keras's keys when unset


@pytest.mark.parametrize("on_cpu", [True, False])
def test_loss_scale_non_finite_step_changes_no_variable_and_lowers_the_scale(monkeypatch, on_cpu):
    """On the CPU the step keeps a skipped step's values with a conditional, elsewhere with a
    select per value; both are run here (the CPU's choice forced off for the second)."""
    from kopt.optimizers import base

    monkeypatch.setattr(base, "_on_cpu", lambda var_list: on_cpu)
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


@pytest.mark.parametrize("on_cpu", [True, False])
def test_loss_scale_checks_small_gradients_packed_and_any_non_finite_one_skips(monkeypatch, on_cpu):
    """The guard reduced every gradient on its own, and its step compiled about twice as long as
    the inner optimizer's: the small gradients of one dtype are checked as one concatenation now
    (a large one apart). A NaN or infinity in any of them still skips the step."""
    from kopt.optimizers import base
    from kopt.optimizers._slot_groups import MAX_GROUPED_SIZE

    monkeypatch.setattr(base, "_on_cpu", lambda var_list: on_cpu)
    leaves, real = [], base.all_finite
    monkeypatch.setattr(
        base, "all_finite", lambda tree: leaves.append(len(jax.tree.leaves(tree))) or real(tree)
    )
    variables = [kopt.Variable(np.ones((i % 3 + 1, i + 1), np.float32)) for i in range(40)]
    variables += [kopt.Variable(np.ones(3, np.float16)), kopt.Variable(np.ones(2, np.float16))]
    variables += [kopt.Variable(np.ones(MAX_GROUPED_SIZE + 1, np.float32))]
    opt = optimizers.LossScaleOptimizer(
        optimizers.SGD(0.5), initial_scale=8.0, dynamic_growth_steps=100
    )

    def grads(bad=None, value=np.nan):
        values = [np.full(v.shape, 0.25, v.dtype) for v in variables]
        if bad is not None:
            values[bad].flat[-1] = value
        return [(jax.device_put(g), v) for g, v in zip(values, variables, strict=True)]

    opt.apply_gradients(grads())  # finite: 1 - 0.5 * 0.25 everywhere
    assert leaves == [3]  # small float32, small float16, the large one
    for bad, value in [(17, np.nan), (41, np.inf), (42, -np.inf)]:
        opt.apply_gradients(grads(bad, value))
    for v in variables:
        np.testing.assert_array_equal(v.numpy(), 0.875)
    assert float(opt.loss_scale.numpy()) == 1.0  # 8, halved on each of the three
    assert int(opt.iterations.numpy()) == 1 and opt.inner_optimizer.compile_count == 1


@pytest.mark.parametrize("inner", [optimizers.Adam, optimizers.RMSprop])
def test_loss_scale_step_updates_variables_and_slots_in_place(monkeypatch, inner):
    """The step keeps every value as it came when a gradient is not finite. Selecting each new
    value against its old one made XLA copy every variable-sized slot so that the old value
    stayed readable (about 4x the time of the plain step at 10M params on the CPU); the step
    is a conditional now, and its compiled program copies no variable-sized array."""
    from kopt.optimizers import base

    programs = []
    compile_step = base.Optimizer._compile

    def recording(self, *args, **kwargs):
        program = compile_step(self, *args, **kwargs)

        def call(*call_args):
            programs.append((program, jax.tree.map(jax.typeof, call_args)))
            return program(*call_args)

        return call

    monkeypatch.setattr(base.Optimizer, "_compile", recording)
    size = 3 * 4096 + 7  # a loose slot: over the grouped size
    variables = [kopt.Variable(np.ones(size, np.float32)), kopt.Variable(np.ones(5, np.float32))]
    opt = optimizers.LossScaleOptimizer(inner(0.1), initial_scale=4.0, dynamic_growth_steps=2)
    for value in (0.5, np.nan, 0.5):
        grads = [jnp.full(v.shape, value, jnp.float32) for v in variables]
        opt.apply_gradients(zip(grads, variables, strict=True))
    assert int(opt.iterations.numpy()) == 2 and opt.inner_optimizer.compile_count == 1
    program, types = programs[0]
    text = program.lower(*types).compile().as_text()
    assert f"f32[{size}]" in text
    assert not re.search(rf"f32\[{size}\]\{{0\}} copy\(", text), text


def test_loss_scale_unscales_float16_gradients_past_its_range_and_keeps_dtypes():
    """A float16 gradient is multiplied by ``1 / scale`` taken in float32 (the scale ``2**16``
    itself is infinite in float16), as tf.keras does; a float16 loss stays float16 when scaled,
    and an IndexedSlices keeps its indices with its rows scaled."""
    opt = optimizers.LossScaleOptimizer(optimizers.SGD(1.0), initial_scale=2.0**16)
    (g,) = opt.get_unscaled_gradients([jnp.array([1000.0], jnp.float16)])
    assert g.dtype == jnp.float16
    np.testing.assert_allclose(np.float32(g[0]), 1000.0 / 2**16, rtol=1e-3)
    assert opt.get_scaled_loss(jnp.float16(2.0)).dtype == jnp.float16
    assert opt.get_scaled_loss(lambda: jnp.asarray(2.0, jnp.bfloat16))().dtype == jnp.bfloat16
    rows = kopt.IndexedSlices(jnp.full((2, 3), 2.0**16), jnp.array([0, 2]), (4, 3))
    (sparse,) = opt.get_unscaled_gradients([rows])
    assert isinstance(sparse, kopt.IndexedSlices)
    np.testing.assert_array_equal(sparse.indices, [0, 2])
    np.testing.assert_allclose(sparse.values, np.ones((2, 3)))

    var = kopt.Variable(jnp.array([1.0, 2.0], jnp.float16))
    # A float32 loss of float16 variables: the scaled gradient is 2**-8 * 2**16 = 256 per
    # element, in float16, unscaled at 2**16.
    opt.minimize(lambda: jnp.sum(var.value.astype(jnp.float32) * 2.0**-8), [var])
    np.testing.assert_allclose(np.float32(var.numpy()), [1.0 - 2.0**-8, 2.0 - 2.0**-8])


@pytest.mark.parametrize(
    ("scale", "expected"),
    [
        (2.0**24, 1000 * 2.0**-24),  # a power of two: exact
        (1e5, 0.010009765625),  # 1 / scale rounded to a multiple of 2**-24: 0.1% too large
        (1.5 * 2.0**24, 1000 * 2.0**-24),  # 1 / scale rounded up to 2**-24: 1.5 times too large
        (2.0**25, 0.0),  # 1 / scale rounds to 0
        (2.0**26, 0.0),
    ],
)
def test_loss_scale_unscales_float16_gradients_by_a_float16_reciprocal_as_tf_keras(scale, expected):
    """The float32 reciprocal is cast to float16, a subnormal above a scale of 2**14 and 0 from
    2**25 on (docs/mixed-precision.md); the expected values are tf.keras's (its legacy and new
    LossScaleOptimizer alike)."""
    opt = optimizers.LossScaleOptimizer(optimizers.SGD(1.0), dynamic=False, initial_scale=scale)
    (g,) = opt.get_unscaled_gradients([jnp.array([1000.0], jnp.float16)])
    assert g.dtype == jnp.float16
    assert float(g[0]) == expected


def test_loss_scale_never_grows_past_float32():
    opt = optimizers.LossScaleOptimizer(
        optimizers.SGD(0.1), initial_scale=2.0**127, dynamic_growth_steps=1
    )
    var = kopt.Variable([1.0])
    for _ in range(3):
        opt.apply_gradients([(jnp.array([1.0]), var)])
    assert float(opt.loss_scale.numpy()) == 2.0**127  # tf.keras grows only to a finite scale
    np.testing.assert_allclose(var.numpy(), [0.7], rtol=1e-6)  # no step was skipped


@pytest.mark.parametrize(
    "make",
    [
        lambda: optimizers.LossScaleOptimizer(
            optimizers.Adam(0.1, clipnorm=1.0), initial_scale=4.0, dynamic_growth_steps=2
        ),
        lambda: optimizers.LossScaleOptimizer(optimizers.SGD(0.1, momentum=0.9), initial_scale=1.0),
        lambda: optimizers.LossScaleOptimizer(
            optimizers.RMSprop(0.01, centered=True), dynamic=False, initial_scale=8.0
        ),
    ],
    ids=["adam-growing", "sgd-at-one", "rmsprop-fixed"],
)
def test_loss_scale_as_transformation_skips_and_scales_as_the_facade(make):
    """The pure twin skips the steps the facade skips (zero updates, its inner count kept) and
    moves the scale in its state as the facade moves `loss_scale`: halved (not below 1) after a
    non-finite step, doubled after `dynamic_growth_steps` finite ones."""
    opt, twin = make(), make()
    tx = jax.jit(twin.as_transformation().update)
    var = kopt.Variable([1.0, -2.0, 0.5])
    params = jnp.asarray([1.0, -2.0, 0.5])
    state = twin.as_transformation().init(params)
    assert float(state.loss_scale) == float(opt.loss_scale.numpy())
    grads = [[0.5, 1.0, -1.0], [jnp.inf, 0.0, 1.0], [0.25, -0.5, 2.0], [1.0, 1.0, 1.0]]
    grads += [[jnp.nan, 1.0, 1.0], [-1.0, 0.5, 0.25], [0.1, 0.2, 0.3], [2.0, -2.0, 1.0]]
    for i, g in enumerate(grads):
        g = jnp.asarray(g, jnp.float32)
        opt.apply_gradients([(g, var)])
        updates, state = tx(g, state, params)
        params = kopt.apply_updates(params, updates)
        np.testing.assert_allclose(params, var.numpy(), rtol=1e-6, err_msg=f"step {i}")
        assert float(state.loss_scale) == float(opt.loss_scale.numpy()), i
        counter = opt.dynamic_counter
        assert int(state.good_steps) == (0 if counter is None else int(counter.numpy())), i
    assert np.all(np.isfinite(params))
    # Two steps skipped: every piece of the inner transformation counted the six others only.
    counts = optax.tree_utils.tree_get_all_with_path(state.inner_state.inner_state, "count")
    assert counts and {int(c) for _, c in counts} == {6} == {int(opt.iterations.numpy())}


def test_the_inner_optimizer_called_directly_applies_what_it_is_given():
    """The wrapper's non-finite check belongs to the wrapper's calls only (tf.keras)."""
    inner = optimizers.SGD(0.1)
    opt = optimizers.LossScaleOptimizer(inner)
    var = kopt.Variable([1.0])
    opt.apply_gradients([(jnp.array([jnp.nan]), var)])  # skipped by the wrapper
    np.testing.assert_array_equal(var.numpy(), [1.0])
    inner.apply_gradients([(jnp.array([2.0]), var)])
    inner.apply_gradients([(jnp.array([jnp.nan]), var)])  # applied: the inner has no guard
    assert np.isnan(var.numpy()[0])
    assert float(opt.loss_scale.numpy()) == 2.0**14  # halved once, by the wrapper's step only
    assert int(inner.iterations.numpy()) == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dynamic": "dynamic"}, TypeError, "`dynamic` must be a bool"),
        ({"dynamic": 128}, TypeError, "`dynamic` must be a bool"),
        ({"initial_scale": float("nan")}, ValueError, "`initial_scale` must be finite and > 0"),
        ({"initial_scale": float("inf")}, ValueError, "`initial_scale` must be finite and > 0"),
        ({"initial_scale": 0.0}, ValueError, "`initial_scale` must be finite and > 0"),
        ({"initial_scale": "big"}, TypeError, "`initial_scale` must be a number"),
        # A numeric string was taken as 8.0.
        ({"initial_scale": "8"}, TypeError, "`initial_scale` must be a number, received '8'"),
        (
            {"dynamic": False, "initial_scale": "8"},
            TypeError,
            "`initial_scale` must be a number, received '8'",
        ),
    ],
)
def test_loss_scale_arguments_are_checked(kwargs, error, match):
    inner = optimizers.SGD(0.1)
    with pytest.raises(error, match=match):
        optimizers.LossScaleOptimizer(inner, **kwargs)
    optimizers.LossScaleOptimizer(inner)  # the refused call did not claim the inner optimizer


def test_loss_scale_takes_numpy_and_array_scales_and_wraps_an_optimizer_once():
    for scale in (np.float32(4.0), jnp.asarray(4.0), 4):
        opt = optimizers.LossScaleOptimizer(optimizers.SGD(0.1), initial_scale=scale)
        assert float(opt.loss_scale.numpy()) == 4.0
    inner = optimizers.SGD(0.1)
    optimizers.LossScaleOptimizer(inner)
    with pytest.raises(ValueError, match="already wrapped by a LossScaleOptimizer"):
        optimizers.LossScaleOptimizer(inner)


def test_loss_scale_clipping_is_the_inner_optimizers():
    """tf.keras's LossScaleOptimizer reads and sets ``clipnorm``, ``clipvalue`` and
    ``global_clipnorm`` on its inner optimizer. Observed in tf_keras 2.21: ``LossScaleOptimizer(
    SGD(1.0, clipnorm=1.0)).clipnorm`` is 1.0, and after ``lso.clipvalue = 0.5`` a step with the
    gradient [3, -3] moves the variable from [0, 0] to [-0.5, 0.5]."""
    inner = optimizers.SGD(1.0, clipnorm=1.0)
    opt = optimizers.LossScaleOptimizer(inner)
    assert (opt.clipnorm, opt.clipvalue, opt.global_clipnorm) == (1.0, None, None)
    opt.clipnorm = None
    opt.clipvalue = 0.5
    opt.global_clipnorm = 2.0
    assert (inner.clipnorm, inner.clipvalue, inner.global_clipnorm) == (None, 0.5, 2.0)
    config = opt.get_config()["inner_optimizer"]["config"]
    assert (config["clipvalue"], config["global_clipnorm"]) == (0.5, 2.0)
    var = kopt.Variable([0.0, 0.0])
    opt.apply_gradients([(jnp.array([3.0, -3.0]), var)])
    np.testing.assert_array_equal(var.numpy(), [-0.5, 0.5])

    # The inner optimizer's checks apply; a refused value changes nothing (tf.keras raises this
    # ValueError for a clip set beside `gradient_transformers`).
    with pytest.raises(ValueError, match="`clipvalue` cannot be set when `gradient_transformers`"):
        optimizers.LossScaleOptimizer(
            optimizers.SGD(gradient_transformers=[lambda gv: gv])
        ).clipvalue = 0.5
    with pytest.raises(ValueError, match="clipnorm"):
        opt.clipnorm = -1.0
    assert (inner.clipnorm, inner.clipvalue, inner.global_clipnorm) == (None, 0.5, 2.0)


def test_loss_scale_delegates_add_slot_iterations_and_has_a_dynamic_counter():
    """As tf.keras (tf_keras 2.21): ``lso.add_slot`` makes the slot on the inner optimizer,
    ``lso.iterations = v`` sets the inner one's (a RuntimeError once it exists), and
    ``dynamic_counter`` is the count of finite steps (None for a fixed scale)."""
    inner = optimizers.SGD(0.1)
    opt = optimizers.LossScaleOptimizer(inner, dynamic_growth_steps=3)
    var = kopt.Variable([1.0, 2.0])
    slot = opt.add_slot(var, "x", "ones")
    assert inner.get_slot(var, "x") is slot and opt.get_slot(var, "x") is slot
    assert opt.get_slot_names() == ["x"]
    np.testing.assert_array_equal(slot.numpy(), [1.0, 1.0])
    steps = kopt.Variable(np.int32(7))
    opt.iterations = steps
    assert inner.iterations is steps
    with pytest.raises(RuntimeError, match="Cannot set `iterations`"):
        opt.iterations = kopt.Variable(np.int32(3))
    assert inner.iterations is steps
    opt.apply_gradients([(jnp.array([1.0, 1.0]), var)])
    assert int(opt.dynamic_counter.numpy()) == 1
    assert (
        optimizers.LossScaleOptimizer(
            optimizers.SGD(), dynamic=False, initial_scale=4.0
        ).dynamic_counter
        is None
    )


def test_loss_scale_decides_finiteness_after_the_gradient_aggregator():
    """tf.keras's wrapper aggregates first, then checks. Observed in tf_keras 2.21: with an
    aggregator that zeroes NaNs, SGD(0.5) on [1, 2] with the gradient [nan, 1] is applied, giving
    [1, 1.5], the scale stays 32768 and iterations is 1."""

    def zero_non_finite(grads_and_vars):
        return [(jnp.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), v) for g, v in grads_and_vars]

    opt = optimizers.LossScaleOptimizer(optimizers.SGD(0.5, gradient_aggregator=zero_non_finite))
    var = kopt.Variable([1.0, 2.0])
    opt.apply_gradients([(jnp.array([jnp.nan, 1.0]), var)])
    np.testing.assert_array_equal(var.numpy(), [1.0, 1.5])
    assert float(opt.loss_scale.numpy()) == 32768.0
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


def test_unscaling_a_sparse_gradient_of_a_new_row_count_does_not_recompile_the_dense_ones():
    """The dense gradients are unscaled in one compiled call; an IndexedSlices, whose row count
    changes from batch to batch, is scaled on its own and comes back with its own rows."""
    from kopt.optimizers.loss_scale import _unscaled

    opt = optimizers.LossScaleOptimizer(optimizers.SGD(0.1), initial_scale=4.0)
    dense = [np.full(3, 4.0, np.float32), None]
    for n in range(2, 7):
        rows = kopt.IndexedSlices(np.full((n, 2), 8.0, np.float32), np.arange(n), (8, 2))
        unscaled = opt.get_unscaled_gradients(dense + [rows])
        if n == 2:
            compiled = _unscaled._cache_size()
        np.testing.assert_array_equal(unscaled[0], 1.0)
        assert unscaled[1] is None
        np.testing.assert_array_equal(unscaled[2].values, np.full((n, 2), 2.0))
        np.testing.assert_array_equal(unscaled[2].indices, np.arange(n))
        assert unscaled[2].dense_shape == (8, 2)
    assert _unscaled._cache_size() == compiled


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_unscaling_gradients_that_live_on_different_devices():
    d0, d1 = jax.devices()[:2]
    opt = optimizers.LossScaleOptimizer(optimizers.SGD(0.1), initial_scale=4.0)
    grads = [jax.device_put(jnp.full(3, 4.0), d0), None, jax.device_put(jnp.full(3, 8.0), d1)]
    unscaled = opt.get_unscaled_gradients(grads)
    np.testing.assert_array_equal(unscaled[0], 1.0)
    assert unscaled[1] is None
    np.testing.assert_array_equal(unscaled[2], 2.0)
    assert list(unscaled[2].devices()) == [d1]


def test_loss_scale_set_weights_saturates_the_count_and_refuses_a_bad_scale():
    """A step count past int32 (a long tf.keras run's) was refused by the wrapper where its
    inner optimizer saturates it; a NaN, zero or negative loss scale was taken, and every
    later step was skipped without a word."""
    var = kopt.Variable([1.0, 2.0])
    opt = optimizers.LossScaleOptimizer(optimizers.Adam(0.1))
    opt.apply_gradients([(jnp.ones(2), var)])
    weights = opt.get_weights()
    weights[0] = np.int64(2**31 + 5)
    opt.set_weights(weights)
    assert int(opt.iterations.numpy()) == 2**31 - 1
    for bad in (float("nan"), 0.0, -4.0, float("inf")):
        weights = opt.get_weights()
        weights[-2] = np.float32(bad)
        with pytest.raises(ValueError, match="loss scale .*current_loss_scale"):
            opt.set_weights(weights)
    assert float(opt.loss_scale.numpy()) == 2.0**15


def test_loss_scale_counts_the_programs_its_steps_compile():
    """``compile_count`` of the wrapper is the inner optimizer's, which compiles its steps:
    skipped steps, a moved scale and a changed learning rate reuse the one program."""
    inner = optimizers.Adam(0.1)
    opt = optimizers.LossScaleOptimizer(inner)
    var = kopt.Variable([1.0, 2.0])
    for grad in ([1.0, 2.0], [np.inf, 1.0], [0.5, 0.5]):
        opt.apply_gradients([(jnp.asarray(grad), var)])
    opt.learning_rate = 0.3
    opt.minimize(lambda: jnp.sum(var.value**2), [var])
    assert float(opt.loss_scale.numpy()) == 2.0**14  # the skipped step moved it
    assert opt.compile_count == inner.compile_count == 1
    opt.compile_count = 0  # reset through the wrapper, as a test between phases would
    assert inner.compile_count == 0
    opt.apply_gradients([(jnp.ones(1), kopt.Variable([1.0]))])  # a new structure compiles
    assert opt.compile_count == 1
