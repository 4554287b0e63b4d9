"""What the facade's cached steps are keyed by: a replaced hook never runs an old program, a
number set after a schedule reuses its program, and sparse gradients compile per bucket of row
counts rather than per row count."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt.optimizers import SGD, Adagrad, Adam


def scale_by(k):
    return lambda pairs: [(g * k, v) for g, v in pairs]


@pytest.mark.parametrize("hook", ["gradient_transformers", "gradient_aggregator"])
def test_a_replaced_hook_is_used_even_at_a_reused_address(hook):
    """The step was keyed by the hooks' ``id()``; a new closure made after the old one was
    freed could take its address and run the old program."""
    var = kopt.Variable([0.0])
    opt = SGD(1.0)
    for k in range(1, 8):
        before = float(var.numpy()[0])
        # Each closure is freed when the next replaces it, so addresses get reused.
        setattr(opt, hook, [scale_by(float(k))] if hook == "gradient_transformers" else None)
        if hook == "gradient_aggregator":
            opt.gradient_aggregator = scale_by(float(k))
        opt.apply_gradients([(jnp.ones(1), var)])
        assert float(var.numpy()[0]) - before == pytest.approx(-k), k


@pytest.mark.parametrize("make", [Adam, kopt.optimizers.AdamW])
def test_a_number_after_a_schedule_reuses_its_program(make):
    var = kopt.Variable([1.0, 2.0])
    opt = make(0.1)
    schedule = kopt.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    for value in (0.1, schedule):  # both kinds compiled once
        opt.learning_rate = value
        opt.apply_gradients([(jnp.ones(2), var)])
    compiled = opt.compile_count
    for i in range(6):
        opt.learning_rate = schedule if i % 2 else 0.05 * (i + 1)
        opt.apply_gradients([(jnp.ones(2), var)])
    assert opt.compile_count == compiled
    opt.learning_rate = 0.25
    assert float(opt.learning_rate.numpy()) == 0.25  # the number took effect in place


def test_sparse_gradients_compile_per_bucket_of_row_counts_with_the_same_result():
    rows, dim = 50, 3
    rng = np.random.default_rng(0)
    table = kopt.Variable(jnp.zeros((rows, dim)))
    opt = Adagrad(0.1)
    reference = np.zeros((rows, dim), np.float32)
    accumulator = np.full((rows, dim), 0.1, np.float32)
    for n in range(9, 17):  # one bucket (16 rows) for eight row counts
        indices = rng.integers(0, rows, n).astype(np.int32)
        values = rng.normal(size=(n, dim)).astype(np.float32)
        opt.apply_gradients([(kopt.IndexedSlices(values, indices, (rows, dim)), table)])
        summed = np.zeros((rows, dim), np.float32)
        np.add.at(summed, indices, values)
        touched = np.unique(indices)
        accumulator[touched] += summed[touched] ** 2
        reference[touched] -= 0.1 * summed[touched] / (np.sqrt(accumulator[touched]) + 1e-7)
    assert opt.compile_count == 1  # counts 9 to 16 all pad to 16 rows
    np.testing.assert_allclose(table.numpy(), reference, rtol=1e-5, atol=1e-6)


def test_new_sparse_row_counts_compile_no_padding_program_on_a_cpu(backend_compiles):
    """The padding ran as ``jnp.pad`` twice per step, compiling two small programs for every
    new row count (a quarter of a second each; unique-id counts change every batch). On a
    CPU a count seen a few times at most is now padded in NumPy, and one that keeps coming
    back by one compiled program kept for it."""
    rows, dim = 100, 4
    table = kopt.Variable(jnp.zeros((rows, dim)))
    dense = kopt.Variable(jnp.zeros((rows, dim)))
    opt, twin = Adagrad(0.1), Adagrad(0.1)
    rng = np.random.default_rng(1)

    def step(n):
        indices = jnp.asarray(rng.integers(0, rows, n), jnp.int32)
        values = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
        opt.apply_gradients([(kopt.IndexedSlices(values, indices, (rows, dim)), table)])
        summed = jnp.zeros((rows, dim)).at[indices].add(values)
        twin.apply_gradients([(summed, dense)])  # the same rows, dense: equal where touched

    step(32)
    backend_compiles.clear()
    for n in range(17, 32):
        step(n)
    assert [c for c in backend_compiles if "pad" in c.fun_name] == []
    for _ in range(6):  # a count that keeps coming back gets its compiled padding, once
        step(20)
    assert len([c for c in backend_compiles if "pad" in c.fun_name]) == 1
    np.testing.assert_allclose(table.numpy(), dense.numpy(), rtol=1e-5, atol=1e-6)
    assert opt.compile_count == 1


def test_numpy_and_jax_gradients_share_one_program(backend_compiles):
    """The step was keyed by the gradient's type: a NumPy gradient and a JAX one of the same
    shape and dtype compiled two programs."""
    from kopt.optimizers import base

    # First asked inside a trace (an apply_gradients refused inside jax.jit), the array type
    # must still be the concrete one.
    base._array_type.cache_clear()
    jax.jit(lambda x: base._array_type() and x)(1.0)
    var = kopt.Variable(np.zeros(3, np.float32))
    opt = SGD(0.1)
    for g in (np.ones(3, np.float32), jnp.ones(3), np.ones(3, np.float32), jnp.ones(3)):
        opt.apply_gradients([(g, var)])
    assert opt.compile_count == 1
    assert len([c for c in backend_compiles if c.fun_name == "jit(step)"]) == 1
    np.testing.assert_allclose(var.numpy(), -0.4, rtol=1e-6)
    with pytest.raises(TypeError, match="float64, expected float32"):
        opt.apply_gradients([(np.ones(3, np.float64), var)])


def test_weakly_and_strongly_typed_gradients_share_one_program():
    """A Python float and ``jnp.asarray(0.5)`` are weakly typed float32, ``jnp.float32(0.5)``
    is strongly typed: the same gradient to the step, which compiles once for all three."""
    scalar, vector = kopt.Variable(0.0), kopt.Variable(jnp.zeros(2))
    opt = SGD(0.1)
    for g in (0.5, jnp.float32(0.5), jnp.asarray(0.5), jnp.float32(0.5)):
        opt.apply_gradients([(g, scalar), (jnp.ones(2), vector)])
    assert opt.compile_count == 1
    np.testing.assert_allclose(scalar.numpy(), -0.2, rtol=1e-6)
    assert scalar.dtype == jnp.float32


def test_weakly_typed_gradients_are_converted_in_one_call(backend_compiles):
    """Weakly typed gradients (``jnp.full(shape, 0.5)``) are made strong in one compiled call
    for all of them, not one eager conversion (and compile, per shape) each; the step is the
    strongly typed gradients' one. Numbers against NumPy's SGD."""
    shapes = [(7, k) for k in range(1, 13)]  # distinct shapes: eager conversions compile per shape
    variables = [kopt.Variable(np.zeros(s, np.float32)) for s in shapes]
    weak = [jnp.full(s, 0.5) for s in shapes]
    strong = [jnp.full(s, 0.5, jnp.float32) for s in shapes]
    assert all(g.weak_type for g in weak) and not any(g.weak_type for g in strong)
    opt = SGD(0.1)
    backend_compiles.clear()
    opt.apply_gradients(zip(weak, variables, strict=True))
    assert len(backend_compiles) <= 2, backend_compiles  # the step and the batched conversion
    backend_compiles.clear()
    opt.apply_gradients(zip(strong, variables, strict=True))
    opt.apply_gradients(zip(weak, variables, strict=True))
    assert backend_compiles == [] and opt.compile_count == 1
    for v in variables:
        np.testing.assert_allclose(v.numpy(), -0.15, rtol=1e-6)
        assert not v.value.weak_type


def test_a_none_gradient_does_not_format_its_variable(caplog):
    class Counted(kopt.Variable):
        reprs = 0

        def __repr__(self):
            Counted.reprs += 1
            return super().__repr__()

    used, unused = kopt.Variable([1.0]), Counted([2.0], name="unused")
    opt = SGD(0.1)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            opt.apply_gradients([(jnp.ones(1), used), (None, unused)])
    assert Counted.reprs == 0
    assert "unused" in caplog.text


def test_a_new_schedule_of_equal_config_reuses_the_program():
    """A warm restart often builds a new schedule equal to the last one: it compiles nothing."""
    var = kopt.Variable([1.0, 2.0])
    opt = Adam(kopt.optimizers.schedules.CosineDecay(0.1, 10))
    opt.apply_gradients([(jnp.ones(2), var)])
    compiled = opt.compile_count
    for _ in range(3):
        opt.learning_rate = kopt.optimizers.schedules.CosineDecay(0.1, 10)
        opt.apply_gradients([(jnp.ones(2), var)])
    assert opt.compile_count == compiled
    # Another config is another function: it compiles, and its values are used.
    opt.learning_rate = kopt.optimizers.schedules.CosineDecay(0.0, 10)
    before = var.numpy().copy()
    opt.apply_gradients([(jnp.ones(2), var)])
    assert opt.compile_count == compiled + 1
    np.testing.assert_array_equal(var.numpy(), before)  # a learning rate of 0


def test_changing_keras3_loss_scale_factor_compiles_nothing():
    var = kopt.Variable([0.0, 0.0])
    opt = kopt.optimizers.Lion(learning_rate=1.0, loss_scale_factor=2.0)
    opt.apply_gradients([(jnp.array([1.0, -1.0]), var)])
    compiled = opt.compile_count
    for factor in (4.0, 8.0, 0.5):
        opt.loss_scale_factor = factor
        opt.apply_gradients([(jnp.array([1.0, -1.0]), var)])
    assert opt.compile_count == compiled
    np.testing.assert_allclose(var.numpy(), [-4.0, 4.0])  # Lion: the sign, whatever the factor
    # The new factor reaches the step: it divides the gradient there.
    var = kopt.Variable([0.0])
    opt = kopt.optimizers.AdamW(learning_rate=1.0, weight_decay=0.0, loss_scale_factor=10.0)
    opt.apply_gradients([(jnp.array([10.0]), var)])
    m_after_one = float(opt.get_slot(var, "m").numpy()[0])
    assert m_after_one == pytest.approx(0.1)  # (1 - beta_1) * (10 / 10)
    opt.loss_scale_factor = 100.0
    opt.apply_gradients([(jnp.array([10.0]), var)])
    assert float(opt.get_slot(var, "m").numpy()[0]) == pytest.approx(0.9 * 0.1 + 0.1 * 0.1)


class Scaled(kopt.optimizers.Optimizer):
    """A custom optimizer whose hook reads ``self.scale``, set between steps."""

    def __init__(self, scale):
        super().__init__("Scaled")
        self._set_hyper("learning_rate", 1.0)
        self.scale = scale

    def _resource_apply_dense(self, grad, var, apply_state=None):
        return var.assign_sub(grad * jnp.asarray(self.scale, var.dtype))


@pytest.mark.parametrize(
    "make", [np.float32, lambda x: np.asarray(x, np.float32)], ids=["np.float32", "ndarray"]
)
def test_an_attribute_a_custom_hook_reads_takes_effect_when_set(make):
    """A NumPy array was a constant of the first compiled step: setting a new one between steps
    went unseen. It is now part of the step's key, by value, as a NumPy scalar is."""
    var = kopt.Variable([0.0])
    opt = Scaled(make(1.0))
    moves = []
    for factor in (1.0, 2.0, 3.0, 2.0):
        opt.scale = make(factor)
        before = float(var.numpy()[0])
        opt.apply_gradients([(jnp.ones(1), var)])
        moves.append(before - float(var.numpy()[0]))
    assert moves == [1.0, 2.0, 3.0, 2.0]


