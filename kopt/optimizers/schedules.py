"""Keras's learning-rate schedule classes, with configs; the maths is in :mod:`kopt.schedules`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kopt import schedules as fn
from kopt.optimizers import _registry


class LearningRateSchedule:
    """Base class: ``__call__(step)`` returns the learning rate; ``get_config`` describes it.

    Subclass it for your own schedule (jittable maths of ``step``, a float32 scalar).

    Example:
        >>> from kopt.optimizers import schedules
        >>> class Halving(schedules.LearningRateSchedule):
        ...     def __call__(self, step):
        ...         return 1.0 / 2.0 ** (step // 10)
        ...     def get_config(self):
        ...         return {}
        >>> float(Halving()(25.0))
        0.25
    """

    def __call__(self, step: Any) -> Any:
        raise NotImplementedError(
            f"Learning rate schedule '{type(self).__name__}' must override `__call__(self, step)`."
        )

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(
            f"Learning rate schedule '{type(self).__name__}' must override `get_config()` in "
            "order to be serializable."
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LearningRateSchedule:
        return cls(**config)


def _equal_lists(lists: dict[str, list], config: dict[str, Any]) -> bool:
    """Whether the lists in ``config`` hold the items noted in ``lists`` (compared at C speed,
    each item by identity first; items whose comparison is not a bool count as changed)."""
    try:
        return all(config[k] == items for k, items in lists.items())
    except Exception:  # noqa: BLE001 - an array or traced value put in the list
        return False


class _Builtin(LearningRateSchedule):
    _KEYS: tuple[str, ...] = ()
    _FUNCTION: Any = None

    def __init__(self, *args: Any, **kwargs: Any):
        names = self._KEYS
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}: too many positional arguments")
        values = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            if k in values:
                raise TypeError(f"{type(self).__name__}: got multiple values for argument {k!r}")
            if k not in names:
                raise TypeError(f"{type(self).__name__}: unexpected keyword argument {k!r}")
            values[k] = v
        self.name = values.pop("name", None)
        self._build(values)
        for k, v in values.items():
            object.__setattr__(self, k, v)

    def _build(self, config: dict[str, Any]) -> None:
        """Makes the function of ``config`` (checking it first), and notes the items of the
        lists in it (``PiecewiseConstantDecay``'s ``boundaries`` and ``values``), which may
        be edited in place."""
        schedule = type(self)._FUNCTION(**config)
        lists = {k: list(v) for k, v in config.items() if isinstance(v, list)}
        self.__dict__.update(_config=config, _schedule=schedule, _lists=lists)

    def __setattr__(self, name: str, value: Any) -> None:
        config = self.__dict__.get("_config")
        if config is not None and name in config:
            # As tf.keras's schedules read their attributes at each call: the function (and
            # a compiled step keyed by the config) follows the new value.
            self._build({**config, name: value})
            self.__dict__["_version"] = self.__dict__.get("_version", 0) + 1
        object.__setattr__(self, name, value)

    def _follow_edits(self) -> None:
        """Rebuilds the function after a list in the config was edited in place
        (``schedule.values[1] = 0.05``), as tf.keras's schedules read their lists at each
        call, and get_config shows the edit; counted as a change, as setting an attribute is."""
        lists = self.__dict__.get("_lists")
        if lists and not _equal_lists(lists, self._config):
            self._build(self._config)
            self.__dict__["_version"] = self.__dict__.get("_version", 0) + 1

    def __call__(self, step: Any) -> Any:
        self._follow_edits()
        return self._schedule(step)

    def get_config(self) -> dict[str, Any]:
        return {**self._config, "name": self.name}

    # Pickled by its arguments: the schedule function is a closure, rebuilt on load.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_schedule", "_lists")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build(self._config)


class ExponentialDecay(_Builtin):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)``, floored with staircase.

    Args: ``initial_learning_rate, decay_steps, decay_rate, staircase=False, name=None``.

    Example:
        >>> from kopt.optimizers.schedules import ExponentialDecay
        >>> float(ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)(10.0))
        0.05000000074505806
    """

    _KEYS = ("initial_learning_rate", "decay_steps", "decay_rate", "staircase", "name")
    _FUNCTION = staticmethod(fn.exponential_decay)

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False, name=None):
        super().__init__(initial_learning_rate, decay_steps, decay_rate, staircase, name)


class PiecewiseConstantDecay(_Builtin):
    """Constant values between step boundaries (``boundaries, values, name=None``).

    Example:
        >>> from kopt.optimizers.schedules import PiecewiseConstantDecay
        >>> float(PiecewiseConstantDecay([10], [1.0, 0.5])(11.0))
        0.5
    """

    _KEYS = ("boundaries", "values", "name")
    _FUNCTION = staticmethod(fn.piecewise_constant_decay)

    def __init__(self, boundaries, values, name=None):
        super().__init__(boundaries, values, name)


class PolynomialDecay(_Builtin):
    """Polynomial decay to ``end_learning_rate`` (``initial_learning_rate, decay_steps,
    end_learning_rate=0.0001, power=1.0, cycle=False, name=None``).

    Example:
        >>> from kopt.optimizers.schedules import PolynomialDecay
        >>> float(PolynomialDecay(1.0, 10, end_learning_rate=0.0)(5.0))
        0.5
    """

    _KEYS = ("initial_learning_rate", "decay_steps", "end_learning_rate", "power", "cycle", "name")
    _FUNCTION = staticmethod(fn.polynomial_decay)

    def __init__(
        self,
        initial_learning_rate,
        decay_steps,
        end_learning_rate=0.0001,
        power=1.0,
        cycle=False,
        name=None,
    ):
        super().__init__(initial_learning_rate, decay_steps, end_learning_rate, power, cycle, name)


class InverseTimeDecay(_Builtin):
    """``initial_learning_rate / (1 + decay_rate * step / decay_steps)`` (``staircase`` floors).

    Example:
        >>> from kopt.optimizers.schedules import InverseTimeDecay
        >>> float(InverseTimeDecay(1.0, 1, 1.0)(3.0))
        0.25
    """

    _KEYS = ("initial_learning_rate", "decay_steps", "decay_rate", "staircase", "name")
    _FUNCTION = staticmethod(fn.inverse_time_decay)

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False, name=None):
        super().__init__(initial_learning_rate, decay_steps, decay_rate, staircase, name)


