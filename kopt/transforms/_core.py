"""The one mechanism every kopt optimizer piece is built on: hyperparameters, slots, a leaf rule."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from kopt._tree import check_floating_params, full_like_param, map_leaves, on_params_devices
from kopt.base import (
    GradientTransformation,
    OptimizerState,
    check_state,
    current_hyperparams,
    init_hyperparams,
    safe_increment,
    schedules_of,
)
from kopt.transforms._flat import refuse_packed_params

SlotInit = Callable[[Any], jax.Array]
LeafRule = Callable[..., tuple[Any, dict[str, Any]]]


def constant_slot(value: float, dtype: Any | None = None) -> SlotInit:
    """A slot initialiser: ``full_like(param, value)`` with the param's sharding."""

    def make(p):
        return full_like_param(p, value, dtype)

    make.shaped_like_param = True  # an update checks the state's slot against the param
    return make


def compute_dtype(*arrays: Any) -> Any:
    """The float dtype a leaf's maths runs in: that of its slots (or gradient)."""
    return jnp.result_type(*[a.dtype for a in arrays if a is not None])


def cast_coefficients(coeffs: Mapping[str, jax.Array], dtype: Any) -> dict[str, jax.Array]:
    """Casts the step's scalar coefficients to a leaf's compute dtype."""
    return {k: jnp.asarray(v).astype(dtype) for k, v in coeffs.items()}


def leafwise_transformation(
    owner: str,
    hyperparams: Mapping[str, Any],
    slots: Mapping[str, SlotInit],
    rule: LeafRule,
    *,
    prepare: Callable[..., tuple[dict[str, jax.Array], dict[str, jax.Array]]] | None = None,
    scalar_slots: Mapping[str, float] | None = None,
    needs_params: bool = False,
    supports_complex: bool = True,
    per_tensor: bool = False,
) -> GradientTransformation:
    """Builds a transformation from a per-leaf rule.

    Args:
        owner: the public name, used in error messages.
        hyperparams: name -> number, scalar array or schedule; stored in the state.
        slots: slot name -> initialiser ``param -> array``.
        rule: ``rule(g, slots, p, coeffs) -> (update, new_slots)`` for one leaf; ``g`` may be an
            :class:`~kopt.IndexedSlices`.
        prepare: ``prepare(hp, step, scalars) -> (coeffs, new_scalars)``: the step's scalar
            coefficients (float32), computed once per update, and new values of the scalar slots.
            ``step`` is the float32 count before the increment. Defaults to ``hp``.
        scalar_slots: slots that are one scalar for the whole tree (Nadam's momentum cache).
        needs_params: whether ``update`` requires ``params``.
        supports_complex: whether the rule has a complex form; if not, ``init`` refuses complex
            params with a TypeError naming the param.
        per_tensor: whether the rule depends on each leaf's shape or norm, so that ``init``
            refuses params packed into flat buffers (``kopt.pack``, inside ``kopt.flatten``).
    """
    schedules = schedules_of(hyperparams)
    scalar_slots = dict(scalar_slots or {})
    shaped_like_params = [n for n, make in slots.items() if getattr(make, "shaped_like_param", 0)]

    def init_fn(params):
        if per_tensor:
            refuse_packed_params(owner, params)
        check_floating_params(params, owner, allow_complex=supports_complex)
        state_slots = {name: jax.tree.map(make, params) for name, make in slots.items()}
        _check_complex_slots(owner, params, state_slots)
        for name, value in scalar_slots.items():
            state_slots[name] = jnp.asarray(value, jnp.float32)
        count, hp, scalars = on_params_devices(
            (
                jnp.zeros([], jnp.int32),
                init_hyperparams(hyperparams),
                {name: state_slots.pop(name) for name in scalar_slots},
            ),
            params,
        )
        return OptimizerState(count=count, hyperparams=hp, slots={**state_slots, **scalars})

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_state(
            owner, state, OptimizerState, hyperparams=hyperparams, slots=[*slots, *scalar_slots]
        )
        hp = current_hyperparams(state, schedules)
        step = state.count.astype(jnp.float32)
        scalars = {name: state.slots[name] for name in scalar_slots}
        if prepare is None:
            coeffs, new_scalars = hp, scalars
        else:
            coeffs, new_scalars = prepare(hp, step, scalars)
        leaf_slots = {name: state.slots[name] for name in slots}
        updates, new_slots = map_leaves(
            lambda g, s, p: rule(g, s, p, coeffs),
            updates,
            leaf_slots,
            params,
            owner,
            needs_params=needs_params,
            shaped_like_params=shaped_like_params,
        )
        new_slots.update(new_scalars)
        return updates, OptimizerState(safe_increment(state.count), hp, new_slots)

    return GradientTransformation(init_fn, update_fn)


def _check_complex_slots(owner: str, params: Any, slots: Mapping[str, Any]) -> None:
    """A real ``slot_dtype`` cannot hold a complex param's statistics: the gradient cast to it
    would lose its imaginary part, silently."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not any(jnp.iscomplexobj(p) for _, p in flat):
        return
    for name, tree in slots.items():
        for (path, p), slot in zip(flat, jax.tree.leaves(tree), strict=False):
            if jnp.iscomplexobj(p) and not jnp.iscomplexobj(slot):
                where = jax.tree_util.keystr(path) or "<root>"
                raise TypeError(
                    f"{owner}: param {where} is {jnp.result_type(p)}, but its slot {name!r} "
                    f"would be {jnp.result_type(slot)}; a complex param needs a complex "
                    "slot_dtype (or None, the param's)"
                )


def learning_rate_at(hp: Mapping[str, jax.Array], step: jax.Array) -> jax.Array:
    """Keras's ``_decayed_lr``: ``learning_rate / (1 + decay * step)`` (``decay`` if present)."""
    lr = hp["learning_rate"]
    if "decay" in hp:
        lr = lr / (1.0 + hp["decay"] * step)
    return lr
