"""A tf.keras custom optimizer ported by changing imports: the tf idioms it uses keep working
(``use_locking``, ``self._use_locking``, Keras initializer names), the sparse hook's index
contract, and the error a hook gets for a Python ``if`` on a traced value."""

import gc
import weakref

import jax.numpy as jnp
import numpy as np
import pytest
from facade_zoo import Lookahead, learning_rates_used
from numpy_reference import adam as numpy_adam

import kopt
from kopt import optimizers


class LockingSGD(optimizers.Optimizer):
    """Written as tf-addons-style optimizers are: ``use_locking`` on every assignment and a
    slot made with Keras's capitalised initializer name."""

    def __init__(self, learning_rate=0.1, name="LockingSGD", **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "scale", initializer="Ones")

    def _resource_apply_dense(self, grad, var, apply_state=None):
        scale = self.get_slot(var, "scale")
        scale.assign(scale * 0.5, use_locking=self._use_locking, name="halve")
        lr = self._get_hyper("learning_rate", var.dtype)
        return var.assign_sub(lr * scale * grad, use_locking=self._use_locking)


def test_tf_locking_arguments_and_initializer_names_are_accepted():
    opt = LockingSGD()
    var = kopt.Variable(np.ones(2, np.float32))
    for _ in range(3):
        opt.apply_gradients([(jnp.ones(2), var)])
    np.testing.assert_allclose(var.numpy(), 1.0 - 0.1 * (0.5 + 0.25 + 0.125), rtol=1e-6)
    np.testing.assert_allclose(opt.get_slot(var, "scale").numpy(), 0.125)
    var.assign_add(jnp.ones(2), use_locking=True, name="add", read_value=False)
    np.testing.assert_allclose(var.numpy(), 2.0 - 0.1 * 0.875, rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown initializer 'glorot_uniform'"):
        opt.add_slot(var, "other", initializer="glorot_uniform")
    assert "other" not in opt.get_slot_names()


class RowCountingSGD(optimizers.Optimizer):
    """A sparse rule that reduces over the named rows: each row moves by lr * grad / (number of
    distinct rows named), so a pad row counted as a row would show."""

    def __init__(self, learning_rate=1.0, name="RowCountingSGD"):
        super().__init__(name)
        self._set_hyper("learning_rate", learning_rate)
        self.seen = []

    def _resource_apply_dense(self, grad, var, apply_state=None):
        return var.assign_sub(grad)

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        self.seen.append((indices, grad))  # traced: checked through the results below
        valid = indices < var.shape[0]  # the documented way to leave the padding out
        count = jnp.sum(valid)
        rows = jnp.where(valid[:, None], grad / count, 0.0)
        return var.assign(var.value.at[indices].add(-rows))


def test_sparse_hook_gets_unique_indices_padded_with_the_row_count():
    opt = RowCountingSGD()
    table = kopt.Variable(np.zeros((4, 2), np.float32))
    grad = kopt.IndexedSlices(
        jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]), jnp.array([2, 0, 2]), (4, 2)
    )
    opt.apply_gradients([(grad, table)])
    # tf.keras hands the hook rows [2, 0] with summed gradients [4, 4] and [2, 2]: two rows.
    expected = np.zeros((4, 2), np.float32)
    expected[2] -= 4.0 / 2
    expected[0] -= 2.0 / 2
    np.testing.assert_allclose(table.numpy(), expected)
    indices, values = opt.seen[0]
    # One place per incoming row, padded to a power of two (4) so that row counts share steps.
    assert indices.shape == (4,) and values.shape == (4, 2)


class BranchingSGD(optimizers.Optimizer):
    def __init__(self, name="BranchingSGD"):
        super().__init__(name)
        self._set_hyper("learning_rate", 0.1)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        if jnp.linalg.norm(grad) > 1.0:  # works eagerly in tf.keras; not while traced
            grad = grad / jnp.linalg.norm(grad)
        return var.assign_sub(0.1 * grad)


def test_a_python_if_on_a_traced_value_names_the_class_and_the_remedy():
    opt = BranchingSGD()
    var = kopt.Variable(np.array([3.0, 4.0], np.float32))
    with pytest.raises(TypeError, match=r"BranchingSGD: a hook .* jnp.where or jax.lax.cond"):
        opt.apply_gradients([(jnp.array([3.0, 4.0]), var)])
    np.testing.assert_array_equal(var.numpy(), [3.0, 4.0])
    assert opt.weights == [] or int(opt.iterations.numpy()) == 0


# --- tf-addons idioms: subclasses and wrappers of built-ins, flags, scalar slots ---------------


