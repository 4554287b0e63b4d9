"""``kopt.Variable``: a mutable box around a ``jax.Array``, as tf.keras code expects one."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kopt._tree import transfer_copy

_uid = itertools.count()
_reads = threading.local()
# Bumped whenever a variable takes a value that is not on a single device and not placed as its
# previous one, so that the optimizers' cached step keys (which record multi-device shardings)
# are recomputed; a new value of the same placement (a sharded metric assigned each step) keeps
# them.
placement_epoch = [0]
# Set once a variable takes a value committed to one device: ``minimize`` then places the
# uncommitted variables beside it before taking gradients (a flag, not a scan per call).
committed_seen = [False]
_SINGLE_DEVICE = jax.sharding.SingleDeviceSharding
_MISSING = object()
_bindings = threading.local()  # this thread's uid -> traced value, while a step or loss traces
donation_lock = threading.RLock()  # a buffer is handed out or donated, never both at once
_readers = 0  # gradient computations in flight, which hold variables' buffers


@contextlib.contextmanager
def reading():
    """Variables' buffers read within the block stay valid: donating updates copy meanwhile."""
    global _readers
    with donation_lock:
        _readers += 1
    try:
        yield
    finally:
        with donation_lock:
            _readers -= 1


# From this many copies up, a donating step makes them in one compiled call: eagerly, each
# copy is a dispatch of its own (tens of microseconds), paid by every step after a loop reads
# the variables (a logged loss of the model), however small they are.
_BATCHED_COPIES = 4


def donatable_values(variables: list[Variable]) -> list[Any]:
    """The values of ``variables`` for a compiled update that donates them, under
    ``donation_lock``: each buffer itself, or a copy where it was handed out or a gradient
    computation is in flight (see ``Variable._donatable_value``), the copies made together."""
    values = [v._storage for v in variables]
    stale = [i for i, v in enumerate(variables) if v._handed_out or _readers]
    done = in_batches(_copies, values, stale)
    for i in stale:
        if i not in done:
            values[i] = variables[i]._donatable_value()
    return values


def in_batches(batched: Any, values: list[Any], indices: list[int]) -> set[int]:
    """Replaces ``values[i]`` for ``i`` in ``indices`` by ``batched`` (a compiled function of a
    list of arrays, returning as many) of them, one call per placement that holds at least
    ``_BATCHED_COPIES`` of them (a compiled call takes arrays of one device set only; fewer
    are cheaper eagerly); returns the indices it replaced, for the caller to do the rest."""
    placements: dict[Any, list[int]] = {}
    for i in indices:
        value = values[i]
        if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
            key = value.sharding if value.committed else None
            placements.setdefault(key, []).append(i)
    done = set()
    for batch in placements.values():
        if len(batch) >= _BATCHED_COPIES:
            outs = batched([values[i] for i in batch])
            for i, out in zip(batch, outs, strict=True):
                values[i] = _keep_sharding(out, values[i])
            done.update(batch)
    return done


def _copy_each(values: list[jax.Array]) -> list[jax.Array]:
    return [jnp.array(v, copy=True) for v in values]


_copies = jax.jit(_copy_each)


@contextlib.contextmanager
def bound(variables: list[Variable], values: list[Any]):
    """Within the block and this thread only, ``variables`` read and write the (traced)
    ``values`` instead of their own; other threads keep seeing the real values."""
    table = getattr(_bindings, "table", None)
    if table is None:
        table = _bindings.table = {}
    saved = {v._uid: table[v._uid] for v in variables if v._uid in table}
    try:
        for v, value in zip(variables, values, strict=True):
            table[v._uid] = value
        yield
    finally:
        for v in variables:
            table.pop(v._uid, None)
        table.update(saved)


@contextlib.contextmanager
def capturing_writes():
    """Within the block (this thread), a value written to a variable that is neither bound nor
    traced itself (a moving average a loss updates) is kept as a binding for the rest of the
    block, and recorded in the dict the block yields (uid -> variable); the caller reads
    the values from the bindings and writes the concrete ones back afterwards."""
    previous = getattr(_bindings, "captured", None)
    captured: dict[int, Variable] = {}
    _bindings.captured = captured
    try:
        yield captured
    finally:
        _bindings.captured = previous


