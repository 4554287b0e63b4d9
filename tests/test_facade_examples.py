"""tf.keras's documented ``OptimizerV2`` examples, written for kopt, against NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt.optimizers import SGD, Optimizer
from kopt.optimizers.schedules import ExponentialDecay


def test_minimize_doc_example():
    var1, var2 = kopt.Variable(1.0), kopt.Variable(2.0)
    opt = SGD(learning_rate=0.1)
    loss = lambda: 3 * var1 * var1 + 2 * var2 * var2
    result = opt.minimize(loss, var_list=[var1, var2])
    # d/dvar1 = 6 var1, d/dvar2 = 4 var2.
    np.testing.assert_allclose(var1.numpy(), 1.0 - 0.1 * 6.0, rtol=1e-6)
    np.testing.assert_allclose(var2.numpy(), 2.0 - 0.1 * 8.0, rtol=1e-6)
    assert int(result.numpy()) == 1
    opt.minimize(loss, var_list=[var1, var2])
    np.testing.assert_allclose(var1.numpy(), 0.4 - 0.1 * 6.0 * 0.4, rtol=1e-6)
    np.testing.assert_allclose(var2.numpy(), 1.2 - 0.1 * 4.0 * 1.2, rtol=1e-6)


class LazyDense:
    """A sigmoid dense layer that creates its variables on the first call, as Keras layers do."""

    def __init__(self, units):
        self.units = units
        self.kernel = self.bias = None

    def __call__(self, x):
        if self.kernel is None:
            init = np.linspace(-0.5, 0.5, x.shape[-1] * self.units, dtype=np.float32)
            self.kernel = kopt.Variable(init.reshape(x.shape[-1], self.units), name="kernel")
            self.bias = kopt.Variable(np.zeros(self.units, np.float32), name="bias")
        return jnp.reciprocal(1.0 + jnp.exp(-(x @ self.kernel + self.bias)))

    @property
    def trainable_weights(self):
        return [self.kernel, self.bias]


def test_custom_loop_with_var_list_fn_sees_fresh_data_every_step():
    rng = np.random.default_rng(0)
    data = [
        (rng.normal(size=(4, 3)).astype(np.float32), rng.uniform(size=(4, 2)).astype(np.float32))
        for _ in range(5)
    ]
    model = LazyDense(2)
    opt = SGD(learning_rate=0.5)
    loss_fn = lambda: jnp.mean(jnp.square(model(input) - output), axis=-1)  # per sample, as mse
    var_list_fn = lambda: model.trainable_weights
    kernel, bias = None, None
    for input, output in data:  # tf.keras's example names, read by the closure
        opt.minimize(loss_fn, var_list_fn)
        if kernel is None:  # NumPy twin, from the values the model was created with
            kernel = np.linspace(-0.5, 0.5, 6).reshape(3, 2)
            bias = np.zeros(2)
        x, y = input.astype(np.float64), output.astype(np.float64)
        s = 1.0 / (1.0 + np.exp(-(x @ kernel + bias)))
        d = 2.0 * (s - y) / y.shape[-1] * s * (1.0 - s)  # gradient of the sum of per-sample losses
        kernel, bias = kernel - 0.5 * x.T @ d, bias - 0.5 * d.sum(0)
        np.testing.assert_allclose(model.kernel.numpy(), kernel, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.bias.numpy(), bias, rtol=1e-5, atol=1e-6)
    assert opt.compile_count == 1
    assert int(opt.iterations.numpy()) == len(data)


def test_compute_process_apply():
    var_list = [kopt.Variable([1.0, -2.0]), kopt.Variable(3.0)]
    opt = SGD(learning_rate=0.1)
    loss = lambda: jnp.sum(var_list[0] ** 2) + 5.0 * var_list[1]
    grads_and_vars = opt.compute_gradients(loss, var_list)
    grads = [g for g, _ in grads_and_vars]
    np.testing.assert_allclose(grads[0], [2.0, -4.0])
    np.testing.assert_allclose(grads[1], 5.0)
    processed = [jnp.clip(g, -1.0, 1.0) for g in grads]  # cap them
    opt.apply_gradients(zip(processed, var_list, strict=True))
    np.testing.assert_allclose(var_list[0].numpy(), [0.9, -1.9], rtol=1e-6)
    np.testing.assert_allclose(var_list[1].numpy(), 2.9, rtol=1e-6)


def test_overwriting_learning_rate_between_steps():
    var1, var2 = kopt.Variable(1.0), kopt.Variable(2.0)
    opt = SGD(learning_rate=0.1)
    loss = lambda: 3 * var1 + 2 * var2
    expected1, expected2 = 1.0, 2.0
    for lr in (0.1, 0.05, 0.2, 0.025):
        if lr == 0.05:
            opt.learning_rate = 0.05
        elif lr != 0.1:
            opt.lr = lr
        opt.minimize(loss, var_list=[var1, var2])
        expected1, expected2 = expected1 - lr * 3, expected2 - lr * 2
        np.testing.assert_allclose(var1.numpy(), expected1, rtol=1e-6)
        np.testing.assert_allclose(var2.numpy(), expected2, rtol=1e-6)
    np.testing.assert_allclose(opt.lr.numpy(), 0.025)
    assert opt.learning_rate is opt.lr
    assert opt.compile_count == 1


def test_exponential_decay_schedule():
    var = kopt.Variable(np.random.default_rng(0).random(size=(1,)).astype(np.float32))
    expected = var.numpy().astype(np.float64)
    opt = SGD(
        learning_rate=ExponentialDecay(initial_learning_rate=0.01, decay_steps=20, decay_rate=0.1)
    )
    for step in range(6):
        opt.minimize(lambda: 3 * var, var_list=[var])
        expected = expected - 3 * 0.01 * 0.1 ** (step / 20)  # the schedule sees the step before
        np.testing.assert_allclose(var.numpy(), expected, rtol=1e-6)
    assert opt.compile_count == 1


def test_zero_argument_callable_learning_rate_read_every_step():
    var = kopt.Variable(np.array([0.5], np.float32))
    rates = iter([0.1, 0.3, 0.05, 0.2])
    current = {"lr": next(rates)}
    opt = SGD(learning_rate=lambda: current["lr"])
    expected = 0.5
    for _ in range(4):
        opt.minimize(lambda: 3 * var, var_list=[var])
        expected -= 3 * current["lr"]
        np.testing.assert_allclose(var.numpy(), [expected], rtol=1e-6)
        current["lr"] = next(rates, 0.0)
    assert opt.compile_count == 1


class MomentumSGD(Optimizer):
    """A user's optimizer written the tf.keras way: ``v = mu v - lr g; w += v``."""

    def __init__(self, learning_rate=0.01, momentum=0.9, name="MomentumSGD", **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", kwargs.get("lr", learning_rate))
        self._set_hyper("decay", self._initial_decay)
        self._set_hyper("momentum", momentum)

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "velocity")

    def _resource_apply_dense(self, grad, var, apply_state=None):
        coefficients = apply_state[(var.device, var.dtype)]
        velocity = self.get_slot(var, "velocity")
        momentum = self._get_hyper("momentum", var.dtype)
        velocity.assign(momentum * velocity - coefficients["lr_t"] * grad)
        var.assign_add(velocity)

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        lr = self._decayed_lr(var.dtype)
        velocity = self.get_slot(var, "velocity")
        rows = self._get_hyper("momentum", var.dtype) * velocity[indices] - lr * grad
        velocity.assign(velocity.value.at[indices].set(rows))
        var.assign(var.value.at[indices].add(rows))

    def get_config(self):
        config = super().get_config()
        config.update(
            learning_rate=self._serialize_hyperparameter("learning_rate"),
            decay=self._initial_decay,
            momentum=self._serialize_hyperparameter("momentum"),
        )
        return config