def test_a_numpy_attribute_changed_in_place_takes_effect():
    var = kopt.Variable([0.0])
    opt = Scaled(np.ones(1, np.float32))
    opt.apply_gradients([(jnp.ones(1), var)])
    opt.scale[0] = 5.0
    opt.apply_gradients([(jnp.ones(1), var)])
    assert float(var.numpy()[0]) == -6.0


class LoggingSGD(kopt.optimizers.Optimizer):
    """Keeps the last gradient norm (a JAX array) in a public attribute no hook reads."""

    def __init__(self):
        super().__init__("LoggingSGD")
        self._set_hyper("learning_rate", 0.1)
        self.last_grad_norm = None

    def apply_gradients(self, grads_and_vars, name=None, **kwargs):
        grads_and_vars = list(grads_and_vars)
        self.last_grad_norm = kopt.global_norm([g for g, _ in grads_and_vars])
        return super().apply_gradients(grads_and_vars, name=name, **kwargs)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        return var.assign_sub(self._get_hyper("learning_rate", var.dtype) * grad)


def test_an_array_attribute_kept_for_logging_does_not_recompile():
    variables = [kopt.Variable(np.ones(4, np.float32)) for _ in range(3)]
    opt = LoggingSGD()
    for _ in range(5):
        opt.apply_gradients([(jnp.ones(4), v) for v in variables])
    assert opt.compile_count == 1
    np.testing.assert_allclose(variables[0].numpy(), 0.5, rtol=1e-6)


