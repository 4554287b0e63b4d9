"""``pack``: params kept in one buffer per dtype, so a step passes a few arrays, not hundreds."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kopt._tree import check_floating_params
from kopt.base import PyTree, as_count
from kopt.transforms._flat import FlatLayout, make_layout

__all__ = ["Packed", "pack"]


@jax.tree_util.register_pytree_with_keys_class
class Packed:
    """A tree of params stored as one 1-D buffer per dtype (plus any leaves left loose).

    Made by :func:`pack`. It is a pytree whose leaves are the buffers, so every optimizer,
    ``jax.grad``, ``jax.jit`` and :func:`kopt.apply_updates` see a few large arrays: the
    gradient of a loss taken with respect to a ``Packed`` is a ``Packed`` of the same layout,
    an optimizer's slots are ``Packed`` too, and :meth:`unpack` gives any of them back shaped
    like the original tree.

    Where flax is installed, ``flax.serialization`` saves a ``Packed`` (or a state holding
    one) as the tree it was packed from, and restores into a ``Packed`` target by packing the
    saved tree in the target's layout: a checkpoint of packed params restores into params
    packed with another ``max_leaf_size``, or not packed, and back.

    Attributes:
        buffers: ``{key: array}``: ``"packed <dtype>"`` for each packed buffer, the leaf's path
            for each loose leaf.
        layout: where each original leaf lives (static).
    """

    __slots__ = ("buffers", "layout")

    def __init__(self, buffers: dict[str, Any], layout: FlatLayout):
        self.buffers = buffers
        self.layout = layout

    def unpack(self) -> PyTree:
        """The tree this was packed from (inside ``jit``: slices and reshapes of the buffers)."""
        return self.layout.unpack(self.buffers)

    def tree_flatten(self):  # on every jitted call: kept short
        buffers = self.buffers
        return [buffers[key] for key in self.layout.keys], self.layout

    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.DictKey(key), self.buffers[key]) for key in self.layout.keys]
        return children, self.layout

    @classmethod
    def tree_unflatten(cls, layout: FlatLayout, children) -> Packed:
        return cls(dict(zip(layout.keys, children, strict=True)), layout)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{key!r}: {getattr(b, 'dtype', type(b).__name__)}{list(jnp.shape(b))}"
            if hasattr(b, "shape")
            else f"{key!r}: {b!r}"
            for key, b in self.buffers.items()
        )
        return f"Packed({len(self.layout.shapes)} leaves in {{{parts}}})"


@functools.cache
def _register_with_flax() -> None:
    """Lets ``flax.serialization`` save and restore a :class:`Packed` (as its unpacked tree),
    where flax is installed; kopt does not depend on flax, so it is imported only here."""
    try:
        from flax import serialization
    except ImportError:
        return
    if serialization.is_serializable(Packed):
        return

    def to_state_dict(packed: Packed) -> Any:
        return serialization.to_state_dict(packed.unpack())

    def from_state_dict(target: Packed, state: Any) -> Packed:
        tree = serialization.from_state_dict(target.unpack(), state)
        return Packed(target.layout.pack(tree, "pack", "param"), target.layout)

    serialization.register_serialization_state(Packed, to_state_dict, from_state_dict)


# Packing every leaf pays on a GPU (benchmarks/RESULTS.md, the training-step block: an MLP's
# whole Adam step took 0.32-0.45x optax's time with every leaf packed, and was never slower
# than with large kernels loose). On the CPU it does not: XLA:CPU's matrix products run slower
# on operands sliced out of a buffer, so large leaves stay loose there. Other platforms are
# unmeasured and keep the CPU's conservative default.
CPU_MAX_LEAF_SIZE = 16384
_PACK_EVERYTHING_ON = frozenset({"gpu"})


def auto_max_leaf_size(params: PyTree) -> int | None:
    """``max_leaf_size="auto"``: None (pack every leaf) when the params live on GPUs, else
    16,384. The params' own devices decide; under a trace, or for host arrays, JAX's default
    backend does."""
    platforms = set()
    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            platforms.update(d.platform for d in leaf.devices())
    if not platforms:
        platforms = {jax.default_backend()}
    return None if platforms <= _PACK_EVERYTHING_ON else CPU_MAX_LEAF_SIZE


def pack(params: PyTree, max_leaf_size: int | str | None = "auto") -> Packed:
    """Stores ``params`` as one 1-D buffer per dtype: a step then moves a few arrays.

    A jitted step over many small leaves spends its time on arrays, not arithmetic: every
    array passed in or out of a compiled call costs about a microsecond of dispatch on the
    host, and on a GPU each leaf is also a kernel launch (``benchmarks/RESULTS.md``).
    :func:`kopt.flatten` packs the optimizer's slots; ``pack`` packs the params themselves, so
    the params, their gradient and every slot are a few buffers end to end. The model reads
    its params through :meth:`Packed.unpack` inside the loss::

        packed = kopt.pack(params)
        state = tx.init(packed)

        @jax.jit
        def train_step(packed, state, batch):
            grads = jax.grad(lambda p: loss(p.unpack(), batch))(packed)   # a Packed
            updates, state = tx.update(grads, state, packed)
            return kopt.apply_updates(packed, updates), state

    The unpacked leaves are slices of the buffers, and their gradients are written into one
    buffer again: a copy of the params and of the gradient per step, which is what a few
    large leaves trade for hundreds of small ones. Leaves larger than ``max_leaf_size``, and
    leaves split over several devices, stay loose (as their own arrays, keeping their
    sharding; under ``jax.jit`` on a mesh with Auto axes a traced leaf shows no sharding, and
    a small split one is packed, replicated: pack outside ``jit`` there). The default,
    ``"auto"``, decides by where the params live:

    - on GPUs it packs every leaf. There each leaf is a kernel launch, and a whole Adam
      training step of an MLP took 0.32x optax's time at 1M params in 100 leaves and 0.45x at
      10M in 1,000 with every leaf packed, against 0.62x and 0.52x with large kernels loose;
    - elsewhere it packs leaves of at most 16,384 elements. On a 2-core CPU, packing a
      300 x 300 kernel made an MLP's training step slower, since XLA's matrix products run
      slower there on operands sliced out of a buffer than on the step's own input buffers.

    Only for optimizers that treat every element alike, as with :func:`kopt.flatten`:
    per-leaf pieces (:func:`kopt.clip_by_norm`, :func:`kopt.lamb`, :func:`kopt.adafactor`,
    masks and labels by leaf) would see the buffers as the leaves; the first three refuse a
    ``Packed`` with a packed buffer (``ValueError``).
    The state keeps its slots ``Packed`` like the params; :func:`kopt.get_slot` returns them
    unpacked, shaped like the original tree.

    Args:
        params: a tree of floating-point arrays.
        max_leaf_size: leaves of more elements stay loose; None packs every leaf; ``"auto"``
            (the default) is None on GPUs and 16,384 elsewhere.

    Returns:
        A :class:`Packed`.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
        >>> packed = kopt.pack(params)
        >>> packed
        Packed(2 leaves in {'packed float32': float32[9]})
        >>> tx = kopt.sgd(learning_rate=0.5, momentum=0.9)
        >>> state = tx.init(packed)
        >>> grads = kopt.pack({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
        >>> updates, state = tx.update(grads, state, packed)
        >>> kopt.apply_updates(packed, updates).unpack()["b"]
        Array([-0.5, -0.5, -0.5], dtype=float32)
    """
    owner = "pack"
    count = as_count(max_leaf_size)
    if not (
        max_leaf_size is None
        or (isinstance(max_leaf_size, str) and max_leaf_size == "auto")
        or (count is not None and count >= 0)
    ):
        raise ValueError(
            f'{owner}: `max_leaf_size` must be "auto", None or an int >= 0, received '
            f"{max_leaf_size!r}"
        )
    if isinstance(params, Packed):
        raise TypeError(f"{owner}: `params` is already a Packed")
    check_floating_params(params, owner)
    if isinstance(max_leaf_size, str):  # "auto"
        max_leaf_size = auto_max_leaf_size(params)
    elif count is not None:
        max_leaf_size = count
    layout = make_layout(params, max_leaf_size)
    _register_with_flax()
    return Packed(layout.pack(params, owner, "param"), layout)
