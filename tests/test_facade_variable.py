"""``kopt.Variable`` and ``kopt.constraints`` under the facade, against NumPy."""

import copy
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import kopt
from kopt import constraints, optimizers
from kopt import variables as variables_module


def test_numpy_on_the_left_is_differentiable_in_minimize():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = rng.normal(size=(5, 2)).astype(np.float32)
    w = kopt.Variable(np.ones((3, 2), np.float32))
    b = kopt.Variable(np.zeros(2, np.float32))
    optimizers.SGD(learning_rate=0.1).minimize(lambda: jnp.mean((x @ w + b - y) ** 2), [w, b])
    error = x.astype(np.float64) @ np.ones((3, 2)) - y
    np.testing.assert_allclose(w.numpy(), 1.0 - 0.1 * x.T @ error / 5.0, rtol=1e-5)
    np.testing.assert_allclose(b.numpy(), -0.1 * error.sum(0) / 5.0, rtol=1e-5, atol=1e-7)


def test_jnp_functions_on_variables_inside_the_loss():
    v = kopt.Variable([0.5, -0.25])
    optimizers.SGD(learning_rate=1.0).minimize(
        lambda: jnp.sum(jnp.tanh(v)) + jnp.dot(v, v) + jnp.max(2.0 * v), [v]
    )
    x = np.array([0.5, -0.25])
    grad = 1.0 - np.tanh(x) ** 2 + 2.0 * x + np.array([2.0, 0.0])
    np.testing.assert_allclose(v.numpy(), x - grad, rtol=1e-6)


def test_operators_and_numpy_conversion():
    v = kopt.Variable([1.0, -2.0, 4.0], name="v")
    x = np.array([2.0, 2.0, 2.0], np.float32)
    np.testing.assert_allclose(x * v, [2.0, -4.0, 8.0])
    np.testing.assert_allclose(x - v, [1.0, 4.0, -2.0])
    np.testing.assert_allclose(1.0 / v, [1.0, -0.5, 0.25])
    np.testing.assert_allclose(v**2, [1.0, 4.0, 16.0])
    np.testing.assert_allclose(-v, [-1.0, 2.0, -4.0])
    np.testing.assert_allclose(abs(v), [1.0, 2.0, 4.0])
    np.testing.assert_allclose(v[1:], [-2.0, 4.0])
    assert list(np.asarray(v > 0)) == [True, False, True]
    array = np.asarray(v)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    np.testing.assert_array_equal(array, [1.0, -2.0, 4.0])
    assert v.shape == (3,) and v.dtype == jnp.float32 and v.name == "v:0" and v.trainable


