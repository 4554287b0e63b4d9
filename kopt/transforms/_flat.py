"""``flatten``: an elementwise transformation run on one buffer per dtype instead of many leaves."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import sys
import threading
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt._tree import (
    check_floating_params,
    check_leaf,
    check_same_structure,
    device_mismatch,
    uncommitted_on_params_devices,
)
from kopt.base import (
    GradientTransformation,
    OptimizerState,
    PyTree,
    check_count,
    check_state,
    check_transformation,
    extra_args_update,
)
from kopt.sparse import IndexedSlices, is_indexed_slices

# The layout whose packed buffers the transformation inside kopt.flatten is being given.
_FLATTENING: contextvars.ContextVar[Any] = contextvars.ContextVar("kopt_flattening", default=None)


def packed_buffers(params: PyTree) -> tuple[str, list[str]] | None:
    """Whose flat buffers ``params`` holds, and their keys: ``("kopt.flatten", keys)`` while
    :func:`flatten` initialises the transformation inside it, ``("kopt.pack", keys)`` for a
    :func:`kopt.pack` node with a packed buffer; None where no param is packed."""
    layout = _FLATTENING.get()
    if layout is not None and layout.groups:
        return "kopt.flatten", [key for key, _ in layout.groups]
    nodes = jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(getattr(x, "layout", None), FlatLayout)
    )
    for node in nodes:
        layout = getattr(node, "layout", None)
        if isinstance(layout, FlatLayout) and layout.groups:
            return "kopt.pack", [key for key, _ in layout.groups]
    return None


def refuse_packed_params(owner: str, params: PyTree) -> None:
    """Raises for a per-tensor piece given params packed into flat buffers (by
    :func:`kopt.pack`, or inside :func:`flatten`), where a whole buffer would count as one
    tensor and the step would silently change its meaning."""
    found = packed_buffers(params)
    if found is None:
        return
    where, keys = found
    if where == "kopt.flatten":
        raise ValueError(
            f"{owner}: its step depends on each tensor's shape or norm, but inside "
            "kopt.flatten it would see params packed into flat buffers "
            f"({', '.join(keys)}) as single tensors; flatten only "
            "elementwise transformations (or lower `max_leaf_size` so no param is packed)"
        )
    raise ValueError(
        f"{owner}: its step depends on each tensor's shape or norm, but it is given "
        f"a kopt.Packed whose flat buffers ({', '.join(keys)}) it would take as single "
        "tensors; use an elementwise optimizer on packed params, or pack with a "
        "`max_leaf_size` that leaves the params it needs whole"
    )


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class FlatLayout:
    """Where each param leaf lives in a :func:`flatten` state (static: no arrays, hashable).

    Attributes:
        treedef: the params' tree structure.
        paths: each leaf's path, as ``jax.tree_util.keystr`` writes it.
        shapes: each leaf's shape.
        groups: ``(key, leaf indices)`` of each packed buffer, one per param dtype.
        loose: ``(key, leaf index)`` of each leaf kept as its own array.
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[str, tuple[int, ...]], ...]
    loose: tuple[tuple[str, int], ...]

    # A jitted call compares the layout in its arguments' tree structure with the one it was
    # compiled for. Comparing two equal layouts field by field took ~70 us over 1,000 leaves,
    # twice a step (as much as dispatching the step's arrays): make_layout hands out one
    # object per distinct layout, so the comparison is an identity check, and the hash is
    # computed once.
    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, FlatLayout):
            return NotImplemented
        return hash(self) == hash(other) and self._fields == other._fields

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):  # copies and unpickled layouts are the canonical object too
        return (_canonical, (self.treedef, self.paths, self.shapes, self.groups, self.loose))

    @functools.cached_property
    def _fields(self) -> tuple:
        return (self.treedef, self.paths, self.shapes, self.groups, self.loose)

    @functools.cached_property
    def _hash(self) -> int:
        return hash(self._fields)

    @functools.cached_property
    def state_type(self) -> type[FlattenedState]:
        """The :class:`FlattenedState` subclass whose states have this layout."""
        return type(
            "FlattenedState",
            (FlattenedState,),
            {"__slots__": (), "layout": self, "__module__": FlattenedState.__module__},
        )

    @functools.cached_property
    def keys(self) -> tuple[str, ...]:
        """The packed form's keys, in order: the packed buffers', then the loose leaves'."""
        return tuple(key for key, _ in self.groups) + tuple(key for key, _ in self.loose)

    def pack(self, tree: PyTree, owner: str, what: str) -> dict[str, Any]:
        """The packed form of a tree shaped like the params: ``{key: buffer or leaf}``."""
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_indexed_slices)
        if treedef != self.treedef and not self._boxes_removed(tree):
            if what == "gradient":
                self._check_no_none_gradient(tree, owner)
            reference = self.treedef.unflatten(
                [jax.ShapeDtypeStruct(s, jnp.float32) for s in self.shapes]
            )
            check_same_structure(tree, reference, owner, "params")
            raise ValueError(f"{owner}: the {what} tree {treedef} differs from {self.treedef}")
        packed = {}
        for key, indices in self.groups:
            # The params of a buffer share the dtype its key names ("packed float32"): a
            # gradient is checked against it here, where its own path is known (the
            # transformation inside sees the buffer only).
            param_dtype = jnp.dtype(key.removeprefix("packed "))
            parts = []
            for i in indices:
                leaf = leaves[i]
                if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
                    leaf = jnp.asarray(leaf, jnp.float32)
                if isinstance(leaf, IndexedSlices):
                    raise TypeError(
                        f"{owner}: {what} {self.paths[i]} is an IndexedSlices but its param is "
                        "packed into a flat buffer; lower `max_leaf_size` below its size "
                        f"({math.prod(self.shapes[i])}) to keep it sparse"
                    )
                if what == "gradient":
                    check_leaf(self.paths[i], leaf, self.shapes[i], owner, ref_dtype=param_dtype)
                elif tuple(jnp.shape(leaf)) != self.shapes[i]:
                    raise ValueError(
                        f"{owner}: {what} {self.paths[i]} has shape {tuple(jnp.shape(leaf))}, "
                        f"expected {self.shapes[i]} (the shape it had in init)"
                    )
                parts.append(leaf)
            _check_on_one_device(parts, [self.paths[i] for i in indices], owner, what)
            packed[key] = _concatenated(parts)
        for key, i in self.loose:
            packed[key] = leaves[i]
        return packed

    def _check_no_none_gradient(self, tree: PyTree, owner: str) -> None:
        """Raises ValueError naming a None gradient where the params have an array: a param
        cannot be left out of a step over packed buffers (unflattened, a None skips it)."""
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
        for path, leaf in flat:
            path = jax.tree_util.keystr(path) or "<root>"
            if leaf is None and path in self.paths:
                raise ValueError(
                    f"{owner}: gradient {path} is None, but every param needs one: the step runs "
                    "on packed buffers, where a param cannot be skipped (give it zeros, or "
                    "leave it out of the params)"
                )

    def _boxes_removed(self, tree: PyTree) -> bool:
        """Whether ``tree`` is the params' tree with each flax box taken off: the same tree,
        leaf shapes included, once each ``flax.nnx.Variable`` or ``flax.core.meta``
        ``AxisMetadata`` node of the params is replaced by what it holds
        (``flax.nnx.Optimizer`` initialises with ``Variable`` boxes and updates with the bare
        arrays). Any other difference is a mismatch, as without :func:`flatten`."""
        boxes = _flax_box_types()
        if not boxes:
            return False

        def unboxed(x):
            if not isinstance(x, boxes):
                return x
            children = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)[0]
            return children[0] if len(children) == 1 else x

        reference = self.treedef.unflatten(
            [jax.ShapeDtypeStruct(s, jnp.float32) for s in self.shapes]
        )
        reference = jax.tree.map(unboxed, reference, is_leaf=lambda x: isinstance(x, boxes))
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_indexed_slices)
        if treedef != jax.tree.structure(reference):
            return False
        for leaf, shape in zip(leaves, jax.tree.leaves(reference), strict=True):
            values = leaf.values if isinstance(leaf, IndexedSlices) else leaf
            rows = 1 if isinstance(leaf, IndexedSlices) else 0
            if tuple(jnp.shape(values))[rows:] != shape.shape[rows:]:
                return False
        return True

    def unpack(self, packed: dict[str, Any], treedef: Any = None) -> PyTree:
        """The tree shaped like the params (or ``treedef``, the structure of the tree
        :meth:`pack` took) that ``packed`` was made from."""
        leaves: list[Any] = [None] * len(self.shapes)
        for key, indices in self.groups:
            shapes = tuple(self.shapes[i] for i in indices)
            for i, part in zip(indices, _split_into(packed[key], shapes), strict=True):
                leaves[i] = part
        for key, i in self.loose:
            leaves[i] = packed[key]
        return (self.treedef if treedef is None else treedef).unflatten(leaves)

    def is_packed(self, tree: Any) -> bool:
        """Whether ``tree`` is shaped like the packed form (a slot, not a scalar slot)."""
        keys = {key for key, _ in self.groups} | {key for key, _ in self.loose}
        return isinstance(tree, dict) and set(tree) == keys


