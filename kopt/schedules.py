"""Learning-rate schedules as pure, jittable functions of the step (Keras formulas and names).

Each factory returns ``schedule(step) -> float32 scalar``; pass it as any optimizer's
``learning_rate`` (or other float hyperparameter). The step is the number of updates applied
so far, cast to float32, as Keras's optimizers pass it. The class versions with configs live in
:mod:`kopt.optimizers.schedules` and call these.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Schedule = Callable[[jax.Array], jax.Array]


def _is_real(value) -> bool:
    """A real number, as Keras takes one: a Python or NumPy int or float, or a 0-d array of one
    (``np.float32(0.1)``, ``np.int64(1000)``, ``jnp.asarray(0.1)``, a traced value when the
    schedule is built inside ``jit``, ``vmap`` or ``grad``); not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    dtype = getattr(value, "dtype", None)
    return (
        getattr(value, "shape", None) == ()
        and dtype is not None
        and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
    )


def _computes_with_tensorflow(schedule: Any) -> bool:
    """Whether ``schedule`` is a tf.keras (TensorFlow) schedule, whose operations take no JAX
    value: an instance of a class from ``tf_keras`` or ``tensorflow``, or from a Keras 2
    ``keras`` (the one TensorFlow 2.15 and earlier install)."""
    for cls in type(schedule).__mro__:
        package = cls.__module__.partition(".")[0]
        if package in ("tf_keras", "tensorflow") or (
            package == "keras"
            and str(getattr(sys.modules.get("keras"), "__version__", "")).startswith("2.")
        ):
            return True
    return False


def _positive(owner: str, name: str, value: float) -> None:
    """Raises unless ``value`` is a number > 0 (a traced one is checked for its type only)."""
    if not _is_real(value) or (not isinstance(value, jax.core.Tracer) and not value > 0):
        raise ValueError(f"{owner}: `{name}` must be a number > 0, received {value!r}")


def _number(owner: str, name: str, value: float) -> None:
    if not _is_real(value):
        raise TypeError(f"{owner}: `{name}` must be a number, received {type(value).__name__}")


def _const(value) -> jax.Array:
    """A float32 constant XLA cannot fold: XLA:CPU rewrites ``x / c`` as ``x * (1 / c)`` for a
    compile-time constant ``c``, which is not what Keras computes (``50 / 50`` would not be 1)."""
    return jax.lax.optimization_barrier(jnp.asarray(value, jnp.float32))


def _quotient(s: jax.Array, d: jax.Array) -> jax.Array:
    """``s / d``, the float32 quotient rounded once, as Keras divides the step. XLA:CPU divides
    an array by a scalar (``d`` broadcast over an array of steps, or over the step under
    ``vmap``) by multiplying with the scalar's reciprocal, which rounds twice and can land just
    below a whole quotient (``97 * (1 / 97) < 1``) or on the other side of one (``9 / 0.3``);
    ``_const`` cannot stop that. ``d + 0 * s`` is a divisor of the step's own shape, which XLA
    divides by as it is."""
    return s / (d + 0.0 * s)


def _floor_quotient(s: jax.Array, d: jax.Array) -> jax.Array:
    """``floor(s / d)`` of the float32 quotient, as Keras's staircase and restarts floor it."""
    return jnp.floor(_quotient(s, d))


# How close (relative, two float32 roundings) a step may come to a period's computed
# first step in cosine_decay_restarts and count as in that period.
_BOUND_SLACK = 1.0 - 2.0**-23


def _step(step) -> jax.Array:
    """The step as float32. A NumPy or Python integer goes through float64 first: made a JAX
    array as it is, an int64 step past ``2**31`` would wrap to a negative int32 (x64 off)."""
    if isinstance(step, (int, np.integer)) or (
        isinstance(step, np.ndarray) and np.issubdtype(step.dtype, np.integer)
    ):
        step = np.asarray(step, np.float64)
    return jnp.asarray(step).astype(jnp.float32)


def exponential_decay(
    initial_learning_rate: float, decay_steps: float, decay_rate: float, staircase: bool = False
) -> Schedule:
    r"""``initial_learning_rate * decay_rate ** (step / decay_steps)`` (floored exponent with
    ``staircase``).

    Example:
        >>> from kopt import schedules
        >>> fn = schedules.exponential_decay(1.0, decay_steps=10, decay_rate=0.5)
        >>> float(fn(20))
        0.25
    """
    owner = "exponential_decay"
    _number(owner, "initial_learning_rate", initial_learning_rate)
    _positive(owner, "decay_steps", decay_steps)
    _number(owner, "decay_rate", decay_rate)

    def schedule(step):
        s, d = _step(step), _const(decay_steps)
        p = _floor_quotient(s, d) if staircase else s / d
        return _const(initial_learning_rate) * _const(decay_rate) ** p

    return schedule


