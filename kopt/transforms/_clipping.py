"""Gradient clipping as Keras's ``clipvalue``, ``clipnorm`` and ``global_clipnorm`` do it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kopt._tree import abs_sq, at_least_float32, check_floating_gradients, on_params_devices
from kopt.base import (
    GradientTransformation,
    OptimizerState,
    check_hyperparam,
    check_state,
    current_hyperparams,
    init_hyperparams,
    safe_increment,
    schedules_of,
)
from kopt.sparse import IndexedSlices, is_indexed_slices, map_values
from kopt.transforms._core import leafwise_transformation


def clip_by_value(clipvalue: Any) -> GradientTransformation:
    """Clips every gradient element to ``[-clipvalue, clipvalue]`` (Keras's ``clipvalue``).

    Complex params are refused (TypeError at ``init``): complex numbers have no order to clip in.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.clip_by_value(1.0)
        >>> tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(jnp.zeros(3)))[0]
        Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    check_hyperparam("clip_by_value", "clipvalue", clipvalue)

    def rule(g, s, p, c):
        def clip(x):
            v = c["clipvalue"].astype(x.dtype)
            return jnp.clip(x, -v, v)

        return map_values(clip, g), {}

    return leafwise_transformation(
        "clip_by_value", {"clipvalue": clipvalue}, {}, rule, supports_complex=False
    )


def clip_by_norm(clipnorm: Any) -> GradientTransformation:
    """Rescales each gradient tensor whose L2 norm exceeds ``clipnorm`` (Keras's ``clipnorm``).

    ``g * clipnorm / max(||g||, clipnorm)``, per tensor (not global); ``||g||**2`` sums
    ``|g|**2``, so a complex gradient is measured by its modulus. A float16 or bfloat16
    gradient is clipped in float32 (its norm and the scaling) and rounded back to its dtype:
    in float16 the sum of squares overflows above a norm of about 256, and a ``clipnorm``
    below about ``6e-5`` is subnormal there.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.clip_by_norm(1.0)
        >>> tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))[0]
        Array([0.6, 0.8], dtype=float32)
    """
    check_hyperparam("clip_by_norm", "clipnorm", clipnorm)

    def rule(g, s, p, c):
        def clip(x):
            wide = at_least_float32(x)
            l2sum = jnp.sum(abs_sq(wide))
            clip_norm = c["clipnorm"].astype(l2sum.dtype)
            positive = l2sum > 0
            norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, l2sum, 1.0)), l2sum)
            return (wide * clip_norm / jnp.maximum(norm, clip_norm)).astype(x.dtype)

        return map_values(clip, g), {}

    return leafwise_transformation(
        "clip_by_norm", {"clipnorm": clipnorm}, {}, rule, per_tensor=True
    )


def global_norm(updates: Any) -> jax.Array:
    """The L2 norm of all gradient leaves together (values of IndexedSlices count as given).

    Computed in at least float32; a complex leaf contributes ``|g|**2``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> float(kopt.global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}))
        5.0
    """
    leaves = [
        g.values if isinstance(g, IndexedSlices) else g
        for g in jax.tree.leaves(updates, is_leaf=is_indexed_slices)
    ]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(abs_sq(at_least_float32(x))) for x in leaves))


def clip_by_global_norm(global_clipnorm: Any) -> GradientTransformation:
    """Scales all gradients by ``clipnorm / max(global_norm, clipnorm)`` (Keras's
    ``global_clipnorm``). A non-finite global norm turns every gradient into NaN, as in
    TensorFlow, so the step can be recognised and skipped (see :func:`kopt.apply_if_finite`).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.clip_by_global_norm(1.0)
        >>> g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
        >>> u, _ = tx.update(g, tx.init(g))
        >>> [round(float(x[0]), 6) for x in (u["a"], u["b"])]
        [0.6, 0.8]
    """
    owner = "clip_by_global_norm"
    check_hyperparam(owner, "global_clipnorm", global_clipnorm)
    hyper = {"global_clipnorm": global_clipnorm}
    schedules = schedules_of(hyper)

    def init_fn(params):
        count, hp = on_params_devices((jnp.zeros([], jnp.int32), init_hyperparams(hyper)), params)
        return OptimizerState(count, hp, {})

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        check_state(owner, state, OptimizerState, hyperparams=hyper)
        check_floating_gradients(updates, owner)
        hp = current_hyperparams(state, schedules)
        clip_norm = hp["global_clipnorm"]
        norm = global_norm(updates)
        scale = clip_norm * jnp.minimum(1.0 / norm, 1.0 / clip_norm) + (norm - norm)
        updates = jax.tree.map(
            lambda g: map_values(lambda x: x * scale.astype(x.dtype), g),
            updates,
            is_leaf=is_indexed_slices,
        )
        return updates, OptimizerState(safe_increment(state.count), hp, {})

    return GradientTransformation(init_fn, update_fn)
