"""The built-in optimizers: thin declarations over their functional twins in :mod:`kopt.alias`.

Each class states its Keras constructor, hyperparameters, plain attributes, slot order and
config keys, and which functional optimizer it wraps. No update rule is written here.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kopt
from kopt.base import (
    _RANGES,
    GradientTransformation,
    OptimizerState,
    _hyperparam_holders,
    _replace_hyperparam,
    as_count,
    check_slot_dtype,
    extra_args_update,
    safe_increment,
)
from kopt.optimizers.base import (
    _CLIP_PIECES,
    Optimizer,
    _as_pairs,
    _check_number,
    _initial_value,
    _is_read_per_step,
    _is_step_schedule,
    _put_like,
    weight_list,
)
from kopt.optimizers.schedules import LearningRateSchedule
from kopt.optimizers.schedules import _config_value as schedule_config
from kopt.sparse import map_values
from kopt.transforms._weight_decay import decoupled_weight_decay
from kopt.variables import Variable

EPSILON = 1e-7


def _value_if_number(owner: str, name: str, value: Any) -> float | None:
    """A hyperparameter's value for a range check in a constructor: None for a schedule or a
    zero-argument callable (read at each step), and for a traced value.

    Raises:
        TypeError: if ``value`` is not a real scalar, a schedule or a callable.
    """
    _check_number(owner, name, value)
    if isinstance(value, Variable):
        value = value.value
    if isinstance(value, jax.core.Tracer) or callable(value):
        return None
    return float(np.asarray(value))


def _config_value(value: Any) -> Any:
    """A Keras 3 class's hyperparameter attribute as its config stores it (a schedule as its
    serialized dict, which ``from_config`` turns back into the schedule)."""
    return schedule_config(value) if _is_step_schedule(value) else value


def _flag_momentum(owner: str, momentum: Any) -> bool:
    """Keras's rule, fixed at construction: momentum is on for a tensor, a callable or > 0."""
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
        if momentum < 0 or momentum > 1:
            raise ValueError(
                f"`momentum` must be between [0, 1]. Received: momentum={momentum} "
                f"(of type {type(momentum)})."
            )
        return momentum > 0
    return True


class _SlotDtype:
    """``slot_dtype``: every slot the optimizer creates has that dtype (default: its variable's).
    The functional twin gets the same ``slot_dtype``, so the update runs in it."""

    def add_slot(self, var, slot_name, initializer="zeros", shape=None):
        created = slot_name not in self._slots.get(getattr(var, "_uid", None), {})
        slot = super().add_slot(var, slot_name, initializer, shape)
        if created and self.slot_dtype is not None:
            value = _initial_value(initializer, slot.shape, self.slot_dtype)
            # Placed as the slot of the variable's dtype was: committed only beside a committed
            # variable, so the step's inputs keep one placement from the first step on.
            slot._value = _put_like(value, slot.value)
        return slot


def _momentum_value(flag: bool, value: Any) -> Any:
    if not flag:  # no momentum slot, but the value set is still checked (a config restores it)
        low, high, low_inclusive = _RANGES["momentum"]
        kopt.base.check_hyperparam(
            "momentum", "momentum", value, low=low, high=high, low_inclusive=low_inclusive
        )
        return 0.0
    return value if _is_step_schedule(value) else jnp.asarray(value, jnp.float32)


class _KerasV2(_SlotDtype, Optimizer):
    """Shared constructor tail of the legacy classes: learning rate (``lr`` wins) and decay.

    Each also takes ``slot_dtype`` (kopt's, not Keras's): the dtype of its slots, e.g. float32
    slots for bfloat16 variables (default: each variable's dtype).
    """

    # Their updates take the learning rate from `_decayed_lr` (through `_prepare_local`), so a
    # subclass overriding it changes the step, as in tf.keras.
    _USES_DECAYED_LR = True

    _EPSILON_ATTR = True

    def __init__(self, name: str, slot_dtype: Any = None, **kwargs: Any):
        # The slots' dtype, e.g. float32 slots for bfloat16 variables.
        check_slot_dtype(type(self).__name__, slot_dtype, allow_complex=False)
        super().__init__(name, **kwargs)
        self.slot_dtype = slot_dtype

    def _init_learning_rate(self, learning_rate: Any, kwargs: dict[str, Any]) -> None:
        self._set_hyper("learning_rate", kwargs.get("lr", learning_rate))
        self._set_hyper("decay", self._initial_decay)

    def _plain_hyperparams(self) -> dict[str, float]:
        return {"epsilon": self.epsilon} if hasattr(self, "epsilon") else {}

    def _prepare_local(self, var_device, var_dtype, apply_state):
        """tf.keras's coefficients, for a subclass's hook that reads them from
        ``apply_state`` (one that copies the built-in's update and changes it): ``lr_t`` and
        the class's own (Adam's ``beta_1_power``, ``one_minus_beta_1_t``, ``lr``...)."""
        super()._prepare_local(var_device, var_dtype, apply_state)
        coefficients = apply_state[(var_device, var_dtype)]
        coefficients.update(self._local_coefficients(var_dtype, coefficients.get("lr_t")))

    def _local_coefficients(self, dtype: Any, lr_t: Any) -> dict[str, Any]:
        return {}

    def _hyper_t(self, name: str, dtype: Any) -> jax.Array:
        """Hyperparameter ``name`` for this step, in ``dtype`` (a schedule at ``iterations``)."""
        value = self._get_hyper(name)
        if _is_step_schedule(value):
            value = value(jnp.asarray(self.iterations.value).astype(jnp.float32))
        if isinstance(value, Variable):
            value = value.value
        return jnp.asarray(value).astype(dtype)

    def _epsilon_t(self, dtype: Any) -> jax.Array:
        return jnp.asarray(self.epsilon, dtype)

    def _local_step(self, dtype: Any) -> jax.Array:
        return (jnp.asarray(self.iterations.value) + 1).astype(dtype)

    def _base_config(self) -> dict[str, Any]:
        config = {
            **super().get_config(),
            "learning_rate": self._serialize_hyperparameter("learning_rate"),
            "decay": self._serialize_hyperparameter("decay"),
        }
        if self.slot_dtype is not None:
            config["slot_dtype"] = jnp.dtype(self.slot_dtype).name
        return config


class SGD(_KerasV2):
    """Gradient descent with optional (Nesterov) momentum; tf.keras's legacy ``SGD``.

    Example:
        >>> import kopt
        >>> var = kopt.Variable(1.0)
        >>> opt = kopt.optimizers.SGD(learning_rate=0.1)
        >>> _ = opt.minimize(lambda: (var ** 2) / 2.0, [var])
        >>> float(var.numpy())
        0.8999999761581421
    """

    _SLOT_ORDER = ("momentum",)
    _STRUCTURAL = ("nesterov",)
    # Keras decides at construction whether momentum is on (momentum > 0); assigning
    # `momentum` later changes its value only.
    _CONSTRUCTION_FLAGS = ("_momentum",)

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, name="SGD", **kwargs):
        super().__init__(name, **kwargs)
        self._init_learning_rate(learning_rate, kwargs)
        self._momentum = _flag_momentum("SGD", momentum)
        self._set_hyper("momentum", momentum)
        self.nesterov = bool(nesterov)

    def _local_coefficients(self, dtype, lr_t):
        return {"momentum": self._hyper_t("momentum", dtype)}

    def _transformation(self, hp):
        return kopt.sgd(
            hp["learning_rate"],
            _momentum_value(self._momentum, hp["momentum"]),
            bool(self.nesterov),
            decay=hp["decay"],
            slot_dtype=self.slot_dtype,
        )

    def get_config(self):
        return {
            **self._base_config(),
            "momentum": self._serialize_hyperparameter("momentum"),
            "nesterov": self.nesterov,
        }