def piecewise_constant_decay(boundaries: Sequence[float], values: Sequence[float]) -> Schedule:
    r"""``values[0]`` up to and including ``boundaries[0]``, ``values[i]`` on
    ``(boundaries[i-1], boundaries[i]]``, ``values[-1]`` after the last boundary.

    Raises:
        TypeError: if ``boundaries`` or ``values`` is not a sequence of numbers.
        ValueError: unless ``len(boundaries) == len(values) - 1``, or if concrete
            ``boundaries`` do not increase strictly (as tf.keras requires).

    Example:
        >>> from kopt import schedules
        >>> fn = schedules.piecewise_constant_decay([5, 10], [1.0, 0.5, 0.1])
        >>> [float(fn(s)) for s in (5, 6, 11)]
        [1.0, 0.5, 0.10000000149011612]
    """
    owner = "piecewise_constant_decay"
    given = {"boundaries": boundaries, "values": values}
    for name, seq in given.items():
        try:
            items = list(seq)
        except TypeError:
            raise TypeError(
                f"{owner}: `{name}` must be a sequence of numbers, received "
                f"{type(seq).__name__}: {seq!r:.80}"
            ) from None
        bad = [x for x in items if not _is_real(x)]
        if bad:
            raise TypeError(
                f"{owner}: `{name}` must be a sequence of numbers, received "
                f"{type(bad[0]).__name__} {bad[0]!r:.80} in it"
            )
        given[name] = items
    boundaries, values = given["boundaries"], given["values"]
    if len(boundaries) != len(values) - 1:
        raise ValueError(
            f"{owner}: the length of `boundaries` should be 1 less than the "
            f"length of `values`; received {len(boundaries)} boundaries and {len(values)} values"
        )
    if not any(isinstance(x, jax.core.Tracer) for x in boundaries) and any(
        not a < b for a, b in zip(boundaries, boundaries[1:], strict=False)
    ):
        raise ValueError(
            f"{owner}: `boundaries` must increase strictly, received "
            f"{[float(x) for x in boundaries]}"
        )
    b = jnp.asarray(boundaries, jnp.float32)
    v = jnp.asarray(values, jnp.float32)

    def schedule(step):  # (an array of steps: each step's value)
        return v[jnp.sum(_step(step)[..., None] > b, axis=-1)]

    return schedule


def polynomial_decay(
    initial_learning_rate: float,
    decay_steps: float,
    end_learning_rate: float = 0.0001,
    power: float = 1.0,
    cycle: bool = False,
) -> Schedule:
    r"""``(initial - end) * (1 - step / decay_steps) ** power + end``; the step is capped at
    ``decay_steps``, or with ``cycle`` the horizon grows to the next multiple of ``decay_steps``.

    Example:
        >>> from kopt import schedules
        >>> fn = schedules.polynomial_decay(1.0, 10, end_learning_rate=0.0)
        >>> float(fn(5)), float(fn(50))
        (0.5, 0.0)
    """
    owner = "polynomial_decay"
    _number(owner, "initial_learning_rate", initial_learning_rate)
    _positive(owner, "decay_steps", decay_steps)
    _number(owner, "end_learning_rate", end_learning_rate)
    _number(owner, "power", power)

    def schedule(step):
        s = _step(step)
        horizon = _const(decay_steps)
        if cycle:  # ceil(s / d) = -floor(-s / d)
            horizon = horizon * jnp.where(s == 0, 1.0, -_floor_quotient(-s, horizon))
        else:
            s = jnp.minimum(s, horizon)
        p = jnp.where(s == horizon, 1.0, s / horizon)  # exactly 1 at the end, also under vmap
        span = _const(initial_learning_rate) - _const(end_learning_rate)
        return span * (1 - p) ** _const(power) + _const(end_learning_rate)

    return schedule


def inverse_time_decay(
    initial_learning_rate: float, decay_steps: float, decay_rate: float, staircase: bool = False
) -> Schedule:
    r"""``initial_learning_rate / (1 + decay_rate * step / decay_steps)`` (floored with
    ``staircase``).

    Example:
        >>> from kopt import schedules
        >>> float(schedules.inverse_time_decay(1.0, 1, 0.5)(2))
        0.5
    """
    owner = "inverse_time_decay"
    _number(owner, "initial_learning_rate", initial_learning_rate)
    _positive(owner, "decay_steps", decay_steps)
    _number(owner, "decay_rate", decay_rate)

    def schedule(step):
        s, d = _step(step), _const(decay_steps)
        p = _floor_quotient(s, d) if staircase else s / d
        return _const(initial_learning_rate) / (1.0 + _const(decay_rate) * p)

    return schedule


