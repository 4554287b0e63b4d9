"""Leaf-by-leaf helpers shared by the transformations: structure checks and slot maps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kopt.sparse import IndexedSlices, is_indexed_slices

PyTree = Any


def _path_str(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def check_floating_params(params: PyTree, owner: str, *, allow_complex: bool = True) -> None:
    """Raises TypeError naming the first param leaf that is not a floating-point array or
    Python float (or, without ``allow_complex``, that is complex: for a rule with no complex
    form). A Python float counts as the default float dtype, as ``jnp.zeros_like`` makes it."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None and isinstance(leaf, (float, complex)):
            dtype = jnp.result_type(leaf)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{owner}: param {_path_str(path)} must be a floating-point array or Python "
                f"float, received {type(leaf).__name__} of dtype {dtype}"
            )
        if not allow_complex and jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"{owner}: param {_path_str(path)} has complex dtype {dtype}, expected a real "
                f"floating-point array ({owner} has no complex form)"
            )


def tree_or_function(value: Any, params: PyTree) -> PyTree:
    """A mask or label tree given as a tree or as a function ``params -> tree``, resolved.

    A callable counts as the function only when it is not a pytree of data: an equinox module
    is callable (its ``__call__``) but a mask made from one (``jax.tree.map(f, model)``) holds
    bools, not functions, and is the tree itself. As optax's ``masked`` decides it: the value
    is a function when it has leaves and each of them is callable.
    """
    if callable(value):
        leaves = jax.tree.leaves(jax.tree.map(callable, value))
        if leaves and all(leaves):
            return value(params)
    return value


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|**2``, real: ``x * x`` for a real dtype, ``re(x)**2 + im(x)**2`` for a complex one
    (in the matching real dtype). Every second moment and squared norm is taken with it."""
    if jnp.iscomplexobj(x):
        return x.real * x.real + x.imag * x.imag
    return x * x


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` upcast to float32 (float16/bfloat16), else as it is: a complex ``x`` keeps its
    imaginary part (``astype(float32)`` would drop it)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_none(x: Any) -> bool:
    return x is None


def _is_none_or_sparse(x: Any) -> bool:
    return x is None or is_indexed_slices(x)


def check_same_structure(
    updates: PyTree,
    reference: PyTree,
    owner: str,
    what: str,
    *,
    none_leaves: bool = False,
    subject: str = "the gradient tree",
) -> None:
    """Raises ValueError naming the first path where ``updates`` and ``reference`` differ.

    With ``none_leaves``, a None counts as a leaf on both sides, so a None gradient where the
    reference has an array (a param without a gradient) is no difference, nor is an array where
    the reference has None (see :func:`gradient_for_none_param`); a None that stands for a whole
    subtree of arrays still is.
    """
    u_leaf = _is_none_or_sparse if none_leaves else is_indexed_slices
    r_leaf = _is_none if none_leaves else None
    u_def = jax.tree.structure(updates, is_leaf=u_leaf)
    r_def = jax.tree.structure(reference, is_leaf=r_leaf)
    if u_def == r_def:
        return
    u_paths = [
        _path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(updates, is_leaf=u_leaf)[0]
    ]
    r_paths = [
        _path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(reference, is_leaf=r_leaf)[0]
    ]
    missing = [p for p in r_paths if p not in u_paths]
    extra = [p for p in u_paths if p not in r_paths]
    detail = []
    if missing:
        detail.append(f"missing {', '.join(missing[:3])}")
    if extra:
        detail.append(f"unexpected {', '.join(extra[:3])}")
    if not detail:
        detail.append(f"structure {u_def} differs from {r_def}")
    raise ValueError(f"{owner}: {subject} does not match the {what}: {'; '.join(detail)}")


def gradient_for_none_param(owner: str, path: Any) -> ValueError:
    """The error for a gradient given where the param is None (an empty subtree)."""
    return ValueError(
        f"{owner}: gradient {_path_str(path)} is given where the param is None (an empty subtree)"
    )


def check_gradients_fit(updates: PyTree, params: PyTree, owner: str) -> None:
    """Raises ValueError naming ``owner`` and the first gradient that does not fit ``params``:
    a stray or missing leaf, a gradient where the param is None, a dense gradient of another
    shape, or a sparse one whose rows do not fit. A None gradient (no gradient this step)
    fits any param. For the wrappers that pass gradients on (or add them up) without a rule
    of their own to check them; the dtype is left to the transformation they wrap.
    """
    check_same_structure(updates, params, owner, "params", none_leaves=True)
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_none_or_sparse)
    for (path, g), p in zip(flat, treedef.flatten_up_to(params), strict=True):
        if g is None:
            continue
        if p is None:
            raise gradient_for_none_param(owner, path)
        shape = tuple(jnp.shape(p))
        if isinstance(g, IndexedSlices):
            check_leaf(_path_str(path), g, shape, owner)
        elif tuple(jnp.shape(g)) != shape:
            raise ValueError(
                f"{owner}: gradient {_path_str(path)} has shape {tuple(jnp.shape(g))}, "
                f"expected {shape}"
            )


def check_leaf(
    path: str, g: Any, ref_shape: tuple[int, ...], owner: str, *, ref_dtype: Any = None
) -> None:
    """Raises TypeError/ValueError for a gradient leaf of the wrong kind or shape: values that
    are not floating-point (dense or the rows of an :class:`IndexedSlices`), or complex ones
    for a ``ref_dtype`` (the param's) that is real, whose update would drop the imaginary
    part."""
    _check_gradient_dtype(path, g.values if isinstance(g, IndexedSlices) else g, owner, ref_dtype)
    if isinstance(g, IndexedSlices):
        check_rows_fit(f"sparse gradient {path}", g, ref_shape, owner)
        return
    if tuple(g.shape) != tuple(ref_shape):
        raise ValueError(
            f"{owner}: gradient {path} has shape {tuple(g.shape)}, expected {tuple(ref_shape)}"
        )


def check_rows_fit(subject: str, g: IndexedSlices, ref_shape: tuple[int, ...], owner: str) -> None:
    """Raises ValueError/TypeError, naming ``subject`` (``"sparse gradient ['emb']"``), for an
    :class:`IndexedSlices` that does not fit a table of shape ``ref_shape``: a scalar table,
    rows of another shape, another ``dense_shape``, indices that are not integers, or indices
    that are not one per row of values (1-D, as long as the values: tf.keras refuses indices
    of shape ``[n, 1]`` too). JAX would broadcast them or fail naming nothing."""
    values_shape = tuple(g.values.shape)
    if len(ref_shape) == 0:
        raise ValueError(
            f"{owner}: {subject} is for a scalar param, which has no rows; give it a dense gradient"
        )
    if values_shape[1:] != tuple(ref_shape[1:]):
        raise ValueError(
            f"{owner}: {subject} has rows of shape {values_shape[1:]}, expected rows of a "
            f"table of shape {tuple(ref_shape)}"
        )
    if g.dense_shape is not None and tuple(g.dense_shape) != tuple(ref_shape):
        raise ValueError(
            f"{owner}: {subject} has dense_shape {g.dense_shape}, expected {tuple(ref_shape)}"
        )
    if not jnp.issubdtype(g.indices.dtype, jnp.integer):
        raise TypeError(
            f"{owner}: {subject} has indices of dtype {g.indices.dtype}, expected integers "
            "(an optax piece chained before it by optax.chain takes the indices for gradient "
            "values and changes them: chain it with kopt.chain, which gives it dense gradients)"
        )
    indices_shape = tuple(g.indices.shape)
    if len(indices_shape) != 1 or indices_shape != values_shape[:1]:
        rows = ", ".join(["n", *(str(d) for d in ref_shape[1:])])
        raise ValueError(
            f"{owner}: {subject} (shape {tuple(ref_shape)}) has values of shape "
            f"{values_shape} and indices of shape {indices_shape}, expected values of shape "
            f"({rows}{',' if len(ref_shape) == 1 else ''}) and indices of shape (n,)"
        )


def check_floating_gradients(updates: PyTree, owner: str) -> None:
    """Raises TypeError naming the first gradient leaf (dense, or the rows of an
    :class:`IndexedSlices`) that is not floating-point: for a piece that takes the gradients
    without a leaf rule (an integer gradient would come out truncated)."""
    flat = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_indexed_slices)[0]
    for path, g in flat:
        values = g.values if isinstance(g, IndexedSlices) else g
        _check_gradient_dtype(_path_str(path), values, owner, None)


def _check_gradient_dtype(path: str, values: Any, owner: str, ref_dtype: Any) -> None:
    dtype = getattr(values, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{owner}: gradient {path} must be a floating-point array, received "
            f"{type(values).__name__} of dtype {dtype}"
        )
    if (
        ref_dtype is not None
        and jnp.issubdtype(dtype, jnp.complexfloating)
        and not jnp.issubdtype(ref_dtype, jnp.complexfloating)
    ):
        raise TypeError(
            f"{owner}: gradient {path} is complex ({dtype}), but its param is real "
            f"({jnp.dtype(ref_dtype)}): the update would drop the imaginary part; give a real "
            "gradient (its real part, if that is the derivative meant)"
        )


def map_leaves(
    fn: Callable[..., tuple[Any, dict[str, Any]]],
    updates: PyTree,
    slots: Mapping[str, PyTree],
    params: PyTree | None,
    owner: str,
    *,
    needs_params: bool = False,
    shaped_like_params: Iterable[str] = (),
) -> tuple[PyTree, dict[str, PyTree]]:
    """Runs ``fn(g, slot_leaves, p) -> (u, new_slot_leaves)`` on every leaf.

    The slots named in ``shaped_like_params`` are checked against the params' shapes (a state
    made for other params, such as a checkpoint from before a resize, would broadcast).

    ``updates`` may hold :class:`IndexedSlices` leaves; ``slots`` maps slot names to trees shaped
    like the params. Structure, kind and shape of each gradient are checked first, at trace time,
    with errors that name the leaf's path.

    A None gradient where the param is an array means that param has no gradient this step (as
    a None gradient in Keras's ``apply_gradients``): its update is None and its slots are kept
    as they are, so the state's structure never changes. A None param (an empty subtree) takes
    a None gradient only.
    """
    if needs_params and params is None:
        raise ValueError(f"{owner}: this transformation needs `params` in update()")
    reference = params if params is not None else next(iter(slots.values()), None)
    if reference is not None:
        what = "params" if params is not None else "state"
        check_same_structure(updates, reference, owner, what, none_leaves=True)
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_none_or_sparse)
    try:
        slot_leaves = {name: treedef.flatten_up_to(tree) for name, tree in slots.items()}
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{owner}: the state's slots do not fit the params: the state was made for other "
            f"params (make it with init from these params, or restore one saved for them): {e}"
        ) from None
    if params is None:
        param_leaves = [None] * len(flat)
    else:  # a Python float param (optax takes them) as the array jnp.asarray makes of it
        param_leaves = [
            p if p is None or hasattr(p, "dtype") else jnp.asarray(p)
            for p in treedef.flatten_up_to(params)
        ]
    ref_leaves = treedef.flatten_up_to(reference) if reference is not None else None
    out_updates, out_slots = [], {name: [] for name in slots}
    for i, (path, g) in enumerate(flat):
        if g is None:  # no gradient: no update, slots unchanged
            out_updates.append(None)
            for name in slots:
                out_slots[name].append(slot_leaves[name][i])
            continue
        if ref_leaves is not None and ref_leaves[i] is None:
            raise gradient_for_none_param(owner, path)
        if not isinstance(g, IndexedSlices) and not hasattr(g, "dtype"):
            if isinstance(g, (int, float)) and not isinstance(g, bool):
                g = jnp.asarray(g, jnp.float32)
        if ref_leaves is not None:
            check_leaf(
                _path_str(path),
                g,
                tuple(jnp.shape(ref_leaves[i])),
                owner,
                ref_dtype=jnp.result_type(ref_leaves[i]),
            )
        else:
            check_leaf(_path_str(path), g, _shape_of(g), owner)
        if params is not None:
            for name in shaped_like_params:
                _check_slot_shape(owner, name, path, slot_leaves[name][i], param_leaves[i])
        u, new = fn(g, {name: leaves[i] for name, leaves in slot_leaves.items()}, param_leaves[i])
        out_updates.append(u)
        for name in slots:
            out_slots[name].append(new[name])
    return (
        treedef.unflatten(out_updates),
        {name: treedef.unflatten(leaves) for name, leaves in out_slots.items()},
    )


def _check_slot_shape(owner: str, name: str, path: Any, slot: Any, param: Any) -> None:
    if slot is not None and tuple(jnp.shape(slot)) != tuple(jnp.shape(param)):
        raise ValueError(
            f"{owner}: slot {name!r} of {_path_str(path)} has shape {tuple(jnp.shape(slot))}, "
            f"but the param has shape {tuple(jnp.shape(param))}: the state was made for other "
            "params (make it with init from these params, or restore one saved for them)"
        )


def _shape_of(g):
    if isinstance(g, IndexedSlices):
        return g.dense_shape or (None,) + tuple(g.values.shape[1:])
    return tuple(jnp.shape(g))


def slot_dtype_for(p: Any, dtype: Any | None) -> Any:
    """The dtype of a slot of param ``p`` given ``slot_dtype``: ``dtype``, or p's own by
    default. A complex ``dtype`` (for the complex params of a mixed tree) gives a real param
    the matching real dtype (float32 for complex64): a complex slot would make its update
    complex, and ``apply_updates`` would then drop the imaginary part by a deprecated cast."""
    own = jnp.result_type(p)
    if dtype is None:
        return own
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(own, jnp.complexfloating):
        return jnp.finfo(dtype).dtype
    return dtype


def slot_like(params: PyTree, value: float, dtype: Any | None) -> PyTree:
    """A slot tree shaped like ``params``, filled with ``value``, keeping each param's sharding."""
    return jax.tree.map(lambda p: full_like_param(p, value, dtype), params)


def full_like_param(p: Any, value: float, dtype: Any | None = None) -> jax.Array:
    """``full_like(p, value)`` in ``dtype`` (default: p's), placed with p's sharding.

    Under ``jax.jit(tx.init)`` the param is a tracer: the select below makes the slot depend on
    the param, so XLA's sharding propagation gives it the param's sharding (a plain constant
    would come out replicated), and with explicit mesh axes every operand already carries it.
    ``dtype`` is resolved per param by :func:`slot_dtype_for`.
    """
    dtype = slot_dtype_for(p, dtype)
    if isinstance(p, jax.core.Tracer):
        return jnp.where(
            jnp.zeros_like(p, dtype=bool), p.astype(dtype), jax.lax.full_like(p, value, dtype)
        )
    out = _filled(jnp.shape(p), value, dtype)
    if isinstance(p, jax.Array) and p.committed:
        return jax.device_put(out, p.sharding)
    # An uncommitted param gets an uncommitted slot: a state that mixed committed slots with
    # uncommitted counts would make the first jitted step compile twice.
    return jax.device_put(out)


# An eager ``init`` fills slots of up to this many elements on the host. ``jnp.full`` compiles
# one small program per shape: the first ``init`` over a few hundred small params of distinct
# shapes compiled a few hundred of them (seconds), where a host array costs a copy.
_HOST_FILL_MAX = 1 << 16


def transfer_copy(x: Any, dtype: Any | None = None) -> jax.Array | None:
    """A copy of array ``x`` made by a transfer (``jax.device_put(may_alias=False)``), same
    placement and committedness; None where a transfer cannot make it: not a concrete
    ``jax.Array``, weakly typed (the copy must come out strongly typed), another ``dtype``, or
    holding other processes' shards (a transfer refuses those). Eagerly, ``jnp.array(copy=True)``
    compiles a program per shape: hundreds for a model of many small variables."""
    if (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and x.is_fully_addressable
        and not getattr(x, "weak_type", False)  # a PRNG key array has no weak_type
        and (dtype is None or jnp.dtype(dtype) == x.dtype)
    ):
        return jax.device_put(x, may_alias=False)
    return None


def _filled(shape: tuple[int, ...], value: Any, dtype: Any) -> Any:
    """``full(shape, value, dtype)``: a NumPy array for a small slot and a Python or NumPy
    number (the same bits ``jnp.full`` gives: it converts the value with NumPy too), else a
    ``jax.Array`` (also for a dtype JAX does not enable, which ``jnp.full`` warns about)."""
    host = (
        math.prod(shape) <= _HOST_FILL_MAX
        and isinstance(value, (int, float, complex, np.number))
        and jax.dtypes.canonicalize_dtype(dtype) == np.dtype(dtype)
    )
    return np.full(shape, value, dtype) if host else jnp.full(shape, value, dtype)


def on_params_devices(tree: PyTree, params: PyTree) -> PyTree:
    """``tree`` (a state's counts and hyperparameters) placed where the params are committed:
    replicated over their mesh, or on their one device. After an eager ``init`` these scalars
    would be uncommitted (or on one device of a mesh) beside committed slots, and the first
    jitted step, which returns them committed with the params, would compile a second time.
    Under ``jax.jit(init)``, or for uncommitted params, ``tree`` is unchanged."""
    target = _params_placement(params)
    return tree if target is None else jax.device_put(tree, target)


def uncommitted_on_params_devices(tree: PyTree, params: PyTree) -> PyTree:
    """``tree`` (the state of a piece kopt did not make: an optax step count is uncommitted
    beside the committed slots ``zeros_like`` gives) with its uncommitted array leaves placed
    as :func:`on_params_devices` places a count; committed leaves and other values are left
    as they are. Without it a kopt combinator's eager ``init`` beside committed params gave a
    state the first jitted step changed, and the second step compiled again."""
    target = _params_placement(params)
    if target is None:
        return tree

    def place(leaf):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            if not leaf.committed:
                return jax.device_put(leaf, target)
        return leaf

    return jax.tree.map(place, tree)


def committed_device_ids(value: Any) -> list[int] | None:
    """The sorted ids of the devices a concrete array is committed to; None for anything else
    (a tracer, an uncommitted array, which goes wherever the others are, a non-array)."""
    if not isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
        return None
    if not value.committed:
        return None
    return sorted(d.id for d in value.sharding.device_set)


def device_mismatch(named: Iterable[tuple[str, Any]]) -> tuple[tuple[str, list[int]], ...]:
    """The first two of ``(name, value)`` pairs committed to different sets of devices, each
    as ``(name, device ids)``, or ``()``: one compiled program (or one buffer) cannot hold
    both, and JAX's own error names only an argument of an internal function."""
    first = None
    for name, value in named:
        ids = committed_device_ids(value)
        if ids is None:
            continue
        if first is None:
            first = (name, ids)
        elif ids != first[1]:
            return first, (name, ids)
    return ()


def _params_placement(params: PyTree) -> Any:
    """Where a state's scalars go beside ``params``: replicated over the mesh of the first
    committed param, or on its one device; None under a trace, for uncommitted params, or
    for another kind of sharding."""
    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.core.Tracer):
            return None
        if not (isinstance(leaf, jax.Array) and leaf.committed):
            continue
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        if isinstance(sharding, jax.sharding.SingleDeviceSharding):
            return sharding
    return None


