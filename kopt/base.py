"""The optax-protocol core: transformations, composition, states and their hyperparameters.

A :class:`GradientTransformation` is a pair of pure functions. ``init(params)`` builds a state;
``update(updates, state, params)`` turns gradients into updates (the amounts to add to the
params) and returns the next state. The types are structural, so optax transformations work here
and kopt transformations work in optax, flax and equinox code.

Every kopt optimizer keeps its numeric hyperparameters and its slots in an :class:`OptimizerState`,
so a jitted step can read or change them without recompiling.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kopt._tree import check_rows_fit, check_same_structure, uncommitted_on_params_devices
from kopt.schedules import _computes_with_tensorflow as computes_with_tensorflow

PyTree = Any
Params = PyTree
Updates = PyTree
OptState = PyTree
Schedule = Callable[[jax.Array], jax.Array]

INT32_MAX = jnp.iinfo(jnp.int32).max


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``(init, update)``: the optax protocol.

    ``init(params) -> state`` and ``update(updates, state, params=None) -> (updates, state)``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.sgd(learning_rate=0.5)
        >>> params = {"w": jnp.array([1.0, 2.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)
        >>> kopt.apply_updates(params, updates)["w"]
        Array([0.5, 1.5], dtype=float32)
    """

    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Updates, OptState]]


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none."""


class OptimizerState(NamedTuple):
    """The state of a kopt transformation that has hyperparameters or slots.

    Attributes:
        count: how many updates were applied (int32, saturating at ``2**31 - 1``).
        hyperparams: name -> float32 scalar. A hyperparameter given as a schedule holds the value
            used by the most recent update (or the step-0 value after ``init``).
        slots: Keras slot name -> pytree shaped like the params (``"m"``, ``"v"``, ...).
    """

    count: jax.Array
    hyperparams: dict[str, jax.Array]
    slots: dict[str, PyTree]


def _describe_state(state: Any) -> str:
    """What a state passed to ``update`` is, in a few words, for an error message."""
    if state is None:
        return "None"
    if isinstance(state, OptimizerState):
        return (
            f"an OptimizerState with hyperparameters {sorted(state.hyperparams)} and slots "
            f"{sorted(state.slots)}"
        )
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return f"{type(state).__module__.split('.')[0]}'s {type(state).__name__}"
    if isinstance(state, (tuple, list)):
        return f"a {type(state).__name__} of {len(state)} parts"
    if isinstance(state, dict):
        return f"a dict with keys {sorted(map(str, state))[:4]} (the params?)"
    return f"a {type(state).__name__}"


def check_state(
    owner: str,
    state: Any,
    kind: type,
    *,
    hyperparams: Iterable[str] = (),
    slots: Iterable[str] = (),
) -> None:
    """Raises TypeError unless ``state`` is a ``kind`` (with, for an :class:`OptimizerState`,
    the hyperparameters and slots named, and no others): a state this transformation's
    ``init`` made.

    Only the Python structure is looked at, so under ``jax.jit`` it runs once, while tracing.
    Without it a wrong state (the params, None, another optimizer's state) failed deep inside
    with an ``AttributeError`` or ``KeyError`` that named neither the state nor the piece; and
    the state of a variant with more slots (``adam(amsgrad=True)``'s into ``adam()``, a
    centered RMSprop's, a momentum SGD's into plain SGD) was taken, its extra slots dropped.
    """
    problem = None
    hyperparams, slots = list(hyperparams), list(slots)
    if not isinstance(state, kind):
        problem = f"received {_describe_state(state)}, expected kopt's {kind.__name__}"
    elif isinstance(state, OptimizerState):
        missing = [n for n in hyperparams if n not in state.hyperparams]
        missing += [n for n in slots if n not in state.slots]
        extra = [n for n in state.hyperparams if n not in hyperparams]
        extra += [n for n in state.slots if n not in slots]
        if missing:
            problem = f"received {_describe_state(state)}, without {missing}"
        elif extra:
            problem = (
                f"received {_describe_state(state)}, expected hyperparameters "
                f"{sorted(hyperparams)} and slots {sorted(slots)} only"
            )
    if problem:
        raise TypeError(
            f"{owner}: `state` was not made by this transformation's init ({problem}); make "
            "it with `state = tx.init(params)`, then pass the state each `update` returns"
        )


def identity() -> GradientTransformation:
    """A transformation that returns the updates unchanged.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.identity()
        >>> tx.update(jnp.ones(2), tx.init(jnp.ones(2)))[0]
        Array([1., 1.], dtype=float32)
    """

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return updates, state

    return GradientTransformation(init_fn, update_fn)


def check_transformation(owner: str, name: str, value: Any) -> None:
    """Raises a TypeError naming ``owner`` and argument ``name`` unless ``value`` is a
    transformation (an object with ``init`` and ``update``: kopt's or optax's). A factory passed
    in place of the transformation it makes (``kopt.sgd`` for ``kopt.sgd(0.1)``) is named so."""
    if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
        return
    hint = " (a function: call it to make the transformation)" if callable(value) else ""
    raise TypeError(
        f"{owner}: {name} must be a transformation with init and update, received "
        f"{type(value).__name__}: {value!r:.80}{hint}"
    )


def chain(*transformations: Any) -> GradientTransformation:
    """Composes transformations left to right; kopt and optax pieces mix freely.

    Args:
        *transformations: objects with ``init`` and ``update`` (kopt or optax).

    Returns:
        A transformation whose state is the tuple of the pieces' states.

    Raises:
        TypeError: if an argument has no ``init``/``update``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.chain(kopt.clip_by_value(0.5), kopt.sgd(1.0))
        >>> state = tx.init(jnp.zeros(2))
        >>> tx.update(jnp.array([2.0, -0.1]), state, jnp.zeros(2))[0]
        Array([-0.5,  0.1], dtype=float32)
    """
    for i, t in enumerate(transformations):
        check_transformation("chain", f"argument {i}", t)
    inits = tuple(t.init for t in transformations)
    updates_fns = tuple(extra_args_update(t) for t in transformations)

    def init_fn(params):
        # An optax piece's counts start uncommitted beside committed slots: placed as kopt's.
        return uncommitted_on_params_devices(tuple(fn(params) for fn in inits), params)

    def update_fn(updates, state, params=None, **extra_args):
        if not isinstance(state, (tuple, list)) or hasattr(state, "_fields"):
            raise TypeError(
                f"chain: `state` was not made by this chain's init (received "
                f"{_describe_state(state)}, expected a tuple of {len(updates_fns)} parts); make "
                "it with `state = tx.init(params)`, then pass the state each `update` returns"
            )
        if len(state) != len(updates_fns):
            raise ValueError(
                f"chain: the state has {len(state)} parts but the chain has "
                f"{len(updates_fns)} transformations: it was not made by this chain's init"
            )
        new_state = []
        for fn, s in zip(updates_fns, state, strict=True):
            updates, s = fn(updates, s, params, **extra_args)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init_fn, update_fn)


def extra_args_update(transformation: Any) -> Callable[..., tuple[Updates, OptState]]:
    """``transformation.update`` as a function that takes any extra keyword arguments.

    optax passes extra arguments (``value=``, ``grad=``, ``value_fn=``...) through a chain to
    the pieces that take them. Every kopt transformation takes them (and its wrappers pass them
    on); for another object, its ``update`` signature decides: a ``**kwargs`` parameter takes
    them all, named keyword parameters take those names, and the rest are not passed. The
    signature is read once, here, so an error raised inside ``update`` is never mistaken for
    a refused argument.
    """
    update = transformation.update
    if not _takes_sparse(transformation):
        update = _dense_gradients_for(update)
    accepted = _accepted_extra_args(transformation)
    if accepted is None:
        return update

    def call(updates, state, params=None, **extra_args):
        return update(
            updates, state, params, **{k: extra_args[k] for k in accepted & extra_args.keys()}
        )

    return call


def _takes_sparse(transformation: Any) -> bool:
    """Whether ``transformation`` takes :class:`~kopt.IndexedSlices` gradients: kopt's own,
    and optax's ``inject_hyperparams`` around a kopt optimizer (it hands the gradients to
    the kopt piece it builds, which keeps its Keras row rule)."""
    if isinstance(transformation, GradientTransformation):
        return True
    update = getattr(transformation, "update", None)
    code = getattr(update, "__code__", None)
    if code is None or not getattr(update, "__qualname__", "").startswith("inject_hyperparams."):
        return False
    cells = dict(zip(code.co_freevars, update.__closure__ or (), strict=False))
    factory = cells.get("inner_factory")
    module = getattr(getattr(factory, "cell_contents", None), "__module__", "") or ""
    return module == "kopt" or module.startswith("kopt.")


def _dense_gradients_for(update: Callable[..., Any]) -> Callable[..., Any]:
    """An optax piece's (or another library's) ``update`` given dense gradients: it knows no
    :class:`~kopt.IndexedSlices`, and would take one's integer row indices for gradient
    values (``optax.clip`` clipped them, moving other rows). Each sparse leaf is scattered to
    its param's shape (its ``dense_shape``, or the param's) first."""

    def call(updates, state, params=None, **extra_args):
        return update(_densified(updates, params), state, params, **extra_args)

    return call


def _densified(updates: Updates, params: Params | None) -> Updates:
    from kopt.sparse import IndexedSlices  # here: kopt.sparse is imported by the package

    flat, treedef = jax.tree_util.tree_flatten_with_path(
        updates, is_leaf=lambda x: x is None or isinstance(x, IndexedSlices)
    )
    if not any(isinstance(g, IndexedSlices) for _, g in flat):
        return updates
    try:
        param_leaves = treedef.flatten_up_to(params) if params is not None else None
    except (TypeError, ValueError):
        param_leaves = None
    out = []
    for i, (path, g) in enumerate(flat):
        if isinstance(g, IndexedSlices):
            shape = g.dense_shape
            if shape is None and param_leaves is not None and param_leaves[i] is not None:
                shape = jnp.shape(param_leaves[i])
            if shape is None:
                raise ValueError(
                    "a sparse gradient (kopt.IndexedSlices) reaches a piece that is not kopt's "
                    "(an optax piece, say), which takes dense gradients only: give the "
                    "IndexedSlices its dense_shape, or pass params to update"
                )
            subject = f"sparse gradient {jax.tree_util.keystr(path) or '<root>'}"
            check_rows_fit(subject, g, tuple(shape), "IndexedSlices.to_dense")
            g = g.to_dense(tuple(shape))
        out.append(g)
    return treedef.unflatten(out)


def _accepted_extra_args(transformation: Any) -> frozenset[str] | None:
    """The extra keyword arguments ``transformation.update`` takes (None: any)."""
    if any(c.__name__ == "GradientTransformationExtraArgs" for c in type(transformation).__mro__):
        return None  # optax's protocol for transformations that take extra arguments
    try:
        parameters = list(inspect.signature(transformation.update).parameters.values())
    except (TypeError, ValueError):  # no signature to read: pass none, as optax does
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    # The first three positional parameters are (updates, state, params), whatever their names.
    skipped = [p for p in parameters if p.kind in positional][:3]
    return frozenset(
        p.name
        for p in parameters
        if p not in skipped
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def apply_updates(params: Params, updates: Updates) -> Params:
    """Adds ``updates`` to ``params`` leaf by leaf, keeping each param's dtype.

    A leaf of ``updates`` may be an :class:`~kopt.IndexedSlices` of rows, as the sparse rules
    return: only those rows are changed (a scatter-add, no table-sized temporary). ``None``
    leaves are left alone.

    Raises:
        ValueError: if ``updates`` does not have the structure of ``params`` (the message names
            the leaves missing or unexpected), a dense update's shape differs from its param's
            (no broadcasting), or a sparse update's rows do not fit its param.
        TypeError: if a sparse update's indices are not integers.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> kopt.apply_updates({"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.ones(2)})["w"].dtype
        dtype(bfloat16)
    """
    from kopt.sparse import (
        IndexedSlices,
        deduplicate,
        gather_rows,
        in_range,
        is_indexed_slices,
        scatter_add_rows,
        scatter_rows,
    )

    def add(path, p, u):
        if u is None or p is None:
            return p
        if isinstance(u, IndexedSlices):
            p = jnp.asarray(p)
            where = jax.tree_util.keystr(path) or "<root>"
            check_rows_fit(f"sparse update {where}", u, p.shape, "apply_updates")
            wide = jnp.promote_types(p.dtype, u.values.dtype)
            if wide == p.dtype:
                indices = in_range(u.indices, p.shape[0])
                return scatter_add_rows(p, indices, u.values.astype(p.dtype))
            # Rows wider than the table (float32 updates of a float16 one): each named row's
            # sum is taken in the wider dtype and rounded once, as the dense sum is, without
            # widening the whole table.
            d = deduplicate(u, p.shape[0])
            rows = gather_rows(p, d.indices).astype(wide) + d.values.astype(wide)
            return scatter_rows(p, d.indices, rows.astype(p.dtype))
        p = jnp.asarray(p)
        if jnp.shape(u) != p.shape:
            raise ValueError(
                f"apply_updates: update {jax.tree_util.keystr(path) or '<root>'} has shape "
                f"{jnp.shape(u)}, expected the param's shape {p.shape}"
            )
        return (p + u).astype(p.dtype)

    try:
        return jax.tree_util.tree_map_with_path(
            add, params, updates, is_leaf=lambda x: x is None or is_indexed_slices(x)
        )
    except ValueError:
        # JAX's own structure error names neither apply_updates nor the argument.
        check_same_structure(
            updates, params, "apply_updates", "`params`", none_leaves=True, subject="`updates`"
        )
        raise


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` for an int32 step count, saturating at ``2**31 - 1`` instead of wrapping."""
    return jnp.where(count < INT32_MAX, count + 1, INT32_MAX).astype(count.dtype)