class LazyAdam(optimizers.Adam):
    """tf-addons' LazyAdam: the built-in Adam, with a sparse update that touches only the rows
    named, through tf.keras's ``_resource_scatter_update`` / ``_resource_scatter_add``."""

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        dtype = var.dtype
        beta_1 = self._get_hyper("beta_1", dtype)
        beta_2 = self._get_hyper("beta_2", dtype)
        t = jnp.asarray(self.iterations + 1).astype(dtype)
        lr = self._decayed_lr(dtype) * jnp.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        m, v = self.get_slot(var, "m"), self.get_slot(var, "v")
        m_rows = beta_1 * jnp.take(m, indices, axis=0) + (1 - beta_1) * grad
        v_rows = beta_2 * jnp.take(v, indices, axis=0) + (1 - beta_2) * grad * grad
        self._resource_scatter_update(m, indices, m_rows)
        self._resource_scatter_update(v, indices, v_rows)
        return self._resource_scatter_add(var, indices, -lr * m_rows / (jnp.sqrt(v_rows) + 1e-7))


def _adam_numpy(var, m, v, g, t, lr=0.1, b1=0.9, b2=0.999, eps=1e-7):
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    var -= lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)


def test_a_builtin_subclass_overriding_a_hook_runs_it_and_the_builtin_hooks():
    opt = LazyAdam(learning_rate=0.1)
    table = kopt.Variable(np.ones((3, 2), np.float32))
    w = kopt.Variable(np.ones(2, np.float32))
    rows = [(0, [1.0, 2.0]), (1, [3.0, -1.0])]
    for i, values in rows:
        grad = kopt.IndexedSlices(jnp.array([values]), jnp.array([i]), (3, 2))
        opt.apply_gradients([(grad, table), (jnp.array([1.0, -1.0]), w)])
    # NumPy: lazy rows for the table (row 0 does not move at step 2), Adam for w.
    t_var, t_m, t_v = np.ones((3, 2)), np.zeros((3, 2)), np.zeros((3, 2))
    w_var, w_m, w_v = np.ones(2), np.zeros(2), np.zeros(2)
    for t, (i, values) in enumerate(rows, 1):
        var, m, v = t_var[i : i + 1], t_m[i : i + 1], t_v[i : i + 1]
        _adam_numpy(var, m, v, np.array([values]), t)
        t_var[i], t_m[i], t_v[i] = var[0], m[0], v[0]
        _adam_numpy(w_var, w_m, w_v, np.array([1.0, -1.0]), t)
    np.testing.assert_allclose(table.numpy(), t_var, rtol=1e-5)
    np.testing.assert_allclose(opt.get_slot(table, "m").numpy(), t_m, rtol=1e-5)
    np.testing.assert_allclose(w.numpy(), w_var, rtol=1e-5)
    np.testing.assert_allclose(opt.get_slot(w, "v").numpy(), w_v, rtol=1e-4)  # 1 - 0.999
    assert opt.get_slot_names() == ["m", "v"] and opt.compile_count == 1


class DecoupledWeightDecay:
    """tf-addons' mixin for a built-in: a hyperparameter, ``_prepare_local`` and a dense hook
    that decays then calls the built-in's, and a per-call ``decay_var_list`` of ``ref()``s."""

    def __init__(self, weight_decay, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_hyper("weight_decay", weight_decay)
        self.decay_var_list = None

    def get_config(self):
        return {
            **super().get_config(),
            "weight_decay": self._serialize_hyperparameter("weight_decay"),
        }

    def apply_gradients(self, grads_and_vars, name=None, decay_var_list=None, **kwargs):
        self.decay_var_list = {v.ref() for v in decay_var_list} if decay_var_list else None
        return super().apply_gradients(grads_and_vars, name=name, **kwargs)

    def _prepare_local(self, var_device, var_dtype, apply_state):
        super()._prepare_local(var_device, var_dtype, apply_state)
        wd = self._get_hyper("weight_decay", var_dtype)
        apply_state[(var_device, var_dtype)]["wd_t"] = wd

    def _resource_apply_dense(self, grad, var, apply_state=None):
        if not self.decay_var_list or var.ref() in self.decay_var_list:
            var.assign_sub(apply_state[(var.device, var.dtype)]["wd_t"] * var)
        return super()._resource_apply_dense(grad, var, apply_state=apply_state)


class SGDW(DecoupledWeightDecay, optimizers.SGD):
    pass


def test_a_weight_decay_mixin_extends_a_builtin_and_sees_its_decay_var_list():
    opt = SGDW(0.1, learning_rate=0.1, momentum=0.9)
    a = kopt.Variable(np.array([1.0, 2.0], np.float32))
    b = kopt.Variable(np.array([3.0], np.float32))
    assert a.ref() == a.ref() and a.ref() != b.ref() and a.ref().deref() is a
    grads = [np.array([1.0, 1.0]), np.array([2.0])]
    values, accums = [np.array([1.0, 2.0]), np.array([3.0])], [np.zeros(2), np.zeros(1)]
    for decay_list in (None, [a], [a]):
        pairs = [(jnp.asarray(grads[0]), a), (jnp.asarray(grads[1]), b)]
        opt.apply_gradients(pairs, decay_var_list=decay_list)
        for i, var in enumerate((a, b)):
            if decay_list is None or any(var is d for d in decay_list):
                values[i] = values[i] - 0.1 * values[i]
            accums[i] = 0.9 * accums[i] - 0.1 * grads[i]  # tf.keras's momentum
            values[i] = values[i] + accums[i]
    np.testing.assert_allclose(a.numpy(), values[0], rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), values[1], rtol=1e-6)
    np.testing.assert_allclose(opt.get_slot(b, "momentum").numpy(), accums[1], rtol=1e-6)
    assert opt.compile_count == 2  # one step per decay list, as tf.keras retraces
    assert opt.get_config()["weight_decay"] == 0.1 and opt.get_config()["momentum"] == 0.9


