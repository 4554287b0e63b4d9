"""The facade's compiled step and its state: no recompiles on hyperparameter or schedule changes,
``get_config``/``set_weights`` round trips that continue bit-identically, serialization."""

import copy
import itertools
import json
import pickle
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from facade_zoo import NAMES, gradients, learning_rates_used, make, make_variables

import kopt
from kopt import optimizers
from kopt.optimizers.schedules import ExponentialDecay

# Each class's tunable values: hyperparameters and the plain float attributes the step reads.
TUNABLE = {
    "SGD": ["learning_rate", "momentum", "decay"],
    "Adam": ["learning_rate", "beta_1", "beta_2", "decay", "epsilon"],
    "Adagrad": ["learning_rate", "decay", "epsilon"],
    "Adadelta": ["learning_rate", "rho", "decay", "epsilon"],
    "Adamax": ["learning_rate", "beta_1", "beta_2", "decay", "epsilon"],
    # Nadam's `decay` is tf.keras's schedule constant, reset to 0.004 by its constructor.
    "Nadam": ["learning_rate", "beta_1", "beta_2", "epsilon"],
    "RMSprop": ["learning_rate", "rho", "momentum", "decay", "epsilon"],
    "Ftrl": [
        "learning_rate",
        "learning_rate_power",
        "l1_regularization_strength",
        "l2_regularization_strength",
        "beta",
        "decay",
    ],
    "AdamW": ["learning_rate", "weight_decay", "beta_1", "beta_2", "epsilon"],
    "Lion": ["learning_rate", "beta_1", "beta_2"],
    "Lamb": ["learning_rate", "beta_1", "beta_2", "epsilon"],
    "Adafactor": ["learning_rate", "beta_2_decay", "epsilon_1", "epsilon_2", "clip_threshold"],
}


def current(opt, name):
    value = getattr(opt, name)
    return float(value.numpy() if isinstance(value, kopt.Variable) else value)