class Adam(_KerasV2):
    """Adam with Keras's epsilon-hat placement and optional AMSGrad; tf.keras's legacy ``Adam``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> var = kopt.Variable([1.0, 2.0])
        >>> opt = kopt.optimizers.Adam(learning_rate=0.1)
        >>> _ = opt.apply_gradients([(jnp.array([0.5, -0.5]), var)])
        >>> var.numpy().round(4), opt.get_slot_names()
        (array([0.9, 2.1], dtype=float32), ['m', 'v'])
    """

    _SLOT_ORDER = ("m", "v", "vhat")
    _STRUCTURAL = ("amsgrad",)

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        name="Adam",
        **kwargs,
    ):
        super().__init__(name, **kwargs)
        self._init_learning_rate(learning_rate, kwargs)
        self._set_hyper("beta_1", beta_1)
        self._set_hyper("beta_2", beta_2)
        self.epsilon = epsilon or EPSILON
        self.amsgrad = bool(amsgrad)

    def _local_coefficients(self, dtype, lr_t):
        beta_1, beta_2 = self._hyper_t("beta_1", dtype), self._hyper_t("beta_2", dtype)
        step = self._local_step(dtype)
        beta_1_power, beta_2_power = beta_1**step, beta_2**step
        return {
            "lr": lr_t * jnp.sqrt(1 - beta_2_power) / (1 - beta_1_power),
            "epsilon": self._epsilon_t(dtype),
            "beta_1_t": beta_1,
            "beta_1_power": beta_1_power,
            "one_minus_beta_1_t": 1 - beta_1,
            "beta_2_t": beta_2,
            "beta_2_power": beta_2_power,
            "one_minus_beta_2_t": 1 - beta_2,
        }

    def _transformation(self, hp):
        return kopt.adam(
            hp["learning_rate"],
            hp["beta_1"],
            hp["beta_2"],
            hp.get("epsilon", self.epsilon),
            bool(self.amsgrad),
            decay=hp["decay"],
            slot_dtype=self.slot_dtype,
        )

    def get_config(self):
        return {
            **self._base_config(),
            "beta_1": self._serialize_hyperparameter("beta_1"),
            "beta_2": self._serialize_hyperparameter("beta_2"),
            "epsilon": self.epsilon,
            "amsgrad": self.amsgrad,
        }

    def set_weights(self, weights):
        """As tf.keras: a V1 weight list holding ``vhat`` for every variable is truncated."""
        weights = weight_list(weights)
        params = self.weights
        num_vars = int((len(params) - 1) / 2)
        if len(weights) == 3 * num_vars + 1:
            weights = weights[: len(params)]
        super().set_weights(weights)


def _prepend_iterations(optimizer: Optimizer, weights: list[Any]) -> list[Any]:
    """tf.keras's V1 compatibility: weights without the iteration count get 0 prepended."""
    if len(optimizer.weights) == len(weights) + 1:
        return [np.array(0, np.int32), *weights]
    return weights


class Adagrad(_KerasV2):
    """Adagrad (accumulator starts at 0.1); tf.keras's legacy ``Adagrad``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> var = kopt.Variable([1.0])
        >>> opt = kopt.optimizers.Adagrad(learning_rate=0.1)
        >>> _ = opt.apply_gradients([(jnp.array([1.0]), var)])
        >>> opt.get_slot(var, "accumulator").numpy()
        array([1.1], dtype=float32)
    """

    _SLOT_ORDER = ("accumulator",)

    def __init__(
        self,
        learning_rate=0.001,
        initial_accumulator_value=0.1,
        epsilon=1e-7,
        name="Adagrad",
        **kwargs,
    ):
        if initial_accumulator_value is not None:
            _check_number(
                type(self).__name__,
                "initial_accumulator_value",
                initial_accumulator_value,
                allow_callable=False,
            )
        if initial_accumulator_value is None or initial_accumulator_value < 0.0:
            raise ValueError(
                f"initial_accumulator_value must be non-negative: {initial_accumulator_value}"
            )
        super().__init__(name, **kwargs)
        self._init_learning_rate(learning_rate, kwargs)
        self._initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon or EPSILON

    def _local_coefficients(self, dtype, lr_t):
        return {
            "epsilon": self._epsilon_t(dtype),
            "neg_lr_t": -lr_t,
            "zero": jnp.zeros((), jnp.int32),
        }

    def _transformation(self, hp):
        return kopt.adagrad(
            hp["learning_rate"],
            self._initial_accumulator_value,
            hp.get("epsilon", self.epsilon),
            decay=hp["decay"],
            slot_dtype=self.slot_dtype,
        )

    def get_config(self):
        return {
            **self._base_config(),
            "initial_accumulator_value": self._initial_accumulator_value,
            "epsilon": self.epsilon,
        }

    def set_weights(self, weights):
        super().set_weights(_prepend_iterations(self, weight_list(weights)))


class Adadelta(_KerasV2):
    """Adadelta (epsilon inside both roots); tf.keras's legacy ``Adadelta``.

    Example:
        >>> import kopt
        >>> kopt.optimizers.Adadelta(learning_rate=1.0).get_config()["rho"]
        0.95
    """

    _SLOT_ORDER = ("accum_grad", "accum_var")

    def __init__(self, learning_rate=0.001, rho=0.95, epsilon=1e-7, name="Adadelta", **kwargs):
        super().__init__(name, **kwargs)
        self._init_learning_rate(learning_rate, kwargs)
        self._set_hyper("rho", rho)
        self.epsilon = epsilon or EPSILON

    def _local_coefficients(self, dtype, lr_t):
        return {"epsilon": self._epsilon_t(dtype), "rho": self._hyper_t("rho", dtype)}

    def _transformation(self, hp):
        return kopt.adadelta(
            hp["learning_rate"],
            hp["rho"],
            hp.get("epsilon", self.epsilon),
            decay=hp["decay"],
            slot_dtype=self.slot_dtype,
        )

    def get_config(self):
        return {
            **self._base_config(),
            "rho": self._serialize_hyperparameter("rho"),
            "epsilon": self.epsilon,
        }

    def set_weights(self, weights):
        super().set_weights(_prepend_iterations(self, weight_list(weights)))


class Adamax(_KerasV2):
    """Adamax (Adam with the infinity norm); tf.keras's legacy ``Adamax``.

    Example:
        >>> import kopt
        >>> sorted(kopt.optimizers.Adamax().get_config())[:3]
        ['beta_1', 'beta_2', 'decay']
    """

    _SLOT_ORDER = ("m", "v")

    def __init__(
        self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name="Adamax", **kwargs
    ):
        super().__init__(name, **kwargs)
        self._init_learning_rate(learning_rate, kwargs)
        self._set_hyper("beta_1", beta_1)
        self._set_hyper("beta_2", beta_2)
        self.epsilon = epsilon or EPSILON

    def _local_coefficients(self, dtype, lr_t):
        beta_1 = self._hyper_t("beta_1", dtype)
        beta_1_power = beta_1 ** self._local_step(dtype)
        return {
            "beta_1_t": beta_1,
            "beta_1_power": beta_1_power,
            "neg_scaled_lr": -lr_t / (1 - beta_1_power),
            "epsilon": self._epsilon_t(dtype),
            "one_minus_beta_1_t": 1 - beta_1,
            "beta_2_t": self._hyper_t("beta_2", dtype),
            "zero": jnp.zeros((), jnp.int32),
        }

    def _transformation(self, hp):
        return kopt.adamax(
            hp["learning_rate"],
            hp["beta_1"],
            hp["beta_2"],
            hp.get("epsilon", self.epsilon),
            decay=hp["decay"],
            slot_dtype=self.slot_dtype,
        )

    def get_config(self):
        return {
            **self._base_config(),
            "beta_1": self._serialize_hyperparameter("beta_1"),
            "beta_2": self._serialize_hyperparameter("beta_2"),
            "epsilon": self.epsilon,
        }