def release_captured(captured: dict[int, Variable]) -> dict[int, Any]:
    """The traced values of the variables ``capturing_writes`` recorded, their bindings removed."""
    table = _bindings.table
    return {uid: table.pop(uid) for uid in captured}


class track_reads:
    """Context manager recording which variables' values are read (to tell unconnected
    variables apart in ``minimize``): ``with track_reads() as seen: ...``; ``seen`` holds uids."""

    def __enter__(self) -> set[int]:
        self._previous = getattr(_reads, "seen", None)
        _reads.seen = set()
        return _reads.seen

    def __exit__(self, *exc) -> None:
        _reads.seen = self._previous


def _is_deleted(value: Any) -> bool:
    """Whether ``value`` is an array whose buffer was deleted (donated to a jitted call)."""
    return (
        isinstance(value, jax.Array)
        and not isinstance(value, jax.core.Tracer)
        and value.is_deleted()
    )


def deleted_error(where: str | None, variables: Iterable[Variable]) -> RuntimeError | None:
    """A RuntimeError naming those of ``variables`` whose value was deleted (prefixed with
    ``where``, the call that found it), None if none was: JAX's own message names only a
    shape. A variable's buffer is its own, but ``v.value`` hands it out, and a jitted function
    that donates its argument deletes it."""
    names = list(dict.fromkeys(v.name for v in variables if _is_deleted(v._current)))
    if not names:
        return None
    which = f"variable {names[0]}" if len(names) == 1 else f"variables {', '.join(names)}"
    said = f"{where}: the value" if where else "The value"
    return RuntimeError(
        f"{said} of {which} has been deleted: its buffer was donated to a jitted "
        "function (`donate_argnums`) or deleted. A variable's value is its own; pass a copy "
        "(`jnp.array(v.value)`) to a function that donates its arguments. Assigning the "
        "variable a new value (`v.assign(...)`) makes it usable again"
    )


def _value_of(x: Any) -> Any:
    return x._value if isinstance(x, Variable) else x


def _binary(op):
    def forward(self, other):
        return op(self._value, _value_of(other))

    def backward(self, other):
        return op(_value_of(other), self._value)

    return forward, backward