def step(opt, variables, grads):
    opt.apply_gradients(zip([jnp.asarray(g) for g in grads], variables, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_changed_hyperparameters_apply_without_recompiling_and_round_trip(name):
    grads = gradients(6)
    opt, variables = make(name), make_variables()
    for g in grads[:2]:
        step(opt, variables, g)
    for attr in TUNABLE[name]:
        old = current(opt, attr)
        setattr(opt, attr, old * 0.9 if old else 0.05)
    step(opt, variables, grads[2])
    assert opt.compile_count == 1

    # A clone built from the config (holding the new values) and the weights continues exactly
    # as the original: the changes took effect, and nothing is lost on the way.
    config = opt.get_config()
    for attr in TUNABLE[name]:
        assert config[attr] == pytest.approx(current(opt, attr), rel=1e-7), attr
    clone = type(opt).from_config(config)
    clone_variables = [kopt.Variable(v.numpy(), name=v._shared_name) for v in variables]
    assert clone.weights == []
    clone._create_all_weights(clone_variables)
    assert [w.name for w in clone.weights] == [w.name for w in opt.weights]
    clone.set_weights(opt.get_weights())
    for g in grads[3:]:
        step(opt, variables, g)
        step(clone, clone_variables, g)
    for v, c in zip(variables, clone_variables, strict=True):
        np.testing.assert_array_equal(c.numpy(), v.numpy())
    for w, c in zip(opt.get_weights(), clone.get_weights(), strict=True):
        np.testing.assert_array_equal(c, w)
    assert opt.compile_count == 1 and clone.compile_count == 1


@pytest.mark.parametrize("name", NAMES)
def test_schedule_steps_do_not_recompile(name):
    if name == "Nadam":  # tf.keras's Nadam refuses schedule objects; a step function works
        learning_rate = lambda step: 0.1 * 0.5 ** (step / 4.0)
    else:
        learning_rate = ExponentialDecay(0.1, decay_steps=4, decay_rate=0.5)
    opt, variables = make(name, learning_rate=learning_rate), make_variables()
    for g in gradients(3):
        step(opt, variables, g)
    assert opt.compile_count == 1
    assert int(opt.iterations.numpy()) == 3


def test_clip_values_and_callables_change_without_recompiling():
    rates = [0.1]
    var = kopt.Variable([3.0, -4.0])
    opt = optimizers.SGD(learning_rate=lambda: rates[0], clipnorm=1.0)
    expected = np.array([3.0, -4.0])
    for clipnorm, lr in ((1.0, 0.1), (2.0, 0.5), (0.5, 1.0)):
        opt.clipnorm, rates[0] = clipnorm, lr
        opt.apply_gradients([(jnp.array([3.0, -4.0]), var)])
        expected -= lr * np.array([3.0, -4.0]) / 5.0 * clipnorm
        np.testing.assert_allclose(var.numpy(), expected, rtol=1e-6)
    assert opt.compile_count == 1


def test_schedule_round_trip_continues_bit_identically():
    grads = gradients(5, seed=3)
    schedule = ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5, staircase=True)
    opt, variables = optimizers.Adam(learning_rate=schedule, clipnorm=0.5), make_variables()
    for g in grads[:3]:
        step(opt, variables, g)
    config = optimizers.serialize(opt)
    assert config["config"]["learning_rate"]["class_name"] == "ExponentialDecay"
    clone = optimizers.deserialize(config)
    assert isinstance(clone.learning_rate, ExponentialDecay)
    clone_variables = [kopt.Variable(v.numpy()) for v in variables]
    clone._create_all_weights(clone_variables)
    clone.set_weights(opt.get_weights())
    for g in grads[3:]:
        step(opt, variables, g)
        step(clone, clone_variables, g)
    for v, c in zip(variables, clone_variables, strict=True):
        np.testing.assert_array_equal(c.numpy(), v.numpy())


def test_schedules_and_optimizers_holding_them_pickle():
    from kopt.optimizers import schedules

    made = [
        schedules.ExponentialDecay(0.1, 10, 0.5),
        schedules.PiecewiseConstantDecay([5, 10], [0.1, 0.05, 0.01]),
        schedules.PolynomialDecay(0.1, 20, 0.001, power=2.0),
        schedules.InverseTimeDecay(0.1, 5, 0.5),
        schedules.CosineDecay(0.1, 20, alpha=0.1),
        schedules.CosineDecayRestarts(0.1, 5, t_mul=1.5),
    ]
    for schedule in made:
        clone = pickle.loads(pickle.dumps(schedule))
        assert clone.get_config() == schedule.get_config()
        for step_ in (0.0, 3.0, 7.0, 12.0):
            assert float(clone(step_)) == float(schedule(step_)), type(schedule).__name__
    grads = gradients(4, seed=5)
    opt, variables = optimizers.SGD(learning_rate=made[0], momentum=0.9), make_variables()
    for g in grads[:2]:
        step(opt, variables, g)
    clone, clone_variables = pickle.loads(pickle.dumps((opt, variables)))
    for g in grads[2:]:
        step(opt, variables, g)
        step(clone, clone_variables, g)
    for v, c in zip(variables, clone_variables, strict=True):
        np.testing.assert_array_equal(c.numpy(), v.numpy())


def test_loss_scale_optimizer_round_trip():
    opt = optimizers.LossScaleOptimizer(
        optimizers.Adam(0.1), initial_scale=8.0, dynamic_growth_steps=2
    )
    var = kopt.Variable([1.0, 2.0])
    for g in ([1.0, 1.0], [np.inf, 1.0], [0.5, 0.25]):
        opt.apply_gradients([(jnp.array(g), var)])
    clone = optimizers.deserialize(optimizers.serialize(opt))
    assert isinstance(clone.inner_optimizer, optimizers.Adam)
    clone_var = kopt.Variable(var.numpy())
    clone._create_all_weights([clone_var])
    clone.set_weights(opt.get_weights())
    np.testing.assert_array_equal(clone.loss_scale.numpy(), 4.0)
    for g in ([1.0, 1.0], [np.nan, 1.0], [0.5, 0.2], [0.1, 0.1]):
        opt.apply_gradients([(jnp.array(g), var)])
        clone.apply_gradients([(jnp.array(g), clone_var)])
    np.testing.assert_array_equal(clone_var.numpy(), var.numpy())
    for w, c in zip(opt.get_weights(), clone.get_weights(), strict=True):
        np.testing.assert_array_equal(c, w)


def test_serialize_gives_json_numpy_arguments_as_python_numbers_and_lists():
    from kopt.optimizers.schedules import PiecewiseConstantDecay

    schedule = PiecewiseConstantDecay(np.array([2, 4]), np.array([0.1, 0.05, 0.01], np.float32))
    opt = optimizers.Adam(learning_rate=schedule, epsilon=np.float32(1e-3))
    config = json.loads(json.dumps(optimizers.serialize(opt)))
    assert config["config"]["learning_rate"]["config"] == {
        "boundaries": [2, 4],
        "values": [0.1, 0.05, 0.01],
        "name": None,
    }
    assert config["config"]["epsilon"] == 0.001
    clone = optimizers.deserialize(config)
    # tf.keras's PiecewiseConstantDecay([2, 4], [0.1, 0.05, 0.01]) at steps 2, 3 and 5
    assert [float(clone.learning_rate(s)) for s in (2.0, 3.0, 5.0)] == [
        float(np.float32(0.1)),
        float(np.float32(0.05)),
        float(np.float32(0.01)),
    ]
    assert clone.epsilon == 0.001
    wrapped = json.dumps(optimizers.serialize(optimizers.LossScaleOptimizer(opt)))
    assert '"boundaries": [2, 4]' in wrapped


def test_default_names_are_tf_keras_snake_case():
    # tf.keras's names for name=None (the first of each class: later ones get _1, _2, ...)
    assert optimizers.SGD(name=None).get_config()["name"] == "sgd"
    rmsprop = optimizers.RMSprop(name=None)
    assert rmsprop.get_config()["name"] == "rm_sprop"
    assert rmsprop.iterations.name == "rm_sprop/iter:0"
    assert optimizers.AdamW(name=None).get_config()["name"] == "adam_w"  # Keras 3's


def test_loss_scale_optimizer_config_without_its_inner_optimizer_is_a_type_error():
    with pytest.raises(TypeError, match="inner_optimizer"):
        optimizers.get("LossScaleOptimizer")
    with pytest.raises(TypeError, match="inner_optimizer"):
        optimizers.LossScaleOptimizer.from_config({"dynamic": True})


@pytest.mark.parametrize("identifier", ["adam", "ADAM", "Adam", "rmsprop", "RMSprop", "sgd"])
def test_get_by_name_is_case_insensitive(identifier):
    opt = optimizers.get(identifier)
    assert type(opt).__name__.lower() == identifier.lower()


def test_get_config_dict_and_instance():
    opt = optimizers.get({"class_name": "adam", "config": {"learning_rate": 0.5, "amsgrad": True}})
    assert isinstance(opt, optimizers.Adam)
    assert opt.get_config()["learning_rate"] == 0.5 and opt.amsgrad
    assert optimizers.get(opt) is opt


def test_serialize_deserialize_every_class():
    for name in NAMES:
        opt = make(name, clipvalue=0.5)
        clone = optimizers.deserialize(optimizers.serialize(opt))
        assert type(clone) is type(opt)
        assert clone.get_config() == opt.get_config()


def test_unknown_names_are_errors_naming_them():
    with pytest.raises(ValueError, match="nosuchopt"):
        optimizers.get("nosuchopt")
    with pytest.raises(ValueError, match="NoSuchOpt"):
        optimizers.deserialize({"class_name": "NoSuchOpt", "config": {}})
    with pytest.raises(ValueError, match="42"):
        optimizers.get(42)
    with pytest.raises(TypeError, match="bogus"):
        optimizers.deserialize({"class_name": "Adam", "config": {"bogus": 1}})


# tf_keras 2.21's serialize(..., use_legacy_format=True) (what an H5 model file stores) of its
# default, non-legacy optimizers, and what its `convert_to_legacy_optimizer` makes of them.
_NON_LEGACY_COMMON = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "jit_compile": False,
    "is_legacy_optimizer": False,
}
_TF_KERAS_ADAM = {  # tf_keras.optimizers.Adam(0.25, amsgrad=True, clipnorm=1.0)
    "class_name": "Custom>Adam",
    "config": {
        **_NON_LEGACY_COMMON,
        "name": "Adam",
        "clipnorm": 1.0,
        "learning_rate": 0.25,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-07,
        "amsgrad": True,
    },
}
_TF_KERAS_LSO = {  # LossScaleOptimizer(SGD(0.5, momentum=0.5), initial_scale=64, growth 3)
    "class_name": "LossScaleOptimizerV3",
    "config": {
        "inner_optimizer": {
            "module": "keras.optimizers",
            "class_name": "SGD",
            "config": {
                **_NON_LEGACY_COMMON,
                "name": "SGD",
                "learning_rate": 0.5,
                "momentum": 0.5,
                "nesterov": False,
            },
            "registered_name": None,
        },
        "dynamic": True,
        "initial_scale": 64.0,
        "dynamic_growth_steps": 3,
    },
}