def test_a_wrapper_steps_its_inner_optimizer_with_its_slots_and_current_hyperparameters():
    inner = optimizers.SGD(learning_rate=0.1, momentum=0.5)
    opt = Lookahead(inner)
    var = kopt.Variable(np.array([1.0, -1.0], np.float32))
    grad = np.array([1.0, 2.0])
    value, slow, accum = np.array([1.0, -1.0]), np.array([1.0, -1.0]), np.zeros(2)
    for step in range(1, 5):
        if step == 3:
            inner.learning_rate = 0.05  # a hyperparameter of the inner optimizer
        opt.apply_gradients([(jnp.asarray(grad), var)])
        accum = 0.5 * accum - (0.1 if step < 3 else 0.05) * grad
        value = value + accum
        if step % 2 == 0:
            slow = value = slow + 0.5 * (value - slow)
    np.testing.assert_allclose(var.numpy(), value, rtol=1e-6)
    np.testing.assert_allclose(opt.get_slot(var, "slow").numpy(), slow, rtol=1e-6)
    np.testing.assert_allclose(inner.get_slot(var, "momentum").numpy(), accum, rtol=1e-6)
    assert opt.compile_count == 1


class NovoGrad(optimizers.Optimizer):
    """tf-addons' NovoGrad: a per-variable scalar second moment (``add_slot`` with a scalar
    initial value) and a flag kept as a hyperparameter (``_set_hyper`` with a bool)."""

    def __init__(self, learning_rate=0.1, grad_averaging=False, name="NovoGrad"):
        super().__init__(name)
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("grad_averaging", grad_averaging)

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "m")
            self.add_slot(var, "v", initializer=jnp.zeros([], var.dtype))

    def _resource_apply_dense(self, grad, var, apply_state=None):
        m, v = self.get_slot(var, "m"), self.get_slot(var, "v")
        first = self.iterations == 0
        g2 = jnp.sum(jnp.square(grad))
        v_t = v.assign(jnp.where(first, g2, 0.5 * v + 0.5 * g2))
        grad = grad / (jnp.sqrt(v_t) + 1e-7)
        averaging = jnp.logical_and(self._get_hyper("grad_averaging"), jnp.logical_not(first))
        grad = jnp.where(averaging, 0.1 * grad, grad)
        m_t = m.assign(0.9 * m + grad)
        return var.assign_sub(self._get_hyper("learning_rate", var.dtype) * m_t)

    def get_config(self):
        return {
            **super().get_config(),
            "learning_rate": self._serialize_hyperparameter("learning_rate"),
            "grad_averaging": self._serialize_hyperparameter("grad_averaging"),
        }


def test_a_flag_hyperparameter_and_a_scalar_slot_as_in_tf_keras():
    opt = NovoGrad()
    var = kopt.Variable(np.array([3.0, 4.0], np.float32))
    grad = np.array([1.0, 2.0])
    value, m = np.array([3.0, 4.0]), np.zeros(2)
    for step in range(3):
        if step == 1:
            opt.grad_averaging = True  # a bool variable: no new compilation
        opt.apply_gradients([(jnp.asarray(grad), var)])
        scaled = grad / (np.sqrt(5.0) + 1e-7)  # v stays |g|^2 = 5
        m = 0.9 * m + (0.1 * scaled if step >= 1 else scaled)
        value = value - 0.1 * m
    assert opt.get_slot(var, "v").shape == ()  # the initial value's shape, not the variable's
    np.testing.assert_allclose(opt.get_slot(var, "v").numpy(), 5.0, rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), value, rtol=1e-6)
    assert opt.get_config()["grad_averaging"] is True
    assert opt.compile_count == 1


class NormSGD(optimizers.Optimizer):
    """A per-variable scalar slot made from a number, ``add_slot(var, "gnorm", 0.0)``."""

    def __init__(self, learning_rate=0.1, name="NormSGD"):
        super().__init__(name)
        self._set_hyper("learning_rate", learning_rate)

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "gnorm", 0.0)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        gnorm = self.get_slot(var, "gnorm")
        gnorm.assign(jnp.sqrt(jnp.sum(grad * grad)))
        return var.assign_sub(self._get_hyper("learning_rate", var.dtype) * grad / gnorm)