def test_assign_family():
    v = kopt.Variable([1.0, 2.0])
    assert v.assign([3.0, 4.0]) is v
    v.assign_add([1.0, 1.0])
    v.assign_sub(np.array([0.5, 0.5]))
    v.assign_add(kopt.Variable([1.0, 0.0]))
    np.testing.assert_array_equal(v.numpy(), [4.5, 4.5])
    assert v.dtype == jnp.float32
    with pytest.raises(ValueError, match="shape"):
        v.assign([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(v.numpy(), [4.5, 4.5])


def test_a_loss_that_assigns_a_variable_updates_it_once_per_gradient_computation():
    """A moving average the loss updates from the trained weights (a batch-norm statistic): the
    assignment takes effect with its concrete value, as tf.keras's under a tape does, and the
    loss sees the value it wrote; it was left holding a leaked tracer."""
    w = kopt.Variable([1.0, 3.0], name="w")
    moving = kopt.Variable(0.0, name="moving")
    calls = kopt.Variable(0, dtype=jnp.int32, name="calls")
    seen = []

    def loss():
        moving.assign(0.9 * moving + 0.1 * jnp.mean(w))
        calls.assign_add(1)
        seen.append(moving.value)  # the value just written (traced)
        return jnp.sum(w * w) + 0.0 * moving

    opt = optimizers.SGD(learning_rate=0.1)
    expected_w, expected_moving = np.array([1.0, 3.0]), 0.0
    for _ in range(3):
        opt.minimize(loss, [w])
        expected_moving = 0.9 * expected_moving + 0.1 * expected_w.mean()
        expected_w = expected_w - 0.1 * 2 * expected_w
        np.testing.assert_allclose(moving.numpy(), expected_moving, rtol=1e-6)
        np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-6)
    assert int(calls.numpy()) == 3 and len(seen) == 3
    assert opt.compile_count == 1

    def failing():
        moving.assign(moving + w[0])
        raise ArithmeticError("boom")

    before = moving.numpy()
    with pytest.raises(ArithmeticError):
        opt.compute_gradients(failing, [w])
    np.testing.assert_array_equal(moving.numpy(), before)  # nothing kept from a failed loss


def test_assigning_a_traced_value_to_a_variable_closed_over_in_jit_is_refused():
    v = kopt.Variable([1.0, 2.0], name="closed")

    @jax.jit
    def leak(x):
        v.assign(x)
        return x

    with pytest.raises(RuntimeError, match="closed:0: cannot store a traced value.*argument"):
        leak(jnp.zeros(2))
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])
    # Passed in as an argument, the variable is the function's own traced copy: that works.
    out = jax.jit(lambda var, x: var.assign(var + x))(v, jnp.ones(2))
    np.testing.assert_array_equal(np.asarray(out), [2.0, 3.0])
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])


def test_values_read_before_a_step_stay_valid():
    v = kopt.Variable([1.0, 2.0])
    opt = optimizers.Adam(learning_rate=0.1)
    opt.apply_gradients([(jnp.ones(2), v)])
    before, slot_before = v.value, opt.get_slot(v, "m").value
    snapshot, slot_snapshot = np.array(before), np.array(slot_before)
    opt.apply_gradients([(jnp.ones(2), v)])
    opt.apply_gradients([(v.value, v)])  # the variable's own value as its gradient
    np.testing.assert_array_equal(np.asarray(before), snapshot)
    np.testing.assert_array_equal(np.asarray(slot_before), slot_snapshot)
    assert not np.array_equal(v.numpy(), snapshot)


def _donate(array):
    """What a user's own jitted function with ``donate_argnums`` does to an array it is given."""
    jax.jit(lambda x: x * 2, donate_argnums=0)(array)
    assert array.is_deleted()


def _adam_after_one_step(p, g, lr=0.1, b1=0.9, b2=0.999, eps=1e-7):
    m, v = (1 - b1) * g, (1 - b2) * g * g
    lr_t = lr * np.sqrt(1 - b2) / (1 - b1)
    return p - lr_t * m / (np.sqrt(v) + eps), m, v


def test_a_variable_whose_value_was_donated_is_named_and_nothing_changes():
    # A copy of this shape compiled already: JAX then reports the deleted buffer with a
    # ValueError from the compiled copy ("Buffer has been deleted or donated"), not its
    # RuntimeError, and the step's message must name the variable all the same.
    jnp.array(jnp.ones(3, jnp.float32), copy=True)
    w = kopt.Variable(np.full(3, 1.0, np.float32), name="w")
    b = kopt.Variable(np.full(3, 2.0, np.float32), name="b")
    opt = optimizers.Adam(learning_rate=0.1)
    g = np.full(3, 0.5, np.float32)
    opt.apply_gradients([(g, w), (g, b)])
    expected_b, expected_m, _ = _adam_after_one_step(np.full(3, 2.0), 0.5)
    _donate(w.value)
    calls = {
        "apply_gradients": lambda: opt.apply_gradients([(g, w), (g, b)]),
        "minimize": lambda: opt.minimize(lambda: jnp.sum(w * b), [w, b]),
        "compute_gradients": lambda: opt.compute_gradients(lambda: jnp.sum(w * b), [w, b]),
    }
    for where, call in calls.items():
        with pytest.raises(RuntimeError, match=r"variable w:0 has been deleted.*donate_argnums"):
            call()
        assert int(opt.iterations) == 1, where
        np.testing.assert_allclose(b.numpy(), expected_b, rtol=1e-6)
        np.testing.assert_allclose(opt.get_slot(b, "m").numpy(), expected_m, rtol=1e-6)
    for read in (w.numpy, lambda: w.value, lambda: w + 1.0, lambda: w.assign_add(g)):
        with pytest.raises(RuntimeError, match=r"The value of variable w:0 has been deleted"):
            read()
    assert "value=<deleted>" in repr(w)
    # A new value makes it usable again; the optimizer goes on from its kept state.
    w.assign(np.full(3, 1.0, np.float32))
    opt.apply_gradients([(g, w), (g, b)])
    assert int(opt.iterations) == 2
    assert np.all(w.numpy() < 1.0)