def test_configs_of_tf_keras_non_legacy_optimizers_load_as_tf_keras_converts_them():
    blob = copy.deepcopy(_TF_KERAS_ADAM)
    opt = optimizers.deserialize(blob)
    assert blob == _TF_KERAS_ADAM  # the caller's dict is not changed
    assert type(opt) is optimizers.Adam
    # tf_keras's convert_to_legacy_optimizer(...).get_config():
    assert opt.get_config() == {
        "name": "Adam",
        "clipnorm": 1.0,
        "learning_rate": 0.25,
        "decay": 0.0,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-07,
        "amsgrad": True,
    }
    var = kopt.Variable([1.0, -2.0])
    for g in ([3.0, 0.5], [-1.0, 0.25]):
        opt.apply_gradients([(jnp.asarray(g), var)])
    # The converted tf_keras 2.21 optimizer after the same two steps:
    np.testing.assert_allclose(var.numpy(), [0.7610818147659302, -2.497964859008789], rtol=1e-6)
    np.testing.assert_allclose(
        opt.get_slot(var, "vhat").numpy(), [0.001913151703774929, 8.58224302646704e-05], rtol=1e-5
    )
    # The same config in the new format (module "keras.optimizers", class name "Adam").
    modern = {"module": "keras.optimizers", "registered_name": None, **_TF_KERAS_ADAM}
    modern["class_name"] = "Adam"
    assert optimizers.deserialize(modern).get_config() == opt.get_config()

    lso = optimizers.deserialize(copy.deepcopy(_TF_KERAS_LSO))
    assert type(lso) is optimizers.LossScaleOptimizer
    config = lso.get_config()
    assert config["inner_optimizer"]["config"] == {
        "name": "SGD",
        "learning_rate": 0.5,
        "decay": 0.0,
        "momentum": 0.5,
        "nesterov": False,
    }
    assert (config["dynamic"], config["initial_scale"], config["dynamic_growth_steps"]) == (
        True,
        64.0,
        3,
    )


