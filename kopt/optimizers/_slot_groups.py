"""Small slots stored together: one buffer per group, so a step passes a few arrays, not hundreds.

A compiled step pays about a microsecond of dispatch for every array it takes or returns, so an
Adam step over 100 small variables spends more on its 200 slot arrays than on arithmetic. The
facade keeps the slots of small variables in one 1-D buffer per dtype (a :class:`SlotGroup`);
each slot stays a :class:`kopt.Variable` (a :class:`PackedSlot`) whose value is read from, and
written to, its range of the buffer. The step takes the whole buffer, binds each slot to its
slice while it traces, and returns the buffer rebuilt from the slots' new values.
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Any

import jax
import numpy as np

from kopt.transforms._flat import _split
from kopt.variables import Variable, donation_lock

# Slots of at most this many elements are grouped; larger ones cost little per element anyway.
MAX_GROUPED_SIZE = 16384

# At most this many slots share one buffer. XLA:CPU's compile time grows faster than linearly in
# the number of slices taken of one buffer: Adam over 500 variables of 8 elements compiled in
# about 9 s with one group per dtype, against about 3 s in groups of at most 32, and the call
# itself was no slower (a few more buffers to pass).
MAX_GROUP_MEMBERS = 32

# On the CPU, also at most about this many elements. XLA:CPU's compile time grows with the
# members' sizes too: Adam over 100 variables of 10 x 100 compiled in 2.3 s in groups of about
# 15, against 0.7 s in groups of 8, and the call was no slower. Small slots, where grouping
# saves the most per call, still fill their 32 places. Elsewhere each array a call passes costs
# the host a few microseconds, so slots stay in groups of 32 there.
MAX_GROUP_ELEMENTS = 8192

_group_ids = itertools.count()


class PackedSlot(Variable):
    """A slot variable whose value lives in a :class:`SlotGroup`'s buffer."""

    _group: SlotGroup
    _offset: int
    _slot_shape: tuple[int, ...]
    _slot_dtype: Any

    @property
    def _storage(self) -> jax.Array:
        return self._group.read(self)

    @_storage.setter
    def _storage(self, value: Any) -> None:
        self._group.write(self, value)

    # Metadata from the layout: reading it must not slice the buffer.
    @property
    def shape(self) -> tuple[int, ...]:
        return self._slot_shape

    @property
    def dtype(self):
        return self._slot_dtype

    @property
    def ndim(self) -> int:
        return len(self._slot_shape)

    @property
    def size(self) -> int:
        return math.prod(self._slot_shape)

    @property
    def sharding(self):
        return getattr(self._group.buffer, "sharding", None)


# A pytree like any variable; unflattening gives a plain Variable holding the (new) leaf.
jax.tree_util.register_pytree_node(
    PackedSlot,
    lambda s: Variable.tree_flatten(s),
    lambda aux, children: Variable.tree_unflatten(aux, children),
)


