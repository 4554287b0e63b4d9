"""A repeated apply_gradients reuses its cached step key; everything the key stands for still
takes effect when it changes between calls."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from facade_zoo import NormTracker
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kopt
from kopt import optimizers


def test_gradient_transformers_and_clipping_changed_between_calls_take_effect():
    v = kopt.Variable(jnp.zeros(2))
    opt = optimizers.SGD(learning_rate=1.0)
    g = jnp.array([3.0, 4.0])
    opt.apply_gradients([(g, v)])
    np.testing.assert_allclose(v.numpy(), [-3.0, -4.0])
    opt.gradient_transformers = [lambda gv: [(grad * 0.5, var) for grad, var in gv]]
    opt.apply_gradients([(g, v)])
    np.testing.assert_allclose(v.numpy(), [-4.5, -6.0])
    opt.gradient_transformers = []
    opt.clipnorm = 1.0
    opt.apply_gradients([(g, v)])
    np.testing.assert_allclose(v.numpy(), [-5.1, -6.8], rtol=1e-6)


def test_a_hyperparameter_turned_into_a_schedule_and_back_takes_effect():
    v = kopt.Variable(jnp.zeros(1))
    opt = optimizers.SGD(learning_rate=0.1)
    g = jnp.ones(1)
    opt.apply_gradients([(g, v)])
    opt.learning_rate = lambda: 1.0
    opt.apply_gradients([(g, v)])
    opt.learning_rate = kopt.Variable(jnp.asarray(10.0))
    opt.apply_gradients([(g, v)])
    np.testing.assert_allclose(v.numpy(), [-11.1], rtol=1e-6)


class ScaledSGD(optimizers.Optimizer):
    """A custom optimizer, written the tf.keras way, that reads plain attributes in its hooks."""

    def __init__(self, learning_rate=0.1, scale=1.0, use_momentum=False, name="ScaledSGD"):
        super().__init__(name)
        self._set_hyper("learning_rate", learning_rate)
        self.scale = scale
        self.use_momentum = use_momentum

    def _create_slots(self, var_list):
        if self.use_momentum:
            for var in var_list:
                self.add_slot(var, "momentum")

    def _resource_apply_dense(self, grad, var, apply_state=None):
        lr = self._get_hyper("learning_rate", var.dtype)
        if self.use_momentum:
            m = self.get_slot(var, "momentum")
            m.assign(0.5 * m + grad)
            grad = m.value
        var.assign_sub(lr * self.scale * grad)


def test_a_custom_optimizers_plain_attributes_set_between_calls_take_effect():
    """tf.keras run eagerly reads ``self.scale`` at every call; the compiled step is kept per
    the attributes' values, so a change takes effect and a value seen before reuses its step."""
    opt = ScaledSGD()
    var = kopt.Variable(np.ones(2, np.float32))
    g = jnp.ones(2)
    expected, m = 1.0, 0.0
    for scale, use_momentum in [(1.0, False), (2.0, False), (1.0, False), (1.0, True), (1.0, True)]:
        opt.scale, opt.use_momentum = scale, use_momentum
        opt.apply_gradients([(g, var)])
        if use_momentum:
            m = 0.5 * m + 1.0
            expected -= 0.1 * scale * m
        else:
            expected -= 0.1 * scale
        np.testing.assert_allclose(var.numpy(), [expected] * 2, rtol=1e-6)
    assert opt.get_slot_names() == ["momentum"]
    assert opt.compile_count == 3  # scale 1, scale 2, momentum; scale 1 again reuses the first


class ExcludingSGD(optimizers.Optimizer):
    """Decoupled weight decay except for variables named in a list attribute, with the decay and
    its per-name factors in a tuple and a dict (containers of plain values)."""

    def __init__(self, exclude=(), rates=(0.5, 1.0), factors=None, name="ExcludingSGD"):
        super().__init__(name)
        self._set_hyper("learning_rate", 0.1)
        self.exclude_from_weight_decay = list(exclude)
        self.rates = rates
        self.factors = factors or {}

    def _resource_apply_dense(self, grad, var, apply_state=None):
        base = var.name.split(":")[0]
        if base not in self.exclude_from_weight_decay:
            var.assign_sub(var * self.rates[0] * self.rates[1] * self.factors.get(base, 1.0))
        var.assign_sub(self._get_hyper("learning_rate", var.dtype) * grad)