class CosineDecay(_Builtin):
    """Cosine decay with optional linear warmup (``initial_learning_rate, decay_steps,
    alpha=0.0, name=None, warmup_target=None, warmup_steps=0``).

    Example:
        >>> from kopt.optimizers.schedules import CosineDecay
        >>> round(float(CosineDecay(1.0, 10)(5.0)), 6)
        0.5
    """

    _KEYS = (
        "initial_learning_rate",
        "decay_steps",
        "alpha",
        "name",
        "warmup_target",
        "warmup_steps",
    )

    @staticmethod
    def _FUNCTION(initial_learning_rate, decay_steps, alpha, warmup_target, warmup_steps):  # noqa: N802
        return fn.cosine_decay(
            initial_learning_rate, decay_steps, alpha, warmup_target, warmup_steps
        )

    def __init__(
        self,
        initial_learning_rate,
        decay_steps,
        alpha=0.0,
        name=None,
        warmup_target=None,
        warmup_steps=0,
    ):
        super().__init__(
            initial_learning_rate, decay_steps, alpha, name, warmup_target, warmup_steps
        )


class CosineDecayRestarts(_Builtin):
    """Cosine decay with warm restarts (``initial_learning_rate, first_decay_steps, t_mul=2.0,
    m_mul=1.0, alpha=0.0, name=None``).

    Example:
        >>> from kopt.optimizers.schedules import CosineDecayRestarts
        >>> round(float(CosineDecayRestarts(1.0, 10, m_mul=0.5)(10.0)), 6)
        0.5
    """

    _KEYS = ("initial_learning_rate", "first_decay_steps", "t_mul", "m_mul", "alpha", "name")
    _FUNCTION = staticmethod(fn.cosine_decay_restarts)

    def __init__(
        self, initial_learning_rate, first_decay_steps, t_mul=2.0, m_mul=1.0, alpha=0.0, name=None
    ):
        super().__init__(initial_learning_rate, first_decay_steps, t_mul, m_mul, alpha, name)


_CLASSES = {
    cls.__name__: cls
    for cls in (
        ExponentialDecay,
        PiecewiseConstantDecay,
        PolynomialDecay,
        InverseTimeDecay,
        CosineDecay,
        CosineDecayRestarts,
    )
}


def _plain_number(value: Any) -> Any:
    """A NumPy or JAX number as a Python one; a float32 (or narrower) one as the float it prints
    as (``0.1``, not ``0.10000000149011612``, as given and as tf.keras reports it), which
    converts back to the same value. For configs and error messages."""
    if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype.itemsize < 8:
        return float(str(value))
    return value.item()


