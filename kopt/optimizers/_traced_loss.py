"""Compiled gradients of a facade loss: ``minimize`` and ``compute_gradients`` without eager AD.

The loss is a zero-argument closure, called afresh at every step (it may read a new batch), so
it cannot be handed to ``jax.jit``: a jitted closure would keep its first batch. Differentiating
it eagerly (``jax.vjp``) costs JAX's per-operation and per-argument dispatch at every step, ten
times the compiled update for a model of a hundred variables. Instead each call traces the loss
to a jaxpr (the Python code runs once per step, as before), and the gradient of that jaxpr runs as
one compiled program, cached by the jaxpr's structure: the arrays the closure captured (the
batch) are its arguments, not constants, so the next batch reuses the program.

A loss that needs concrete values (Python control flow on a variable's value, ``float(v)``)
cannot be traced: it is differentiated eagerly, as before, from then on. A loss whose trace is
not the same structure at every step (an operation traced afresh each call, such as a
``custom_jvp`` function called outside a jitted function) is differentiated eagerly from its
traced jaxpr once that shows (five calls, five structures, none repeated), so it compiles at
most four times in vain. One closure may stand for a few losses (a helper's lambda around the
loss function it is given, called with each in turn): each of their structures is compiled
once and kept.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

# Losses (identified by their code) that cannot be traced, or whose trace changes every call.
_EAGER: set[Any] = set()
# Compiled gradient programs by jaxpr structure, least recently used first out.
_PROGRAMS: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_MAX_PROGRAMS = 64
# Per loss and input signature: the structure keys its traces had, with how many calls each;
# forgotten once it holds more than ``_MAX_SEEN`` signatures, of all losses together.
_SEEN: dict[Any, dict[tuple, dict[tuple, int]]] = {}
_MAX_SEEN = _MAX_PROGRAMS * 16
_lock = threading.Lock()
_NOT_TRACEABLE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


def loss_identity(loss: Callable) -> Any:
    """What identifies a loss across steps: its code (a lambda in a loop body is a new function
    object each step, with the same code), a partial's function's code, or else its type; a
    wrapper's (a LossScaleOptimizer's scaled loss) with the wrapped loss's, so that losses
    wrapped alike are told apart."""
    code = getattr(loss, "__code__", None)
    if code is None:
        code = getattr(getattr(loss, "func", None), "__code__", None)
    own = code if code is not None else type(loss)
    wrapped = getattr(loss, "__wrapped__", None)
    return own if wrapped is None else (own, loss_identity(wrapped))


def compiled_gradients(
    identity: Any, loss_of: Callable, values: list[jax.Array], grad_loss: Any
) -> tuple[Any, list[Any], Any] | None:
    """``(loss value, gradients, aux)`` of ``loss_of(values) -> (loss, aux)`` with the
    gradient run as a cached compiled program; None where the loss is to be differentiated
    eagerly instead (it was not run then, or its trace raised a concreteness error, which is
    then remembered)."""
    if identity in _EAGER or not values:
        return None
    if any(
        isinstance(v, jax.core.Tracer) or not isinstance(v, jax.Array) or not _inexact(v.dtype)
        for v in values
    ):
        return None  # integer variables (float0 gradients) and nested traces: eager
    try:
        closed, shapes = jax.make_jaxpr(loss_of, return_shape=True)(values)
    except _NOT_TRACEABLE:
        with _lock:
            _EAGER.add(identity)
        return None
    out_tree = jax.tree.structure(shapes)
    loss_shape = jax.tree.leaves(shapes)[0]
    cotangent = _cotangent(grad_loss, loss_shape)
    key = _structure_key(closed.jaxpr)
    run = None
    if key is not None:
        signature = (key[0], None if cotangent is None else cotangent.dtype)
        # The outputs' tree too: it names the variables the loss assigned (by uid).
        key = (*key, signature, out_tree)
        with _lock:
            run = _PROGRAMS.get(key)
            if run is not None:
                _PROGRAMS.move_to_end(key)
            else:
                # Counted by input signature, not by loss: one loss over inputs of a new shape
                # every call (variable-length batches) adds a signature each time.
                if sum(map(len, _SEEN.values())) > _MAX_SEEN:
                    _SEEN.clear()
                seen = _SEEN.setdefault(identity, {}).setdefault(signature, {})
                if key not in seen and _changes_every_call(seen):
                    _EAGER.add(identity)
                    # Neither the traces' keys nor their programs are of use now; they may
                    # hold what the loss captured (a batch a custom_vjp rule closes over).
                    for stale in _SEEN.pop(identity).values():
                        for k in stale:
                            _PROGRAMS.pop(k, None)
                else:
                    run = jax.jit(_gradient_program(closed.jaxpr, out_tree))
                    _PROGRAMS[key] = run
                    while len(_PROGRAMS) > _MAX_PROGRAMS:
                        _PROGRAMS.popitem(last=False)
            if run is not None:
                seen = _SEEN.get(identity, {}).get(signature)
                if seen is not None:
                    seen[key] = seen.get(key, 0) + 1
    if run is None:  # differentiated eagerly, from the trace already taken (no second call)
        return _gradient_program(closed.jaxpr, out_tree)(list(closed.consts), values, cotangent)
    return run(list(closed.consts), values, cotangent)


# The most structures one loss (one code) may trace to on the same inputs: one closure can
# stand for several losses (a helper's lambda around the loss function it is given).
_MAX_STRUCTURES = 8
# Structures, none of them repeated, after which a loss counts as traced afresh every call.
_FRESH_STRUCTURES = 4


def _changes_every_call(seen: dict[tuple, int]) -> bool:
    """Whether a loss that traced to the structures ``seen`` (key -> calls) on the same inputs,
    and now to a new one, is taken to trace afresh at every call (a ``custom_jvp`` function
    called outside ``jit``): it made ``_FRESH_STRUCTURES`` structures, one call each, none
    come back (a few losses through one closure, called in turn, come back); or too many."""
    if len(seen) >= _MAX_STRUCTURES:
        return True
    return len(seen) >= _FRESH_STRUCTURES and all(calls == 1 for calls in seen.values())


_INEXACT: dict[Any, bool] = {}


def _inexact(dtype: Any) -> bool:
    """``jnp.issubdtype(dtype, jnp.inexact)``, remembered per dtype (it is called per variable
    per step)."""
    out = _INEXACT.get(dtype)
    if out is None:
        out = _INEXACT[dtype] = bool(jnp.issubdtype(dtype, jnp.inexact))
    return out


def _cotangent(grad_loss: Any, shape: jax.ShapeDtypeStruct) -> jax.Array | None:
    """``grad_loss`` checked against the loss's shape, in its dtype; None for ones (made inside
    the program)."""
    if grad_loss is None:
        return None
    cotangent = jnp.asarray(grad_loss)
    if cotangent.shape != shape.shape:
        raise ValueError(
            f"minimize: `grad_loss` has shape {cotangent.shape}, but the loss has shape "
            f"{shape.shape}"
        )
    return cotangent.astype(shape.dtype)


def _gradient_program(jaxpr: Any, out_tree: Any) -> Callable:
    def loss_gradient(consts, values, cotangent):
        evaluate = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, consts))

        def loss_and_aux(vals):
            return jax.tree.unflatten(out_tree, evaluate(*vals))

        out, vjp, aux = jax.vjp(loss_and_aux, values, has_aux=True)
        (grads,) = vjp(jnp.ones_like(out) if cotangent is None else cotangent)
        return out, grads, aux

    return loss_gradient


def _structure_key(jaxpr: Any) -> tuple | None:
    """A hashable key equal for two jaxprs that compute the same function of their inputs and
    constants: inputs' types, every equation's primitive, parameters and wiring, literals by
    value. An inner jaxpr without constants of its own (a body of ``lax.scan``, ``lax.cond``,
    ``jax.checkpoint`` traced afresh every call, or a ``jax.jit`` function defined anew) counts
    by its own structure, remembered per jaxpr object; one with constants by identity (jit's
    cache hands the same one back for the same function and types; the cached program holds
    the jaxpr, so an identity is never reused while its key lives). None if a parameter is
    neither hashable nor a jaxpr, or the jaxpr has effects: such a loss is differentiated
    eagerly."""
    if jaxpr.effects:
        return None
    numbers: dict[Any, int] = {}

    def atom(a):
        if isinstance(a, jex_core.Literal):
            return ("literal", repr(a.val), a.aval)
        return numbers.setdefault(a, len(numbers)), a.aval

    # Where the constants end and the inputs begin, too: a variable read as an input (in
    # var_list) and the same variable captured as a constant (left out of it) give the same
    # equations.
    inputs = (
        tuple(v.aval for v in jaxpr.constvars),
        tuple(v.aval for v in jaxpr.invars),
    )
    for v in (*jaxpr.constvars, *jaxpr.invars):
        atom(v)
    equations = []
    for eqn in jaxpr.eqns:
        params = []
        for name, value in sorted(eqn.params.items()):
            value = _param_key(value)
            try:
                hash(value)
            except TypeError:
                return None
            params.append((name, value))
        equations.append(
            (
                eqn.primitive,
                tuple(params),
                tuple(atom(a) for a in eqn.invars),
                tuple(atom(a) for a in eqn.outvars),
            )
        )
    return (inputs, tuple(equations), tuple(atom(a) for a in jaxpr.outvars))


# Structure keys of inner jaxprs, per jaxpr object (jit's cache hands the same one back: its
# structure is read once).
_INNER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _param_key(value: Any) -> Any:
    """An equation parameter as it counts in a structure key (inner jaxprs, also in tuples such
    as ``cond``'s branches, by structure or identity; anything else as it is)."""
    if isinstance(value, tuple):
        return tuple(_param_key(v) for v in value)
    if not isinstance(value, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
        return value
    with _lock:
        key = _INNER.get(value)
    if key is None:
        inner = value.jaxpr if isinstance(value, jex_core.ClosedJaxpr) else value
        structure = None
        if not (isinstance(value, jex_core.ClosedJaxpr) and value.consts):
            structure = _structure_key(inner)
        key = ("jaxpr", id(value)) if structure is None else ("jaxpr structure", structure)
        with _lock:
            _INNER[value] = key
    return key