def test_list_tuple_and_dict_attributes_changed_between_calls_take_effect():
    """Reassigned or changed in place, as tf.keras run eagerly reads them at every call; equal
    contents reuse the step compiled for them."""
    opt = ExcludingSGD(exclude=["b"])
    w, b = (
        kopt.Variable(np.ones(2, np.float32), name="w"),
        kopt.Variable(np.ones(2, np.float32), name="b"),
    )
    expected = {"w": 1.0, "b": 1.0}

    def step(exclude, decay, factors):
        opt.apply_gradients([(jnp.zeros(2), w), (jnp.zeros(2), b)])
        for name in expected:
            if name not in exclude:
                expected[name] *= 1 - decay[0] * decay[1] * factors.get(name, 1.0)
        np.testing.assert_allclose(w.numpy(), [expected["w"]] * 2, rtol=1e-6)
        np.testing.assert_allclose(b.numpy(), [expected["b"]] * 2, rtol=1e-6)

    step(["b"], (0.5, 1.0), {})
    opt.exclude_from_weight_decay = ["w"]  # reassigned
    step(["w"], (0.5, 1.0), {})
    opt.exclude_from_weight_decay.append("b")  # changed in place
    step(["w", "b"], (0.5, 1.0), {})
    opt.exclude_from_weight_decay = []
    opt.rates = (0.5, 0.2)
    opt.factors = {"b": 2.0}
    step([], (0.5, 0.2), {"b": 2.0})
    opt.factors["b"] = 3.0
    step([], (0.5, 0.2), {"b": 3.0})
    opt.exclude_from_weight_decay = ["b"]
    opt.rates, opt.factors = (0.5, 1.0), {}
    step(["b"], (0.5, 1.0), {})  # the first step's values: its program again
    assert opt.compile_count == 5


def test_a_nan_attribute_and_a_large_list_attribute_keep_one_program():
    """NaN equals itself in the step's key (a NumPy NaN is a new float at every read), and a
    large list is hashed into the key once, not at every call; reassigning it still counts."""
    opt = ExcludingSGD(exclude=[f"x{i}" for i in range(1000)])
    opt.threshold = np.float32("nan")
    w, b = (
        kopt.Variable(np.ones(2, np.float32), name="w"),
        kopt.Variable(np.ones(2, np.float32), name="b"),
    )
    for _ in range(3):
        opt.apply_gradients([(jnp.zeros(2), w), (jnp.zeros(2), b)])
    assert opt.compile_count == 1
    np.testing.assert_allclose(w.numpy(), 0.5**3)
    opt.exclude_from_weight_decay = [f"x{i}" for i in range(1000)] + ["w"]
    opt.apply_gradients([(jnp.zeros(2), w), (jnp.zeros(2), b)])
    np.testing.assert_allclose(w.numpy(), 0.5**3)  # now excluded
    np.testing.assert_allclose(b.numpy(), 0.5**4)
    assert opt.compile_count == 2


class TraceCountingSGD(ScaledSGD):
    def _resource_apply_dense(self, grad, var, apply_state=None):
        self.traces = getattr(self, "traces", 0) + 1  # written while traced: not a step input
        super()._resource_apply_dense(grad, var, apply_state)


def test_an_attribute_the_hooks_write_while_traced_does_not_recompile_the_step():
    opt = TraceCountingSGD()
    var = kopt.Variable(np.ones(2, np.float32))
    for _ in range(4):
        opt.apply_gradients([(jnp.ones(2), var)])
    np.testing.assert_allclose(var.numpy(), [0.6, 0.6], rtol=1e-6)
    assert opt.compile_count == 1
    assert opt.traces == 1


class SlotCountingSGD(ScaledSGD):
    def _create_slots(self, var_list):
        self.create_slots_calls = getattr(self, "create_slots_calls", 0) + 1
        super()._create_slots(var_list)


def test_an_attribute_set_again_to_its_value_keeps_the_cached_step():
    """A loop that assigns the same value before every step (``opt.scale = config.scale``)
    keeps the cached step key: no new weights are looked for, nothing recompiles."""
    opt = SlotCountingSGD()
    var = kopt.Variable(np.ones(2, np.float32))
    for _ in range(5):
        opt.scale = 1.0
        opt.apply_gradients([(jnp.ones(2), var)])
    np.testing.assert_allclose(var.numpy(), [0.5, 0.5], rtol=1e-6)
    assert opt.compile_count == 1
    assert opt.create_slots_calls == 1