def test_add_slot_with_a_value_makes_a_slot_of_its_shape_as_tf_keras():
    """tf_keras 2.21's legacy ``add_slot`` takes any initializer that is not a name or a
    callable as the slot's initial value, in the variable's dtype: a Python or NumPy number
    makes a scalar slot. kopt filled a slot of the variable's shape with a number, and the
    port of a tf.keras optimizer keeping a scalar per variable failed at its first step."""
    opt = NormSGD()
    var = kopt.Variable(np.array([3.0, 4.0, 0.0], np.float32))
    for grad in ([3.0, 4.0, 0.0], [1.0, 0.0, 1.0]):
        opt.apply_gradients([(jnp.array(grad), var)])
    # tf_keras's NormSGD, written with tf.sqrt / tf.reduce_sum, gives these:
    np.testing.assert_allclose(var.numpy(), [2.8692893981933594, 3.92, -0.0707106813788414])
    assert [w.shape for w in opt.get_weights()] == [(), ()]
    np.testing.assert_allclose(opt.get_slot(var, "gnorm").numpy(), 1.4142135)

    half = kopt.Variable(np.ones((2, 3), np.float16))
    made = {  # initializer: the slot tf_keras makes for a float16 (2, 3) variable
        "np_float32": (np.float32(2.0), np.float16(2.0)),
        "py_float": (2.1, np.float16(2.1)),
        "jnp_0d": (jnp.asarray(2.0), np.float16(2.0)),
        "np_row": (np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0], np.float16)),
        "list": ([1.0, 2.0, 3.0], np.array([1.0, 2.0, 3.0], np.float16)),
        "np_full": (np.full((2, 3), 2.0), np.full((2, 3), 2.0, np.float16)),
    }
    for name, (initializer, expected) in made.items():
        slot = optimizers.SGD().add_slot(half, name, initializer=initializer)
        assert slot.dtype == np.float16, name
        np.testing.assert_array_equal(slot.numpy(), expected, strict=True, err_msg=name)
    # With `shape`, kopt broadcasts the value to it (tf.keras ignores `shape` for a value).
    assert optimizers.SGD().add_slot(half, "filled", 0.5, shape=(2, 3)).shape == (2, 3)


class LazyNadam(optimizers.Nadam):
    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        raise AssertionError("not reached: the gradient is dense")


def test_a_builtin_with_shared_state_refuses_its_hooks_one_variable_at_a_time():
    opt = LazyNadam(learning_rate=0.1)
    var = kopt.Variable(np.array([1.0, 2.0], np.float32))
    with pytest.raises(NotImplementedError, match=r"LazyNadam: the update of Nadam keeps state"):
        opt.apply_gradients([(jnp.array([1.0, 1.0]), var)])
    np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])
    assert opt.weights == [] or int(opt.iterations.numpy()) == 0


class Split(optimizers.Optimizer):
    """A wrapper with one inner optimizer per kind of variable, kept in a dict or a list (as
    tf.keras tracks them in either): Adam for matrices, momentum SGD for vectors."""

    def __init__(self, holder="dict", name="Split"):
        super().__init__(name)
        mat, vec = optimizers.Adam(0.01), optimizers.SGD(0.05, momentum=0.9)
        self.inner = {"mat": mat, "vec": vec} if holder == "dict" else [mat, vec]

    def _pick(self, var):
        inner = list(self.inner.values()) if isinstance(self.inner, dict) else self.inner
        return inner[0] if var.ndim > 1 else inner[1]

    def _create_slots(self, var_list):
        for var in var_list:
            self._pick(var)._create_slots([var])

    def _resource_apply_dense(self, grad, var, apply_state=None):
        return self._pick(var)._resource_apply_dense(grad, var)


@pytest.mark.parametrize("holder", ["dict", "list"])
def test_a_wrapper_may_keep_its_inner_optimizers_in_a_dict_or_a_list(holder):
    """Only optimizers held in attributes of their own were found: held in a dict or a list,
    their slots were not inputs of the step, which failed with a tracer error."""
    w = kopt.Variable(np.ones((2, 2), np.float32))
    b = kopt.Variable(np.zeros(2, np.float32))
    opt = Split(holder)
    m, v, accum = np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(2)
    want_w, want_b = np.ones((2, 2)), np.zeros(2)
    for step in range(1, 4):
        gw, gb = np.full((2, 2), float(step)), np.full(2, -float(step))
        opt.apply_gradients([(jnp.asarray(gw, jnp.float32), w), (jnp.asarray(gb, jnp.float32), b)])
        # Adam's step count, made for its hooks, is a value between steps (it was the step's
        # tracer after the first, which compiled again at the second).
        assert int(opt._pick(w).iterations.numpy()) == 0
        m, v = 0.9 * m + 0.1 * gw, 0.999 * v + 0.001 * gw**2
        # Adam's own step count is its iterations: the wrapper's steps do not move it.
        want_w = want_w - 0.01 * m / (np.sqrt(v) + 1e-7 * np.sqrt(1 - 0.999)) * (
            np.sqrt(1 - 0.999) / (1 - 0.9)
        )
        accum = 0.9 * accum - 0.05 * gb
        want_b = want_b + accum
    np.testing.assert_allclose(b.numpy(), want_b, rtol=1e-6)
    np.testing.assert_allclose(opt._pick(b).get_slot(b, "momentum").numpy(), accum, rtol=1e-6)
    assert opt.compile_count == 1
    assert np.all(np.isfinite(w.numpy())) and not np.allclose(w.numpy(), 1.0)


