"""``LossScaleOptimizer``: tf.keras's loss scaling for float16 / bfloat16 training."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kopt._tree import on_params_devices
from kopt.base import GradientTransformation, as_count, check_count
from kopt.optimizers.base import Optimizer
from kopt.sparse import IndexedSlices, map_values
from kopt.transforms._wrappers import apply_if_finite
from kopt.variables import Variable, _full_spec


def _inner_attribute(name: str) -> property:
    """An attribute of the wrapped optimizer, read and set through the wrapper."""
    return property(
        lambda self: getattr(self._optimizer, name),
        lambda self, value: setattr(self._optimizer, name, value),
        doc=f"The inner optimizer's ``{name}``.",
    )


class LossScaleOptimizer(Optimizer):
    """Scales the loss up (so small float16 gradients do not underflow), the gradients back
    down, and skips steps whose gradients are not finite.

    A dynamic scale starts at ``initial_scale`` (default ``2**15``), doubles after
    ``dynamic_growth_steps`` (default 2000) finite steps in a row and halves (not below 1) on a
    step with a NaN or infinity; that step changes the value of no variable, slot or step count
    (it does make the slots of a variable seen for the first time, where tf.keras waits for an
    applied step). A fixed scale (``dynamic=False``) needs ``initial_scale``.

    Args:
        inner_optimizer: the optimizer that applies the (unscaled) gradients.
        dynamic: whether the scale adapts.
        initial_scale: the starting (or fixed) scale.
        dynamic_growth_steps: finite steps before the scale doubles.

    Raises:
        TypeError: if ``inner_optimizer`` is not a kopt optimizer.
        ValueError: for a fixed scale without ``initial_scale``, or non-positive values.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> var = kopt.Variable([1.0])
        >>> opt = kopt.optimizers.LossScaleOptimizer(kopt.optimizers.SGD(0.5))
        >>> _ = opt.apply_gradients([(jnp.array([jnp.inf]), var)])   # skipped, scale halved
        >>> var.numpy(), float(opt.loss_scale.numpy())
        (array([1.], dtype=float32), 16384.0)
    """

    def __init__(
        self,
        inner_optimizer: Optimizer,
        dynamic: bool = True,
        initial_scale: float | None = None,
        dynamic_growth_steps: int | None = None,
    ):
        if not isinstance(inner_optimizer, Optimizer):
            raise TypeError(
                "LossScaleOptimizer: `inner_optimizer` must be a kopt.optimizers.Optimizer, "
                f"received {type(inner_optimizer).__name__}"
            )
        if isinstance(inner_optimizer, LossScaleOptimizer):
            raise TypeError("LossScaleOptimizer: `inner_optimizer` is already a LossScaleOptimizer")
        if not isinstance(dynamic, bool):
            raise TypeError(
                f"LossScaleOptimizer: `dynamic` must be a bool, received {dynamic!r} (a fixed "
                "scale goes in `initial_scale`, with dynamic=False)"
            )
        if inner_optimizer.__dict__.get("_wrapped_by_loss_scale"):
            raise ValueError(
                "LossScaleOptimizer: `inner_optimizer` is already wrapped by a "
                "LossScaleOptimizer; an optimizer can only be wrapped by one"
            )
        if not dynamic and initial_scale is None:
            raise ValueError("LossScaleOptimizer: `initial_scale` must be given when dynamic=False")
        if not dynamic and dynamic_growth_steps is not None:
            raise ValueError(
                "LossScaleOptimizer: `dynamic_growth_steps` cannot be given when dynamic=False"
            )
        if initial_scale is None:
            initial_scale = 2.0**15
        if dynamic_growth_steps is None and dynamic:
            dynamic_growth_steps = 2000
        try:
            scale = float(np.asarray(initial_scale))
        except (TypeError, ValueError):
            scale = None
        if isinstance(initial_scale, (bool, str, bytes)) or scale is None:  # "8" is no number
            raise TypeError(
                f"LossScaleOptimizer: `initial_scale` must be a number, received {initial_scale!r}"
            )
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(
                "LossScaleOptimizer: `initial_scale` must be finite and > 0, received "
                f"{initial_scale!r}"
            )
        initial_scale = scale
        if dynamic:
            check_count("LossScaleOptimizer", "dynamic_growth_steps", dynamic_growth_steps, 1)
        super().__init__("LossScaleOptimizer")
        self._optimizer = inner_optimizer
        self.dynamic = bool(dynamic)
        self.initial_scale = float(initial_scale)
        count = as_count(dynamic_growth_steps)  # a Python int for get_config, where it is one
        self.dynamic_growth_steps = dynamic_growth_steps if count is None else count
        self._loss_scale = Variable(
            jnp.float32(initial_scale),
            trainable=False,
            name="LossScaleOptimizer/current_loss_scale",
        )
        self._good_steps = Variable(
            jnp.int32(0), trainable=False, name="LossScaleOptimizer/good_steps"
        )
        inner_optimizer._wrapped_by_loss_scale = True

    @property
    def inner_optimizer(self) -> Optimizer:
        return self._optimizer

    @property
    def compile_count(self) -> int:
        """The programs compiled for this optimizer's steps: the inner optimizer's count, as
        the inner optimizer compiles and runs them."""
        return self._optimizer.compile_count

    @compile_count.setter
    def compile_count(self, value: int) -> None:
        if "_optimizer" in self.__dict__:  # the base class's zero, set before there is one
            self._optimizer.compile_count = value

    @property
    def loss_scale(self) -> Variable:
        """The current loss scale (a float32 scalar variable)."""
        return self._loss_scale

    def get_scaled_loss(self, loss: Any) -> Any:
        """``loss * loss_scale``, in the loss's dtype (a callable loss gives a callable)."""
        if callable(loss):

            def scaled_loss():
                return _times(loss(), self._loss_scale.value)

            # compute_gradients places the scale beside the variables before the loss runs, as
            # the step will: read uncommitted on the first call and moved by its step, the
            # product and the unscaling compiled again on the second call.
            scaled_loss._reads_state = self._guard_variables()
            scaled_loss.__wrapped__ = loss  # the loss it is, to the facade's traced gradients
            return scaled_loss
        self._place_beside([loss])
        return _times(loss, self._loss_scale.value)

    def get_unscaled_gradients(self, grads: list[Any]) -> list[Any]:
        """Each gradient times ``1 / loss_scale``, the reciprocal taken in float32 (a float16
        scale of ``2**16`` would be infinite); an ``IndexedSlices`` has its rows scaled, and
        None stays None."""
        grads = list(grads)
        self._place_beside(grads)
        # An IndexedSlices is scaled on its own: its row count changes from batch to batch,
        # and each new count would compile the call over every gradient again.
        dense = [None if isinstance(g, IndexedSlices) else g for g in grads]
        try:
            out = _unscaled(dense, self._loss_scale.value)
        except ValueError:  # gradients on several devices: one at a time, where each lives
            out = [None] * len(grads)
        one_by_one = [
            i
            for i, (g, o) in enumerate(zip(grads, out, strict=True))
            if o is None and g is not None
        ]
        if one_by_one:
            reciprocal = 1.0 / self._loss_scale.value
            for i in one_by_one:
                out[i] = _times(grads[i], reciprocal)
        return out

    def _place_beside(self, values: list[Any]) -> None:
        """Commits a dynamic scale and its counter that are not committed yet to where the first
        committed of ``values`` is (a loss, also one being differentiated, or gradients): the
        step would put them there, beside the variables. Read uncommitted by the first call's
        own product and unscaling, and committed by its step, they compiled those operations
        again on the second call (a dozen one-off compiles for a few variables)."""
        todo = [
            v
            for v in self._guard_variables()
            if isinstance(v._current, jax.Array)
            and not isinstance(v._current, jax.core.Tracer)
            and not v._current.committed
        ]
        if not todo:
            return
        target = _placement(values)
        if target is None:
            return
        with self._lock:
            for v in todo:
                v._value = _full_spec(jax.device_put(v._storage, target))

    def compute_gradients(self, loss, var_list, grad_loss=None):
        # Under the lock (a step changes the scale under it too): the loss is scaled and the
        # gradients unscaled by one scale, whatever another thread's step does to it.
        with self._lock:
            pairs = self._optimizer.compute_gradients(
                self.get_scaled_loss(loss), var_list, grad_loss
            )
            grads = self.get_unscaled_gradients([g for g, _ in pairs])
        return list(zip(grads, [v for _, v in pairs], strict=True))

    def apply_gradients(self, grads_and_vars, name=None, experimental_aggregate_gradients=True):
        """Applies the gradients with the inner optimizer if they are all finite (after its
        ``gradient_aggregator``); otherwise changes no value but the scale's (new variables
        still get their slots). Gradients must already be unscaled
        (:meth:`get_unscaled_gradients`; :meth:`minimize` does it)."""
        # One compiled step decides on the device whether the gradients are all finite,
        # applies them or keeps everything, and moves the scale: no round trip to the host.
        with self._lock, self._optimizer._lock:
            self._optimizer._guard = self
            try:
                return self._optimizer.apply_gradients(
                    grads_and_vars,
                    name=name,
                    experimental_aggregate_gradients=experimental_aggregate_gradients,
                )
            finally:  # the inner optimizer, called directly, applies what it is given
                self._optimizer._guard = None

    # --- the guard the inner optimizer's step calls (see Optimizer._compile) ----------------
    def _guard_variables(self) -> list[Variable]:
        return [self._loss_scale, self._good_steps] if self.dynamic else []

    def _guard_key(self) -> tuple:
        return (id(self), self.dynamic, self.dynamic_growth_steps)

    def _guard_update(self, finite: Any) -> None:
        """Inside the step (variables bound): halve the scale after a non-finite step, double
        it after ``dynamic_growth_steps`` finite ones in a row."""
        if not self.dynamic:
            return
        scale, good = _next_scale(
            self._loss_scale.value, self._good_steps.value, finite, self.dynamic_growth_steps
        )
        self._loss_scale.assign(scale)
        self._good_steps.assign(good)

    @property
    def dynamic_counter(self) -> Variable | None:
        """Finite steps since the scale last changed (``None`` for a fixed scale)."""
        return self._good_steps if self.dynamic else None

    @property
    def iterations(self):
        return self._optimizer.iterations

    @iterations.setter
    def iterations(self, variable: Variable) -> None:
        self._optimizer.iterations = variable

    # Clipping is the inner optimizer's, read and set through the wrapper (as tf.keras).
    clipnorm = _inner_attribute("clipnorm")
    global_clipnorm = _inner_attribute("global_clipnorm")
    clipvalue = _inner_attribute("clipvalue")

    @property
    def weights(self):
        return self._optimizer.weights + [self._loss_scale, self._good_steps]

    def _guarded_scales(self):
        return (self._loss_scale,)

    def variables(self):
        return self.weights

    def _create_all_weights(self, var_list):
        self._optimizer._create_all_weights(var_list)

    def add_slot(self, var, slot_name, initializer="zeros", shape=None):
        return self._optimizer.add_slot(var, slot_name, initializer, shape)

    def get_slot(self, var, slot_name):
        return self._optimizer.get_slot(var, slot_name)

    def get_slot_names(self):
        return self._optimizer.get_slot_names()

    def as_transformation(self) -> GradientTransformation:
        """The same algorithm as a pure transformation: the inner optimizer's
        ``as_transformation()``, skipped on a step whose gradients are not all finite (zero
        updates; its state, step count included, unchanged), with the loss scale in the state.

        The state's ``loss_scale`` (a float32 scalar, starting at ``initial_scale``) is the
        factor to scale the loss by, and the gradients given to ``update`` must be unscaled
        (divided by it), as :meth:`get_scaled_loss` and :meth:`get_unscaled_gradients` do;
        ``good_steps`` counts the finite steps since the scale last changed. A dynamic scale
        moves as this optimizer's does: halved (not below 1) by a non-finite step, doubled
        after ``dynamic_growth_steps`` finite steps in a row.

        Example:
            >>> import jax, jax.numpy as jnp, kopt
            >>> opt = kopt.optimizers.LossScaleOptimizer(kopt.optimizers.SGD(0.5))
            >>> tx = opt.as_transformation()
            >>> params = jnp.ones(2)
            >>> state = tx.init(params)
            >>> def step(params, state):
            ...     scaled = jax.grad(lambda p: state.loss_scale * jnp.sum(p**2))(params)
            ...     updates, state = tx.update(scaled / state.loss_scale, state, params)
            ...     return kopt.apply_updates(params, updates), state
            >>> params, state = jax.jit(step)(params, state)
            >>> params, float(state.loss_scale)
            (Array([0., 0.], dtype=float32), 32768.0)
        """
        inner = self._optimizer.as_transformation()
        return _loss_scaled(inner, self.dynamic, self.initial_scale, self.dynamic_growth_steps)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.__dict__["_optimizer"], name)

    def __setattr__(self, name, value):
        inner = self.__dict__.get("_optimizer")
        if inner is not None and (name == "lr" or name in inner._hyper):
            setattr(inner, name, value)
        else:
            super().__setattr__(name, value)

    def get_config(self):
        from kopt.optimizers import serialize

        return {
            "inner_optimizer": serialize(self._optimizer),
            "dynamic": self.dynamic,
            "initial_scale": self.initial_scale,
            "dynamic_growth_steps": self.dynamic_growth_steps,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from kopt.optimizers import deserialize

        config = dict(config)
        if "inner_optimizer" not in config:
            raise TypeError(
                "LossScaleOptimizer.from_config: the config has no `inner_optimizer` (the "
                f"optimizer it wraps); received keys {sorted(config)}"
            )
        inner = config.pop("inner_optimizer")
        if isinstance(inner, dict):
            inner = deserialize(inner, custom_objects=custom_objects)
        return cls(inner, **config)


def _placement(values: list[Any]) -> Any:
    """Where the step puts its state beside ``values`` when every one of them that is committed
    is on one device, or spread over one mesh (replicated there); None if none is committed,
    or they are in several places (each is then scaled where it lives). A value being
    differentiated eagerly is a tracer around a concrete one (its ``primal``), which tells
    the place."""
    targets = set()
    for value in values:
        while isinstance(value, jax.core.Tracer):
            value = getattr(value, "primal", None)
        if not isinstance(value, jax.Array) or not value.committed:
            continue
        sharding = value.sharding
        if isinstance(sharding, jax.sharding.SingleDeviceSharding):
            targets.add(sharding)
        elif isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
            targets.add(jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
        else:
            return None
    return targets.pop() if len(targets) == 1 else None


def _times(x: Any, factor: Any) -> Any:
    """``x * factor`` in ``x``'s dtype (an ``IndexedSlices``: its rows)."""
    return map_values(lambda v: jnp.asarray(v) * jnp.asarray(factor).astype(jnp.result_type(v)), x)


@jax.jit
def _unscaled(grads: list[Any], scale: jax.Array) -> list[Any]:
    """Every dense gradient times ``1 / scale``, in one compiled call (three eager operations
    per gradient cost more than the step itself over a few hundred variables)."""
    reciprocal = 1.0 / scale
    return [None if g is None else _times(g, reciprocal) for g in grads]


class LossScaleState(NamedTuple):
    """State of :meth:`LossScaleOptimizer.as_transformation`."""

    loss_scale: jax.Array
    good_steps: jax.Array
    inner_state: Any


# A bad step is never passed to the inner transformation: the scale goes down instead.
_NEVER = 2**31 - 1


def _next_scale(scale: Any, good_steps: Any, finite: Any, growth_steps: int) -> tuple[Any, Any]:
    """A dynamic scale and its count of good steps after a step: halved (not below 1) after a
    non-finite step, doubled after ``growth_steps`` finite ones in a row (unless that would be
    infinite)."""
    good = good_steps + 1
    grow = good >= growth_steps
    grown = jnp.where(jnp.isfinite(scale * 2.0), scale * 2.0, scale)  # float32's end
    new_scale = jnp.where(finite, jnp.where(grow, grown, scale), jnp.maximum(scale / 2.0, 1.0))
    return new_scale, jnp.where(finite & ~grow, good, 0).astype(jnp.int32)


def _loss_scaled(
    inner: GradientTransformation, dynamic: bool, initial_scale: float, growth_steps: Any
) -> GradientTransformation:
    """``inner`` skipped on non-finite gradients, with a (dynamic) loss scale in the state."""
    guarded = apply_if_finite(inner, _NEVER)

    def init_fn(params):
        scale, good = on_params_devices(
            (jnp.asarray(initial_scale, jnp.float32), jnp.zeros([], jnp.int32)), params
        )
        return LossScaleState(scale, good, guarded.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        updates, inner_state = guarded.update(updates, state.inner_state, params, **extra_args)
        scale, good = state.loss_scale, state.good_steps
        if dynamic:  # the guard's decision, taken jointly over replicas where it must be
            scale, good = _next_scale(scale, good, inner_state.last_finite, growth_steps)
        return updates, LossScaleState(scale, good, inner_state)

    return GradientTransformation(init_fn, update_fn)