class _FlattenedFields(NamedTuple):
    inner_state: Any


class FlattenedState(_FlattenedFields):
    """State of :func:`flatten`: the inner state over the packed buffers, and their layout.

    ``FlattenedState(inner_state, layout)`` is a named tuple of one field, ``inner_state``;
    the :class:`FlatLayout` is held by its type (one subclass per layout), which JAX keeps as
    static data of the tree. So the state is a pytree of arrays only, which libraries that
    walk a named tuple's fields (``flax.serialization``) save, and restore into a state that
    ``init`` made: the restored state takes that state's type, and so its layout.

    :func:`kopt.get_slot` and :func:`kopt.slot_names` read it through :meth:`unflattened`,
    so slots come back shaped like the params.
    """

    __slots__ = ()
    layout: FlatLayout  # set on each layout's subclass (FlatLayout.state_type)

    def __new__(cls, inner_state: Any, layout: FlatLayout | None = None) -> FlattenedState:
        # Without a layout (a copy rebuilt field by field: jax.tree.map, flax's restore), the
        # layout of the class it is rebuilt as.
        layout = cls.__dict__.get("layout") if layout is None else layout
        if not isinstance(layout, FlatLayout):
            raise TypeError(
                f"FlattenedState: `layout` must be a FlatLayout, received {type(layout).__name__}"
            )
        return tuple.__new__(layout.state_type, (inner_state,))

    def __reduce__(self):  # pickled by the public class, with the layout
        return (FlattenedState, (self.inner_state, self.layout))

    def unflattened(self) -> Any:
        """The inner state with every slot unpacked to a tree shaped like the params."""

        def unpack_slots(s):
            if not isinstance(s, OptimizerState):
                return s
            slots = {
                name: self.layout.unpack(tree) if self.layout.is_packed(tree) else tree
                for name, tree in s.slots.items()
            }
            return s._replace(slots=slots)

        return jax.tree.map(
            unpack_slots, self.inner_state, is_leaf=lambda x: isinstance(x, OptimizerState)
        )


