"""Cross-replica gradient aggregation for ``shard_map`` and ``pmap`` code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kopt.base import EmptyState, GradientTransformation
from kopt.sparse import IndexedSlices, is_indexed_slices


def aggregate_gradients(
    axis_name: str | tuple[str, ...], reduction: str = "sum"
) -> GradientTransformation:
    """Sums (or averages) gradients across replicas: the functional twin of Keras's
    ``gradient_aggregator``, which sums across replicas before clipping.

    Use it first in a chain, inside ``shard_map`` or ``pmap`` where ``axis_name`` is bound.
    Sparse gradients are densified before the reduction (replicas name different rows).

    It expects per-replica gradients. Inside ``jax.shard_map`` (which tracks replication by
    default), autodiff already sums the gradient of a replicated param over the mesh axis, and
    reducing it again would count it ``n`` times: differentiate with respect to
    ``jax.lax.pcast(params, axis_name, to="varying")``, or pass ``check_vma=False`` (``pmap``
    and ``vmap`` give per-replica gradients as they are).

    Args:
        axis_name: the mapped axis (or axes) to reduce over.
        reduction: ``"sum"`` (Keras's default) or ``"mean"``.

    Raises:
        TypeError: for an integer ``axis_name`` (alone or in a tuple): ``jax.lax.psum`` reads
            an integer as a positional axis of each gradient, and would sum over it.
        ValueError: for another reduction.

    Example:
        >>> import jax, jax.numpy as jnp, kopt
        >>> tx = kopt.aggregate_gradients("i")
        >>> f = jax.vmap(lambda g: tx.update(g, tx.init(g))[0], axis_name="i")
        >>> f(jnp.array([1.0, 2.0, 3.0]))
        Array([6., 6., 6.], dtype=float32)
    """
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if any(isinstance(n, (int, np.integer)) for n in names):
        raise TypeError(
            f"aggregate_gradients: `axis_name` must name a mapped axis (a str, or a tuple of "
            f"them), received {axis_name!r}: jax.lax.psum reads an integer as a positional "
            "axis of each gradient, and would sum over the gradient's own dimension"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(
            f"aggregate_gradients: `reduction` must be 'sum' or 'mean', received {reduction!r}"
        )
    reduce = jax.lax.psum if reduction == "sum" else jax.lax.pmean

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args

        def one(g):
            if isinstance(g, IndexedSlices):
                if g.dense_shape is None:
                    raise ValueError(
                        "aggregate_gradients: a sparse gradient needs dense_shape to be reduced"
                    )
                g = g.to_dense()
            return reduce(jnp.asarray(g), axis_name)

        return jax.tree.map(one, updates, is_leaf=is_indexed_slices), state

    return GradientTransformation(init_fn, update_fn)
