"""The optimizers: Keras's eight legacy ones (Keras-exact) and AdamW, Lion, Lamb, Adafactor
(Keras 3 semantics), each a short chain of building blocks.

Every float hyperparameter may be a number, a scalar array or a schedule ``step -> value``; it is
stored in the state (see :func:`kopt.get_hyperparam`). ``decay`` is Keras's time-inverse learning
rate decay, ``lr / (1 + decay * step)``. ``slot_dtype`` sets the dtype of the slots (default: each
param's dtype, as Keras does); a complex ``slot_dtype`` is for complex params, and gives a real
param beside them slots of the matching real dtype (float32 for complex64), so its update stays
real.
"""

from __future__ import annotations

from typing import Any

from kopt.base import GradientTransformation, chain
from kopt.transforms import (
    add_decayed_weights,
    masked,
    scale_by_adadelta,
    scale_by_adafactor,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_ftrl,
    scale_by_lamb,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_nadam,
    scale_by_rmsprop,
    scale_by_sgd,
)


def sgd(
    learning_rate: Any = 0.01,
    momentum: Any = 0.0,
    nesterov: bool = False,
    *,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Stochastic gradient descent, with Keras's momentum and Nesterov rules.

    .. math:: a \leftarrow \mu a - \eta g,\quad w \leftarrow w + a
        \;\;(\text{Nesterov: } w \leftarrow w + \mu a - \eta g)

    Slot ``momentum`` when momentum is on (a number above 0, an array or a schedule). The
    state then holds a hyperparameter and a slot of that name (Keras's names): read them with
    :func:`kopt.get_hyperparam` and :func:`kopt.get_slot`, since ``optax.tree_utils.tree_get``
    finds both and raises without a ``filtering`` argument (see "Coming from optax").

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.sgd(learning_rate=0.1)
        >>> params = jnp.array([1.0])
        >>> updates, state = tx.update(jnp.array([2.0]), tx.init(params), params)
        >>> kopt.apply_updates(params, updates)
        Array([0.8], dtype=float32)
    """
    return scale_by_sgd(learning_rate, momentum, nesterov, decay, slot_dtype)


def adam(
    learning_rate: Any = 0.001,
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    amsgrad: bool = False,
    *,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Adam as Keras computes it: epsilon added to :math:`\sqrt{v}` of the uncorrected ``v``.

    .. math::
        w \leftarrow w - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\frac{m}{\sqrt{v}+\epsilon}

    Unlike optax's ``adam`` (``eps=1e-8`` added to the bias-corrected root), this is the
    "epsilon hat" of Kingma and Ba. Slots ``m``, ``v`` (and ``vhat`` with amsgrad).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.adam(learning_rate=0.1)
        >>> params = {"w": jnp.zeros(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.array([1.0, -1.0])}, state, params)
        >>> kopt.apply_updates(params, updates)["w"]  # epsilon-hat: a hair short of lr
        Array([-0.09999969,  0.09999969], dtype=float32)
    """
    return chain(
        scale_by_adam(beta_1, beta_2, epsilon, amsgrad, slot_dtype),
        scale_by_learning_rate(learning_rate, decay),
    )


def adagrad(
    learning_rate: Any = 0.001,
    initial_accumulator_value: float = 0.1,
    epsilon: Any = 1e-7,
    *,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Adagrad as Keras computes it (accumulator starts at 0.1).

    .. math:: n \leftarrow n + g^2,\quad w \leftarrow w - \eta\, g / (\sqrt{n} + \epsilon)

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.adagrad(learning_rate=1.0, initial_accumulator_value=0.0, epsilon=0.0)
        >>> tx.update(jnp.array([3.0]), tx.init(jnp.zeros(1)))[0]
        Array([-1.], dtype=float32)
    """
    return chain(
        scale_by_adagrad(initial_accumulator_value, epsilon, slot_dtype),
        scale_by_learning_rate(learning_rate, decay),
    )


def adadelta(
    learning_rate: Any = 0.001,
    rho: Any = 0.95,
    epsilon: Any = 1e-7,
    *,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Adadelta as Keras computes it (epsilon inside both roots; the paper uses lr 1.0).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.adadelta(learning_rate=1.0)
        >>> state = tx.init(jnp.zeros(1))
        >>> sorted(kopt.slot_names(state))
        ['accum_grad', 'accum_var']
    """
    return chain(
        scale_by_adadelta(rho, epsilon, slot_dtype), scale_by_learning_rate(learning_rate, decay)
    )


def adamax(
    learning_rate: Any = 0.001,
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    *,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Adamax (Adam with the infinity norm) as Keras computes it.

    .. math:: w \leftarrow w - \frac{\eta}{1-\beta_1^t}\frac{m}{v+\epsilon},\quad
        v \leftarrow \max(\beta_2 v, |g|)

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.adamax(learning_rate=0.5, epsilon=0.0)
        >>> tx.update(jnp.array([4.0]), tx.init(jnp.zeros(1)))[0]
        Array([-0.5], dtype=float32)
    """
    return chain(
        scale_by_adamax(beta_1, beta_2, epsilon, slot_dtype),
        scale_by_learning_rate(learning_rate, decay),
    )


def nadam(
    learning_rate: Any = 0.001,
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    *,
    schedule_decay: Any = 0.004,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Nadam as Keras computes it, momentum-cache schedule included (see
    :func:`kopt.scale_by_nadam`). As in Keras, there is no time-inverse ``decay``: Keras's
    Nadam uses its ``decay`` argument as ``schedule_decay``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> state = kopt.nadam().init(jnp.zeros(3))
        >>> float(kopt.get_slot(state, "momentum_cache"))
        1.0
    """
    return chain(
        scale_by_nadam(beta_1, beta_2, epsilon, schedule_decay, slot_dtype),
        scale_by_learning_rate(learning_rate),
    )


def rmsprop(
    learning_rate: Any = 0.001,
    rho: Any = 0.9,
    momentum: Any = 0.0,
    epsilon: Any = 1e-7,
    centered: bool = False,
    *,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""RMSprop as Keras computes it: epsilon outside the root without momentum, inside with it
    (see :func:`kopt.scale_by_rmsprop`).

    With momentum on, the state holds a hyperparameter and a slot both named ``momentum``, as
    :func:`kopt.sgd`'s does: read them with :func:`kopt.get_hyperparam` and
    :func:`kopt.get_slot`.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.rmsprop(learning_rate=0.1, centered=True, momentum=0.9)
        >>> sorted(kopt.slot_names(tx.init(jnp.zeros(2))))
        ['mg', 'momentum', 'rms']
    """
    return scale_by_rmsprop(learning_rate, rho, momentum, epsilon, centered, decay, slot_dtype)


def ftrl(
    learning_rate: Any = 0.001,
    learning_rate_power: Any = -0.5,
    initial_accumulator_value: float = 0.1,
    l1_regularization_strength: Any = 0.0,
    l2_regularization_strength: Any = 0.0,
    beta: Any = 0.0,
    l2_shrinkage_regularization_strength: Any = 0.0,
    *,
    decay: Any = 0.0,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""FTRL-Proximal as Keras computes it, with L1, L2, beta and L2-shrinkage (see
    :func:`kopt.scale_by_ftrl`). Needs ``params`` in ``update``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.ftrl(learning_rate=0.1)
        >>> w = jnp.zeros(2)
        >>> u, _ = tx.update(jnp.array([1.0, -1.0]), tx.init(w), w)
        >>> [round(float(x), 4) for x in u]  # -1 / (sqrt(0.1 + 1) / 0.1)
        [-0.0953, 0.0953]
    """
    return scale_by_ftrl(
        learning_rate,
        learning_rate_power,
        initial_accumulator_value,
        l1_regularization_strength,
        l2_regularization_strength,
        beta,
        l2_shrinkage_regularization_strength,
        decay,
        slot_dtype,
    )


def adamw(
    learning_rate: Any = 0.001,
    weight_decay: Any = 0.004,
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    amsgrad: bool = False,
    *,
    mask: Any = None,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""AdamW with Keras 3 semantics: decoupled decay ``w -= w * weight_decay * lr`` plus Adam.

    Needs ``params`` in ``update``. ``mask`` (a pytree of bools shaped like the params, or a
    function ``params -> mask``) selects the params that decay, as Keras 3's
    ``exclude_from_weight_decay`` leaves others out; None decays all. Reference: Loshchilov and
    Hutter, 2019.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.adamw(learning_rate=0.1, weight_decay=0.5)
        >>> w = jnp.ones(1)
        >>> u, _ = tx.update(jnp.zeros(1), tx.init(w), w)
        >>> u  # only the decay moves w when the gradient is 0
        Array([-0.05], dtype=float32)
    """
    if weight_decay is None:
        raise ValueError("adamw: `weight_decay` cannot be None; use kopt.adam for no decay")
    decay = add_decayed_weights(weight_decay)
    return chain(
        scale_by_adam(beta_1, beta_2, epsilon, amsgrad, slot_dtype),
        decay if mask is None else masked(decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def lion(
    learning_rate: Any = 0.001, beta_1: Any = 0.9, beta_2: Any = 0.99, *, slot_dtype: Any = None
) -> GradientTransformation:
    r"""Lion with Keras 3 semantics: ``w -= lr * sign(beta_1 m + (1 - beta_1) g)``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.lion(learning_rate=0.1)
        >>> tx.update(jnp.array([5.0, -0.01]), tx.init(jnp.zeros(2)))[0]
        Array([-0.1,  0.1], dtype=float32)
    """
    return chain(scale_by_lion(beta_1, beta_2, slot_dtype), scale_by_learning_rate(learning_rate))


def lamb(
    learning_rate: Any = 0.001,
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    *,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Lamb with Keras 3 semantics and defaults (see :func:`kopt.scale_by_lamb`).
    Needs ``params`` in ``update``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.lamb(learning_rate=0.1)
        >>> w = jnp.array([3.0, 4.0])
        >>> u, _ = tx.update(jnp.array([1.0, 1.0]), tx.init(w), w)
        >>> round(float(jnp.linalg.norm(u)), 4)  # the step is lr * ||w||
        0.5
    """
    return chain(
        scale_by_lamb(beta_1, beta_2, epsilon, slot_dtype), scale_by_learning_rate(learning_rate)
    )


def adafactor(
    learning_rate: Any = 0.001,
    beta_2_decay: Any = -0.8,
    epsilon_1: Any = 1e-30,
    epsilon_2: Any = 1e-3,
    clip_threshold: Any = 1.0,
    relative_step: bool = True,
    *,
    slot_dtype: Any = None,
) -> GradientTransformation:
    r"""Adafactor with Keras 3 semantics and defaults (see :func:`kopt.scale_by_adafactor`).
    Needs ``params`` in ``update``. ``slot_dtype``: the dtype of the slots ``r``, ``c``, ``v``
    (default: each param's).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> state = kopt.adafactor().init(jnp.zeros((4, 3)))
        >>> kopt.get_slot(state, "r").shape, kopt.get_slot(state, "c").shape
        ((4,), (3,))
    """
    return scale_by_adafactor(
        learning_rate,
        beta_2_decay,
        epsilon_1,
        epsilon_2,
        clip_threshold,
        relative_step,
        slot_dtype=slot_dtype,
    )


__all__ = [
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "ftrl",
    "lamb",
    "lion",
    "nadam",
    "rmsprop",
    "sgd",
]
