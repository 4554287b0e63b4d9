"""Keras 3's ``weight_decay`` argument for any optimizer: decay the params first, then step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt._tree import on_params_devices, tree_or_function, uncommitted_on_params_devices
from kopt.base import (
    GradientTransformation,
    OptimizerState,
    check_hyperparam,
    check_state,
    check_transformation,
    current_hyperparams,
    extra_args_update,
    init_hyperparams,
    safe_increment,
    schedules_of,
)
from kopt.sparse import as_dense, is_indexed_slices
from kopt.transforms._wrappers import _leafless, _packed_hint, _refuse_packed


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`: its hyperparameters, then the inner state."""

    decay: OptimizerState
    inner_state: Any


def decoupled_weight_decay(
    inner: GradientTransformation,
    weight_decay: Any,
    learning_rate: Any = 0.001,
    mask: Any = None,
) -> GradientTransformation:
    r"""Decays the params by ``weight_decay * learning_rate`` before ``inner`` steps from them.

    .. math:: w' = w - \eta\,\lambda\,w, \qquad w \leftarrow w' + \mathrm{inner}(g, w')

    This is what Keras 3 does for every optimizer given ``weight_decay`` (decoupled decay,
    Loshchilov and Hutter, 2019): the decay comes first, so an optimizer that reads the params
    (Lamb's trust ratio, Adafactor's relative step) sees the decayed ones. ``learning_rate`` should
    be the inner optimizer's own (a schedule is evaluated at this transformation's step count).
    Needs ``params``.

    Args:
        inner: the optimizer.
        weight_decay: the decay rate (a number, scalar array or schedule).
        learning_rate: the learning rate that scales the decay.
        mask: which params decay: a pytree of bools shaped like the params (a prefix works
            too) or a function ``params -> mask``; None decays every param. Keras 3's
            ``exclude_from_weight_decay`` in functional form.

    Returns:
        A transformation whose updates move each param to ``w' + inner(g, w')``.

    Raises:
        ValueError: for a negative rate, or ``update`` without ``params``; in ``init``, for a
            ``mask`` that does not fit the params, or a function ``mask`` given params packed
            into flat buffers (by :func:`kopt.pack`, or inside :func:`kopt.flatten`), where it
            would select whole buffers, not params.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.decoupled_weight_decay(kopt.lion(0.5), weight_decay=0.1, learning_rate=0.5)
        >>> w = jnp.array([2.0, 2.0])
        >>> u, _ = tx.update(jnp.array([0.0, 1.0]), tx.init(w), w)
        >>> kopt.apply_updates(w, u)  # 2 - 2 * 0.1 * 0.5, then Lion's -0.5 * sign(g)
        Array([1.9, 1.4], dtype=float32)
    """
    check_transformation("decoupled_weight_decay", "`inner`", inner)
    owner = "decoupled_weight_decay"
    check_hyperparam(owner, "weight_decay", weight_decay)
    check_hyperparam(owner, "learning_rate", learning_rate)
    hyper = {"weight_decay": weight_decay, "learning_rate": learning_rate}
    schedules = schedules_of(hyper)

    def init_fn(params):
        if mask is not None and not _leafless(params):
            check_mask(params)
        count, hp = on_params_devices((jnp.zeros([], jnp.int32), init_hyperparams(hyper)), params)
        inner_state = uncommitted_on_params_devices(inner.init(params), params)
        return DecoupledWeightDecayState(OptimizerState(count, hp, {}), inner_state)

    def check_mask(params):
        """Raises, as :func:`kopt.masked` does, for a mask that does not fit the params, and
        for a function of packed buffers, which would decide per buffer, not per param."""
        resolved = tree_or_function(mask, params)
        try:
            jax.tree.map(lambda m, p: None, resolved, params, is_leaf=lambda x: x is None)
        except ValueError as e:
            raise ValueError(
                f"{owner}: `mask` does not fit the params{_packed_hint(params)}: {e}"
            ) from e
        if resolved is not mask:
            _refuse_packed(params, owner, "mask")

    inner_update = extra_args_update(inner)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(f"{owner}: this transformation needs `params` in update()")
        check_state(owner, state, DecoupledWeightDecayState)
        check_state(owner, state.decay, OptimizerState, hyperparams=hyper)
        hp = current_hyperparams(state.decay, schedules)
        rate = hp["weight_decay"] * hp["learning_rate"]
        decayed = jax.tree.map(lambda p: p - p * rate.astype(jnp.result_type(p)), params)
        if mask is not None:
            keep = tree_or_function(mask, params)
            decayed = jax.tree.map(
                lambda decays, new, old: new if decays else old,
                keep,
                decayed,
                params,
                is_leaf=lambda x: x is None,
            )
        inner_updates, inner_state = inner_update(updates, state.inner_state, decayed, **extra_args)
        # A param without a gradient (a None update) is not decayed either, as in Keras 3,
        # which decays only the variables it is given gradients for.
        new_updates = jax.tree.map(
            lambda u, d, p: None if u is None else (d - p) + as_dense(u, jnp.shape(p)),
            inner_updates,
            decayed,
            params,
            is_leaf=lambda x: x is None or is_indexed_slices(x),
        )
        decay = OptimizerState(safe_increment(state.decay.count), hp, {})
        return new_updates, DecoupledWeightDecayState(decay, inner_state)

    return GradientTransformation(init_fn, update_fn)
