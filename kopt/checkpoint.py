"""Checkpoints with orbax-checkpoint: functional states, and facade optimizers with their variables.

:func:`save_state` / :func:`restore_state` store any pytree of arrays (an optimizer state, or
``{"params": ..., "opt_state": ...}``); restoring needs a tree like the saved one (for example
``tx.init(params)``), which gives the structure, dtypes and shardings, and the zero-size arrays
(a slot of a variable of shape ``(0, 4)``), which orbax cannot store: they are made again from it.

:func:`save_optimizer` / :func:`restore_optimizer` store a facade optimizer: its config (as
:func:`kopt.optimizers.serialize` gives it, in ``config.json``), its step count, its slots keyed by
variable name and slot name, its other weights keyed by their names, the order of its weights,
the variables' values keyed by variable name, and the choices made at construction that the
config does not show (whether SGD's or RMSprop's momentum is on, which assigning ``momentum``
later does not change). Restoring builds the optimizer from the config and those choices,
creates its weights for the given variables, lists them in the saved order, and sets them, so
a run continues exactly where it stopped, in another process too. Sharded arrays are saved
shard by shard and restored with the shardings of the target (the given state, or the
variables' values); a leaf of the target that is not committed to a device comes back
uncommitted. An optimizer's own ``gradient_aggregator`` and
``gradient_transformers`` are functions, which a checkpoint cannot store: ``save_optimizer``
records that they were set, and ``restore_optimizer`` refuses to go on without them. Variables
that are not the optimizer's weights (one a custom optimizer keeps in a plain attribute, one a
schedule reads) are yours: save and restore them with your model's variables. Likewise the
variables excluded from weight decay (``exclude_from_weight_decay``), which are named again
on the restored optimizer.

Orbax must be installed (``pip install orbax-checkpoint``; it is in kopt's ``test`` extra).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kopt.base import OptState, PyTree

CONFIG_FILE = "config.json"
STATE_DIR = "state"


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "kopt.checkpoint needs orbax-checkpoint: pip install orbax-checkpoint"
        ) from e
    return ocp


def _target(tree: PyTree) -> PyTree:
    """Shape, dtype and sharding of each leaf: where orbax puts the restored arrays. A
    ``jax.eval_shape`` leaf over a mesh with explicit axes has a sharding on an abstract mesh,
    which names no devices: like a leaf without a sharding, it comes back with the sharding it
    was saved with. An array not committed to a device is read into host memory (a NumPy
    target), to become an uncommitted array: restored onto a device first, it would be there
    twice while copied (committed arrays cannot be uncommitted in place). A Python number (a
    flax ``TrainState``'s ``step``, a float param) is its own target: it comes back a number of
    its type."""

    def one(leaf):
        if isinstance(leaf, (bool, int, float)):
            return leaf
        if _uncommitted(leaf):
            return np.empty(leaf.shape, leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        if isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
            sharding = None
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _without_empty(tree: PyTree) -> PyTree:
    """``tree`` with each zero-size array (the slot of a variable of shape ``(0, 4)``) as None:
    orbax refuses to save one ("Cannot save arrays with zero size"), and it holds no value, so
    a restore makes it again from the target's shape and dtype (see :func:`_restore_tree`)."""
    return jax.tree.map(lambda leaf: None if _empty(leaf) else leaf, tree)


def _empty(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype") and math.prod(leaf.shape) == 0


def _empty_like(leaf: Any) -> jax.Array:
    """A zero-size array of ``leaf``'s shape and dtype, with its sharding where it is committed
    to devices (as a restored array gets its target's)."""
    value = jnp.zeros(leaf.shape, leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(leaf, jax.Array) and leaf.committed and sharding is not None:
        return jax.device_put(value, sharding)
    return value


def _save_tree(path: Path, tree: PyTree, overwrite: bool) -> None:
    ocp = _orbax()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.absolute(), _without_empty(tree), force=overwrite)
        checkpointer.wait_until_finished()


def _restore_tree(path: Path, like: PyTree) -> PyTree:
    ocp = _orbax()
    if not path.exists():
        raise FileNotFoundError(f"kopt.checkpoint: no checkpoint at {str(path)!r}")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path.absolute(), _target(_without_empty(like)))

    # A leaf that was not committed to a device (a step count made by jnp.zeros) comes back
    # uncommitted too, so that jit may place it beside sharded arrays: read into host memory
    # (see _target), it goes to the default device once. A zero-size leaf, not saved, is
    # made again.
    def one(old, new):
        if _empty(old):
            return _empty_like(old)
        return jnp.asarray(new) if _uncommitted(old) else new

    return jax.tree.map(one, like, restored)


def _uncommitted(leaf: Any) -> bool:
    return (
        isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and not leaf.committed
    )


def _check_new(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"kopt.checkpoint: {str(path)!r} exists; pass overwrite=True to replace it"
        )


def save_state(path: str | Path, state: PyTree, *, overwrite: bool = False) -> None:
    """Saves a pytree of arrays (an optimizer state, params, or both) to the directory ``path``.

    Args:
        path: a directory that does not exist yet (or ``overwrite=True``).
        state: the tree; sharded arrays are saved shard by shard.
        overwrite: replace an existing checkpoint at ``path``.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.

    Example:
        >>> import tempfile, jax.numpy as jnp, kopt
        >>> from kopt.checkpoint import restore_state, save_state
        >>> tx = kopt.sgd(0.1, momentum=0.9)
        >>> state = tx.init({"w": jnp.zeros(2)})
        >>> _, state = tx.update({"w": jnp.ones(2)}, state, {"w": jnp.zeros(2)})
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = tmp.name + "/ckpt"
        >>> save_state(path, state)
        >>> restored = restore_state(path, tx.init({"w": jnp.zeros(2)}))
        >>> kopt.get_slot(restored, "momentum")["w"]
        Array([-0.1, -0.1], dtype=float32)
        >>> tmp.cleanup()
    """
    path = Path(path)
    _check_new(path, overwrite)
    _save_tree(path, state, overwrite)


def restore_state(path: str | Path, like_state: OptState) -> OptState:
    """Restores a tree saved by :func:`save_state`.

    The hyperparameters come back with the rest of the state, as a tf.keras optimizer's
    hyperparameter variables do: a state restored into ``kopt.adam(1e-5)`` keeps the saved
    learning rate. To resume with another value, set it afterwards with
    :func:`kopt.set_hyperparam`.

    Args:
        path: the checkpoint directory.
        like_state: a tree with the saved structure (e.g. ``tx.init(params)``, or its
            ``jax.eval_shape``); each restored leaf gets its dtype and sharding (a
            ``jax.eval_shape`` leaf names no devices: it gets the sharding it was saved with).

    Returns:
        The restored tree, structured like ``like_state``.

    Raises:
        FileNotFoundError: if there is no checkpoint at ``path``.
        ValueError: if ``like_state`` does not have the saved state's structure (the message
            names the leaves missing or unexpected) or a leaf's shape differs from the saved
            one (a state made for params of other shapes; the message names the leaf and both
            shapes).
    """
    path = Path(path)
    try:
        restored = _restore_tree(path, like_state)
    except ValueError as e:
        # orbax says "tree structures do not match"; over NumPy targets (uncommitted leaves,
        # see _target) its diff of the two trees fails first, with NumPy's "truth value of an
        # array with more than one element is ambiguous": the keys are compared here.
        difference = _structure_difference(
            path, like_state, "tree structures do not match" in str(e)
        )
        if difference is None:
            raise
        raise ValueError(
            f"restore_state: `like_state` does not have the structure of the state saved at "
            f"{str(path)!r}: {difference}; make it as the saved "
            "state was made (the same transformation's init, from params of the same tree)"
        ) from None
    saved = jax.tree_util.tree_flatten_with_path(restored)[0]
    for (key, new), old in zip(saved, jax.tree.leaves(like_state), strict=True):
        if jnp.shape(new) != jnp.shape(old):
            raise ValueError(
                f"restore_state: leaf {jax.tree_util.keystr(key)} has shape {jnp.shape(new)} "
                f"in the checkpoint at {str(path)!r}, but shape {jnp.shape(old)} in "
                "`like_state`: the state was saved for params of other shapes"
            )
    return restored


def _structure_difference(path: Path, like: PyTree, differs: bool) -> str | None:
    """The leaves of ``like`` and of the tree saved at ``path`` that the other lacks, each as
    its keys (a state's fields and dict keys by name, a chain's parts by position: orbax saves
    a named tuple as a dict and a tuple as a list). Where none is, the two structures if
    ``differs`` (orbax found them different), else None."""
    ocp = _orbax()
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path.absolute())
    saved_tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)

    def keys(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return [
            "".join(f"[{getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))!r}]" for k in p)
            for p, _ in flat
        ]

    ours, theirs = keys(_without_empty(like)), keys(saved_tree)
    missing = [k for k in theirs if k not in ours]
    extra = [k for k in ours if k not in theirs]
    detail = []
    if missing:
        detail.append(f"saved but not in `like_state`: {', '.join(missing[:3])}")
    if extra:
        detail.append(f"in `like_state` but not saved: {', '.join(extra[:3])}")
    if detail:
        return "; ".join(detail)
    if not differs:
        return None
    return (
        f"`like_state` is {jax.tree.structure(like)}, the saved state "
        f"{jax.tree.structure(saved_tree)}"
    )


def _variable_names(variables: Iterable[Any]) -> dict[str, Any]:
    from kopt.variables import Variable

    out: dict[str, Any] = {}
    for i, var in enumerate(variables):
        if not isinstance(var, Variable):
            raise TypeError(
                f"kopt.checkpoint: variables item {i} must be a kopt.Variable, received "
                f"{type(var).__name__}"
            )
        if var.name in out:
            raise ValueError(
                f"kopt.checkpoint: two variables are named {var.name!r}; checkpoints key "
                "variables by name, so give them distinct names"
            )
        out[var.name] = var
    return out


def _in_training_order(optimizer: Any, named: dict[str, Any]) -> dict[str, Any]:
    """``named`` in the order the optimizer's state that is not per variable (gradient
    accumulators) was made for, if it has such state: a restore rebuilds it in the saved
    order, so that must be the training order, whatever order the caller gave."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    owner = inner.__dict__.get("_opaque_owner")
    if owner is None:
        return named
    by_uid = {var._uid: name for name, var in named.items()}
    if set(by_uid) != set(owner):
        raise ValueError(
            "save_optimizer: the optimizer keeps state for the variables it was trained with "
            "(its gradient accumulators); `variables` must be exactly those, received "
            f"{list(named)}"
        )
    return {by_uid[uid]: named[by_uid[uid]] for uid in owner}


def _optimizer_layout(optimizer: Any, variables: dict[str, Any]) -> dict[str, Any]:
    """Where each optimizer weight belongs: ``{"slots": {variable name: [slot names]}, "other":
    [weight names]}`` (the step count aside), with ``"added"`` for a custom optimizer's
    ``add_weight`` weights and ``"nested"`` for the optimizers it holds."""
    slots = _slot_layout(optimizer, variables)
    in_slots = {
        id(optimizer.get_slot(variables[name], slot))
        for name, names in slots.items()
        for slot in names
    }
    iterations = optimizer.iterations
    # Slots of variables not saved (a frozen layer left out) are left out, not taken for other
    # weights: the restored optimizer, built for the saved variables only, has none of them.
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    any_slot = {id(slot) for slots in inner._slots.values() for slot in slots.values()}
    other = [
        w.name
        for w in optimizer.weights
        if id(w) not in in_slots and id(w) not in any_slot and w is not iterations
    ]
    layout = {"slots": slots, "other": other}
    added = _added_weights(optimizer)
    if added:  # a custom optimizer's add_weight weights: not in `weights`, but its state
        layout["added"] = [w.name for w in added]
    nested = _nested(optimizer)
    if nested:  # optimizers it holds (a Lookahead's inner one), whose state its step updates
        layout["nested"] = [
            {
                "slots": _slot_layout(inner, variables),
                "iterations": _own_iterations(inner, optimizer) is not None,
                "state": [w.name for w in _nested_state(inner)],
            }
            for inner in nested
        ]
    return layout


def _slot_layout(optimizer: Any, variables: dict[str, Any]) -> dict[str, list[str]]:
    """``{variable name: [names of its slots]}``, for the variables that have slots."""
    slots: dict[str, list[str]] = {}
    for name, var in variables.items():
        for slot_name in optimizer.get_slot_names():
            try:
                optimizer.get_slot(var, slot_name)
            except KeyError:
                continue
            slots.setdefault(name, []).append(slot_name)
    return slots


def _nested(optimizer: Any) -> list[Any]:
    """The optimizers ``optimizer`` holds in its attributes, nested ones too (as its step
    finds them)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return list(inner._nested_optimizers())


def _own_iterations(inner: Any, holder: Any) -> Any:
    """A held optimizer's step count, where it has one of its own (a Lookahead may hand the
    inner optimizer its own count instead); None otherwise."""
    own = inner.__dict__.get("_iterations")
    return None if own is None or own is holder.iterations else own


def _nested_state(inner: Any) -> list[Any]:
    """A held optimizer's state that is not per variable, as the holder's step updates it: its
    other weights and its ``add_weight`` weights."""
    return [*inner._non_slot.values(), *inner._opaque, *inner._added_weights]


def _added_weights(optimizer: Any) -> list[Any]:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return list(inner.__dict__.get("_added_weights", ()))


def _optimizer_weights(optimizer: Any, variables: dict[str, Any], layout: dict[str, Any]):
    """The optimizer's Variables in the order of ``layout``: iterations, slots, other, a
    custom optimizer's ``add_weight`` weights, then each held optimizer's slots and state."""
    by_name = {w.name: w for w in optimizer.weights}
    slots = [
        optimizer.get_slot(variables[name], slot)
        for name, names in layout["slots"].items()
        for slot in names
    ]
    other = [by_name[name] for name in layout["other"]]
    nested = []
    for inner, inner_layout in zip(_nested(optimizer), layout.get("nested", []), strict=False):
        for name, names in inner_layout["slots"].items():
            nested.extend(inner.get_slot(variables[name], slot) for slot in names)
        if inner_layout["iterations"]:
            nested.append(inner.iterations)
        nested.extend(_nested_state(inner))
    return [optimizer.iterations, *slots, *other, *_added_weights(optimizer), *nested]


def _weight_order(optimizer: Any, saved: list[Any]) -> list[str]:
    """The names of the ``saved`` weights that ``optimizer.weights`` lists, in its order: the
    order they were made in (the slots of the variables stepped first come first), which the
    restored optimizer, making them all at once for the saved variables, does not have."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    ids = {id(w) for w in saved}
    return [w.name for w in inner.weights if id(w) in ids]


def _put_in_order(optimizer: Any, order: list[str]) -> None:
    """Lists the restored optimizer's weights in the saved one's ``order``, so that their
    ``get_weights`` and ``set_weights`` line up (each slot at its own variable's place)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    weights = inner._weights
    position = {name: i for i, name in enumerate(order)}
    if len(position) == len(order) and len({w.name for w in weights}) == len(weights):
        weights.sort(key=lambda w: position.get(w.name, len(order)))


def save_optimizer(
    path: str | Path, optimizer: Any, variables: Iterable[Any], *, overwrite: bool = False
) -> None:
    """Saves a facade optimizer (config and state) and the values of ``variables``.

    Args:
        path: a directory that does not exist yet (or ``overwrite=True``).
        optimizer: a :class:`kopt.optimizers.Optimizer` whose config is JSON-serializable.
        variables: the variables it trains, with distinct names; their slots are stored under
            their names.
        overwrite: replace an existing checkpoint at ``path``.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.
        TypeError: for a non-variable, or a config that JSON cannot store (a plain Python
            function as learning rate, for instance).
        ValueError: if two variables share a name.

    Example:
        >>> import tempfile, jax.numpy as jnp, kopt
        >>> from kopt.checkpoint import restore_optimizer, save_optimizer
        >>> var = kopt.Variable([1.0, 2.0], name="w")
        >>> opt = kopt.optimizers.Adam(learning_rate=0.1)
        >>> _ = opt.apply_gradients([(jnp.ones(2), var)])
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = tmp.name + "/ckpt"
        >>> save_optimizer(path, opt, [var])
        >>> var.assign([0.0, 0.0]).numpy()
        array([0., 0.], dtype=float32)
        >>> restored = restore_optimizer(path, [var])
        >>> var.numpy().round(4), int(restored.iterations.numpy())
        (array([0.9, 1.9], dtype=float32), 1)
        >>> tmp.cleanup()
    """
    from kopt.optimizers import serialize

    path = Path(path)
    named = _in_training_order(optimizer, _variable_names(variables))
    config = {
        "optimizer": serialize(optimizer),
        "variables": list(named),
        "shapes": {name: list(var.shape) for name, var in named.items()},
        "hooks": _custom_hooks(optimizer),
        "flags": _construction_flags(optimizer),
    }
    try:
        json.dumps(config)
    except TypeError as e:
        raise TypeError(
            f"save_optimizer: the config of {optimizer!r} cannot be stored as JSON ({e}); use "
            "numbers or kopt.optimizers.schedules objects for its hyperparameters"
        ) from e
    _check_new(path, overwrite)
    # Under the optimizer's lock, which each step holds: a step in another thread does not
    # land between reading the step count, the slots and the variables.
    with optimizer._lock:
        optimizer._create_all_weights(list(named.values()))  # as the restored one will have
        layout = _optimizer_layout(optimizer, named)
        weights = _optimizer_weights(optimizer, named, layout)
        order = _weight_order(optimizer, weights)
        tree = {
            "optimizer": [w.value for w in weights],
            "variables": [var.value for var in named.values()],
        }
    _save_tree(path / STATE_DIR, tree, overwrite)
    # Every process writes the same file: each writes its own copy and renames it into place,
    # so a process that restores at once never reads another's half-written file.
    partial = path / f".{CONFIG_FILE}.{jax.process_index()}.{os.getpid()}"
    partial.write_text(json.dumps({**config, "layout": layout, "order": order}, indent=1))
    os.replace(partial, path / CONFIG_FILE)


def _construction_flags(optimizer: Any) -> dict[str, Any]:
    """The choices ``optimizer`` made at construction that its config does not show (SGD's
    momentum on or off, which assigning ``momentum`` later does not change, as in tf.keras)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return {name: getattr(inner, name) for name in type(inner)._CONSTRUCTION_FLAGS}


def _custom_hooks(optimizer: Any) -> list[str]:
    """The gradient hooks ``optimizer`` was given, which a checkpoint cannot store (they are
    Python functions, and tf.keras leaves them out of its config too)."""
    from kopt.optimizers.base import all_reduce_sum_gradients

    inner = getattr(optimizer, "inner_optimizer", optimizer)
    hooks = []
    if getattr(inner, "gradient_aggregator", all_reduce_sum_gradients) is not (
        all_reduce_sum_gradients
    ):
        hooks.append("gradient_aggregator")
    if getattr(inner, "gradient_transformers", None):
        hooks.append("gradient_transformers")
    return hooks


def restore_optimizer(
    path: str | Path,
    variables: Iterable[Any],
    *,
    restore_variables: bool = True,
    custom_objects: dict[str, Any] | None = None,
    gradient_aggregator: Any = None,
    gradient_transformers: Any = None,
) -> Any:
    """Rebuilds an optimizer saved by :func:`save_optimizer` for ``variables``.

    The optimizer is created from the saved config, its weights are built for ``variables``
    (matched to the saved ones by variable name) and set to the saved values, each keeping the
    sharding of its variable; ``weights`` lists them in the saved optimizer's order, so the
    two optimizers' ``get_weights`` and ``set_weights`` line up. With ``restore_variables``
    (the default) the variables are set to their saved values too.

    Args:
        path: the checkpoint directory.
        variables: the variables to train, named as when saved (their order does not matter).
        restore_variables: whether to assign the saved values to ``variables``.
        custom_objects: your own optimizer classes, by name; for an optimizer made by
            :func:`kopt.optimizers.from_transformation`, its transformation again, as
            ``{"transformation": tx}``.
        gradient_aggregator: the saved optimizer's ``gradient_aggregator``, if it had one of its
            own: a checkpoint stores no functions.
        gradient_transformers: likewise, its ``gradient_transformers``.

    Returns:
        The restored optimizer.

    Raises:
        FileNotFoundError: if there is no checkpoint at ``path``.
        TypeError: if ``custom_objects`` is not a dict (or None).
        ValueError: if the variables' names or the optimizer's weights differ from the saved ones,
            or the saved optimizer had a gradient hook that is not passed here (without it the
            run would go on with other gradients, silently).
    """
    from kopt.optimizers import deserialize

    if custom_objects is not None and not isinstance(custom_objects, Mapping):
        raise TypeError(
            "restore_optimizer: `custom_objects` must be a dict of names to classes (or None), "
            f"received {type(custom_objects).__name__}: {custom_objects!r:.80}"
        )
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"restore_optimizer: no checkpoint at {str(path)!r}")
    config = json.loads(config_file.read_text())
    given = {
        "gradient_aggregator": gradient_aggregator,
        "gradient_transformers": gradient_transformers,
    }
    missing = [hook for hook in config.get("hooks", []) if not given[hook]]
    if missing:
        raise ValueError(
            f"restore_optimizer: the saved optimizer had its own {' and '.join(missing)}, "
            "which a checkpoint cannot store; pass the same to restore_optimizer "
            f"({', '.join(f'{hook}=...' for hook in missing)})"
        )
    named = _variable_names(variables)
    if set(config["variables"]) != set(named):
        raise ValueError(
            f"restore_optimizer: the checkpoint has variables {sorted(config['variables'])}, "
            f"received {sorted(named)}"
        )
    for name, shape in config.get("shapes", {}).items():
        if tuple(named[name].shape) != tuple(shape):
            raise ValueError(
                f"restore_optimizer: variable {name!r} has shape {tuple(named[name].shape)}, but "
                f"the checkpoint's has shape {tuple(shape)}"
            )
    optimizer = deserialize(config["optimizer"], custom_objects=custom_objects)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if gradient_aggregator is not None:
        inner.gradient_aggregator = gradient_aggregator
    if gradient_transformers is not None:
        inner.gradient_transformers = list(gradient_transformers)
    for name, value in config.get("flags", {}).items():
        if name in type(inner)._CONSTRUCTION_FLAGS:
            object.__setattr__(inner, name, value)
    order = config["variables"]
    optimizer._create_all_weights([named[name] for name in order])  # the order they were saved in
    for name, slots in config["layout"].get("slots", {}).items():
        for slot in slots:
            # A slot a structural flag made and no longer uses (Adam's `vhat` after `amsgrad`
            # was switched off again) is kept, as the saved optimizer kept it.
            optimizer.add_slot(named[name], slot)  # the existing one where there is one
    for inner, saved in zip(_nested(optimizer), config["layout"].get("nested", []), strict=False):
        if saved.get("iterations"):
            _ = inner.iterations  # made on first use: it was there when saved
    layout = _optimizer_layout(optimizer, {name: named[name] for name in order})
    if "nested" in layout and "nested" not in config["layout"]:
        # Saved before checkpoints kept the state of held optimizers: what was saved is
        # restored, and the held optimizers start afresh (as such a checkpoint always did).
        warnings.warn(
            "restore_optimizer: this checkpoint was written without the state of the "
            "optimizers the saved one holds (an older kopt); they start afresh",
            stacklevel=2,
        )
        layout = {k: v for k, v in layout.items() if k != "nested"}
    if layout != config["layout"]:
        raise ValueError(
            "restore_optimizer: the rebuilt optimizer's weights do not match the checkpoint's: "
            f"saved {config['layout']}, rebuilt {layout}"
        )
    if "order" in config:  # written by kopt since it kept the order (older ones keep theirs)
        _put_in_order(optimizer, config["order"])
    weights = _optimizer_weights(optimizer, named, layout)
    like = {
        "optimizer": [w.value for w in weights],
        "variables": [named[name].value for name in order],
    }
    restored = _restore_tree(path / STATE_DIR, like)
    for weight, value in zip(weights, restored["optimizer"], strict=True):
        weight._value = value
    if restore_variables:
        for name, value in zip(order, restored["variables"], strict=True):
            named[name]._value = value
    return optimizer


__all__ = ["restore_optimizer", "restore_state", "save_optimizer", "save_state"]