def momentum_sgd_numpy(w, grads, lr, momentum, decay, first_step=0):
    w = np.asarray(w, np.float64)
    velocity = np.zeros_like(w)
    for t, g in enumerate(grads, start=first_step):
        velocity = momentum * velocity - lr / (1.0 + decay * t) * np.asarray(g, np.float64)
        w = w + velocity
    return w, velocity


def test_custom_optimizer_dense_matches_numpy_and_compiles_once():
    grads = [np.array([1.0, -2.0, 0.5], np.float32) * (i + 1) for i in range(5)]
    var = kopt.Variable([1.0, 2.0, 3.0], name="w")
    opt = MomentumSGD(learning_rate=0.1, momentum=0.5, decay=0.1)
    assert opt.weights == []
    for g in grads:
        opt.apply_gradients([(jnp.asarray(g), var)])
    expected, velocity = momentum_sgd_numpy([1.0, 2.0, 3.0], grads, 0.1, 0.5, 0.1)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(opt.get_slot(var, "velocity").numpy(), velocity, rtol=1e-5)
    assert opt.compile_count == 1
    assert [w.name for w in opt.weights] == ["MomentumSGD/iter:0", "MomentumSGD/w/velocity:0"]
    assert opt.get_slot_names() == ["velocity"]
    assert int(opt.iterations.numpy()) == 5
    opt.momentum = 0.25  # a hyperparameter change does not recompile
    opt.apply_gradients([(jnp.ones(3), var)])
    assert opt.compile_count == 1
    np.testing.assert_allclose(opt._get_hyper("momentum"), 0.25)


def test_custom_optimizer_sparse_sums_duplicates_and_config_round_trips():
    table = kopt.Variable(np.ones((4, 2), np.float32), name="table")
    opt = MomentumSGD(learning_rate=0.2, momentum=0.5)
    values = jnp.array([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]])
    for _ in range(2):
        opt.apply_gradients([(kopt.IndexedSlices(values, jnp.array([0, 2, 0])), table)])
    row0 = np.array([1.5, 2.5])  # duplicates summed before the update
    row2 = np.array([3.0, 4.0])
    expected = np.ones((4, 2))
    for rows, grad in ((0, row0), (2, row2)):
        expected[rows], _ = momentum_sgd_numpy(np.ones(2), [grad, grad], 0.2, 0.5, 0.0)
    np.testing.assert_allclose(table.numpy(), expected, rtol=1e-6)
    assert opt.compile_count == 1

    config = opt.get_config()
    assert config == {
        "name": "MomentumSGD",
        "learning_rate": pytest.approx(0.2),
        "decay": 0.0,
        "momentum": 0.5,
    }
    clone = kopt.optimizers.deserialize(
        {"class_name": "MomentumSGD", "config": config}, custom_objects={"MomentumSGD": MomentumSGD}
    )
    assert isinstance(clone, MomentumSGD)
    assert clone.get_config() == config
