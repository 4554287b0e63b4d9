"""The Keras facade: stateful optimizers over :class:`kopt.Variable`, tf.keras's legacy API.

Example:
    >>> import kopt
    >>> var = kopt.Variable(2.0)
    >>> opt = kopt.optimizers.get("adam")
    >>> _ = opt.minimize(lambda: var * var, [var])
    >>> int(opt.iterations.numpy())
    1
"""

from __future__ import annotations

import warnings
from typing import Any

from kopt.optimizers import _registry, schedules
from kopt.optimizers._registry import register_keras_serializable
from kopt.optimizers.base import Optimizer, PerReplica, all_reduce_sum_gradients
from kopt.optimizers.builtin import (
    SGD,
    Adadelta,
    Adafactor,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    Ftrl,
    Lamb,
    Lion,
    Nadam,
    RMSprop,
    TransformationOptimizer,
    _KerasV2,
    from_transformation,
)
from kopt.optimizers.loss_scale import LossScaleOptimizer

_CLASSES = {
    cls.__name__.lower(): cls
    for cls in (
        SGD,
        Adam,
        Adagrad,
        Adadelta,
        Adamax,
        Nadam,
        RMSprop,
        Ftrl,
        AdamW,
        Lion,
        Lamb,
        Adafactor,
        LossScaleOptimizer,
    )
}


def serialize(optimizer: Optimizer) -> dict[str, Any] | None:
    """``{"module", "class_name", "config", "registered_name"}`` for an optimizer; NumPy and JAX
    values in the config become Python numbers and lists, so that JSON can store it.

    As in tf.keras, a built-in is written with ``registered_name`` None, and your own class
    with its module (None for ``__main__``) and its registered name: ``"package>Name"`` if
    :func:`register_keras_serializable` registered it, else its class name.

    Example:
        >>> import kopt
        >>> kopt.optimizers.serialize(kopt.optimizers.SGD())["config"]["learning_rate"]
        0.01
    """
    if optimizer is None:
        return None
    if not isinstance(optimizer, Optimizer):
        warnings.warn(
            "kopt.optimizers.serialize() should only be used for kopt.optimizers.Optimizer "
            f"objects; received {type(optimizer).__name__}",
            stacklevel=2,
        )
    cls = type(optimizer)
    module, registered_name = _registry.serialized_names(
        cls, (*_CLASSES.values(), TransformationOptimizer), "kopt.optimizers"
    )
    return {
        "module": module,
        "class_name": cls.__name__,
        "config": schedules._plain_config(optimizer.get_config()),
        "registered_name": registered_name,
    }


def deserialize(config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> Optimizer:
    """An optimizer from :func:`serialize`'s output (or a Keras ``{"class_name", "config"}``).

    Built-in names are case-insensitive. A config of tf.keras's non-legacy optimizers (the
    default ones since tf.keras 2.11: ``"is_legacy_optimizer": False``, class names such as
    ``"Custom>Adam"`` and ``"LossScaleOptimizerV3"``), or of Keras 3's classes, loads into the
    built-in of the same name as tf.keras's ``convert_to_legacy_optimizer`` converts it:
    without the options only those classes have; one that changes the update
    (``weight_decay``, ``use_ema``, ``loss_scale_factor``, ``gradient_accumulation_steps``) is
    refused. A non-legacy ``Nadam`` config loads with a ``UserWarning``: that Nadam's update
    differs from the legacy one's.

    Your own classes are found as tf.keras finds them: registered with
    :func:`register_keras_serializable`, or in ``custom_objects`` under their
    ``registered_name`` or class name. A ``from_config`` override without a ``custom_objects``
    argument is called with the config alone, as tf.keras calls it.

    Raises:
        ValueError: for an unknown class name, a malformed config, or a non-legacy tf.keras
            config setting ``weight_decay`` or ``use_ema`` for a legacy class.
        TypeError: for unknown config keys (from the class's constructor).
    """
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            "optimizers.deserialize: expected a dict with 'class_name' and 'config', received "
            f"{config!r:.80}"
        )
    name = config["class_name"]
    cls = _registry.find_class(config, custom_objects) or _builtin_class(name)
    if cls is None and name == "TransformationOptimizer":
        cls = TransformationOptimizer  # its from_config takes the transformation back
    if cls is None:
        raise ValueError(
            f"Unknown optimizer: {name!r}. Known optimizers are {sorted(_CLASSES)}; pass your "
            "own classes in `custom_objects`, or register them with "
            "`kopt.optimizers.register_keras_serializable`."
        )
    inner = dict(config.get("config", {}))
    if cls in _CLASSES.values():
        inner = _from_non_legacy_config(cls, inner)
    return _registry.call_from_config(cls, inner, custom_objects)


def _builtin_class(name: Any) -> type | None:
    """The built-in a class name stands for, case-insensitively, including the names tf.keras
    (2.11 and later) writes for its non-legacy optimizers: ``"Custom>Adam"`` in its legacy
    serialization format, ``"LossScaleOptimizerV3"`` for its loss scaling over them."""
    key = str(name).lower()
    key = key.removeprefix("custom>")
    return _CLASSES.get("lossscaleoptimizer" if key == "lossscaleoptimizerv3" else key)


