"""``kopt.optimizers.Optimizer``: tf.keras's legacy ``OptimizerV2`` API over the functional core.

One ``apply_gradients`` call: validate the pairs (nothing changes on a bad call) -> create the
iteration count and slots lazily -> run one compiled program that aggregates, clips and
transforms the gradients, applies the update and the constraints and counts the step -> write
the new values into the variables. Hyperparameters and the step count are arguments of that
program, never constants, so changing them does not recompile.

Built-in optimizers declare their functional twin (:meth:`Optimizer._transformation`); a user's
optimizer written the tf.keras way (``_create_slots`` / ``_resource_apply_dense`` with
``var.assign*``) runs in the same compiled program, its variables bound to traced values.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import numbers
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, MappingView
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kopt import base as core
from kopt import variables as variables_module
from kopt._tree import committed_device_ids, device_mismatch
from kopt.optimizers import _state_codec as codec
from kopt.optimizers import _traced_loss
from kopt.optimizers._slot_groups import MAX_GROUPED_SIZE, PackedSlot, SlotGroup, group_slots
from kopt.optimizers.schedules import LearningRateSchedule, _plain_number
from kopt.optimizers.schedules import _Builtin as _BuiltinSchedule
from kopt.optimizers.schedules import _config_value as schedule_config
from kopt.optimizers.schedules import _is_serialized as is_serialized_schedule
from kopt.optimizers.schedules import deserialize as deserialize_schedule
from kopt.schedules import _computes_with_tensorflow as computes_with_tensorflow
from kopt.sparse import IndexedSlices, is_indexed_slices
from kopt.transforms import all_finite, clip_by_global_norm, clip_by_norm, clip_by_value
from kopt.transforms._core import learning_rate_at
from kopt.variables import (
    Variable,
    VariableReference,
    _bindings,
    _check_integral,
    _value_of,
    bound,
    capturing_writes,
    donation_lock,
    reading,
    track_reads,
)

logger = logging.getLogger("kopt")

_VALID_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


class PerReplica:
    """Per-replica gradients stacked along a leading replica axis, as ``pmap`` returns them.

    ``apply_gradients`` hands them to ``gradient_aggregator``; the default one sums over the
    replica axis before clipping (tf.keras's cross-replica sum), and your own aggregator may
    average or otherwise reduce them instead. ``experimental_aggregate_gradients=False`` skips
    the aggregator, as in tf.keras: the gradients must then already be reduced, and a
    ``PerReplica`` gradient is rejected (nothing changes).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> v = kopt.Variable([0.0])
        >>> opt = kopt.optimizers.SGD(learning_rate=1.0)
        >>> _ = opt.apply_gradients([(kopt.optimizers.PerReplica(jnp.array([[1.0], [2.0]])), v)])
        >>> v.numpy()
        array([-3.], dtype=float32)
    """

    def __init__(self, values: Any):
        self.values = values

    def __repr__(self) -> str:
        return f"PerReplica({self.values!r})"


jax.tree_util.register_pytree_node(
    PerReplica, lambda p: ((p.values,), None), lambda _, c: PerReplica(c[0])
)


def all_reduce_sum_gradients(grads_and_vars: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """The default ``gradient_aggregator``: sums :class:`PerReplica` gradients over their
    replica axis; other gradients are already aggregated and pass unchanged."""
    return [
        (jnp.sum(g.values, axis=0) if isinstance(g, PerReplica) else g, v)
        for g, v in grads_and_vars
    ]


# Counts assignments of optimizers to optimizers' attributes (and of anything over one), so
# that the optimizers nested in one are looked for again only after such a change.
_nesting_epoch = [0]

# The base class's own containers: they hold variables and programs, never a held optimizer,
# and are not searched for one.
_OWN_CONTAINERS = frozenset(
    {
        "_hyper",
        "_slots",
        "_slot_owners",
        "_slot_names",
        "_weights",
        "_non_slot",
        "_opaque",
        "_added_weights",
        "_slot_groups",
        "_slot_structure",
        "_programs",
        "_key_memo",
        "_nested_memo",
        "_copy_memo",
    }
)


def _held_optimizers(value: Any, depth: int = 0) -> Iterator[Any]:
    """The optimizers in an attribute's value: itself, or those in a list, tuple or dict of
    them (as a wrapper keeps one per kind of variable), nested up to three deep."""
    if isinstance(value, Optimizer):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _held_optimizers(item, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            yield from _held_optimizers(item, depth + 1)


# tf.keras hooks a subclass of a built-in may override (then its step runs them).
_HOOKS = (
    "_create_slots",
    "_decayed_lr",
    "_prepare",
    "_prepare_local",
    "_resource_apply_dense",
    "_resource_apply_sparse",
    "_resource_apply_sparse_duplicate_indices",
)


def _defined_outside_kopt(cls: type, name: str) -> bool:
    """Whether method ``name`` of ``cls`` is a user's (a subclass's override), not kopt's."""
    owner = next(c for c in cls.__mro__ if name in c.__dict__)
    return not owner.__module__.startswith("kopt.")


def _per_class(compute):
    """``compute(cls)``, remembered per class without keeping the class alive: a subclass made
    per trial goes with its optimizers (``functools.cache`` held every class it was asked about)."""
    known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @functools.wraps(compute)
    def cached(cls: type) -> bool:
        out = known.get(cls)
        if out is None:
            out = known[cls] = compute(cls)
        return out

    return cached


@_per_class
def _runs_twin(cls: type) -> bool:
    if cls._transformation is Optimizer._transformation:
        return False
    hooks = _HOOKS if cls._USES_DECAYED_LR else tuple(h for h in _HOOKS if h != "_decayed_lr")
    return not any(_defined_outside_kopt(cls, h) for h in hooks)


@_per_class
def _sets_own_learning_rate(cls: type) -> bool:
    """Whether a subclass of a built-in computes the learning rate itself (overrides
    ``_decayed_lr`` or ``_prepare_local``, as a warmup does): the built-in's hooks then step
    with the ``lr_t`` those give, as tf.keras's read it from ``apply_state``."""
    return cls._USES_DECAYED_LR and any(
        _defined_outside_kopt(cls, name) for name in ("_decayed_lr", "_prepare_local")
    )


def _snake_case(name: str) -> str:
    """The default name of an optimizer of class ``name``, as tf.keras makes it: a word break
    before a capital that starts a lowercase run and after a lowercase letter followed by a
    capital (``SGD`` -> ``sgd``, ``RMSprop`` -> ``rm_sprop``, ``AdamW`` -> ``adam_w``)."""
    name = re.sub(r"(?<=.)(?=[A-Z][a-z])", "_", name)
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower()
    return name if not name.startswith("_") else "private" + name


def _is_step_schedule(value: Any) -> bool:
    """A schedule object or a one-argument function of the step (called inside the step)."""
    if isinstance(value, LearningRateSchedule):
        return True
    if not callable(value) or isinstance(value, Variable):
        return False
    return len(_required_arguments(value)) == 1


def _assignment_check(optimizer: Optimizer, name: str) -> Callable[[Any], None]:
    """The check of a concrete value assigned to ``optimizer``'s variable for hyperparameter
    ``name``, holding the optimizer weakly (the variable is the optimizer's: a strong
    reference would make a cycle)."""
    ref = weakref.ref(optimizer)

    def check(value: Any) -> None:
        owner = ref()
        if owner is not None:
            owner._check_hyper_assignment(name, value)

    check.owner = ref
    return check


def _check_traceable(owner: str, name: str, schedule: Callable) -> None:
    """Refuses a schedule the compiled step cannot call: one computing with another library
    (a tf.keras schedule's TensorFlow operations take no JAX value), or needing a concrete
    step. Traced once on an abstract float32 step (``jax.eval_shape``: nothing compiled)."""
    if isinstance(schedule, LearningRateSchedule) and type(schedule).__module__.startswith("kopt."):
        return  # kopt's own
    try:
        jax.eval_shape(schedule, jax.ShapeDtypeStruct((), jnp.float32))
    except Exception as e:  # noqa: BLE001 - any failure is the schedule's, and is named
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = (
            ". A tf.keras schedule computes with TensorFlow: use kopt.optimizers.schedules' "
            "class of that name, which takes the same arguments"
            if computes_with_tensorflow(schedule)
            else ""
        )
        raise TypeError(
            f"{owner}: the schedule given as `{name}` ({type(schedule).__name__}) cannot run "
            "in the compiled step, which calls it with a traced step: "
            f"{type(e).__name__}: {message:.200}{hint}"
        ) from e


def _required_arguments(function: Callable) -> list[str]:
    """The names of the positional arguments ``function`` has no default for (none where its
    signature cannot be read)."""
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _check_number(owner: str, name: str, value: Any, *, allow_callable: bool = True) -> None:
    if value is None:
        raise TypeError(f"{owner}: `{name}` must be a number, received None")
    if isinstance(value, bool) or isinstance(value, str):
        expected = "a number, a scalar array, a schedule or a callable"
        raise TypeError(
            f"{owner}: `{name}` must be "
            f"{expected if allow_callable else 'a number or a scalar array'}; "
            f"received {type(value).__name__}: {value!r}"
        )
    if callable(value) and not isinstance(value, Variable):
        if not allow_callable:
            raise TypeError(
                f"{owner}: `{name}` must be a number, not a schedule or a callable; received "
                f"{value!r}"
            )
        return
    try:
        array = np.asarray(value.numpy() if isinstance(value, Variable) else value)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"{owner}: `{name}` must be a number, received {value!r}") from e
    if array.shape != () or not jnp.issubdtype(array.dtype, jnp.number):
        raise TypeError(
            f"{owner}: `{name}` must be a scalar number, received {type(value).__name__} of "
            f"shape {array.shape} and dtype {array.dtype}"
        )
    if jnp.issubdtype(array.dtype, jnp.complexfloating):
        raise TypeError(f"{owner}: `{name}` must be a real number, received {value!r}")


def _check_gradient_hooks(owner: str, aggregator: Any, transformers: Any) -> None:
    """Refuses, at construction, a ``gradient_aggregator`` or ``gradient_transformers`` that the
    first step would fail to call."""
    if aggregator is not None and not callable(aggregator):
        raise TypeError(
            f"{owner}: `gradient_aggregator` must be a callable [(grad, var)] -> "
            f"[(grad, var)], received {type(aggregator).__name__}: {aggregator!r:.60}"
        )
    if transformers is None:
        return
    if not isinstance(transformers, (list, tuple)):
        raise TypeError(
            f"{owner}: `gradient_transformers` must be a list of callables [(grad, var)] -> "
            f"[(grad, var)], received {type(transformers).__name__}: {transformers!r:.60}"
        )
    for i, transformer in enumerate(transformers):
        if not callable(transformer):
            raise TypeError(
                f"{owner}: `gradient_transformers` item {i} must be a callable [(grad, var)] "
                f"-> [(grad, var)], received {type(transformer).__name__}: {transformer!r:.60}"
            )