@pytest.mark.parametrize("option, value", [("weight_decay", 0.01), ("use_ema", True)])
def test_a_non_legacy_option_that_changes_the_update_is_refused_for_a_legacy_class(option, value):
    blob = copy.deepcopy(_TF_KERAS_ADAM)
    blob["config"][option] = value
    before = copy.deepcopy(blob)
    with pytest.raises(ValueError, match=f"`{option}`") as info:
        optimizers.deserialize(blob)
    assert "Adam" in str(info.value)
    assert blob == before
    # kopt's Keras 3 AdamW takes them; tf.keras's own options for jit and its format go.
    blob["class_name"] = "Custom>AdamW"
    blob["config"]["name"] = "AdamW"
    blob["config"]["weight_decay"] = blob["config"]["weight_decay"] or 0.004  # AdamW's default
    adamw = optimizers.deserialize(blob)
    assert type(adamw) is optimizers.AdamW
    assert adamw.get_config()[option] == value


class _UserAdam(optimizers.Adam):
    """A user's subclass, unregistered, with tf.keras's usual ``from_config(cls, config)``."""

    def __init__(self, extra=1.0, **kwargs):
        super().__init__(**kwargs)
        self.extra = extra

    def get_config(self):
        return {**super().get_config(), "extra": self.extra}

    @classmethod
    def from_config(cls, config):
        return super().from_config(config)