class Nadam(_KerasV2):
    """Nadam with Keras's momentum-cache schedule; tf.keras's legacy ``Nadam``.

    As in tf.keras, ``decay`` holds ``schedule_decay`` (default 0.004), the momentum-schedule
    constant, not a learning-rate decay; and a ``LearningRateSchedule`` is refused.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> var = kopt.Variable([1.0])
        >>> opt = kopt.optimizers.Nadam()
        >>> _ = opt.apply_gradients([(jnp.array([1.0]), var)])
        >>> [w.name for w in opt.weights]
        ['Nadam/iter:0', 'Nadam/momentum_cache:0', 'Nadam/Variable/m:0', 'Nadam/Variable/v:0']
    """

    # tf.keras's Nadam reads its learning rate itself, not through `_decayed_lr`.
    _USES_DECAYED_LR = False

    _SLOT_ORDER = ("m", "v")

    def __init__(
        self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name="Nadam", **kwargs
    ):
        kwargs["decay"] = kwargs.pop("schedule_decay", 0.004)
        learning_rate = kwargs.get("lr", learning_rate)
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("decay", self._initial_decay)
        self._set_hyper("beta_1", beta_1)
        self._set_hyper("beta_2", beta_2)
        self.epsilon = epsilon or EPSILON

    def _set_hyper(self, name, value):
        """Refuses a schedule as the learning rate, in the constructor as tf.keras does, and
        assigned later (tf.keras takes the assignment, then fails at every step)."""
        if name == "learning_rate" and isinstance(value, LearningRateSchedule):
            raise ValueError(
                "The Nadam optimizer does not support tf.keras.optimizers.LearningRateSchedules "
                "as the learning rate."
            )
        super()._set_hyper(name, value)

    def _functional_name(self, name):
        return "schedule_decay" if name == "decay" else name

    def _transformation(self, hp):
        return kopt.nadam(
            hp["learning_rate"],
            hp["beta_1"],
            hp["beta_2"],
            hp.get("epsilon", self.epsilon),
            schedule_decay=hp.get("schedule_decay", hp.get("decay")),
            slot_dtype=self.slot_dtype,
        )

    def get_config(self):
        return {
            **self._base_config(),
            "beta_1": self._serialize_hyperparameter("beta_1"),
            "beta_2": self._serialize_hyperparameter("beta_2"),
            "epsilon": self.epsilon,
        }


class RMSprop(_KerasV2):
    """RMSprop with Keras's two epsilon placements; tf.keras's legacy ``RMSprop``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> var = kopt.Variable([1.0])
        >>> opt = kopt.optimizers.RMSprop(learning_rate=0.1, momentum=0.9, centered=True)
        >>> _ = opt.apply_gradients([(jnp.array([1.0]), var)])
        >>> opt.get_slot_names()
        ['rms', 'momentum', 'mg']
    """

    _SLOT_ORDER = ("rms", "momentum", "mg")
    _STRUCTURAL = ("centered",)
    _CONSTRUCTION_FLAGS = ("_momentum",)  # as SGD's

    def __init__(
        self,
        learning_rate=0.001,
        rho=0.9,
        momentum=0.0,
        epsilon=1e-7,
        centered=False,
        name="RMSprop",
        **kwargs,
    ):
        super().__init__(name, **kwargs)
        self._init_learning_rate(learning_rate, kwargs)
        self._set_hyper("rho", rho)
        self._momentum = _flag_momentum("RMSprop", momentum)
        self._set_hyper("momentum", momentum)
        self.epsilon = epsilon or EPSILON
        self.centered = bool(centered)

    def _local_coefficients(self, dtype, lr_t):
        rho = self._hyper_t("rho", dtype)
        return {
            "neg_lr_t": -lr_t,
            "epsilon": self._epsilon_t(dtype),
            "rho": rho,
            "momentum": self._hyper_t("momentum", dtype),
            "one_minus_rho": 1 - rho,
        }

    def _transformation(self, hp):
        return kopt.rmsprop(
            hp["learning_rate"],
            hp["rho"],
            _momentum_value(self._momentum, hp["momentum"]),
            hp.get("epsilon", self.epsilon),
            bool(self.centered),
            decay=hp["decay"],
            slot_dtype=self.slot_dtype,
        )

    def get_config(self):
        return {
            **self._base_config(),
            "rho": self._serialize_hyperparameter("rho"),
            "momentum": self._serialize_hyperparameter("momentum"),
            "epsilon": self.epsilon,
            "centered": self.centered,
        }

    def set_weights(self, weights):
        super().set_weights(_prepend_iterations(self, weight_list(weights)))


RMSProp = RMSprop


class Ftrl(_KerasV2):
    """FTRL-Proximal with L1, L2, beta and L2 shrinkage; tf.keras's legacy ``Ftrl``.

    As in tf.keras, the ``lr`` keyword is accepted but ignored here, and the slots of each
    variable are created together (``accumulator``, ``linear``, then the next variable's).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> a, b = kopt.Variable([1.0], name="a"), kopt.Variable([1.0], name="b")
        >>> opt = kopt.optimizers.Ftrl(learning_rate=0.1)
        >>> _ = opt.apply_gradients([(jnp.ones(1), a), (jnp.ones(1), b)])
        >>> [w.name for w in opt.weights][1:]
        ['Ftrl/a/accumulator:0', 'Ftrl/a/linear:0', 'Ftrl/b/accumulator:0', 'Ftrl/b/linear:0']
    """

    _SLOT_ORDER = ("accumulator", "linear")
    _INTERLEAVE_SLOTS = True

    def __init__(
        self,
        learning_rate=0.001,
        learning_rate_power=-0.5,
        initial_accumulator_value=0.1,
        l1_regularization_strength=0.0,
        l2_regularization_strength=0.0,
        name="Ftrl",
        l2_shrinkage_regularization_strength=0.0,
        beta=0.0,
        **kwargs,
    ):
        super().__init__(name, **kwargs)
        for arg in ("initial_accumulator_value", "l2_shrinkage_regularization_strength"):
            # Plain numbers, not hyperparameters: read when the slots are made, or as constants.
            _check_number(type(self).__name__, arg, locals()[arg], allow_callable=False)
        signs = (  # (argument, value, allowed sign); a schedule or callable is checked per step
            ("initial_accumulator_value", initial_accumulator_value, "positive or zero"),
            ("learning_rate_power", learning_rate_power, "negative or zero"),
            ("l1_regularization_strength", l1_regularization_strength, "positive or zero"),
            ("l2_regularization_strength", l2_regularization_strength, "positive or zero"),
            (
                "l2_shrinkage_regularization_strength",
                l2_shrinkage_regularization_strength,
                "positive or zero",
            ),
        )
        for arg, value, sign in signs:
            number = _value_if_number(type(self).__name__, arg, value)
            if number is not None and (number > 0.0 if sign[0] == "n" else number < 0.0):
                raise ValueError(f"`{arg}` needs to be {sign}. Received: {arg}={value}.")
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("decay", self._initial_decay)
        self._set_hyper("learning_rate_power", learning_rate_power)
        self._set_hyper("l1_regularization_strength", l1_regularization_strength)
        self._set_hyper("l2_regularization_strength", l2_regularization_strength)
        self._set_hyper("beta", beta)
        self._initial_accumulator_value = initial_accumulator_value
        self._l2_shrinkage_regularization_strength = l2_shrinkage_regularization_strength

    def _plain_hyperparams(self):
        return {"l2_shrinkage_regularization_strength": self._l2_shrinkage_regularization_strength}

    def _local_coefficients(self, dtype, lr_t):
        names = (
            "learning_rate_power",
            "l1_regularization_strength",
            "l2_regularization_strength",
            "beta",
        )
        return {
            **{name: self._hyper_t(name, dtype) for name in names},
            "l2_shrinkage_regularization_strength": jnp.asarray(
                self._l2_shrinkage_regularization_strength, dtype
            ),
        }

    def _transformation(self, hp):
        return kopt.ftrl(
            hp["learning_rate"],
            hp["learning_rate_power"],
            self._initial_accumulator_value,
            hp["l1_regularization_strength"],
            hp["l2_regularization_strength"],
            hp["beta"],
            hp.get(
                "l2_shrinkage_regularization_strength", self._l2_shrinkage_regularization_strength
            ),
            decay=hp["decay"],
            slot_dtype=self.slot_dtype,
        )

    def get_config(self):
        return {
            **self._base_config(),
            "initial_accumulator_value": self._initial_accumulator_value,
            "learning_rate_power": self._serialize_hyperparameter("learning_rate_power"),
            "l1_regularization_strength": self._serialize_hyperparameter(
                "l1_regularization_strength"
            ),
            "l2_regularization_strength": self._serialize_hyperparameter(
                "l2_regularization_strength"
            ),
            "beta": self._serialize_hyperparameter("beta"),
            "l2_shrinkage_regularization_strength": self._l2_shrinkage_regularization_strength,
        }