def test_new_variables_and_slots_between_calls_are_stepped_with_their_own_slots():
    a, b = kopt.Variable(jnp.zeros(2)), kopt.Variable(jnp.zeros(3))
    opt = optimizers.SGD(learning_rate=1.0, momentum=0.5)
    opt.apply_gradients([(jnp.ones(2), a)])
    opt.apply_gradients([(jnp.ones(2), a)])
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(3), b)])
    # a's momentum: -1, -1.5, -1.75; b's first step: -1
    np.testing.assert_allclose(a.numpy(), [-4.25] * 2)
    np.testing.assert_allclose(b.numpy(), [-1.0] * 3)
    np.testing.assert_allclose(opt.get_slot(b, "momentum").numpy(), [-1.0] * 3)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
def test_sharded_variables_keep_their_sharding_over_cached_steps():
    mesh = jax.make_mesh((4,), ("x",))
    sharding = NamedSharding(mesh, P("x", None))
    v = kopt.Variable(jax.device_put(jnp.zeros((8, 2)), sharding))
    w = kopt.Variable(jnp.zeros(3))
    opt = optimizers.Adam(learning_rate=0.1)
    grads = [(jax.device_put(jnp.ones((8, 2)), sharding), v), (jnp.ones(3), w)]
    for _ in range(3):
        opt.apply_gradients(grads)
    assert opt.compile_count == 1
    assert v.value.sharding.is_equivalent_to(sharding, 2)
    for name in ("m", "v"):
        assert opt.get_slot(v, name).value.sharding.is_equivalent_to(sharding, 2), name
    np.testing.assert_allclose(v.numpy(), np.full((8, 2), -0.3), rtol=1e-4)


needs_4_devices = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
mesh_axes = pytest.mark.parametrize(
    "axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"]
)


@functools.cache
def trained_on_one_device(make_opt):
    """Three steps of a fresh ``make_opt()`` on a variable on one device: its values, the
    reference of every mesh and sharding below (computed once per optimizer)."""
    alone = kopt.Variable(jnp.ones((8, 2)))
    reference = make_opt()
    for _ in range(3):
        reference.apply_gradients([(jnp.full((8, 2), 0.5), alone)])
    return np.array(alone.numpy())


@needs_4_devices
@mesh_axes
@pytest.mark.parametrize("spec", [P("x", None), P()], ids=["sharded", "replicated"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: optimizers.Nadam(0.1),  # a scalar slot, momentum_cache
        lambda: optimizers.LossScaleOptimizer(optimizers.Adam(0.1)),  # the scale, its counter
        lambda: optimizers.from_transformation(kopt.accumulate_gradients(kopt.adam(0.1), 2)),
        lambda: optimizers.from_transformation(kopt.apply_if_finite(kopt.adam(0.1))),
        NormTracker,  # add_weight weights
    ],
    ids=["nadam", "loss_scale", "accumulate", "apply_if_finite", "add_weight"],
)
def test_state_beside_the_slots_joins_the_mesh_and_the_step_compiles_once(
    make_opt, spec, axis_type
):
    mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, spec)
    on_mesh = kopt.Variable(jax.device_put(jnp.ones((8, 2)), sharding))
    opt = make_opt()
    for _ in range(3):
        opt.apply_gradients([(jnp.full((8, 2), 0.5), on_mesh)])
    assert getattr(opt, "inner_optimizer", opt).compile_count == 1
    assert on_mesh.value.sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_allclose(on_mesh.numpy(), trained_on_one_device(make_opt), rtol=1e-6)
    assert not np.allclose(on_mesh.numpy(), 1.0)  # it trained


@needs_4_devices
@mesh_axes
def test_minimize_with_a_plain_variable_beside_mesh_variables_compiles_once(axis_type):
    mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, P(None, "x"))
    w = kopt.Variable(jax.device_put(jnp.zeros((2, 8)), sharding))
    b = kopt.Variable(jnp.zeros(8))  # on one device, until the optimizer places it
    x = jax.device_put(jnp.ones((3, 2)), NamedSharding(mesh, P()))
    opt = optimizers.Adam(learning_rate=0.1)
    for _ in range(3):
        opt.minimize(lambda: jnp.sum(x @ w + b), [w, b])  # constant gradients: 3 and 3
    assert opt.compile_count == 1
    assert w.value.sharding.is_equivalent_to(sharding, 2)
    # Adam moves by the learning rate against a constant gradient's sign at every step.
    np.testing.assert_allclose(w.numpy(), np.full((2, 8), -0.3), rtol=1e-5)
    np.testing.assert_allclose(b.numpy(), np.full(8, -0.3), rtol=1e-5)