@jax.tree_util.register_pytree_node_class
class Variable:
    """A mutable, named array: the object tf.keras optimizers update in place.

    It behaves like its value in expressions (``3 * v * v``, ``x @ w + b`` with ``x`` a NumPy
    batch, ``jnp.tanh(v)``), which stay differentiable inside :meth:`Optimizer.minimize`.
    ``assign*`` replace the value; a sharded value keeps its sharding.

    Args:
        initial_value: an array-like, or a zero-argument callable returning one.
        trainable: whether optimizers and ``trainable_weights`` lists should include it.
        name: a name (``"Variable"`` by default); ``.name`` adds Keras's ``":0"`` suffix.
        dtype: the dtype to cast the value to (default: the value's, float32 for Python floats).
        constraint: a callable ``array -> array`` applied after each dense optimizer update.

    Raises:
        TypeError: if ``constraint`` is not callable or the value is not array-like.

    Example:
        >>> import kopt
        >>> v = kopt.Variable([1.0, 2.0], name="w")
        >>> v.assign_add([1.0, 1.0]).numpy(), v.name
        (array([2., 3.], dtype=float32), 'w:0')
    """

    __array_ufunc__ = None  # NumPy operators defer to ours, so `x @ w` stays traceable
    __array_priority__ = 1000
    # Set by an optimizer on a variable it owns (a hyperparameter's, ``iterations``): called
    # with each concrete value ``assign`` is given, before it is stored, to refuse a bad one.
    _assign_check: Any = None

    def __init__(
        self,
        initial_value: Any,
        trainable: bool = True,
        name: str | None = None,
        dtype: Any = None,
        constraint: Any = None,
    ):
        if constraint is not None and not callable(constraint):
            raise TypeError(
                f"Variable: `constraint` must be callable, received {type(constraint).__name__}"
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Variable: `name` must be a string, received {type(name).__name__}")
        if dtype is not None:
            try:
                dtype = jnp.dtype(dtype)
            except TypeError as e:
                raise TypeError(f"Variable: `dtype` must be a dtype, received {dtype!r:.60}") from e
        # Made while a loss or a step is traced (a layer built on its first call), a variable
        # from a known value holds that value, not a value of the trace.
        with jax.ensure_compile_time_eval():
            if callable(initial_value) and not hasattr(initial_value, "shape"):
                initial_value = initial_value()
            if dtype is not None:
                _check_cast(_value_of(initial_value), dtype, f"{name or 'Variable'}:0")
            value = _full_spec(_as_array(initial_value, dtype, "initial_value"))
        self._uid = next(_uid)
        self._value = value
        self._trainable = bool(trainable)
        self._shared_name = name or "Variable"
        self._constraint = constraint

    @property
    def _current(self):
        """The value (this thread's traced one while bound), for metadata and internal reads."""
        table = getattr(_bindings, "table", None)
        if table and self._uid in table:
            return table[self._uid]
        return self._storage

    @property
    def _value(self):
        """The value for a computation. Records the read (``track_reads``) and, outside a
        trace, marks the buffer as handed out, so that a donating update copies it first."""
        seen = getattr(_reads, "seen", None)
        if seen is not None:
            seen.add(self._uid)
        value = self._current
        if isinstance(value, jax.core.Tracer):
            return value
        with donation_lock:
            self._handed_out = True
            value = self._current
        try:
            deleted = value.is_deleted()
        except AttributeError:  # not an array (a placeholder a tree utility unflattened)
            deleted = False
        if deleted:
            raise deleted_error(None, [self])
        return value

    @_value.setter
    def _value(self, value):
        table = getattr(_bindings, "table", None)
        if table and self._uid in table:
            table[self._uid] = value
            return
        captured = getattr(_bindings, "captured", None)
        storage = self.__dict__.get("_storage", _MISSING)
        if (
            captured is not None
            and storage is not _MISSING  # not a variable the loss is creating
            and not isinstance(storage, jax.core.Tracer)
        ):
            # Written by a loss being differentiated (a traced value, or a concrete one the
            # loss computed without the variables it is differentiated for): kept until the
            # loss returns, and made by its caller, which may discard the writes of a run it
            # repeats (a callable var_list that the first run built).
            if table is None:
                table = _bindings.table = {}
            table[self._uid] = value
            captured[self._uid] = self
            return
        if isinstance(value, jax.core.Tracer) and not isinstance(
            self.__dict__.get("_storage", value), jax.core.Tracer
        ):
            # A traced value for a variable that holds a concrete one, outside such a loss:
            # refused, since the variable would be left holding a leaked tracer.
            if not table:
                raise RuntimeError(
                    f"Variable {self.name}: cannot store a traced value (it is being assigned "
                    "inside jax.jit or another JAX transformation, which would leave it holding "
                    "a leaked tracer). Pass the variable to the jitted function as an argument "
                    "and return it, or assign it outside the transformation"
                )
        with donation_lock:
            old = self.__dict__.get("_storage")
            self._storage = value
            self._handed_out = False
            committed = _committed(value)
            sharding = getattr(value, "sharding", None)
            if type(sharding) is not _SINGLE_DEVICE:
                if not _placed_as(old, sharding, committed):
                    placement_epoch[0] += 1  # a value that may span devices: step keys look again
            elif committed != (committed if old is None else _committed(old)):
                placement_epoch[0] += 1  # now committed, or no longer: step keys look again
            if committed and not committed_seen[0]:
                committed_seen[0] = True

    def _donatable_value(self) -> Any:
        """The value for a compiled update that donates (reuses) its inputs, under
        ``donation_lock``: the buffer itself, or a copy if it was handed out or a gradient
        computation is in flight, so that values read elsewhere stay valid."""
        value = self._storage
        if self._handed_out or _readers:
            return _keep_sharding(jnp.array(value, copy=True), value)
        return value

    # pytree: the value is the leaf, so jnp functions and jax transformations accept it
    def tree_flatten(self):
        return (self._value,), (self._shared_name, self._trainable, self._constraint)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj._storage = children[0]
        obj._handed_out = True  # the buffer may be another variable's
        obj._shared_name, obj._trainable, obj._constraint = aux
        obj._uid = next(_uid)
        return obj

    # copies and pickles are new variables: their own uid (slots and programs are keyed by it),
    # unchecked (an optimizer that is copied too checks its copies again)
    def __getstate__(self) -> dict[str, Any]:
        """The buffer goes along handed out, as ``v.value`` hands it out: a shallow copy shares
        it, and a deep copy or pickle reads it after this returns, so a donating step (in this
        thread or another) copies it first."""
        with donation_lock:
            self._handed_out = True
            return {k: v for k, v in self.__dict__.items() if k not in ("_uid", "_assign_check")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handed_out = True  # a shallow copy shares the buffer
        self._uid = next(_uid)

    # --- state ---------------------------------------------------------------------------
    @property
    def value(self) -> jax.Array:
        """The current value (a ``jax.Array``; it stays valid after later updates)."""
        return self._value

    def read_value(self) -> jax.Array:
        """The current value (tf.Variable's spelling)."""
        return self._value

    def numpy(self) -> np.ndarray:
        """A NumPy copy of the value."""
        with donation_lock:
            value = self._current
            if _is_deleted(value):
                raise deleted_error(None, [self])
            return np.array(value)

    def assign(
        self, value: Any, use_locking: Any = None, name: Any = None, read_value: bool = True
    ) -> Variable:
        """Replaces the value (same shape; cast to the variable's dtype); returns the variable.
        ``use_locking`` and ``name`` are tf.Variable's, accepted and ignored (every assignment
        is atomic).

        Raises:
            ValueError: if the shape differs, or the value is out of the range an optimizer
                owning the variable takes (``opt.beta_1.assign(1.5)``,
                ``opt.iterations.assign(-1)``); the variable keeps its value then.
        """
        value = _value_of(value)
        _check_cast(value, self.dtype, self.name)
        new = _as_array(value, self.dtype, "value")
        if tuple(new.shape) != self.shape:
            raise ValueError(
                f"Variable {self.name}: cannot assign a value of shape {tuple(new.shape)} to a "
                f"variable of shape {self.shape}"
            )
        if self._assign_check is not None and not isinstance(new, jax.core.Tracer):
            self._assign_check(new)
        # The stored value's placement (not a read of it: a deleted buffer is replaced too).
        current = self._current
        new = _keep_sharding(new, current)
        if (
            isinstance(current, jax.Array)
            and not isinstance(current, jax.core.Tracer)
            and not isinstance(new, jax.core.Tracer)
            and current.committed
            and not new.committed
        ):
            # A committed value stays committed: a step compiled for committed inputs would
            # compile again for an uncommitted one (and once more when the step commits it).
            new = jax.device_put(new, current.sharding)
        self._value = new
        return self

    def assign_add(
        self, delta: Any, use_locking: Any = None, name: Any = None, read_value: bool = True
    ) -> Variable:
        """Adds ``delta`` to the value, atomically (no concurrent update, another thread's
        ``assign_add`` or an optimizer step, is lost); returns the variable."""
        delta = self._delta(delta, "assign_add")
        with donation_lock:
            return self.assign(self._value + self._beside(delta))

    def assign_sub(
        self, delta: Any, use_locking: Any = None, name: Any = None, read_value: bool = True
    ) -> Variable:
        """Subtracts ``delta`` from the value, atomically; returns the variable."""
        delta = self._delta(delta, "assign_sub")
        with donation_lock:
            return self.assign(self._value - self._beside(delta))

    def _delta(self, delta: Any, method: str) -> jax.Array:
        """``delta`` as an array that broadcasts to the variable's shape.

        Raises:
            ValueError: naming the variable and the shape given, if it does not.
        """
        delta = jnp.asarray(_value_of(delta))
        shape = tuple(delta.shape)
        try:
            fits = jnp.broadcast_shapes(shape, self.shape) == self.shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"Variable {self.name}: cannot {method} a value of shape {shape} to a variable "
                f"of shape {self.shape}"
            )
        return delta

    def _beside(self, delta: jax.Array) -> jax.Array:
        """``delta`` placed as the value is, where it is committed elsewhere (split otherwise,
        or on another device): ``assign`` places a new value so, and tf.Variable's
        ``assign_add`` copies across devices too. One that broadcasts goes replicated onto the
        value's devices."""
        current = self._current
        if (
            isinstance(delta, jax.core.Tracer)
            or isinstance(current, jax.core.Tracer)
            or not delta.committed
        ):
            return delta
        if delta.shape == current.shape:
            return _keep_sharding(delta, current)
        sharding = current.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
            return delta
        return delta if delta.sharding == sharding else jax.device_put(delta, sharding)

    def ref(self) -> VariableReference:
        """A hashable reference to this variable, equal only to references to it (tf.Variable's
        ``ref()``): for sets and dict keys of variables. ``.deref()`` gives the variable back."""
        return VariableReference(self)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._current.shape)

    @property
    def dtype(self):
        return self._current.dtype

    @property
    def ndim(self) -> int:
        return self._current.ndim

    @property
    def size(self) -> int:
        return int(self._current.size)

    @property
    def name(self) -> str:
        return f"{self._shared_name}:0"

    @property
    def trainable(self) -> bool:
        return self._trainable

    @property
    def constraint(self):
        return self._constraint

    @property
    def sharding(self):
        return getattr(self._current, "sharding", None)

    @property
    def device(self) -> str:
        sharding = self.sharding
        return str(sharding) if sharding is not None else ""

    def __repr__(self) -> str:
        value = self._current
        shown = "<deleted>" if _is_deleted(value) else self._value
        return f"<kopt.Variable '{self.name}' shape={self.shape} dtype={self.dtype} value={shown}>"

    # --- array protocol --------------------------------------------------------------------
    def __jax_array__(self):
        return self._value

    def __array__(self, dtype=None, copy=None):
        with donation_lock:
            out = np.asarray(self._current)
        if dtype is not None:
            out = out.astype(dtype)
        # np.array(v) asks for a copy: a writable one, as a jax.Array or tf.Variable gives
        # (NumPy's view of a device buffer is read-only). np.asarray(v) may keep the view.
        return np.array(out, copy=True) if copy and not out.flags.writeable else out

    def __float__(self):
        return float(self._value)

    def __int__(self):
        return int(self._value)

    def __bool__(self):
        return bool(self._value)

    def __len__(self):
        return len(self._current)

    def __iter__(self):
        return iter(self._value)

    def __hash__(self):
        return id(self)

    def __getitem__(self, index):
        return self._value[_value_of(index)]

    def __neg__(self):
        return -self._value

    def __pos__(self):
        return +self._value

    def __abs__(self):
        return abs(self._value)

    @property
    def T(self):
        return self._value.T

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._value, name)

    __add__, __radd__ = _binary(lambda a, b: a + b)
    __sub__, __rsub__ = _binary(lambda a, b: a - b)
    __mul__, __rmul__ = _binary(lambda a, b: a * b)
    __truediv__, __rtruediv__ = _binary(lambda a, b: a / b)
    __floordiv__, __rfloordiv__ = _binary(lambda a, b: a // b)
    __mod__, __rmod__ = _binary(lambda a, b: a % b)
    __pow__, __rpow__ = _binary(lambda a, b: a**b)
    __matmul__, __rmatmul__ = _binary(lambda a, b: a @ b)
    __lt__, _ = _binary(lambda a, b: a < b)
    __le__, _ = _binary(lambda a, b: a <= b)
    __gt__, _ = _binary(lambda a, b: a > b)
    __ge__, _ = _binary(lambda a, b: a >= b)

    def __eq__(self, other):
        return self._value == _value_of(other)

    def __ne__(self, other):
        return self._value != _value_of(other)


class VariableReference:
    """What :meth:`Variable.ref` returns: hashable, and equal only to a reference to the same
    variable (``==`` on variables compares their values)."""

    __slots__ = ("_variable",)

    def __init__(self, variable: Variable):
        self._variable = variable

    def deref(self) -> Variable:
        """The variable referred to."""
        return self._variable

    def __hash__(self) -> int:
        return id(self._variable)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, VariableReference) and other._variable is self._variable

    def __repr__(self) -> str:
        return f"<Reference wrapping {self._variable!r}>"