def _plain_number(value: Any) -> Any:
    """A NumPy or concrete JAX real scalar as a Python float (Keras 3 takes them where it takes
    a float, and configs stay JSON): a float32 one as the float it prints as (0.42, not
    0.41999998688697815), which converts back to the same value; anything else as it is."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, bool) or isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, np.integer):
        return int(value)  # a count (gradient_accumulation_steps) stays a whole number
    if (
        isinstance(value, (np.generic, np.ndarray, jax.Array))
        and value.shape == ()
        and jnp.issubdtype(value.dtype, jnp.number)
        and not jnp.issubdtype(value.dtype, jnp.complexfloating)
    ):
        if value.dtype == np.float32:  # the hyperparameters' own dtype: no value is lost
            return float(str(np.asarray(value)[()]))
        return float(value)
    return value


def _check_keras3_options(
    owner: str,
    weight_decay: Any,
    use_ema: Any,
    ema_momentum: Any,
    ema_overwrite_frequency: Any,
    gradient_accumulation_steps: Any,
    loss_scale_factor: Any = None,
) -> None:
    """Keras 3's checks of its common options (the EMA ones only with ``use_ema``)."""
    _check_loss_scale_factor(owner, loss_scale_factor)
    if weight_decay is not None:
        kopt.base.check_hyperparam(owner, "weight_decay", weight_decay, allow_schedule=False)
    if gradient_accumulation_steps:
        count = as_count(gradient_accumulation_steps)
        if count is None or count < 2:
            raise ValueError(
                "`gradient_accumulation_steps` must be an integer >= 2. Received: "
                f"gradient_accumulation_steps={gradient_accumulation_steps}"
            )
    if use_ema:
        ema_momentum = _plain_number(ema_momentum)
        if isinstance(ema_momentum, bool) or not isinstance(ema_momentum, (int, float)):
            raise TypeError(
                f"`ema_momentum` must be a number. Received: ema_momentum={ema_momentum!r} "
                f"(of type {type(ema_momentum).__name__})"
            )
        if not 0 <= ema_momentum <= 1:
            raise ValueError(
                f"`ema_momentum` must be in the range [0, 1]. Received: ema_momentum={ema_momentum}"
            )
        count = as_count(ema_overwrite_frequency)
        if ema_overwrite_frequency and (count is None or count < 1):
            raise ValueError(
                "`ema_overwrite_frequency` must be an integer >= 1 or None. Received: "
                f"ema_overwrite_frequency={ema_overwrite_frequency}"
            )


_CLIPS = ("clipnorm", "clipvalue", "global_clipnorm")


def _divide(g: Any, factor: Any) -> Any:
    """A gradient (array or IndexedSlices; None stays None) divided by ``factor``."""
    return g if g is None else map_values(lambda x: x / jnp.asarray(factor, x.dtype), g)


def _in_order_of(pairs: list[tuple[Any, Any]], owner: tuple[int, ...]) -> list[tuple[Any, Any]]:
    """``pairs`` in the order of the variable uids ``owner`` when they pair exactly those
    variables in another order (Keras 3 matches its accumulators to variables by identity);
    as given otherwise, for the step to accept or refuse as it does."""
    if len(pairs) != len(owner):
        return pairs
    position = {uid: i for i, uid in enumerate(owner)}
    ordered: list[Any] = [None] * len(owner)
    for pair in pairs:
        i = position.get(getattr(pair[1], "_uid", None))
        if i is None or ordered[i] is not None:
            return pairs
        ordered[i] = pair
    return ordered


def _divided_by(factor: float) -> GradientTransformation:
    """Gradients divided by ``factor`` (Keras 3's ``loss_scale_factor``, before the clips)."""

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        divided = jax.tree.map(
            lambda g: _divide(g, factor),
            updates,
            is_leaf=lambda x: x is None or isinstance(x, kopt.IndexedSlices),
        )
        return divided, state

    return GradientTransformation(lambda params: kopt.EmptyState(), update_fn)


def _check_loss_scale_factor(owner: str, factor: Any) -> None:
    """Keras 3's ``loss_scale_factor``: None or a positive, finite number."""
    if factor is None:
        return
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number)):
        raise TypeError(
            f"{owner}: `loss_scale_factor` must be a number or None, received {factor!r}"
        )
    if not np.isfinite(factor) or factor <= 0:
        raise ValueError(f"{owner}: `loss_scale_factor` must be > 0, received {factor!r}")


def _check_one_clip(clipnorm: Any, clipvalue: Any, global_clipnorm: Any) -> None:
    """Keras 3's rule: at most one clipping argument is set."""
    if sum(v is not None for v in (clipnorm, clipvalue, global_clipnorm)) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received: "
            f"clipnorm={clipnorm}, clipvalue={clipvalue}, global_clipnorm={global_clipnorm}"
        )