def _flax_box_types() -> tuple[type, ...]:
    """flax's boxes around a param (``nnx.Variable``, ``flax.core.meta.AxisMetadata``), of
    the flax modules loaded: a param cannot be in a box whose module was never imported."""
    nnx = sys.modules.get("flax.nnx")
    meta = sys.modules.get("flax.core.meta")
    return tuple(
        box
        for box in (getattr(nnx, "Variable", None), getattr(meta, "AxisMetadata", None))
        if isinstance(box, type)
    )


def _check_on_one_device(parts: list[Any], paths: list[str], owner: str, what: str) -> None:
    """Raises ValueError naming two leaves of one buffer committed to different devices: the
    buffer lives in one place, and the concatenation's own error named neither leaf, only an
    argument of an internal function."""
    mismatch = device_mismatch(zip(paths, parts, strict=True))
    if mismatch:
        (a, a_ids), (b, b_ids) = mismatch
        raise ValueError(
            f"{owner}: {what}s {a} (device ids {a_ids}) and {b} (device ids {b_ids}) are "
            "committed to different devices but packed into one buffer: put them on the same "
            "devices first (jax.device_put)"
        )


def _concatenated(parts: list[Any]) -> Any:
    """The leaves raveled and concatenated into one buffer. Outside a trace it is one compiled
    call: eager, each ``ravel`` compiled a program of its own per shape, hundreds for the
    first ``kopt.pack`` of a model of many small params of distinct shapes."""
    if any(isinstance(p, jax.core.Tracer) for p in parts):
        return _ravel_concatenate(parts)
    return _ravel_concatenate_jit(parts)


