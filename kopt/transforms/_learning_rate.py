"""The learning-rate step and decoupled weight decay."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from kopt.base import GradientTransformation, check_hyperparam
from kopt.sparse import IndexedSlices, as_dense
from kopt.transforms._core import leafwise_transformation, learning_rate_at


def scale_by_learning_rate(
    learning_rate: Any = 0.001, decay: float | None = None
) -> GradientTransformation:
    """Multiplies updates by ``-lr_t``: a descent step with Keras's learning-rate rule.

    ``lr_t = learning_rate(step) / (1 + decay * step)`` where ``step`` is the number of updates
    applied before this one (Keras's ``_decayed_lr``). Sparse updates stay sparse.

    Args:
        learning_rate: a number, a scalar array or a schedule ``step -> value``.
        decay: Keras's time-inverse ``decay``, or None for none (no hyperparameter then).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.scale_by_learning_rate(0.5)
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
        Array([-0.5, -0.5], dtype=float32)
    """
    owner = "scale_by_learning_rate"
    check_hyperparam(owner, "learning_rate", learning_rate)
    hyper = {"learning_rate": learning_rate}
    if decay is not None:
        check_hyperparam(owner, "decay", decay)
        hyper["decay"] = decay

    def prepare(hp, step, scalars):
        return {"neg_lr": -learning_rate_at(hp, step)}, scalars

    def rule(g, slots, p, c):
        if isinstance(g, IndexedSlices):
            return IndexedSlices(
                c["neg_lr"].astype(g.values.dtype) * g.values, g.indices, g.dense_shape
            ), {}
        return c["neg_lr"].astype(g.dtype) * g, {}

    return leafwise_transformation(owner, hyper, {}, rule, prepare=prepare)


def add_decayed_weights(weight_decay: Any = 0.004) -> GradientTransformation:
    """Adds ``weight_decay * param`` to the updates (decoupled decay when followed by a lr step).

    Chained before :func:`scale_by_learning_rate`, the step becomes Keras 3's
    ``var -= var * weight_decay * lr`` plus the optimizer's own step.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.add_decayed_weights(0.1)
        >>> tx.update(jnp.zeros(2), tx.init(jnp.ones(2)), jnp.ones(2))[0]
        Array([0.1, 0.1], dtype=float32)
    """
    owner = "add_decayed_weights"
    check_hyperparam(owner, "weight_decay", weight_decay)

    def rule(g, slots, p, c):
        g = as_dense(g, jnp.shape(p))
        return g + c["weight_decay"].astype(g.dtype) * p.astype(g.dtype), {}

    return leafwise_transformation(
        owner, {"weight_decay": weight_decay}, {}, rule, needs_params=True
    )