def _check_cast(value: Any, dtype: Any, name: str) -> None:
    """Refuses a value that would not survive the cast to the variable's ``dtype``: see
    :func:`_check_integral` for an integer variable; a complex value for a real one (TypeError:
    its imaginary part would be dropped; tf.Variable refuses it too)."""
    if jnp.issubdtype(dtype, jnp.integer):
        _check_integral(value, dtype, name)
        return
    if jnp.issubdtype(dtype, jnp.complexfloating) or isinstance(value, str) or value is None:
        return
    try:
        is_complex = np.iscomplexobj(value)
    except (TypeError, ValueError):
        return  # _as_array reports it
    if is_complex:
        given = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        raise TypeError(
            f"Variable {name}: cannot assign a value of dtype {np.dtype(given).name} to a "
            f"variable of dtype {np.dtype(dtype).name} (its imaginary part would be lost)"
        )


def _check_integral(value: Any, dtype: Any, name: str) -> None:
    """Refuses, for an integer variable, a value that would not survive the cast: a non-integer
    (TypeError, as tf.Variable) or one out of the dtype's range (ValueError, instead of a
    wrapped count)."""
    if isinstance(value, jax.core.Tracer) or isinstance(value, str) or value is None:
        return
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return  # _as_array reports it
    if array.dtype.kind not in "biu":
        raise TypeError(
            f"Variable {name}: cannot assign a value of dtype {array.dtype} to a variable of "
            f"dtype {np.dtype(dtype).name}"
        )
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(
            f"Variable {name}: the value {array.max() if array.max() > info.max else array.min()} "
            f"is out of the range of its dtype {np.dtype(dtype).name} "
            f"[{info.min}, {info.max}]"
        )