def test_a_donated_slot_is_named():
    # Large enough for its slots to be variables of their own (not views of a shared buffer).
    w = kopt.Variable(np.ones(20000, np.float32), name="big")
    opt = optimizers.Adam(learning_rate=0.1)
    opt.apply_gradients([(np.ones(20000, np.float32), w)])
    before = w.numpy()
    _donate(opt.get_slot(w, "v").value)
    with pytest.raises(RuntimeError, match=r"variable Adam/big/v:0 has been deleted"):
        opt.apply_gradients([(np.ones(20000, np.float32), w)])
    np.testing.assert_array_equal(w.numpy(), before)
    assert int(opt.iterations) == 1


def test_values_read_between_steps_are_copied_in_one_call(backend_compiles):
    """A loop that reads every variable between steps (a logged loss) hands their buffers out,
    so the next step copies them before donating: in one compiled call for all of them, not
    one eager dispatch (and one compile per shape) each. Numbers against NumPy's SGD."""
    shapes = [(3, k) for k in range(1, 13)]  # distinct shapes: eager copies compile per shape
    start = [np.arange(np.prod(s), dtype=np.float32).reshape(s) / 7 for s in shapes]
    variables = [kopt.Variable(w) for w in start]
    grads = [jnp.ones(s) for s in shapes]
    opt = optimizers.SGD(learning_rate=0.5)
    opt.apply_gradients(zip(grads, variables, strict=True))
    read = [v.value for v in variables]  # handed out
    backend_compiles.clear()
    opt.apply_gradients(zip(grads, variables, strict=True))
    assert len(backend_compiles) <= 1, backend_compiles  # the batched copy
    for w, r, v in zip(start, read, variables, strict=True):
        np.testing.assert_allclose(np.asarray(r), w - 0.5)  # still valid
        np.testing.assert_allclose(v.numpy(), w - 1.0)
    [v.value for v in variables]
    backend_compiles.clear()
    opt.apply_gradients(zip(grads, variables, strict=True))
    assert backend_compiles == []
    for w, v in zip(start, variables, strict=True):
        np.testing.assert_allclose(v.numpy(), w - 1.5)


