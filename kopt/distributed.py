"""ZeRO-1: optimizer state sharded over the data-parallel axis while the params stay replicated.

In plain data parallelism every device holds the whole optimizer state; for Adam that is twice
the params. ZeRO stage 1 (Rajbhandari et al., 2020) keeps the params and gradients replicated but
splits every state tensor across the data-parallel devices, so each holds ``1 / n`` of it. Under
``jax.jit`` that is only a choice of shardings: :func:`state_sharding` picks one per state leaf,
:func:`shard_state` places a state accordingly, and :func:`jit_update` compiles an update step
that keeps it so (each device updates its shard of the slots; XLA gathers the new params).

Example:
    >>> import jax, jax.numpy as jnp, kopt
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> tx = kopt.adam(0.1)
    >>> state = kopt.shard_state(tx.init(params), mesh, "data", params)
    >>> step = kopt.jit_update(tx, kopt.state_sharding(state, mesh, "data", params))
    >>> params, state = step({"w": jnp.ones((4, 3))}, state, params)
    >>> round(float(params["w"][0, 0]), 4)
    -0.1
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kopt.base import (
    GradientTransformation,
    OptimizerState,
    OptState,
    Params,
    PyTree,
    Updates,
    apply_updates,
    check_transformation,
)
from kopt.transforms._flat import FlatLayout, FlattenedState


def _axis_size(mesh: Mesh, axis_name: str | tuple[str, ...]) -> int:
    if not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(
            f"state_sharding: `mesh` must be a jax.sharding.Mesh, received "
            f"{type(mesh).__name__}: {mesh!r:.80}"
        )
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not (isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)):
        raise TypeError(
            "state_sharding: `axis_name` must be a mesh axis name (a str) or a tuple of them, "
            f"received {type(axis_name).__name__}: {axis_name!r:.80}"
        )
    for name in names:
        if name not in mesh.shape:
            raise ValueError(
                f"state_sharding: `axis_name` {name!r} is not an axis of the mesh; its axes are "
                f"{tuple(mesh.shape)}"
            )
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def leaf_sharding(
    shape: tuple[int, ...], mesh: Mesh, axis_name: str | tuple[str, ...]
) -> NamedSharding:
    """The ZeRO-1 sharding of one array of ``shape``: split along its largest dimension that the
    axis size divides (the first such one on a tie), replicated when none does (scalars, odd
    sizes).

    Example:
        >>> import jax, kopt
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> tuple(kopt.distributed.leaf_sharding((3, 8), mesh, "data").spec)
        (None, 'data')
    """
    return _split_over(shape, [None] * len(shape), mesh, axis_name)


def _split_over(
    shape: tuple[int, ...], spec: list[Any], mesh: Mesh, axis_name: str | tuple[str, ...]
) -> NamedSharding:
    """``spec`` with ``axis_name`` on the largest of its free dimensions that the axis size
    divides (the first on a tie); ``spec`` as it is when it already uses the axis, or when no
    free dimension fits."""
    names = {axis_name} if isinstance(axis_name, str) else set(axis_name)
    used = {a for entry in spec for a in (entry if isinstance(entry, tuple) else (entry,))}
    size = _axis_size(mesh, axis_name)
    candidates = [d for d, n in enumerate(shape) if spec[d] is None and n % size == 0 and n >= size]
    if candidates and not names & used:
        dim = max(candidates, key=lambda d: (shape[d], -d))
        spec = [*spec[:dim], axis_name, *spec[dim + 1 :]]
    return NamedSharding(mesh, P(*spec) if any(e is not None for e in spec) else P())


def _slot_sharding(
    leaf: Any, param: Any, mesh: Mesh, axis_name: str | tuple[str, ...]
) -> NamedSharding:
    """The ZeRO-1 sharding of a state leaf that belongs to ``param``: replicated unless it is
    shaped like the param; then the param's own sharding (on ``mesh``) split over
    ``axis_name`` too."""
    shape = tuple(jnp.shape(leaf))
    if shape != tuple(jnp.shape(param)):
        return NamedSharding(mesh, P())  # a factored statistic, a scalar placeholder
    sharding = getattr(param, "sharding", None)
    if not (isinstance(sharding, NamedSharding) and sharding.mesh == mesh):
        return leaf_sharding(shape, mesh, axis_name)
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    return _split_over(shape, spec, mesh, axis_name)


def state_sharding(
    state: OptState,
    mesh: Mesh,
    axis_name: str | tuple[str, ...],
    params: Params | None = None,
) -> PyTree:
    """The ZeRO-1 shardings of an optimizer state: a tree of ``NamedSharding`` shaped like it.

    Every array leaf shaped like a param (the slots ``m``, ``v``, ..., accumulated gradients, EMA
    averages) is split over ``axis_name`` along its largest divisible dimension (see
    :func:`leaf_sharding`); scalars (step counts, hyperparameters) are replicated.

    Without ``params`` the params' shapes are read from the state: in each kopt state, the
    slots of one param are matched to the largest of them (so Adafactor's ``v`` is split and
    its factored ``r`` and ``c`` stay replicated, as below), and every other leaf of rank 1 or
    more (another library's state) counts as param-shaped. With ``params``,
    each subtree of the state with the params' tree structure (a slot, an accumulator; or the
    slot of a ``masked`` piece or ``multi_transform`` group, None where the params it leaves
    out are) is matched to the params leaf by leaf: a leaf shaped like its own param is split,
    keeping that param's sharding on ``mesh`` along its other dimensions (a param split over a
    ``"model"`` axis keeps its slots split over it too; one already split over ``axis_name``
    gives its slots its own sharding), and any other leaf stays replicated, such as
    Adafactor's factored statistics ``r`` and ``c`` (small, and combined by an outer product
    that two sharded vectors cannot form under an explicit mesh). Leaves outside such
    subtrees are split when their shape is a param's, keeping the sharding of the params of
    that shape when they all have the same.

    Args:
        state: an optimizer state, or its ``jax.eval_shape``.
        mesh: the device mesh.
        axis_name: the data-parallel mesh axis (or a tuple of axes).
        params: the params (or their shapes), to match the state's leaves to.

    Returns:
        A tree of ``NamedSharding`` with the state's structure, usable as ``out_shardings``.

    Raises:
        TypeError: if ``mesh`` is not a mesh, or ``axis_name`` not a str or tuple of them.
        ValueError: if ``axis_name`` is not an axis of ``mesh``.
    """
    _axis_size(mesh, axis_name)
    if params is None:

        def without_params(node):
            if isinstance(node, OptimizerState):
                slot_params = _slot_params(node)
                if slot_params is not None:
                    return state_sharding(node, mesh, axis_name, slot_params)
            return jax.tree.map(lambda leaf: leaf_sharding(jnp.shape(leaf), mesh, axis_name), node)

        return jax.tree.map(
            without_params, state, is_leaf=lambda node: isinstance(node, OptimizerState)
        )
    params_def = jax.tree.structure(params)
    param_leaves = params_def.flatten_up_to(params)
    by_shape: dict[tuple[int, ...], list[Any]] = {}
    for p in param_leaves:
        by_shape.setdefault(tuple(jnp.shape(p)), []).append(p)

    def like_params(node):
        return jax.tree.structure(node) == params_def

    def subtree(node):
        return (
            like_params(node)
            or _flattened_over(node, params_def)
            or _aligned(node, params) is not None
        )

    def one(node):
        aligned = None if like_params(node) else _aligned(node, params)
        if aligned is not None:
            # Shaped like the params but for the ones a mask or labels left out (None): the
            # slots of masked and multi_transform pieces, matched leaf by leaf as well.
            return jax.tree.structure(node).unflatten(
                _slot_sharding(leaf, p, mesh, axis_name)
                for leaf, p in zip(aligned, param_leaves, strict=True)
                if leaf is not None
            )
        if _flattened_over(node, params_def):
            # kopt.flatten's inner state holds {key: buffer or loose leaf} slots: its layout
            # names the param of each loose leaf, so each is matched to its own param.
            packed = _packed_params(node.layout, param_leaves)
            return type(node)(
                state_sharding(node.inner_state, mesh, axis_name, packed), node.layout
            )
        if like_params(node):
            leaves = params_def.flatten_up_to(node)
            return params_def.unflatten(
                _slot_sharding(leaf, p, mesh, axis_name)
                for leaf, p in zip(leaves, param_leaves, strict=True)
            )
        # Outside such a subtree (kopt.flatten's loose slots) only the shape tells: the params
        # of that shape give theirs if they agree, else the split of the shape alone.
        shape = tuple(jnp.shape(node))
        choices = {_slot_sharding(node, p, mesh, axis_name) for p in by_shape.get(shape, [])}
        if not choices:
            return NamedSharding(mesh, P())
        return choices.pop() if len(choices) == 1 else leaf_sharding(shape, mesh, axis_name)

    return jax.tree.map(one, state, is_leaf=subtree)


def _slot_params(state: OptimizerState) -> Any:
    """The params' shapes as ``state``'s slots show them: per param, its largest slot (a
    factored statistic is smaller than the moment beside it). None without slots, or with
    slots of different tree structures."""
    slots = list(state.slots.values())
    if not slots:
        return None
    treedef = jax.tree.structure(slots[0])
    if any(jax.tree.structure(slot) != treedef for slot in slots[1:]):
        return None
    columns = zip(*(treedef.flatten_up_to(slot) for slot in slots), strict=True)
    return treedef.unflatten(
        max(column, key=lambda leaf: (math.prod(jnp.shape(leaf)), jnp.ndim(leaf)))
        for column in columns
    )


def _aligned(node: Any, params: Any) -> list[Any] | None:
    """``node``'s leaves beside the params' leaves, with None for each param under a None of
    ``node`` (a masked-out param, or subtree): the leaves of a tree shaped like the params but
    for the params a mask left out. None if ``node`` is not such a tree, or leaves none out."""
    out = _align(node, params)
    if out is None or all(x is not None for x in out) or all(x is None for x in out):
        return None
    return out


def _align(node: Any, params: Any) -> list[Any] | None:
    if node is None:
        return [None] * len(jax.tree.leaves(params))
    children, params_def = jax.tree.flatten(params, is_leaf=lambda x: x is not params)
    if jax.tree_util.treedef_is_leaf(params_def):  # a param: its slot is an array
        return [node] if hasattr(node, "shape") and hasattr(node, "dtype") else None
    node_children, node_def = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    if node_def != params_def:
        return None
    out: list[Any] = []
    for child, param in zip(node_children, children, strict=True):
        part = _align(child, param)
        if part is None:
            return None
        out.extend(part)
    return out


def _flattened_over(node: Any, params_def: Any) -> bool:
    """Whether ``node`` is a :func:`kopt.flatten` state laid out for params of ``params_def``."""
    return isinstance(node, FlattenedState) and node.layout.treedef == params_def


def _packed_params(layout: FlatLayout, param_leaves: list[Any]) -> dict[str, Any]:
    """The params as ``layout`` packs them: a 1-D shape per packed buffer (whose params are
    never split over devices), each loose leaf's own param."""
    packed: dict[str, Any] = {}
    for key, indices in layout.groups:
        size = sum(math.prod(layout.shapes[i]) for i in indices)
        packed[key] = jax.ShapeDtypeStruct((size,), jnp.result_type(param_leaves[indices[0]]))
    for key, i in layout.loose:
        packed[key] = param_leaves[i]
    return packed