def _as_array(value: Any, dtype: Any, what: str) -> jax.Array:
    if isinstance(value, str) or value is None:
        raise TypeError(f"Variable: `{what}` must be array-like, received {type(value).__name__}")
    try:
        if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
            copy = transfer_copy(value, dtype)  # no program compiled per shape
            if copy is not None:
                return copy
            # A variable's dtype is definite: a weakly typed value (jnp.full(s, 1.0)) would
            # come back strongly typed from the first step and compile the second one again.
            out = jnp.array(value, dtype=dtype or value.dtype, copy=True)
            return _keep_sharding(out, value)
        if isinstance(value, jax.core.Tracer):
            return value.astype(dtype) if dtype is not None else value
        if isinstance(value, np.ndarray) and value.dtype != object:
            target = jax.dtypes.canonicalize_dtype(value.dtype if dtype is None else dtype)
            if target == value.dtype or (value.dtype == np.float64 and target == np.float32):
                # A transfer of the array (float64 rounded to float32 on the host, as JAX's own
                # transfer does): ``jnp.array`` compiled a program per shape, one per variable
                # of a model built from NumPy initial values. Other casts stay on the device.
                # The copy is made here: a transfer may share the NumPy array's memory.
                return jax.device_put(np.array(value, dtype=target, copy=True))
        if dtype is None and isinstance(value, (float, list, tuple)):
            arr = np.asarray(value)
            if arr.dtype == np.float64:
                dtype = jnp.float32
        return jnp.array(value, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"Variable: `{what}` must be array-like, received {value!r:.60}: {e}"
        ) from e