class _UserSchedule(optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
        return 0.25

    def get_config(self):
        return {}


@optimizers.register_keras_serializable(package="kopt_tests")
class _RegisteredAdam(optimizers.Adam):
    pass


@optimizers.register_keras_serializable(package="kopt_tests", name="Renamed")
class _RenamedSGD(optimizers.SGD):
    pass


def test_user_subclasses_serialize_and_come_back_as_tf_keras_does_it():
    """tf_keras 2.21's ``optimizers.serialize`` writes a user subclass of a legacy optimizer as
    ``module: cls.__module__`` (None for ``__main__``) and ``registered_name``: the class name,
    or ``"package>name"`` once registered; ``deserialize`` finds the class by that name in the
    registry or ``custom_objects``, then by class name. kopt wrote ``module: kopt.optimizers``
    and ``registered_name: None``, had no registry, and called a ``from_config(cls, config)``
    override with ``custom_objects=``, a TypeError."""
    opt = _UserAdam(extra=3.0, learning_rate=_UserSchedule())
    blob = json.loads(json.dumps(optimizers.serialize(opt)))
    assert {k: blob[k] for k in ("module", "class_name", "registered_name")} == {
        "module": __name__,
        "class_name": "_UserAdam",
        "registered_name": "_UserAdam",
    }
    assert blob["config"]["learning_rate"]["registered_name"] == "_UserSchedule"
    assert blob["config"]["learning_rate"]["module"] == __name__
    custom_objects = {"_UserAdam": _UserAdam, "_UserSchedule": _UserSchedule}
    clone = optimizers.deserialize(blob, custom_objects=custom_objects)
    assert type(clone) is _UserAdam and clone.extra == 3.0
    assert isinstance(clone.learning_rate, _UserSchedule)  # found by the override's super()
    with pytest.raises(ValueError, match="_UserAdam.*register_keras_serializable"):
        optimizers.deserialize(blob)  # tf_keras returns the string "_UserAdam" here
    # Saved where the class was registered, loaded where it is not: found by class name.
    blob["registered_name"] = "elsewhere>_UserAdam"
    assert type(optimizers.deserialize(blob, custom_objects=custom_objects)) is _UserAdam

    for cls, registered in (
        (_RegisteredAdam, "kopt_tests>_RegisteredAdam"),
        (_RenamedSGD, "kopt_tests>Renamed"),
    ):
        blob = json.loads(json.dumps(optimizers.serialize(cls(learning_rate=0.5))))
        assert (blob["module"], blob["class_name"], blob["registered_name"]) == (
            __name__,
            cls.__name__,
            registered,
        )
        for custom_objects in (None, {cls.__name__: cls}, {registered: cls}):
            clone = optimizers.deserialize(blob, custom_objects=custom_objects)
            assert type(clone) is cls and clone.get_config()["learning_rate"] == 0.5
        # tf.keras's legacy format names the class by its registered name
        assert type(optimizers.get({"class_name": registered, "config": {}})) is cls

    assert optimizers.serialize(optimizers.LossScaleOptimizer(optimizers.SGD()))["module"] == (
        "kopt.optimizers"
    )
    main_cls = type("Main", (optimizers.SGD,), {"__module__": "__main__"})
    assert optimizers.serialize(main_cls())["module"] is None  # as tf_keras writes it


def _user_function():
    pass


def test_register_keras_serializable_refuses_what_it_cannot_serialize():
    before = dict(optimizers._registry._REGISTERED)
    with pytest.raises(ValueError, match="get_config.*NoConfig"):
        optimizers.register_keras_serializable("kopt_tests")(type("NoConfig", (), {}))
    with pytest.raises(ValueError, match="get_config.*'_user_function'"):
        optimizers.register_keras_serializable("kopt_tests")(_user_function)
    with pytest.raises(ValueError, match="`package`.*'a>b'"):
        optimizers.register_keras_serializable("a>b")
    with pytest.raises(ValueError, match="`name`.*3"):
        optimizers.register_keras_serializable("kopt_tests", name=3)
    assert optimizers._registry._REGISTERED == before


def test_deepcopy_is_an_independent_optimizer():
    var = kopt.Variable([1.0, 2.0])
    opt = optimizers.Adam(learning_rate=0.42)
    assert copy.deepcopy(opt).get_config()["learning_rate"] == 0.42  # exactly, as tf.keras
    opt.apply_gradients([(jnp.ones(2), var)])
    clone = copy.deepcopy(opt)
    clone.learning_rate = 0.1
    clone.apply_gradients([(jnp.ones(2), var)])
    assert int(opt.iterations.numpy()) == 1 and int(clone.iterations.numpy()) == 2
    np.testing.assert_allclose(opt.get_slot(var, "m").numpy(), [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(clone.get_slot(var, "m").numpy(), [0.19, 0.19], rtol=1e-6)
    np.testing.assert_allclose(opt.learning_rate.numpy(), 0.42)
    assert clone.weights[0] is clone.iterations and clone.compile_count == 1


def assert_the_copy_has_the_slots_and_steps_alike(opt, variables, clone, clone_variables, grads):
    """Each copied variable has its original's slots in the copy, and both go on alike."""
    for v, c in zip(variables, clone_variables, strict=True):
        for name in opt.get_slot_names():
            np.testing.assert_array_equal(
                clone.get_slot(c, name).numpy(), opt.get_slot(v, name).numpy()
            )
    for g in grads:
        step(opt, variables, g)
        step(clone, clone_variables, g)
    for v, c in zip(variables, clone_variables, strict=True):
        np.testing.assert_array_equal(c.numpy(), v.numpy())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: optimizers.Adam(0.1),
        lambda: optimizers.Lion(0.1, gradient_accumulation_steps=2),
        lambda: optimizers.LossScaleOptimizer(optimizers.Adam(0.1)),
    ],
    ids=["Adam", "Lion-accumulating", "LossScale"],
)
def test_an_optimizer_copied_with_its_variables_steps_them_with_their_slots(how, make_opt):
    """``deepcopy((opt, variables))`` or a pickle of both: the copy owns the copied variables'
    slots (and accumulators) and continues exactly as the original does."""
    grads = gradients(4, seed=7)
    opt, variables = make_opt(), make_variables()
    for g in grads[:2]:
        step(opt, variables, g)
    both = (opt, variables)
    clone, clone_variables = (
        copy.deepcopy(both) if how == "deepcopy" else pickle.loads(pickle.dumps(both))
    )
    assert len(clone.weights) == len(opt.weights)
    assert_the_copy_has_the_slots_and_steps_alike(opt, variables, clone, clone_variables, grads[2:])
    assert len(clone.weights) == len(opt.weights)


def test_a_copy_of_an_unstepped_copy_and_exclusions_made_before_any_step_follow_the_copies():
    grads = gradients(3, seed=11)
    opt, variables = optimizers.SGD(0.1, momentum=0.9), make_variables()
    step(opt, variables, grads[0])
    first, first_variables = copy.deepcopy((opt, variables))
    second, second_variables = copy.deepcopy((first, first_variables))  # first never stepped
    for g in grads[1:]:
        step(opt, variables, g)
        step(second, second_variables, g)
    for v, c in zip(variables, second_variables, strict=True):
        np.testing.assert_array_equal(c.numpy(), v.numpy())

    lion, lion_variables = optimizers.Lion(0.1, weight_decay=0.5), make_variables()
    lion.exclude_from_weight_decay(var_list=[lion_variables[1]])
    clone, clone_variables = copy.deepcopy((lion, lion_variables))  # no slots yet
    for g in grads:
        step(lion, lion_variables, g)
        step(clone, clone_variables, g)
    for v, c in zip(lion_variables, clone_variables, strict=True):
        np.testing.assert_array_equal(c.numpy(), v.numpy())


def test_first_steps_compile_the_step_once():
    # Fresh values are uncommitted; slots made for them must stay so, or JAX compiles the step
    # again on the second call (when the first call's outputs come back committed).
    import jax

    compiles = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: compiles.append(event) if "compil" in event else None
    )
    var = kopt.Variable(jnp.ones(3))
    opt = optimizers.Adam(0.1)
    opt.apply_gradients([(jnp.ones(3), var)])
    before = len(compiles)
    for _ in range(3):
        opt.apply_gradients([(jnp.ones(3), var)])
    assert len(compiles) == before