def _plain_config(value: Any) -> Any:
    """``value`` with NumPy and JAX numbers and arrays (nested in dicts, lists and tuples) made
    Python numbers and lists, so that JSON can store it, as Keras's ``serialize`` does."""
    if isinstance(value, dict):
        return {k: _plain_config(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain_config(v) for v in value)
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        array = np.asarray(value)
        flat = [_plain_number(x) for x in array.reshape(-1)]
        return flat[0] if array.ndim == 0 else np.array(flat, object).reshape(array.shape).tolist()
    return value


def serialize(learning_rate_schedule: LearningRateSchedule) -> dict[str, Any]:
    """``{"module", "class_name", "config", "registered_name"}``, as Keras writes it; NumPy and
    JAX values in the config become Python numbers and lists, so that JSON can store it.

    Example:
        >>> from kopt.optimizers import schedules
        >>> schedules.serialize(schedules.InverseTimeDecay(1.0, 10, 0.5))["class_name"]
        'InverseTimeDecay'
    """
    if not isinstance(learning_rate_schedule, LearningRateSchedule):
        raise TypeError(
            "schedules.serialize: expected a LearningRateSchedule, received "
            f"{type(learning_rate_schedule).__name__}"
        )
    cls = type(learning_rate_schedule)
    module, registered_name = _registry.serialized_names(
        cls, _CLASSES.values(), "kopt.optimizers.schedules"
    )
    return {
        "module": module,
        "class_name": cls.__name__,
        "config": _plain_config(learning_rate_schedule.get_config()),
        "registered_name": registered_name,
    }


def _config_value(value: Any) -> Any:
    """A hyperparameter's schedule as an optimizer's config stores it: a kopt schedule as
    :func:`serialize` writes it, another library's schedule object (a Keras 3 or tf.keras one,
    which has ``get_config``) in the same form, which :func:`deserialize` reads back as kopt's
    schedule of that name; anything else as it is."""
    if isinstance(value, LearningRateSchedule):
        return serialize(value)
    get_config = getattr(value, "get_config", None)
    if callable(value) and callable(get_config) and not isinstance(value, type):
        cls = type(value)
        return {
            "module": cls.__module__,
            "class_name": cls.__name__,
            "config": _plain_config(get_config()),
            "registered_name": None,
        }
    return value


def _named_class(config: dict[str, Any], custom_objects: dict[str, Any] | None) -> Any:
    """The class a serialized schedule names (registered, in ``custom_objects``, or kopt's), or
    None."""
    return _registry.find_class(config, custom_objects) or _CLASSES.get(config["class_name"])


def _is_serialized(config: Any, custom_objects: dict[str, Any] | None = None) -> bool:
    """Whether ``config`` is a serialized schedule: a ``{"class_name", "config"}`` dict naming
    a schedule class (kopt's, a registered one or one in ``custom_objects``), not another
    serialized object (an optimizer a wrapper's config holds)."""
    if not (
        isinstance(config, dict)
        and isinstance(config.get("class_name"), str)
        and isinstance(config.get("config"), dict)
    ):
        return False
    cls = _named_class(config, custom_objects)
    return isinstance(cls, type) and issubclass(cls, LearningRateSchedule)


def deserialize(config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> Any:
    """A schedule from :func:`serialize`'s output (or Keras's; custom classes by name through
    ``custom_objects``).

    Raises:
        ValueError: if ``config`` is not a dict with a ``class_name``, or names an unknown
            class.
        TypeError: if the class does not take the arguments ``config["config"]`` holds
            (one missing, or one it does not know), as in Keras.
    """
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            f"schedules.deserialize: expected a dict with 'class_name' and 'config', received "
            f"{config!r:.80}"
        )
    name = config["class_name"]
    cls = _named_class(config, custom_objects)
    if cls is None:
        raise ValueError(
            f"Unknown decay: {name!r}. Known schedules are {sorted(_CLASSES)}; pass your own "
            "classes in `custom_objects`, or register them with "
            "`kopt.optimizers.register_keras_serializable`."
        )
    return cls.from_config(dict(config.get("config", {})))


__all__ = [
    "CosineDecay",
    "CosineDecayRestarts",
    "ExponentialDecay",
    "InverseTimeDecay",
    "LearningRateSchedule",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "deserialize",
    "serialize",
]