def cosine_decay(
    initial_learning_rate: float,
    decay_steps: float,
    alpha: float = 0.0,
    warmup_target: float | None = None,
    warmup_steps: float = 0,
) -> Schedule:
    r"""Cosine decay from ``initial_learning_rate`` (or, after a linear warmup, from
    ``warmup_target``) to ``alpha`` times that value over ``decay_steps``.

    Without warmup: ``lr0 * ((1 - alpha) * 0.5 * (1 + cos(pi * min(step, D) / D)) + alpha)``.
    With ``warmup_target``: linear from ``lr0`` to ``warmup_target`` over ``warmup_steps``, then
    the cosine from ``warmup_target`` (``warmup_steps`` is ignored when ``warmup_target`` is None,
    as in Keras).

    Example:
        >>> from kopt import schedules
        >>> fn = schedules.cosine_decay(0.01, 100, warmup_target=0.1, warmup_steps=10)
        >>> [round(float(fn(s)), 4) for s in (0, 5, 10, 60, 110)]
        [0.01, 0.055, 0.1, 0.05, 0.0]
    """
    owner = "cosine_decay"
    _number(owner, "initial_learning_rate", initial_learning_rate)
    _positive(owner, "decay_steps", decay_steps)
    _number(owner, "alpha", alpha)
    pi = _const(math.pi)
    one_minus_alpha = _const(1 - alpha)

    def decayed(s, start):
        cosine = 0.5 * (1.0 + jnp.cos(pi * (s / _const(decay_steps))))
        return start * (one_minus_alpha * cosine + _const(alpha))

    if warmup_target is None:
        return lambda step: decayed(
            jnp.minimum(_step(step), _const(decay_steps)), _const(initial_learning_rate)
        )
    _number(owner, "warmup_target", warmup_target)
    _number(owner, "warmup_steps", warmup_steps)

    def schedule(step):
        w = _const(warmup_steps)
        s = jnp.minimum(_step(step), _const(decay_steps) + w)
        lr0, target = _const(initial_learning_rate), _const(warmup_target)
        warm = (target - lr0) * (s / jnp.where(w > 0, w, 1.0)) + lr0
        return jnp.where(s < w, warm, decayed(s - w, target))

    return schedule


def cosine_decay_restarts(
    initial_learning_rate: float,
    first_decay_steps: float,
    t_mul: float = 2.0,
    m_mul: float = 1.0,
    alpha: float = 0.0,
) -> Schedule:
    r"""Cosine decay with warm restarts (SGDR, Loshchilov and Hutter, 2017).

    Period ``i`` lasts ``first_decay_steps * t_mul**i`` steps and starts from
    ``initial_learning_rate * m_mul**i``.

    Example:
        >>> from kopt import schedules
        >>> fn = schedules.cosine_decay_restarts(1.0, 10, t_mul=2.0, m_mul=0.5)
        >>> [round(float(fn(s)), 4) for s in (0, 5, 10, 20, 30)]
        [1.0, 0.5, 0.5, 0.25, 0.25]
    """
    owner = "cosine_decay_restarts"
    _number(owner, "initial_learning_rate", initial_learning_rate)
    _positive(owner, "first_decay_steps", first_decay_steps)
    _positive(owner, "t_mul", t_mul)
    _number(owner, "m_mul", m_mul)
    _number(owner, "alpha", alpha)
    pi = _const(math.pi)
    t = _const(t_mul)
    a = _const(alpha)

    def equal_periods(s, d):
        # The restart is the floor of the fraction itself: past 2**24 steps the rounded
        # quotient can be the next whole number, and the fraction stays in [0, 1).
        fraction = _quotient(s, d)
        restart = jnp.floor(fraction)
        return restart, fraction - restart

    def growing_periods(s, d, t):
        fraction = s / d
        restart = jnp.floor(jnp.log(1.0 - fraction * (1.0 - t)) / jnp.log(t))
        # At a period's first step the quotient of logs can round to just under (or over)
        # the integer; the periods' own bounds settle which period the step is in. Those
        # bounds are float32 sums of powers of a rounded t_mul (1.1 is 1.1000000238), so a
        # bound meant to be a whole step (3310 for 1000 steps and t_mul=1.1) can come out a
        # few roundings past it: a step that close to a bound counts as past it.

        def done(r):  # steps in the first r periods, in units of first_decay_steps
            return (1.0 - t**r) / (1.0 - t)

        def reached(r):  # (a negative step's bounds are negative: the slack is below them too)
            bound = done(r)
            return fraction >= jnp.where(bound > 0, bound * _BOUND_SLACK, bound / _BOUND_SLACK)

        restart = jnp.where(reached(restart + 1), restart + 1, restart)
        restart = jnp.where(reached(restart), restart, restart - 1)
        return restart, jnp.maximum(fraction - done(restart), 0.0) / t**restart

    def periods(s, d):
        if isinstance(t_mul, jax.core.Tracer):  # a traced t_mul: both ways, selected
            equal = t == 1.0
            r1, f1 = equal_periods(s, d)
            r2, f2 = growing_periods(s, d, jnp.where(equal, 2.0, t))
            return jnp.where(equal, r1, r2), jnp.where(equal, f1, f2)
        if np.float32(t_mul) == 1.0:  # as Keras compares it: a t_mul within float32 of 1 is 1
            return equal_periods(s, d)
        return growing_periods(s, d, t)

    def schedule(step):
        restart, fraction = periods(_step(step), _const(first_decay_steps))
        cosine = 0.5 * _const(m_mul) ** restart * (1.0 + jnp.cos(pi * fraction))
        return _const(initial_learning_rate) * ((1 - a) * cosine + a)

    return schedule


__all__ = [
    "cosine_decay",
    "cosine_decay_restarts",
    "exponential_decay",
    "inverse_time_decay",
    "piecewise_constant_decay",
    "polynomial_decay",
]