# keras.optimizers.serialize(keras.optimizers.Adam(0.25, amsgrad=True)), Keras 3.15.1.
_KERAS3_ADAM = {
    "module": "keras.optimizers",
    "class_name": "Adam",
    "config": {
        "name": "adam",
        "learning_rate": 0.25,
        # Keras 3's common options: tf.keras 2.11's but jit_compile, and two more.
        **{
            k: v
            for k, v in _NON_LEGACY_COMMON.items()
            if k not in ("jit_compile", "is_legacy_optimizer")
        },
        "loss_scale_factor": None,
        "gradient_accumulation_steps": None,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-07,
        "amsgrad": True,
    },
    "registered_name": None,
}


def test_a_keras_3_config_of_a_classic_optimizer_loads_without_its_inactive_options():
    """Keras 3 writes its common options (None or off) into every optimizer's config, with no
    ``is_legacy_optimizer`` key: kopt's Adam refused ``weight_decay`` as an unknown argument."""
    opt = optimizers.deserialize(copy.deepcopy(_KERAS3_ADAM))
    assert type(opt) is optimizers.Adam
    assert opt.get_config()["learning_rate"] == 0.25 and opt.get_config()["amsgrad"] is True
    active = copy.deepcopy(_KERAS3_ADAM)
    active["config"]["gradient_accumulation_steps"] = 4
    with pytest.raises(ValueError, match="`gradient_accumulation_steps`=4"):
        optimizers.deserialize(active)


