"""Every built-in facade class, configured so that all of its slots exist, for the facade tests."""

import jax.numpy as jnp
import numpy as np

import kopt
from kopt import optimizers

# class name -> constructor kwargs (every slot and option in use).
BUILTINS = {
    "SGD": dict(learning_rate=0.1, momentum=0.9, nesterov=True),
    "Adam": dict(learning_rate=0.1, amsgrad=True),
    "Adagrad": dict(learning_rate=0.1),
    "Adadelta": dict(learning_rate=1.0),
    "Adamax": dict(learning_rate=0.1),
    "Nadam": dict(learning_rate=0.1),
    "RMSprop": dict(learning_rate=0.1, momentum=0.5, centered=True),
    "Ftrl": dict(
        learning_rate=0.1,
        l1_regularization_strength=0.01,
        l2_regularization_strength=0.01,
        l2_shrinkage_regularization_strength=0.01,
        beta=0.1,
    ),
    "AdamW": dict(learning_rate=0.1),
    "Lion": dict(learning_rate=0.1),
    "Lamb": dict(learning_rate=0.1),
    "Adafactor": dict(learning_rate=0.1),
}

NAMES = list(BUILTINS)


def make(name, **overrides):
    """A fresh optimizer of the built-in class ``name``."""
    return getattr(kopt.optimizers, name)(**{**BUILTINS[name], **overrides})


def make_variables():
    """A matrix and a vector (Adafactor factors the matrix)."""
    return [
        kopt.Variable(np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(3, 2), name="w"),
        kopt.Variable(np.array([0.5, -0.25], np.float32), name="b"),
    ]


def gradients(steps, seed=0):
    """``steps`` lists of gradients for :func:`make_variables`."""
    rng = np.random.default_rng(seed)
    return [
        [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]
        for _ in range(steps)
    ]


def learning_rates_used(opt, steps, before_step=lambda step: None):
    """The learning rate each of ``steps`` steps of the SGD ``opt`` used (a gradient of 1 on
    a scalar), calling ``before_step(step)`` first (to assign a variable, say)."""
    var = kopt.Variable(0.0)
    used = []
    for step in range(steps):
        before_step(step)
        before = float(var.numpy())
        opt.apply_gradients([(jnp.float32(1.0), var)])
        used.append(before - float(var.numpy()))
    return used


class NormTracker(optimizers.Optimizer):
    """A custom optimizer written the tf.keras way with non-slot weights (``add_weight``): one
    its hook updates (an EMA of the gradient norm) and one it only reads (a multiplier the user
    may assign). They are its state, though not in ``weights`` (as in tf.keras)."""

    def __init__(self, learning_rate=0.1, name="NormTracker", **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)

    def _create_slots(self, var_list):
        if not hasattr(self, "norm_ema"):
            self.norm_ema = self.add_weight("norm_ema", shape=[], trainable=False)
            self.mult = self.add_weight("mult", shape=[], initializer="ones", trainable=False)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        ema = self.norm_ema.assign(0.9 * self.norm_ema + 0.1 * jnp.linalg.norm(grad))
        lr = self._get_hyper("learning_rate", var.dtype)
        return var.assign_sub(lr * self.mult * grad / (1.0 + ema))

    def get_config(self):
        config = super().get_config()
        config["learning_rate"] = self._serialize_hyperparameter("learning_rate")
        return config


class Lookahead(optimizers.Optimizer):
    """tf-addons' Lookahead, as docs/from-tf-keras.md ports it: an inner optimizer held in an
    attribute (sharing the wrapper's step count), whose slots and update the wrapper's hooks
    use, syncing to slow weights every ``sync_period`` steps."""

    def __init__(self, optimizer, sync_period=2, slow_step_size=0.5, name="Lookahead"):
        super().__init__(name)
        self._optimizer = optimizer
        self._set_hyper("sync_period", sync_period)
        self._set_hyper("slow_step_size", slow_step_size)

    def apply_gradients(self, grads_and_vars, name=None, **kwargs):
        self._optimizer._iterations = self.iterations
        return super().apply_gradients(grads_and_vars, name, **kwargs)

    def _create_slots(self, var_list):
        self._optimizer._create_slots(var_list=var_list)
        for var in var_list:
            self.add_slot(var, "slow", initializer=var)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        self._optimizer._resource_apply_dense(grad, var)
        slow = self.get_slot(var, "slow")
        sync = (self.iterations + 1) % self._get_hyper("sync_period", jnp.int32) == 0
        back = slow + self._get_hyper("slow_step_size", var.dtype) * (var - slow)
        slow.assign(jnp.where(sync, back, slow))
        var.assign(jnp.where(sync, back, var))

    def get_config(self):
        return {
            **super().get_config(),
            "optimizer": optimizers.serialize(self._optimizer),
            "sync_period": self._serialize_hyperparameter("sync_period"),
            "slow_step_size": self._serialize_hyperparameter("slow_step_size"),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        return cls(optimizers.deserialize(config.pop("optimizer")), **config)