class _Keras3(_SlotDtype, Optimizer):
    """The Keras 3 optimizers behind the same facade: plain float arguments, no ``decay``.

    Each takes Keras 3's common arguments too, with Keras 3's meaning and validation:

    - ``weight_decay``: decoupled decay ``var -= var * weight_decay * lr`` before the update
      (:func:`kopt.decoupled_weight_decay`; AdamW's twin does it itself);
    - ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``: an exponential moving average of
      the variables after each update (:func:`kopt.ema`), the slot ``"average"``
      (``get_slot(var, "average")``), copied into the variables every
      ``ema_overwrite_frequency`` updates or by :meth:`finalize_variable_values`;
    - ``gradient_accumulation_steps`` (k): the gradients of k calls are averaged and the update
      (decay, step) runs on every k-th call only, inside a ``lax.cond``
      (:func:`kopt.accumulate_gradients`). ``iterations`` counts calls (Keras 3's
      ``_iterations``); bias corrections and EMA count updates (``iterations // k``, Keras 3's
      ``iterations``); a learning-rate schedule sees the call count, as in Keras 3. The
      accumulators are state without a slot name, so such an optimizer must be given the same
      variables every call (in any order: they are matched by identity, as in Keras 3). The
      EMA, as in Keras 3, moves on every call,
      also between updates. ``clipnorm``/``clipvalue``/``global_clipnorm`` clip the mean of
      the k gradients, at the update, as in Keras 3 (not each call's gradients);
    - ``clipnorm``, ``clipvalue``, ``global_clipnorm``: Keras 3's rules, at most one of them,
      and 0 means no clipping (tf.keras's classes clip to zero);

    and ``slot_dtype`` (kopt's): the slots' dtype (default: each variable's), the EMA's
    ``average`` and the accumulators included.

    Their numbers (``weight_decay``, ``ema_momentum``) can change between steps without
    recompiling. Switching a piece on or off between steps (``weight_decay`` from None,
    ``use_ema``, ``amsgrad``) compiles the new form once and makes the slots it needs (an
    ``average`` starts as the variable's value; ``vhat`` at zero), where Keras 3 fails;
    ``gradient_accumulation_steps`` cannot change after the first step (its accumulators are
    made once), and trying raises a ``ValueError`` at the next step.
    """

    _ATTRS: tuple[str, ...] = ()
    _DECAYS_ITSELF = False  # AdamW: its functional twin applies weight_decay
    _HAS_SLOT_DTYPE = True

    def __init__(
        self,
        name: str,
        weight_decay: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        gradient_accumulation_steps: int | None = None,
        slot_dtype: Any = None,
        loss_scale_factor: float | None = None,
        **kwargs: Any,
    ):
        owner = type(self).__name__
        if "decay" in kwargs:  # Keras 3's own warning: the argument does nothing there
            kwargs.pop("decay")
            warnings.warn(
                "Argument `decay` is no longer supported and will be ignored.", stacklevel=2
            )
        _check_keras3_options(
            owner,
            weight_decay,
            use_ema,
            ema_momentum,
            ema_overwrite_frequency,
            gradient_accumulation_steps,
            loss_scale_factor,
        )
        _check_one_clip(**{k: kwargs.get(k) for k in _CLIPS})
        if slot_dtype is not None and not self._HAS_SLOT_DTYPE:
            raise ValueError(
                f"{owner}: `slot_dtype` is not supported; its slots follow the variables' dtype"
            )
        check_slot_dtype(owner, slot_dtype, allow_complex=False)
        super().__init__(name, **kwargs)
        self.weight_decay = weight_decay
        self.use_ema = bool(use_ema)
        self.ema_momentum = _plain_number(ema_momentum)
        # Python ints (a NumPy integer is accepted), for get_config's JSON.
        self.ema_overwrite_frequency = as_count(ema_overwrite_frequency) or None
        self.gradient_accumulation_steps = as_count(gradient_accumulation_steps) or None
        self.slot_dtype = slot_dtype
        self.loss_scale_factor = loss_scale_factor

    def apply_gradients(
        self,
        grads_and_vars: Any,
        name: str | None = None,
        experimental_aggregate_gradients: bool = True,
    ) -> Variable | None:
        owner = self._opaque_owner
        if owner is not None and self.gradient_accumulation_steps:
            # The accumulators were made for the first call's variables, in its order; Keras 3
            # matches them by identity, so the same variables in another order are stepped too.
            grads_and_vars = _in_order_of(_as_pairs(grads_and_vars), owner)
        return super().apply_gradients(grads_and_vars, name, experimental_aggregate_gradients)

    def scale_loss(self, loss: Any) -> Any:
        """``loss * loss_scale_factor`` (Keras 3's; the loss itself without a factor)."""
        return loss if self.loss_scale_factor is None else loss * self.loss_scale_factor

    def _transform_loss(self, loss: Any) -> Any:
        return self.scale_loss(super()._transform_loss(loss))

    def _step_arguments(self):
        hyper_vars, dynamic = super()._step_arguments()
        if self.loss_scale_factor is not None:  # a value of the step: changing it compiles nothing
            dynamic["keras3:loss_scale_factor"] = self._device_constant(self.loss_scale_factor)
        return hyper_vars, dynamic

    def _transform_gradients(self, grads_and_vars):
        # Keras 3 divides the gradients it is given by the factor before clipping them.
        factor = self.loss_scale_factor
        if factor is not None:
            factor = self.__dict__.get("_step_dynamic", {}).get("keras3:loss_scale_factor", factor)
            grads_and_vars = [(_divide(g, factor), v) for g, v in grads_and_vars]
        return super()._transform_gradients(grads_and_vars)

    def exclude_from_weight_decay(
        self, var_list: list[Variable] | None = None, var_names: list[str] | None = None
    ) -> None:
        """Leaves variables out of ``weight_decay``, as Keras 3: those in ``var_list``, and those
        whose name contains one of ``var_names`` (regular expressions, e.g. ``["bias"]``,
        matched against the name with and without tf.keras's ``":0"``, so ``"bias$"`` matches
        a variable named ``"bias"`` as in Keras 3).
        Each call replaces the previous one. Keras 3 takes it only before the first step; kopt
        also later (after ``restore_optimizer``, say): the next step compiles with it.
        """
        if var_list is not None and not all(isinstance(v, Variable) for v in var_list):
            raise TypeError("exclude_from_weight_decay: `var_list` must hold kopt.Variables")
        if isinstance(var_names, str) or not all(isinstance(n, str) for n in var_names or ()):
            raise TypeError(
                "exclude_from_weight_decay: `var_names` must be a list of strings, received "
                f"{var_names!r}"
            )
        for pattern in var_names or ():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    "exclude_from_weight_decay: `var_names` must hold regular expressions; "
                    f"{pattern!r} is not one ({e})"
                ) from e
        with self._lock:
            self._excluded_vars = {v._uid: v for v in var_list or ()}
            self._excluded_names = re.compile("|".join(set(var_names))) if var_names else None

    # The excluded variables, by uid: copies re-key them as they do slots.
    _OWNER_MAPS = (*Optimizer._OWNER_MAPS, "_excluded_vars")

    def _use_weight_decay(self, variable: Variable) -> bool:
        """Whether ``variable`` decays (Keras 3's rule)."""
        if variable._uid in (self.__dict__.get("_excluded_vars") or {}):
            return False
        pattern = self.__dict__.get("_excluded_names")
        if pattern is None:
            return True
        # Keras 3 matches its variables' names, which have no ":0" (tf.keras's suffix, which
        # kopt's names carry): an anchored "bias$" must match "bias:0" as it does "bias".
        name = variable.name
        bare = name[:-2] if name.endswith(":0") else name
        return pattern.search(bare) is None and pattern.search(name) is None

    def _decay_mask(self, params: list[Any]) -> list[bool]:
        """The weight decay mask of the variables being stepped (every param outside a step,
        where only the state's structure, which the mask does not change, is made)."""
        variables = self.__dict__.get("_stepped")
        if variables is None or len(variables) != len(params):
            return [True] * len(params)
        return [self._use_weight_decay(v) for v in variables]

    def _excludes_some(self) -> bool:
        return (
            bool(self.__dict__.get("_excluded_vars"))
            or self.__dict__.get("_excluded_names") is not None
        )

    def _check_opaque_unchanged(self, opaque: list[Any], stale: list[Variable]) -> None:
        # Accumulators of the same shapes for another k would carry the old window on.
        before = dict(self._slot_structure.get(stale[0]._uid, ()))
        old = before.get("gradient_accumulation_steps")
        if old is not None and old != self.gradient_accumulation_steps:
            raise ValueError(
                f"{type(self).__name__}: `gradient_accumulation_steps` ({old!r} -> "
                f"{self.gradient_accumulation_steps!r}) changed after the first step, which "
                "would change the state this optimizer keeps beside its slots; set it back, "
                "or start a new optimizer"
            )
        super()._check_opaque_unchanged(opaque, stale)

    def _clips_before_step(self) -> dict[str, Any]:
        # With accumulation, the clips are part of the twin (they clip the mean).
        return {} if self.gradient_accumulation_steps else self._active_clips()

    def _apply_transformation(self, tx, gv, dynamic, template, constrain: bool = True) -> None:
        if self.gradient_accumulation_steps:  # the clips' current values, for the twin's state
            clips = {k[5:]: v for k, v in dynamic.items() if k.startswith("clip:")}
            dynamic = {**dynamic, **{"plain:" + k: v for k, v in clips.items()}}
        self.__dict__["_stepped"] = [v for _, v in gv]
        try:
            super()._apply_transformation(tx, gv, dynamic, template, constrain)
        finally:
            del self.__dict__["_stepped"]

    def as_transformation(self) -> GradientTransformation:
        if self.weight_decay is not None and self._excludes_some():
            raise ValueError(
                f"{type(self).__name__}.as_transformation: `exclude_from_weight_decay` names "
                "variables, which a pure transformation does not have; give the mask to the "
                "functional optimizer instead (kopt.adamw(..., mask=...), "
                "kopt.decoupled_weight_decay(..., mask=...))"
            )
        tx = super().as_transformation()
        if self.loss_scale_factor is None:
            return tx
        return kopt.chain(_divided_by(self.loss_scale_factor), tx)

    def _set_clip(self, attr: str, value: Any) -> None:
        if value is not None:
            _check_one_clip(**{**{k: getattr(self, "_" + k, None) for k in _CLIPS}, attr: value})
        super()._set_clip(attr, value)

    def _active_clips(self) -> dict[str, Any]:
        # Keras 3 clips only by a positive value: 0 is off (tf.keras clips to zero).
        return {k: v for k, v in super()._active_clips().items() if float(np.asarray(v)) > 0}

    def _init_keras3(self, learning_rate: Any, kwargs: dict[str, Any], **attrs: Any) -> None:
        self._set_hyper("learning_rate", kwargs.get("lr", learning_rate))
        for k, v in attrs.items():
            object.__setattr__(self, k, _plain_number(v))

    def _twin(self, hp: dict[str, Any]) -> GradientTransformation:
        """The functional optimizer itself (without the Keras 3 options)."""
        raise NotImplementedError

    def _transformation(self, hp):
        k = self.gradient_accumulation_steps
        if k and _is_step_schedule(hp.get("learning_rate")):
            # Pieces count updates; Keras 3 calls the schedule with the call count, which at the
            # n-th update (from 0) is n * k + k - 1.
            schedule = hp["learning_rate"]
            hp = {**hp, "learning_rate": lambda step: schedule(step * k + (k - 1))}
        mask = self._decay_mask if self._excludes_some() else None
        tx = self._twin({**hp, "mask": mask}) if self._DECAYS_ITSELF else self._twin(hp)
        if self.weight_decay is not None and not self._DECAYS_ITSELF:
            tx = decoupled_weight_decay(
                tx, hp.get("weight_decay", self.weight_decay), hp["learning_rate"], mask
            )
        if k:
            # Keras 3 clips the mean of the accumulated gradients, just before the update. The
            # step passes the clip values in as hyperparameters (see _apply_transformation).
            clips = [
                _CLIP_PIECES[attr](hp.get(attr, value))
                for attr, value in self._active_clips().items()
            ]
            tx = kopt.chain(*clips, tx) if clips else tx
            tx = kopt.accumulate_gradients(tx, k, "mean", slot_dtype=self.slot_dtype)
        if self.use_ema:
            # Keras 3 moves the average on every call, also between updates (outside its
            # accumulation cond), with its count of updates, iterations // k.
            average = kopt.ema(
                hp.get("momentum", self.ema_momentum),
                self.ema_overwrite_frequency,
                slot_dtype=self.slot_dtype,
            )
            tx = kopt.chain(tx, _counting_updates(average, k) if k else average)
        return tx

    def _static_transformation(self, given_lr=False):
        tx = super()._static_transformation(given_lr)
        k = self.gradient_accumulation_steps
        return _count_updates_not_calls(tx, k) if k else tx

    def _checked_attributes(self):
        return frozenset(self._ATTRS) | {
            "weight_decay",
            "use_ema",
            "ema_momentum",
            "ema_overwrite_frequency",
            "gradient_accumulation_steps",
            "loss_scale_factor",
        }

    def _check_attributes(self):
        _check_keras3_options(
            type(self).__name__,
            self.weight_decay,
            self.use_ema,
            self.ema_momentum,
            self.ema_overwrite_frequency,
            self.gradient_accumulation_steps,
            self.loss_scale_factor,
        )
        for k in self._ATTRS:
            value = getattr(self, k)
            if _is_read_per_step(value):
                raise TypeError(
                    f"{type(self).__name__}: `{k}` takes a number or a schedule "
                    f"`step -> value`, not a zero-argument callable; received {value!r}"
                )
        super()._check_attributes()

    def _structure(self):
        flags = [k for k in self._ATTRS if isinstance(getattr(self, k), bool)]
        return tuple((k, getattr(self, k)) for k in flags) + (
            ("weight_decay is None", self.weight_decay is None),
            ("use_ema", self.use_ema),
            ("ema_overwrite_frequency", self.ema_overwrite_frequency),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            # With accumulation, which clip is on is part of the twin.
            ("clips", tuple(self._active_clips()) if self.gradient_accumulation_steps else ()),
            ("loss_scale_factor is None", self.loss_scale_factor is None),
            # Which variables decay is part of the compiled step.
            ("excluded", frozenset(self.__dict__.get("_excluded_vars") or ())),
            ("excluded_names", getattr(self.__dict__.get("_excluded_names"), "pattern", None)),
        )

    def _plain_hyperparams(self):
        out = {
            k: getattr(self, k)
            for k in self._ATTRS
            if isinstance(getattr(self, k), (int, float)) and not isinstance(getattr(self, k), bool)
        }
        if self.weight_decay is not None:
            out["weight_decay"] = self.weight_decay
        if self.use_ema:
            out["momentum"] = self.ema_momentum
        return out

    def finalize_variable_values(self, var_list: list[Any]) -> None:
        """With ``use_ema``, sets each variable to its moving average (Keras 3's method, which
        ``fit`` calls at the end of training); otherwise does nothing."""
        if self.use_ema:
            for var in var_list:
                var.assign(self.get_slot(var, "average").value)

    def get_config(self):
        base = super().get_config()
        config = {
            "name": base["name"],
            "learning_rate": self._serialize_hyperparameter("learning_rate"),
            # Keras 3's keys: every clipping argument, None when it is not set.
            **{k: base.get(k) for k in _CLIPS},
        }
        config.update({k: _config_value(getattr(self, k)) for k in self._ATTRS})
        config.update(
            weight_decay=self.weight_decay,
            use_ema=self.use_ema,
            ema_momentum=self.ema_momentum,
            ema_overwrite_frequency=self.ema_overwrite_frequency,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            loss_scale_factor=self.loss_scale_factor,
        )
        if self.slot_dtype is not None:
            config["slot_dtype"] = jnp.dtype(self.slot_dtype).name
        return config