def test_a_keras_3_nadam_config_loads_with_a_warning_that_its_update_differs():
    """Keras 3's (and tf.keras 2.11+'s) Nadam computes its update otherwise than the legacy
    Nadam kopt's is: its config loaded silently and the run went on differently."""
    config = copy.deepcopy(_KERAS3_ADAM)
    config["class_name"] = "Nadam"
    config["config"].pop("amsgrad")
    with pytest.warns(UserWarning, match="non-legacy Nadam.*update differs"):
        opt = optimizers.deserialize(config)
    assert type(opt) is optimizers.Nadam
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the other classes' updates agree: no warning
        optimizers.deserialize(copy.deepcopy(_KERAS3_ADAM))
        optimizers.deserialize({"class_name": "Nadam", "config": {"learning_rate": 0.1}})


def _keras3_config(class_name: str, **options) -> dict:
    config = copy.deepcopy(_KERAS3_ADAM)
    config["class_name"] = class_name
    for key in ("beta_1", "beta_2", "amsgrad"):
        config["config"].pop(key)
    config["config"].update(options)
    return config


@pytest.mark.parametrize(
    "class_name, options, message",
    [
        ("RMSprop", {"rho": 0.9, "momentum": 0.0, "centered": False}, r"sqrt\(v \+ epsilon\)"),
        ("RMSprop", {"rho": 0.9, "momentum": 0.0, "centered": True}, r"sqrt\(v \+ epsilon\)"),
        ("Adagrad", {"initial_accumulator_value": 0.0}, r"initial_accumulator_value=0\.0"),
        ("Adagrad", {"initial_accumulator_value": 1e-6}, r"initial_accumulator_value=1e-06"),
        ("RMSprop", {"rho": 0.9, "momentum": 0.9, "centered": False}, None),
        ("Adagrad", {"initial_accumulator_value": 0.1}, None),
    ],
)
def test_a_keras_3_config_whose_update_differs_loads_with_a_warning(class_name, options, message):
    """Keras 3's RMSprop without momentum, and its Adagrad, add epsilon under the square root
    (the legacy classes kopt's are add it after): a Keras 3 config loaded silently and moved
    the weights by several times as much where the gradients are small. With momentum, or an
    accumulator that starts well above epsilon, the updates agree: no warning."""
    config = _keras3_config(class_name, **options)
    if message is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = optimizers.deserialize(config)
    else:
        with pytest.warns(UserWarning, match=rf"non-legacy {class_name}.*{message}"):
            opt = optimizers.deserialize(config)
    assert type(opt) is getattr(optimizers, class_name)
    assert {k: opt.get_config()[k] for k in options} == options


