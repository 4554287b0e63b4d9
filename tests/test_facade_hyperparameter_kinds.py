"""The kinds of value a facade hyperparameter may hold (numbers of any float dtype, schedules,
zero-argument callables), where each is accepted, how configs carry them, and the errors for
the ones that are not."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kopt
from kopt import optimizers, schedules
from kopt.optimizers.schedules import ExponentialDecay, PolynomialDecay


def rising(start=0.5, end=0.9):
    return PolynomialDecay(start, 4, end_learning_rate=end)


@pytest.mark.parametrize(
    "cls, name",
    [
        (optimizers.SGD, "momentum"),
        (optimizers.RMSprop, "rho"),
        (optimizers.RMSprop, "momentum"),
        (optimizers.Adam, "beta_1"),
        (optimizers.Adamax, "beta_2"),
        (optimizers.Adadelta, "rho"),
        (optimizers.Ftrl, "beta"),
        (optimizers.Ftrl, "l1_regularization_strength"),
        (optimizers.Lion, "beta_1"),
        (optimizers.Lion, "beta_2"),
    ],
)
def test_a_schedule_as_another_hyperparameter_round_trips_through_configs(cls, name):
    """get_config wrote the schedule's dict, but from_config only turned the learning rate's
    back into a schedule: the constructor refused the dict, and so did restore_optimizer."""
    opt = cls(0.1, **{name: rising(0.01, 0.2) if name.startswith("l1") else rising()})
    config = json.loads(json.dumps(opt.get_config()))
    again = cls.from_config(config)
    assert isinstance(getattr(again, name), PolynomialDecay)
    assert again.get_config() == config
    assert isinstance(
        getattr(optimizers.deserialize(optimizers.serialize(opt)), name), PolynomialDecay
    )
    var, twin = kopt.Variable([1.0, -2.0]), kopt.Variable([1.0, -2.0])
    for _ in range(3):
        opt.apply_gradients([(jnp.array([0.3, -0.1]), var)])
        again.apply_gradients([(jnp.array([0.3, -0.1]), twin)])
    np.testing.assert_array_equal(var.numpy(), twin.numpy())


def test_lion_and_ftrl_follow_a_schedule_as_the_functional_optimizers_do():
    """The constructors compared the schedule with numbers for their range checks (a
    TypeError from `<`, or Lion's "must be in the [0, 1] range")."""
    cases = [
        (
            optimizers.Lion(0.1, beta_1=rising()),
            kopt.lion(0.1, beta_1=schedules.polynomial_decay(0.5, 4, end_learning_rate=0.9)),
        ),
        (
            optimizers.Ftrl(0.1, l1_regularization_strength=rising(0.01, 0.2)),
            kopt.ftrl(
                0.1,
                l1_regularization_strength=schedules.polynomial_decay(
                    0.01, 4, end_learning_rate=0.2
                ),
            ),
        ),
    ]
    grads = [jnp.array([0.3, -0.2]), jnp.array([-0.1, 0.4]), jnp.array([0.2, 0.2])]
    for opt, tx in cases:
        var, params = kopt.Variable([1.0, -1.0]), jnp.array([1.0, -1.0])
        state = tx.init(params)
        for g in grads:
            opt.apply_gradients([(g, var)])
            updates, state = tx.update(g, state, params)
            params = kopt.apply_updates(params, updates)
        np.testing.assert_allclose(var.numpy(), params, rtol=1e-6, err_msg=type(opt).__name__)


@pytest.mark.parametrize(
    "value", [jnp.asarray(0.5, jnp.bfloat16), np.asarray(0.5, ml_dtypes.bfloat16), jnp.float16(0.5)]
)
def test_low_precision_float_hyperparameters_are_numbers(value):
    """``np.issubdtype(bfloat16, np.number)`` is False: a bfloat16 learning rate was refused as
    "not a scalar number" by the constructor and by assignment."""
    opt = optimizers.SGD(learning_rate=value, momentum=value)
    opt.learning_rate = value
    var = kopt.Variable([1.0])
    opt.apply_gradients([(jnp.ones(1), var)])
    np.testing.assert_allclose(var.numpy(), [0.5])
    assert optimizers.AdamW(weight_decay=value).get_config()["weight_decay"] == 0.5


@pytest.mark.parametrize(
    "returned, shown",
    [(jnp.array([0.1]), r"shape \(1,\)"), (None, "NoneType"), ("0.1", "str"), (True, "bool")],
)
def test_a_callable_returning_no_real_scalar_is_an_error_naming_the_argument(returned, shown):
    """It raised JAX's or float()'s message, or for a string trained with it."""
    opt = optimizers.SGD(learning_rate=lambda: returned)
    var = kopt.Variable([1.0])
    with pytest.raises(TypeError, match=rf"SGD: the callable given as `learning_rate`.*{shown}"):
        opt.apply_gradients([(jnp.ones(1), var)])
    np.testing.assert_array_equal(var.numpy(), [1.0])
    assert int(opt.iterations.numpy()) == 0


def test_a_callable_that_goes_bad_later_leaves_the_step_undone():
    current = {"lr": 0.1}
    opt = optimizers.SGD(learning_rate=lambda: current["lr"])
    var = kopt.Variable([1.0])
    opt.apply_gradients([(jnp.ones(1), var)])
    current["lr"] = None
    with pytest.raises(TypeError, match="learning_rate"):
        opt.apply_gradients([(jnp.ones(1), var)])
    np.testing.assert_allclose(var.numpy(), [0.9])
    assert int(opt.iterations.numpy()) == 1


@pytest.mark.parametrize("decay", [lambda: 1.0, ExponentialDecay(1.0, 1, 1.0), kopt.Variable(1.0)])
def test_decayed_lr_applies_the_decay_the_step_applies(decay):
    """``_decayed_lr`` skipped a decay given as a callable (or a variable), while the step
    divided by it."""
    opt = optimizers.SGD(0.1)
    opt.decay = decay
    var = kopt.Variable([0.0])
    opt.apply_gradients([(jnp.zeros(1), var)])  # iterations 1
    read = float(opt._decayed_lr(jnp.float32))
    opt.apply_gradients([(jnp.ones(1), var)])
    assert read == pytest.approx(0.05)
    np.testing.assert_allclose(-var.numpy(), [read], rtol=1e-6)


@pytest.mark.parametrize("cls", [optimizers.Adam, optimizers.RMSprop, optimizers.Adagrad])
@pytest.mark.parametrize("value", [ExponentialDecay(1e-3, 10, 0.5), lambda: 1e-3])
def test_epsilon_is_a_plain_number_as_in_keras(cls, value):
    """A schedule or callable epsilon was accepted, then failed in the first step with float()'s
    or the lambda's own TypeError."""
    with pytest.raises(TypeError, match=rf"{cls.__name__}: `epsilon` must be a number"):
        cls(0.1, epsilon=value)
    opt = cls(0.1, epsilon=1e-4)
    with pytest.raises(TypeError, match="`epsilon` must be a number"):
        opt.epsilon = value
    assert opt.epsilon == 1e-4


@pytest.mark.parametrize(
    "cls, name",
    [
        (optimizers.AdamW, "epsilon"),
        (optimizers.Lamb, "beta_2"),
        (optimizers.Adafactor, "beta_2_decay"),
        (optimizers.Lion, "beta_1"),
    ],
)
def test_keras_3_classes_refuse_a_zero_argument_callable(cls, name):
    """It was taken for a schedule and called with the step: "<lambda>() takes 0 positional
    arguments" at the first step (Lion: its [0, 1] range message)."""
    with pytest.raises(TypeError, match=rf"{cls.__name__}: `{name}` takes a number or a schedule"):
        cls(**{name: lambda: 0.5})
    opt = cls()
    before = getattr(opt, name)
    with pytest.raises(TypeError, match=f"`{name}`"):
        setattr(opt, name, lambda: 0.5)
    assert getattr(opt, name) == before


def test_ftrl_plain_numbers_refuse_schedules_naming_them():
    for name in ("initial_accumulator_value", "l2_shrinkage_regularization_strength"):
        with pytest.raises(TypeError, match=f"Ftrl: `{name}` must be a number"):
            optimizers.Ftrl(**{name: rising()})


class _Holder(optimizers.Optimizer):
    """A wrapper whose config holds its inner optimizer serialized (a class_name/config dict)."""

    def __init__(self, inner="sgd", name="Holder", **kwargs):
        super().__init__(name, **kwargs)
        self.inner = inner if isinstance(inner, optimizers.Optimizer) else optimizers.get(inner)
        self._set_hyper("learning_rate", 0.1)

    def _create_slots(self, var_list):
        self.inner._create_slots(var_list)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        return self.inner._resource_apply_dense(grad, var)

    def get_config(self):
        return {**super().get_config(), "inner": optimizers.serialize(self.inner)}


def test_from_config_leaves_dicts_that_are_not_schedules_to_the_constructor():
    """Every {"class_name", "config"} dict was taken for a schedule: a serialized inner
    optimizer raised "Unknown decay: 'SGD'"."""
    again = _Holder.from_config(_Holder(optimizers.SGD(0.5)).get_config())
    assert isinstance(again.inner, optimizers.SGD)
    assert float(again.inner.learning_rate.numpy()) == 0.5


@pytest.mark.parametrize(
    "make",
    [
        optimizers.SGD,
        lambda lr: optimizers.Adam(lr, clipnorm=1.0),
        lambda lr: optimizers.AdamW(lr, weight_decay=0.0),
        lambda lr: optimizers.LossScaleOptimizer(optimizers.SGD(lr)),
    ],
    ids=["SGD", "Adam", "AdamW", "LossScale"],
)
def test_a_callable_learning_rate_is_called_once_a_step_and_steps_with_that_value(make):
    """It was called four times on the first step (making the slots, the step's value,
    compiling twice), and the step took the second value. tf.keras calls it once a step."""
    values = iter([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    taken = []

    def lr():
        taken.append(next(values))
        return taken[-1]

    var = kopt.Variable(0.0)
    opt = make(lr)
    moved = []
    for _ in range(2):
        before = float(var.numpy())
        opt.apply_gradients([(jnp.asarray(1.0), var)])
        moved.append(before - float(var.numpy()))
    assert taken == [0.1, 0.2]
    if isinstance(opt, (optimizers.SGD, optimizers.LossScaleOptimizer)):
        np.testing.assert_allclose(moved, [0.1, 0.2], rtol=1e-6)
    else:  # Adam's first steps move by about the learning rate
        np.testing.assert_allclose(moved, [0.1, 0.2], rtol=1e-3)