def test_variables_committed_to_different_devices_in_one_step_are_named():
    """One step is one compiled program, which takes arrays of one set of devices: variables
    committed to two devices are refused naming both (JAX's error named an argument of an
    internal function), and nothing changes; an optimizer per device works (numbers against
    Adam's first step)."""
    devices = jax.devices()[:2]
    w = kopt.Variable(jax.device_put(np.ones(3, np.float32), devices[0]), name="w")
    b = kopt.Variable(jax.device_put(np.ones(3, np.float32), devices[1]), name="b")
    g = np.full(3, 0.5, np.float32)
    opt = optimizers.Adam(learning_rate=0.1)
    calls = {
        "apply_gradients": lambda: opt.apply_gradients([(g, w), (g, b)]),
        "minimize": lambda: opt.minimize(lambda: jnp.sum(w * w) + jnp.sum(b * b), [w, b]),
    }
    for where, call in calls.items():
        with pytest.raises(
            ValueError,
            match=rf"{where}: variables w:0 \(device ids \[0\]\) and b:0 "
            r"\(device ids \[1\]\) are committed to different devices",
        ):
            call()
        assert int(opt.iterations) == 0 and len(opt.weights) <= 1  # no slots were kept
        np.testing.assert_array_equal(w.numpy(), np.ones(3))
        np.testing.assert_array_equal(b.numpy(), np.ones(3))
    # A gradient committed to another device than its variable's.
    elsewhere = jax.device_put(g, devices[1])
    with pytest.raises(
        ValueError,
        match=r"the gradient of w:0 is committed to device ids \[1\], its variable "
        r"to device ids \[0\]: move the gradient",
    ):
        opt.apply_gradients([(elsewhere, w)])
    assert int(opt.iterations) == 0 and len(opt.weights) <= 1
    np.testing.assert_array_equal(w.numpy(), np.ones(3))
    for v in (w, b):
        optimizers.Adam(learning_rate=0.1).apply_gradients([(g, v)])
        expected, _, _ = _adam_after_one_step(np.ones(3), 0.5)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)
        assert v.value.devices() == {devices[0] if v is w else devices[1]}


def test_values_read_between_steps_on_two_devices_are_copied_per_device():
    """Handed-out buffers committed to different devices are copied in one call per device,
    each staying on its own device."""
    devices = jax.devices()[:2]
    variables = [
        kopt.Variable(jax.device_put(jnp.full((2, k), float(k)), devices[k % 2]))
        for k in range(1, 9)
    ]
    opts = [optimizers.SGD(learning_rate=1.0) for _ in devices]
    mine = [[v for v in variables if v.value.devices() == {d}] for d in devices]
    for opt, vs in zip(opts, mine, strict=True):
        opt.apply_gradients([(jnp.ones(v.shape), v) for v in vs])
    read = [v.value for v in variables]
    with variables_module.donation_lock:
        copies = variables_module.donatable_values(variables)
    for r, c in zip(read, copies, strict=True):
        assert c.devices() == r.devices() and c.committed
        assert c.unsafe_buffer_pointer() != r.unsafe_buffer_pointer()
        np.testing.assert_array_equal(np.asarray(c), np.asarray(r))
    for opt, vs in zip(opts, mine, strict=True):
        opt.apply_gradients([(jnp.ones(v.shape), v) for v in vs])
    for k, (v, r) in enumerate(zip(variables, read, strict=True), start=1):
        np.testing.assert_array_equal(np.asarray(r), np.full((2, k), k - 1.0))
        np.testing.assert_array_equal(v.numpy(), np.full((2, k), k - 2.0))
        assert v.value.devices() == {devices[k % 2]}


def test_a_variable_of_an_array_copies_it_without_compiling_per_shape(backend_compiles):
    """The copy was an eager ``jnp.array(copy=True)``: a program per shape, for the model's
    variables and again for every slot the optimizer makes of its initial state."""
    device = jax.devices()[-1]
    values = [jax.device_put(np.full((i + 1, 3), float(i), np.float32)) for i in range(6)]
    values += [jax.device_put(np.ones(9, np.float32), device)]
    before = len(backend_compiles)
    variables = [kopt.Variable(x) for x in values]
    assert len(backend_compiles) == before
    for x, v in zip(values, variables, strict=True):
        assert (v.dtype, v.shape, v.value.committed) == (x.dtype, x.shape, x.committed)
        assert v.value.devices() == x.devices()
        x.delete()  # the variable holds a copy of its own
    np.testing.assert_array_equal(variables[2].numpy(), np.full((3, 3), 2.0))
    # A weakly typed value (its copy converts it) and a cast still come out strongly typed.
    weak = kopt.Variable(jnp.full((2,), 1.5))
    cast = kopt.Variable(jnp.ones(2, jnp.float32), dtype=jnp.bfloat16)
    assert not weak.value.weak_type and weak.dtype == jnp.float32
    assert cast.dtype == jnp.bfloat16 and not cast.value.weak_type