# --- hyperparameters ------------------------------------------------------------------------


def is_schedule(value: Any) -> bool:
    """True for a callable hyperparameter (a function of the step count)."""
    return callable(value) and not isinstance(value, (jax.Array, float, int))


_REPORTED_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kopt_reported_as", default=None
)


@contextlib.contextmanager
def reported_as(owner: str) -> Iterator[None]:
    """Within it, :func:`check_hyperparam` names ``owner`` in its errors instead of the piece
    that checks: the Keras facade builds its functional twin this way, so ``Adam(beta_1=1.5)``
    is reported as ``Adam``'s, not as the inner ``scale_by_adam``'s."""
    token = _REPORTED_AS.set(owner)
    try:
        yield
    finally:
        _REPORTED_AS.reset(token)


def check_flag(owner: str, name: str, value: Any) -> None:
    """Raises TypeError unless ``value`` is a bool (Python's or NumPy's).

    A flag given a number is refused rather than read as true: it is most often a value meant
    for another argument, passed by position in another library's order.
    """
    owner = _REPORTED_AS.get() or owner
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{owner}: `{name}` must be a bool, received {type(value).__name__} {value!r:.80}"
        )


def as_count(value: Any) -> int | None:
    """``value`` as a Python int if it is a whole number: an int or a NumPy integer scalar (a
    count read from a NumPy array or a config), not a bool, a float or an array. Else None."""
    if isinstance(value, (bool, np.bool_, np.ndarray, jax.Array)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_count(owner: str, name: str, value: Any, minimum: int, *, or_none: bool = False):
    """``value`` as a Python int (see :func:`as_count`); raises ValueError naming ``name``
    unless it is a whole number of at least ``minimum`` (or, with ``or_none``, None)."""
    if or_none and value is None:
        return None
    count = as_count(value)
    if count is None or count < minimum:
        expected = f"None or an int >= {minimum}" if or_none else f"an int >= {minimum}"
        raise ValueError(f"{owner}: `{name}` must be {expected}, received {value!r}")
    return count


def check_slot_dtype(owner: str, slot_dtype: Any, *, allow_complex: bool = True) -> None:
    """Raises TypeError unless ``slot_dtype`` is None or a floating-point (or, if
    ``allow_complex``, complex) dtype.

    An integer or boolean dtype would be accepted by the slots' ``full`` and silently truncate
    every moment to whole numbers, so the run would go on without training.
    """
    if slot_dtype is None:
        return
    owner = _REPORTED_AS.get() or owner
    try:
        dtype = jnp.dtype(slot_dtype)
    except TypeError as e:
        raise TypeError(
            f"{owner}: `slot_dtype` must be a floating-point dtype, received {slot_dtype!r:.80}"
        ) from e
    if not jnp.issubdtype(dtype, jnp.inexact if allow_complex else jnp.floating):
        raise TypeError(f"{owner}: `slot_dtype` must be a floating-point dtype, received {dtype}")


def check_hyperparam(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = 0.0,
    high: float | None = None,
    low_inclusive: bool = True,
    allow_schedule: bool = True,
) -> None:
    """Validates a hyperparameter given as a number, a scalar array or a schedule.

    Raises:
        TypeError: if ``value`` is not a real number, real scalar array or (where allowed) a
            callable.
        ValueError: if a concrete number lies outside ``[low, high]``.
    """
    owner = _REPORTED_AS.get() or owner
    if is_schedule(value):
        if not allow_schedule:
            raise TypeError(f"{owner}: `{name}` cannot be a schedule, received {value!r}")
        try:
            inspect.signature(value).bind(0)
        except TypeError:
            raise TypeError(
                f"{owner}: `{name}` is a callable that cannot be called with the step count "
                f"alone ({value!r:.80}); a schedule is a function of one argument, the step"
            ) from None
        except ValueError:  # no signature to read (a builtin): called as it is
            pass
        return
    if isinstance(value, bool):
        raise TypeError(f"{owner}: `{name}` must be a number, received the bool {value}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif hasattr(value, "shape") and hasattr(value, "dtype"):
        if tuple(value.shape) != ():
            raise ValueError(
                f"{owner}: `{name}` must be a scalar, received an array of shape "
                f"{tuple(value.shape)}"
            )
        if not jnp.issubdtype(value.dtype, jnp.number):
            raise TypeError(f"{owner}: `{name}` must be numeric, received dtype {value.dtype}")
        if jnp.issubdtype(value.dtype, jnp.complexfloating):
            # float() would drop the imaginary part, as a float32 state does
            raise TypeError(f"{owner}: `{name}` must be real, received dtype {value.dtype}")
        if isinstance(value, jax.core.Tracer):
            return
        number = float(value)
    else:
        expected = "a number or a scalar array"
        if allow_schedule:
            expected = "a number, a scalar array or a schedule"
        raise TypeError(
            f"{owner}: `{name}` must be {expected}, received {type(value).__name__}: {value!r:.80}"
        )
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{owner}: `{name}` must be a finite number, received {number}")
    if low is not None and (number < low or (not low_inclusive and number == low)):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{owner}: `{name}` must be {bound}, received {number}")
    if high is not None and number > high:
        raise ValueError(f"{owner}: `{name}` must be <= {high}, received {number}")


def init_hyperparams(values: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The float32 scalars stored in a state; a schedule is evaluated at step 0."""
    out = {}
    for name, value in values.items():
        if is_schedule(value):
            value = _scheduled(name, value, jnp.zeros((), jnp.float32))
        if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
            # A copy: one array given to two pieces would be one buffer in two leaves of the
            # state, which a donating step refuses.
            out[name] = jnp.array(value, jnp.float32, copy=True)
        else:
            out[name] = jnp.asarray(value, jnp.float32)
    return out


def _scheduled(name: str, schedule: Schedule, step: jax.Array) -> jax.Array:
    """``schedule(step)`` as a float32 scalar; raises ValueError naming ``name`` for a value of
    another shape (it would broadcast over the params, or change their shapes), and TypeError
    for a value that is not a real number."""
    hint = (
        ". A tf.keras schedule computes with TensorFlow: use kopt.schedules' function (or "
        "kopt.optimizers.schedules' class) of that name, which takes the same arguments"
        if computes_with_tensorflow(schedule)
        else ""
    )
    try:
        value = schedule(step)
    except Exception as e:
        if not hint:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TypeError(
            f"the schedule for `{name}` ({type(schedule).__name__}) cannot be called with a "
            f"JAX step: {type(e).__name__}: {message:.200}{hint}"
        ) from e
    dtype = getattr(value, "dtype", None)
    try:
        real = (
            dtype is not None
            and jnp.issubdtype(dtype, jnp.number)
            and not jnp.issubdtype(dtype, jnp.complexfloating)
        )
    except TypeError:  # not a NumPy dtype: another library's (TensorFlow's tf.float32)
        real = False
    if not (real or (isinstance(value, (int, float)) and not isinstance(value, bool))):
        raise TypeError(
            f"the schedule for `{name}` returned {type(value).__name__}: {value!r:.80}; a "
            f"hyperparameter must be a real number or a real scalar array{hint}"
        )
    value = jnp.asarray(value, jnp.float32)
    if value.shape != ():
        raise ValueError(
            f"the schedule for `{name}` returned an array of shape {value.shape}; a "
            "hyperparameter must be a scalar"
        )
    return value


def current_hyperparams(
    state: OptimizerState, schedules: Mapping[str, Schedule]
) -> dict[str, jax.Array]:
    """The hyperparameters for this update: stored values, with schedules evaluated at ``count``.

    A schedule receives the step count before the increment, as a float32 scalar, as Keras's
    ``_decayed_lr`` does.
    """
    step = state.count.astype(jnp.float32)
    out = dict(state.hyperparams)
    for name, fn in schedules.items():
        out[name] = _scheduled(name, fn, step)
    return out


def schedules_of(values: Mapping[str, Any]) -> dict[str, Schedule]:
    """The subset of hyperparameters given as schedules."""
    return {name: v for name, v in values.items() if is_schedule(v)}


class _Field(str):
    """A state's field name on a path to a piece, told apart from the keys that choose between
    pieces (a position in a chain, a ``multi_transform`` label), which ``where=`` counts."""

    __slots__ = ()


def _hyperparam_holders(state: Any, path: tuple = ()):
    """Yields ``(path, state)`` for every state in a tree that carries a ``hyperparams`` dict
    (kopt's or optax's); the path is the keys on the way: field names (as :class:`_Field`),
    positions in a chain, labels of a ``multi_transform``."""
    if _has_hyperparams(state):
        yield path, state
        for field in state._fields:
            if field not in ("hyperparams", "slots", "count"):
                yield from _hyperparam_holders(getattr(state, field), (*path, _Field(field)))
    elif isinstance(state, tuple) and hasattr(state, "_fields"):
        for field, s in zip(state._fields, state, strict=True):
            yield from _hyperparam_holders(s, (*path, _Field(field)))
    elif isinstance(state, (tuple, list)):
        for i, s in enumerate(state):
            yield from _hyperparam_holders(s, (*path, i))
    elif isinstance(state, dict):
        for k, s in state.items():
            yield from _hyperparam_holders(s, (*path, k))


def _same_key(key: Any, wanted: Any) -> bool:
    """Whether a key on a path is the key ``wanted`` (of the same type: label ``1`` is not
    ``True`` nor ``1.0``; a field name is a string)."""
    if isinstance(key, _Field):
        return type(wanted) is str and str(key) == wanted
    return type(key) is type(wanted) and key == wanted


def _matches(path: tuple, where: Any) -> bool:
    """Whether a holder at ``path`` is selected by ``where``: None selects every one; a key (a
    ``multi_transform`` label, a position in a chain, a state's field name) selects those with
    it on their path; a tuple of keys, those with that run of keys on their path.

    An integer that starts ``where`` (alone or first in a tuple) is matched against the first
    chain position or ``multi_transform`` label on the path only, the outermost one: kopt's
    optimizers are chains themselves (``kopt.adam`` is ``scale_by_adam`` then
    ``scale_by_learning_rate``), so a position anywhere on the path would also pick the pieces
    at that position inside them.
    """
    if where is None:
        return True
    if isinstance(where, np.integer):
        where = int(where)
    elif isinstance(where, tuple):
        where = tuple(int(w) if isinstance(w, np.integer) else w for w in where)
    keys = where if isinstance(where, tuple) else (where,)
    n = len(keys)
    starts = range(len(path) - n + 1)
    if n and type(keys[0]) is int:
        outermost = next((i for i, k in enumerate(path) if not isinstance(k, _Field)), None)
        starts = [outermost] if outermost is not None and outermost + n <= len(path) else []
    return any(
        all(_same_key(a, b) for a, b in zip(path[i : i + n], keys, strict=True)) for i in starts
    )


def _path_text(path: tuple) -> str:
    return "/".join(map(str, path)) or "<root>"


def _where_advice(paths: list[tuple], found: list[tuple]) -> str:
    """How to pick each of ``paths`` (holders at odds) with ``where=``: for each, the first of
    its outermost chain position or label, a label further in, or a run of keys from the
    outermost one, that selects it alone among the holders at ``found``."""

    def pick(path):
        first = next((i for i, k in enumerate(path) if not isinstance(k, _Field)), 0)
        labels = [(k,) for k in path[first + 1 :] if type(k) is str and not isinstance(k, _Field)]
        runs = [path[first : first + n] for n in range(2, len(path) - first + 1)]
        for run in [path[first : first + 1], *labels, *runs, path]:
            if not run:  # the state's root: no key picks it
                continue
            keys = tuple(str(k) if isinstance(k, _Field) else k for k in run)
            where = keys[0] if len(keys) == 1 else keys
            if [p for p in found if _matches(p, where)] == [path]:
                return f"where={where!r} for {_path_text(path)}"
        return None

    picks = [pick(p) for p in paths]
    if any(p is None for p in picks):
        return "pass where= with a run of keys on the way to the one you mean"
    return "pass where= to pick one: " + ", ".join(picks)


def _select_holders(owner: str, kind: str, name: str, found: list, where: Any) -> list:
    """The ``(path, holder)`` pairs of ``found`` that ``where`` selects; raises ValueError
    naming where ``name`` is held if it selects none."""
    chosen = [(p, h) for p, h in found if _matches(p, where)]
    if not chosen:
        raise ValueError(
            f"{owner}: no {kind} {name!r} under where={where!r}; it is held at "
            f"{[_path_text(p) for p, _ in found]}"
        )
    return chosen


def _has_hyperparams(state: Any) -> bool:
    return (
        isinstance(state, tuple)
        and hasattr(state, "_fields")
        and "hyperparams" in state._fields
        and isinstance(state.hyperparams, dict)
    )


def get_hyperparam(state: OptState, name: str, *, where: Any = None) -> jax.Array:
    """Reads a hyperparameter from an optimizer state (also inside chains and wrappers).

    Args:
        state: a state returned by ``init`` or ``update``.
        name: the hyperparameter's name, e.g. ``"learning_rate"``.
        where: which piece's value, where several hold one of that name (two groups of a
            ``multi_transform``, an SGD and an ``ema`` that both have a ``"momentum"``): a key
            on the way to it in the state, such as a ``multi_transform`` label (``"head"``) or
            a position in a chain (``0``), or a tuple of consecutive keys (``(1, 0)``: the
            first piece of the chain at position 1). An integer that starts ``where`` counts
            in the outermost chain (or integer-labelled ``multi_transform``) on the way, not
            in the chains kopt's optimizers are built from: in ``chain(masked(adam(), m),
            sgd())``, ``where=1`` is the SGD only.

    Returns:
        The float32 scalar stored in the state: the value the kopt piece holding it uses. (An
        optax ``inject_hyperparams`` state around a kopt optimizer holds the values it injects,
        which kopt does not use; the kopt value is the one returned.)

    Raises:
        ValueError: if no part of the state (under ``where``) has a hyperparameter of that
            name, or several kopt pieces hold it with different values (the message names
            them, and the ``where=`` that picks each); inside ``jax.jit``, where the values are
            not known, the first is returned.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> state = kopt.adam(learning_rate=0.01).init(jnp.zeros(3))
        >>> float(kopt.get_hyperparam(state, "learning_rate"))
        0.009999999776482582
        >>> tx = kopt.multi_transform({"body": kopt.sgd(0.1), "head": kopt.sgd(0.5)},
        ...                           {"w": "body", "b": "head"})
        >>> state = tx.init({"w": jnp.zeros(2), "b": jnp.zeros(1)})
        >>> float(kopt.get_hyperparam(state, "learning_rate", where="head"))
        0.5
    """
    found = [(p, h) for p, h in _hyperparam_holders(state) if name in h.hyperparams]
    if not found:
        raise _unknown_hyperparam("get_hyperparam", state, name)
    chosen = _select_holders("get_hyperparam", "hyperparameter", name, found, where)
    # A kopt piece uses the value in its own state. An optax ``inject_hyperparams`` state
    # around a kopt optimizer also holds the value it injects, which kopt does not use: such
    # a holder, with a kopt holder of the name inside it, is left out. Any other holder (an
    # ``inject_hyperparams`` around an optax optimizer) holds a value in use, and counts.
    kopt_paths = [p for p, h in chosen if type(h).__module__.startswith("kopt.")]
    used = [
        (p, h)
        for p, h in chosen
        if type(h).__module__.startswith("kopt.")
        or not any(len(k) > len(p) and k[: len(p)] == p for k in kopt_paths)
    ]
    values = [(p, h.hyperparams[name]) for p, h in used]
    known = [_known_value(v) for _, v in values] if len(values) > 1 else []
    if known and all(k is not None for k in known):
        if any(not np.array_equal(known[0], k) for k in known[1:]):
            held = ", ".join(
                f"{_path_text(p)}: {k.item():.7g}" if k.size == 1 else f"{_path_text(p)}: {k}"
                for (p, _), k in zip(values, known, strict=True)
            )
            advice = _where_advice([p for p, _ in values], [p for p, _ in found])
            raise ValueError(
                f"get_hyperparam: several pieces hold {name!r} with different values ({held}); "
                f"{advice}"
            )
    return values[0][1]


def _known_value(value: Any) -> np.ndarray | None:
    """A hyperparameter's value as NumPy (also in an ``nnx`` box); None while traced."""
    leaves = jax.tree.leaves(value)
    if len(leaves) != 1 or isinstance(leaves[0], jax.core.Tracer):
        return None
    return np.asarray(leaves[0])


def _unknown_hyperparam(owner: str, state: OptState, name: str) -> ValueError:
    names = sorted({n for _, holder in _hyperparam_holders(state) for n in holder.hyperparams})
    return ValueError(f"{owner}: no hyperparameter named {name!r} in this state; it has {names}")


def set_hyperparam(state: OptState, name: str, value: Any, *, where: Any = None) -> OptState:
    """Returns a new state with hyperparameter ``name`` set to ``value`` everywhere it is stored
    (or, with ``where``, in the pieces it selects).

    Works inside ``jax.jit``: the value is data, so changing it never recompiles. A hyperparameter
    that follows a schedule is recomputed at the next update; set the schedule itself instead.

    Args:
        state: an optimizer state.
        name: the hyperparameter, e.g. ``"learning_rate"``.
        value: a number or scalar array.
        where: only the pieces with this key on the way to them in the state: a
            ``multi_transform`` label (``"head"``), a position in a chain (``0``), or a tuple of
            consecutive keys; an integer that starts it counts in the outermost chain (or
            integer-labelled ``multi_transform``) on the way, as for :func:`get_hyperparam`.
            By default every piece holding ``name`` gets the value (an ``ema`` after a
            momentum SGD holds a ``"momentum"`` too: its decay).

    Returns:
        The new state (the old one is unchanged).

    Raises:
        ValueError: if no part of the state (under ``where``) has that hyperparameter, or
            ``value`` is not scalar, or (a number) outside the range the optimizers take it in
            (a negative ``learning_rate``, a ``beta_1`` above 1), or it sets a ``momentum``
            other than 0 on an SGD or RMSprop built without momentum (which keeps no momentum
            slot, as in Keras, so the value would change nothing).
        TypeError: if ``value`` is not numeric, or complex.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> state = kopt.sgd(0.1).init(jnp.zeros(2))
        >>> state = kopt.set_hyperparam(state, "learning_rate", 0.5)
        >>> float(kopt.get_hyperparam(state, "learning_rate"))
        0.5
        >>> tx = kopt.chain(kopt.sgd(0.1, momentum=0.9), kopt.ema(0.999))
        >>> state = kopt.set_hyperparam(tx.init(jnp.zeros(2)), "momentum", 0.5, where=0)
        >>> [round(float(kopt.get_hyperparam(state, "momentum", where=i)), 3) for i in (0, 1)]
        [0.5, 0.999]
    """
    low, high, low_inclusive = _RANGES.get(name, (None, None, True))
    check_hyperparam(
        "set_hyperparam",
        name,
        value,
        low=low,
        high=high,
        low_inclusive=low_inclusive,
        allow_schedule=False,
    )
    return _replace_hyperparam(state, name, jnp.asarray(value, jnp.float32), where)


# The ranges kopt's pieces take their hyperparameters in, ``(low, high, low_inclusive)``, as
# their constructors check them: set_hyperparam refuses a concrete value outside, as the
# constructor and the facade do. (Lion's ``beta_1``, above 0, is checked per piece, by
# :func:`_check_settable`: Adam's may be 0.)
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    **dict.fromkeys(("momentum", "beta_1", "beta_2", "rho"), (0.0, 1.0, True)),
    **dict.fromkeys(("beta_2_decay", "learning_rate_power"), (None, 0.0, True)),
    "clip_threshold": (0.0, None, False),
    **dict.fromkeys(
        (
            "learning_rate",
            "decay",
            "epsilon",
            "weight_decay",
            "clipnorm",
            "clipvalue",
            "global_clipnorm",
            "epsilon_1",
            "epsilon_2",
            "schedule_decay",
            "beta",
            "l1_regularization_strength",
            "l2_regularization_strength",
            "l2_shrinkage_regularization_strength",
        ),
        (0.0, None, True),
    ),
}


def _replace_hyperparam(
    state: OptState, name: str, new_value: jax.Array, where: Any = None, *, check: bool = True
) -> OptState:
    """:func:`set_hyperparam` for a float32 scalar; ``check=False`` also sets a value that
    would change nothing (a probe of where a state keeps its hyperparameters)."""
    found = [(p, h) for p, h in _hyperparam_holders(state) if name in h.hyperparams]
    if not found:
        raise _unknown_hyperparam("set_hyperparam", state, name)
    chosen = _select_holders("set_hyperparam", "hyperparameter", name, found, where)
    if check:
        for path, holder in chosen:
            _check_settable(holder, name, new_value, path)
    targets = {id(h) for _, h in chosen}

    def rebuild(s):
        if _has_hyperparams(s):
            fields = {}
            for field in s._fields:
                v = getattr(s, field)
                if field == "hyperparams" and id(s) in targets:
                    v = {**v, name: _placed_like(v[name], new_value)}
                elif field not in ("slots", "count", "hyperparams"):
                    v = rebuild(v)
                fields[field] = v
            return type(s)(**fields)
        if isinstance(s, tuple) and hasattr(s, "_fields"):
            return type(s)(*(rebuild(v) for v in s))
        if isinstance(s, (tuple, list)):
            return type(s)(rebuild(v) for v in s)
        if isinstance(s, dict):
            # A copy keeps the dict's own type (optax.named_chain's OrderedDict), so the new
            # state has the old one's tree structure.
            new = copy.copy(s)
            for k, v in s.items():
                new[k] = rebuild(v)
            return new
        return s

    return rebuild(state)


def _check_settable(holder: Any, name: str, value: jax.Array, path: tuple) -> None:
    """Refuses a ``momentum`` other than 0 for an SGD or RMSprop piece built without momentum:
    such a piece (a ``learning_rate`` beside the ``momentum``, and no ``momentum`` slot) decided
    at construction to keep no velocity, as Keras does, and would ignore the value. Refuses a
    ``beta_1`` of 0 for a Lion piece (a ``beta_1`` with no ``epsilon`` beside it), as
    ``kopt.lion`` does."""
    if name == "beta_1" and "epsilon" not in holder.hyperparams:
        check_hyperparam(
            f"set_hyperparam (the Lion piece at {_path_text(path)})",
            name,
            value,
            low=0.0,
            low_inclusive=False,
            high=1.0,
            allow_schedule=False,
        )
    slots = getattr(holder, "slots", None)
    if (
        name != "momentum"
        or not isinstance(slots, dict)
        or "momentum" in slots
        or "learning_rate" not in holder.hyperparams
    ):
        return
    if not isinstance(value, jax.core.Tracer) and float(value) == 0.0:
        return
    raise ValueError(
        f"set_hyperparam: the piece at {_path_text(path)} (an SGD or RMSprop) was built with "
        "momentum=0, so it keeps no momentum slot (as in Keras) and a new `momentum` would "
        "change nothing; build it with a momentum above 0 (any value, then set the one you "
        "want, 0 included)"
    )


def _placed_like(old: Any, new: jax.Array) -> Any:
    """``new``, a scalar, with ``old``'s dtype, shape and placement.

    A state on a device mesh holds its hyperparameters there (replicated), ``pmap``'s holds
    one copy per device, and one committed to a device holds them there; a value placed
    elsewhere (or left uncommitted) would make the next step compile again or fail. An
    uncommitted value stays uncommitted. Inside a trace the step decides the placement.
    A value held in a box (``flax.nnx.Optimizer`` keeps each state leaf in an ``OptState``
    variable) is put in a new box of the same kind: a bare array in its place would change
    the state's structure, and the next ``nnx.jit`` step would compile again.
    """
    if not isinstance(old, (jax.Array, np.ndarray, np.generic, int, float)):
        leaves = jax.tree.leaves(old)
        if len(leaves) == 1 and leaves[0] is not old:
            return jax.tree.map(lambda leaf: _placed_like(leaf, new), old)
    old = jnp.asarray(old) if not isinstance(old, jax.Array) else old
    new = new.astype(old.dtype)
    if old.shape:
        new = jnp.broadcast_to(new, old.shape)
    if isinstance(new, jax.core.Tracer) or isinstance(old, jax.core.Tracer):
        return new
    # A buffer of its own for each place that holds the value: one buffer in two leaves of a
    # state cannot be donated to a step (JAX refuses to donate a buffer twice).
    new = jnp.array(new, copy=True)  # (a device_put alone may alias it on its own device)
    return jax.device_put(new, old.sharding) if old.committed else new


def get_slot(state: OptState, name: str, *, where: Any = None) -> PyTree:
    """Returns the slot ``name`` of an optimizer state: a pytree shaped like the params.

    For params kept packed (:func:`kopt.pack`), the slot is unpacked too: its leaves have the
    shapes of the original params, whatever buffers the state keeps them in. Where several
    pieces hold the slot for different params (the groups of a ``multi_transform``, or
    ``masked`` pieces), their parts are put together; a param that no piece holds it for is
    None.

    Slot names are Keras's: ``"m"``, ``"v"``, ``"vhat"``, ``"momentum"``, ``"accumulator"``,
    ``"accum_grad"``, ``"accum_var"``, ``"rms"``, ``"mg"``, ``"linear"`` (and Adafactor's ``"r"``,
    ``"c"``; Nadam's scalar ``"momentum_cache"``).

    Args:
        state: an optimizer state.
        name: the slot's name.
        where: only the pieces with this key on the way to them in the state (a
            ``multi_transform`` label, a position in the outermost chain, or a tuple of
            consecutive keys), as for :func:`get_hyperparam`.

    Raises:
        ValueError: if the state (under ``where``) has no slot of that name (the message lists
            those it has), or two pieces hold it for the same param (the message names them).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> state = kopt.adagrad().init({"w": jnp.zeros(2)})
        >>> kopt.get_slot(state, "accumulator")["w"]
        Array([0.1, 0.1], dtype=float32)
    """
    holders = list(_slot_holders(state))
    found = [(p, h) for p, h in holders if name in h.slots]
    if not found:
        names = sorted({n for _, h in holders for n in h.slots})
        raise ValueError(f"get_slot: no slot named {name!r} in this state; it has {names}")
    chosen = _select_holders("get_slot", "slot", name, found, where)
    merged = _unpacked(chosen[0][1].slots[name])
    for _, holder in chosen[1:]:
        try:
            merged = _merge_disjoint(merged, _unpacked(holder.slots[name]))
        except _Overlap:
            advice = _where_advice([p for p, _ in chosen], [p for p, _ in found])
            raise ValueError(
                f"get_slot: pieces at {[_path_text(p) for p, _ in chosen]} hold a slot {name!r} "
                f"for the same params; {advice}"
            ) from None
    return merged


def _absent(x: Any) -> bool:
    """No slot for these params: None (kopt's masked pieces) or optax's ``MaskedNode``."""
    return x is None or type(x).__name__ == "MaskedNode"


class _Overlap(Exception):
    """Two slot trees hold a value for the same param."""


def _merge_disjoint(a: PyTree, b: PyTree) -> PyTree:
    """``a`` and ``b`` (trees shaped like the params, None where a piece holds nothing) put
    together; raises :class:`_Overlap` where both hold a value."""
    if _absent(a):
        return b
    if _absent(b):
        return a
    a_children, a_def = jax.tree.flatten(a, is_leaf=lambda x: x is not a)
    b_children, b_def = jax.tree.flatten(b, is_leaf=lambda x: x is not b)
    if jax.tree_util.treedef_is_leaf(a_def) or a_def != b_def:
        raise _Overlap
    return a_def.unflatten(
        [_merge_disjoint(x, y) for x, y in zip(a_children, b_children, strict=True)]
    )


def slot_names(state: OptState) -> list[str]:
    """The slot names held anywhere in a state, in the order they appear.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> kopt.slot_names(kopt.adam(amsgrad=True).init(jnp.zeros(2)))
        ['m', 'v', 'vhat']
    """
    out = []
    for _, holder in _slot_holders(state):
        out.extend(n for n in holder.slots if n not in out)
    return out


def _unpacked(slot: PyTree) -> PyTree:
    from kopt._packed import Packed  # here: kopt._packed imports this module

    def is_packed(x):
        return isinstance(x, Packed)

    return jax.tree.map(lambda x: x.unpack() if is_packed(x) else x, slot, is_leaf=is_packed)


def _slot_holders(state: Any, path: tuple = ()):
    """Yields ``(path, state)`` for every :class:`OptimizerState` in a tree (see
    :func:`_hyperparam_holders` for the path)."""
    from kopt.transforms._flat import FlattenedState  # here: kopt.transforms imports this module

    if isinstance(state, OptimizerState):
        yield path, state
    elif isinstance(state, FlattenedState):
        yield from _slot_holders(state.unflattened(), path)
    elif isinstance(state, tuple) and hasattr(state, "_fields"):
        for field, s in zip(state._fields, state, strict=True):
            yield from _slot_holders(s, (*path, _Field(field)))
    elif isinstance(state, (tuple, list)):
        for i, s in enumerate(state):
            yield from _slot_holders(s, (*path, i))
    elif isinstance(state, dict):
        for k, s in state.items():
            yield from _slot_holders(s, (*path, k))
