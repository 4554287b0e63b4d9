"""Wrappers around a transformation: masking, partitioning, accumulation, finiteness, EMA."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt._tree import (
    check_gradients_fit,
    on_params_devices,
    slot_dtype_for,
    slot_like,
    transfer_copy,
    tree_or_function,
    uncommitted_on_params_devices,
)
from kopt.base import (
    GradientTransformation,
    OptimizerState,
    PyTree,
    apply_updates,
    check_count,
    check_hyperparam,
    check_slot_dtype,
    check_state,
    check_transformation,
    extra_args_update,
    init_hyperparams,
    safe_increment,
)
from kopt.sparse import IndexedSlices, as_dense, is_indexed_slices
from kopt.transforms._flat import packed_buffers


def _is_leaf(x):
    return x is None or is_indexed_slices(x)


def _varying_axes(shape: jax.ShapeDtypeStruct) -> tuple[str, ...]:
    """The ``shard_map`` axes a value of this type varies over (none outside ``shard_map``)."""
    axes = getattr(shape, "vma", None)  # JAX 0.9
    if axes is None:  # later JAX
        axes = getattr(getattr(shape, "manual_axis_type", None), "varying", None)
    return tuple(sorted(axes or ()))


def _same_type(a: Any, b: Any) -> bool:
    """Whether two ``jax.ShapeDtypeStruct`` agree in shape, dtype,
    sharding and ``shard_map`` variance: the two branches of a ``lax.cond`` may return either."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and getattr(a, "sharding", None) == getattr(b, "sharding", None)
        and _varying_axes(a) == _varying_axes(b)
    )


def _zeros_shaped_like(shapes: PyTree) -> PyTree:
    """Zeros for a tree of ``jax.ShapeDtypeStruct``: shape, dtype, (explicit) sharding and, in
    ``shard_map``, the same per-device variance, so a ``lax.cond`` branch can return them in
    place of a computed value."""

    def zeros(s):
        z = jnp.zeros(s.shape, s.dtype, out_sharding=s.sharding)
        axes = _varying_axes(s)
        return jax.lax.pcast(z, axes, to="varying") if axes else z

    return jax.tree.map(zeros, shapes)


class MaskedState(NamedTuple):
    """State of :func:`masked`: the inner state, over the selected leaves only."""

    inner_state: Any


def _leafless(params: PyTree) -> bool:
    """Whether ``params`` has no leaves, so a mask or labels have nothing to select.

    ``optax.tree_utils.tree_map_params`` calls ``init`` with such a tree, a placeholder that
    stands for the params, to find where the state holds trees shaped like them; the inner
    transformation is given it unmasked (as optax's ``masked`` does), since a mask shaped like
    the real params does not fit it.
    """
    return not jax.tree.leaves(params)


def _select(tree: PyTree, mask: PyTree, owner: str = "masked", what: str = "mask") -> PyTree:
    """``tree`` with the leaves where ``mask`` is False replaced by None (an empty subtree).

    Raises:
        ValueError: naming ``owner`` and ``what``, if ``mask`` does not fit ``tree``.
    """
    try:
        jax.tree.map(lambda m, x: None, mask, tree, is_leaf=_is_leaf)  # the structures only
    except ValueError as e:
        raise ValueError(
            f"{owner}: `{what}` does not fit the params{_packed_hint(tree)}: {e}"
        ) from e
    _refuse_none_selectors(tree, mask, owner, what)
    # Outside the try: a mask leaf with no truth value (an array of several elements) raises
    # its own error, not one saying that the mask does not fit.
    return jax.tree.map(lambda m, x: x if m else None, mask, tree, is_leaf=_is_leaf)


def _refuse_none_selectors(tree: PyTree, mask: PyTree, owner: str, what: str) -> None:
    """Raises where ``mask`` (which fits ``tree``) is None over a subtree that holds leaves: a
    param with no mask value or label would pass its raw gradient through as its update, an
    ascent step. A None over an empty subtree (a None param, or a None gradient) selects
    nothing and is fine.

    Raises:
        ValueError: naming ``owner``, ``what`` and the first such path.
    """
    found = []

    def visit(path, m, x):
        if m is None and jax.tree.leaves(x, is_leaf=is_indexed_slices):
            found.append(jax.tree_util.keystr(path) or "<root>")

    jax.tree_util.tree_map_with_path(visit, mask, tree, is_leaf=_is_leaf)
    if found:
        expected = "a label" if what == "labels" else "True or False"
        raise ValueError(
            f"{owner}: `{what}` is None at {', '.join(found[:3])}, where the params have "
            f"leaves; every param needs {expected} (a None would pass its raw gradient "
            "through as its update)"
        )


