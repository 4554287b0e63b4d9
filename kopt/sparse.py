"""Row-sparse gradients: :class:`IndexedSlices` and the helpers the sparse rules share."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@jax.tree_util.register_pytree_node_class
class IndexedSlices:
    """The rows of a sparse gradient, as an embedding lookup produces them.

    ``values[i]`` is the gradient of row ``indices[i]`` of a table of shape ``dense_shape``.
    Indices may repeat: optimizers sum duplicates before any non-linear slot update, as Keras
    does. A row index outside ``[0, num_rows)``, negative ones included, names no row: its
    values are ignored by every update (a compiled step cannot raise, as tf.keras's kernels
    do; negative indices do not count from the end). It is a pytree (``values`` and
    ``indices`` are its leaves), so it passes through ``jax.jit`` and can stand in a gradient
    tree in place of a dense array for kopt's transformations.

    An optax transformation (or another library's) knows no IndexedSlices: it sees the
    integer ``indices`` as one more gradient leaf and changes them as it changes gradients.
    ``optax.clip(3)`` turns the row 5 into row 3 and ``optax.scale(2)`` sends it past the
    table, where it is dropped, with no error; indices made floats (``optax.scale(0.5)``) are
    refused by the kopt piece after it, or by ``table + slices``, naming them. Chain optax
    pieces with :func:`kopt.chain`, which hands them the dense gradient, not with
    ``optax.chain``, or give them ``to_dense()``.

    ``table + slices`` adds the rows to a dense ``table`` (duplicates summed, a row outside
    the table dropped), in the dtype ``table + slices.to_dense()`` has, so
    ``optax.apply_updates`` and flax's ``TrainState.apply_gradients`` take a sparse update.

    Args:
        values: array of shape ``[n, *dense_shape[1:]]``.
        indices: integer array of shape ``[n]``.
        dense_shape: the shape of the dense table, or None to take it from the param.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> g = kopt.IndexedSlices(jnp.ones((2, 3)), jnp.array([0, 4]), (5, 3))
        >>> g.to_dense().sum(axis=1)
        Array([3., 0., 0., 0., 3.], dtype=float32)
    """

    def __init__(self, values: Any, indices: Any, dense_shape: Any = None):
        # Python lists of rows and of indices as arrays (float32 rows), as TensorFlow converts
        # them.
        self.values = jnp.asarray(values) if isinstance(values, list | tuple) else values
        if isinstance(indices, list | tuple):
            indices = np.asarray(indices) if len(indices) else np.zeros(0, np.int32)
        self.indices = _wide_enough(indices)
        self.dense_shape = None if dense_shape is None else tuple(int(d) for d in dense_shape)

    def tree_flatten(self):
        return (self.values, self.indices), self.dense_shape

    @classmethod
    def tree_unflatten(cls, dense_shape, children):
        obj = object.__new__(cls)
        obj.values, obj.indices = children
        obj.dense_shape = dense_shape
        return obj

    @property
    def dtype(self):
        return self.values.dtype

    # NumPy hands ``array + slices`` to __radd__ rather than making an array of objects.
    __array_ufunc__ = None

    def __radd__(self, other: Any) -> Any:
        """``table + slices``: ``table`` with the rows added (duplicates summed, a row outside
        the table dropped), as :func:`kopt.apply_updates` adds them, so that
        ``optax.apply_updates`` and flax's ``TrainState.apply_gradients`` take a sparse update.
        The result has the dtype of ``table + slices.to_dense()``."""
        if not (hasattr(other, "shape") and hasattr(other, "dtype")):
            return NotImplemented  # a Python number, another IndexedSlices: no table
        return _plus_table(self, other)

    __add__ = __radd__

    def __repr__(self) -> str:
        return (
            f"IndexedSlices(values={self.values!r}, indices={self.indices!r}, "
            f"dense_shape={self.dense_shape})"
        )

    def to_dense(self, shape: tuple[int, ...] | None = None) -> jax.Array:
        """The dense gradient: duplicate rows summed, absent rows zero."""
        shape = shape or self.dense_shape
        if shape is None:
            raise ValueError("IndexedSlices.to_dense: dense_shape is unknown; pass `shape`")
        zeros = jnp.zeros(shape, self.values.dtype, out_sharding=_whole_rows_sharding(self.values))
        return scatter_add_rows(zeros, in_range(self.indices, shape[0]), self.values)


def _plus_table(u: IndexedSlices, table: Any) -> jax.Array:
    from kopt._tree import check_rows_fit  # here: kopt._tree imports this module

    table = jnp.asarray(table)
    check_rows_fit("sparse update", u, tuple(table.shape), "IndexedSlices + array")
    wide = jnp.result_type(table, u.values)
    if wide == table.dtype:
        indices = in_range(u.indices, table.shape[0])
        return scatter_add_rows(table, indices, u.values.astype(wide))
    # Rows wider than the table (float32 updates of a float16 one): the sum is taken in the
    # wider dtype, duplicates first, as the dense sum is (optax then rounds it to the param's).
    d = deduplicate(u, table.shape[0])
    return scatter_add_rows(table.astype(wide), d.indices, d.values.astype(wide))


def map_values(fn: Any, g: Any) -> Any:
    """Applies ``fn`` to a dense gradient or to the values (rows) of an IndexedSlices."""
    if isinstance(g, IndexedSlices):
        return IndexedSlices(fn(g.values), g.indices, g.dense_shape)
    return fn(g)


def is_indexed_slices(x: Any) -> bool:
    """True for an :class:`IndexedSlices`."""
    return isinstance(x, IndexedSlices)


def _wide_enough(indices: Any) -> Any:
    """Indices of an integer type narrower than 32 bits (uint8, int16) as int32: the updates
    mark a row outside the table with the index ``num_rows``, which such a type may not hold
    (300 is 44 in uint8, so a dropped row would land on row 44)."""
    dtype = getattr(indices, "dtype", None)
    if dtype is None or not np.issubdtype(dtype, np.integer) or np.dtype(dtype).itemsize >= 4:
        return indices  # other kinds are refused, naming them, when used
    if isinstance(indices, np.ndarray | np.generic):
        return np.asarray(indices, np.int32)
    return indices.astype(jnp.int32)


def in_range(indices: jax.Array, num_rows: int) -> jax.Array:
    """``indices`` with every one outside ``[0, num_rows)`` (negative ones too) replaced by
    ``num_rows``, which scatters drop. JAX's scatters would otherwise count a negative index
    from the end, and ``jnp.take`` would clamp it to row 0."""
    indices = jnp.asarray(indices)
    return jnp.where((indices < 0) | (indices >= num_rows), num_rows, indices)


def deduplicate(grad: IndexedSlices, num_rows: int) -> IndexedSlices:
    """Sums the values of repeated indices.

    The result has as many rows as ``grad`` (static shapes); the unused tail, and every index
    outside ``[0, num_rows)``, has index ``num_rows`` (out of range, dropped by scatters).
    """
    n = grad.indices.shape[0]
    indices = in_range(_whole_rows(grad.indices), num_rows)
    unique, inverse = jnp.unique(indices, size=n, fill_value=num_rows, return_inverse=True)
    values = _whole_rows(grad.values)
    # A scatter into zeros split as the values are (jax.ops.segment_sum's own zeros are
    # replicated, which Explicit axes refuse beside values split along other axes).
    summed = scatter_add_rows(jnp.zeros_like(values), inverse.reshape(-1), values)
    return IndexedSlices(summed, unique, grad.dense_shape)


def _explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """``x``'s sharding where its mesh has Explicit axes, else None (one device, Auto axes, or
    inside ``shard_map``). Over Explicit axes JAX asks a gather or a scatter on a split axis
    for its output's sharding (``out_sharding=``) instead of choosing one."""
    sharding = jax.typeof(x).sharding
    return sharding if sharding.mesh.explicit_axes else None