class Optimizer:
    """Base class of the Keras-style optimizers (tf.keras's legacy ``OptimizerV2`` API).

    Subclass it the tf.keras way: call ``super().__init__(name, **kwargs)`` and
    ``self._set_hyper(...)`` in ``__init__``; override ``_create_slots`` (calling
    ``self.add_slot``), ``_resource_apply_dense(grad, var, apply_state)`` (updating with
    ``var.assign*``), optionally ``_resource_apply_sparse(grad, var, indices, apply_state)``,
    and ``get_config``. It runs compiled, like the built-in optimizers.

    Args:
        name: the optimizer's name (prefix of its slot names).
        gradient_aggregator: ``[(grad, var)] -> [(grad, var)]`` run first (default: sums
            :class:`PerReplica` gradients across replicas).
        gradient_transformers: functions ``[(grad, var)] -> [(grad, var)]`` run after the
            clipping arguments, in order.
        **kwargs: ``clipnorm``, ``clipvalue``, ``global_clipnorm``, ``lr`` (deprecated alias of
            ``learning_rate``), ``decay`` (time-inverse learning-rate decay).

    Raises:
        TypeError: for another keyword argument, or a non-numeric one.
        ValueError: for a negative one, or both ``clipnorm`` and ``global_clipnorm``.

    Example:
        >>> import kopt
        >>> var1, var2 = kopt.Variable(1.0), kopt.Variable(2.0)
        >>> opt = kopt.optimizers.SGD(learning_rate=0.1)
        >>> _ = opt.minimize(lambda: 3 * var1 * var1 + 2 * var2 * var2, var_list=[var1, var2])
        >>> round(float(var1.numpy()), 4), round(float(var2.numpy()), 4)
        (0.4, 1.2)
    """

    # Whether a built-in's update takes its learning rate from `_decayed_lr` (tf.keras's legacy
    # classes but Nadam): a subclass overriding it then changes the step.
    _USES_DECAYED_LR = False

    _HAS_AGGREGATE_GRAD = True
    _ALLOWED_KWARGS = {"clipnorm", "clipvalue", "lr", "decay", "global_clipnorm"}
    # For built-ins: slot names in Keras's creation order, and whether they interleave per var.
    _SLOT_ORDER: tuple[str, ...] = ()
    _INTERLEAVE_SLOTS = False
    _STRUCTURAL: tuple[str, ...] = ()  # plain attributes that choose the update's form
    # Choices fixed at construction that get_config does not show (tf.keras's neither), such
    # as whether SGD's momentum is on: a checkpoint stores them beside the config.
    _CONSTRUCTION_FLAGS: tuple[str, ...] = ()
    # Whether the step counts of pieces inside a wrapper's state are kept as their own (as
    # opaque state) rather than set from ``iterations``; see TransformationOptimizer.
    _OWN_WRAPPED_COUNTS = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each subclass's ``__init__`` ends by checking the hyperparameters it was given
        against the functional twin (once, when the outermost ``__init__`` returns), so a bad
        value is refused by the constructor rather than by the first step."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def checked_init(self, *args: Any, **kw: Any) -> None:
            depth = self.__dict__.get("_init_depth", 0)
            self.__dict__["_init_depth"] = depth + 1
            try:
                init(self, *args, **kw)
            finally:
                self.__dict__["_init_depth"] = depth
            if depth == 0:
                del self.__dict__["_init_depth"]
                self._check_hyperparameters()

        cls.__init__ = checked_init

    def __init__(
        self,
        name: str,
        gradient_aggregator: Callable | None = None,
        gradient_transformers: list[Callable] | None = None,
        **kwargs: Any,
    ):
        object.__setattr__(self, "_hyper", {})
        owner = type(self).__name__
        for k, v in kwargs.items():
            if k not in self._ALLOWED_KWARGS:
                raise TypeError(
                    "Unexpected keyword argument passed to optimizer: "
                    f"{k}. Allowed kwargs are {sorted(self._ALLOWED_KWARGS)}."
                )
            if v is None:
                continue
            _check_number(owner, k, v, allow_callable=(k == "lr"))
            if not callable(v) and float(np.asarray(v)) < 0:
                raise ValueError(f"Expected {k} >= 0, received: {v}")
        if kwargs.get("lr") is not None:
            warnings.warn(
                "The `lr` argument is deprecated, use `learning_rate` instead.", stacklevel=2
            )
        if kwargs.get("clipnorm") is not None and kwargs.get("global_clipnorm") is not None:
            raise ValueError(
                "Cannot accept both `clipnorm` and `global_clipnorm`. Received: "
                f"`clipnorm`={kwargs['clipnorm']}, `global_clipnorm`={kwargs['global_clipnorm']}."
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{owner}: `name` must be a string, received {type(name).__name__}")
        _check_gradient_hooks(owner, gradient_aggregator, gradient_transformers)
        self._name = name or _snake_case(owner)
        self._initial_decay = float(kwargs.get("decay") or 0.0)
        self._slots: dict[int, dict[str, Variable]] = {}
        # The variable each slot dict belongs to: a copy or unpickling of the optimizer with its
        # variables re-keys the slots to the copied variables (``_rekey``).
        self._slot_owners: dict[int, Variable] = {}
        self._slot_names: list[str] = []
        self._weights: list[Variable] = []
        self._non_slot: dict[str, Variable] = {}
        self._opaque: list[Variable] = []
        self._added_weights: list[Variable] = []  # made by add_weight
        self._use_locking = True  # read by ported tf.keras hooks (`use_locking=...`)
        self._slot_groups: list[SlotGroup] = []
        # Set by a LossScaleOptimizer wrapping this one: steps whose gradients are not all
        # finite change nothing but its scale, decided inside the compiled step.
        self._guard: Any = None
        self._opaque_owner: tuple[int, ...] | None = None
        # Per variable, the structure (see ``_structure``) its slots were made for.
        self._slot_structure: dict[int, tuple] = {}
        self._iterations: Variable | None = None
        self._lock = threading.RLock()
        self._programs: dict[Any, Any] = {}
        self._validated: set[Any] = set()  # call signatures that passed validation
        self._key_memo: dict[Any, Any] = {}  # signature -> (token, step key, state plan)
        self._transformations: dict[Any, core.GradientTransformation] = {}
        self.compile_count = 0
        self._clipnorm = self._global_clipnorm = self._clipvalue = None
        self.gradient_aggregator = gradient_aggregator or all_reduce_sum_gradients
        self.gradient_transformers = list(gradient_transformers or [])
        # Not through the properties: a LossScaleOptimizer's delegate to its inner optimizer.
        self._set_clip("clipnorm", kwargs.get("clipnorm"))
        self._set_clip("global_clipnorm", kwargs.get("global_clipnorm"))
        self._set_clip("clipvalue", kwargs.get("clipvalue"))

    # --- attribute access to hyperparameters --------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name == "_hyper" or name.startswith("__"):
            raise AttributeError(name)
        hyper = self.__dict__.get("_hyper", {})
        key = "learning_rate" if name == "lr" else name
        if key in hyper:
            return self._get_hyper(key)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "lr":
            name = "learning_rate"
        if name != "_guard" and (
            isinstance(value, Optimizer)
            or isinstance(self.__dict__.get(name), Optimizer)
            or (
                isinstance(value, (list, tuple, dict))
                and name not in _OWN_CONTAINERS
                and any(True for _ in _held_optimizers(value))
            )
        ):
            _nesting_epoch[0] += 1  # an optimizer held by another: see _nested_optimizers
        hyper = self.__dict__.get("_hyper")
        if hyper is not None and name in hyper:
            self._set_hyper(name, value)
        elif (
            name[0] != "_"
            and hyper is not None
            and "_init_depth" not in self.__dict__  # the constructor checks once, at its end
            and name in self._checked_attributes()
        ):
            self._set_checked_attribute(name, value)
        else:
            if name[0] != "_" and name != "compile_count" and "_init_depth" not in self.__dict__:
                if self.__dict__.get("_tracing"):
                    self.__dict__.setdefault("_written_in_trace", set()).add(name)
                    self.__dict__.setdefault("_written_now", set()).add(name)
                    # What it held before this trace, put back if the trace fails.
                    before = self.__dict__.get("_written_before", {})
                    before.setdefault(name, self.__dict__.get(name, _UNSET))
                elif not (
                    self._uses_transformation()  # a built-in's step reads none
                    or isinstance(value, jax.Array)  # not keyed (see _array_key)
                    or _same_plain_value(self.__dict__.get(name, _UNSET), value)
                ):
                    # A custom optimizer's hooks may read it while the step is traced.
                    epoch = self.__dict__.get("_attribute_epoch", 0)
                    self.__dict__["_attribute_epoch"] = epoch + 1
            object.__setattr__(self, name, value)

    def _checked_attributes(self) -> frozenset[str]:
        """Plain attributes (not hyperparameter variables) whose values the functional twin
        checks: ``epsilon``, the structural flags, the Keras 3 options."""
        return frozenset(self._STRUCTURAL) | frozenset(self._plain_hyperparams())

    def _set_checked_attribute(self, name: str, value: Any) -> None:
        """Sets ``name``, unless the optimizer it makes is refused: then the attribute keeps
        its value and the error (naming the class and the argument) is raised."""
        from kopt.optimizers.builtin import _plain_number  # here: builtin imports this module

        value = _plain_number(value)
        with self._lock:
            old = self.__dict__.get(name, _UNSET)
            object.__setattr__(self, name, value)
            try:
                self._check_attributes()
            except BaseException:
                if old is _UNSET:
                    del self.__dict__[name]
                else:
                    object.__setattr__(self, name, old)
                raise

    def _check_attributes(self) -> None:
        """Builds the functional twin from the current attributes to check them. A
        hyperparameter given as a callable is not called for this (0.0 stands in)."""
        for name, value in self._plain_hyperparams().items():  # plain numbers in Keras too
            _check_number(type(self).__name__, name, value, allow_callable=False)
        if not self._uses_transformation():
            return
        hyper = {k: 0.0 if _is_read_per_step(v) else v for k, v in self._hyper.items()}
        self._build_transformation(_placeholders(self._transformation_hyperparams(hyper)))

    def __dir__(self):
        names = list(super().__dir__()) + list(self._hyper)
        if "learning_rate" in self._hyper:
            names.append("lr")
        return sorted(set(names))

    def _set_hyper(self, name: str, value: Any) -> None:
        """Sets hyperparameter ``name`` (a number, scalar array, Variable, schedule or callable).

        A number assigns into the existing hyperparameter variable in place (no recompile); a
        schedule or callable replaces it. A custom optimizer may also keep a flag (a bool) as a
        hyperparameter, in a bool variable, as tf.keras does.
        """
        # A custom optimizer's flag (NovoGrad's `grad_averaging`): a bool variable, as tf.keras.
        flag = isinstance(value, (bool, np.bool_)) and not self._uses_transformation()
        if not flag:
            self._check_hyper_value(name, value)
        with self._lock:
            current = self._hyper.get(name)
            into_checked = (  # a number into a variable whose `assign` checks it
                isinstance(current, Variable)
                and current._assign_check is not None
                and not callable(value)
                and not isinstance(value, Variable)
            )
            if current is not None and not into_checked:
                self._check_hyper_range(name, value)
            if isinstance(value, Variable):
                self._hyper[name] = value
            elif callable(value):
                self._hyper[name] = value
            elif isinstance(current, Variable):
                current.assign(jnp.asarray(value, jnp.float32).astype(current.dtype))
            else:
                # A number after a schedule or callable goes back into the variable it had
                # before (the step compiled for it is keyed by that variable), not a new one.
                numbers = self.__dict__.setdefault("_number_hypers", {})
                var = numbers.get(name)
                dtype = jnp.bool_ if flag else jnp.float32
                if var is not None and (var.dtype == jnp.bool_) != flag:
                    var = None  # a flag after a number, or a number after a flag
                if var is None:
                    var = numbers[name] = Variable(
                        jnp.asarray(value, dtype),
                        trainable=False,
                        name=f"{self._name}/{name}",
                    )
                    # `opt.beta_1.assign(1.5)` is checked as `opt.beta_1 = 1.5` is.
                    self._check_own_assignments()
                else:
                    var.assign(jnp.asarray(value, dtype))
                self._hyper[name] = var

    def _check_hyper_value(self, name: str, value: Any) -> None:
        """The checks of a new value for hyperparameter ``name`` that need no other
        hyperparameter: a number, finite, and a non-negative learning rate or decay; a schedule
        that JAX can trace."""
        _check_number(type(self).__name__, name, value)
        if _is_step_schedule(value):
            _check_traceable(type(self).__name__, name, value)
        if not callable(value) or isinstance(value, Variable):
            number = float(np.asarray(value.numpy() if isinstance(value, Variable) else value))
            # A custom optimizer's own hyperparameter may be infinite ("never clip"), as in
            # tf.keras; the built-ins' and every learning rate may not.
            if not np.isfinite(number) and (
                name in ("learning_rate", "decay")
                or np.isnan(number)
                or (self._has_twin() and name in _builtin_hyperparameter_names())
            ):
                raise ValueError(
                    f"{type(self).__name__}: `{name}` must be finite, received {value}"
                )
            if name in ("learning_rate", "decay") and number < 0:
                raise ValueError(f"{type(self).__name__}: `{name}` must be >= 0, received {value}")

    def _check_hyper_range(self, name: str, value: Any) -> None:
        """The functional twin owns the valid ranges: builds it with ``value`` for ``name``."""
        if self._uses_transformation():
            hyper = {**self._hyper, name: value}
            self._build_transformation(_placeholders(self._transformation_hyperparams(hyper)))

    def _check_hyper_assignment(self, name: str, value: jax.Array) -> None:
        """Checks a concrete value assigned to the variable the optimizer made for
        hyperparameter ``name`` (``opt.beta_1.assign(1.5)``), as setting the attribute does.
        Without the optimizer's lock: ``assign_add`` calls it holding the variables' lock,
        which a step takes after the optimizer's."""
        value = _plain_number(np.asarray(value))  # reported as given: 0.1, not 0.10000000149
        self._check_hyper_value(name, value)
        if name not in ("learning_rate", "decay"):  # whose whole range _check_hyper_value is:
            self._check_hyper_range(name, value)  # an LR assigned each step builds no twin

    def _check_own_assignments(self) -> None:
        """Makes ``assign`` check the variables the optimizer owns: its hyperparameters' and
        ``iterations`` (again after a copy or unpickling, which leave the checks out)."""
        for name, var in self.__dict__.get("_number_hypers", {}).items():
            current = getattr(var._assign_check, "owner", None)
            if var.dtype != jnp.bool_ and (current is None or current() is None):
                # (A shallow copy shares the variable: it stays the original's to check.)
                var._assign_check = _assignment_check(self, name)
        if self._iterations is not None:
            self._iterations._assign_check = _check_step_count

    def _get_hyper(self, name: str, dtype: Any = None) -> Any:
        """The hyperparameter: its Variable (cast to ``dtype`` if given), the schedule object,
        or a zero-argument callable's current result."""
        value = self._hyper[name]
        if isinstance(value, LearningRateSchedule) or _is_step_schedule(value):
            return value
        if callable(value) and not isinstance(value, Variable):
            value = value()
        if dtype is not None:
            return jnp.asarray(value).astype(dtype)
        return value

    def _serialize_hyperparameter(self, hyperparameter_name: str) -> Any:
        """The hyperparameter as a config value: a schedule's config dict, a callable's current
        result, or a Python number."""
        value = self._hyper[hyperparameter_name]
        if callable(value) and not isinstance(value, Variable):
            if _is_step_schedule(value):
                return schedule_config(value)
            value = value()
        if isinstance(value, Variable):
            value = value.numpy()
        return _plain_number(np.asarray(value))

    def _decayed_lr(self, var_dtype: Any) -> jax.Array:
        """Keras's learning rate for this step: schedule at ``iterations``, then
        ``/ (1 + decay * iterations)``."""
        lr_t = self._get_hyper("learning_rate", None)
        step = jnp.asarray(self.iterations.value).astype(var_dtype)
        if _is_step_schedule(lr_t):
            lr_t = jnp.asarray(lr_t(step)).astype(var_dtype)
        else:
            lr_t = jnp.asarray(lr_t).astype(var_dtype)
        hp = {"learning_rate": lr_t}
        decay = self._hyper.get("decay")
        if decay is None:
            if self._initial_decay > 0:
                hp["decay"] = jnp.asarray(self._initial_decay, var_dtype)
        else:  # the current decay, as the step applies it (docs/deviations.md)
            if _is_step_schedule(decay):
                decay = decay(step)
            elif _is_read_per_step(decay):
                decay = _called(self, "decay", decay)
            hp["decay"] = jnp.asarray(_plain(decay)).astype(var_dtype)
        return learning_rate_at(hp, step)

    # --- clipping properties -----------------------------------------------------------------
    def _set_clip(self, attr: str, value: Any) -> None:
        if value is not None and self.gradient_transformers:
            raise ValueError(
                f"`{attr}` cannot be set when `gradient_transformers` is set. Instead, use the "
                "`gradient_transformers` to specify clipping and other transformations. "
                f"Received: val={value}, gradient_transformers={self.gradient_transformers}."
            )
        if value is not None:
            _check_number(type(self).__name__, attr, value, allow_callable=False)
            number = float(np.asarray(value))
            if not np.isfinite(number):  # NaN or infinite: every weight NaN at the next step
                raise ValueError(
                    f"{type(self).__name__}: `{attr}` must be finite, received {value}"
                )
            if number < 0:
                raise ValueError(f"Expected {attr} >= 0, received: {value}")
        object.__setattr__(self, "_" + attr, value)

    def _active_clips(self) -> dict[str, Any]:
        """The clipping arguments in effect, in tf.keras's order: every one that is set (0
        included: tf.keras clips to zero)."""
        return {
            attr: value
            for attr in ("clipvalue", "clipnorm", "global_clipnorm")
            if (value := getattr(self, "_" + attr)) is not None
        }

    def _clips_before_step(self) -> dict[str, Any]:
        """The clips applied to each call's gradients, before the step (all of them here)."""
        return self._active_clips()

    @property
    def clipnorm(self) -> float | None:
        """Per-tensor gradient norm clipping (``None`` for none)."""
        return self._clipnorm

    @clipnorm.setter
    def clipnorm(self, value: float | None) -> None:
        self._set_clip("clipnorm", value)

    @property
    def global_clipnorm(self) -> float | None:
        """Global gradient norm clipping (``None`` for none)."""
        return self._global_clipnorm

    @global_clipnorm.setter
    def global_clipnorm(self, value: float | None) -> None:
        self._set_clip("global_clipnorm", value)

    @property
    def clipvalue(self) -> float | None:
        """Element-wise gradient clipping (``None`` for none)."""
        return self._clipvalue

    @clipvalue.setter
    def clipvalue(self, value: float | None) -> None:
        self._set_clip("clipvalue", value)

    # --- weights -----------------------------------------------------------------------------
    @property
    def iterations(self) -> Variable:
        """The step count (created on first use; int32, saturating at ``2**31 - 1``)."""
        if self._iterations is None:
            with self._lock:
                if self._iterations is None:
                    self._iterations = Variable(
                        jnp.zeros((), jnp.int32), trainable=False, name=f"{self._name}/iter"
                    )
                    self._check_own_assignments()
                    self._weights.append(self._iterations)
        return self._iterations

    @iterations.setter
    def iterations(self, variable: Variable) -> None:
        if self._iterations is not None:
            raise RuntimeError(
                "Cannot set `iterations` to a new Variable after the Optimizer weights have "
                f"been created. Here it is attempting to set `iterations` to {variable}."
            )
        if not isinstance(variable, Variable):
            raise TypeError(f"`iterations` must be a kopt.Variable, received {variable!r}")
        if variable.shape != ():
            raise ValueError(
                f"`iterations` must be a scalar step count, received {variable.name} of shape "
                f"{variable.shape}"
            )
        _check_step_count(variable.numpy(), "`iterations`")
        self._iterations = variable
        self._check_own_assignments()
        self._weights.append(variable)

    @property
    def weights(self) -> list[Variable]:
        """The optimizer's variables: ``iterations`` first, then the slots in creation order."""
        return self._weights

    def variables(self) -> list[Variable]:
        """Same as :attr:`weights` (a method, as in tf.keras's legacy optimizer)."""
        return self._weights

    def get_weights(self) -> list[np.ndarray]:
        """NumPy copies of :attr:`weights`, in the same order, of one step: read under the
        optimizer's lock, which each step holds."""
        with self._lock:
            return [w.numpy() for w in self.weights]

    def set_weights(self, weights: list[Any]) -> None:
        """Sets :attr:`weights` from a list of arrays (as from :meth:`get_weights`).

        Raises:
            ValueError: if the count or any shape differs (nothing is changed then).
        """
        weights = weight_list(weights)
        with self._lock:
            params = self.weights
            if len(params) != len(weights):
                raise ValueError(
                    f"You called `set_weights(weights)` on optimizer {self._name} with a weight "
                    f"list of length {len(weights)}, but the optimizer was expecting "
                    f"{len(params)} weights. Provided weights: {str(weights)[:50]}..."
                )
            arrays = []
            for p, w in zip(params, weights, strict=True):
                shape = tuple(np.shape(w))
                if shape != p.shape:
                    raise ValueError(
                        f"Optimizer weight shape {p.shape} not compatible with provided weight "
                        f"shape {shape} (weight {p.name})."
                    )
                if p is self.iterations:  # a wrapper's is its inner optimizer's
                    w = _saturated_count(w)
                elif any(p is scale for scale in self._guarded_scales()):
                    _check_loss_scale(w, p.name)
                elif jnp.issubdtype(p.dtype, jnp.integer):
                    _check_integral(w, p.dtype, p.name)
                try:
                    arrays.append(jnp.asarray(w, p.dtype))
                except (TypeError, ValueError) as e:
                    raise TypeError(
                        f"set_weights: the value for {p.name} must be numeric, received {w!r:.60}"
                    ) from e
            for p, w in zip(params, arrays, strict=True):
                p.assign(w)

    def _guarded_scales(self) -> tuple[Variable, ...]:
        """A LossScaleOptimizer's loss scale (none here)."""
        return ()

    def add_weight(
        self,
        name: str,
        shape: Any = (),
        dtype: Any = None,
        initializer: Any = "zeros",
        trainable: bool | None = None,
        synchronization: Any = None,
        aggregation: Any = None,
    ) -> Variable:
        """Creates a non-slot variable owned by the optimizer (not added to :attr:`weights`, as
        in tf.keras). Every step passes it into the compiled update and back, so a hook may
        read it and ``assign`` to it, and a value assigned between steps is the one read."""
        dtype = dtype or jnp.float32
        shape = _shape_argument(shape, f"add_weight: `shape` of weight {name!r}")
        value = _initial_value(initializer, shape, dtype)
        weight = Variable(
            value,
            trainable=bool(trainable) if trainable is not None else True,
            name=f"{self._name}/{name}",
        )
        with self._lock:
            self._added_weights.append(weight)
        return weight

    def add_slot(
        self, var: Variable, slot_name: str, initializer: Any = "zeros", shape: Any = None
    ) -> Variable:
        """Creates (or returns the existing) slot ``slot_name`` for ``var``.

        Args:
            var: the model variable.
            slot_name: e.g. ``"m"``.
            initializer: ``"zeros"``, ``"ones"``, a callable ``(shape, dtype) -> array``, or
                the initial value: a number, array or variable, as in tf.keras (a number makes
                a scalar slot; ``jnp.full(var.shape, c, var.dtype)`` is tf.keras's
                ``tf.constant_initializer(c)``).
            shape: the slot's shape (default: the initial value's for a value, else the
                variable's). A value is broadcast to it; tf.keras ignores ``shape`` there.
        """
        if not isinstance(var, Variable):
            raise TypeError(f"add_slot: `var` must be a kopt.Variable, received {var!r:.60}")
        if shape is None and (_is_array_value(initializer) or _is_plain_value(initializer)):
            # tf.keras makes the slot of the value given, a scalar for a number (NovoGrad's
            # scalar per variable).
            shape = tuple(np.shape(initializer))
        else:
            shape = (
                var.shape
                if shape is None
                else _shape_argument(shape, f"add_slot: `shape` of slot {slot_name!r}")
            )
        self._adopt_copies()
        existing = self._slots.get(var._uid, {}).get(slot_name)
        if existing is not None:
            return existing
        in_step = self.__dict__.get("_tracing")
        # A slot made by a hook while the step is traced (tf.keras's lazily made slots) starts
        # from a value known before the step: the step is traced again with it as an input.
        with jax.ensure_compile_time_eval() if in_step else contextlib.nullcontext():
            value = _initial_value(initializer, shape, var.dtype)  # may refuse: nothing made yet
        if in_step and isinstance(value, jax.core.Tracer):
            raise TypeError(
                f"add_slot: slot {slot_name!r} of {var.name} is made inside the step from a value "
                "the step computes; make it in `_create_slots`, or start it from a value known "
                "before the step ('zeros', a number, a callable (shape, dtype) -> array)"
            )
        if slot_name not in self._slot_names:
            self._slot_names.append(slot_name)
        slots = self._slots.setdefault(var._uid, {})
        self._slot_owners[var._uid] = var
        if (
            shape == var.shape
            and var.sharding is not None
            and not isinstance(value, jax.core.Tracer)
            and getattr(var._storage, "committed", False)  # an uncommitted one stays so
        ):
            value = jax.device_put(value, var.sharding)
        with jax.ensure_compile_time_eval() if in_step else contextlib.nullcontext():
            slot = Variable(
                value, trainable=False, name=f"{self._name}/{var._shared_name}/{slot_name}"
            )
        slots[slot_name] = slot
        self._weights.append(slot)
        if in_step:
            # The trace goes on (every slot the hooks make, made in one trace), and is then
            # abandoned for one with the new slots among its inputs (see _compile's `step`).
            self.__dict__.setdefault("_made_in_step", []).append((slot, value))
        return slot

    def get_slot(self, var: Variable, slot_name: str) -> Variable:
        """The slot variable ``slot_name`` of ``var``.

        Raises:
            KeyError: naming the variable or slot when there is none (as in tf.keras).
        """
        self._adopt_copies()
        uid = getattr(var, "_uid", None)
        if uid not in self._slots:
            raise _SlotKeyError(
                f"No slots for variable {getattr(var, 'name', var)!r:.80} in {self._name}"
            )
        slots = self._slots[uid]
        if slot_name not in slots:
            raise _SlotKeyError(
                f"No slot {slot_name!r} for variable {var.name!r}; it has {sorted(slots)}"
            )
        return slots[slot_name]

    def get_slot_names(self) -> list[str]:
        """Slot names in first-creation order."""
        return self._slot_names

    def _create_slots(self, var_list: list[Variable]) -> None:
        """Hook: create slots with :meth:`add_slot` (the built-ins create theirs from their
        functional twin's initial state, also for a subclass calling ``super()``)."""
        if self._has_twin():
            self._create_transformation_slots(var_list)

    def _create_all_weights(self, var_list: list[Variable]) -> None:
        """Creates ``iterations`` and the slots of ``var_list`` (as tf.keras's private method of
        the same name; useful before :meth:`set_weights`)."""
        self._adopt_copies()
        _ = self.iterations
        if self._uses_transformation():
            self._create_transformation_slots(var_list)
        else:
            self._create_slots(var_list)

    # --- the tf.keras hooks ----------------------------------------------------------------
    def _resource_apply_dense(self, grad: Any, var: Variable, apply_state: Any = None) -> Any:
        """Hook: update ``var`` (and its slots) with ``var.assign*`` for a dense ``grad``. A
        built-in's applies its own update to ``var``, for subclasses and wrappers that call
        it (``super()._resource_apply_dense(...)``)."""
        if self._has_twin():
            return self._apply_twin(grad, var, apply_state)
        raise NotImplementedError("`_resource_apply_dense` must be implemented in subclasses.")

    def _resource_apply_sparse(
        self, grad: Any, var: Variable, indices: Any, apply_state: Any = None
    ) -> Any:
        """Hook: update the rows ``indices`` of ``var`` for gradient rows ``grad``.

        The indices are unique, as in tf.keras, but a compiled step has fixed shapes: where the
        gradient named a row twice, the duplicate's place holds the index ``var.shape[0]``
        (outside the table) and a zero gradient row. Scatters (``var.value.at[indices]``) skip
        it; a computation over all the named rows (a norm of gathered rows, their count) must
        leave it out, with ``indices < var.shape[0]``. A built-in's applies its own sparse
        update, as its dense hook does.
        """
        if self._has_twin():
            return self._apply_twin(IndexedSlices(grad, indices, var.shape), var, apply_state)
        raise NotImplementedError("`_resource_apply_sparse` Must be implemented in subclasses.")

    def _apply_twin(self, grad: Any, var: Variable, apply_state: Any = None) -> jax.Array:
        """A built-in's update of one variable and its slots, inside the step."""
        given_lr = _sets_own_learning_rate(type(self))
        tx = self._static_transformation(given_lr)  # built before the trace (see ``_compile``)
        template = tx.init([var.value])
        layout = codec.describe(template, 1)
        if layout.opaque or layout.scalar_slots(template):
            builtin = next(c for c in type(self).__mro__ if "_transformation" in c.__dict__)
            raise NotImplementedError(
                f"{type(self).__name__}: the update of {builtin.__name__} keeps "
                "state shared by all variables, so it cannot be applied one variable at a time "
                "from a tf.keras hook; write the update in the hook"
            )
        plain = {
            "plain:" + k: jnp.asarray(v, jnp.float32) for k, v in self._plain_hyperparams().items()
        }
        if given_lr:
            key = (var.device, var.dtype)
            coefficients = (apply_state or {}).get(key) or self._fallback_apply_state(*key)
            plain["plain:learning_rate"] = jnp.asarray(coefficients["lr_t"], jnp.float32)
            plain["plain:decay"] = jnp.zeros((), jnp.float32)
        self._apply_transformation(tx, [(grad, var)], plain, None, constrain=False)
        return var.value

    def _resource_apply_sparse_duplicate_indices(
        self, grad: Any, handle: Variable, indices: Any, **kwargs: Any
    ) -> Any:
        """Sums duplicate indices, then calls :meth:`_resource_apply_sparse`."""
        from kopt.sparse import deduplicate

        d = deduplicate(IndexedSlices(grad, indices, handle.shape), handle.shape[0])
        return self._resource_apply_sparse(d.values, handle, d.indices, **kwargs)

    @property
    def _dense_apply_args(self) -> list[str]:
        """The argument names of ``_resource_apply_dense``, as tf.keras lists them (wrappers
        check for ``"apply_state"`` before passing it)."""
        return inspect.getfullargspec(self._resource_apply_dense).args

    @property
    def _sparse_apply_args(self) -> list[str]:
        """The argument names of ``_resource_apply_sparse``, as tf.keras lists them."""
        return inspect.getfullargspec(self._resource_apply_sparse).args

    def _call_if_callable(self, param: Any) -> Any:
        """``param()`` for a callable, else ``param`` (tf.keras's helper)."""
        return param() if callable(param) else param

    def _create_hypers(self) -> None:
        """tf.keras makes its hyperparameter variables here; kopt's exist from ``_set_hyper``,
        so there is nothing to do."""

    def _resource_scatter_add(self, x: Variable, i: Any, v: Any) -> jax.Array:
        """Adds rows ``v`` to ``x`` at ``i`` (repeats add up) and returns ``x``'s new value, as
        tf.keras's helper. Out-of-range indices (the padding a sparse hook gets) are dropped."""
        from kopt.sparse import scatter_add_rows

        x.assign(scatter_add_rows(x.value, jnp.asarray(_value_of(i)), _value_of(v)))
        return x.value

    def _resource_scatter_update(self, x: Variable, i: Any, v: Any) -> jax.Array:
        """Writes rows ``v`` into ``x`` at ``i`` and returns ``x``'s new value, as tf.keras's
        helper. Out-of-range indices (the padding a sparse hook gets) are dropped."""
        from kopt.sparse import scatter_rows

        x.assign(scatter_rows(x.value, jnp.asarray(_value_of(i)), jnp.asarray(_value_of(v))))
        return x.value

    def _prepare(self, var_list: list[Variable]) -> dict[Any, dict[str, Any]]:
        apply_state: dict[Any, dict[str, Any]] = {}
        for var in var_list:
            key = (var.device, var.dtype)
            if key not in apply_state:
                apply_state[key] = {}
                self._prepare_local(var.device, var.dtype, apply_state)
        return apply_state

    def _prepare_local(self, var_device: Any, var_dtype: Any, apply_state: dict) -> None:
        if "learning_rate" in self._hyper:
            apply_state[(var_device, var_dtype)]["lr_t"] = self._decayed_lr(var_dtype)

    def _fallback_apply_state(self, var_device: Any, var_dtype: Any) -> dict[str, Any]:
        apply_state = {(var_device, var_dtype): {}}
        self._prepare_local(var_device, var_dtype, apply_state)
        return apply_state[(var_device, var_dtype)]

    def _transform_loss(self, loss: Any) -> Any:
        return loss

    def _transform_unaggregated_gradients(self, grads_and_vars):
        return grads_and_vars

    def _aggregate_gradients(self, grads_and_vars):
        return self.gradient_aggregator(grads_and_vars)

    def _transform_gradients(self, grads_and_vars):
        """Clipping (``clipvalue``, ``clipnorm``, ``global_clipnorm``) then
        ``gradient_transformers``, in tf.keras's order."""
        hypers = self.__dict__.get("_step_clip_values", {})
        active = self._clips_before_step()
        for attr, make in _CLIP_PIECES.items():
            if attr not in active:
                continue
            value = hypers.get(attr, active[attr])
            grads = [g for g, _ in grads_and_vars]
            tx = make(value)
            params = [v.value for _, v in grads_and_vars]  # grads may be IndexedSlices
            clipped, _ = tx.update(grads, tx.init(params))
            grads_and_vars = list(zip(clipped, [v for _, v in grads_and_vars], strict=True))
        for transformer in self.gradient_transformers:
            grads_and_vars = transformer(grads_and_vars)
        return grads_and_vars

    def _valid_dtypes(self) -> set:
        return {jnp.dtype(d) for d in _VALID_DTYPES}

    # --- the functional twin -----------------------------------------------------------------
    def _transformation(self, hyperparams: dict[str, Any]) -> core.GradientTransformation:
        """Built-ins: the functional twin, given each hyperparameter as a number (a placeholder;
        the step passes the current value) or a schedule."""
        raise NotImplementedError

    def _transformation_hyperparams(self, hyper: dict[str, Any] | None = None) -> dict[str, Any]:
        """Hyperparameter name -> current value (number/array) or schedule, from ``hyper``
        (default: the optimizer's)."""
        out = {}
        for name, value in (self._hyper if hyper is None else hyper).items():
            if isinstance(value, Variable):
                out[name] = value
            elif _is_step_schedule(value):
                out[name] = value
            elif callable(value):
                out[name] = _called(self, name, value)
            else:
                out[name] = value
        return out

    def _uses_transformation(self) -> bool:
        """Whether the step runs the functional twin for all variables at once: a built-in's
        does, unless a subclass overrides a tf.keras hook (LazyAdam's sparse update, a
        decoupled-weight-decay mixin); then the step runs the hooks, and the built-in's own
        hooks apply its twin one variable at a time."""
        return _runs_twin(type(self))

    def _has_twin(self) -> bool:
        """Whether the class (a built-in or a subclass of one) has a functional twin."""
        return type(self)._transformation is not Optimizer._transformation

    def _build_transformation(self, hyperparams: dict[str, Any]) -> core.GradientTransformation:
        """:meth:`_transformation`, with its argument errors naming this optimizer's class."""
        with core.reported_as(type(self).__name__):
            return self._transformation(hyperparams)

    def _check_hyperparameters(self) -> None:
        """Builds the functional twin once to check the constructor's hyperparameters. One given
        as a zero-argument callable is read at the first step, not here, as in tf.keras; the
        others are then checked at that step too."""
        if any(map(_is_read_per_step, self._hyper.values())):
            return
        self._check_attributes()

    def _static_transformation(self, given_lr: bool = False) -> core.GradientTransformation:
        """The twin with schedules in place and numbers as placeholders, cached per schedules.
        With ``given_lr``, its learning rate is a plain number and its decay 0: the step
        passes the learning rate a subclass's ``_decayed_lr`` or ``_prepare_local`` gives."""
        hp = self._transformation_hyperparams()
        if given_lr:
            hp = {**hp, "learning_rate": 0.0, **({"decay": 0.0} if "decay" in hp else {})}
        key = tuple(
            (k, id(v)) if _is_step_schedule(v) else (k, None) for k, v in sorted(hp.items())
        ) + (self._structure(), given_lr)
        tx = self._transformations.get(key)
        if tx is None:
            tx = self._build_transformation(_placeholders(hp))
            self._transformations[key] = tx
        return tx

    def _functional_name(self, name: str) -> str:
        return name

    def as_transformation(self) -> core.GradientTransformation:
        """The same algorithm as a pure :class:`kopt.GradientTransformation`, with this
        optimizer's current hyperparameters and clipping (built-ins and
        :func:`from_transformation` optimizers).

        Example:
            >>> import jax.numpy as jnp, kopt
            >>> tx = kopt.optimizers.Adam(learning_rate=0.1, clipnorm=1.0).as_transformation()
            >>> state = tx.init(jnp.zeros(2))
            >>> float(kopt.get_hyperparam(state, "learning_rate"))
            0.10000000149011612
        """
        if not self._uses_transformation():
            raise NotImplementedError(
                f"{type(self).__name__}.as_transformation: only optimizers with a functional "
                "twin (the built-ins and from_transformation) can be turned into a transformation"
            )
        hooks = [
            name
            for name, unchanged in (
                ("gradient_aggregator", self.gradient_aggregator is all_reduce_sum_gradients),
                ("gradient_transformers", not self.gradient_transformers),
            )
            if not unchanged
        ]
        if hooks:  # functions of [(grad, var)] lists, which a pure transformation does not have
            raise NotImplementedError(
                f"{type(self).__name__}.as_transformation: the optimizer's "
                f"{' and '.join(f'`{h}`' for h in hooks)} cannot go into a transformation (they "
                "take (gradient, variable) pairs); put the same processing in the chain "
                "yourself, e.g. kopt.chain(your_piece, optimizer.as_transformation()) with the "
                "optimizer built without them"
            )
        hp = {
            k: v if _is_step_schedule(v) else jnp.asarray(_plain(v), jnp.float32)
            for k, v in self._transformation_hyperparams().items()
        }
        active = self._clips_before_step()
        pieces = [make(active[attr]) for attr, make in _CLIP_PIECES.items() if attr in active]
        pieces.append(self._build_transformation(hp))
        return core.chain(*pieces) if len(pieces) > 1 else pieces[0]

    def _create_transformation_slots(self, var_list: list[Variable]) -> None:
        """Creates the slots ``var_list`` lacks: all of them for a variable new to this
        optimizer, and those a structural attribute (``amsgrad``, ``centered``...) set since
        its slots were made now calls for, as tf.keras's eager ``_create_slots`` does on every
        call. Existing slots keep their values; ones no longer used stay, as in tf.keras."""
        structure = self._structure()
        todo = [
            v
            for v in var_list
            if v._uid not in self._slots or self._slot_structure.get(v._uid) != structure
        ]
        if not todo:
            return
        new = [v for v in todo if v._uid not in self._slots]
        tx = self._static_transformation()
        state = tx.init([v._current for v in todo])
        layout = codec.describe(state, len(todo), self._OWN_WRAPPED_COUNTS)
        stale = [v for v in todo if v._uid in self._slots]
        if stale:
            self._check_opaque_unchanged(layout.opaque_values(state), stale)
        if layout.opaque and (self._opaque_owner is None or new):
            self._create_opaque(state, layout, var_list, new)
        for name, value in layout.scalar_slots(state).items():
            if name not in self._non_slot:
                weight = Variable(value, trainable=False, name=f"{self._name}/{name}")
                self._non_slot[name] = weight
                self._weights.append(weight)
        per_var = layout.slot_values(state)
        names = [n for n in self._SLOT_ORDER if n in per_var] + [
            n for n in per_var if n not in self._SLOT_ORDER
        ]
        if self._INTERLEAVE_SLOTS:
            order = [(i, name) for i in range(len(todo)) for name in names]
        else:
            order = [(i, name) for name in names for i in range(len(todo))]
        created = []
        for i, name in order:
            var = todo[i]
            value = per_var[name][i]
            # None: the transformation keeps no such slot for this variable (a masked-out one,
            # or one a multi_transform group without that slot steps).
            if value is not None and name not in self._slots.get(var._uid, ()):
                slot = self.add_slot(var, name, value, shape=jnp.shape(value))
                if slot.dtype != jnp.result_type(value):
                    # The transformation's slot dtype (a wrapped kopt.adam(slot_dtype=...)),
                    # not tf.keras's default of the variable's.
                    slot._value = _put_like(value, var.value)
                created.append(slot)
        for var in todo:
            self._slots.setdefault(var._uid, {})
            self._slot_owners[var._uid] = var
            self._slot_structure[var._uid] = structure
        if not any(_spread_sharding(v) is not None for v in var_list):
            # Small slots share buffers, so the step passes a few arrays instead of hundreds.
            self._slot_groups.extend(group_slots(created))

    def _check_opaque_unchanged(self, opaque: list[Any], stale: list[Variable]) -> None:
        """State without a slot name (accumulators, wrapped optax state) is made once: a
        structural change that would reshape it is refused, naming the attributes."""
        if [(jnp.shape(x), jnp.result_type(x)) for x in opaque] == [
            (w.shape, jnp.dtype(w.dtype)) for w in self._opaque
        ]:
            return
        before = dict(self._slot_structure.get(stale[0]._uid, ()))
        changed = [
            f"`{k}` ({before.get(k)!r} -> {v!r})"
            for k, v in self._structure()
            if k not in before or before[k] != v
        ]
        raise ValueError(
            f"{type(self).__name__}: {', '.join(changed) or 'the structure'} changed after the "
            "first step, which would change the state this optimizer keeps beside its slots; "
            "set it back, or start a new optimizer"
        )

    def _check_opaque_owner(self, var_list: list[Variable]) -> None:
        """State without a slot name (gradient accumulators, a wrapped transformation's state)
        holds every variable it was made for: a step over other variables is refused, naming
        them, before anything changes."""
        owner = self._opaque_owner
        if owner is None or tuple(v._uid for v in var_list) == owner:
            return
        stepped = {v._uid for v in var_list}
        names = {u: v.name for u, v in self._slot_owners.items()}
        missing = [names.get(u, "?") for u in owner if u not in stepped]
        extra = [v.name for v in var_list if v._uid not in set(owner)]
        detail = "; ".join(
            part
            for part in (
                f"no gradient for {missing}" if missing else "",
                f"not in its state: {extra}" if extra else "",
                "another order" if not (missing or extra) else "",
            )
            if part
        )
        raise ValueError(
            f"{type(self).__name__}: its state beside the slots (gradient accumulators, a "
            f"wrapped transformation's state) was made for {len(owner)} variables, and this "
            f"step is over others ({detail}); give every one of them a gradient on every call "
            "(zeros where there is none), in the same order"
        )

    def _create_opaque(self, state, layout, var_list, new) -> None:
        if self._opaque_owner is not None or len(new) != len(var_list):
            owner = self._opaque_owner or ()
            fresh = {v._uid for v in new}
            if owner:
                known = [self._slot_owners[u].name for u in owner if u in self._slot_owners]
            else:
                known = [v.name for v in var_list if v._uid not in fresh]
            added = [v.name for v in new if v._uid not in set(owner)]
            raise ValueError(
                f"{self._name}: its state beside the slots (gradient accumulators, a wrapped "
                "transformation's state) is made once, for the variables of its first step "
                f"({known}), and this step adds {added}; give every variable a gradient on "
                "every call (zeros where there is none), in the same order, from the first"
            )
        self._opaque_owner = tuple(v._uid for v in var_list)
        for i, leaf in enumerate(layout.opaque_values(state)):
            weight = Variable(leaf, trainable=False, name=f"{self._name}/state_{i}")
            self._opaque.append(weight)
            self._weights.append(weight)

    # --- the step ---------------------------------------------------------------------------
    def apply_gradients(
        self,
        grads_and_vars: Iterable[tuple[Any, Variable]],
        name: str | None = None,
        experimental_aggregate_gradients: bool = True,
    ) -> Variable | None:
        """Applies gradients to variables: one compiled step, then ``iterations += 1``.

        Args:
            grads_and_vars: pairs ``(gradient, variable)``; a gradient may be None (skipped with a
                warning), an array, a :class:`kopt.IndexedSlices` or a :class:`PerReplica`.
            name: ignored (kept for tf.keras compatibility).
            experimental_aggregate_gradients: False skips ``gradient_aggregator``.

        Returns:
            The ``iterations`` variable, or None when there was nothing to apply.

        Raises:
            TypeError: for a malformed pair, a non-variable, or a gradient of the wrong kind or
                dtype (dense or sparse).
            ValueError: if every gradient is None, a variable repeats, a shape is wrong, a
                ``PerReplica`` gradient is given with ``experimental_aggregate_gradients=False``,
                or a ``PerReplica`` holds only this process's replicas of a variable spanning
                several processes. A rejected call changes nothing.
        """
        if "_copy_memo" in self.__dict__:
            with self._lock:
                self._adopt_copies()
        pairs = _as_pairs(grads_and_vars)
        pairs = _filter_empty_gradients(pairs)
        if not pairs:
            return None
        signature = _signature(pairs, experimental_aggregate_gradients)
        # A signature with a cached step key stepped (so passed validation) before.
        memo = None if signature is None else self._key_memo.get(signature)
        if memo is None and (signature is None or signature not in self._validated):
            self._validate(pairs, experimental_aggregate_gradients)
        with (
            self._lock,
            self._naming_culprits("apply_gradients", [v for _, v in pairs], [g for g, _ in pairs]),
            _one_call_per_step(),
        ):
            if memo is not None and memo[0] == self._step_token():
                # These very variables stepped before and no weight was made since: nothing
                # to create, so nothing to roll back.
                self._run_step(pairs, experimental_aggregate_gradients, signature, memo)
            else:
                with self._rollback_on_error():
                    self._create_all_weights([v for _, v in pairs])
                    self._run_step(pairs, experimental_aggregate_gradients, signature)
        if signature is not None:
            self._validated.add(signature)
        return self._iterations

    def _validate(self, pairs, aggregate: bool) -> None:
        seen: dict[int, int] = {}
        valid = self._valid_dtypes()
        for i, (g, v) in enumerate(pairs):
            if not isinstance(v, Variable):
                raise TypeError(
                    f"apply_gradients: item {i} must pair a gradient with a kopt.Variable, "
                    f"received {type(v).__name__}: {v!r:.60}"
                )
            if v._uid in seen:
                raise ValueError(
                    f"apply_gradients: variable {v.name} appears twice (items {seen[v._uid]} and "
                    f"{i}); sum its gradients first"
                )
            seen[v._uid] = i
            if _is_traced(g) or isinstance(v._current, jax.core.Tracer):
                raise RuntimeError(
                    f"apply_gradients: the {'variable' if _is_traced(v._current) else 'gradient'}"
                    f" of {v.name} is a traced value: the optimizer is being called inside "
                    "jax.jit (or another JAX transformation). It keeps its state in Python "
                    "objects and compiles its own step, so call apply_gradients and minimize "
                    "outside jax.jit (as tf.keras code drops its tf.function); inside jitted "
                    "code, use its pure twin, opt.as_transformation(), or kopt's functional API"
                )
            if jnp.dtype(v.dtype) not in valid:
                raise ValueError(
                    f"Invalid type {v.dtype} for {v.name}, expected: "
                    f"{sorted(str(d) for d in valid)}."
                )
            _check_gradient(g, v, aggregate)

    @contextlib.contextmanager
    def _naming_culprits(self, where: str, var_list: list[Variable], grads: list[Any] = ()):
        """JAX's errors that name only an argument of the step re-raised naming the variables:
        a deleted buffer (a variable's value donated to the user's own jitted function), and
        variables, or a gradient and its variable, committed to different devices (one
        compiled step takes them all)."""
        try:
            yield
        except (RuntimeError, ValueError) as err:
            named = None
            # JAX says so with a RuntimeError ("Array has been deleted"), or, from a program
            # it has compiled already, a ValueError ("Buffer has been deleted or donated").
            if "deleted" in str(err):
                state = [self._iterations] if self._iterations is not None else []
                named = variables_module.deleted_error(
                    where, var_list + state + self._state_variables(var_list)
                )
            elif isinstance(err, ValueError) and "incompatible devices" in str(err):
                named = _devices_error(where, var_list, grads)
            if named is not None:
                raise named from err
            raise

    @contextlib.contextmanager
    def _rollback_on_error(self):
        before = (
            list(self._weights),
            {k: dict(s) for k, s in self._slots.items()},
            list(self._slot_names),
            self._iterations,
            dict(self._non_slot),
            list(self._opaque),
            self._opaque_owner,
            list(self._slot_groups),
            dict(self._slot_structure),
        )
        try:
            yield
        except BaseException:
            (
                self._weights[:],
                slots,
                self._slot_names[:],
                self._iterations,
                non_slot,
                opaque,
                self._opaque_owner,
                self._slot_groups[:],
                slot_structure,
            ) = before
            self._slot_structure.clear()
            self._slot_structure.update(slot_structure)
            self._slots.clear()
            self._slots.update(slots)
            for uid in [uid for uid in self._slot_owners if uid not in slots]:
                del self._slot_owners[uid]
            self._non_slot.clear()
            self._non_slot.update(non_slot)
            self._opaque[:] = opaque
            raise

    def _place_state(
        self, var_list: list[Variable], grads: list[Any] = (), extra: tuple[Variable, ...] = ()
    ) -> None:
        """Puts ``iterations`` and the uncommitted variables and optimizer state (slots, scalar
        slots, a wrapped transformation's state, ``add_weight`` weights, a LossScaleOptimizer's
        scale) where the step would return them: replicated over the mesh some variables span,
        else on the one device a variable (failing that, a gradient) is committed to. Otherwise
        the first step changes their placement, and the second step compiles again.
        ``extra``: other variables to place as the state (a loss scale the loss reads)."""
        mesh = next((s.mesh for s in map(_spread_sharding, var_list) if s is not None), None)
        if mesh is not None:
            target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

            def in_place(value):
                return isinstance(value.sharding, jax.sharding.NamedSharding) and (
                    value.sharding.mesh == mesh
                )
        else:
            target = _committed_device([v._storage for v in var_list] + list(grads))
            if target is None:
                target = _per_replica_device(grads, var_list)
            if target is None:
                return

            def in_place(value):
                return value.committed and value.sharding == target

        if self.__dict__.get("_constants_target") != target:
            # The step's scalar constants (_device_constant) are made there from now on: an
            # argument on another device is copied at every call.
            self.__dict__["_constants_target"] = target
            self.__dict__.pop("_constants", None)
        state = self._state_variables(var_list)
        if extra:
            state += [v for v in extra if all(v is not s for s in state)]
        # The hyperparameter variables the optimizers made (uncommitted): a variable the user
        # gave is the user's to place (it may serve optimizers on other devices).
        state += [
            v
            for owner in (self, *self._nested_optimizers())
            for v in owner.__dict__.get("_number_hypers", {}).values()
        ]
        for g in dict.fromkeys(s._group for s in state if isinstance(s, PackedSlot)):
            if not in_place(g.buffer):
                g.buffer = variables_module._full_spec(jax.device_put(g.buffer, target))
        movable = [self._iterations] if self._iterations is not None else []
        # Moved even when committed elsewhere: the step count, and a loss scale (which its
        # optimizer commits beside the loss it scales before a step has run).
        forced = movable + list(extra)
        if self._guard is not None:
            forced += self._guard._guard_variables()
        for v in movable + var_list + state:
            if isinstance(v, PackedSlot):
                continue
            value = v._storage
            if isinstance(value, jax.core.Tracer) or not isinstance(value, jax.Array):
                continue
            if in_place(value):
                continue
            if not value.committed or any(v is f for f in forced):
                v._value = variables_module._full_spec(jax.device_put(value, target))

    def _step_token(self) -> tuple:
        """What a cached step key of a signature stays valid for (see ``_run_step``)."""
        return (
            len(self._weights),
            len(self._added_weights),
            variables_module.placement_epoch[0],
            self.__dict__.get("_attribute_epoch", 0),
            self._key_token(),
            self._traced_attributes(small=True),  # a list attribute may change in place
        )

    def _traced_attributes(self, small: bool = False) -> tuple:
        """Public plain attributes of a custom optimizer (one that updates through
        ``_resource_apply_*``): numbers, flags, strings, and lists, tuples, sets and dicts of
        them (an ``exclude_from_weight_decay`` list, a ``betas`` tuple). Its hooks may read them
        while the step is traced, so the compiled step is kept per their values. Setting one
        between steps then takes effect, as in tf.keras run eagerly (compiling once per new
        value); a value meant to change often belongs in a hyperparameter (``_set_hyper``).
        ``small`` (the per-call check) leaves out containers longer than ``_SMALL_CONTAINER``:
        changing one of those in place goes unseen, reassigning it does not."""
        if self._uses_transformation():
            return ()
        written = self.__dict__.get("_written_in_trace", ())
        out = []
        for name, value in self.__dict__.items():
            if name[0] == "_" or name == "compile_count" or name in written:
                continue
            if small and isinstance(value, _CONTAINERS) and len(value) > _SMALL_CONTAINER:
                continue  # read per call only if small; reassigning a large one still counts
            key = _plain_key(value)
            if key is _NOT_PLAIN:
                key = _array_key(value)
            if key is not _NOT_PLAIN:
                out.append((name, key))
        return tuple(sorted(out, key=lambda item: item[0]))

    def _run_step(self, pairs, aggregate: bool, signature=None, memo=None) -> None:
        for inner in self._nested_optimizers():
            # A held optimizer's hooks read its step count (Adam's bias correction): made
            # here, outside the trace, not as a traced value while the step is compiled.
            _ = inner.iterations
        var_list = [v for _, v in pairs]
        grads = [g.value if isinstance(g, Variable) else g for g, _ in pairs]
        hyper_vars, dynamic = self._step_arguments()
        captured = self._captured_variables(var_list, hyper_vars)
        # The per-variable parts of the key (slots, shardings, constraints) only change when a
        # weight is created or a variable takes a multi-device value: a repeated call with the
        # same signature reuses them instead of walking every variable again.
        if memo is not None:
            token, key, plan = memo
        else:
            self._place_state(var_list, grads)
            # Made before the step's placement was known (its first call, or a new one).
            dynamic = {k: self._placed(value) for k, value in dynamic.items()}
            token = self._step_token()
            state_vars = self._state_variables(var_list)
            plan = _plan_state(state_vars)
            key = self._program_key(var_list, grads, aggregate, state_vars, hyper_vars, signature)
            key += (tuple(g.uid for g in plan.groups),)
        program_key = key + (tuple(c._uid for c in captured),) if captured else key
        program = self._programs.get(program_key)
        if program is None:
            program = self._compile(var_list, plan, hyper_vars, grads, aggregate, captured)
        # Placed now that the variables are (_place_state may have moved them).
        grads = [
            _per_replica_beside(g, v) if type(g) is PerReplica else g
            for g, v in zip(grads, var_list, strict=True)
        ]
        loose = plan.loose
        with donation_lock:  # no other thread picks up a buffer while it is donated
            # Each buffer itself, or (handed out since) a copy, the copies made in one call.
            values = variables_module.donatable_values(var_list + loose)
            var_values, state_values = values[: len(var_list)], values[len(var_list) :]
            # Grouped slots travel as their groups' buffers, which are never handed out.
            state_values += [g.buffer for g in plan.groups]
            try:
                new_vars, new_state, new_iterations, new_captured, new_attributes = program(
                    var_values,
                    grads,
                    state_values,
                    self.iterations.value,
                    [h.value for h in hyper_vars] + [c.value for c in captured],
                    dynamic,
                )
            except _SlotMadeInStep:
                # A hook made a slot while the step was traced (nothing ran): the step again,
                # now with the slot, at its initial value, among its inputs.
                return self._run_step(pairs, aggregate, signature)
            n_loose = len(loose)
            for c, value in zip(captured, new_captured, strict=True):
                c._value = value  # bound inside a trace, stored otherwise
            for owner, attributes in zip(
                (self, *self._nested_optimizers()), new_attributes, strict=False
            ):
                owner.__dict__.update(attributes)
            if getattr(_bindings, "table", None):  # inside a trace: bind, do not store
                for v, value in zip(var_list, new_vars, strict=True):
                    v._value = value
                for s, value in zip(loose, new_state[:n_loose], strict=True):
                    s._value = value
                for g, value in zip(plan.groups, new_state[n_loose:], strict=True):
                    for m, part in zip(g.members, g.split(value), strict=True):
                        m._value = part
                self._iterations._value = new_iterations
            else:  # the setter's work, once for all (donation_lock is held)
                for v, value in zip(var_list, new_vars, strict=True):
                    v._storage = value
                    v._handed_out = False
                for s, value in zip(loose, new_state[:n_loose], strict=True):
                    s._storage = value
                    s._handed_out = False
                for g, value in zip(plan.groups, new_state[n_loose:], strict=True):
                    g.buffer = value
                self._iterations._value = new_iterations
        # Cached once it ran: a failed one may bind dropped slots.
        self._programs[program_key] = program
        if signature is not None:
            if len(self._key_memo) >= _MAX_KEY_MEMO and signature not in self._key_memo:
                del self._key_memo[next(iter(self._key_memo))]  # the oldest
            self._key_memo[signature] = (token, key, plan)

    def _captured_variables(
        self, var_list: list[Variable], hyper_vars: list[Variable]
    ) -> list[Variable]:
        """Variables the step's code may read that are not the step's own: kept in a public
        attribute of this optimizer or of one it holds (or in a list, tuple or dict there), or
        in a hyperparameter's schedule object. As ``tf.function`` captures them, the step takes
        their current values as inputs and writes back what its hooks assign to them. A
        container longer than ``_SMALL_CONTAINER`` (a loss history) is read once, not per call:
        a variable put into it in place is not seen, one in a container assigned anew is."""
        found: dict[int, Variable] = {}
        large = self.__dict__.setdefault("_large_containers", {})

        def take(value):
            if isinstance(value, Variable):
                found.setdefault(id(value), value)
            elif isinstance(value, (list, tuple, dict)):
                if len(value) > _SMALL_CONTAINER:
                    held = large.get(id(value))
                    if held is None or held[0] is not value:
                        if len(large) > 64:
                            large.clear()
                        held = large[id(value)] = (value, _variables_in(value))
                    items = held[1]
                else:
                    items = value.values() if isinstance(value, dict) else value
                for item in items:
                    if isinstance(item, Variable):
                        found.setdefault(id(item), item)

        owners = (self, *self._nested_optimizers())
        for owner in owners:
            for name, value in owner.__dict__.items():
                if name[0] != "_":
                    take(value)
            for value in owner._hyper.values():
                if not isinstance(value, Variable) and hasattr(value, "__dict__"):
                    for name, inner in vars(value).items():
                        if name[0] != "_":
                            take(inner)
        if not found:
            return []
        own = {id(v) for v in var_list} | {id(v) for v in hyper_vars}
        for owner in owners:
            own.update(id(w) for w in owner._weights)
            if owner._iterations is not None:
                own.add(id(owner._iterations))
        return [v for k, v in found.items() if k not in own]

    def _state_variables(self, var_list: list[Variable]) -> list[Variable]:
        """Every optimizer variable one step reads and writes, in a fixed order."""
        out = list(self._non_slot.values()) + list(self._opaque) + list(self._added_weights)
        for v in var_list:
            out.extend(self._slots.get(v._uid, {}).values())
        for inner in self._nested_optimizers():
            if inner._iterations is not None and inner._iterations is not self._iterations:
                out.append(inner._iterations)
            out.extend(inner._non_slot.values())
            out.extend(inner._opaque)
            out.extend(inner._added_weights)
            for v in var_list:
                out.extend(inner._slots.get(v._uid, {}).values())
        if self._guard is not None:  # a LossScaleOptimizer's scale, updated in the same step
            out.extend(self._guard._guard_variables())
        return out

    def _nested_optimizers(self) -> list[Optimizer]:
        """The optimizers this one holds in its attributes (a Lookahead's inner optimizer, as
        tf-addons writes it), nested ones too. A hook may call theirs, so their slots,
        hyperparameters and step count are inputs of this one's step."""
        memo = self.__dict__.get("_nested_memo")
        if memo is not None and memo[0] == _nesting_epoch[0]:
            return memo[1]
        out: list[Optimizer] = []
        seen = {id(self)}
        todo = [self]
        # A list or dict attribute may change in place, unseen by __setattr__: where one
        # holds an optimizer, the search is not remembered but made again at each call.
        in_container = False
        while todo:
            for name, value in todo.pop().__dict__.items():
                if name == "_guard" or name in _OWN_CONTAINERS:
                    continue
                if isinstance(value, (list, tuple, dict)):
                    found = list(_held_optimizers(value))
                    in_container = in_container or bool(found)
                else:
                    found = [value] if isinstance(value, Optimizer) else []
                for inner in found:
                    if id(inner) not in seen:
                        seen.add(id(inner))
                        out.append(inner)
                        todo.append(inner)
        self.__dict__["_nested_memo"] = None if in_container else (_nesting_epoch[0], out)
        return out

    def _step_arguments(self) -> tuple[list[Variable], dict[str, jax.Array]]:
        """Hyperparameter variables (bound in the step) and the other dynamic values."""
        hyper_vars = [v for v in self._hyper.values() if isinstance(v, Variable)]
        dynamic = {}
        for name, value in self._hyper.items():
            if _is_read_per_step(value):
                dynamic["hyper:" + name] = self._placed(
                    jnp.asarray(_called(self, name, value), jnp.float32)
                )
        nested = self._nested_optimizers()
        if nested:
            uids = {v._uid for v in hyper_vars}
            for i, inner in enumerate(nested):
                for name, value in inner._hyper.items():
                    if isinstance(value, Variable) and value._uid not in uids:
                        uids.add(value._uid)
                        hyper_vars.append(value)
                    elif _is_read_per_step(value):
                        dynamic[f"nested:{i}:{name}"] = self._placed(
                            jnp.asarray(_called(inner, name, value), jnp.float32)
                        )
        for attr, value in self._active_clips().items():
            dynamic["clip:" + attr] = self._device_constant(value)
        if self._uses_transformation():
            for name, value in self._plain_hyperparams().items():
                dynamic["plain:" + name] = self._device_constant(value)
        return hyper_vars, dynamic

    def _placed(self, value: jax.Array) -> jax.Array:
        """A step's scalar input where the step runs (see ``_place_state``)."""
        target = self.__dict__.get("_constants_target")
        if target is None or isinstance(value, jax.core.Tracer) or value.sharding == target:
            return value
        return jax.device_put(value, target)

    def _device_constant(self, value: Any) -> jax.Array:
        """A float32 device scalar for a Python number, made once per distinct value."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return self._placed(jnp.asarray(value, jnp.float32))
        cache = self.__dict__.setdefault("_constants", {})
        out = cache.get(value)
        if out is None:
            if len(cache) > 64:
                cache.clear()
            target = self.__dict__.get("_constants_target")
            out = np.float32(value)
            out = cache[value] = jnp.asarray(out) if target is None else jax.device_put(out, target)
        return out

    def _structure(self) -> tuple[tuple[str, Any], ...]:
        """``(name, value)`` of the plain attributes that choose the update's form rather than
        its numbers (``_STRUCTURAL``): changing one rebuilds the step and makes the slots it
        calls for."""
        return tuple((name, getattr(self, name, None)) for name in self._STRUCTURAL)

    def _plain_hyperparams(self) -> dict[str, float]:
        """Built-ins: functional hyperparameters that are plain attributes in Keras (epsilon)."""
        return {}

    def _key_token(self) -> tuple:
        """The parts of a step's key that are not per variable (cheap to recompute)."""
        hyper_kinds = tuple(
            (
                k,
                ("var", v._uid)
                if isinstance(v, Variable)
                else _schedule_key(v)
                if _is_step_schedule(v)
                else "call",
            )
            for k, v in self._hyper.items()
        )
        return (
            hyper_kinds,
            tuple(self._active_clips()),
            _Same(self.gradient_aggregator),
            tuple(_Same(t) for t in self.gradient_transformers),
            self._initial_decay,
            None if self._guard is None else self._guard._guard_key(),
            self._structure(),
            tuple(
                (
                    _Same(inner),
                    inner._key_token(),
                    inner._traced_attributes(small=True),
                    tuple(inner._plain_hyperparams().items()),
                    len(inner._weights),
                )
                for inner in self._nested_optimizers()
            ),
        )

    def _program_key(self, var_list, grads, aggregate: bool, state_vars, hyper_vars, signature):
        if signature is None:
            signature = _signature(list(zip(grads, var_list, strict=True)), aggregate)
        return (
            signature,
            tuple(s._uid for s in state_vars),  # the program binds these very variables
            tuple(h._uid for h in hyper_vars),
            tuple(_sharding_key(_spread_sharding(v)) for v in var_list),
            tuple(_Same(v.constraint) for v in var_list),
            self._key_token(),
            _Hashed(self._traced_attributes()),  # may be large: hashed once, not per call
        )

    def _compile(self, var_list, plan, hyper_vars, grads, aggregate: bool, captured=()):
        self._check_opaque_owner(var_list)
        iterations = self.iterations
        # Built outside the trace: its placeholders need the hyperparameters' concrete values.
        tx = self._static_transformation() if self._uses_transformation() else None
        for owner in (self, *self._nested_optimizers()):
            if owner._has_twin():  # a built-in's hooks, called by a subclass or a wrapper
                owner._static_transformation(_sets_own_learning_rate(type(owner)))
        # For these variables, in this order: gradient hooks may drop or reorder pairs.
        template = None if tx is None else (_uids(var_list), _state_template(tx, var_list))
        # Every sharded variable and slot leaves the step with the sharding it came in with.
        var_shardings = [_spread_sharding(v) for v in var_list]
        loose = plan.loose
        state_shardings = [_spread_sharding(s) for s in loose]
        guard = self._guard
        # A guarded step on the CPU keeps a skipped step's values with a conditional (see
        # below); elsewhere with selects, which XLA:GPU fuses into the update's own loops, where
        # a conditional would make the host wait for the predicate.
        guard_cond = guard is not None and _on_cpu(var_list)
        # Variables on one device, whose small gradients the guard checks packed.
        packable = {v._uid for v, sh in zip(var_list, var_shardings, strict=True) if sh is None}
        # Variables over explicit mesh axes, whose gradients take their split (see _split_as).
        explicit = {
            v._uid: sh
            for v, sh in zip(var_list, var_shardings, strict=True)
            if sh is not None and _explicit(sh)
        }
        # The program is kept in ``self._programs``: its closures hold the optimizers weakly,
        # or each optimizer would be in a reference cycle that only the cyclic garbage
        # collector frees (a search making an optimizer per trial held every trial's slots).
        owners = tuple(weakref.proxy(o) for o in (self, *self._nested_optimizers()))
        self = owners[0]  # noqa: PLW0642 - the closures below see the weak one
        guard = None if guard is None else weakref.proxy(guard)
        # The variables too: the program is found by their ids only while they live, and a
        # strong reference kept every variable ever stepped (and its memory) alive.
        var_refs = [weakref.ref(v) for v in var_list]
        del var_list

        def traced(var_values, grads, state_values, iteration, hyper_values, dynamic):
            self.compile_count += 1
            var_list = [ref() for ref in var_refs]
            # Each grouped slot this step touches is bound to its slice of its group's buffer.
            state_vars, state_inputs = list(loose), list(state_values[: len(loose)])
            group_parts = []
            for g, buffer, present in zip(
                plan.groups, state_values[len(loose) :], plan.present, strict=True
            ):
                parts = g.split(buffer)
                group_parts.append(parts)
                for m, part, here in zip(g.members, parts, present, strict=True):
                    if here:
                        state_vars.append(m)
                        state_inputs.append(part)
            with (
                bound(var_list, var_values),
                bound(state_vars, state_inputs),
                bound([iterations], [iteration]),
                bound(list(hyper_vars) + list(captured), hyper_values),
                self._step_values(dynamic),
            ):
                gv = list(zip(grads, var_list, strict=True))
                if aggregate:
                    gv = self._transform_unaggregated_gradients(gv)
                    gv = self._aggregate_gradients(gv)
                for g, v in gv:
                    if isinstance(g, PerReplica) and not aggregate:
                        raise ValueError(
                            f"apply_gradients: the gradient of {v.name} is per-replica, but "
                            "experimental_aggregate_gradients=False skips the aggregation: "
                            "give gradients already reduced across replicas, or leave it True"
                        )
                    if isinstance(g, PerReplica):
                        raise ValueError(
                            f"apply_gradients: the gradient of {v.name} is still per-replica "
                            "after aggregation; reduce it in your gradient_aggregator"
                        )
                gv = [(_split_as(g, explicit.get(v._uid)), v) for g, v in gv]
                # A guard decides on the aggregated gradients, as tf.keras's wrapper does.
                aggregated = list(gv)

                def update():
                    """The step's new variables, loose slots, group buffers and count."""
                    transformed = self._transform_gradients(gv)
                    if tx is not None:
                        self._apply_transformation(tx, transformed, dynamic, template)
                    else:
                        self._apply_hooks(transformed)
                    return (
                        [v.value for v in var_list],
                        [s.value for s in loose],
                        [
                            jnp.concatenate(
                                [
                                    jnp.ravel(m.value if here else part)
                                    for m, part, here in zip(g.members, parts, present, strict=True)
                                ]
                            )
                            for g, parts, present in zip(
                                plan.groups, group_parts, plan.present, strict=True
                            )
                        ],
                        core.safe_increment(jnp.asarray(iterations.value)),
                        [c.value for c in captured],
                    )

                old_captured = list(hyper_values[len(hyper_vars) :])
                if guard is None:
                    new_vars, new_loose, new_groups, new_iteration, new_captured = update()
                elif guard_cond:
                    # Not all finite: every input is kept as it came (the guard's own scale and
                    # counter excepted, which it updates below). On the CPU a conditional, not a
                    # select of each new value against its old one: the selects made XLA:CPU
                    # copy every slot to keep its old value readable, about 4x the time of the
                    # plain step at 10M params; the conditional updates in place.
                    finite = _gradients_finite(aggregated, packable)
                    old = (
                        list(var_values),
                        list(state_values[: len(loose)]),
                        list(state_values[len(loose) :]),
                        iteration,
                        old_captured,
                    )

                    def applied():
                        # Each value as its input came (dtype, and no weak type), so that
                        # both branches give the same types.
                        return jax.tree.map(_typed_like, update(), old)

                    new_vars, new_loose, new_groups, new_iteration, new_captured = jax.lax.cond(
                        finite, applied, lambda: old
                    )
                    guard._guard_update(finite)
                    kept = {v._uid for v in guard._guard_variables()}
                    new_loose = [
                        s.value if s._uid in kept else n
                        for s, n in zip(loose, new_loose, strict=True)
                    ]
                else:
                    new_vars, new_loose, new_groups, new_iteration, new_captured = update()
                    finite = _gradients_finite(aggregated, packable)
                    guard._guard_update(finite)
                    kept = {v._uid for v in guard._guard_variables()}
                    new_vars = [
                        jnp.where(finite, n, o) for n, o in zip(new_vars, var_values, strict=True)
                    ]
                    new_loose = [
                        s.value if s._uid in kept else jnp.where(finite, n, o)
                        for s, n, o in zip(loose, new_loose, state_values, strict=False)
                    ]
                    new_groups = [
                        jnp.where(finite, n, o)
                        for n, o in zip(new_groups, state_values[len(loose) :], strict=True)
                    ]
                    new_iteration = jnp.where(finite, new_iteration, iteration)
                    new_captured = [
                        jnp.where(finite, n, o)
                        for n, o in zip(new_captured, old_captured, strict=True)
                    ]
                return (
                    [
                        _constrain(value, sh)
                        for value, sh in zip(new_vars, var_shardings, strict=True)
                    ],
                    [
                        _constrain(value, sh)
                        for value, sh in zip(new_loose, state_shardings, strict=True)
                    ]
                    + new_groups,
                    new_iteration,
                    new_captured,
                    # Arrays a hook stored in a plain attribute (a diagnostic such as
                    # `self.last_norm`), of this optimizer or one it holds: the step's values,
                    # set on them after it. Inside a guard's conditional they cannot leave it,
                    # and are not kept.
                    [{} if guard is not None else _written_arrays(o) for o in owners],
                )

        def step(*args):
            # Attributes the hooks write while traced are not inputs of the step.
            for owner in owners:
                owner.__dict__["_tracing"] = owner.__dict__.get("_tracing", 0) + 1
                owner.__dict__["_written_now"] = set()  # by this trace
                owner.__dict__["_written_before"] = {}
                owner.__dict__["_made_in_step"] = []
            try:
                out = traced(*args)
                made = [m for owner in owners for m in owner.__dict__["_made_in_step"]]
                if made:
                    for slot, initial in made:  # the trace assigned them traced values
                        slot._value = initial
                    raise _SlotMadeInStep([slot for slot, _ in made])
                return out
            except BaseException as err:
                # A failed trace leaves no traced value on the optimizers' attributes.
                for owner in owners:
                    for name, value in owner.__dict__["_written_before"].items():
                        if value is _UNSET:
                            owner.__dict__.pop(name, None)
                        else:
                            owner.__dict__[name] = value
                if isinstance(err, _SlotMadeInStep):
                    self.compile_count -= 1  # traced again, with the slot, and compiled then
                raise
            finally:
                for owner in owners:
                    owner.__dict__["_tracing"] -= 1
                    owner.__dict__.pop("_written_now", None)
                    owner.__dict__.pop("_written_before", None)
                    owner.__dict__.pop("_made_in_step", None)

        return jax.jit(step, donate_argnums=(0, 2))

    @contextlib.contextmanager
    def _step_values(self, dynamic):
        clips = {k[5:]: v for k, v in dynamic.items() if k.startswith("clip:")}
        calls = {k[6:]: v for k, v in dynamic.items() if k.startswith("hyper:")}
        saved = {name: self._hyper[name] for name in calls}
        object.__setattr__(self, "_step_clip_values", clips)
        object.__setattr__(self, "_step_dynamic", dynamic)
        for name, value in calls.items():
            self._hyper[name] = _Constant(value)
        # A nested optimizer's callable hyperparameters, read once per step as this one's.
        nested = [k.split(":", 2) for k in dynamic if k.startswith("nested:")]
        inners = self._nested_optimizers() if nested else []
        nested_saved = []
        for _, i, name in nested:
            inner = inners[int(i)]
            nested_saved.append((inner, name, inner._hyper[name]))
            inner._hyper[name] = _Constant(dynamic[f"nested:{i}:{name}"])
        try:
            yield
        finally:
            self.__dict__.pop("_step_clip_values", None)
            self.__dict__.pop("_step_dynamic", None)
            self._hyper.update(saved)
            for inner, name, value in nested_saved:
                inner._hyper[name] = value

    def _apply_hooks(self, gv) -> None:
        try:
            self._apply_hooks_traced(gv)
        except jax.errors.ConcretizationTypeError as e:
            raise TypeError(
                f"{type(self).__name__}: a hook (`_prepare_local`, `_resource_apply_dense` or "
                "`_resource_apply_sparse`) needed a concrete value, but it runs while the step "
                "is traced: use jnp.where or jax.lax.cond instead of a Python `if` on a value, "
                "and jnp operations instead of float() or .numpy(). JAX's message follows.\n"
                f"{e}"
            ) from e

    def _apply_hooks_traced(self, gv) -> None:
        apply_state = self._prepare([v for _, v in gv])
        apply_sparse = inspect.signature(self._resource_apply_sparse).parameters
        apply_dense = inspect.signature(self._resource_apply_dense).parameters
        for g, v in gv:
            kwargs = {}
            if isinstance(g, IndexedSlices):
                if "apply_state" in apply_sparse:
                    kwargs["apply_state"] = apply_state
                self._resource_apply_sparse_duplicate_indices(g.values, v, g.indices, **kwargs)
            else:
                if "apply_state" in apply_dense:
                    kwargs["apply_state"] = apply_state
                self._resource_apply_dense(g, v, **kwargs)
                if v.constraint is not None:
                    v._value = _constrained(v)

    def _apply_transformation(self, tx, gv, dynamic, template, constrain: bool = True) -> None:
        var_list = [v for _, v in gv]
        hp = {
            name: jnp.asarray(_plain(value), jnp.float32)
            for name, value in self._transformation_hyperparams().items()
            if not _is_step_schedule(value)
        }
        hp = {self._functional_name(k): v for k, v in hp.items()}
        hp.update({k[6:]: v for k, v in dynamic.items() if k.startswith("plain:")})
        # Traced, so only its structure and its constant hyperparameters survive compilation.
        traced = tx.init([v.value for v in var_list])
        made_for, template = template if template is not None else (None, None)
        if template is None or made_for != _uids(var_list):
            # The variables had no concrete values (a step inside a trace), or the gradient
            # hooks changed which variables step: the step's own init lays the state out.
            template = traced
        else:  # the stored state's layout, with the constant hyperparameters
            template = codec.with_hyperparams(template, traced, len(var_list))
        state = codec.assemble(
            template,
            count=jnp.asarray(self.iterations.value),
            hyperparams=hp,
            slots={
                name: [
                    self._slots[v._uid][name].value if name in self._slots[v._uid] else None
                    for v in var_list
                ]
                for name in self._slot_names
            },
            scalar_slots={name: w.value for name, w in self._non_slot.items()},
            opaque=[w.value for w in self._opaque],
            own_counts=self._OWN_WRAPPED_COUNTS,
        )
        params = [v.value for v in var_list]
        grads = [g for g, _ in gv]
        updates, new_state = tx.update(grads, state, params)
        new_params = core.apply_updates(params, updates)
        per_var, scalars, opaque = codec.extract(new_state, len(var_list), self._OWN_WRAPPED_COUNTS)
        for i, v in enumerate(var_list):
            v._value = new_params[i]
            if constrain and v.constraint is not None and not isinstance(grads[i], IndexedSlices):
                v._value = _constrained(v)
            for name, values in per_var.items():
                if values[i] is not None:
                    self._slots[v._uid][name]._value = values[i]
        for name, value in scalars.items():
            self._non_slot[name]._value = value
        for w, value in zip(self._opaque, opaque, strict=True):
            w._value = value

    # --- gradients ----------------------------------------------------------------------------
    def compute_gradients(
        self, loss: Callable[[], Any], var_list: Any, grad_loss: Any = None
    ) -> list[tuple[Any, Variable]]:
        """Differentiates ``loss()`` with respect to ``var_list``: JAX's stand-in for a tape.

        ``loss`` is called once per call, traced (the variables bound to traced values), so a
        closure that reads fresh data each step sees fresh data each step; the gradient of the
        trace runs as one compiled program, kept for later calls that trace the same
        operations on the same shapes. A loss that needs concrete values of its data is
        differentiated eagerly instead (its first call then runs it twice). Variables the loss
        does not read get a None gradient. A callable ``var_list`` is read after the loss, as in
        tf.keras, so variables the loss builds on its first call are included (the loss then
        runs a second time, on that step only).

        Returns:
            ``[(gradient, variable), ...]`` in ``var_list`` order.

        Raises:
            TypeError: if ``loss`` takes arguments, or ``var_list`` holds a non-variable.
            ValueError: if ``loss`` is not callable or returns None or an integer value, or
                ``var_list`` is None.
        """
        if not callable(loss):
            raise ValueError(
                "compute_gradients: `loss` must be a zero-argument callable in kopt (JAX has no "
                f"tape to replay a computed value); received {type(loss).__name__}"
            )
        required = _required_arguments(loss)
        if required:
            raise TypeError(
                "compute_gradients: `loss` must be a zero-argument callable (kopt calls it as "
                f"loss()); {getattr(loss, '__name__', type(loss).__name__)} requires "
                + ", ".join(f"`{name}`" for name in required)
            )
        if not callable(var_list) or isinstance(var_list, Variable):
            return self._gradients(loss, _variable_list(var_list), grad_loss)
        # Under the lock, from the loss's reads to its writes: a loss that assigns (a moving
        # statistic, `count.assign_add(1)`) is traced reading values and written back after,
        # and two threads' calls interleaved would lose one's assignments.
        with self._lock:
            variables = _variable_list(var_list())
            grads_and_vars, writes = self._gradients_and_writes(loss, variables, grad_loss)
            built = _variable_list(var_list())
            if [v._uid for v in built] != [v._uid for v in variables]:
                # The loss runs again for the variables it built: the assignments it made (a
                # moving statistic) are those of this second run only, as in one tf.keras step.
                grads_and_vars, writes = self._gradients_and_writes(loss, built, grad_loss)
            _make_writes(writes)
        return grads_and_vars

    def _gradients(self, loss, var_list: list[Variable], grad_loss: Any):
        with self._lock:  # from the loss's reads to its writes (see compute_gradients)
            grads_and_vars, writes = self._gradients_and_writes(loss, var_list, grad_loss)
            _make_writes(writes)
        return grads_and_vars

    def _gradients_and_writes(self, loss, var_list: list[Variable], grad_loss: Any):
        """``([(gradient, variable), ...], [(variable, value), ...])``: the gradients, and the
        assignments the loss made to other variables, for the caller to make."""
        seen_reads: set[int] = set()
        assigned: dict[int, Variable] = {}  # variables (not in var_list) the loss assigned

        def loss_of(values):
            with bound(var_list, values), track_reads() as reads, capturing_writes() as written:
                try:
                    # Read as an array here, where reads are tracked: a loss that is a
                    # variable itself (or holds one) reads it only when converted.
                    out = _loss_array(self._transform_loss(loss()))
                finally:
                    updates = variables_module.release_captured(written)
                seen_reads.update(reads)
                assigned.update(written)
                return out, updates

        # Some variable ever spanned devices, or was committed to one: a plain variable beside
        # them goes there before its gradient is taken, not by the step after: its gradient's
        # placement is then the same every step. A LossScaleOptimizer's scaled loss names the
        # scale it reads (``_reads_state``), placed too: the eager product and the unscaling
        # then see one placement every call.
        if variables_module.placement_epoch[0] or variables_module.committed_seen[0]:
            # Under the lock and as a reader: a step in another thread neither rewrites the
            # slots nor donates a buffer while they are moved.
            with self._lock, reading():
                self._place_state(var_list, extra=tuple(getattr(loss, "_reads_state", ())))
        with reading(), self._naming_culprits("minimize", var_list):
            # The forward and backward passes hold the variables' buffers (``reading``).
            # Read inside: a step in another thread donates a buffer only while no one reads.
            values = [v._current for v in var_list]
            # The loss traced, its gradient one compiled program (see _traced_loss); a loss
            # that needs concrete values is differentiated eagerly.
            done = _traced_loss.compiled_gradients(
                _traced_loss.loss_identity(loss), loss_of, values, grad_loss
            )
            if done is not None:
                _, grads, updates = done
            else:
                out, vjp, updates = jax.vjp(loss_of, values, has_aux=True)
                cotangent = jnp.ones_like(out) if grad_loss is None else jnp.asarray(grad_loss)
                if cotangent.shape != out.shape:
                    raise ValueError(
                        f"minimize: `grad_loss` has shape {cotangent.shape}, but the loss has "
                        f"shape {out.shape}"
                    )
                (grads,) = vjp(cotangent.astype(out.dtype))
        # Variables the loss assigned (a moving average of a batch statistic, say) take their
        # new values when the caller makes these writes, as tf.keras's eager assignments under
        # a tape do.
        writes = [(assigned[uid], value) for uid, value in updates.items()]
        # An integer variable's "gradient" is a NumPy float0 array: None, as tf.keras's tape
        # gives it (apply_gradients then skips the variable with a warning).
        pairs = [
            (
                g
                if v._uid in seen_reads and not (isinstance(g, np.ndarray) and g.dtype == _FLOAT0)
                else None,
                v,
            )
            for g, v in zip(grads, var_list, strict=True)
        ]
        return pairs, writes

    def minimize(
        self,
        loss: Callable[[], Any],
        var_list: Any,
        grad_loss: Any = None,
        name: str | None = None,
        tape: Any = None,
    ) -> Variable | None:
        """Computes the gradients of ``loss()`` and applies them (see :meth:`compute_gradients`
        and :meth:`apply_gradients`). ``tape`` is accepted for signature compatibility; kopt
        differentiates the callable itself.

        Returns:
            The ``iterations`` variable after the step.

        Raises:
            TypeError: as :meth:`compute_gradients`, or :meth:`apply_gradients`.
            ValueError: as :meth:`compute_gradients`, or :meth:`apply_gradients` (a repeated
                variable, no gradient for any). A rejected call changes nothing: the variables
                the loss assigned keep their values from before the call too.
        """
        undo: list[tuple[Variable, Any]] = []  # what the loss's assignments replaced
        outer = getattr(_minimizing, "undo", None)
        _minimizing.undo = undo
        try:
            grads_and_vars = self.compute_gradients(loss, var_list, grad_loss)
        finally:
            _minimizing.undo = outer
        try:
            return self.apply_gradients(grads_and_vars, name=name)
        except BaseException:
            for variable, value in reversed(undo):  # a rejected call changes nothing
                variable._value = value
            raise

    def get_gradients(self, loss: Callable[[], Any], params: list[Variable]) -> list[Any]:
        """Gradients of ``loss()`` for ``params``.

        Raises:
            ValueError: if a param gets no gradient.
        """
        out = []
        for g, v in self.compute_gradients(loss, params):
            if g is None:
                raise ValueError(
                    f"Variable {v.name} has `None` for gradient. Please make sure that all of your "
                    "ops have a gradient defined (i.e. are differentiable)."
                )
            out.append(g)
        return out

    # --- config -----------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """``{"name": ..., [clip arguments that are set]}``; subclasses add theirs."""
        config: dict[str, Any] = {"name": self._name}
        if self._clipnorm is not None:
            config["clipnorm"] = self._clipnorm
        if self._global_clipnorm is not None:
            config["global_clipnorm"] = self._global_clipnorm
        if self._clipvalue is not None:
            config["clipvalue"] = self._clipvalue
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict | None = None) -> Optimizer:
        """Creates an optimizer from :meth:`get_config`'s output (``lr`` renamed, schedule
        dicts deserialized: the learning rate's, and those of any other hyperparameter given
        as a schedule).

        Raises:
            TypeError: for an unknown config key (from the constructor).
        """
        config = dict(config)
        if "lr" in config:
            config["learning_rate"] = config.pop("lr")
        for key, value in config.items():
            if (key == "learning_rate" and isinstance(value, dict)) or is_serialized_schedule(
                value, custom_objects
            ):
                config[key] = deserialize_schedule(value, custom_objects=custom_objects)
        return cls(**config)

    _UNCOPIED = (
        "_lock",
        "_programs",
        "_transformations",
        "compile_count",
        "_validated",
        "_key_memo",
        "_copy_memo",
        "_nested_memo",
        "_large_containers",
        "_constants",
        "_constants_target",
    )

    # Maps uid -> Variable of the variables this optimizer keys state by (their slots; a
    # subclass's own, such as weight decay exclusions): copies re-key that state (``_rekey``).
    _OWNER_MAPS: tuple[str, ...] = ("_slot_owners",)

    def _owners(self) -> dict[int, Variable]:
        out: dict[int, Variable] = {}
        for name in self._OWNER_MAPS:
            out.update(self.__dict__.get(name) or {})
        return out

    def __getstate__(self) -> dict[str, Any]:
        """For copies and pickles: everything but the lock and the compiled programs (they
        bind this optimizer's own variables). The variables that own slots go along, so an
        optimizer unpickled with its variables finds their slots."""
        with self._lock:  # not while another thread steps or re-keys
            self._adopt_copies()  # a copy of a copy: settle the first copy's owners first
            return {k: v for k, v in self.__dict__.items() if k not in self._UNCOPIED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.update(
            _lock=threading.RLock(),
            _programs={},
            _transformations={},
            _validated=set(),
            _key_memo={},
        )
        self.__dict__["compile_count"] = 0
        self._check_own_assignments()
        # Unpickled: the owners came along as new variables (new uids); their state follows.
        self._rekey(self._owners())

    def __deepcopy__(self, memo: dict) -> Optimizer:
        """A deep copy whose slots belong to the copies of their variables when those are
        copied in the same ``copy.deepcopy`` call (``deepcopy((opt, variables))``), and to the
        original variables otherwise (``deepcopy(opt)``, then stepping the same model)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        with self._lock:  # one step's state: no step donates a buffer while it is copied
            state = self.__getstate__()
            owners = {name: state.pop(name, None) or {} for name in self._OWNER_MAPS}
            state = copy.deepcopy(state, memo)
        new.__setstate__(state)
        for name, owned in owners.items():
            new.__dict__[name] = dict(owned)  # the originals, for now
        new.__dict__["_copy_memo"] = memo  # variables copied later in this call show up here
        return new

    def _adopt_copies(self) -> None:
        """After ``__deepcopy__``: re-key the slots of variables that were copied in the same
        call to their copies (once, at the first use), under the lock: the memo goes only once
        they are, so a thread that finds none finds the slots re-keyed."""
        if "_copy_memo" not in self.__dict__:
            return
        with self._lock:
            memo = self.__dict__.get("_copy_memo")
            if memo:
                self._rekey(
                    {
                        uid: memo[id(owner)]
                        for uid, owner in self._owners().items()
                        if isinstance(memo.get(id(owner)), Variable)
                    }
                )
            self.__dict__.pop("_copy_memo", None)

    def _rekey(self, owners: dict[int, Variable]) -> None:
        """Moves the slots (and what else is keyed by a variable) from each old uid to its new
        owner's."""
        moved = {old: v for old, v in owners.items() if v._uid != old}
        if not moved:
            return
        uids = {old: v._uid for old, v in moved.items()}

        def rekey(keyed: dict, owner_map: bool = False) -> None:
            # All at once: a new uid may be another moved variable's old one (uids count per
            # process), which a move at a time would overwrite.
            new = {uids.get(k, k): moved.get(k, x) if owner_map else x for k, x in keyed.items()}
            keyed.clear()
            keyed.update(new)

        rekey(self._slots)
        rekey(self._slot_structure)
        for name in self._OWNER_MAPS:
            if self.__dict__.get(name):
                rekey(self.__dict__[name], owner_map=True)
        if self._opaque_owner is not None:  # the variables a non-slot state was made for
            self._opaque_owner = tuple(uids.get(u, u) for u in self._opaque_owner)
        self._rekeyed(uids)
        self._programs.clear()
        self._key_memo.clear()
        self._validated.clear()

    def _rekeyed(self, uids: dict[int, int]) -> None:
        """Hook for subclasses that key more state by variable uid."""

    def __repr__(self) -> str:
        return f"<kopt.optimizers.{type(self).__name__} name={self._name!r}>"


class _Constant:
    """A zero-argument callable's value for the current step (already evaluated)."""

    def __init__(self, value):
        self.value = value

    def __call__(self):
        return self.value


def _placeholders(hyperparams: dict[str, Any]) -> dict[str, Any]:
    """Numbers for building the functional twin (the step passes the current values), schedules
    as they are."""
    return {
        k: v if _is_step_schedule(v) else float(_plain_number(np.asarray(_plain(v))))
        for k, v in hyperparams.items()
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Variable):
        return value.value
    if isinstance(value, _Constant):
        return value.value
    return value


class _SlotMadeInStep(Exception):
    """Raised when the hooks made slots while the step was traced (``add_slot``): the step is
    traced again, with the new slots among its inputs."""


class _SlotKeyError(KeyError, ValueError):
    """No such slot: a KeyError, as tf.keras raises, and a ValueError, as kopt's bad inputs."""


class _SparseConstraintError(RuntimeError, ValueError):
    """A sparse gradient for a constrained variable: tf.keras's RuntimeError, and a
    ValueError, as kopt's bad inputs."""


def _shape_argument(shape: Any, what: str) -> tuple[int, ...]:
    """``add_slot``'s or ``add_weight``'s ``shape`` as a tuple of ints >= 0, or a ValueError
    naming it (``what``: "add_slot: `shape` of slot 'q'")."""
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if dims is None or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in dims
    ):
        raise ValueError(f"{what} must be a sequence of ints >= 0, received {shape!r}")
    return tuple(int(d) for d in dims)