def test_a_schedule_argument_kept_in_a_variable_changes_without_recompiling():
    """docs/performance.md: a schedule value that changes often goes in a kopt.Variable, which
    the step takes as an input (it was compiled in as a constant)."""
    lr0 = kopt.Variable(0.1)
    opt = optimizers.SGD(ExponentialDecay(lr0, 10, 0.5))
    used = learning_rates_used(opt, 4, lambda step: step == 2 and lr0.assign(1.0))
    expected = [base * 0.5 ** (step / 10) for step, base in enumerate([0.1, 0.1, 1.0, 1.0])]
    np.testing.assert_allclose(used, expected, rtol=1e-5)
    assert opt.compile_count == 1


@pytest.mark.parametrize(
    "make_opt",
    [lambda: optimizers.Adam(0.1), lambda: optimizers.Lion(0.1, weight_decay=0.5)],
    ids=["Adam", "Lion-excluding"],
)
def test_an_unpickled_optimizer_keeps_each_slot_with_its_variable_whatever_the_new_ids(
    monkeypatch, make_opt
):
    """Variable ids count per process: in a process that unpickles, a variable's new id may be
    another's old one. The slots were moved one variable at a time, and the first move
    overwrote the other's slots."""
    grads = gradients(4, seed=5)
    opt, variables = make_opt(), make_variables()
    if isinstance(opt, optimizers.Lion):
        opt.exclude_from_weight_decay(var_list=[variables[0]])
    for g in grads[:2]:
        step(opt, variables, g)
    saved = pickle.dumps((opt, variables))
    # As a fresh process that made some variables first: the first model variable unpickled
    # takes the second's old id (the optimizer's own variables are unpickled before it).
    monkeypatch.setattr(kopt.variables, "_uid", itertools.count(10**6))
    offset = pickle.loads(saved)[1][0]._uid - 10**6
    monkeypatch.setattr(kopt.variables, "_uid", itertools.count(variables[1]._uid - offset))
    clone, clone_variables = pickle.loads(saved)
    assert clone_variables[0]._uid == variables[1]._uid
    assert_the_copy_has_the_slots_and_steps_alike(opt, variables, clone, clone_variables, grads[2:])


def keras_like_exponential_decay():
    """Another library's schedule class named as kopt's (Keras 3's ExponentialDecay): a step
    callable with ``get_config``, not a kopt schedule."""

    class ExponentialDecay:
        def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
            self.config = dict(
                initial_learning_rate=initial_learning_rate,
                decay_steps=decay_steps,
                decay_rate=decay_rate,
                staircase=staircase,
            )

        def __call__(self, step):
            c = self.config
            return c["initial_learning_rate"] * c["decay_rate"] ** (step / c["decay_steps"])

        def get_config(self):
            return dict(self.config)

    return ExponentialDecay


@pytest.mark.parametrize("make", [optimizers.Adam, optimizers.AdamW], ids=["Adam", "AdamW"])
def test_another_librarys_schedule_is_configured_as_a_serialized_schedule(make):
    """A Keras 3 schedule object was put in the config as it is: `serialize` could not be
    stored as JSON, nor checkpointed. It is written as Keras writes a schedule, and comes back
    as kopt's schedule of that name, which trains the same."""
    opt = make(learning_rate=keras_like_exponential_decay()(0.05, 3, 0.5))
    serialized = json.loads(json.dumps(optimizers.serialize(opt)))
    assert serialized["config"]["learning_rate"]["class_name"] == "ExponentialDecay"
    clone = optimizers.deserialize(serialized)
    assert isinstance(clone.learning_rate, ExponentialDecay)
    a, b = kopt.Variable([1.0, 2.0]), kopt.Variable([1.0, 2.0])
    for _ in range(4):
        opt.apply_gradients([(jnp.ones(2), a)])
        clone.apply_gradients([(jnp.ones(2), b)])
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6)