def _ravel_concatenate(parts: list[Any]) -> Any:
    return jnp.concatenate([jnp.ravel(p) for p in parts])


_ravel_concatenate_jit = jax.jit(_ravel_concatenate)


def _split_into(buffer: Any, shapes: tuple[tuple[int, ...], ...]) -> list[Any]:
    """The parts of a 1-D buffer, reshaped to ``shapes`` (one compiled call outside a trace,
    as :func:`_concatenated`)."""
    if isinstance(buffer, jax.core.Tracer):
        return _split_reshape(buffer, shapes)
    return _split_reshape_jit(buffer, shapes)


def _split_reshape(buffer: Any, shapes: tuple[tuple[int, ...], ...]) -> list[Any]:
    # One split, not a slice per leaf: its gradient is one concatenation, where the
    # gradients of separate slices are a buffer-sized pad each, summed.
    parts = _split(jnp.asarray(buffer), [math.prod(shape) for shape in shapes])
    return [part.reshape(shape) for part, shape in zip(parts, shapes, strict=True)]


_split_reshape_jit = jax.jit(_split_reshape, static_argnums=1)


def _split(buffer: Any, sizes: list[int]) -> list[Any]:
    if hasattr(jax.lax, "split"):
        return jax.lax.split(buffer, sizes)
    offsets, parts = 0, []
    for size in sizes:
        parts.append(buffer[offsets : offsets + size])
        offsets += size
    return parts