class ScaledSGD(optimizers.Optimizer):
    """Keeps a variable of its own in a plain attribute (not ``add_weight``), as tf.keras code
    does for a value a callback adjusts; ``counting`` also assigns it in the hook."""

    def __init__(self, learning_rate=0.1, counting=False, name="ScaledSGD", **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)
        self.scale = kopt.Variable(1.0, trainable=False)
        self.counting = counting

    def _create_slots(self, var_list):
        pass

    def _resource_apply_dense(self, grad, var, apply_state=None):
        var.assign_sub(self._decayed_lr(var.dtype) * self.scale * grad)
        if self.counting:
            self.scale.assign_add(1.0)


def test_a_variable_in_an_attribute_is_read_and_written_as_tf_function_captures_it():
    """Its value was compiled into the step (an assignment between steps was ignored), and an
    assignment in the hook left the variable holding a leaked tracer. tf.keras, eager or in a
    tf.function: -0.1 then -1.1; a counting hook leaves the scale at 2.0, then 3.0."""
    opt = ScaledSGD()
    var = kopt.Variable(0.0)
    opt.apply_gradients([(jnp.float32(1.0), var)])
    opt.scale.assign(10.0)
    opt.apply_gradients([(jnp.float32(1.0), var)])
    np.testing.assert_allclose(var.numpy(), -1.1, rtol=1e-6)
    assert opt.compile_count == 1

    counting = ScaledSGD(counting=True)
    var = kopt.Variable(0.0)
    for expected in (2.0, 3.0):
        counting.apply_gradients([(jnp.float32(1.0), var)])
        assert float(counting.scale.numpy()) == expected
    np.testing.assert_allclose(var.numpy(), -0.1 - 0.2, rtol=1e-6)
    assert counting.compile_count == 1


def test_a_skipped_loss_scale_step_keeps_the_attribute_variable():
    opt = optimizers.LossScaleOptimizer(ScaledSGD(counting=True), dynamic=False, initial_scale=1.0)
    var = kopt.Variable(0.0)
    opt.apply_gradients([(jnp.float32(jnp.nan), var)])
    assert float(opt.inner_optimizer.scale.numpy()) == 1.0
    opt.apply_gradients([(jnp.float32(1.0), var)])
    assert float(opt.inner_optimizer.scale.numpy()) == 2.0