def test_a_variable_of_a_prng_key_array_holds_its_own_copy():
    """A typed key array has no ``weak_type``: making a variable of one raised an
    AttributeError."""
    key = jax.random.key(3)
    expected = np.asarray(jax.random.normal(key, (3,)))
    v = kopt.Variable(key)
    assert jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
    key.delete()  # the variable holds a copy of its own
    np.testing.assert_array_equal(np.asarray(jax.random.normal(v.value, (3,))), expected)


def max_norm(w, max_value, axis):
    norms = np.sqrt(np.sum(w**2, axis=axis, keepdims=True))
    return w * np.clip(norms, 0, max_value) / (1e-7 + norms)


def test_constraints_against_numpy():
    w = np.array([[3.0, -0.1], [4.0, 0.2], [-1.0, 0.0]])
    norms0 = np.sqrt(np.sum(w**2, axis=0, keepdims=True))
    norms1 = np.sqrt(np.sum(w**2, axis=1, keepdims=True))
    cases = [
        (constraints.NonNeg(), w * (w >= 0)),
        (constraints.MaxNorm(2.0), max_norm(w, 2.0, 0)),
        (constraints.MaxNorm(1.0, axis=1), max_norm(w, 1.0, 1)),
        (constraints.UnitNorm(), w / (1e-7 + norms0)),
        (constraints.UnitNorm(axis=1), w / (1e-7 + norms1)),
        (
            constraints.MinMaxNorm(0.5, 2.0, rate=0.5),
            w * (0.5 * np.clip(norms0, 0.5, 2.0) + 0.5 * norms0) / (1e-7 + norms0),
        ),
    ]
    for constraint, expected in cases:
        actual = constraint(jnp.asarray(w, jnp.float32))
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)
    assert isinstance(constraints.get("max_norm"), constraints.MaxNorm)
    config = {"class_name": "MinMaxNorm", "config": {"min_value": 1.0, "max_value": 3.0}}
    assert constraints.get(config).max_value == 3.0
    with pytest.raises(ValueError, match="nope"):
        constraints.get("nope")


def test_norm_constraints_of_float16_weights_compute_in_float32():
    """A zero or tiny float16 slice: float16's subnormal epsilon (flushed to zero) divided 0 by
    0, and float16 squares of 1e-5 underflow. The NumPy float64 result, rounded to float16."""
    w = np.array([[0.0, 3e-5], [0.0, -2e-5], [0.0, 1e-5]], np.float16)
    w64 = w.astype(np.float64)
    norms = np.sqrt(np.sum(w64**2, axis=0, keepdims=True))
    cases = [
        (constraints.UnitNorm(), w64 / (1e-7 + norms)),
        (constraints.MaxNorm(1.0), max_norm(w64, 1.0, 0)),
        (constraints.MinMaxNorm(1.0, 2.0, rate=1.0), w64 * 1.0 / (1e-7 + norms)),
    ]
    for constraint, expected in cases:
        actual = constraint(jnp.asarray(w))
        assert actual.dtype == jnp.float16
        np.testing.assert_allclose(
            np.asarray(actual, np.float64), expected.astype(np.float16), rtol=2e-3, atol=1e-7
        )


def test_constraint_runs_after_the_dense_update():
    w = kopt.Variable([[3.0], [4.0]], constraint=constraints.MaxNorm(1.0))
    optimizers.SGD(learning_rate=1.0).apply_gradients([(jnp.array([[-3.0], [-4.0]]), w)])
    np.testing.assert_allclose(w.numpy(), max_norm(np.array([[6.0], [8.0]]), 1.0, 0), rtol=1e-6)
    v = kopt.Variable([1.0, -1.0], constraint=lambda x: jnp.clip(x, -0.5, 0.5))
    optimizers.Adam(learning_rate=0.1).apply_gradients([(jnp.array([-1.0, 1.0]), v)])
    np.testing.assert_allclose(v.numpy(), [0.5, -0.5])