def test_a_variable_subclass_takes_the_fast_path(monkeypatch):
    """A user's Variable subclass was validated and re-keyed on every call."""

    class Tagged(kopt.Variable):
        pass

    variables = [Tagged(np.ones(3, np.float32)) for _ in range(4)]
    opt = Adam(0.01)
    grads = [(jnp.ones(3), v) for v in variables]
    opt.apply_gradients(grads)
    calls = []
    original = type(opt)._validate
    monkeypatch.setattr(
        type(opt), "_validate", lambda self, *a: calls.append(1) or original(self, *a)
    )
    for _ in range(3):
        opt.apply_gradients(grads)
    assert calls == []
    assert opt.compile_count == 1


def freeze(grads_and_vars):
    return [(g, v) for g, v in grads_and_vars if not v.name.startswith("frozen")]


def reverse(grads_and_vars):
    return list(reversed(grads_and_vars))


@pytest.mark.parametrize("hook", [freeze, reverse], ids=["drops a pair", "reorders pairs"])
@pytest.mark.parametrize(
    "make",
    [
        lambda hook: Adam(0.1, gradient_transformers=[hook]),
        lambda hook: SGD(0.1, momentum=0.9, gradient_transformers=[hook]),
        lambda hook: (
            kopt.optimizers.from_transformation(kopt.flatten(kopt.adam(0.1)))
            if hook is reverse
            else Adam(0.1, gradient_aggregator=hook)
        ),
    ],
    ids=["Adam", "SGD", "flatten or aggregator"],
)
def test_gradient_hooks_may_drop_or_reorder_pairs(make, hook):
    a = kopt.Variable(np.ones(3, np.float32), name="a")
    b = kopt.Variable(np.ones((2, 2), np.float32), name="frozen_b")
    opt = make(hook)
    if isinstance(opt, kopt.optimizers.TransformationOptimizer):
        opt.gradient_transformers = [hook]
    opt.apply_gradients([(jnp.ones(3), a), (jnp.ones((2, 2)), b)])
    assert float(a.numpy()[0]) < 1.0
    if hook is freeze:
        np.testing.assert_array_equal(b.numpy(), 1.0)
    else:
        assert float(b.numpy()[0, 0]) < 1.0


