"""Maps a functional optimizer state to the facade's variables and back.

The facade keeps one slot variable per (variable, slot name), scalar slots (Nadam's momentum
cache) as non-slot weights, the step count in ``iterations`` and the hyperparameters in its own
variables. Anything else in a state (an optax piece's state, a wrapper's counters, slots that
are not per variable) is "opaque": kept as one variable per leaf. ``describe`` reads a state's
layout; ``abstract`` keeps only a state's layout, the template ``assemble`` fills with the
facade's values inside the compiled step; ``extract`` reads the new values back.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import OptimizerState
from kopt.transforms._flat import FlattenedState
from kopt.transforms._weight_decay import DecoupledWeightDecayState
from kopt.transforms._wrappers import MaskedState, MultiTransformState

# Wrappers whose inner pieces step at every call, as the facade counts: their counts follow
# ``iterations`` even where a wrapper's pieces keep their own (see ``extract``).
_CALL_COUNTING = (MaskedState, MultiTransformState, FlattenedState, DecoupledWeightDecayState)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _per_var(tree: Any, n: int) -> bool:
    return isinstance(tree, list) and len(tree) == n


def _walk(node: Any, n: int, visit_state, visit_leaf, wrapped: bool = False):
    """Rebuilds ``node``: OptimizerStates through ``visit_state(state, wrapped)``, other leaves
    through ``visit_leaf``. ``wrapped``: the state is inside a wrapper's state (a named tuple
    other than OptimizerState, such as accumulate_gradients' or apply_if_finite's), whose
    pieces may count other steps than the calls (not those of ``_CALL_COUNTING``)."""
    if isinstance(node, OptimizerState):
        return visit_state(node, wrapped)
    if node is None:
        return None
    if _is_namedtuple(node):
        inner = wrapped or not isinstance(node, _CALL_COUNTING)
        return type(node)(*(_walk(x, n, visit_state, visit_leaf, inner) for x in node))
    if isinstance(node, (tuple, list)):
        return type(node)(_walk(x, n, visit_state, visit_leaf, wrapped) for x in node)
    if isinstance(node, dict):
        return {k: _walk(v, n, visit_state, visit_leaf, wrapped) for k, v in node.items()}
    if not jax.tree_util.tree_leaves(node):
        return node  # static data of the state (kopt.flatten's layout): no value to keep
    return visit_leaf(node)


class Layout(NamedTuple):
    """What a state holds, for ``n`` variables."""

    n: int
    opaque: bool
    own_counts: bool = False

    def slot_values(self, state: Any) -> dict[str, list[Any]]:
        return extract(state, self.n, self.own_counts)[0]

    def scalar_slots(self, state: Any) -> dict[str, Any]:
        return extract(state, self.n, self.own_counts)[1]

    def opaque_values(self, state: Any) -> list[Any]:
        return extract(state, self.n, self.own_counts)[2]


def describe(state: Any, n: int, own_counts: bool = False) -> Layout:
    """The layout of ``state`` (built by ``tx.init`` over a list of ``n`` params).
    ``own_counts``: the step counts of pieces inside a wrapper are kept as opaque values of
    their own rather than set from ``iterations`` (see :func:`extract`)."""
    return Layout(n, bool(extract(state, n, own_counts)[2]), own_counts)


def extract(
    state: Any, n: int, own_counts: bool = False
) -> tuple[dict[str, list[Any]], dict[str, Any], list[Any]]:
    """(slot name -> per-variable values, scalar slot name -> value, opaque leaves). With
    ``own_counts``, the step count of each piece inside a wrapper is an opaque leaf (before its
    slots): such a piece may count updates where the facade counts calls (the inner optimizer of
    ``accumulate_gradients``; of ``apply_if_finite``, which does not count a skipped step)."""
    per_var: dict[str, list[Any]] = {}
    scalars: dict[str, Any] = {}
    opaque: list[Any] = []
    claimed: dict[str, set[int]] = {}

    def visit_state(s, wrapped):
        if own_counts and wrapped:
            opaque.append(s.count)
        for name, tree in s.slots.items():
            if _per_var(tree, n):
                if _claim(claimed, name, tree):
                    values = per_var.setdefault(name, [None] * n)
                    for i, value in enumerate(tree):
                        if value is not None:
                            values[i] = value
                else:  # a second slot of this name for a variable: state of its own
                    opaque.extend(value for value in tree if value is not None)
            elif isinstance(tree, (dict, tuple)):  # not per variable (kopt.flatten's buffers)
                opaque.extend(jax.tree.leaves(tree))
            else:
                scalars.setdefault(name, tree)
        return s

    def visit_leaf(leaf):
        opaque.append(leaf)
        return leaf

    _walk(state, n, visit_state, visit_leaf)
    return per_var, scalars, opaque


def _claim(claimed: dict[str, set[int]], name: str, tree: list[Any]) -> bool:
    """Whether a per-variable slot list ``tree`` named ``name`` maps onto the facade's slots of
    that name: each variable has one, so the pieces holding a name must hold it for disjoint
    variables (the groups of a ``multi_transform``, a ``masked`` piece beside another). A list
    that overlaps one seen before is not a facade slot; the visits of ``extract`` and
    ``assemble`` decide alike, from where the lists hold None."""
    here = {i for i, value in enumerate(tree) if value is not None}
    taken = claimed.setdefault(name, set())
    if here & taken:
        return False
    taken |= here
    return True


def abstract(state: Any, n: int) -> Any:
    """``state`` with every array as a ``jax.ShapeDtypeStruct``: a template for ``assemble``
    that holds no buffer and no tracer. Its containers keep their order (``jax.tree.map`` would
    sort a dict's keys, and ``extract`` reads opaque leaves in container order)."""

    def shape_of(x):
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    def visit_state(s, wrapped):
        return OptimizerState(
            shape_of(s.count),
            {k: shape_of(v) for k, v in s.hyperparams.items()},
            {name: jax.tree.map(shape_of, tree) for name, tree in s.slots.items()},
        )

    return _walk(state, n, visit_state, shape_of)


def with_hyperparams(template: Any, source: Any, n: int) -> Any:
    """``template`` holding the hyperparameters of ``source``, another state of the same
    transformation (its kopt states in the same order)."""
    found = []

    def collect(s, wrapped):
        found.append(s.hyperparams)
        return s

    _walk(source, n, collect, lambda leaf: leaf)
    hyperparams = iter(found)
    return _walk(
        template,
        n,
        lambda s, wrapped: s._replace(hyperparams=next(hyperparams)),
        lambda leaf: leaf,
    )


def assemble(
    template: Any,
    *,
    count: Any,
    hyperparams: dict[str, Any],
    slots: dict[str, list[Any]],
    scalar_slots: dict[str, Any],
    opaque: list[Any],
    own_counts: bool = False,
) -> Any:
    """A state shaped like ``template`` (from ``tx.init``) holding the facade's current values;
    a hyperparameter the facade does not hold keeps the template's value. The step count of
    every piece is ``count``, but with ``own_counts`` a piece inside a wrapper takes its own
    from ``opaque`` (see :func:`extract`)."""
    n = None
    leaves = iter(opaque)
    claimed: dict[str, set[int]] = {}

    def visit_state(s, wrapped):
        nonlocal n
        own = next(leaves) if own_counts and wrapped else count
        new_slots = {}
        for name, tree in s.slots.items():
            if isinstance(tree, list):
                if _claim(claimed, name, tree):
                    new_slots[name] = [
                        None if t is None else slots[name][i] for i, t in enumerate(tree)
                    ]
                else:
                    new_slots[name] = [None if t is None else next(leaves) for t in tree]
            elif isinstance(tree, (dict, tuple)):
                parts, treedef = jax.tree.flatten(tree)
                new_slots[name] = treedef.unflatten([next(leaves) for _ in parts])
            else:
                new_slots[name] = scalar_slots[name]
        hp = {
            k: jnp.asarray(hyperparams[k], v.dtype) if k in hyperparams else v
            for k, v in s.hyperparams.items()
        }
        return OptimizerState(jnp.asarray(own).astype(s.count.dtype), hp, new_slots)

    return _walk(template, n, visit_state, lambda leaf: next(leaves))