# Options of tf.keras's non-legacy optimizers (``tf.keras.optimizers.Adam`` since 2.11, with
# ``"is_legacy_optimizer": False`` in their configs) that its legacy classes do not have.
_NON_LEGACY_OPTIONS = (
    "weight_decay",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "jit_compile",
    "is_legacy_optimizer",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)
# Keys only Keras 3's configs have: such a config is not a legacy one either.
_KERAS3_ONLY = ("loss_scale_factor", "gradient_accumulation_steps")


def _non_legacy_update_differs(name: str, config: dict[str, Any]) -> str | None:
    """How the update of the non-legacy class ``name`` with ``config`` differs from the legacy
    class kopt's is ("" where it is not said), or None where they agree to float32 rounding."""
    if name == "Nadam":
        return ""
    epsilon = config.get("epsilon", 1e-7)
    if name == "RMSprop" and not config.get("momentum"):
        # With momentum both lines add epsilon under the square root.
        return (
            ": without momentum it adds epsilon under the square root, lr * g / sqrt(v + "
            "epsilon), where the legacy RMSprop divides by sqrt(v) + epsilon"
        )
    if name == "Adagrad":
        # The accumulators only grow from their initial value: past a few float32 roundings
        # of the first denominator, the two lines' updates part.
        initial = config.get("initial_accumulator_value", 0.1)
        if not initial > 0 or epsilon / initial**0.5 > 1e-6:
            return (
                ": it adds epsilon under the square root, lr * g / sqrt(accumulator + epsilon), "
                "where the legacy Adagrad divides by sqrt(accumulator) + epsilon, which differs "
                f"with initial_accumulator_value={initial!r}"
            )
    return None


def _from_non_legacy_config(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """A non-legacy tf.keras optimizer's config for kopt's built-in ``cls``.

    kopt's ``Adam``, ``SGD``... are tf.keras's legacy classes: as tf.keras's own
    ``convert_to_legacy_optimizer`` does, the options only the non-legacy classes have are
    dropped. One that would change the update (``weight_decay``, ``use_ema``) is refused
    instead of dropped. kopt's Keras 3 classes (AdamW...) take those options, and drop only
    ``jit_compile`` (kopt always compiles) and ``is_legacy_optimizer``. Other configs are
    returned unchanged.
    """
    if config.get("is_legacy_optimizer", True) is not False and not any(
        key in config for key in _KERAS3_ONLY
    ):
        return config
    config = dict(config)
    config.pop("jit_compile", None)
    config.pop("is_legacy_optimizer", None)
    if not issubclass(cls, _KerasV2):
        return config
    active = {
        key: config[key]
        for key in ("weight_decay", "use_ema", "loss_scale_factor", "gradient_accumulation_steps")
        if config.get(key) not in (None, False, 0)
    }
    if active:
        key, value = next(iter(active.items()))
        raise ValueError(
            f"optimizers.deserialize: this config of a non-legacy {cls.__name__} (tf.keras's, "
            f"or Keras 3's) sets "
            f"`{key}`={value!r}, an option kopt's {cls.__name__} (tf.keras's legacy "
            f"{cls.__name__}) does not have (kopt's Keras 3 classes, AdamW, Lion, Lamb and "
            "Adafactor, take it)"
        )
    for key in _NON_LEGACY_OPTIONS:
        config.pop(key, None)
    differs = _non_legacy_update_differs(cls.__name__, config)
    if differs is not None:
        # The classes whose update the two lines compute differently (the other classes'
        # agree to float32 rounding): loaded as tf.keras's conversion loads them, but said.
        warnings.warn(
            f"optimizers.deserialize: a config of a non-legacy {cls.__name__} (tf.keras 2.11+ "
            f"or Keras 3) loads into kopt's {cls.__name__}, which is tf.keras's legacy "
            f"{cls.__name__}, and its update differs{differs}. tf.keras's "
            "convert_to_legacy_optimizer loads it the same way, but training will not go on as "
            "it would have",
            UserWarning,
            stacklevel=3,
        )
    return config


def get(identifier: Any) -> Optimizer:
    """An optimizer from a name (``"adam"``, case-insensitive), a config dict or an instance.

    Raises:
        ValueError: if the identifier is none of these.

    Example:
        >>> import kopt
        >>> type(kopt.optimizers.get("RMSprop")).__name__
        'RMSprop'
    """
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        return deserialize({"class_name": identifier, "config": {}})
    raise ValueError(f"Could not interpret optimizer identifier: {identifier}")


__all__ = [
    "SGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Ftrl",
    "Lamb",
    "Lion",
    "LossScaleOptimizer",
    "Nadam",
    "Optimizer",
    "PerReplica",
    "RMSprop",
    "TransformationOptimizer",
    "all_reduce_sum_gradients",
    "deserialize",
    "from_transformation",
    "get",
    "register_keras_serializable",
    "schedules",
    "serialize",
]