def _is_flatten_key(key: str) -> bool:
    """Whether ``key`` is one of kopt.flatten's: a packed buffer's, or a loose leaf's path as
    ``jax.tree_util.keystr`` writes it (``['w']``, ``[0]``, or ``.kernel`` of a dataclass or
    an Equinox module)."""
    return key.startswith(("packed ", "[", "."))


def _packed_hint(tree: PyTree) -> str:
    """Why a mask by leaf cannot fit ``tree``, when it is packed buffers (``kopt.pack``'s
    params, or what ``kopt.flatten`` passes the transformation inside it)."""
    from kopt._packed import Packed

    if isinstance(tree, Packed):
        keys = list(tree.buffers)
        where = "kopt.pack's"
    elif (
        isinstance(tree, dict)
        and any(isinstance(k, str) and k.startswith("packed ") for k in tree)
        and all(isinstance(k, str) and _is_flatten_key(k) for k in tree)
    ):
        keys = list(tree)
        where = "kopt.flatten's"
    else:
        return ""
    return (
        f" (they are {where} packed buffers {keys}, and a mask or labels by leaf cannot select "
        "within a buffer: put masked or multi_transform outside kopt.flatten, as in "
        "masked(flatten(tx), mask), and keep params that need masks unpacked)"
    )


def _refuse_packed(params: PyTree, owner: str, what: str) -> None:
    """Raises where ``params`` holds packed buffers: a mask or labels function, mapped over
    them, would select whole buffers, not params. (A mask tree that fits them, such as a
    ``True`` prefix, says what it selects.)"""
    found = packed_buffers(params)
    if found is not None:
        where, keys = found
        way_out = (
            f"put {owner} outside kopt.flatten, as in masked(flatten(tx), mask)"
            if where == "kopt.flatten"
            else "keep the params it selects among unpacked (a smaller max_leaf_size packs fewer)"
        )
        raise ValueError(
            f"{owner}: `{what}` is a function of the params, which would see {where}'s packed "
            f"buffers {keys} and select whole buffers, not params: {way_out}"
        )


def masked(
    transformation: GradientTransformation, mask: PyTree | Callable[[PyTree], PyTree]
) -> GradientTransformation:
    """Applies ``transformation`` only to the leaves where ``mask`` is True; others pass
    unchanged.

    Args:
        transformation: the transformation to apply.
        mask: a pytree of bools shaped like the params (a prefix works too), or a function
            ``params -> mask``.

    Raises:
        ValueError: if ``mask`` does not fit the params, or is None (as a whole or over a
            param): a param needs True or False; in ``update``, if the gradients do not fit
            the params (the message names the leaf).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
        >>> tx = kopt.masked(kopt.add_decayed_weights(0.5), {"w": True, "b": False})
        >>> u, _ = tx.update({"w": jnp.zeros(2), "b": jnp.zeros(2)}, tx.init(params), params)
        >>> u["w"], u["b"]
        (Array([0.5, 0.5], dtype=float32), Array([0., 0.], dtype=float32))
    """
    check_transformation("masked", "`transformation`", transformation)
    if mask is None:
        raise ValueError(
            "masked: `mask` is None; expected a pytree of bools shaped like the params (or a "
            "prefix of them), or a function params -> mask"
        )
    return _masked(transformation, mask, "masked", "mask")


