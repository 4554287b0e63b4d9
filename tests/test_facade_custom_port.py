"""A tf.keras custom optimizer ported by changing imports: the tf idioms it uses keep working
(``use_locking``, ``self._use_locking``, Keras initializer names), the sparse hook's index
contract, and the error a hook gets for a Python ``if`` on a traced value."""

import jax.numpy as jnp
import numpy as np
import pytest

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