def shard_state(
    state: OptState,
    mesh: Mesh,
    axis_name: str | tuple[str, ...],
    params: Params | None = None,
) -> OptState:
    """Returns ``state`` placed with the ZeRO-1 shardings of :func:`state_sharding`.

    Each device then holds ``1 / mesh.shape[axis_name]`` of every param-shaped slot with a
    dimension the axis size divides, beside the split its param has over other axes (with
    ``params``; ZeRO-1's params are typically replicated).

    Args:
        state: an optimizer state (from ``tx.init``).
        mesh: the device mesh.
        axis_name: the data-parallel mesh axis.
        params: the params, to split only the leaves shaped like one (see :func:`state_sharding`).

    Raises:
        ValueError: if ``axis_name`` is not an axis of ``mesh``.

    Example:
        >>> import jax, jax.numpy as jnp, kopt
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> state = kopt.shard_state(kopt.sgd(0.1, momentum=0.9).init(jnp.zeros(8)), mesh, "data")
        >>> tuple(kopt.get_slot(state, "momentum").sharding.spec)
        ('data',)
    """
    return jax.device_put(state, state_sharding(state, mesh, axis_name, params))


def jit_update(
    transformation: GradientTransformation,
    state_shardings: PyTree,
    params_shardings: PyTree | None = None,
    *,
    donate: bool = True,
) -> Callable[[Updates, OptState, Params], tuple[Params, OptState]]:
    """Compiles ``(grads, state, params) -> (new_params, new_state)`` for sharded state.

    ``new_state`` is produced with ``state_shardings`` (from :func:`state_sharding`) and
    ``new_params`` with ``params_shardings``. By default each new param keeps its param's
    sharding, and a param without a mesh sharding (an array on one device) comes back
    replicated over the state's mesh: ZeRO-1 keeps the params replicated. The state is
    donated, so its memory is reused.

    Args:
        transformation: the optimizer.
        state_shardings: the state's shardings, e.g. ``kopt.state_sharding(state, mesh, "data")``.
        params_shardings: the params' shardings (a tree, or one sharding for all), or None for
            the params' own, as above (one program per distinct set of them).
        donate: whether to donate the state buffers to the step.

    Returns:
        The compiled step.

    Raises:
        TypeError: if ``transformation`` has no ``init`` and ``update``.
    """

    check_transformation("jit_update", "`transformation`", transformation)

    def step(grads, state, params):
        updates, state = transformation.update(grads, state, params)
        return apply_updates(params, updates), state

    def compiled(shardings):
        program = jax.jit(
            step, out_shardings=(shardings, state_shardings), donate_argnums=(1,) if donate else ()
        )

        def run(grads, state, params):
            # A state on the host (jax.device_get, a pickle) or on one device goes to its
            # shardings first; one already there is passed as it is.
            return program(grads, jax.device_put(state, state_shardings), params)

        return run

    if params_shardings is not None:
        return compiled(params_shardings)

    meshes = [
        s.mesh
        for s in jax.tree.leaves(state_shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
        if isinstance(s, NamedSharding)
    ]
    replicated = NamedSharding(meshes[0], P()) if meshes else None
    programs: dict[Any, Callable] = {}

    def kept(param):
        if isinstance(param, jax.core.Tracer):  # inside an outer jit: that jit decides
            return None
        sharding = getattr(param, "sharding", None)
        return sharding if isinstance(sharding, NamedSharding) else replicated

    def update(grads, state, params):
        leaves, treedef = jax.tree.flatten(params)
        key = (treedef, tuple(kept(p) for p in leaves))
        program = programs.get(key)
        if program is None:
            program = programs[key] = compiled(treedef.unflatten(key[1]))
        return program(grads, state, params)

    return update


__all__ = ["jit_update", "leaf_sharding", "shard_state", "state_sharding"]