@pytest.mark.parametrize("custom", [False, True], ids=["builtin", "custom-hooks"])
def test_a_constraint_gets_an_array_and_must_keep_the_shape(custom):
    """It was given the kopt.Variable, which jax.lax functions refuse (API.md: "any callable
    array -> array"); one returning another shape changed the variable's shape silently."""

    class HookSGD(optimizers.Optimizer):
        def __init__(self, learning_rate=0.1, name="HookSGD"):
            super().__init__(name)
            self._set_hyper("learning_rate", learning_rate)

        def _resource_apply_dense(self, grad, var, apply_state=None):
            var.assign_sub(self._decayed_lr(var.dtype) * grad)

    make = HookSGD if custom else (lambda: optimizers.SGD(0.1))
    w = kopt.Variable([1.0, -1.0, 2.0], constraint=lambda x: jax.lax.clamp(0.0, x, 1.0))
    make().apply_gradients([(jnp.ones(3), w)])
    np.testing.assert_allclose(w.numpy(), [0.9, 0.0, 1.0], rtol=1e-6)
    a = kopt.Variable([[1.0, 2.0]], constraint=lambda x: x[:, :1], name="a")
    opt = make()
    with pytest.raises(ValueError, match=r"constraint of a:0 .*\(1, 1\).*\(1, 2\)"):
        opt.apply_gradients([(jnp.ones((1, 2)), a)])
    assert a.shape == (1, 2)
    np.testing.assert_array_equal(a.numpy(), [[1.0, 2.0]])
    assert int(opt.iterations.numpy()) == 0


def test_sparse_gradient_with_a_constraint_is_refused_and_changes_nothing():
    table = kopt.Variable(np.ones((4, 2), np.float32), constraint=constraints.NonNeg())
    opt = optimizers.Adam(learning_rate=0.1)
    opt.apply_gradients([(jnp.ones((4, 2)), table)])
    weights, values = opt.get_weights(), table.numpy()
    with pytest.raises(RuntimeError, match="constraint"):
        opt.apply_gradients([(kopt.IndexedSlices(jnp.ones((1, 2)), jnp.array([1])), table)])
    np.testing.assert_array_equal(table.numpy(), values)
    for before, after in zip(weights, opt.get_weights(), strict=True):
        np.testing.assert_array_equal(after, before)


def test_sharded_variable_and_its_slots_keep_their_sharding():
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    w = kopt.Variable(jax.device_put(jnp.arange(8.0).reshape(8, 1), sharding), name="w")
    opt = optimizers.Adam(learning_rate=0.1)
    for _ in range(2):
        opt.apply_gradients([(jnp.ones((8, 1)), w)])
    assert w.value.sharding == sharding
    for name in ("m", "v"):
        assert opt.get_slot(w, name).value.sharding == sharding
    w.assign(np.arange(8.0, dtype=np.float32).reshape(8, 1))
    assert w.value.sharding == sharding
    optimizers.SGD(learning_rate=0.5).apply_gradients([(jnp.ones((8, 1)), w)])
    np.testing.assert_allclose(w.numpy(), np.arange(8.0).reshape(8, 1) - 0.5)
    assert w.value.sharding == sharding