class SlotGroup:
    """Slots of one dtype in one 1-D buffer; the members and their order never change."""

    def __init__(self, members: list[Variable]):
        values = [m._storage for m in members]
        self.uid = next(_group_ids)
        # Held weakly: each member holds its group, and the optimizer holds both, so that a
        # group and its slots are freed with the optimizer, without the cycle collector.
        self._members = tuple(weakref.ref(m) for m in members)
        self.sizes = tuple(math.prod(v.shape) for v in values)
        self.offsets = tuple(itertools.accumulate(self.sizes, initial=0))[:-1]
        # Built on the host and placed as the members are (they share a dtype, placement and
        # commitment): eager, a ``ravel`` compiled a program per member shape, hundreds for the
        # first step over a model of many small variables of distinct shapes.
        host = np.concatenate([np.ravel(v) for v in jax.device_get(values)])
        first = values[0]
        self.buffer = (
            jax.device_put(host, first.sharding) if first.committed else jax.device_put(host)
        )
        self._host_copy = (self._buffer, host)
        offset = 0
        for i, (m, v, size) in enumerate(zip(members, values, self.sizes, strict=True)):
            m.__dict__.pop("_storage", None)
            m.__class__ = PackedSlot
            m._group = self
            m._index = i
            m._offset = offset
            m._slot_shape = tuple(v.shape)
            m._slot_dtype = v.dtype
            offset += size

    @property
    def members(self) -> tuple[PackedSlot, ...]:
        """The slots, in the buffer's order (all alive while their optimizer is)."""
        return tuple(ref() for ref in self._members)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        # The buffer as a copy taken under the lock: a step in another thread donates the
        # buffer itself (it is never handed out), which a pickle read later could find deleted.
        with donation_lock:
            _ = self.buffer  # pending writes in first
            buffer = self._placed(self._host().copy())
        state = {**self.__dict__, "_members": self.members, "_buffer": buffer}
        state["_host_copy"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._members = tuple(weakref.ref(m) for m in state["_members"])

    # Reads and writes outside a step slice a host copy of the buffer and place the result
    # back: XLA:CPU takes tens of milliseconds to compile even a slice, and one program per
    # member's shape made the first get_weights or restore of a model with many shapes take
    # seconds. The host copy is kept until the buffer changes; writes wait until it is next read.

    @property
    def buffer(self) -> jax.Array:
        if self._pending:
            with donation_lock:
                host = np.array(self._host())  # a copy to write into
                for i, value in self._pending.items():
                    start = self.offsets[i]
                    host[start : start + self.sizes[i]] = np.ravel(value)
                self._buffer = self._placed(host)
                self._host_copy = (self._buffer, host)
                self._pending = {}
        return self._buffer

    @buffer.setter
    def buffer(self, value: jax.Array) -> None:
        self._buffer = value
        self._host_copy = None
        self._pending = {}

    def _host(self) -> np.ndarray:
        """The current buffer (without pending writes) on the host."""
        cached = self._host_copy
        if cached is None or cached[0] is not self._buffer:
            with donation_lock:
                cached = self._host_copy = (self._buffer, np.asarray(self._buffer))
        return cached[1]

    def read(self, member: PackedSlot) -> jax.Array:
        i = member._index
        value = self._pending.get(i)
        if value is None:
            start = self.offsets[i]
            value = self._host()[start : start + self.sizes[i]].reshape(member.shape)
        return self._placed(value)

    def _placed(self, value: Any) -> jax.Array:
        """``value`` placed as the buffer is: with its sharding if it is committed to one, else
        uncommitted, like a fresh array (committing it would make the next step compile again)."""
        buffer = self._buffer
        if getattr(buffer, "committed", True):
            return jax.device_put(value, buffer.sharding)
        return jax.device_put(value)  # uncommitted; jnp.asarray would compile per shape

    def write(self, member: PackedSlot, value: Any) -> None:
        value = np.asarray(value)
        if tuple(value.shape) != member.shape:
            raise ValueError(
                f"Variable {member.name}: cannot store a value of shape {tuple(value.shape)} in "
                f"a slot of shape {member.shape}"
            )
        self._pending = {**self._pending, member._index: value.astype(self._buffer.dtype)}

    def split(self, buffer: Any) -> list[Any]:
        """The members' values out of ``buffer`` (traced), shaped like the slots."""
        parts = _split(buffer, list(self.sizes))
        return [p.reshape(m.shape) for p, m in zip(parts, self.members, strict=True)]


def group_slots(slots: list[Variable]) -> list[SlotGroup]:
    """Groups the small single-device slots of ``slots`` by dtype and placement, in groups of two
    to ``MAX_GROUP_MEMBERS`` slots (and, on the CPU, about ``MAX_GROUP_ELEMENTS`` elements), of
    about equal sizes."""
    by_dtype: dict[Any, list[Variable]] = {}
    for s in slots:
        value = s._storage
        if (
            type(s) is not Variable
            or not isinstance(value, jax.Array)
            or isinstance(value, jax.core.Tracer)
            or math.prod(value.shape) > MAX_GROUPED_SIZE
            or not isinstance(value.sharding, jax.sharding.SingleDeviceSharding)
        ):
            continue
        by_dtype.setdefault((value.dtype, value.committed, value.sharding), []).append(s)
    groups = []
    for (_, _, sharding), members in by_dtype.items():
        (device,) = sharding.device_set
        cap = MAX_GROUP_ELEMENTS if device.platform == "cpu" else math.inf
        groups.extend(SlotGroup(chunk) for chunk in _chunks(members, cap) if len(chunk) > 1)
    return groups


def _chunks(members: list[Variable], max_elements: float) -> list[list[Variable]]:
    """``members`` in order, cut into runs of at most ``MAX_GROUP_MEMBERS`` members and (unless
    one member alone is larger) about ``max_elements`` elements, the runs about equal."""
    sizes = [math.prod(m._storage.shape) for m in members]
    chunks: list[list[Variable]] = []
    start = 0
    while start < len(members):
        # The members left, shared evenly among as few runs as the caps allow.
        left, elements = len(members) - start, sum(sizes[start:])
        runs = max(-(-left // MAX_GROUP_MEMBERS), math.ceil(elements / max_elements))
        share = elements / runs
        end, filled = start, 0
        # A run ends before a member that would take it past its share by more than half the
        # member's size.
        while end < len(members) and (
            end == start or (end - start < MAX_GROUP_MEMBERS and filled + sizes[end] / 2 <= share)
        ):
            filled += sizes[end]
            end += 1
        chunks.append(members[start:end])
        start = end
    return chunks