def _full_spec(value: Any) -> Any:
    """``value`` with its partition spec written out to every dimension (``P()`` of a vector
    becomes ``P(None,)``) on a mesh with explicit axes, as a compiled step's outputs carry it
    there: the spec is part of the type, and the short spelling would compile twice."""
    sharding = getattr(value, "sharding", None)
    if (
        not isinstance(sharding, jax.sharding.NamedSharding)
        or isinstance(value, jax.core.Tracer)
        or len(sharding.spec) >= value.ndim
        or jax.sharding.AxisType.Explicit not in getattr(sharding.mesh, "axis_types", ())
    ):
        return value
    spec = jax.sharding.PartitionSpec(*sharding.spec, *[None] * (value.ndim - len(sharding.spec)))
    return jax.device_put(
        value, jax.sharding.NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)
    )


def _committed(value: Any) -> bool:
    """Whether a concrete array is committed to its devices (False for anything else)."""
    return (
        isinstance(value, jax.Array)
        and not isinstance(value, jax.core.Tracer)
        and (value.committed)
    )


def _placed_as(old: Any, sharding: Any, committed: bool) -> bool:
    """Whether ``old`` (a variable's previous value) is a concrete array placed with
    ``sharding`` and as committed: a new value placed so leaves every step key as it was."""
    return (
        isinstance(old, jax.Array)
        and not isinstance(old, jax.core.Tracer)
        and old.committed == committed
        and old.sharding == sharding
    )


def _keep_sharding(new: jax.Array, old: Any) -> jax.Array:
    sharding = getattr(old, "sharding", None)
    if (
        sharding is None
        or isinstance(new, jax.core.Tracer)
        or isinstance(old, jax.core.Tracer)
        or getattr(new, "sharding", None) == sharding
    ):
        return new
    return jax.device_put(new, sharding)
