"""Names under which your own optimizer and schedule classes are serialized and found again.

The scheme is tf.keras's: ``serialize`` writes the class's module and a ``registered_name``
(``"package>Name"`` for a class registered with :func:`register_keras_serializable`, else the
class name); ``deserialize`` finds the class by that name in the registry or in
``custom_objects``, then by its class name there.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_REGISTERED: dict[str, type] = {}  # "package>Name" -> class
_NAMES: dict[type, str] = {}  # class -> "package>Name"
_SCOPE = threading.local()  # custom_objects of the deserialize calls running in this thread


def register_keras_serializable(package: str = "Custom", name: str | None = None) -> Any:
    """Class decorator: :func:`serialize` writes the class as ``"package>Name"`` and
    :func:`deserialize` finds it without ``custom_objects``, as tf.keras's decorator of the
    same name does. For your own optimizer and learning-rate schedule classes.

    Args:
        package: the first part of the registered name.
        name: the second part (default: the class's name).

    Raises:
        ValueError: for a class without ``get_config`` (it could not be serialized), or a
            ``package`` or ``name`` that is not a string without ``">"``.

    Example:
        >>> import kopt
        >>> @kopt.optimizers.register_keras_serializable(package="my_project")
        ... class SlowAdam(kopt.optimizers.Adam):
        ...     pass
        >>> blob = kopt.optimizers.serialize(SlowAdam(learning_rate=1e-4))
        >>> blob["registered_name"]
        'my_project>SlowAdam'
        >>> type(kopt.optimizers.deserialize(blob)).__name__
        'SlowAdam'
    """
    for label, value in (("package", package), ("name", name)):
        if value is not None and (not isinstance(value, str) or ">" in value):
            raise ValueError(
                f"register_keras_serializable: `{label}` must be a string without '>', "
                f"received {value!r}"
            )

    def decorator(cls: Any) -> Any:
        if not inspect.isclass(cls) or not hasattr(cls, "get_config"):
            raise ValueError(
                "register_keras_serializable: only a class with a get_config() method can be "
                f"registered; received {getattr(cls, '__name__', cls)!r}"
            )
        key = f"{package}>{name if name is not None else cls.__name__}"
        _REGISTERED[key] = cls
        _NAMES[cls] = key
        return cls

    return decorator


def serialized_names(
    cls: type, builtins: Iterable[type], public_module: str
) -> tuple[str | None, str | None]:
    """``(module, registered_name)`` for ``serialize``: one of kopt's ``builtins`` is written
    as ``public_module`` with no registered name; another class as its module (None for
    ``__main__``) and its registered name, or its class name when it is not registered."""
    if cls in builtins:
        return public_module, None
    module = None if cls.__module__ == "__main__" else cls.__module__
    return module, _NAMES.get(cls, cls.__name__)


def find_class(config: dict[str, Any], custom_objects: dict[str, Any] | None) -> Any:
    """The class a config names through the registry, ``custom_objects`` or those of the
    ``deserialize`` calls running in this thread (looked up by ``registered_name``, then by
    ``class_name``), or None."""
    known = {}
    for outer in getattr(_SCOPE, "stack", ()):
        known.update(outer)
    known.update(custom_objects or {})
    known.update(_REGISTERED)  # as in tf.keras, a registered name wins
    for key in (config.get("registered_name"), config.get("class_name")):
        if isinstance(key, str) and known.get(key) is not None:
            return known[key]
    return None


@contextlib.contextmanager
def custom_object_scope(custom_objects: dict[str, Any] | None) -> Iterator[None]:
    """Makes ``custom_objects`` visible to the ``deserialize`` calls a ``from_config`` makes
    (tf.keras runs ``from_config`` in such a scope, so an override without a
    ``custom_objects`` argument still finds the classes)."""
    stack = _SCOPE.__dict__.setdefault("stack", [])
    stack.append(dict(custom_objects or {}))
    try:
        yield
    finally:
        stack.pop()


def call_from_config(cls: Any, config: dict[str, Any], custom_objects: Any) -> Any:
    """``cls.from_config(config, custom_objects=...)``, or ``cls.from_config(config)`` for an
    override that takes no ``custom_objects`` (the signature tf.keras calls), within
    :func:`custom_object_scope`."""
    try:
        parameters = inspect.signature(cls.from_config).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    takes_objects = any(
        p.name == "custom_objects" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )
    with custom_object_scope(custom_objects):
        if takes_objects:
            return cls.from_config(config, custom_objects=custom_objects)
        return cls.from_config(config)