def count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize(
    "set_attribute",
    [
        lambda opt, i: setattr(opt, "epoch", i),
        lambda opt, i: setattr(opt, "clipnorm", 1.0 + i),
        lambda opt, i: setattr(opt, "grad_norm", jnp.asarray(float(i))),
    ],
    ids=["plain", "clipnorm", "array"],
)
def test_setting_an_attribute_a_builtin_step_does_not_read_keeps_its_step_key(
    monkeypatch, set_attribute
):
    """Any public attribute set on a built-in (an epoch counter kept on it, a new clip value)
    made the next call work out its step's key again, walking every variable."""
    variables = [kopt.Variable(np.ones(3, np.float32)) for _ in range(5)]
    opt = Adam(0.1, clipnorm=1.0)
    pairs = [(jnp.ones(3), v) for v in variables]
    opt.apply_gradients(pairs)
    calls = count_calls(monkeypatch, kopt.optimizers.Optimizer, "_program_key")
    for i in range(4):
        set_attribute(opt, i)
        opt.apply_gradients(pairs)
    assert calls == [] and opt.compile_count == 1


def test_an_array_set_on_a_custom_optimizer_keeps_its_step_key(monkeypatch):
    """Arrays are not part of a custom step's key (see LoggingSGD), so setting one is no reason
    to work the key out again."""
    variables = [kopt.Variable(np.ones(4, np.float32)) for _ in range(3)]
    opt = LoggingSGD()
    opt.apply_gradients([(jnp.ones(4), v) for v in variables])
    calls = count_calls(monkeypatch, kopt.optimizers.Optimizer, "_program_key")
    for _ in range(3):
        opt.apply_gradients([(jnp.ones(4), v) for v in variables])
    assert calls == [] and opt.compile_count == 1