@needs_4_devices
@mesh_axes
def test_flatten_behind_the_facade_trains_a_sharded_variable_beside_packed_ones(axis_type):
    """kopt.flatten leaves a sharded param loose; the step lays out the state as the optimizer
    made it, also where a traced param's sharding is invisible (automatic mesh axes)."""
    mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, P("x", None))
    w = kopt.Variable(jax.device_put(jnp.zeros((8, 2)), sharding))
    b = kopt.Variable(jnp.zeros(2))
    opt = optimizers.from_transformation(kopt.flatten(kopt.adam(0.1)))
    for _ in range(3):
        opt.apply_gradients([(jnp.ones((8, 2)), w), (-jnp.ones(2), b)])
    assert opt.compile_count == 1
    assert w.value.sharding.is_equivalent_to(sharding, 2)
    # Adam moves by the learning rate against a constant gradient's sign at every step.
    np.testing.assert_allclose(w.numpy(), np.full((8, 2), -0.3), rtol=1e-5)
    np.testing.assert_allclose(b.numpy(), np.full(2, 0.3), rtol=1e-5)


@pytest.mark.parametrize("wrap", [False, True], ids=["adam", "loss_scale"])
def test_a_step_makes_no_round_trip_to_the_host(wrap):
    variables = [kopt.Variable(jnp.ones(4)) for _ in range(3)]
    opt = optimizers.Adam(learning_rate=0.1)
    if wrap:
        opt = optimizers.LossScaleOptimizer(opt, initial_scale=4.0, dynamic_growth_steps=2)
    grads = [jnp.ones(4), jnp.ones(4), jnp.ones(4)]
    bad = [jnp.ones(4), jnp.full(4, jnp.inf), jnp.ones(4)]
    opt.apply_gradients(zip(grads, variables, strict=True))  # compiles
    with jax.transfer_guard_device_to_host("disallow"):
        for gs in (grads, bad, grads, grads):
            opt.apply_gradients(zip(gs, variables, strict=True))
    assert opt.iterations.numpy() == (4 if wrap else 5)
    if wrap:
        # good steps 1, 2 (scale 4 -> 8), inf (8 -> 4), good steps 1, 2 (4 -> 8)
        assert float(opt.loss_scale.numpy()) == 8.0
        assert int(opt._good_steps.numpy()) == 0
    assert np.all(np.isfinite(variables[1].numpy())) == wrap


