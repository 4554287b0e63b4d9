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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kopt.base import GradientTransformation, OptState, Params, PyTree, Updates, apply_updates


def _axis_size(mesh: Mesh, axis_name: str | tuple[str, ...]) -> int:
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
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
    size = _axis_size(mesh, axis_name)
    candidates = [d for d, n in enumerate(shape) if n % size == 0 and n >= size]
    if not candidates:
        return NamedSharding(mesh, P())
    dim = max(candidates, key=lambda d: (shape[d], -d))
    spec = [None] * len(shape)
    spec[dim] = axis_name
    return NamedSharding(mesh, P(*spec))


def state_sharding(
    state: OptState,
    mesh: Mesh,
    axis_name: str | tuple[str, ...],
    params: Params | None = None,
) -> PyTree:
    """The ZeRO-1 shardings of an optimizer state: a tree of ``NamedSharding`` shaped like it.

    Every array leaf shaped like a param (the slots ``m``, ``v``, ..., accumulated gradients, EMA
    averages) is split over ``axis_name`` along its largest divisible dimension (see
    :func:`leaf_sharding`); scalars (step counts, hyperparameters) are replicated. Without
    ``params`` every leaf of rank 1 or more counts as param-shaped; pass ``params`` for an
    optimizer with factored statistics (Adafactor's ``r`` and ``c``, which are combined by an
    outer product that two sharded vectors cannot form under an explicit mesh): they then stay
    replicated (they are small).

    Args:
        state: an optimizer state, or its ``jax.eval_shape``.
        mesh: the device mesh.
        axis_name: the data-parallel mesh axis (or a tuple of axes).
        params: the params (or their shapes); only leaves with a param's shape are split.

    Returns:
        A tree of ``NamedSharding`` with the state's structure, usable as ``out_shardings``.

    Raises:
        ValueError: if ``axis_name`` is not an axis of ``mesh``.
    """
    _axis_size(mesh, axis_name)
    param_shapes = (
        None if params is None else {tuple(jnp.shape(p)) for p in jax.tree.leaves(params)}
    )

    def one(leaf):
        shape = tuple(jnp.shape(leaf))
        if param_shapes is not None and shape not in param_shapes:
            return NamedSharding(mesh, P())
        return leaf_sharding(shape, mesh, axis_name)

    return jax.tree.map(one, state)


def shard_state(
    state: OptState,
    mesh: Mesh,
    axis_name: str | tuple[str, ...],
    params: Params | None = None,
) -> OptState:
    """Returns ``state`` placed with the ZeRO-1 shardings of :func:`state_sharding`.

    Each device then holds ``1 / mesh.shape[axis_name]`` of every param-shaped slot whose largest
    dimension the axis size divides, whatever the params' sharding (typically replicated).

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
    """

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