def _is_array_value(initializer: Any) -> bool:
    """An initial value given as an array or variable (not a number, name or callable)."""
    return hasattr(initializer, "shape") and not isinstance(initializer, (str, np.generic))


def _is_plain_value(initializer: Any) -> bool:
    """A number, or a (nested) list of them: tf.keras's ``add_slot`` takes it as the initial
    value, of its own shape."""
    return isinstance(initializer, (numbers.Number, np.generic, list, tuple))


def _initial_value(initializer: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    if isinstance(initializer, str):
        # Keras's identifiers, in either spelling ("zeros", "Zeros").
        if initializer.lower() == "zeros":
            return jnp.zeros(shape, dtype)
        if initializer.lower() == "ones":
            return jnp.ones(shape, dtype)
        raise ValueError(
            f"Unknown initializer {initializer!r}; use 'zeros', 'ones', a value or a callable "
            "(shape, dtype) -> array"
        )
    if callable(initializer) and not hasattr(initializer, "shape"):
        return jnp.asarray(initializer(shape=shape, dtype=dtype), dtype)
    try:
        value = jnp.asarray(initializer, dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(
            "`initializer` must be 'zeros', 'ones', a value or a callable (shape, dtype) -> "
            f"array, received {type(initializer).__name__}: {initializer!r:.60}"
        ) from e
    return jnp.broadcast_to(value, shape)


def _loss_array(loss: Any) -> jax.Array:
    """A loss as one array. A list, tuple or dict of losses is differentiated as their sum,
    as tf.keras's tape differentiates several targets: stacked where they have one shape and
    dtype (so a ``grad_loss`` may weigh each), summed otherwise."""
    if loss is None:
        raise ValueError(
            "minimize: the loss returned None; it must return the loss value (a number or an array)"
        )
    if not isinstance(loss, (list, tuple, dict)):
        return _inexact_loss(jnp.asarray(loss))
    parts = [_inexact_loss(jnp.asarray(x)) for x in jax.tree.leaves(loss)]
    if not parts:
        raise ValueError(f"minimize: the loss returned an empty {type(loss).__name__}")
    if all(p.shape == parts[0].shape and p.dtype == parts[0].dtype for p in parts):
        return jnp.stack(parts)
    return sum(jnp.sum(p) for p in parts)


def _inexact_loss(loss: jax.Array) -> jax.Array:
    """``loss``, which must be a floating-point (or complex) value to have gradients.

    Raises:
        ValueError: for an integer or bool loss, whose gradients would be zeros (tf.keras:
            "No gradients provided for any variable").
    """
    if not jnp.issubdtype(loss.dtype, jnp.inexact):
        raise ValueError(
            f"minimize: the loss has dtype {loss.dtype}, which has no gradients (No gradients "
            "provided for any variable); compute it in floating point"
        )
    return loss


# While ``minimize`` computes its gradients: the values the loss's assignments replace, put
# back if ``apply_gradients`` then refuses the call.
_minimizing = threading.local()


def _make_writes(writes: list[tuple[Variable, Any]]) -> None:
    """Makes the assignments a differentiated loss made (recording what they replace for a
    ``minimize`` in progress)."""
    undo = getattr(_minimizing, "undo", None)
    for variable, value in writes:
        if undo is not None:
            undo.append((variable, variable._current))
        variable._value = value


def _variable_list(var_list: Any) -> list[Variable]:
    """The Variables of a (nested) list; None entries (not built yet) are skipped. Another
    iterable of them (``dict.values()``, a generator) counts as a list."""
    if var_list is None:  # tf.keras raises too ("Passed in object None")
        raise ValueError(
            "compute_gradients: `var_list` must be a list of kopt.Variables (or a callable "
            "returning one), received None"
        )
    if isinstance(var_list, (Iterator, MappingView, set, frozenset)):
        var_list = list(var_list)  # a pytree of variables (a FrozenDict, say) is taken as one
    variables = list(jax.tree.leaves(var_list, is_leaf=lambda x: isinstance(x, Variable)))
    for i, v in enumerate(variables):
        if not isinstance(v, Variable):
            raise TypeError(
                f"compute_gradients: var_list item {i} must be a kopt.Variable, received "
                f"{type(v).__name__}"
            )
    return variables


def _as_pairs(grads_and_vars: Any) -> list[tuple[Any, Any]]:
    if isinstance(grads_and_vars, dict) or not isinstance(grads_and_vars, Iterable):
        raise TypeError(
            "apply_gradients: `grads_and_vars` must be an iterable of (gradient, variable) "
            f"pairs, received {type(grads_and_vars).__name__}"
        )
    items = list(grads_and_vars)
    kinds = set(map(type, items))
    if kinds <= {tuple, list} and set(map(len, items)) <= {2}:
        # The common case, without a Python loop per check (pairs from zip() kept as they are).
        return items if kinds <= {tuple} else [(g, v) for g, v in items]
    pairs = []
    for i, pair in enumerate(items):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(
                f"apply_gradients: item {i} of `grads_and_vars` must be a (gradient, variable) "
                f"pair, received {type(pair).__name__}: {pair!r:.60}"
            )
        pairs.append((pair[0], pair[1]))
    return pairs


_UNSET = object()


_step_calls = threading.local()


@contextlib.contextmanager
def _one_call_per_step():
    """Within it (one ``apply_gradients`` call), each zero-argument callable hyperparameter is
    called once, as tf.keras calls it once a step: the step's other reads of it (building its
    slots, compiling) take that value."""
    if getattr(_step_calls, "values", None) is not None:  # a held optimizer's, in the step
        yield
        return
    _step_calls.values = {}
    try:
        yield
    finally:
        _step_calls.values = None


def _called(optimizer: Optimizer, name: str, function: Callable[[], Any]) -> Any:
    """A zero-argument callable hyperparameter's value for this step.

    Raises:
        TypeError: if it returns anything but a real scalar (checked without reading a device
            value back).
    """
    memo = getattr(_step_calls, "values", None)
    key = (id(optimizer), name, id(function))  # all alive while the memo is
    if memo is not None and key in memo:
        return memo[key]
    value = _plain(function())
    if (
        isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ) or (
        isinstance(value, (np.ndarray, jax.Array))
        and value.shape == ()
        and jnp.issubdtype(value.dtype, jnp.number)
        and not jnp.issubdtype(value.dtype, jnp.complexfloating)
    ):
        if memo is not None:
            memo[key] = value
        return value
    shape = getattr(value, "shape", None)
    raise TypeError(
        f"{type(optimizer).__name__}: the callable given as `{name}` must return a real "
        f"scalar, returned {type(value).__name__}"
        + ("" if shape is None else f" of shape {shape}")
        + f": {value!r:.60}"
    )


def _check_loss_scale(value: Any, name: str) -> None:
    """A loss scale set through ``set_weights``: finite and > 0, as the constructor has it.

    Raises:
        ValueError: naming the weight.
    """
    try:
        number = float(np.asarray(value))
    except (TypeError, ValueError):
        return  # not a number: the conversion below names it
    if not np.isfinite(number) or number <= 0:
        raise ValueError(
            f"set_weights: the loss scale {name} must be finite and > 0, received {value}"
        )


def _constrained(v: Variable) -> jax.Array:
    """``v``'s constraint applied to its value (an array, as the contract has it: ``jax.lax``
    functions take no variable).

    Raises:
        TypeError: naming the variable and the constraint, if the constraint returns None.
        ValueError: naming the variable, if the constraint returns another shape.
    """
    out = v.constraint(v.value)
    if out is None:
        constraint = getattr(v.constraint, "__qualname__", type(v.constraint).__name__)
        raise TypeError(
            f"the constraint {constraint} of {v.name} returned None, expected the constrained "
            "value (an array of the variable's shape)"
        )
    out = jnp.asarray(out)
    if out.shape != v.shape:
        raise ValueError(
            f"the constraint of {v.name} returned a value of shape {out.shape}, expected the "
            f"variable's shape {v.shape}"
        )
    return out.astype(v.dtype)


def _builtin_hyperparameter_names() -> frozenset[str]:
    from kopt.optimizers.builtin import _HYPERPARAM_NAMES  # here: builtin imports this module

    return _HYPERPARAM_NAMES


def _written_arrays(optimizer: Optimizer) -> dict[str, jax.Array]:
    """The plain attributes the hooks set to arrays while this step was traced."""
    names = sorted(optimizer.__dict__.get("_written_now", ()))
    return {n: v for n in names if isinstance(v := optimizer.__dict__.get(n), jax.Array)}


def _is_read_per_step(value: Any) -> bool:
    """A hyperparameter given as a zero-argument callable (not a schedule): called each step."""
    return callable(value) and not isinstance(value, Variable) and not _is_step_schedule(value)


class _Hashed:
    """A key part whose hash is computed once (a tuple's is computed at every lookup)."""

    __slots__ = ("_hash", "value")

    def __init__(self, value: Any):
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: Any) -> bool:
        return self is other or (
            isinstance(other, _Hashed) and self._hash == other._hash and self.value == other.value
        )


_NOT_PLAIN = object()
_CONTAINERS = (list, tuple, set, frozenset, dict)
_SMALL_CONTAINER = 256  # containers up to this length are checked for in-place changes
# Step keys remembered per optimizer, one per variable list (and gradient kinds) stepped.
_MAX_KEY_MEMO = 1024


def _plain_key(value: Any) -> Any:
    """A hashable stand-in for a plain value (None, a number, flag or string, a variable or its
    ``ref()`` by identity, or a list, tuple, set or dict of plain values, nested), equal for
    equal values and telling types apart;
    ``_NOT_PLAIN`` for anything else (an array, a function, an object)."""
    if isinstance(value, np.generic) and value.ndim == 0:
        value = value.item()
    if isinstance(value, float) and value != value:
        return ("float", "nan")  # NaN equals itself here: the same program, not a new one
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, Variable):  # by identity: which variables (a decay_var_list)
        return ("variable", value._uid)
    if isinstance(value, VariableReference):
        return ("variable", value.deref()._uid)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain_key(v) for v in value]
        if any(item is _NOT_PLAIN for item in items):
            return _NOT_PLAIN
        if isinstance(value, (set, frozenset)):
            return (type(value).__name__, frozenset(items))
        return (type(value).__name__, tuple(items))
    if isinstance(value, dict):
        items = [(_plain_key(k), _plain_key(v)) for k, v in value.items()]
        if any(k is _NOT_PLAIN or v is _NOT_PLAIN for k, v in items):
            return _NOT_PLAIN
        return ("dict", frozenset(items))
    return _NOT_PLAIN


