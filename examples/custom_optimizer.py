"""Port a custom tf.keras optimizer to kopt, and train with it.

tf.keras documents how to write your own optimizer: subclass ``tf.keras.optimizers.Optimizer``,
declare hyperparameters with ``_set_hyper``, create slots in ``_create_slots`` with
``add_slot``, update in ``_resource_apply_dense`` / ``_resource_apply_sparse`` with
``var.assign*``, and list the hyperparameters in ``get_config``. The same class runs on kopt
after a mechanical port:

    tf.keras                                  kopt
    ----------------------------------------  ----------------------------------------------
    tf.keras.optimizers.Optimizer             kopt.optimizers.Optimizer
    tf.Variable                               kopt.Variable
    tf.sqrt, tf.square, ...                   jnp.sqrt, jnp.square, ...
    tf.cast(x, dtype)                         jnp.asarray(x).astype(dtype)
    var.dtype.base_dtype                      var.dtype
    tf.GradientTape + apply_gradients         opt.compute_gradients + opt.apply_gradients
    self._resource_scatter_update(x, i, v)    unchanged
    tf.group(...), tf.control_dependencies    not needed: assignments apply in program order
    @tf.function on the apply methods         not needed: kopt compiles the whole step

The optimizer below is AdaBelief (Zhuang et al., 2020, "AdaBelief Optimizer: Adapting Stepsizes
by the Belief in Observed Gradients"), which kopt does not ship:

    m <- beta_1 m + (1 - beta_1) g
    s <- beta_2 s + (1 - beta_2) (g - m)^2 + epsilon
    w <- w - lr * (m / (1 - beta_1^t)) / (sqrt(s / (1 - beta_2^t)) + epsilon)

The script checks the first steps against a NumPy re-derivation of those formulas, applies one
sparse (row) gradient, round-trips the config, then trains softmax regression on scikit-learn's
digits with it and with the built-in Adam.

Run:
    python examples/custom_optimizer.py --steps 300
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from tqdm import tqdm

import kopt


class AdaBelief(kopt.optimizers.Optimizer):
    """AdaBelief, written the way tf.keras documents custom optimizers."""

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-14,
        name="AdaBelief",
        **kwargs,
    ):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", kwargs.get("lr", learning_rate))
        self._set_hyper("decay", self._initial_decay)
        self._set_hyper("beta_1", beta_1)
        self._set_hyper("beta_2", beta_2)
        self.epsilon = epsilon

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "m")
        for var in var_list:
            self.add_slot(var, "s")

    def _prepare_local(self, var_device, var_dtype, apply_state):
        super()._prepare_local(var_device, var_dtype, apply_state)  # sets "lr_t"
        local_step = jnp.asarray(self.iterations + 1).astype(var_dtype)
        beta_1_t = jnp.asarray(self._get_hyper("beta_1", var_dtype))
        beta_2_t = jnp.asarray(self._get_hyper("beta_2", var_dtype))
        apply_state[(var_device, var_dtype)].update(
            beta_1_t=beta_1_t,
            beta_2_t=beta_2_t,
            bias_1=1 - beta_1_t**local_step,
            bias_2=1 - beta_2_t**local_step,
            epsilon=jnp.asarray(self.epsilon, var_dtype),
        )

    def _coefficients(self, var, apply_state):
        key = (var.device, var.dtype)
        return (apply_state or {}).get(key) or self._fallback_apply_state(*key)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        c = self._coefficients(var, apply_state)
        m = self.get_slot(var, "m")
        s = self.get_slot(var, "s")
        m.assign(c["beta_1_t"] * m + (1 - c["beta_1_t"]) * grad)
        s.assign(c["beta_2_t"] * s + (1 - c["beta_2_t"]) * jnp.square(grad - m) + c["epsilon"])
        m_hat = m / c["bias_1"]
        s_hat = s / c["bias_2"]
        var.assign_sub(c["lr_t"] * m_hat / (jnp.sqrt(s_hat) + c["epsilon"]))

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        """Lazy rule: only the rows in ``indices`` (unique; kopt sums duplicates first) move."""
        c = self._coefficients(var, apply_state)
        m = self.get_slot(var, "m")
        s = self.get_slot(var, "s")
        m_rows = c["beta_1_t"] * m[indices] + (1 - c["beta_1_t"]) * grad
        s_rows = (
            c["beta_2_t"] * s[indices]
            + (1 - c["beta_2_t"]) * jnp.square(grad - m_rows)
            + c["epsilon"]
        )
        m.assign(m.value.at[indices].set(m_rows))
        s.assign(s.value.at[indices].set(s_rows))
        step = c["lr_t"] * (m_rows / c["bias_1"]) / (jnp.sqrt(s_rows / c["bias_2"]) + c["epsilon"])
        var.assign(var.value.at[indices].add(-step))

    def get_config(self):
        return {
            **super().get_config(),
            "learning_rate": self._serialize_hyperparameter("learning_rate"),
            "decay": self._serialize_hyperparameter("decay"),
            "beta_1": self._serialize_hyperparameter("beta_1"),
            "beta_2": self._serialize_hyperparameter("beta_2"),
            "epsilon": self.epsilon,
        }


def numpy_adabelief(w, grads, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-14):
    """The same algorithm in float64 NumPy: an independent check of the port."""
    w = np.array(w, np.float64)
    m, s = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        s = beta_2 * s + (1 - beta_2) * (g - m) ** 2 + epsilon
        w = w - lr * (m / (1 - beta_1**t)) / (np.sqrt(s / (1 - beta_2**t)) + epsilon)
    return w


def check_against_numpy() -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 2)).astype(np.float32)
    grads = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(5)]
    var = kopt.Variable(w0, name="w")
    opt = AdaBelief(learning_rate=0.1)
    for g in grads:
        opt.apply_gradients([(g, var)])
    expected = numpy_adabelief(w0, grads, lr=0.1)
    error = np.max(np.abs(var.numpy() - expected))
    print(f"5 dense steps vs NumPy re-derivation: max |error| = {error:.1e}")
    assert error < 1e-5, error
    print(f"slots: {opt.get_slot_names()}, iterations: {int(opt.iterations.numpy())}")


def check_sparse_step() -> None:
    table = kopt.Variable(np.ones((5, 2), np.float32), name="embedding")
    opt = AdaBelief(learning_rate=0.5)
    rows = kopt.IndexedSlices(
        values=jnp.array([[1.0, -1.0], [2.0, 2.0]]), indices=jnp.array([1, 3])
    )
    opt.apply_gradients([(rows, table)])
    moved = np.flatnonzero(np.any(table.numpy() != 1.0, axis=1)).tolist()
    print(f"sparse step on rows [1, 3]: rows that moved = {moved}")
    assert moved == [1, 3], moved


def check_config() -> None:
    opt = AdaBelief(learning_rate=0.02, beta_2=0.99, clipnorm=1.0)
    config = opt.get_config()
    clone = AdaBelief.from_config(config)
    assert clone.get_config() == config
    restored = kopt.optimizers.deserialize(
        kopt.optimizers.serialize(opt), custom_objects={"AdaBelief": AdaBelief}
    )
    assert isinstance(restored, AdaBelief) and restored.get_config() == config
    print(f"get_config / from_config / serialize round trip: {config}")


def train(make_optimizer, steps: int, data, progress: bool, label: str):
    (x, y), (x_test, y_test) = data
    w = kopt.Variable(np.zeros((x.shape[1], 10), np.float32), name="w")
    b = kopt.Variable(np.zeros(10, np.float32), name="b")
    opt = make_optimizer()
    rng = np.random.default_rng(0)

    @jax.jit
    def loss_fn(w, b, x, y):
        log_probs = jax.nn.log_softmax(x @ w + b)
        return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))

    for step in tqdm(range(steps), desc=label, leave=False, disable=not progress):
        if step == steps // 2:
            # Hyperparameters are attributes, as in tf.keras; changing one does not recompile.
            opt.learning_rate = opt.learning_rate * 0.3
        idx = rng.integers(0, len(x), 64)
        grads_and_vars = opt.compute_gradients(
            lambda idx=idx: loss_fn(w, b, x[idx], y[idx]), [w, b]
        )
        opt.apply_gradients(grads_and_vars)
    accuracy = float(jnp.mean(jnp.argmax(x_test @ w.value + b.value, axis=-1) == y_test))
    return float(loss_fn(w, b, x, y)), accuracy, opt.compile_count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    check_against_numpy()
    check_sparse_step()
    check_config()

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    data = ((x[:1400], y[:1400]), (x[1400:], y[1400:]))
    progress = args.steps >= 100
    print(f"softmax regression on digits, {args.steps} steps of batch 64:")
    for label, make in (
        ("AdaBelief (custom)", lambda: AdaBelief(learning_rate=0.01)),
        ("Adam (built-in)", lambda: kopt.optimizers.Adam(learning_rate=0.01)),
    ):
        loss, accuracy, compiles = train(make, args.steps, data, progress, label)
        print(
            f"  {label:<19} train loss {loss:.4f}  test accuracy {accuracy:.1%}  "
            f"(step compiled {compiles}x)"
        )


if __name__ == "__main__":
    main()