def _whole_rows_sharding(x: jax.Array) -> NamedSharding | None:
    """Over Explicit mesh axes, ``x``'s sharding with the first axis whole on every device (the
    others split as in ``x``); None otherwise."""
    sharding = _explicit_sharding(x)
    if sharding is None:
        return None
    return NamedSharding(sharding.mesh, P(None, *sharding.spec[1:]))


def _whole_rows(x: jax.Array) -> jax.Array:
    """``x`` with its first axis whole on every device where Explicit mesh axes split it: the
    sort that finds duplicate indices needs all of them (Auto axes gather them implicitly)."""
    sharding = _whole_rows_sharding(x)
    if sharding is None or sharding.spec == jax.typeof(x).sharding.spec:
        return x
    return jax.sharding.reshard(x, sharding)


def gather_rows(table: jax.Array, indices: jax.Array) -> jax.Array:
    """``table[indices]``, clamping out-of-range indices (their results are later dropped).

    Over Explicit mesh axes the rows are whole on every device (however ``table``'s rows are
    split) and split along the other axes as ``table`` is.
    """
    if table.shape[0] == 0:  # no row to clamp to (an empty table): every index is dropped
        return jnp.zeros(jnp.shape(indices) + table.shape[1:], table.dtype)
    return table.at[indices].get(
        mode="clip", wrap_negative_indices=False, out_sharding=_whole_rows_sharding(table)
    )


def scatter_rows(table: jax.Array, indices: jax.Array, rows: jax.Array) -> jax.Array:
    """``table`` with ``rows`` written at ``indices``; out-of-range indices are dropped. The
    result keeps ``table``'s sharding."""
    return table.at[indices].set(
        rows.astype(table.dtype), mode="drop", out_sharding=_explicit_sharding(table)
    )


def scatter_add_rows(table: jax.Array, indices: jax.Array, rows: jax.Array) -> jax.Array:
    """``table`` with ``rows`` added at ``indices`` (repeats add up); out-of-range indices are
    dropped. The result keeps ``table``'s sharding."""
    return table.at[indices].add(rows, mode="drop", out_sharding=_explicit_sharding(table))


def as_dense(g: Any, shape: tuple[int, ...]) -> Any:
    """A dense gradient: an :class:`IndexedSlices` is scattered (duplicates summed)."""
    if isinstance(g, IndexedSlices):
        return g.to_dense(tuple(shape))
    return g