def test_a_schedule_reading_a_variable_follows_its_assignments():
    """A user schedule over a variable a callback adjusts: the compiled step kept the value it
    was traced with. tf.keras (eager and tf.function) uses 0.1, 0.1, then 0.2 after the
    assignment."""

    class ScaledDecay(optimizers.schedules.LearningRateSchedule):
        def __init__(self, base, scale):
            self.base, self.scale = base, scale

        def __call__(self, step):
            return self.base * self.scale * 0.5 ** (step // 2)

        def get_config(self):
            return {"base": self.base}

    scale = kopt.Variable(1.0)
    opt = optimizers.SGD(learning_rate=ScaledDecay(0.1, scale))
    used = learning_rates_used(opt, 4, lambda step: step == 2 and scale.assign(4.0))
    np.testing.assert_allclose(used, [0.1, 0.1, 0.2, 0.2], rtol=1e-6)
    assert opt.compile_count == 1


class WarmupAdam(optimizers.Adam):
    """A warmup written the tf.keras way, by overriding ``_decayed_lr``."""

    def _decayed_lr(self, var_dtype):
        warm = jnp.minimum(1.0, (self.iterations.value + 1) / 4.0)
        return super()._decayed_lr(var_dtype) * warm.astype(var_dtype)


class HalvingSGD(optimizers.SGD):
    """A learning-rate change written in ``_prepare_local``, on tf.keras's ``lr_t``."""

    def _prepare_local(self, var_device, var_dtype, apply_state):
        super()._prepare_local(var_device, var_dtype, apply_state)
        apply_state[(var_device, var_dtype)]["lr_t"] *= 0.5


class CopiedAdam(optimizers.Adam):
    """Adam's dense update copied from tf.keras's Python path, reading its coefficients."""

    def _resource_apply_dense(self, grad, var, apply_state=None):
        c = (apply_state or {}).get((var.device, var.dtype)) or self._fallback_apply_state(
            var.device, var.dtype
        )
        m, v = self.get_slot(var, "m"), self.get_slot(var, "v")
        m.assign(c["beta_1_t"] * m + c["one_minus_beta_1_t"] * grad)
        v.assign(c["beta_2_t"] * v + c["one_minus_beta_2_t"] * grad * grad)
        return var.assign_sub(c["lr"] * m / (jnp.sqrt(v) + c["epsilon"]))


def test_a_builtin_subclass_setting_its_learning_rate_steps_with_it():
    """The built-in's update used its own learning rate: a `_decayed_lr` override (a warmup)
    or a changed `lr_t` in `_prepare_local` was ignored (tf.keras: w = 0.95 for the halving
    SGD), and tf.keras's other coefficients (`beta_1_t`, `lr`, ...) were missing from
    `apply_state` (KeyError)."""
    grads = [np.array([0.5, -1.0]), np.array([0.2, 0.3]), np.array([-0.4, 0.1])] * 2
    opt, var = WarmupAdam(0.1), kopt.Variable([1.0, -1.0])
    for g in grads:
        opt.apply_gradients([(jnp.asarray(g, jnp.float32), var)])
    expected = numpy_adam([1.0, -1.0], grads, lr=lambda t: 0.1 * min(1.0, (t + 1) / 4.0))
    np.testing.assert_allclose(var.numpy(), expected, rtol=2e-6)
    assert opt.compile_count == 1

    var = kopt.Variable(1.0)
    HalvingSGD(0.1).apply_gradients([(jnp.float32(1.0), var)])
    np.testing.assert_allclose(var.numpy(), 0.95, rtol=1e-7)

    opt, var = CopiedAdam(0.1, beta_1=0.8), kopt.Variable([1.0, -1.0])
    for g in grads:
        opt.apply_gradients([(jnp.asarray(g, jnp.float32), var)])
    expected = numpy_adam([1.0, -1.0], grads, lr=0.1, beta_1=0.8)
    np.testing.assert_allclose(var.numpy(), expected, rtol=2e-6)


def test_a_subclass_made_per_trial_is_freed_with_its_optimizers():
    """What a class's hooks are was cached with ``functools.cache``, which kept every subclass
    ever stepped alive (one warmup class per trial of a search, with all it refers to)."""
    var = kopt.Variable(np.zeros(3, np.float32))
    classes = []
    for _ in range(3):

        class TrialWarmup(optimizers.Adam):
            def _decayed_lr(self, var_dtype):
                return super()._decayed_lr(var_dtype) * 0.5

        opt = TrialWarmup(0.1)
        opt.apply_gradients([(jnp.ones(3), var)])
        classes.append(weakref.ref(TrialWarmup))
        del TrialWarmup, opt
    gc.collect()
    assert [c() for c in classes] == [None] * 3
    np.testing.assert_allclose(var.numpy(), np.full(3, -0.15), rtol=1e-5)  # lr 0.05, 3 steps


@pytest.mark.parametrize(
    "cls, keys",
    [
        (optimizers.SGD, {"lr_t", "momentum"}),
        (
            optimizers.Adam,
            {
                "lr_t", "lr", "epsilon", "beta_1_t", "beta_1_power", "one_minus_beta_1_t",
                "beta_2_t", "beta_2_power", "one_minus_beta_2_t",
            },
        ),
        (optimizers.Adagrad, {"lr_t", "epsilon", "neg_lr_t", "zero"}),
        (optimizers.Adadelta, {"lr_t", "epsilon", "rho"}),
        (
            optimizers.Adamax,
            {
                "lr_t", "beta_1_t", "beta_1_power", "neg_scaled_lr", "epsilon",
                "one_minus_beta_1_t", "beta_2_t", "zero",
            },
        ),
        (optimizers.RMSprop, {"lr_t", "neg_lr_t", "epsilon", "rho", "momentum", "one_minus_rho"}),
        (
            optimizers.Ftrl,
            {
                "lr_t", "learning_rate_power", "l1_regularization_strength",
                "l2_regularization_strength", "beta", "l2_shrinkage_regularization_strength",
            },
        ),
    ],
)  # fmt: skip
def test_builtin_apply_state_has_tf_keras_coefficients(cls, keys):
    opt = cls(0.1)
    opt.iterations.assign(2)
    coefficients = opt._fallback_apply_state("cpu", jnp.float32)
    assert set(coefficients) == keys
    if cls is optimizers.Adam:
        b1, b2 = 0.9**3, 0.999**3
        np.testing.assert_allclose(coefficients["lr"], 0.1 * np.sqrt(1 - b2) / (1 - b1), rtol=1e-5)
        np.testing.assert_allclose(coefficients["beta_2_power"], b2, rtol=1e-6)


def test_tf_keras_helpers_wrappers_use_exist():
    """tf-addons' averaging wrappers check ``"apply_state" in opt._dense_apply_args`` and call
    ``_call_if_callable``; they were AttributeErrors."""
    assert optimizers.Adam()._dense_apply_args == ["self", "grad", "var", "apply_state"]
    assert optimizers.Adam()._sparse_apply_args == ["self", "grad", "var", "indices", "apply_state"]
    assert ScaledSGD()._dense_apply_args == ["self", "grad", "var", "apply_state"]
    opt = optimizers.SGD()
    assert opt._call_if_callable(lambda: 3) == 3 and opt._call_if_callable(4) == 4
    assert opt._create_hypers() is None


class ClippedSGD(optimizers.Optimizer):
    """Uses an infinite hyperparameter for "off", as tf.keras code does."""

    def __init__(self, learning_rate=0.1, max_norm=float("inf"), name="ClippedSGD", **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("max_norm", max_norm)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        scale = jnp.minimum(1.0, self._get_hyper("max_norm", var.dtype) / jnp.linalg.norm(grad))
        var.assign_sub(self._decayed_lr(var.dtype) * scale * grad)


def test_a_custom_hyperparameter_may_be_infinite_as_in_tf_keras():
    """It was refused ("must be finite"); tf.keras steps to [0.7, 0.6]. NaN, an infinite
    learning rate and a built-in's infinite hyperparameter are still refused, naming them."""
    var = kopt.Variable(np.ones(2, np.float32))
    opt = ClippedSGD()
    opt.apply_gradients([(jnp.array([3.0, 4.0]), var)])
    np.testing.assert_allclose(var.numpy(), [0.7, 0.6], rtol=1e-6)
    opt.max_norm = 2.5
    opt.apply_gradients([(jnp.array([3.0, 4.0]), var)])
    np.testing.assert_allclose(var.numpy(), [0.55, 0.4], rtol=1e-6)
    for bad in (
        lambda: ClippedSGD(max_norm=float("nan")),
        lambda: ClippedSGD(learning_rate=float("inf")),
        lambda: optimizers.Adam(beta_2=float("inf")),
    ):
        with pytest.raises(ValueError, match="max_norm|learning_rate|beta_2"):
            bad()


class LoggedSGD(optimizers.Optimizer):
    """Records a diagnostic in a plain attribute from its hook."""

    def __init__(self, learning_rate=0.1, name="LoggedSGD", **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        self.last_norm = jnp.linalg.norm(grad)
        var.assign_sub(self._decayed_lr(var.dtype) * grad)


def test_an_array_a_hook_stores_in_an_attribute_is_the_steps_value():
    """The attribute was left holding the trace's value (a leaked tracer: reading it raised a
    ConcretizationTypeError); tf.keras run eagerly leaves 5.0, then 1.0."""
    opt, var = LoggedSGD(), kopt.Variable(np.ones(3, np.float32))
    for grad, norm in (([3.0, 4.0, 0.0], 5.0), ([1.0, 0.0, 0.0], 1.0), ([0.0, 0.0, 2.0], 2.0)):
        opt.apply_gradients([(jnp.asarray(grad), var)])
        assert float(opt.last_norm) == norm
    assert opt.compile_count == 1


class EncoderNorm(optimizers.Optimizer):
    """Records the norm of one variable's gradient only (a per-layer diagnostic)."""

    def __init__(self, learning_rate=0.1, name="EncoderNorm", **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)
        self.last_norm = None

    def _resource_apply_dense(self, grad, var, apply_state=None):
        if var.shape == (3,):
            self.last_norm = jnp.linalg.norm(grad)
        var.assign_sub(self._decayed_lr(var.dtype) * grad)


def test_a_step_whose_hooks_set_no_attribute_leaves_it_as_it_was():
    """A step compiled after the attribute was set (over other variables, whose hook writes
    nothing) wrote back the value it held then, a stale constant of that program."""
    opt = EncoderNorm()
    enc, dec = kopt.Variable(jnp.ones(3)), kopt.Variable(jnp.ones(2))
    opt.apply_gradients([(jnp.full(3, 1.0), enc)])
    opt.apply_gradients([(jnp.ones(2), dec)])
    opt.apply_gradients([(jnp.full(3, 20.0), enc)])
    opt.apply_gradients([(jnp.ones(2), dec)])
    np.testing.assert_allclose(float(opt.last_norm), 20.0 * np.sqrt(3.0), rtol=1e-6)


def test_an_attribute_an_inner_optimizers_hook_sets_holds_the_steps_value():
    inner = LoggedSGD()
    opt = Lookahead(inner)
    var = kopt.Variable(np.ones(3, np.float32))
    opt.apply_gradients([(jnp.array([3.0, 4.0, 0.0]), var)])
    assert float(inner.last_norm) == 5.0


@pytest.mark.parametrize("cls", [optimizers.AdamW, optimizers.Lion, optimizers.Nadam])
def test_a_decayed_lr_override_on_a_class_that_does_not_read_it_changes_nothing(cls):
    """Keras 3's classes and tf.keras's Nadam take their learning rate themselves: a subclass
    overriding `_decayed_lr` crashed every step (AdamW: an unexpected `constrain` argument;
    Nadam: its one-variable-at-a-time refusal). It steps as the class does."""
    sub = type("Warm" + cls.__name__, (cls,), {"_decayed_lr": lambda self, d: 0.5 * 0.1})
    plain, warm = cls(0.1), sub(0.1)
    a, b = kopt.Variable([1.0, -1.0]), kopt.Variable([1.0, -1.0])
    for g in ([0.5, 0.2], [-0.1, 0.3]):
        plain.apply_gradients([(jnp.asarray(g), a)])
        warm.apply_gradients([(jnp.asarray(g), b)])
    np.testing.assert_array_equal(a.numpy(), b.numpy())


class ClippedAdam(optimizers.Adam):
    """A built-in subclass with an infinite hyperparameter of its own."""

    def __init__(self, learning_rate=0.1, max_norm=float("inf"), **kwargs):
        super().__init__(learning_rate, **kwargs)
        self._set_hyper("max_norm", max_norm)


def test_a_builtin_subclass_may_have_an_infinite_hyperparameter_of_its_own():
    assert float(ClippedAdam()._get_hyper("max_norm").numpy()) == float("inf")
    with pytest.raises(ValueError, match="beta_1"):
        ClippedAdam(beta_1=float("inf"))


class LazyAdagrad(optimizers.Optimizer):
    """tf.keras style with its slot made on first use, inside the hooks (tf.keras's lazily
    made slots), and the gradient's sum kept in an attribute written before the slot is."""

    def __init__(self, learning_rate=0.1, name="LazyAdagrad", **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)

    def _create_slots(self, var_list):
        pass

    def _resource_apply_dense(self, grad, var, apply_state=None):
        self.last_sum = jnp.sum(grad)
        acc = self.add_slot(var, "acc", initializer=0.5, shape=var.shape)
        acc.assign_add(grad * grad)
        return var.assign_sub(self._get_hyper("learning_rate") * grad / jnp.sqrt(acc.value))

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        acc = self.add_slot(var, "acc", initializer=lambda shape, dtype: jnp.ones(shape, dtype))
        rows = self._resource_scatter_add(acc, indices, grad * grad)[indices]
        lr = self._get_hyper("learning_rate")
        return self._resource_scatter_add(var, indices, -lr * grad / jnp.sqrt(rows))

    def get_config(self):
        return super().get_config()


def test_a_slot_made_inside_a_hook_trains_as_in_tf_keras():
    """The step is traced again with the new slot among its inputs: one program per
    structure, the slot holds the step's values, and so does an attribute the hook set."""
    opt = LazyAdagrad()
    v, w = kopt.Variable([1.0, 2.0]), kopt.Variable([[1.0], [2.0], [3.0]])
    grads = [np.array([0.5, -1.0], np.float32), np.array([1.5, 0.25], np.float32)]
    acc = np.full(2, 0.5, np.float32)
    expected = np.array([1.0, 2.0], np.float32)
    for g in grads:
        opt.apply_gradients([(jnp.asarray(g), v)])
        acc = acc + g * g
        expected = expected - 0.1 * g / np.sqrt(acc)
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(opt.get_slot(v, "acc").numpy(), acc, rtol=1e-6)
    assert float(opt.last_sum) == 1.75  # the last step's, not a traced value
    assert opt.compile_count == 1 and opt.get_slot_names() == ["acc"]
    opt.apply_gradients([(kopt.IndexedSlices(jnp.array([[2.0]]), jnp.array([1])), w)])
    np.testing.assert_allclose(opt.get_slot(w, "acc").numpy(), [[1.0], [5.0], [1.0]])
    np.testing.assert_allclose(w.numpy(), [[1.0], [2.0 - 0.2 / np.sqrt(5.0)], [3.0]], rtol=1e-6)
    assert [x.shape for x in opt.get_weights()] == [(), (2,), (3, 1)]
    assert int(opt.iterations.numpy()) == 3 and opt.compile_count == 2


class SlotFromTheGradient(LazyAdagrad):
    def _resource_apply_dense(self, grad, var, apply_state=None):
        acc = self.add_slot(var, "acc", initializer=grad * grad)  # known only in the step
        return var.assign_sub(self._get_hyper("learning_rate") * grad / jnp.sqrt(acc.value))


def test_a_slot_made_inside_a_hook_from_a_value_of_the_step_is_refused():
    opt, v = SlotFromTheGradient(), kopt.Variable([1.0, 2.0])
    with pytest.raises(TypeError, match="'acc' of .* inside the step.*_create_slots"):
        opt.apply_gradients([(jnp.ones(2), v)])
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])
    assert opt.weights == [] and "last_sum" not in vars(opt)


def test_slots_several_hooks_make_in_one_step_take_one_trace_more():
    """Each slot made in a hook abandoned the trace at once, so a step over N such variables
    traced N + 1 times (minutes for a few hundred variables)."""
    calls = []

    class Counted(LazyAdagrad):
        def _resource_apply_dense(self, grad, var, apply_state=None):
            calls.append(var.name)
            return super()._resource_apply_dense(grad, var, apply_state)

    opt = Counted()
    variables = [kopt.Variable(np.full(2, float(i + 1), np.float32)) for i in range(5)]
    opt.apply_gradients([(jnp.ones(2), v) for v in variables])
    assert len(calls) == 2 * len(variables)  # the trace that made the slots, and the step's
    assert opt.compile_count == 1
    for v, start in zip(variables, range(1, 6), strict=True):
        np.testing.assert_allclose(opt.get_slot(v, "acc").numpy(), [1.5, 1.5])
        np.testing.assert_allclose(v.numpy(), start - 0.1 / np.sqrt(1.5), rtol=1e-6)