def test_assign_add_and_sub_take_values_placed_elsewhere_as_assign_does():
    """``assign`` places a value split otherwise, or on another device, as the variable is;
    ``assign_add`` and ``assign_sub`` failed on the same values (JAX's sharding or device
    errors), where tf.Variable's copy across devices."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    split = NamedSharding(mesh, PartitionSpec("d", None))
    v = kopt.Variable(jax.device_put(jnp.ones((8, 4)), split), name="v")
    other_split = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, PartitionSpec(None, "d")))
    other_device = jax.device_put(jnp.full((8, 4), 0.5), jax.devices()[3])
    scalar_elsewhere = jax.device_put(jnp.float32(0.25), jax.devices()[3])
    v.assign_add(other_split)
    v.assign_sub(other_device)
    v.assign_add(scalar_elsewhere)
    np.testing.assert_array_equal(v.numpy(), np.full((8, 4), 1.75))
    assert v.value.sharding == split
    single = kopt.Variable(jax.device_put(jnp.ones(3), jax.devices()[0]), name="single")
    single.assign_add(jax.device_put(jnp.ones(3), jax.devices()[2]))
    np.testing.assert_array_equal(single.numpy(), [2.0, 2.0, 2.0])
    assert single.value.devices() == {jax.devices()[0]}


def test_copies_and_pickles_are_independent_variables():
    v = kopt.Variable([1.0, 2.0], name="w")
    opt = optimizers.Adam(learning_rate=0.1)
    opt.apply_gradients([(jnp.ones(2), v)])
    for clone in (copy.copy(v), copy.deepcopy(v), pickle.loads(pickle.dumps(v))):
        assert clone.name == "w:0"
        np.testing.assert_array_equal(clone.numpy(), v.numpy())
        with pytest.raises(KeyError):  # not the original: it has no slots yet
            opt.get_slot(clone, "m")
        clone.assign([5.0, 5.0])
    assert not np.array_equal(v.numpy(), [5.0, 5.0])


@pytest.mark.parametrize(
    "copy_of",
    [copy.copy, copy.deepcopy, lambda v: pickle.loads(pickle.dumps(v))],
    ids=["copy", "deepcopy", "pickle"],
)
def test_a_copy_taken_before_a_step_keeps_the_value_it_was_taken_with(copy_of):
    """A shallow copy shares the buffer: the next step donated it, and the copy's value was
    deleted. The original's buffer is handed out with the copy, so the step copies it first."""
    v = kopt.Variable([1.0, 2.0], name="w")
    opt = optimizers.SGD(learning_rate=0.1)
    opt.apply_gradients([(jnp.ones(2), v)])
    before = v.numpy()
    snapshot = copy_of(v)
    opt.apply_gradients([(jnp.ones(2), v)])
    np.testing.assert_array_equal(snapshot.numpy(), before)
    np.testing.assert_allclose(v.numpy(), before - 0.1)
    opt.apply_gradients([(jnp.ones(2), v)])  # the copy keeps its value after later steps too
    np.testing.assert_array_equal(snapshot.numpy(), before)


def test_a_variables_state_for_a_copy_stays_valid_after_a_donating_step():
    """``copy.deepcopy`` and pickle read the buffer ``__getstate__`` gives after it returns:
    a step (in another thread) in between donated it ("Array has been deleted")."""
    v = kopt.Variable(np.arange(3.0, dtype=np.float32), name="w")
    opt = optimizers.SGD(learning_rate=1.0)
    opt.apply_gradients([(jnp.ones(3), v)])
    state = v.__getstate__()
    opt.apply_gradients([(jnp.ones(3), v)])
    np.testing.assert_array_equal(np.asarray(state["_storage"]), [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(v.numpy(), [-2.0, -1.0, 0.0])


def test_a_variable_of_a_numpy_array_is_a_transfer_without_compiling(backend_compiles):
    """``jnp.array`` of a NumPy array compiled a program per shape: one per variable of a model
    built from NumPy initial values. The values, dtypes (float64 rounded to float32 as
    ``jnp.array`` rounds it) and placement are the same, and the variable owns its buffer."""
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(k, 17)).astype(np.float32) for k in range(1, 5)]
    arrays += [rng.normal(size=(k, 19)) for k in range(1, 4)]  # float64
    arrays += [np.arange(k * 23, dtype=np.int32).reshape(k, 23) for k in range(1, 3)]
    backend_compiles.clear()
    variables = [kopt.Variable(a) for a in arrays]
    assert backend_compiles == []
    for a, v in zip(arrays, variables, strict=True):
        expected = jnp.array(a)  # what it was made with before
        assert v.dtype == expected.dtype and not v.value.weak_type
        assert v.value.committed == expected.committed
        np.testing.assert_array_equal(v.numpy(), np.asarray(expected))
        a[...] = 0  # the variable holds a copy of its own
        np.testing.assert_array_equal(v.numpy(), np.asarray(expected))
    cast = kopt.Variable(arrays[0], dtype=jnp.bfloat16)  # another cast: on the device, as before
    assert cast.dtype == jnp.bfloat16