def test_add_weight_weights_are_read_and_written_by_every_compiled_step():
    opt = NormTracker()
    var = kopt.Variable(np.ones(2, np.float32))
    w, ema, mult = np.ones(2), 0.0, 1.0
    for step in range(4):
        if step == 2:
            opt.mult.assign(10.0)  # between steps: the next step reads it
            mult = 10.0
        g = np.full(2, step + 1.0, np.float32)
        opt.apply_gradients([(jnp.asarray(g), var)])
        ema = 0.9 * ema + 0.1 * np.linalg.norm(g)
        w = w - 0.1 * mult * g / (1.0 + ema)
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(opt.norm_ema.numpy(), ema, rtol=1e-5)
    assert opt.compile_count == 1
    assert all(w is not opt.norm_ema for w in opt.weights)  # as in tf.keras: not in weights


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
@pytest.mark.parametrize(
    ("make_opt", "committed"),
    [
        (lambda: optimizers.Adam(0.1), "variable"),
        (lambda: optimizers.SGD(0.1, momentum=0.9), "variable"),
        (lambda: optimizers.AdamW(0.1, use_ema=True), "variable"),
        (lambda: optimizers.LossScaleOptimizer(optimizers.Adam(0.1)), "variable"),
        (lambda: optimizers.Adam(0.1), "gradient"),
    ],
    ids=["adam", "sgd_momentum", "adamw_ema", "loss_scale", "adam_gradient"],
)
def test_state_beside_a_variable_on_one_device_joins_it_and_the_step_compiles_once(
    make_opt, committed, backend_compiles
):
    """``iterations``, the slots of an uncommitted variable beside it and the other state came
    back committed from the first step, so the second compiled again (without tracing again).
    A variable realistically sits on another device than the default one."""
    device = jax.devices()[1]
    put = functools.partial(jax.device_put, device=device)
    kernel = kopt.Variable(put(jnp.ones((4, 2))) if committed == "variable" else jnp.ones((4, 2)))
    bias = kopt.Variable(jnp.ones(2))
    grads = [(jnp.full((4, 2), 0.5), kernel), (jnp.full(2, 0.5), bias)]
    if committed == "gradient":
        grads[0] = (put(grads[0][0]), kernel)
    opt = make_opt()
    opt.apply_gradients(grads)
    first = len(backend_compiles)
    for _ in range(2):
        opt.apply_gradients(grads)
    assert len(backend_compiles) == first
    for w in [kernel, bias, *opt.variables()]:
        assert w.value.committed and w.value.devices() == {device}, w.name


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_minimize_with_a_plain_variable_beside_one_on_a_device_compiles_once(backend_compiles):
    device = jax.devices()[1]
    w = kopt.Variable(jax.device_put(jnp.zeros((2, 8)), device))
    b = kopt.Variable(jnp.zeros(8))  # uncommitted, until the optimizer places it
    x = jax.device_put(jnp.ones((3, 2)), device)
    opt = optimizers.Adam(learning_rate=0.1)
    opt.minimize(lambda: jnp.sum(x @ w + b), [w, b])
    first = len(backend_compiles)
    for _ in range(2):
        opt.minimize(lambda: jnp.sum(x @ w + b), [w, b])  # constant gradients: 3 and 3
    assert len(backend_compiles) == first
    # Adam moves by the learning rate against a constant gradient's sign at every step.
    np.testing.assert_allclose(w.numpy(), np.full((2, 8), -0.3), rtol=1e-5)
    np.testing.assert_allclose(b.numpy(), np.full(8, -0.3), rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
@pytest.mark.parametrize("flow", ["minimize", "get_scaled_loss"])
def test_loss_scale_beside_variables_on_a_device_compiles_nothing_after_the_first_call(
    flow, backend_compiles
):
    """The scale was read by the scaled loss and the unscaling while uncommitted, then the
    first step moved it onto the variables' device: the second call compiled those eager
    operations again (four small one-off compiles). Each flow has a device of its own: a scalar
    product compiled by an earlier call in the process would hide the compile counted here."""
    device = jax.devices()[2 if flow == "minimize" else 3]
    w = kopt.Variable(jax.device_put(jnp.zeros((2, 8)), device))
    b = kopt.Variable(jax.device_put(jnp.zeros(8), device))
    x = jax.device_put(jnp.ones((3, 2)), device)
    opt = optimizers.LossScaleOptimizer(optimizers.Adam(learning_rate=0.1))

    def call():
        loss = lambda: jnp.sum(x @ w + b)  # noqa: E731
        if flow == "minimize":
            opt.minimize(loss, [w, b])
        else:  # the loop of the docs, which computes its own gradients
            scaled = opt.inner_optimizer.compute_gradients(opt.get_scaled_loss(loss), [w, b])
            grads = opt.get_unscaled_gradients([g for g, _ in scaled])
            opt.apply_gradients(zip(grads, [w, b], strict=True))

    call()
    first = len(backend_compiles)
    for _ in range(2):
        call()
    assert len(backend_compiles) == first
    # Adam moves by the learning rate against a constant gradient's sign at every step.
    np.testing.assert_allclose(w.numpy(), np.full((2, 8), -0.3), rtol=1e-5)
    np.testing.assert_allclose(b.numpy(), np.full(8, -0.3), rtol=1e-5)
    assert opt.loss_scale.value.devices() == {device}


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_loss_scale_in_a_hand_written_gradient_loop_compiles_nothing_after_the_first_call(
    backend_compiles,
):
    """``jax.grad`` around ``get_scaled_loss`` of a value, then ``get_unscaled_gradients``: the
    scale was read uncommitted by the first call's differentiation and unscaling, then
    committed beside the variables by its step, and the second call compiled the backward
    pass and the unscaling again. Shapes of their own: programs compiled for them by an
    earlier test in the process would hide the compiles counted here."""
    device = jax.devices()[1]
    w = kopt.Variable(jax.device_put(jnp.zeros((5, 7)), device))
    b = kopt.Variable(jax.device_put(jnp.zeros(7), device))
    x = jax.device_put(jnp.ones((3, 5)), device)
    opt = optimizers.LossScaleOptimizer(optimizers.Adam(learning_rate=0.1))

    def scaled_loss(values):
        return opt.get_scaled_loss(jnp.sum(x @ values[0] + values[1]))

    def call():
        grads = opt.get_unscaled_gradients(jax.grad(scaled_loss)([w.value, b.value]))
        opt.apply_gradients(zip(grads, [w, b], strict=True))

    call()
    first = len(backend_compiles)
    for _ in range(2):
        call()
    assert len(backend_compiles) == first
    # Adam moves by the learning rate against a constant gradient's sign at every step.
    np.testing.assert_allclose(w.numpy(), np.full((5, 7), -0.3), rtol=1e-5)
    np.testing.assert_allclose(b.numpy(), np.full(7, -0.3), rtol=1e-5)
    assert opt.loss_scale.value.devices() == {device}