def _count_updates_not_calls(tx: GradientTransformation, k: int) -> GradientTransformation:
    """The facade writes its one step count, ``iterations`` (calls), into every piece of the
    state; under gradient accumulation the accumulated pieces count updates, ``iterations //
    k`` (the EMA after them divides for itself: :func:`_counting_updates`)."""

    def per_update(state):
        return state._replace(count=state.count // k)

    def accumulated(state):
        if isinstance(state, kopt.AccumulateState):
            is_piece = lambda x: isinstance(x, OptimizerState)  # noqa: E731
            pieces = jax.tree.leaves(state.inner_state, is_leaf=is_piece)
            counts = [s.count for s in pieces if is_piece(s)]
            # The window follows the calls (written into the pieces' counts), as Keras 3's
            # follows its _iterations: an assigned `iterations` moves it too.
            mini_step = (counts[0] % k).astype(jnp.int32) if counts else state.mini_step
            return state._replace(
                mini_step=mini_step,
                inner_state=jax.tree.map(per_update, state.inner_state, is_leaf=is_piece),
            )
        return state

    def update_fn(updates, state, params=None, **extra_args):
        state = jax.tree.map(
            accumulated, state, is_leaf=lambda x: isinstance(x, kopt.AccumulateState)
        )
        return tx.update(updates, state, params, **extra_args)

    return GradientTransformation(tx.init, update_fn)


def _counting_updates(tx: GradientTransformation, k: int) -> GradientTransformation:
    """``tx`` (one kopt piece) run on every call, seeing the count of updates, ``calls // k``,
    while its state counts calls."""

    def update_fn(updates, state, params=None, **extra_args):
        updates, new_state = tx.update(
            updates, state._replace(count=state.count // k), params, **extra_args
        )
        return updates, new_state._replace(count=safe_increment(state.count))

    return GradientTransformation(tx.init, update_fn)


class AdamW(_Keras3):
    """AdamW with Keras 3 semantics: ``w -= w * weight_decay * lr`` plus Adam.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> var = kopt.Variable([1.0])
        >>> opt = kopt.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5)
        >>> _ = opt.apply_gradients([(jnp.zeros(1), var)])
        >>> var.numpy()
        array([0.95], dtype=float32)
    """

    _SLOT_ORDER = ("m", "v", "vhat")
    _ATTRS = ("weight_decay", "beta_1", "beta_2", "epsilon", "amsgrad")
    _DECAYS_ITSELF = True

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.004,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        name="AdamW",
        **kwargs,
    ):
        if weight_decay is None:
            raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None")
        super().__init__(name, **kwargs)
        self._init_keras3(
            learning_rate,
            kwargs,
            weight_decay=weight_decay,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=bool(amsgrad),
        )

    def _twin(self, hp):
        weight_decay = hp.get("weight_decay", self.weight_decay)
        return kopt.adamw(
            hp["learning_rate"],
            # Set to None after construction, as Keras 3 allows: no decay.
            0.0 if weight_decay is None else weight_decay,
            hp.get("beta_1", self.beta_1),
            hp.get("beta_2", self.beta_2),
            hp.get("epsilon", self.epsilon),
            bool(self.amsgrad),
            mask=hp.get("mask"),
            slot_dtype=self.slot_dtype,
        )


class Lion(_Keras3):
    """Lion with Keras 3 semantics: ``w -= lr * sign(beta_1 m + (1 - beta_1) g)``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> var = kopt.Variable([1.0, 1.0])
        >>> opt = kopt.optimizers.Lion(learning_rate=0.1)
        >>> _ = opt.apply_gradients([(jnp.array([3.0, -1.0]), var)])
        >>> var.numpy()
        array([0.9, 1.1], dtype=float32)
    """

    _SLOT_ORDER = ("m",)
    _ATTRS = ("beta_1", "beta_2")

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.99, name="Lion", **kwargs):
        beta_1, beta_2 = _plain_number(beta_1), _plain_number(beta_2)
        number = _value_if_number("Lion", "beta_1", beta_1)
        if number is not None and (number <= 0 or number > 1):
            raise ValueError(
                "Argument `beta_1` must be in the [0, 1] range. Otherwise, the optimizer "
                f"degenerates to SignSGD. Received: beta_1={beta_1}."
            )
        super().__init__(name, **kwargs)
        self._init_keras3(learning_rate, kwargs, beta_1=beta_1, beta_2=beta_2)

    def _twin(self, hp):
        return kopt.lion(
            hp["learning_rate"],
            hp.get("beta_1", self.beta_1),
            hp.get("beta_2", self.beta_2),
            slot_dtype=self.slot_dtype,
        )