def test_np_array_of_a_variable_is_a_writable_copy():
    """``np.array(v)`` gave NumPy's read-only view of the device buffer; a jax.Array or a
    tf.Variable gives a writable copy."""
    v = kopt.Variable(jnp.arange(4.0))
    a = np.array(v)
    a[0] = 99.0
    np.testing.assert_array_equal(v.numpy(), [0.0, 1.0, 2.0, 3.0])
    b = np.array(v, dtype=np.float64)
    b[1] = 5.0
    assert b.dtype == np.float64


@pytest.mark.parametrize("method", ["assign_add", "assign_sub"])
def test_assign_add_of_a_shape_that_does_not_fit_names_the_variable(method):
    """It raised JAX's broadcasting error, or named the broadcast shape (2, 2), not the one
    given; a scalar still broadcasts."""
    v = kopt.Variable([1.0, 2.0], name="v")
    for shape in [(3,), (2, 1)]:
        with pytest.raises(
            ValueError, match=f"v:0: cannot {method} a value of shape " + re.escape(str(shape))
        ):
            getattr(v, method)(jnp.ones(shape))
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])
    getattr(v, method)(1.0)
    np.testing.assert_array_equal(v.numpy(), [2.0, 3.0] if method == "assign_add" else [0.0, 1.0])


@pytest.mark.parametrize(
    "method, value",
    [
        ("assign", jnp.array([3 + 4j, 5 - 1j], jnp.complex64)),
        ("assign", 1 + 1j),
        ("assign_add", jnp.array([1j, 1j])),
        ("assign_sub", np.array([1j, 0j])),
    ],
)
def test_a_complex_value_for_a_real_variable_is_refused_naming_it(method, value):
    """Its imaginary part was dropped silently (tf.Variable refuses it)."""
    v = kopt.Variable([1.0, 2.0], name="v")
    with pytest.raises(TypeError, match="v:0: cannot assign a value of dtype complex"):
        getattr(v, method)(value)
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])
    c = kopt.Variable([1.0 + 0j], name="c")  # a complex variable takes it
    c.assign([1 + 2j])
    np.testing.assert_array_equal(c.numpy(), [1 + 2j])


@pytest.mark.parametrize(
    "initial_value, dtype, error, match",
    [
        ([1.5, 2.7], jnp.int32, TypeError, "n:0: cannot assign a value of dtype float64"),
        ([3.0], np.int8, TypeError, "n:0: cannot assign a value of dtype float64"),
        ([300], np.int8, ValueError, "n:0: the value 300 is out of the range of its dtype int8"),
        ([1 + 1j], jnp.float32, TypeError, "n:0: cannot assign a value of dtype complex128"),
        ([1.0], "nonesuch", TypeError, "`dtype` must be a dtype, received 'nonesuch'"),
    ],
)
def test_a_variable_refuses_an_initial_value_its_dtype_would_change(
    initial_value, dtype, error, match
):
    """`Variable([1.5, 2.7], dtype=jnp.int32)` truncated silently where `assign` of the same
    values raises; a bad dtype blamed `initial_value`."""
    with pytest.raises(error, match=re.escape(match)):
        kopt.Variable(initial_value, dtype=dtype, name="n")
    assert kopt.Variable([1, 2], dtype=jnp.int8).numpy().tolist() == [1, 2]
    assert kopt.Variable([1.0], dtype=jnp.bfloat16).dtype == jnp.bfloat16