def test_a_long_list_attribute_is_searched_for_variables_once(monkeypatch):
    """A loss history kept on the optimizer was walked at every call, so a run appending to
    it took time quadratic in its length. A long container is now read when assigned."""
    from kopt.optimizers import base

    var = kopt.Variable(np.ones(2, np.float32))
    opt = Adam(0.1)
    opt.history = [0.0] * 1000
    walks = count_calls(monkeypatch, base, "_variables_in")
    for i in range(5):
        opt.history.append(float(i))
        opt.apply_gradients([(jnp.ones(2), var)])
    assert len(walks) == 1
    opt.history = [*opt.history, 1.0]  # a new list is read again
    opt.apply_gradients([(jnp.ones(2), var)])
    assert len(walks) == 2 and opt.compile_count == 1


def test_many_variable_lists_in_turn_keep_their_step_keys(monkeypatch):
    """The remembered step keys were all dropped past 64 variable lists, so stepping 70 layers
    in turn worked out every key at every call."""
    layers = [[kopt.Variable(np.ones(2, np.float32))] for _ in range(70)]
    opt = SGD(0.1)
    for layer in layers:
        opt.apply_gradients([(jnp.ones(2), layer[0])])
    calls = count_calls(monkeypatch, kopt.optimizers.Optimizer, "_program_key")
    for layer in layers:
        opt.apply_gradients([(jnp.ones(2), layer[0])])
    assert calls == []


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
def test_assigning_a_sharded_variable_no_optimizer_steps_keeps_step_keys(monkeypatch):
    """Every assignment of a value spanning devices (a sharded metric, once per step) made every
    optimizer's next call work out its step key again, walking its variables; only a change
    of placement does now."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("d",))
    split = NamedSharding(mesh, P("d"))
    metric = kopt.Variable(jax.device_put(np.zeros(8, np.float32), split), name="metric")
    variables = [kopt.Variable(np.ones(3, np.float32)) for _ in range(3)]
    opt = Adam(0.1)
    pairs = [(jnp.ones(3), v) for v in variables]
    opt.apply_gradients(pairs)
    calls = count_calls(monkeypatch, kopt.optimizers.Optimizer, "_program_key")
    for i in range(3):
        metric.assign(jnp.full(8, float(i)))
        metric.assign_add(jnp.ones(8))
        opt.apply_gradients(pairs)
    assert calls == [] and opt.compile_count == 1
    np.testing.assert_array_equal(metric.numpy(), np.full(8, 3.0))
    assert metric.sharding == split