def _masked(
    inner: GradientTransformation,
    mask: PyTree | Callable[[PyTree], PyTree],
    owner: str,
    what: str,
) -> GradientTransformation:
    """:func:`masked`, naming ``owner`` and its ``what`` in a mask that does not fit."""

    inner_update = extra_args_update(inner)

    def init_fn(params):
        if _leafless(params):
            return MaskedState(inner.init(params))
        resolved = tree_or_function(mask, params)
        selected = _select(params, resolved, owner, what)
        if resolved is not mask:  # a function of the params
            _refuse_packed(params, owner, what)
        inner_state = inner.init(selected)
        return MaskedState(uncommitted_on_params_devices(inner_state, params))

    def update_fn(updates, state, params=None, **extra_args):
        check_state(owner, state, MaskedState)
        if params is not None:  # the gradients first: a mask that fits the params is right
            check_gradients_fit(updates, params, owner)
        m = tree_or_function(mask, params if params is not None else updates)
        sub_params = None if params is None else _select(params, m, owner, what)
        new_sub, inner_state = inner_update(
            _select(updates, m, owner, what), state.inner_state, sub_params, **extra_args
        )
        merged = jax.tree.map(
            lambda keep, new, old: new if keep else old,
            m,
            new_sub,
            updates,
            is_leaf=_is_leaf,
        )
        return merged, MaskedState(inner_state)

    return GradientTransformation(init_fn, update_fn)


class MultiTransformState(NamedTuple):
    """State of :func:`multi_transform`: label -> inner state."""

    inner_states: dict[str, Any]


def multi_transform(
    transformations: Mapping[str, GradientTransformation],
    labels: PyTree | Callable[[PyTree], PyTree],
) -> GradientTransformation:
    """Applies a different transformation to each group of leaves, chosen by label.

    Args:
        transformations: label -> transformation.
        labels: a pytree of labels shaped like the params, or a function ``params -> labels``.

    Raises:
        ValueError: if a leaf's label has no transformation or is None (``labels`` None, or
            None over a param), or if ``labels`` does not fit the params; in ``update``, if the
            gradients do not fit the params (the message names the leaf).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.multi_transform({"fast": kopt.sgd(1.0), "slow": kopt.sgd(0.1)},
        ...                           {"w": "fast", "b": "slow"})
        >>> p = {"w": jnp.zeros(1), "b": jnp.zeros(1)}
        >>> u, _ = tx.update({"w": jnp.ones(1), "b": jnp.ones(1)}, tx.init(p), p)
        >>> float(u["w"][0]), round(float(u["b"][0]), 6)
        (-1.0, -0.1)
    """
    if not isinstance(transformations, Mapping):
        raise TypeError(
            "multi_transform: `transformations` must map labels to transformations, received "
            f"{type(transformations).__name__}"
        )
    for label, t in transformations.items():
        check_transformation("multi_transform", f"`transformations[{label!r}]`", t)
    if labels is None:
        raise ValueError(
            "multi_transform: `labels` is None; expected a pytree of labels shaped like the "
            "params (or a prefix of them), or a function params -> labels"
        )
    transformations = dict(transformations)

    def masks(tree):
        lab = tree_or_function(labels, tree)
        found = set(jax.tree.leaves(lab))
        unknown = found - set(transformations)
        if unknown:
            raise ValueError(
                f"multi_transform: labels {sorted(map(str, unknown))} have no transformation; "
                f"known labels are {sorted(transformations)}"
            )
        return {k: jax.tree.map(lambda x, k=k: x == k, lab) for k in transformations}

    def init_fn(params):
        if _leafless(params):
            return MultiTransformState(
                {
                    k: _masked(tx, None, "multi_transform", "labels").init(params)
                    for k, tx in transformations.items()
                }
            )
        ms = masks(params)
        if tree_or_function(labels, params) is not labels:  # a function of the params
            _refuse_packed(params, "multi_transform", "labels")
        return MultiTransformState(
            {
                k: _masked(tx, ms[k], "multi_transform", "labels").init(params)
                for k, tx in transformations.items()
            }
        )

    def update_fn(updates, state, params=None, **extra_args):
        check_state("multi_transform", state, MultiTransformState)
        if set(state.inner_states) != set(transformations):
            raise TypeError(
                "multi_transform: `state` was not made by this transformation's init (its "
                f"labels are {sorted(map(str, state.inner_states))}, expected "
                f"{sorted(map(str, transformations))}); make it with `state = tx.init(params)`"
            )
        ms = masks(params if params is not None else updates)
        new_states = {}
        for k, tx in transformations.items():
            updates, new_states[k] = _masked(tx, ms[k], "multi_transform", "labels").update(
                updates, state.inner_states[k], params, **extra_args
            )
        return updates, MultiTransformState(new_states)

    return GradientTransformation(init_fn, update_fn)


class AccumulateState(NamedTuple):
    """State of :func:`accumulate_gradients`."""

    mini_step: jax.Array
    accumulated: PyTree
    inner_state: Any