class Lamb(_Keras3):
    """Lamb with Keras 3 semantics (Adam step times a per-tensor trust ratio).

    Example:
        >>> import kopt
        >>> kopt.optimizers.Lamb().get_config()["epsilon"]
        1e-07
    """

    _SLOT_ORDER = ("m", "v")
    _ATTRS = ("beta_1", "beta_2", "epsilon")

    def __init__(
        self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name="Lamb", **kwargs
    ):
        super().__init__(name, **kwargs)
        self._init_keras3(learning_rate, kwargs, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)

    def _twin(self, hp):
        return kopt.lamb(
            hp["learning_rate"],
            hp.get("beta_1", self.beta_1),
            hp.get("beta_2", self.beta_2),
            hp.get("epsilon", self.epsilon),
            slot_dtype=self.slot_dtype,
        )


class Adafactor(_Keras3):
    """Adafactor with Keras 3 semantics and defaults (factored second moments).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> var = kopt.Variable(jnp.ones((3, 2)))
        >>> opt = kopt.optimizers.Adafactor()
        >>> _ = opt.apply_gradients([(jnp.ones((3, 2)), var)])
        >>> opt.get_slot(var, "r").shape, opt.get_slot(var, "c").shape
        ((3,), (2,))
    """

    _SLOT_ORDER = ("r", "c", "v")
    _ATTRS = ("beta_2_decay", "epsilon_1", "epsilon_2", "clip_threshold", "relative_step")

    def __init__(
        self,
        learning_rate=0.001,
        beta_2_decay=-0.8,
        epsilon_1=1e-30,
        epsilon_2=1e-3,
        clip_threshold=1.0,
        relative_step=True,
        name="Adafactor",
        **kwargs,
    ):
        super().__init__(name, **kwargs)
        self._init_keras3(
            learning_rate,
            kwargs,
            beta_2_decay=beta_2_decay,
            epsilon_1=epsilon_1,
            epsilon_2=epsilon_2,
            clip_threshold=clip_threshold,
            relative_step=bool(relative_step),
        )

    def _twin(self, hp):
        return kopt.adafactor(
            hp["learning_rate"],
            hp.get("beta_2_decay", self.beta_2_decay),
            hp.get("epsilon_1", self.epsilon_1),
            hp.get("epsilon_2", self.epsilon_2),
            hp.get("clip_threshold", self.clip_threshold),
            bool(self.relative_step),
            slot_dtype=self.slot_dtype,
        )