def reduced_like_param(p: Any, axis: int | None, dtype: Any | None = None) -> jax.Array:
    """Zeros shaped like ``p`` without ``axis`` (a factored statistic; None: without every
    axis, a scalar), with p's sharding of the axes that remain: a statistic of a kernel split
    by rows is split the same way.

    Under ``jax.jit`` it is a reduction of a param-dependent zero array, so XLA's sharding
    propagation (or the explicit mesh axes) gives it the remaining axes' sharding. Eagerly, the
    spec is written as a jitted step returns it (see :func:`_spec_as_returned`), so that the
    state of an eager ``init`` and the state the first step returns key one compiled step.
    ``dtype`` is resolved per param by :func:`slot_dtype_for`.
    """
    dtype = slot_dtype_for(p, dtype)
    if isinstance(p, jax.core.Tracer):
        return jnp.sum(full_like_param(p, 0.0, dtype), axis=axis)
    ndim = jnp.ndim(p)
    kept = [i for i in range(ndim) if axis is not None and i != axis % ndim]
    out = _filled(tuple(jnp.shape(p)[i] for i in kept), 0, dtype)
    if not (isinstance(p, jax.Array) and p.committed):
        return jax.device_put(out)
    sharding = p.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
        spec = _spec_as_returned(sharding.mesh, [spec[i] for i in kept])
        sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        # another kind of sharding: left to XLA, as before the first step
        return jax.device_put(out)
    return jax.device_put(out, sharding)


def _spec_as_returned(mesh: Any, spec: list[Any]) -> jax.sharding.PartitionSpec:
    """``spec`` spelled as a jitted function returns an array of its own rank with that layout:
    in full over a mesh with explicit axes (the array's type, ``P(None,)``), without trailing
    Nones over automatic ones (``P()``). The two spellings are one layout, but different keys
    of a compiled function."""
    explicit = jax.sharding.AxisType.Explicit
    if not any(t == explicit for t in getattr(mesh, "axis_types", ())):
        while spec and spec[-1] is None:
            spec = spec[:-1]
    return jax.sharding.PartitionSpec(*spec)