def accumulate_gradients(
    transformation: GradientTransformation,
    every_k: int,
    reduction: str = "mean",
    *,
    slot_dtype: Any = None,
) -> GradientTransformation:
    """Accumulates gradients over ``every_k`` calls; the inner update runs only on the k-th.

    The other calls return zero updates and leave the inner state untouched; the inner update is
    inside a ``lax.cond`` branch, so its work is not done on those calls (unlike Keras 3 on JAX,
    which computes it and then discards it).

    A NaN or infinity in one call's gradient reaches only the update at the end of its window:
    the calls in between still return exact zeros, and the next window sums from zero. Put
    :func:`kopt.apply_if_finite` inside to skip that one update.

    A None gradient leaf (no gradient for that param this call) adds nothing. At a boundary it
    passes None to the inner update, so the param is not stepped, and what it gathered in the
    window is kept for its next step (as Keras 3 keeps a left-out variable's accumulator).

    Args:
        transformation: the inner transformation.
        every_k: how many calls make one step (an int >= 1).
        reduction: ``"mean"`` (Keras 3's ``gradient_accumulation_steps``) or ``"sum"``.
        slot_dtype: the accumulator's dtype; default: each param's, as Keras 3 and optax keep
            it. ``jnp.float32`` sums the micro-batches of bfloat16 or float16 gradients in
            float32, and their mean (or sum) is rounded to the gradient's dtype once, for the
            inner update.

    Raises:
        ValueError: for ``every_k < 1`` or an unknown reduction; in ``update``, for a gradient
            tree that does not fit the params (a stray or missing leaf, a shape of its own),
            naming the leaf.
        TypeError: for a ``slot_dtype`` that is not a floating-point dtype.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.accumulate_gradients(kopt.sgd(1.0), every_k=2)
        >>> s = tx.init(jnp.zeros(1))
        >>> u1, s = tx.update(jnp.array([1.0]), s, jnp.zeros(1))
        >>> u2, s = tx.update(jnp.array([3.0]), s, jnp.zeros(1))
        >>> float(u1[0]), float(u2[0])
        (0.0, -2.0)
    """
    check_transformation("accumulate_gradients", "`transformation`", transformation)
    every_k = check_count("accumulate_gradients", "every_k", every_k, 1)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"accumulate_gradients: `reduction` must be 'mean' or 'sum', received {reduction!r}"
        )
    check_slot_dtype("accumulate_gradients", slot_dtype)

    inner_update = extra_args_update(transformation)

    def reduced(g, total):
        """The accumulated gradient the inner update gets, in the gradient's own dtype when the
        accumulator has one of its own."""
        if g is None:
            return None
        out = total if reduction == "sum" else total / every_k
        return out if slot_dtype is None else out.astype(g.dtype)

    def init_fn(params):
        zeros = slot_like(params, 0.0, slot_dtype)
        mini_step = on_params_devices(jnp.zeros([], jnp.int32), params)
        inner_state = uncommitted_on_params_devices(transformation.init(params), params)
        return AccumulateState(mini_step, zeros, inner_state)

    def update_fn(updates, state, params=None, **extra_args):
        check_state("accumulate_gradients", state, AccumulateState)
        # A None gradient leaf (no gradient this call) keeps its accumulator, so the state's
        # structure never changes, and passes None to the inner update at a boundary (and
        # keeps its accumulator through it).
        check_gradients_fit(
            updates, params if params is not None else state.accumulated, "accumulate_gradients"
        )

        def add(g, a):
            return a if g is None else a + as_dense(g, a.shape).astype(a.dtype)

        total = jax.tree.map(add, updates, state.accumulated, is_leaf=_is_leaf)
        boundary = state.mini_step + 1 >= every_k

        def apply_inner(operand):
            total, inner_state = operand
            grads = jax.tree.map(reduced, updates, total, is_leaf=_is_leaf)
            new_updates, inner_state = inner_update(grads, inner_state, params, **extra_args)
            new_updates = jax.tree.map(
                lambda u, a: None if u is None else as_dense(u, a.shape),
                new_updates,
                total,
                is_leaf=_is_leaf,
            )
            return new_updates, inner_state

        # The conditional returns, per leaf, one buffer that holds the sum so far off a
        # boundary and the inner update at one (where the two have one type), selected from
        # outside: it neither fills zero updates nor copies the sum through the branch not
        # taken, which cost a step of 200 leaves three times its own work. An update of
        # another type than the sum (a float32 sum of bfloat16 gradients) is returned apart.
        update_types, total_types = jax.eval_shape(
            lambda operand: (apply_inner(operand)[0], operand[0]), (total, state.inner_state)
        )
        shared = jax.tree.map(
            lambda u, a: u is not None and _same_type(u, a),
            update_types,
            total_types,
            is_leaf=_is_leaf,
        )

        def at_boundary(operand):
            new_updates, inner_state = apply_inner(operand)
            held = jax.tree.map(
                lambda u, a, same: u if same else a,
                new_updates,
                operand[0],
                shared,
                is_leaf=_is_leaf,
            )
            apart = jax.tree.map(
                lambda u, same: None if same else u, new_updates, shared, is_leaf=_is_leaf
            )
            return held, apart, inner_state

        def between(operand):
            total, inner_state = operand
            apart = jax.tree.map(
                lambda u, same: None if u is None or same else _zeros_shaped_like(u),
                update_types,
                shared,
                is_leaf=_is_leaf,
            )
            return total, apart, inner_state

        held, apart, inner_state = jax.lax.cond(
            boundary, at_boundary, between, (total, state.inner_state)
        )
        new_updates = jax.tree.map(
            lambda h, u, same: jnp.where(boundary, h, jnp.zeros((), h.dtype)) if same else u,
            held,
            apart,
            shared,
            is_leaf=_is_leaf,
        )
        # A param whose gradient is None at a boundary is not stepped: what it gathered in
        # the window so far stays in its accumulator, for its next step, rather than being
        # dropped (as Keras 3 keeps the accumulator of a variable left out of a step).
        accumulated = jax.tree.map(
            lambda g, h: (
                None
                if h is None
                else h
                if g is None
                else jnp.where(boundary, jnp.zeros((), h.dtype), h)
            ),
            updates,
            held,
            is_leaf=_is_leaf,
        )
        mini_step = jnp.where(boundary, 0, state.mini_step + 1).astype(jnp.int32)
        return new_updates, AccumulateState(mini_step, accumulated, inner_state)

    return GradientTransformation(init_fn, update_fn)


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`."""

    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: Any


def all_finite(tree: PyTree) -> jax.Array:
    """True when every element of every leaf (values of IndexedSlices) is finite.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> bool(kopt.all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf])}))
        False
    """
    leaves = [
        g.values if isinstance(g, IndexedSlices) else g
        for g in jax.tree.leaves(tree, is_leaf=is_indexed_slices)
    ]
    if not leaves:
        return jnp.array(True)
    # On the CPU, XLA writes `isfinite(x)` out as a boolean array before reducing it (a 10 MB
    # temporary and about 1 ms at 10M float32 elements). `isfinite(sum(x - x))` reads `x` only,
    # but XLA's simplifier folds `x - x` (and `x * 0`) to 0 when fast math is on, which would
    # make every gradient look finite without a word; so the check stays elementwise.
    flags = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])
    # The minimum of the flags as integers, not ``jnp.all`` of them: XLA rewrites a boolean
    # reduction of stacked scalars into a chain of `and`s, one per leaf, and copies that chain
    # into every elementwise consumer of the result. A step selecting each of n leaves on it
    # (a LossScaleOptimizer's) compiled O(n**2) instructions, 3-4x the compile time of the
    # step without it at 100 variables.
    return jnp.min(flags.astype(jnp.int8)) == 1


# Primitives that name axes but exchange nothing, so a replica runs them alone: `axis_index`
# reads the replica's own index, and the casts only change a value's type (per-device,
# reduced; shard_map inserts `pvary` wherever a replicated value meets a per-device one).
_LOCAL_AXIS_PRIMITIVES = ("axis_index", "pvary", "preduced")
_LOCAL_AXIS_PRIMITIVES += ("vary_unreduced_cast_p", "reduced_vary_cast_p")
# Primitives that bind axis names of their own (a shard_map or pmap inside the update).
_BINDING_AXES = ("shard_map", "xla_pmap", "pmap")


def _collective_axes(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """The named axes over which ``fn(*args)`` runs collectives, read from its jaxpr, nested
    ones (in ``cond``, ``scan``...) included.

    A collective is any primitive whose ``axes`` or ``axis_name`` parameter names an axis
    (``psum``, ``all_gather``, ``ppermute``, ``ragged_all_to_all``, ``psend``...), other than
    the few that name one without exchanging data. A collective unknown to kopt is so counted:
    missing one would let the replicas disagree and hang, where counting a primitive that
    exchanges nothing only makes them decide together.
    """
    axes: list[Any] = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in _BINDING_AXES:
                continue  # its collectives are over the axes it binds itself, not ours
            if eqn.primitive.name not in _LOCAL_AXIS_PRIMITIVES:
                for key in ("axes", "axis_name"):
                    names = eqn.params.get(key)
                    names = names if isinstance(names, (tuple, list)) else (names,)
                    # Integers name positional axes (a reduction, not a replica exchange).
                    axes.extend(
                        a
                        for a in names
                        if a is not None and not isinstance(a, int) and a not in axes
                    )
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                    if hasattr(sub, "eqns"):
                        visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return tuple(axes)


def apply_if_finite(
    transformation: GradientTransformation, max_consecutive_errors: int = 5
) -> GradientTransformation:
    """Skips a step whose gradients hold a NaN or infinity: zero updates, inner state unchanged.

    After ``max_consecutive_errors`` skipped steps in a row the next bad step is passed to the
    inner transformation (so a run that only produces bad gradients fails visibly).

    Inside ``shard_map`` or ``pmap``, when the inner transformation exchanges data between
    replicas (an :func:`aggregate_gradients` in it), the decision is taken jointly over those
    axes: one replica's bad gradient skips the step on all, which keeps them in step.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.apply_if_finite(kopt.adam(0.1), max_consecutive_errors=3)
        >>> s = tx.init(jnp.zeros(2))
        >>> u, s = tx.update(jnp.array([1.0, jnp.nan]), s, jnp.zeros(2))
        >>> u, int(s.total_notfinite)
        (Array([0., 0.], dtype=float32), 1)
    """
    check_transformation("apply_if_finite", "`transformation`", transformation)
    max_consecutive_errors = check_count(
        "apply_if_finite", "max_consecutive_errors", max_consecutive_errors, 0
    )

    inner_update = extra_args_update(transformation)

    def init_fn(params):
        counters = on_params_devices(
            (jnp.zeros([], jnp.int32), jnp.array(True), jnp.zeros([], jnp.int32)), params
        )
        inner_state = uncommitted_on_params_devices(transformation.init(params), params)
        return ApplyIfFiniteState(*counters, inner_state)

    def update_fn(updates, state, params=None, **extra_args):
        check_state("apply_if_finite", state, ApplyIfFiniteState)

        def apply_inner(operand):
            updates, inner_state = operand
            return inner_update(updates, inner_state, params, **extra_args)

        finite = all_finite(updates)
        axes = _collective_axes(apply_inner, (updates, state.inner_state))
        if axes:
            # The inner update talks to the other replicas (an aggregate_gradients inside it):
            # they must all run it or all skip it, or those running it wait forever for the
            # others. So one replica's bad gradient skips the step everywhere.
            finite = jax.lax.pmin(finite.astype(jnp.int32), axes) > 0
        notfinite = jnp.where(finite, 0, state.notfinite_count + 1).astype(jnp.int32)
        run = finite | (notfinite > max_consecutive_errors)

        def skip(operand):
            updates, inner_state = operand
            out_shape = jax.eval_shape(apply_inner, operand)[0]
            return _zeros_shaped_like(out_shape), inner_state

        new_updates, inner_state = jax.lax.cond(
            run, apply_inner, skip, (updates, state.inner_state)
        )
        total = jnp.where(finite, state.total_notfinite, safe_increment(state.total_notfinite))
        return new_updates, ApplyIfFiniteState(notfinite, finite, total, inner_state)

    return GradientTransformation(init_fn, update_fn)


def _average_start(p: Any, dtype: Any = None) -> jax.Array:
    """A copy of a param, in ``dtype`` (default: its own) and not weakly typed (a Python float's
    copy would be), as the averages the update returns are: a jitted step then compiles once.
    An array's copy is a transfer where it can be, not ``jnp.copy``, which eagerly compiled a
    program per param shape."""
    dtype = slot_dtype_for(p, dtype)
    copy = transfer_copy(p, dtype)
    return copy if copy is not None else jnp.copy(p).astype(dtype)


def _averages_start(params: PyTree, dtype: Any) -> PyTree:
    """:func:`_average_start` of every param. Converted to another dtype (a float32 average of
    bfloat16 params), concrete params are cast in one compiled call for the whole tree, which
    keeps each one's placement, rather than one eager cast per param shape."""
    if dtype is None or any(isinstance(p, jax.core.Tracer) for p in jax.tree.leaves(params)):
        return jax.tree.map(lambda p: _average_start(p, dtype), params)
    return _cast_tree(params, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _cast_tree(params: PyTree, dtype: Any) -> PyTree:
    return jax.tree.map(lambda p: jnp.asarray(p).astype(slot_dtype_for(p, dtype)), params)


def ema(
    momentum: Any = 0.99, overwrite_frequency: int | None = None, *, slot_dtype: Any = None
) -> GradientTransformation:
    """Keeps an exponential moving average of the params after each update (Keras 3's EMA).

    Put it last in a chain, and inside :func:`apply_if_finite` when steps may be skipped
    (``apply_if_finite(chain(tx, ema()))``): chained after it, the average would count a skipped
    step as one. The average (slot ``"average"``) starts as a copy of the params and
    is set to the updated params on the first step (count 0), then
    ``average = momentum * average + (1 - momentum) * new_params``. A state made later in a
    run (the facade switching ``use_ema`` on) therefore averages from the params it was made
    with, not from zero. With
    ``overwrite_frequency=n``, every n-th step replaces the params by the average (the update
    becomes ``average - params``). Updates pass through unchanged otherwise. Needs ``params``.
    A param whose update is None (no gradient this step) keeps its average.

    The average takes each param's dtype, as Keras 3's does, unless ``slot_dtype`` is given.
    For bfloat16 params, pass ``slot_dtype=jnp.float32``: in bfloat16 a momentum of 0.999
    rounds to 1, and an average kept there never moves from the first step's params.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.chain(kopt.sgd(1.0), kopt.ema(0.5))
        >>> p = jnp.zeros(1)
        >>> s = tx.init(p)
        >>> u, s = tx.update(jnp.array([-2.0]), s, p); p = kopt.apply_updates(p, u)
        >>> u, s = tx.update(jnp.array([-2.0]), s, p); p = kopt.apply_updates(p, u)
        >>> float(kopt.get_slot(s, "average")[0])
        3.0
    """
    check_hyperparam("ema", "momentum", momentum, low=0.0, high=1.0, allow_schedule=False)
    check_slot_dtype("ema", slot_dtype)
    overwrite_frequency = check_count(
        "ema", "overwrite_frequency", overwrite_frequency, 1, or_none=True
    )

    def init_fn(params):
        average = _averages_start(params, slot_dtype)
        count, hp = on_params_devices(
            (jnp.zeros([], jnp.int32), init_hyperparams({"momentum": momentum})), params
        )
        return OptimizerState(count, hp, {"average": average})

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("ema: this transformation needs `params` in update()")
        check_state("ema", state, OptimizerState, hyperparams=["momentum"], slots=["average"])
        m = jnp.where(state.count == 0, 0.0, state.hyperparams["momentum"])
        new_params = apply_updates(params, updates)
        # A param with no gradient this step (a None update) keeps its average, as it keeps
        # every other slot: it is not averaged towards a value the optimizer did not make.
        average = jax.tree.map(
            lambda u, a, p: (
                a
                if u is None
                else m.astype(a.dtype) * a + (1 - m.astype(a.dtype)) * p.astype(a.dtype)
            ),
            updates,
            state.slots["average"],
            new_params,
            is_leaf=_is_leaf,
        )
        count = safe_increment(state.count)
        if overwrite_frequency is not None:
            overwrite = count % overwrite_frequency == 0
            updates = jax.tree.map(
                lambda u, a, p: (
                    None if u is None else jnp.where(overwrite, a - p, as_dense(u, jnp.shape(p)))
                ),
                updates,
                average,
                params,
                is_leaf=_is_leaf,
            )
        return updates, OptimizerState(count, state.hyperparams, {"average": average})

    return GradientTransformation(init_fn, update_fn)
