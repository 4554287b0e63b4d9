"""Keras's weight constraints: callables ``array -> array`` applied after dense updates."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kopt._tree import at_least_float32
from kopt.variables import _value_of

EPSILON = 1e-7


def _in_float32(w: Any) -> tuple[jax.Array, Any]:
    """``w`` in at least float32, and its own dtype to round the result back to. The norm
    constraints compute there: in float16 ``EPSILON`` is subnormal (XLA may flush it to zero,
    so a zero slice divides 0 by 0) and a sum of squares overflows long before the weights."""
    w = jnp.asarray(_value_of(w))
    return at_least_float32(w), w.dtype


class Constraint:
    """Base class: ``__call__(w) -> w`` and ``get_config()``. Any callable works too."""

    def __call__(self, w):
        return w

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Constraint:
        return cls(**config)


class NonNeg(Constraint):
    """Clips weights at 0 from below: ``w * (w >= 0)`` (a negative weight becomes ``-0.0``, as in
    tf.keras).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> kopt.constraints.NonNeg()(jnp.array([-1.0, 2.0]))
        Array([-0.,  2.], dtype=float32)
    """

    def __call__(self, w):
        w = jnp.asarray(_value_of(w))
        return w * (w >= 0.0).astype(w.dtype)


class MaxNorm(Constraint):
    """Rescales slices whose L2 norm along ``axis`` exceeds ``max_value``.

    ``w * clip(norm, 0, max_value) / (epsilon + norm)``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> kopt.constraints.MaxNorm(1.0, axis=0)(jnp.array([[3.0], [4.0]])).round(3)
        Array([[0.6],
               [0.8]], dtype=float32)
    """

    def __init__(self, max_value: float = 2, axis: int | tuple[int, ...] = 0):
        self.max_value = max_value
        self.axis = axis

    def __call__(self, w):
        w, dtype = _in_float32(w)
        norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=self.axis, keepdims=True))
        desired = jnp.clip(norms, 0, self.max_value)
        return (w * (desired / (EPSILON + norms))).astype(dtype)

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class UnitNorm(Constraint):
    """Scales slices along ``axis`` to unit L2 norm: ``w / (epsilon + norm)``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> kopt.constraints.UnitNorm(axis=0)(jnp.array([[3.0], [4.0]])).round(3)
        Array([[0.6],
               [0.8]], dtype=float32)
    """

    def __init__(self, axis: int | tuple[int, ...] = 0):
        self.axis = axis

    def __call__(self, w):
        w, dtype = _in_float32(w)
        norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=self.axis, keepdims=True))
        return (w / (EPSILON + norms)).astype(dtype)

    def get_config(self):
        return {"axis": self.axis}


class MinMaxNorm(Constraint):
    """Keeps slice norms along ``axis`` between ``min_value`` and ``max_value``, moving a fraction
    ``rate`` of the way there each time.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> c = kopt.constraints.MinMaxNorm(min_value=1.0, max_value=2.0)
        >>> c(jnp.array([[0.3], [0.4]])).round(3)  # norm 0.5 raised to 1
        Array([[0.6],
               [0.8]], dtype=float32)
    """

    def __init__(
        self,
        min_value: float = 0.0,
        max_value: float = 1.0,
        rate: float = 1.0,
        axis: int | tuple[int, ...] = 0,
    ):
        self.min_value = min_value
        self.max_value = max_value
        self.rate = rate
        self.axis = axis

    def __call__(self, w):
        w, dtype = _in_float32(w)
        norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=self.axis, keepdims=True))
        desired = (
            self.rate * jnp.clip(norms, self.min_value, self.max_value) + (1 - self.rate) * norms
        )
        return (w * (desired / (EPSILON + norms))).astype(dtype)

    def get_config(self):
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rate": self.rate,
            "axis": self.axis,
        }


_ALIASES = {
    "nonneg": NonNeg,
    "non_neg": NonNeg,
    "maxnorm": MaxNorm,
    "max_norm": MaxNorm,
    "unitnorm": UnitNorm,
    "unit_norm": UnitNorm,
    "minmaxnorm": MinMaxNorm,
    "min_max_norm": MinMaxNorm,
}


def get(identifier: Any) -> Any:
    """A constraint from a name (``"non_neg"``, ``"max_norm"``, ...), a config dict
    ``{"class_name": ..., "config": ...}``, a callable, or None.

    Raises:
        ValueError: for an unknown name or a value that is none of these.

    Example:
        >>> import kopt
        >>> type(kopt.constraints.get("max_norm")).__name__
        'MaxNorm'
    """
    if identifier is None or callable(identifier):
        return identifier
    if isinstance(identifier, str):
        cls = _ALIASES.get(identifier.lower())
        if cls is None:
            raise ValueError(
                f"constraints.get: unknown constraint {identifier!r}; known: {sorted(_ALIASES)}"
            )
        return cls()
    if isinstance(identifier, dict) and "class_name" in identifier:
        cls = _ALIASES.get(identifier["class_name"].lower())
        if cls is None:
            raise ValueError(f"constraints.get: unknown constraint {identifier['class_name']!r}")
        return cls.from_config(identifier.get("config", {}))
    raise ValueError(f"constraints.get: could not interpret constraint identifier {identifier!r}")


__all__ = ["Constraint", "MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm", "get"]