def make_layout(params: PyTree, max_leaf_size: int | None) -> FlatLayout:
    """The layout packing every leaf of at most ``max_leaf_size`` elements (None: every leaf)
    that is not split over several devices into one 1-D buffer per dtype."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = tuple(jax.tree_util.keystr(path) or "<root>" for path, _ in flat)
    shapes = tuple(tuple(jnp.shape(p)) for _, p in flat)
    by_dtype: dict[str, list[int]] = {}
    loose = []
    for i, (_, p) in enumerate(flat):
        small = max_leaf_size is None or math.prod(shapes[i]) <= max_leaf_size
        if small and not _is_sharded(p):
            by_dtype.setdefault(f"packed {jnp.result_type(p).name}", []).append(i)
        else:
            loose.append((paths[i], i))
    groups = tuple((key, tuple(indices)) for key, indices in by_dtype.items())
    return _canonical(treedef, paths, shapes, groups, tuple(loose))


def _canonical(*fields: Any) -> FlatLayout:
    """The one FlatLayout object of these fields (see FlatLayout.__eq__)."""
    layout = FlatLayout(*fields)
    # Keyed by the fields, not by the layout: a key is held strongly, so a layout as its own
    # key would never be dropped. The lock: WeakValueDictionary.setdefault is not atomic, and
    # threads making the same new layout at once each got an object of their own.
    with _LAYOUTS_LOCK:
        return _LAYOUTS.setdefault(layout._fields, layout)


# One object per distinct layout (see FlatLayout.__eq__), dropped once nothing uses it.
_LAYOUTS: weakref.WeakValueDictionary[tuple, FlatLayout] = weakref.WeakValueDictionary()
_LAYOUTS_LOCK = threading.Lock()


def _is_sharded(p: Any) -> bool:
    """True for a param split over several devices (concrete or, with explicit axes, traced)."""
    if isinstance(p, jax.core.Tracer):
        spec = getattr(getattr(jax.typeof(p), "sharding", None), "spec", None)
        return spec is not None and any(axis is not None for axis in spec)
    sharding = getattr(p, "sharding", None)
    return sharding is not None and not sharding.is_fully_replicated


def _stands_for_params(params: Any) -> bool:
    """Whether ``params`` is the placeholder ``optax.tree_utils.tree_map_params`` passes to
    ``init`` (a leafless tree that stands for the params, to find where the state holds trees
    shaped like them). A flatten state holds none, and the empty layout built from the
    placeholder failed there with a pytree-structure error naming neither."""
    return type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params)


def flatten(
    transformation: GradientTransformation, max_leaf_size: int = 8192
) -> GradientTransformation:
    """Runs an elementwise ``transformation`` on one flat buffer per dtype instead of per leaf.

    A jitted step over many small leaves spends its time on buffers, not arithmetic: every
    slot leaf is one more kernel and one more output (see ``benchmarks/``). ``flatten`` packs
    the params of at most ``max_leaf_size`` elements into one 1-D buffer per dtype, so each
    slot of those leaves is a single array; the gradients are concatenated on the way in and
    the updates split on the way out. Larger leaves, and leaves sharded over several devices,
    stay as they are (their slots keep the params' sharding). Under ``jax.jit(tx.init)`` without
    explicit mesh axes a param's sharding is not known at trace time: call ``init`` outside
    ``jit`` when small params are sharded.

    Only for transformations that treat every element alike: every kopt optimizer except
    :func:`kopt.lamb` and :func:`kopt.adafactor` (and building blocks such as
    :func:`kopt.clip_by_norm`, :func:`kopt.masked`, :func:`kopt.multi_transform` and the
    ``mask`` of :func:`kopt.decoupled_weight_decay`, whose result depends on the leaves' shapes
    or tree; they raise a ``ValueError`` here when a param is packed). Sparse gradients of
    packed leaves are rejected.
    :func:`kopt.get_slot` still returns slots shaped like the params, and hyperparameters are
    read and set as usual. The updates equal the unflattened transformation's (up to rounding).
    Every param needs a gradient: a None gradient, which the unflattened transformation takes
    as "skip this param", is refused with a ValueError naming it.
    ``optax.tree_utils.tree_map_params`` cannot map the state (its slots are packed buffers,
    not param trees) and raises a ValueError saying so; for the state's shardings, read them
    off a state made by ``init`` from the placed params, or use :func:`kopt.state_sharding`.

    Args:
        transformation: the elementwise transformation to run packed.
        max_leaf_size: the largest leaf (in elements) to pack. Packing copies the gradient
            into the buffer; on a 2-core CPU that costs more than the leaf's own buffers save
            somewhere between 8k and 16k float32 elements.

    Returns:
        A transformation with a :class:`FlattenedState`.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> tx = kopt.flatten(kopt.sgd(learning_rate=0.1, momentum=0.9))
        >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
        >>> state = tx.init(params)
        >>> grads = {"w": jnp.ones((2, 2)), "b": -jnp.ones(2)}
        >>> updates, state = tx.update(grads, state, params)
        >>> updates["b"]
        Array([0.1, 0.1], dtype=float32)
        >>> kopt.get_slot(state, "momentum")["w"].shape
        (2, 2)
    """
    owner = "flatten"
    check_transformation(owner, "`transformation`", transformation)
    max_leaf_size = check_count(owner, "max_leaf_size", max_leaf_size, 0)

    def init_fn(params):
        if _stands_for_params(params):
            raise ValueError(
                f"{owner}: optax.tree_utils.tree_map_params cannot map a flatten state: its "
                "slots are packed 1-D buffers (one per dtype, and the large or sharded leaves "
                "beside them), not trees shaped like the params. For the state's shardings, "
                "take them from a state that `init` made from the placed params "
                "(`jax.tree.map(lambda x: x.sharding, state)`), or use kopt.state_sharding "
                "for ZeRO-1 shardings"
            )
        check_floating_params(params, owner)
        layout = make_layout(params, max_leaf_size)
        packed = layout.pack(params, owner, "param")
        token = _FLATTENING.set(layout)
        try:
            inner_state = transformation.init(packed)
        finally:
            _FLATTENING.reset(token)
        inner_state = uncommitted_on_params_devices(inner_state, packed)
        return FlattenedState(inner_state, layout)

    inner_update = extra_args_update(transformation)

    def update_fn(updates, state, params=None, **extra_args):
        check_state(owner, state, FlattenedState)
        layout = state.layout
        packed_params = None if params is None else layout.pack(params, owner, "param")
        # The inner transformation sees packed buffers, so a tree of the params' shape
        # (``grad=``) or a function of the params (``value_fn=``) would not fit it: only
        # single values (``value=``) are passed on.
        extra_args = {
            k: v
            for k, v in extra_args.items()
            if not callable(v) and len(jax.tree.leaves(v)) == 1 and jnp.ndim(v) == 0
        }
        packed_updates, inner_state = inner_update(
            layout.pack(updates, owner, "gradient"), state.inner_state, packed_params, **extra_args
        )
        treedef = jax.tree.structure(updates, is_leaf=is_indexed_slices)
        return layout.unpack(packed_updates, treedef), FlattenedState(inner_state, layout)

    return GradientTransformation(init_fn, update_fn)
