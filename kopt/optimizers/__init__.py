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

    Built-in names are case-insensitive. Your own classes are found as tf.keras finds them:
    registered with :func:`register_keras_serializable`, or in ``custom_objects`` under their
    ``registered_name`` or class name. A ``from_config`` override without a ``custom_objects``
    argument is called with the config alone, as tf.keras calls it.

    Raises:
        ValueError: for an unknown class name or a malformed config.
        TypeError: for unknown config keys (from the class's constructor).
    """
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            "optimizers.deserialize: expected a dict with 'class_name' and 'config', received "
            f"{config!r:.80}"
        )
    name = config["class_name"]
    cls = _registry.find_class(config, custom_objects) or _CLASSES.get(str(name).lower())
    if cls is None and name == "TransformationOptimizer":
        cls = TransformationOptimizer  # its from_config takes the transformation back
    if cls is None:
        raise ValueError(
            f"Unknown optimizer: {name!r}. Known optimizers are {sorted(_CLASSES)}; pass your "
            "own classes in `custom_objects`, or register them with "
            "`kopt.optimizers.register_keras_serializable`."
        )
    return _registry.call_from_config(cls, dict(config.get("config", {})), custom_objects)


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