def _variables_in(container: Any) -> tuple[Variable, ...]:
    """The variables a list, tuple or dict holds (not nested)."""
    items = container.values() if isinstance(container, dict) else container
    return tuple(item for item in items if isinstance(item, Variable))


def _array_key(value: Any) -> Any:
    """A small NumPy array attribute, keyed by its values (it may change in place), as NumPy
    scalars are. JAX arrays and other objects are not keyed: an attribute holding one that a
    hook does not read (a gradient norm kept for logging) would make every call compile."""
    if isinstance(value, np.ndarray) and value.size <= _SMALL_CONTAINER:
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    return _NOT_PLAIN


def _same_plain_value(old: Any, new: Any) -> bool:
    """Whether assigning ``new`` over ``old`` leaves the attribute as it was (so a custom
    ``_create_slots`` that sets a flag at every call keeps the cached step key)."""
    if old is new:
        return True
    key = _plain_key(new)
    return key is not _NOT_PLAIN and key == _plain_key(old)


# Gradients given as Python values are converted as tf.keras converts them (floats to float32).
_PYTHON_VALUES = frozenset((list, tuple, float, int))


class _Same:
    """A step-key part standing for one object (a gradient transformer, a constraint...): equal
    only to a part holding that very object. It keeps the object alive while the key is cached,
    so a new object cannot come to the freed one's ``id`` and be taken for it."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return type(other) is _Same and other.obj is self.obj


_SCHEDULE_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SCHEDULE_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _schedule_key(schedule: Any) -> Any:
    """A step-key part for a schedule, made at each step: the compiled step holds what the
    schedule computes with, which tf.keras's schedules read from their attributes at each call.
    kopt's own schedule classes are keyed by their config: two of equal config compute the same
    function, so a warm restart that builds a new, equal schedule reuses the program. Any other
    schedule is keyed by the object and by its config where it has one (a Keras 3 schedule, a
    ``LearningRateSchedule`` of your own), so that setting an attribute its config shows
    compiles the step once for the new value; one without a config (a function) by the object
    alone, a constant of the step, as a tf.function traces it."""
    if isinstance(schedule, _BuiltinSchedule):
        schedule._follow_edits()  # a list of its config edited in place
    version = getattr(schedule, "__dict__", {}).get("_version", 0)
    if type(schedule).__module__ != "kopt.optimizers.schedules":
        return (_Same(schedule), version, _schedule_config_key(schedule))
    cached = _SCHEDULE_KEYS.get(schedule)
    if cached is None or cached[0] != version:
        config = _schedule_config_key(schedule)
        # A config that is not plain (a JAX array in it): by identity and version, so that a
        # changed attribute still makes a new step.
        key = (_Same(schedule), version) if config is _NOT_PLAIN else (type(schedule), config)
        cached = _SCHEDULE_KEYS[schedule] = (version, key)
    return cached[1]


def _schedule_config_key(schedule: Any) -> Any:
    """``_plain_key`` of the schedule's config; ``_NOT_PLAIN`` for a config that is not plain,
    or none (no ``get_config``, or one that raises: the base class's). Remembered with a copy
    of the config (and of the lists and dicts in it, which may be edited in place) that a
    later config is compared with at C speed, so that an unchanged one costs no new key."""
    get_config = getattr(schedule, "get_config", None)
    if not callable(get_config):
        return _NOT_PLAIN
    try:
        config = get_config()
        copied = {k: v.copy() if type(v) in (list, dict) else v for k, v in config.items()}
    except Exception:  # noqa: BLE001 - a config that cannot be read: by identity
        return _NOT_PLAIN
    try:
        cached = _SCHEDULE_CONFIGS.get(schedule)
    except TypeError:  # a schedule that is not hashable or weakly referable: not remembered
        return _plain_key(config)
    try:
        if cached is not None and cached[0] == copied:
            return cached[1]
    except Exception:  # noqa: BLE001 - values whose comparison is not a bool (arrays): anew
        pass
    key = _plain_key(config)
    _SCHEDULE_CONFIGS[schedule] = (copied, key)
    return key


def _bucketed_rows(g: IndexedSlices, v: Any) -> IndexedSlices:
    """``g`` padded to a power-of-two number of rows with zero rows at index ``v.shape[0]``
    (outside the table, so every update skips them, as it does a duplicate's place). The step
    then compiles once per bucket, not once per row count, which changes from batch to batch.
    A gradient that is not well formed is left for validation to report."""
    values, indices = g.values, g.indices
    shape = getattr(values, "shape", None)
    if (
        not shape
        or getattr(indices, "shape", None) != shape[:1]
        or not getattr(v, "shape", ())
        or tuple(shape[1:]) != tuple(v.shape[1:])
    ):
        return g
    n = shape[0]
    size = 1 << max(n - 1, 0).bit_length()
    if size == n:
        return g
    values, indices = jnp.asarray(values), jnp.asarray(indices)
    rows = int(v.shape[0])
    if isinstance(values, jax.core.Tracer) or isinstance(indices, jax.core.Tracer):
        values, indices = _pad_rows(values, indices, size, rows)
    elif _on_host(values) and _on_host(indices) and _rare_row_count(values, size):
        # On a CPU, a row count seen a few times at most (they change from batch to batch):
        # padded in NumPy, as padding with XLA compiles a program per count (a quarter of a
        # second) that few later steps would reuse. (On an accelerator that would be a round
        # trip to the host: there the compiled padding is kept per count.)
        values = _put_like(_padded(np.asarray(values), size, 0), values)
        indices = _put_like(_padded(np.asarray(indices), size, rows), indices)
    else:  # a count seen before: one compiled program, kept
        values, indices = _padded_rows(values, indices, size, rows)
    return IndexedSlices(values, indices, g.dense_shape)


def _pad_rows(values: jax.Array, indices: jax.Array, size: int, rows: int) -> tuple:
    padding = size - values.shape[0]
    values = jnp.pad(values, [(0, padding)] + [(0, 0)] * (values.ndim - 1))
    return values, jnp.pad(indices, (0, padding), constant_values=rows)


_padded_rows = jax.jit(_pad_rows, static_argnums=(2, 3))

# Row counts of sparse gradients seen (shape, dtype, bucket) -> times; bounded. A count seen
# more than _COMPILED_PAD_AFTER times is padded by a compiled program, kept.
_ROW_COUNTS: dict[tuple, int] = {}


_COMPILED_PAD_AFTER = 4


def _rare_row_count(values: jax.Array, size: int) -> bool:
    key = (values.shape, values.dtype, size)
    seen = _ROW_COUNTS.get(key, 0)
    if len(_ROW_COUNTS) > 4096:
        _ROW_COUNTS.clear()
    _ROW_COUNTS[key] = seen + 1
    return seen < _COMPILED_PAD_AFTER


def _on_host(x: jax.Array) -> bool:
    """On one CPU device (whose memory NumPy reads without a transfer)."""
    sharding = x.sharding
    return type(sharding) is jax.sharding.SingleDeviceSharding and (
        next(iter(sharding.device_set)).platform == "cpu"
    )


def _padded(x: np.ndarray, size: int, fill: Any) -> np.ndarray:
    out = np.full((size, *x.shape[1:]), fill, x.dtype)
    out[: x.shape[0]] = x
    return out


def _put_like(x: np.ndarray, like: jax.Array) -> jax.Array:
    """``x`` on ``like``'s device, committed as ``like`` is."""
    return jax.device_put(x, like.sharding) if like.committed else jnp.asarray(x)


_CONVERTED = _PYTHON_VALUES | {IndexedSlices}


def _per_replica_beside(g: PerReplica, v: Variable) -> PerReplica:
    """``g`` with its values moved onto ``v``'s devices if they are committed elsewhere: onto
    ``v``'s mesh with the replica axis unsplit, or onto ``v``'s one device. ``pmap`` returns
    its values on a mesh of its own; the step would otherwise run there, moving a single-device
    ``v`` onto that mesh (and compiling again for it), or fail for a ``v`` on another mesh.
    Values on ``v``'s mesh already, however split, are left for the step to reduce there.
    Values on this process's devices only, for a ``v`` that spans other processes' devices
    too, are refused: they hold only this process's replicas."""
    values, value = g.values, v._current
    if (
        not isinstance(values, jax.Array)
        or isinstance(values, jax.core.Tracer)
        or isinstance(value, jax.core.Tracer)
        or not values.committed
    ):
        return g
    target = value.sharding
    spread = _spread_sharding(v)
    if spread is not None:
        if getattr(values.sharding, "mesh", None) == spread.mesh:
            return g
        spec = jax.sharding.PartitionSpec(None, *spread.spec)
        target = jax.sharding.NamedSharding(spread.mesh, spec, memory_kind=spread.memory_kind)
    elif values.sharding.device_set == target.device_set:
        return g
    if values.is_fully_addressable and not target.is_fully_addressable:
        # pmap's values in one process of several: only this process's replicas. Summed as
        # they are, each process would apply another gradient (and JAX cannot move them).
        raise ValueError(
            f"apply_gradients: the PerReplica gradient of {v.name} holds only this process's "
            f"replicas (its values are on devices {sorted(d.id for d in values.devices())}), "
            f"but {v.name} spans the devices of other processes too. Make the values one "
            "array of every process's replicas, e.g. jax.make_array_from_process_local_data("
            "NamedSharding(mesh, P(axis)), values) over the variable's mesh"
        )
    return PerReplica(jax.device_put(values, target))


def _name_of(v: Any) -> str:
    # Not getattr(v, "name", repr(v)): the default would be built (a host copy of the value)
    # for every variable, on every call.
    return v.name if hasattr(v, "name") else repr(v)


def _strongly_typed(g: Any) -> jax.Array:
    """``g`` as an array of its own dtype, strongly typed. A weakly typed one (a Python float,
    ``jnp.asarray(0.5)``) would key, and compile, a step of its own beside the strongly typed
    gradients (``jnp.float32(0.5)``, anything ``jax.grad`` returns) of the same dtype."""
    g = jnp.asarray(g)
    return jax.lax.convert_element_type(g, g.dtype) if g.weak_type else g


def _python_value(g: Any, v: Any) -> jax.Array:
    """A gradient given as a list, tuple or Python number, in its variable's dtype (tf.keras
    converts it with the variable's dtype as the hint: ``[1, 2]`` for a float16 variable is
    float16). Left to the usual checks when the variable is not a floating-point one."""
    dtype = getattr(v, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(g, dtype)
    return _strongly_typed(g)


def _strengthen_each(grads: list[jax.Array]) -> list[jax.Array]:
    return [jax.lax.convert_element_type(g, g.dtype) for g in grads]


_strengthened = jax.jit(_strengthen_each)


def _filter_empty_gradients(pairs):
    weak_seen: list[None] = []  # one entry per weakly typed array kept as it is
    kept = [
        pair
        if type(pair[0]) not in _CONVERTED and not getattr(pair[0], "weak_type", False)
        else (_bucketed_rows(*pair), pair[1])
        if type(pair[0]) is IndexedSlices
        else (_python_value(*pair), pair[1])
        if type(pair[0]) in _PYTHON_VALUES
        # Weakly typed: noted here, converted together below (the common call, with none,
        # makes no second pass over the gradients).
        else weak_seen.append(None) or pair
        if isinstance(pair[0], jax.Array)
        else (_strongly_typed(pair[0]), pair[1])
        for pair in pairs
        if pair[0] is not None
    ]
    if weak_seen:
        weak = [i for i, (g, _) in enumerate(kept) if getattr(g, "weak_type", False)]
        # Weakly typed arrays (``jnp.full(shape, 0.5)``) made strong, as ``_strongly_typed``
        # does one by one, in one compiled call per placement (an eager conversion per
        # gradient cost a 100-variable step five times its own time).
        grads = [g for g, _ in kept]
        done = variables_module.in_batches(_strengthened, grads, weak)
        for i in weak:
            g, v = kept[i]
            kept[i] = (grads[i] if i in done else _strongly_typed(g), v)
    if pairs and not kept:
        names = ([_name_of(v) for _, v in pairs],)
        raise ValueError(
            f"No gradients provided for any variable: {names}. Provided `grads_and_vars` is "
            f"{tuple(pairs)}."
        )
    if len(kept) < len(pairs):
        missing = [_name_of(v) for g, v in pairs if g is None]
        logger.warning(
            "Gradients do not exist for variables %s when minimizing the loss: their gradients "
            "are None (the loss does not depend on them, or they are integer variables, which "
            "have none), and they are left unchanged.",
            missing,
        )
    return kept


def weight_list(weights: Any) -> list[Any]:
    """``set_weights``'s argument as a list, or a TypeError naming it."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise TypeError(
            f"set_weights: `weights` must be a list of arrays, received {type(weights).__name__}"
        )
    return list(weights)


def _saturated_count(value: Any) -> Any:
    """A step count from ``set_weights`` for the int32 ``iterations``: capped at ``2**31 - 1``
    as training caps it (tf.keras's count is int64, so a long run's may be larger); a negative
    or non-integer count is refused."""
    _check_step_count(value, "set_weights")
    return np.minimum(np.asarray(value), np.iinfo(np.int32).max)


def _check_step_count(value: Any, where: str = "iterations.assign") -> None:
    """Refuses a step count that is not a non-negative integer (from ``set_weights``, the
    ``iterations`` setter, or assigned to ``iterations``)."""
    count = np.asarray(value)
    if count.dtype.kind not in "iu":
        raise TypeError(
            f"{where}: the step count (iterations) must be an integer, received {count.dtype}"
        )
    if count.min(initial=0) < 0:
        raise ValueError(f"{where}: the step count (iterations) must be >= 0, received {count}")


def _check_gradient(g: Any, v: Variable, aggregate: bool) -> None:
    if isinstance(g, PerReplica):
        values = g.values
        if isinstance(values, IndexedSlices):
            raise TypeError(
                f"apply_gradients: the per-replica gradient for {v.name} holds an IndexedSlices; "
                "sparse per-replica gradients are not taken: give one kopt.IndexedSlices of "
                "every replica's rows (their values and indices concatenated: repeated rows "
                "add up)"
            )
        if not hasattr(values, "shape") or tuple(values.shape[1:]) != v.shape:
            raise ValueError(
                f"apply_gradients: per-replica gradient for {v.name} must have shape "
                f"[replicas, *{v.shape}], received {tuple(getattr(values, 'shape', ()))}"
            )
        return
    if isinstance(g, IndexedSlices):
        if v.constraint is not None:
            raise _SparseConstraintError(
                f"Cannot use a constraint function on a sparse variable ({v.name}). Received: "
                f"grad={g}, var.constraint={v.constraint}."
            )
        if not hasattr(g.indices, "shape") or not hasattr(g.indices, "dtype"):
            raise TypeError(
                f"apply_gradients: the indices of the sparse gradient for {v.name} must be an "
                f"integer array, received {type(g.indices).__name__}: {g.indices!r:.60}"
            )
        if not jnp.issubdtype(g.indices.dtype, jnp.integer):
            raise TypeError(
                f"apply_gradients: sparse gradient for {v.name} has indices of dtype "
                f"{g.indices.dtype}, expected integers"
            )
        if v.ndim == 0:
            raise ValueError(
                f"apply_gradients: sparse gradient for {v.name} is for a scalar variable, which "
                "has no rows; give it a dense gradient"
            )
        if (
            not hasattr(g.values, "shape")
            or tuple(g.values.shape[1:]) != v.shape[1:]
            or g.indices.ndim != 1
            or g.indices.shape[0] != g.values.shape[0]
        ):
            raise ValueError(
                f"apply_gradients: sparse gradient for {v.name} (shape {v.shape}) has values of "
                f"shape {tuple(getattr(g.values, 'shape', ()))} and indices of shape "
                f"{tuple(g.indices.shape)}"
            )
        if g.dense_shape is not None and tuple(g.dense_shape) != v.shape:
            raise ValueError(
                f"apply_gradients: sparse gradient for {v.name} has dense_shape "
                f"{tuple(g.dense_shape)}, expected the variable's shape {v.shape}"
            )
        if g.values.dtype != v.dtype:
            raise TypeError(
                f"apply_gradients: sparse gradient for {v.name} has dtype {g.values.dtype}, "
                f"expected {v.dtype}"
            )
        return
    if isinstance(g, Variable):
        g = g.value
    if not hasattr(g, "shape") or not hasattr(g, "dtype"):
        raise TypeError(
            f"apply_gradients: the gradient for {v.name} must be an array, received "
            f"{type(g).__name__}: {g!r:.60}"
        )
    if tuple(g.shape) != v.shape:
        raise ValueError(
            f"apply_gradients: the gradient for {v.name} has shape {tuple(g.shape)}, expected "
            f"{v.shape}"
        )
    try:
        dtype = jnp.dtype(g.dtype)
    except TypeError:  # another library's tensor (TensorFlow's)
        kind = f"{type(g).__module__.split('.')[0]}.{type(g).__name__}"
        raise TypeError(
            f"apply_gradients: the gradient for {v.name} must be a JAX or NumPy array (or a "
            f"kopt.IndexedSlices), received a {kind} of dtype {g.dtype}; convert it first "
            "(np.asarray, or a TensorFlow tensor's .numpy())"
        ) from None
    if dtype != jnp.dtype(v.dtype):
        raise TypeError(
            f"apply_gradients: the gradient for {v.name} has dtype {g.dtype}, expected {v.dtype}"
        )


def _is_traced(g: Any) -> bool:
    """A gradient (or a sparse or per-replica one's parts) that is a JAX tracer."""
    return any(
        isinstance(x, jax.core.Tracer)
        for x in (g, getattr(g, "values", None), getattr(g, "indices", None))
    )


def _signature(pairs, aggregate: bool):
    """What validation depends on, per pair: the variable and the gradient's kind, shape and
    dtype. A call whose signature passed validation before skips it (None: validate)."""
    try:  # the common case, arrays for variables: one comprehension, the aval for both
        # A subclass of Variable (a user's own) takes the same path: its uid names it.
        out = [(v._uid, type(g), g.aval) for g, v in pairs if isinstance(v, Variable)]
    except AttributeError:  # a gradient that is not an array (IndexedSlices, PerReplica, ...)
        out = None
    if out is not None and len(out) == len(pairs):
        return tuple(out), aggregate
    out = []
    for g, v in pairs:
        if not isinstance(v, Variable):
            return None
        kind = type(g)
        if kind is IndexedSlices:
            g_sig = (
                kind,
                g.values.shape,
                g.values.dtype,
                g.indices.shape,
                g.indices.dtype,
                g.dense_shape,
            )
        elif kind is PerReplica:
            g_sig = (kind, getattr(g.values, "shape", None), getattr(g.values, "dtype", None))
        elif kind is np.ndarray and g.dtype == jax.dtypes.canonicalize_dtype(g.dtype):
            # As a JAX array of its shape and dtype keys it (the step converts it anyway), so
            # that NumPy and JAX gradients share one program. Another dtype (float64 without
            # x64) keys on its own and is refused by validation, naming it.
            out.append((v._uid, _array_type(), jax.core.ShapedArray(g.shape, g.dtype)))
            continue
        else:
            g_sig = (kind, getattr(g, "shape", None), getattr(g, "dtype", None))
        out.append((v._uid, g_sig))
    return tuple(out), aggregate


@functools.cache
def _array_type() -> type:
    """The type of JAX's concrete arrays (found on first use: making an array at import would
    start the backend before the user's ``jax.distributed.initialize``); concrete also when
    first asked inside a trace."""
    with jax.ensure_compile_time_eval():
        return type(jnp.zeros(()))


# The clipping arguments' transformations, in the order tf.keras applies them.
_CLIP_PIECES = {
    "clipvalue": clip_by_value,
    "clipnorm": clip_by_norm,
    "global_clipnorm": clip_by_global_norm,
}
_SINGLE_DEVICE = jax.sharding.SingleDeviceSharding
_FLOAT0 = jax.dtypes.float0


def _devices_error(where: str, var_list: list[Variable], grads: list[Any]) -> ValueError | None:
    """A ValueError naming two of ``var_list``, or a gradient and its variable, committed to
    different devices (None if none are): one step is one compiled program, which takes arrays
    of one set of devices."""
    mismatch = device_mismatch((v.name, v._current) for v in var_list)
    if mismatch:
        (a, a_ids), (b, b_ids) = mismatch
        return ValueError(
            f"{where}: variables {a} (device ids {a_ids}) and {b} (device ids {b_ids}) are "
            "committed to different devices, but an optimizer's step is one compiled program "
            "over all its variables, which takes arrays of one set of devices: put them on the "
            "same device, shard them over one mesh (NamedSharding), or give each device's "
            "variables an optimizer of their own"
        )
    for g, v in zip(grads, var_list, strict=False):
        if device_mismatch([(v.name, v._current), ("gradient", g)]):
            return ValueError(
                f"{where}: the gradient of {v.name} is committed to device ids "
                f"{committed_device_ids(g)}, its variable to device ids "
                f"{committed_device_ids(v._current)}: move the gradient to the variable's "
                "devices first (jax.device_put(grad, variable.sharding))"
            )
    return None


def _committed_device(values: list[Any]) -> Any:
    """The sharding of the first of ``values`` committed to one device (None if none is)."""
    for value in values:
        if (
            isinstance(value, jax.Array)
            and not isinstance(value, jax.core.Tracer)
            and value.committed
            and type(value.sharding) is _SINGLE_DEVICE
        ):
            return value.sharding
    return None


def _per_replica_device(grads: Any, var_list: list[Variable]) -> Any:
    """The device of the variable of the first committed :class:`PerReplica` gradient (None
    if there is none). :func:`_per_replica_beside` moves ``pmap``'s values there, committed:
    the first step would return an uncommitted variable and state committed beside them, and
    the second would compile again."""
    for g, v in zip(grads, var_list, strict=False):
        if type(g) is not PerReplica:
            continue
        values, value = g.values, v._storage
        if (
            isinstance(values, jax.Array)
            and not isinstance(values, jax.core.Tracer)
            and values.committed
            and isinstance(value, jax.Array)
            and not isinstance(value, jax.core.Tracer)
            and type(value.sharding) is _SINGLE_DEVICE
        ):
            return value.sharding
    return None


def _spread_sharding(variable: Variable) -> Any:
    """The variable's sharding if it spans several devices (else None: left to XLA)."""
    sharding = getattr(variable._storage, "sharding", None)
    if type(sharding) is _SINGLE_DEVICE:
        return None
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
        return sharding
    return None


def _on_cpu(var_list: list[Variable]) -> bool:
    """Whether a step over ``var_list`` runs on the CPU: the devices of the first variable whose
    value has any (a traced one may not), else JAX's default backend."""
    for v in var_list:
        try:
            devices = v._storage.sharding.device_set
        except Exception:  # a tracer, or a value with no placement yet
            continue
        return all(d.platform == "cpu" for d in devices)
    return jax.default_backend() == "cpu"


def _typed_like(value: Any, like: Any) -> jax.Array:
    """``value`` with ``like``'s dtype, not weakly typed (a step's output beside its input)."""
    return jax.lax.convert_element_type(value, jnp.result_type(like))


def _gradients_finite(pairs: list[tuple[Any, Any]], packable: set[int]) -> jax.Array:
    """Whether every gradient of ``pairs`` is finite (:func:`kopt.all_finite`). The small
    gradients of the variables in ``packable`` (uids) are checked as one concatenation per
    dtype: a reduction per gradient made a LossScaleOptimizer's step compile about twice as
    long as its inner optimizer's on XLA:CPU (100 to 300 variables). Large gradients, which
    concatenating would copy, and those of variables spread over devices, which it would
    gather, are checked one by one."""
    small: dict[Any, list[Any]] = {}
    apart = []
    for g, v in pairs:
        for leaf in jax.tree.leaves(g, is_leaf=is_indexed_slices):
            x = leaf.values if isinstance(leaf, IndexedSlices) else leaf
            if getattr(v, "_uid", None) in packable and jnp.size(x) <= MAX_GROUPED_SIZE:
                small.setdefault(jnp.result_type(x), []).append(jnp.ravel(x))
            else:
                apart.append(x)
    packed = [jnp.concatenate(xs) if len(xs) > 1 else xs[0] for xs in small.values()]
    return all_finite(packed + apart)


def _uids(var_list: list[Variable]) -> tuple[int, ...]:
    return tuple(v._uid for v in var_list)


def _state_template(tx: core.GradientTransformation, var_list: list[Variable]) -> Any:
    """The shapes of ``tx.init``'s state for the variables' concrete values, as the optimizer
    made its state (None when they are traced). A layout may depend on a param's sharding
    (``kopt.flatten`` leaves a sharded one loose), which a traced param does not show over
    automatic mesh axes, so the step's own ``tx.init`` could lay the state out otherwise."""
    values = [v._current for v in var_list]
    if any(isinstance(x, jax.core.Tracer) for x in values):
        return None
    out = []
    jax.eval_shape(lambda: out.append(codec.abstract(tx.init(values), len(values))))
    return out[0]


class _StatePlan(NamedTuple):
    """How a step passes the optimizer's variables: each loose one as its own array, grouped
    slots as their groups' buffers (``present``: which members this step updates)."""

    loose: list[Variable]
    groups: list[SlotGroup]
    present: list[tuple[bool, ...]]


def _plan_state(state_vars: list[Variable]) -> _StatePlan:
    loose, groups, members = [], [], set()
    for s in state_vars:
        if isinstance(s, PackedSlot):
            members.add(s._uid)
            if s._group not in groups:
                groups.append(s._group)
        else:
            loose.append(s)
    present = [tuple(m._uid in members for m in g.members) for g in groups]
    return _StatePlan(loose, groups, present)


def _sharding_key(sharding: Any) -> Any:
    """A multi-device sharding as a step key: equal for equal layouts (``P()`` and
    ``P(None,)`` are one layout, and a step's outputs can come back spelled either way).
    Single-device placement (None here) is left to ``jit``."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = list(sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return sharding.mesh, tuple(spec), sharding.memory_kind


def _explicit(sharding: Any) -> bool:
    """Whether ``sharding``'s mesh has explicit axes (a split that is part of the type)."""
    explicit = jax.sharding.AxisType.Explicit
    return any(t == explicit for t in getattr(sharding.mesh, "axis_types", ()))


def _split_as(grad: Any, sharding: Any) -> Any:
    """A dense traced gradient split as its variable (``sharding``, over explicit mesh axes):
    there, an operation on two arrays split differently is refused, where over automatic
    axes XLA moves one of them itself."""
    if sharding is None or not isinstance(grad, jax.Array):
        return grad
    return _constrain(grad, sharding)


def _constrain(value: Any, sharding: Any) -> Any:
    """Gives a traced output ``sharding``: a constraint over automatic mesh axes, a reshard
    (when the type says otherwise) over explicit ones."""
    if sharding is None:
        return value
    if _explicit(sharding):
        if jax.typeof(value).sharding.spec == sharding.spec:
            return value
        return jax.sharding.reshard(value, sharding)
    return jax.lax.with_sharding_constraint(value, sharding)