class TransformationOptimizer(Optimizer):
    """Any kopt or optax transformation behind the facade (see :func:`from_transformation`)."""

    # A wrapped transformation's wrappers (accumulate_gradients, apply_if_finite, optax's
    # MultiSteps) keep their inner pieces' step counts, which need not be the calls: the
    # facade keeps those counts as they come out of the step, not from `iterations`.
    _OWN_WRAPPED_COUNTS = True

    def __init__(
        self,
        transformation: Any,
        name: str | None = None,
        held: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """``held``: values for the hyperparameters it holds, as ``get_config`` stores them (the
        values set on the optimizer, which the transformation's own may differ from)."""
        if not (
            callable(getattr(transformation, "init", None))
            and callable(getattr(transformation, "update", None))
        ):
            raise TypeError(
                "from_transformation: expected a transformation with init and update, received "
                f"{type(transformation).__name__}"
            )
        super().__init__(name or "Transformation", **kwargs)  # the clip arguments
        self._wrapped = transformation
        settable, self._fixed_hyperparams = _wrapped_hyperparams(transformation)
        self._held_hyperparams = frozenset(
            key
            for key in settable
            if key not in self._hyper
            and (
                not hasattr(type(self), key)
                # A wrapped clip piece's threshold is the optimizer's clip attribute, unless
                # the optimizer was given that clip argument itself.
                or (key in _CLIP_PIECES and getattr(self, "_" + key) is None)
            )
        )
        for key in sorted(self._held_hyperparams):
            self._set_hyper(key, settable[key])
        for key, value in (held or {}).items():
            if key not in self._held_hyperparams:
                raise TypeError(
                    f"{self._name}: the wrapped transformation holds no settable `{key}` "
                    f"(its settable hyperparameters: {sorted(self._held_hyperparams)})"
                )
            setattr(self, key, value)

    def __getattr__(self, name: str) -> Any:
        key = "learning_rate" if name == "lr" else name
        why = self.__dict__.get("_fixed_hyperparams", {}).get(key)
        if why is not None:
            raise AttributeError(
                f"{self._name}: `{key}` of the wrapped transformation is not held by the "
                f"optimizer ({why}), so it has no one value to read here"
            )
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        key = "learning_rate" if name == "lr" else name
        fixed = self.__dict__.get("_fixed_hyperparams", {})
        held = self.__dict__.get("_held_hyperparams")
        if key in fixed or (held is not None and key in _HYPERPARAM_NAMES and key not in held):
            why = fixed.get(
                key, "no kopt piece of it was found keeping it in its state, so it would be ignored"
            )
            raise AttributeError(
                f"{self._name}: `{key}` of the wrapped transformation cannot be set on the "
                f"optimizer ({why}); build the transformation with the value you want"
            )
        if key in _CLIP_PIECES and held is not None and key in held:
            if value is None:
                raise AttributeError(
                    f"{self._name}: `{key}` is the threshold of a clip piece of the wrapped "
                    "transformation and cannot be removed; build the transformation without it"
                )
            if not _is_step_schedule(value) and not callable(value):
                _check_number(type(self).__name__, key, value)
                if float(np.asarray(getattr(value, "value", value))) < 0:
                    raise ValueError(f"Expected {key} >= 0, received: {value}")
        if key in self.__dict__.get("_hyper", {}) and _is_step_schedule(value):
            raise TypeError(
                f"{self._name}: a schedule for `{key}` goes into the wrapped transformation "
                "(kopt.optimizers.from_transformation(kopt.sgd(schedule))); the optimizer takes "
                f"a number here, received {type(value).__name__}"
            )
        super().__setattr__(name, value)

    def _held_clip(attr: str) -> property:  # noqa: N805 - builds the class's properties
        """A clip attribute that reads (and, through ``__setattr__``, sets) the threshold of
        the wrapped transformation's clip piece when it has one."""
        base = getattr(Optimizer, attr)

        def read(self):
            if attr in self.__dict__.get("_held_hyperparams", ()):
                value = self._get_hyper(attr)  # a number, as the clip attributes always are
                return float(value.numpy()) if isinstance(value, Variable) else value
            return base.fget(self)

        return property(read, base.fset, doc=base.__doc__)

    clipnorm = _held_clip("clipnorm")
    clipvalue = _held_clip("clipvalue")
    global_clipnorm = _held_clip("global_clipnorm")
    del _held_clip

    def _transformation(self, hp):
        held = {k: v for k, v in hp.items() if k in self._held_hyperparams}
        for key, value in held.items():  # the ranges set_hyperparam takes them in
            low, high, low_inclusive = _RANGES.get(key, (None, None, True))
            kopt.base.check_hyperparam(
                type(self).__name__, key, value, low=low, high=high, low_inclusive=low_inclusive
            )
        wrapped = self._wrapped
        if not isinstance(wrapped, GradientTransformation):
            # An optax transformation takes sparse gradients dense (kopt.chain's rule), unless
            # it hands them to kopt pieces (optax.inject_hyperparams(kopt.sgd)).
            wrapped = GradientTransformation(wrapped.init, extra_args_update(wrapped))
        if not held:
            return wrapped

        def init(params):  # the wrapped state, holding the optimizer's values
            state = wrapped.init(params)
            for key, value in held.items():
                state = _replace_hyperparam(
                    state, key, jnp.asarray(value, jnp.float32), check=False
                )
            return state

        return GradientTransformation(init, wrapped.update)

    def _static_transformation(self, given_lr=False):
        # The step's and the slots' transformation (not as_transformation's): slots a
        # kopt.flatten inside keeps packed are the facade's slot variables, one per variable.
        return _flattened_slots_per_variable(super()._static_transformation(given_lr))

    def get_config(self):
        config = super().get_config()
        if self._held_hyperparams:  # the values set on the optimizer, for a checkpoint
            config["held"] = {
                key: self._serialize_hyperparameter(key) for key in sorted(self._held_hyperparams)
            }
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds the optimizer around the transformation given as
        ``custom_objects={"transformation": tx}``: a config holds no functions.

        Raises:
            TypeError: if ``custom_objects`` has no ``"transformation"``.
        """
        transformation = (custom_objects or {}).get("transformation")
        if transformation is None:
            raise TypeError(
                "TransformationOptimizer.from_config: a config cannot hold the wrapped "
                "transformation (it is made of functions); pass the same one again as "
                "custom_objects={'transformation': tx}"
            )
        return cls(transformation, **config)


def _flattened_slots_per_variable(tx: GradientTransformation) -> GradientTransformation:
    """``tx`` with the slots of each :func:`kopt.flatten` state in its state unpacked, one per
    param, as :func:`kopt.get_slot` reads them: the facade keeps them as the variables' slots
    (and packs the small ones into shared buffers itself), not as packed buffers that belong to
    no variable. They are packed again for each update of the transformation inside."""

    def per_variable(flat):
        return type(flat)(flat.unflattened())

    def packed(flat):
        layout = flat.layout

        def pack_slots(s):
            if not isinstance(s, OptimizerState):
                return s
            slots = {
                name: (
                    layout.pack(tree, "from_transformation", "slot")
                    if jax.tree.structure(tree) == layout.treedef
                    else tree
                )
                for name, tree in s.slots.items()
            }
            return s._replace(slots=slots)

        inner = jax.tree.map(
            pack_slots, flat.inner_state, is_leaf=lambda x: isinstance(x, OptimizerState)
        )
        return type(flat)(inner)

    def each_flattened(node, params, change):
        """``node`` with ``change`` applied to each flatten state laid out for ``params`` (the
        facade's list of variables; a flatten inside a wrapper that hands it other params
        keeps its buffers)."""
        if isinstance(node, kopt.FlattenedState):
            return change(node) if node.layout.treedef == jax.tree.structure(params) else node
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(each_flattened(x, params, change) for x in node))
        if isinstance(node, (tuple, list)):
            return type(node)(each_flattened(x, params, change) for x in node)
        if isinstance(node, dict):
            return {k: each_flattened(v, params, change) for k, v in node.items()}
        return node

    def init(params):
        return each_flattened(tx.init(params), params, per_variable)

    def update(updates, state, params=None, **extra_args):
        state = each_flattened(state, params, packed)
        updates, state = tx.update(updates, state, params, **extra_args)
        return updates, each_flattened(state, params, per_variable)

    return GradientTransformation(init, update)


# Hyperparameter names of kopt's optimizers and Keras's: on a from_transformation optimizer
# that does not hold one, setting it would have no effect, so it is refused.
_HYPERPARAM_NAMES = frozenset(
    (
        "learning_rate momentum beta_1 beta_2 epsilon rho weight_decay decay "
        "initial_accumulator_value learning_rate_power l1_regularization_strength "
        "l2_regularization_strength l2_shrinkage_regularization_strength beta beta_2_decay "
        "epsilon_1 epsilon_2 clip_threshold ema_momentum"
    ).split()
)


# The most variables a list mask or labels may cover for the probe to find the hyperparameters.
_MAX_PROBE = 64


def _wrapped_hyperparams(transformation: Any) -> tuple[dict[str, float], dict[str, str]]:
    """The hyperparameters a wrapped transformation keeps in its kopt states: (those the facade
    can hold, name -> value; those it cannot, name -> why). A hyperparameter is held when every
    piece storing it has one value and none follows a schedule (found by one update of a
    scalar probe from marked values: a schedule overwrites its mark).

    The probe runs as one compiled call: run eagerly, each of its scalar operations compiled a
    program of its own the first time (some twenty for Adam, a second or so)."""
    probe = [jax.device_put(np.zeros((), np.float32))]
    run = jax.jit(functools.partial(_probe_hyperparams, transformation))
    try:
        try:
            values, marks, after = jax.device_get(run(probe))
        except Exception:  # one that runs only eagerly (a Python branch on a value)
            values, marks, after = _probe_hyperparams(transformation, probe)
    except Exception:
        # A mask or labels given as a list in the variables' order fits only as many
        # variables: probed with 2, 3... scalars (compiled only; refusals fail while traced).
        for n in range(2, _MAX_PROBE + 1):
            try:
                values, marks, after = jax.device_get(run(probe * n))
                break
            except Exception:  # noqa: BLE001 - the next length
                continue
        else:  # a transformation that cannot run on scalars: no hyperparameters held
            return {}, {}
    scheduled = {
        key
        for key, held in after.items()
        if any(float(value) != float(marks[key]) for value in held)
    }
    distinct = {key: {float(value) for value in held} for key, held in values.items()}
    fixed = {key: "it follows a schedule" for key in scheduled}
    fixed.update({key: "pieces hold different values" for key, v in distinct.items() if len(v) > 1})
    return {key: v.pop() for key, v in distinct.items() if key not in fixed}, fixed


def _probe_hyperparams(transformation: Any, probe: list[jax.Array]) -> tuple[dict, dict, dict]:
    """For :func:`_wrapped_hyperparams`: (name -> the values the kopt pieces of the initial
    state hold, name -> its mark, name -> the values they hold after one update from the
    marked state), leaving out names an optax piece holds too (that piece's own)."""
    state = transformation.init(probe)
    values: dict[str, list[jax.Array]] = {}
    foreign = set()
    for _, holder in _hyperparam_holders(state):
        for key, value in holder.hyperparams.items():
            if isinstance(holder, OptimizerState):
                values.setdefault(key, []).append(jnp.asarray(value, jnp.float32))
            else:
                foreign.add(key)
    values = {key: v for key, v in values.items() if key not in foreign}
    marks = {key: jnp.max(jnp.stack(v)) + 0.5 for key, v in values.items()}
    marked = state
    for key, mark in marks.items():
        marked = _replace_hyperparam(marked, key, mark.astype(jnp.float32), check=False)
    # An accumulator due now: the probe's one update reaches the pieces it wraps.
    marked = jax.tree.map(
        lambda s: (
            s._replace(mini_step=jnp.asarray(2**30, jnp.int32))
            if isinstance(s, kopt.AccumulateState)
            else s
        ),
        marked,
        is_leaf=lambda s: isinstance(s, kopt.AccumulateState),
    )
    _, after_state = transformation.update(probe, marked, probe)
    after: dict[str, list[jax.Array]] = {}
    for _, holder in _hyperparam_holders(after_state):
        if isinstance(holder, OptimizerState):
            for key, value in holder.hyperparams.items():
                if key in marks:
                    after.setdefault(key, []).append(jnp.asarray(value, jnp.float32))
    return values, marks, after


def from_transformation(transformation: Any, name: str | None = None) -> Optimizer:
    """Puts any kopt or optax transformation behind the Keras facade.

    The hyperparameters kopt pieces keep in their state become the optimizer's, read and set
    as attributes (``opt.learning_rate = 0.05``) without recompiling, unless one follows a
    schedule or pieces hold different values for it: setting those raises AttributeError
    (build the transformation with the value you want). An optax piece's hyperparameters stay
    its own. The state is kept in the optimizer's weights: the slots of kopt pieces, also
    those a :func:`kopt.flatten` inside keeps packed, as one slot variable per variable and
    name (``get_slot``); other state (an optax piece's, a wrapper's) as weights
    ``<name>/state_<i>``. A transformation whose state is not per-variable (most optax ones)
    must be called with the same variables every step.

    Example:
        >>> import jax.numpy as jnp, kopt, optax
        >>> var = kopt.Variable([1.0])
        >>> opt = kopt.optimizers.from_transformation(optax.sgd(0.5))
        >>> _ = opt.apply_gradients([(jnp.array([1.0]), var)])
        >>> var.numpy()
        array([0.5], dtype=float32)
    """
    return TransformationOptimizer(transformation, name)
