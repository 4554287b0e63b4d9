"""tf.keras ``OptimizerV2`` behaviours of the facade: weights and slots, gradient filtering and
processing order, argument errors, sparse gradients, the two bridges, loss scaling."""

import logging
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from facade_zoo import NAMES, gradients, make, make_variables

import kopt
from kopt import optimizers


def test_weights_are_empty_until_the_first_step_then_iterations_come_first():
    opt = optimizers.Adam(learning_rate=0.1)
    assert opt.weights == [] and opt.get_weights() == [] and opt.variables() == []
    a, b = kopt.Variable([1.0], name="a"), kopt.Variable([2.0], name="b")
    assert opt.apply_gradients([]) is None
    assert opt.weights == []
    opt.apply_gradients([(jnp.ones(1), a), (jnp.ones(1), b)])
    assert [w.name for w in opt.weights] == [
        "Adam/iter:0",
        "Adam/a/m:0",
        "Adam/b/m:0",
        "Adam/a/v:0",
        "Adam/b/v:0",
    ]
    assert opt.weights[0] is opt.iterations
    assert int(opt.get_weights()[0]) == 1


def test_slots_only_for_variables_with_a_gradient(caplog):
    a, b = kopt.Variable([1.0], name="a"), kopt.Variable([2.0], name="b")
    opt = optimizers.Adam(learning_rate=0.1)
    with caplog.at_level(logging.WARNING, logger="kopt"):
        opt.apply_gradients([(jnp.ones(1), a), (None, b)])
    assert [r.name for r in caplog.records] == ["kopt"]
    assert "Gradients do not exist for variables ['b:0']" in caplog.records[0].getMessage()
    assert [w.name for w in opt.weights] == ["Adam/iter:0", "Adam/a/m:0", "Adam/a/v:0"]
    with pytest.raises(KeyError, match="b:0"):
        opt.get_slot(b, "m")
    np.testing.assert_array_equal(b.numpy(), [2.0])
    # A variable the loss does not read gets no gradient, hence no slot either.
    opt.minimize(lambda: 2.0 * a, [a, b])
    assert [w.name for w in opt.weights][3:] == []


def test_all_gradients_none_is_an_error():
    a, b = kopt.Variable([1.0], name="a"), kopt.Variable([2.0], name="b")
    opt = optimizers.SGD()
    with pytest.raises(ValueError, match="No gradients provided for any variable") as info:
        opt.apply_gradients([(None, a), (None, b)])
    assert "a:0" in str(info.value) and "b:0" in str(info.value)
    assert opt.weights == []


def test_clip_argument_conflicts():
    with pytest.raises(ValueError, match="both `clipnorm` and `global_clipnorm`"):
        optimizers.Adam(clipnorm=1.0, global_clipnorm=1.0)
    identity = lambda grads_and_vars: grads_and_vars
    for clip in ("clipnorm", "clipvalue", "global_clipnorm"):
        with pytest.raises(ValueError, match=f"`{clip}` cannot be set when"):
            optimizers.SGD(gradient_transformers=[identity], **{clip: 1.0})
        opt = optimizers.SGD(gradient_transformers=[identity])
        with pytest.raises(ValueError, match=f"`{clip}` cannot be set when"):
            setattr(opt, clip, 1.0)
        assert getattr(opt, clip) is None


def times_ten(grads_and_vars):
    return [(10.0 * g, v) for g, v in grads_and_vars]


def plus_one(grads_and_vars):
    return [(g + 1.0, v) for g, v in grads_and_vars]


def test_gradient_pipeline_order_aggregator_clipvalue_clipnorm_transformers():
    var = kopt.Variable([0.0, 0.0])
    opt = optimizers.SGD(
        learning_rate=1.0, clipvalue=15.0, clipnorm=9.0, gradient_aggregator=times_ten
    )
    opt.gradient_transformers = [plus_one]  # tf.keras checks this only in the other direction
    opt.apply_gradients([(jnp.array([1.0, 2.0]), var)])
    g = np.array([10.0, 15.0])  # aggregated, then clipped by value
    g = g * 9.0 / np.linalg.norm(g)  # then by norm
    np.testing.assert_allclose(var.numpy(), -(g + 1.0), rtol=1e-6)
    # experimental_aggregate_gradients=False skips the aggregator only.
    var.assign([0.0, 0.0])
    opt.apply_gradients([(jnp.array([1.0, 2.0]), var)], experimental_aggregate_gradients=False)
    np.testing.assert_allclose(var.numpy(), -(np.array([1.0, 2.0]) + 1.0), rtol=1e-6)


def test_gradient_pipeline_order_global_clipnorm_before_transformers():
    a, b = kopt.Variable([0.0]), kopt.Variable([0.0])
    opt = optimizers.SGD(learning_rate=1.0, global_clipnorm=1.0, gradient_aggregator=times_ten)
    opt.gradient_transformers = [plus_one, times_ten]
    opt.apply_gradients([(jnp.array([0.3]), a), (jnp.array([0.4]), b)])
    # [3, 4] after aggregation, global norm 5 -> [0.6, 0.8]; then +1, then x10.
    np.testing.assert_allclose([a.numpy()[0], b.numpy()[0]], [-16.0, -18.0], rtol=1e-6)


def test_constructor_argument_errors():
    with pytest.raises(TypeError, match="Unexpected keyword argument passed to optimizer: foo"):
        optimizers.SGD(foo=1.0)
    for kwarg in ("clipnorm", "clipvalue", "global_clipnorm", "decay", "lr"):
        with pytest.raises(ValueError, match=f"Expected {kwarg} >= 0"):
            optimizers.SGD(**{kwarg: -0.5})
    with pytest.raises(ValueError, match="momentum"):
        optimizers.SGD(momentum=1.5)
    with pytest.raises(ValueError, match="LearningRateSchedules"):
        optimizers.Nadam(optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))


def test_lr_keyword_is_deprecated_and_wins():
    with pytest.warns(UserWarning, match="The `lr` argument is deprecated"):
        opt = optimizers.SGD(learning_rate=0.5, lr=0.9)
    np.testing.assert_allclose(opt.learning_rate.numpy(), 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizers.SGD(learning_rate=0.5)


def test_get_slot_and_set_weights_errors():
    var = kopt.Variable([1.0, 2.0], name="w")
    opt = optimizers.Adam()
    with pytest.raises(KeyError):
        opt.get_slot(var, "m")
    opt.apply_gradients([(jnp.ones(2), var)])
    with pytest.raises(KeyError, match="nope"):
        opt.get_slot(var, "nope")
    weights = opt.get_weights()
    with pytest.raises(ValueError, match="expecting 3 weights"):
        opt.set_weights(weights[:2])
    with pytest.raises(ValueError, match="not compatible"):
        opt.set_weights([weights[0], np.zeros(3), weights[2]])
    with pytest.raises(TypeError, match="w/v"):
        opt.set_weights([np.array(7), np.ones(2), np.array(["x", "y"])])
    for before, after in zip(weights, opt.get_weights(), strict=True):
        np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_match_the_functional_path(name):
    opt = make(name)
    tx = opt.as_transformation()
    table = kopt.Variable(np.linspace(-1.0, 1.0, 10, dtype=np.float32).reshape(5, 2))
    params = table.value
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(1)
    for indices in ([0, 3, 0], [4, 1, 3]):
        grad = kopt.IndexedSlices(
            jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), jnp.array(indices)
        )
        opt.apply_gradients([(grad, table)])
        updates, state = update(grad, state, params)
        params = kopt.apply_updates(params, updates)
    np.testing.assert_allclose(table.numpy(), params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clip", ["clipvalue", "clipnorm", "global_clipnorm"])
def test_sparse_gradients_are_clipped(clip):
    table = kopt.Variable(np.zeros((4, 2), np.float32))
    opt = optimizers.SGD(learning_rate=1.0, **{clip: 1.0})
    values = np.array([[3.0, 4.0], [0.3, 0.4]], np.float32)
    opt.apply_gradients([(kopt.IndexedSlices(jnp.asarray(values), jnp.array([2, 0])), table)])
    if clip == "clipvalue":
        clipped = np.clip(values, -1.0, 1.0)
    else:  # one tensor: per-tensor and global norms agree (the norm of the values, 5.0249)
        clipped = values / np.linalg.norm(values)
    expected = np.zeros((4, 2))
    expected[[2, 0]] = -clipped
    np.testing.assert_allclose(table.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_as_transformation_gives_the_facade_numbers(name):
    opt, variables = make(name, clipvalue=1.0), make_variables()
    tx = opt.as_transformation()
    params = [v.value for v in variables]
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in gradients(3):
        opt.apply_gradients(zip([jnp.asarray(g) for g in grads], variables, strict=True))
        updates, state = update([jnp.asarray(g) for g in grads], state, params)
        params = kopt.apply_updates(params, updates)
    for v, p in zip(variables, params, strict=True):
        np.testing.assert_allclose(v.numpy(), p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"gradient_transformers": [lambda gv: [(0.5 * g, v) for g, v in gv]]}, "transformers"),
        ({"gradient_aggregator": lambda gv: [(2.0 * g, v) for g, v in gv]}, "aggregator"),
    ],
)
def test_as_transformation_refuses_the_gradient_hooks_it_cannot_carry(kwargs, named):
    """They were dropped: the facade halved the gradients, the transformation did not."""
    opt = optimizers.SGD(learning_rate=1.0, **kwargs)
    with pytest.raises(NotImplementedError, match=f"SGD.as_transformation.*`gradient_{named}`"):
        opt.as_transformation()
    var = kopt.Variable(jnp.ones(2))
    opt.apply_gradients([(jnp.ones(2), var)])  # the optimizer itself still works
    assert float(var.numpy()[0]) == (0.5 if named == "transformers" else -1.0)


@pytest.mark.parametrize(
    "transformation",
    [
        optax.adam(0.1),
        kopt.chain(kopt.clip_by_global_norm(1.0), kopt.adam(0.1)),
        optax.chain(optax.clip(1.0), optax.sgd(0.1, momentum=0.9)),
        kopt.flatten(kopt.adam(0.1)),  # slots packed for the step, kept per variable
    ],
    ids=["optax", "kopt-chain", "optax-chain", "kopt-flatten"],
)
def test_from_transformation_trains_like_the_transformation(transformation):
    opt = optimizers.from_transformation(transformation)
    var = kopt.Variable([3.0, -2.0])
    params = var.value
    state = transformation.init(params)
    for _ in range(30):
        opt.minimize(lambda: jnp.sum(var * var), [var])
        updates, state = transformation.update(2.0 * params, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(var.numpy(), params, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(var.numpy()) < 1.0)  # it moved towards the optimum
    assert opt.compile_count == 1


@pytest.mark.parametrize(
    "make, bad_step",
    [
        (lambda: kopt.accumulate_gradients(kopt.adam(0.1), every_k=2), None),
        (
            lambda: kopt.chain(
                kopt.clip_by_global_norm(1.0), kopt.apply_if_finite(kopt.nadam(0.1))
            ),
            3,
        ),
        (
            lambda: optax.MultiSteps(kopt.adamw(0.1), every_k_schedule=3).gradient_transformation(),
            None,
        ),
    ],
    ids=["accumulate", "apply-if-finite", "optax-multisteps"],
)
def test_from_transformation_keeps_the_counts_of_wrapped_pieces(make, bad_step, tmp_path):
    """Inside a wrapper a piece counts its own steps: the updates of accumulate_gradients or
    MultiSteps, the applied steps of apply_if_finite. The facade counts calls in
    `iterations`, but keeps those counts as they are (bias corrections follow them), through
    a checkpoint too."""
    from kopt.checkpoint import restore_optimizer, save_optimizer

    tx = make()
    grads = [jnp.asarray([0.5 * i, -1.0, 0.25], jnp.float32) for i in range(1, 9)]
    if bad_step is not None:  # a step apply_if_finite skips
        grads[bad_step] = grads[bad_step].at[0].set(jnp.nan)
    params, state = jnp.asarray([1.0, 2.0, -3.0]), tx.init(jnp.asarray([1.0, 2.0, -3.0]))
    step = jax.jit(tx.update)
    expected = []
    for g in grads:
        updates, state = step(g, state, params)
        params = kopt.apply_updates(params, updates)
        expected.append(np.asarray(params))
    var = kopt.Variable([1.0, 2.0, -3.0], name="w")
    opt = optimizers.from_transformation(make())
    for i, g in enumerate(grads[:5]):
        opt.apply_gradients([(g, var)])
        np.testing.assert_allclose(var.numpy(), expected[i], rtol=1e-6, err_msg=f"step {i}")
    save_optimizer(tmp_path / "c", opt, [var])
    resumed_var = kopt.Variable(jnp.zeros(3), name="w")
    resumed = restore_optimizer(
        tmp_path / "c", [resumed_var], custom_objects={"transformation": make()}
    )
    for i, g in enumerate(grads[5:], start=5):
        resumed.apply_gradients([(g, resumed_var)])
        np.testing.assert_allclose(resumed_var.numpy(), expected[i], rtol=1e-6, err_msg=f"step {i}")
    assert int(resumed.iterations.numpy()) == len(grads)  # calls
    assert np.all(np.isfinite(resumed_var.numpy()))


def by_position(labels):
    """A labels (or mask) function for a list of params, as the facade passes them."""
    return lambda params: list(labels)[: len(params)]


def train_beside_the_transformation(make, init, steps):
    """``from_transformation(make())`` over variables a, b... holding ``init``, stepped beside
    ``make()`` itself over the same params, with growing gradients: the variables equal the
    params after every step, and the facade compiles once. Returns the optimizer, its variables
    and the transformation's state."""
    tx = make()
    params = [jnp.asarray(x) for x in init]
    state = tx.init(params)
    variables = [kopt.Variable(x, name=n) for x, n in zip(init, "abcdef", strict=False)]
    opt = optimizers.from_transformation(make())
    for i in range(steps):
        grads = [jnp.full_like(x, 0.5 * (i + 1)) * (k + 1) for k, x in enumerate(init)]
        opt.apply_gradients(zip(grads, variables, strict=True))
        updates, state = tx.update(grads, state, params)
        params = kopt.apply_updates(params, updates)
        for v, p in zip(variables, params, strict=True):
            np.testing.assert_allclose(v.numpy(), p, rtol=1e-6, err_msg=f"{v.name} step {i}")
    assert opt.compile_count == 1
    return opt, variables, state


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.multi_transform(
            {"x": kopt.adam(0.1), "y": kopt.adam(0.5, amsgrad=True)}, by_position("xyx")
        ),
        lambda: kopt.masked(kopt.sgd(0.1, momentum=0.9), by_position([True, False, True])),
        lambda: kopt.multi_transform(
            {
                "x": kopt.multi_transform(
                    {"x": kopt.adagrad(0.1), "y": kopt.sgd(0.1, momentum=0.5)}, by_position("xyx")
                ),
                "y": kopt.sgd(0.2, momentum=0.9),
            },
            by_position("xyx"),
        ),
        lambda: kopt.chain(kopt.sgd(0.1, momentum=0.9), kopt.sgd(1.0, momentum=0.5)),
    ],
    ids=["two-adams", "masked", "nested-multi", "one-slot-name-twice"],
)
def test_from_transformation_with_a_slot_name_in_several_pieces(make):
    """multi_transform groups with the same optimizer hold the same slot names for disjoint
    variables: each variable gets one slot of that name (an empty group, or a masked-out
    variable, none). Two pieces that hold one name for the same variable keep the second as
    state of its own. Each trains as the transformation run by itself."""
    init = [np.full((2, 3), 1.0, np.float32), np.full(4, -2.0, np.float32), np.ones(2, np.float32)]
    train_beside_the_transformation(make, init, steps=4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.flatten(kopt.rmsprop(0.1, momentum=0.9, centered=True)),
        lambda: kopt.chain(kopt.clip_by_global_norm(1.0), kopt.flatten(kopt.adam(0.1))),
        lambda: kopt.flatten(kopt.adam(0.1), max_leaf_size=4),  # a loose variable beside
    ],
    ids=["flatten", "chain", "one-loose"],
)
def test_from_transformation_of_flatten_keeps_a_slot_per_variable(make):
    """Behind the facade a flatten state's packed buffers were state of no variable (weights
    state_0, state_1...): get_slot_names() was [] and get_slot raised KeyError, though
    kopt.get_slot reads the slots off the state. They are now each variable's slots, named and
    ordered as the unflattened transformation's, and train as the transformation itself."""
    init = [np.full((2, 3), 1.0, np.float32), np.full(4, -2.0, np.float32)]
    opt, variables, state = train_beside_the_transformation(make, init, steps=3)
    names = kopt.slot_names(state)
    assert opt.get_slot_names() == names and names
    assert [w.name for w in opt.weights] == ["Transformation/iter:0"] + [
        f"Transformation/{v}/{name}:0" for name in names for v in "ab"
    ]
    for name in names:
        for k, v in enumerate(variables):
            np.testing.assert_allclose(
                opt.get_slot(v, name).numpy(), kopt.get_slot(state, name)[k], rtol=1e-6
            )


def test_from_transformation_hyperparameters_are_attributes_set_without_recompiling():
    """A wrapped kopt piece's hyperparameters are the optimizer's: setting one between steps
    (as a Keras callback does) takes effect at the next step, compiled once. Checked against
    the functional AdamW with the same values changed with ``set_hyperparam``."""
    tx = kopt.chain(kopt.clip_by_global_norm(1.0), kopt.adamw(0.1, weight_decay=0.05))
    opt = optimizers.from_transformation(tx)
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.1)
    assert float(opt.weight_decay.numpy()) == pytest.approx(0.05)
    var = kopt.Variable([3.0, -2.0])
    params, state = var.value, tx.init(var.value)
    for step, (lr, wd) in enumerate([(0.1, 0.05), (0.02, 0.05), (0.02, 0.3), (0.5, 0.0)]):
        opt.lr, opt.weight_decay = lr, wd
        state = kopt.set_hyperparam(
            kopt.set_hyperparam(state, "learning_rate", lr), "weight_decay", wd
        )
        opt.minimize(lambda: jnp.sum(var * var), [var])
        updates, state = tx.update(2.0 * params, state, params)
        params = kopt.apply_updates(params, updates)
        np.testing.assert_allclose(var.numpy(), params, rtol=1e-6, err_msg=f"step {step}")
    assert opt.compile_count == 1
    derived = opt.as_transformation().init(var.value)
    assert float(kopt.get_hyperparam(derived, "learning_rate")) == 0.5
    assert float(kopt.get_hyperparam(derived, "weight_decay")) == 0.0


@pytest.mark.parametrize(
    "attr, piece, grad, threshold, expected",
    [
        ("global_clipnorm", kopt.clip_by_global_norm, [30.0, 40.0], 2.0, [-1.2, -1.6]),
        ("clipnorm", kopt.clip_by_norm, [30.0, 40.0], 0.5, [-0.3, -0.4]),
        ("clipvalue", kopt.clip_by_value, [3.0, -0.5], 2.0, [-2.0, 0.5]),
    ],
)
def test_from_transformation_clip_attributes_are_the_wrapped_clip_thresholds(
    attr, piece, grad, threshold, expected
):
    """The class's clip properties shadowed the wrapped piece's threshold: reading gave None,
    and setting added a second clip in front of the piece's, which kept clipping at 1.0."""
    opt = optimizers.from_transformation(kopt.chain(piece(1.0), kopt.sgd(1.0)))
    assert getattr(opt, attr) == 1.0
    var = kopt.Variable(jnp.zeros(2))
    opt.apply_gradients([(jnp.asarray(grad), var)])
    setattr(opt, attr, threshold)
    var.assign(jnp.zeros(2))
    opt.apply_gradients([(jnp.asarray(grad), var)])
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-6)
    assert getattr(opt, attr) == threshold
    assert opt.compile_count == 1
    for bad, error in [(None, AttributeError), (-1.0, ValueError)]:
        with pytest.raises(error, match=attr):
            setattr(opt, attr, bad)
    assert getattr(opt, attr) == threshold


def test_from_transformation_probes_the_transformation_in_one_compiled_call(backend_compiles):
    """Finding the wrapped hyperparameters runs one update of a scalar probe. Run eagerly, each
    of its operations compiled a program of its own the first time (about twenty for Adam)."""
    optimizers.from_transformation(kopt.sgd(0.1))  # what any such optimizer compiles

    def update(updates, state, params=None):
        # Operations no other test runs eagerly on a scalar: each would compile on its own.
        return jax.tree.map(
            lambda g: jnp.expm1(jnp.log1p(jnp.cbrt(jnp.arcsinh(g)))), updates
        ), state

    unusual = optax.GradientTransformation(lambda params: optax.EmptyState(), update)
    backend_compiles.clear()
    opt = optimizers.from_transformation(kopt.chain(unusual, kopt.sgd(0.25)))
    assert len(backend_compiles) <= 1
    assert float(opt.learning_rate.numpy()) == 0.25

    def eager_only(updates, state, params=None):  # a Python branch on a value: not traceable
        return (updates if float(updates[0]) >= 0.0 else updates), state

    branching = optax.GradientTransformation(lambda params: optax.EmptyState(), eager_only)
    opt = optimizers.from_transformation(kopt.chain(branching, kopt.sgd(0.5)))
    assert float(opt.learning_rate.numpy()) == 0.5  # found all the same
    with pytest.raises(AttributeError, match="follows a schedule"):
        optimizers.from_transformation(
            kopt.chain(branching, kopt.sgd(kopt.schedules.exponential_decay(0.1, 10, 0.5)))
        ).lr = 0.2


@pytest.mark.parametrize(
    "transformation, attribute, why",
    [
        (kopt.sgd(kopt.schedules.exponential_decay(0.1, 10, 0.5)), "lr", "follows a schedule"),
        (
            kopt.multi_transform({"a": kopt.sgd(0.1), "b": kopt.sgd(0.01)}, ["a"]),
            "learning_rate",
            "pieces hold different values",
        ),
    ],
    ids=["scheduled", "two-values"],
)
def test_from_transformation_refuses_a_hyperparameter_it_cannot_hold(
    transformation, attribute, why
):
    """Setting such a hyperparameter raises, changes nothing, and the optimizer trains on with
    the transformation's own values."""
    opt = optimizers.from_transformation(transformation)
    var = kopt.Variable([1.0])
    params, state = [var.value], transformation.init([var.value])
    opt.apply_gradients([(jnp.ones(1), var)])
    weights = opt.get_weights()
    with pytest.raises(AttributeError, match=f"`learning_rate`.*{why}"):
        setattr(opt, attribute, 0.5)
    with pytest.raises(AttributeError, match=f"`learning_rate`.*{why}"):
        getattr(opt, attribute)  # nor read: it has no one value
    assert not hasattr(opt, attribute)
    assert "learning_rate" not in vars(opt)
    for w, before in zip(opt.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, before)
    opt.apply_gradients([(jnp.ones(1), var)])
    for _ in range(2):
        updates, state = transformation.update([jnp.ones(1)], state, params)
        params = kopt.apply_updates(params, updates)
    np.testing.assert_allclose(var.numpy(), params[0], rtol=1e-6)


@pytest.mark.parametrize(
    "transformation",
    [
        kopt.accumulate_gradients(kopt.sgd(kopt.schedules.exponential_decay(0.1, 10, 0.5)), 2),
        kopt.masked(kopt.sgd(0.1), {"w": True}),  # runs on no list of scalar probes
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),  # optax's own
    ],
    ids=["scheduled-inside-accumulation", "unprobed", "optax"],
)
def test_from_transformation_refuses_a_learning_rate_it_would_ignore(transformation):
    opt = optimizers.from_transformation(transformation)
    with pytest.raises(AttributeError, match="`learning_rate` of the wrapped transformation"):
        opt.learning_rate = 0.0
    with pytest.raises(AttributeError, match="`learning_rate` of the wrapped transformation"):
        opt.lr = 0.0
    assert "learning_rate" not in vars(opt)
    opt.my_note = "kept"  # other attributes are the user's own
    assert opt.my_note == "kept"


def test_from_transformation_takes_numbers_not_schedules_for_a_held_hyperparameter():
    opt = optimizers.from_transformation(kopt.sgd(0.1))
    with pytest.raises(TypeError, match="schedule for `learning_rate` goes into the wrapped"):
        opt.learning_rate = kopt.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "name, bad, bound",
    [("beta_1", 1.5, "<= 1.0"), ("beta_2", 2.0, "<= 1.0"), ("epsilon", -1.0, ">= 0")],
)
def test_from_transformation_refuses_a_held_hyperparameter_out_of_its_range(name, bad, bound):
    """Only the learning rate was checked: `beta_1 = 1.5` was held and the next step gave NaN.
    Refused as kopt.set_hyperparam refuses it, with nothing changed."""
    var = kopt.Variable([1.0, 2.0])
    opt = optimizers.from_transformation(kopt.adam(0.1))
    opt.apply_gradients([(jnp.ones(2), var)])
    before = (float(getattr(opt, name).numpy()), opt.get_config(), opt.get_weights())
    with pytest.raises(ValueError, match=f"`{name}` must be {bound}"):
        setattr(opt, name, bad)
    after = (float(getattr(opt, name).numpy()), opt.get_config(), opt.get_weights())
    assert after[:2] == before[:2]
    chex.assert_trees_all_equal(after[2], before[2])


def test_loss_scale_skips_non_finite_steps_and_adapts_the_scale():
    a, b = kopt.Variable([1.0, 2.0], name="a"), kopt.Variable([3.0], name="b")
    opt = optimizers.LossScaleOptimizer(
        optimizers.Adam(0.1), initial_scale=8.0, dynamic_growth_steps=2
    )
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), b)])
    weights = opt.inner_optimizer.get_weights()
    values = [a.numpy(), b.numpy()]
    opt.apply_gradients([(jnp.array([1.0, np.inf]), a), (jnp.ones(1), b)])
    for before, after in zip(weights, opt.inner_optimizer.get_weights(), strict=True):
        np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(a.numpy(), values[0])
    np.testing.assert_array_equal(b.numpy(), values[1])
    assert int(opt.iterations.numpy()) == 1
    assert float(opt.loss_scale.numpy()) == 4.0
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), b)])
    assert float(opt.loss_scale.numpy()) == 4.0
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), b)])  # 2 finite steps in a row
    assert float(opt.loss_scale.numpy()) == 8.0
    assert int(opt.iterations.numpy()) == 3


def test_loss_scale_minimize_gives_the_unscaled_result():
    var = kopt.Variable([1.0, -2.0])
    opt = optimizers.LossScaleOptimizer(optimizers.SGD(0.1))
    opt.minimize(lambda: jnp.sum(var * var), [var])
    np.testing.assert_allclose(var.numpy(), [0.8, -1.6], rtol=1e-6)
    assert float(opt.get_scaled_loss(2.0)) == 2.0 * 2.0**15
    np.testing.assert_allclose(opt.get_unscaled_gradients([jnp.array(2.0**16), None])[0], 2.0)


def test_gradients_given_as_python_values_are_converted_as_tf_keras_converts_them():
    """tf.keras converts a list, tuple or number to a tensor with the variable's dtype as the
    hint (integers included: see the next test); a float64 NumPy array stays float64 and is
    refused for a float32 variable, in both."""
    expected = kopt.Variable([1.0, 2.0])
    optimizers.Adam(0.1).apply_gradients([(np.array([1.0, 0.5], np.float32), expected)])
    for grad in ([1.0, 0.5], (1.0, 0.5)):
        var = kopt.Variable([1.0, 2.0])
        optimizers.Adam(0.1).apply_gradients([(grad, var)])
        np.testing.assert_array_equal(var.numpy(), expected.numpy())
    scalar = kopt.Variable(1.0)
    optimizers.SGD(0.1).apply_gradients([(0.5, scalar)])
    assert float(scalar.numpy()) == pytest.approx(0.95)
    for bad, match in ((np.array([1.0, 0.5]), "float64"),):
        var = kopt.Variable([1.0, 2.0])
        opt = optimizers.SGD(0.1)
        with pytest.raises(TypeError, match=match):
            opt.apply_gradients([(bad, var)])
        np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])
        assert opt.weights == []


def test_python_gradients_take_the_variables_dtype_and_integer_variables_get_none():
    """As tf.keras (checked against tf_keras 2.21): a list gradient is converted with the
    variable's dtype as the hint (`[1, 2]` steps a float16 variable to [0.9, 1.8]); the tape
    gives an integer variable in `var_list` no gradient, so `minimize` skips it (with the
    None-gradient warning) and trains the rest."""
    for dtype in (jnp.float32, jnp.float16):
        v = kopt.Variable(jnp.array([1.0, 2.0], dtype))
        optimizers.SGD(0.1).apply_gradients([([1, 2], v)])
        assert v.dtype == dtype
        np.testing.assert_allclose(v.numpy().astype(np.float32), [0.9, 1.8], rtol=1e-3)
    w = kopt.Variable([1.0, 2.0], name="w")
    count = kopt.Variable(np.array(3, np.int32), name="count")
    optimizers.SGD(0.1).minimize(
        lambda: jnp.sum(w * w) * count.value.astype(jnp.float32), [w, count]
    )
    np.testing.assert_allclose(w.numpy(), [1.0 - 0.1 * 6.0, 2.0 - 0.1 * 12.0], rtol=1e-6)
    assert int(count.numpy()) == 3


def test_the_no_gradient_warning_for_an_integer_variable_says_why(caplog):
    """`minimize` skips an integer variable the loss reads (tf.keras's tape gives it None);
    the warning said only "the loss does not depend on them"."""
    w, count = kopt.Variable([1.0], name="w"), kopt.Variable([3], name="count")
    with caplog.at_level(logging.WARNING, logger="kopt"):
        optimizers.SGD(0.1).minimize(lambda: jnp.sum(w * count.value), [w, count])
    assert "['count:0']" in caplog.text and "integer variables, which have none" in caplog.text


def test_changing_a_schedules_attribute_takes_effect_as_in_tf_keras():
    """tf.keras's schedules read their attributes at each call. kopt's built the function once
    (and keyed the compiled step by the first config): a change between steps was ignored,
    silently."""
    schedule = optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)
    schedule.initial_learning_rate = 1.0
    assert float(schedule(2)) == 0.5
    assert schedule.get_config()["initial_learning_rate"] == 1.0
    var = kopt.Variable([0.0])
    opt = optimizers.SGD(learning_rate=optimizers.schedules.ExponentialDecay(0.1, 1000, 0.5))
    opt.apply_gradients([(jnp.ones(1), var)])
    opt.learning_rate.initial_learning_rate = 1.0
    opt.apply_gradients([(jnp.ones(1), var)])
    # -0.1, then -1.0 * 0.5 ** (1 / 1000) (tf_keras 2.21: -0.9993070587515831 in all)
    np.testing.assert_allclose(var.numpy(), [-0.1 - 0.5 ** (1 / 1000)], rtol=1e-6)

    # A custom schedule is a constant of the compiled step, as in a tf.function: one that
    # counts its own calls (while traced) does not make a new step each call.
    class Counting(optimizers.schedules.LearningRateSchedule):
        def __init__(self):
            self.traces = 0

        def __call__(self, step):
            self.traces += 1
            return 0.1

        def get_config(self):
            return {}

    opt = optimizers.SGD(learning_rate=Counting())
    var = kopt.Variable([0.0])
    for _ in range(4):
        opt.apply_gradients([(jnp.ones(1), var)])
    assert opt.compile_count == 1
    # A schedule class's array argument: keyed by the object and its changes.
    arrayed = optimizers.schedules.ExponentialDecay(jnp.asarray(0.1), 1, 1.0)
    opt, var = optimizers.SGD(learning_rate=arrayed), kopt.Variable([0.0])
    opt.apply_gradients([(jnp.ones(1), var)])
    arrayed.decay_rate = 0.5
    opt.apply_gradients([(jnp.ones(1), var)])
    np.testing.assert_allclose(var.numpy(), [-0.15], rtol=1e-6)
    with pytest.raises(ValueError, match="decay_steps"):
        schedule.decay_steps = 0
    assert schedule.decay_steps == 2 and float(schedule(2)) == 0.5


class _OtherLibraryConstant:
    """A schedule of another library (as a Keras 3 one): not kopt's class, with a config."""

    def __init__(self, lr):
        self.lr = lr

    def __call__(self, step):
        return self.lr + 0.0 * step

    def get_config(self):
        return {"lr": self.lr}


class _OwnConstant(_OtherLibraryConstant, optimizers.schedules.LearningRateSchedule):
    """A tf.keras-style schedule of a user's own (kopt's base class): reads its attribute at
    each call."""


class _Subclassed(optimizers.schedules.ExponentialDecay):
    pass  # a subclass of kopt's class (to register it, say): no change of behaviour


def _set(name, value):
    return lambda schedule: setattr(schedule, name, value)


def _set_item(name, index, value):
    return lambda schedule: getattr(schedule, name).__setitem__(index, value)


@pytest.mark.parametrize(
    "make, change, first, second",
    [
        (lambda: _Subclassed(0.1, 1000, 0.5), _set("initial_learning_rate", 1.0), 0.1, 0.5**0.001),
        (lambda: _OwnConstant(0.1), _set("lr", 0.5), 0.1, 0.5),
        (lambda: _OtherLibraryConstant(0.1), _set("lr", 0.5), 0.1, 0.5),
        (
            lambda: optimizers.schedules.PiecewiseConstantDecay([0], [0.1, 0.01]),
            _set_item("values", 1, 0.5),
            0.1,
            0.5,
        ),
        (
            lambda: optimizers.schedules.PiecewiseConstantDecay([0, 5], [0.1, 0.01, 0.001]),
            _set_item("boundaries", 0, 1),
            0.1,
            0.1,
        ),
    ],
    ids=["kopt-subclass", "own", "other-library", "values-in-place", "boundaries-in-place"],
)
@pytest.mark.parametrize("reassign", [False, True], ids=["changed", "changed-and-reassigned"])
def test_a_schedules_change_between_steps_takes_effect_as_in_tf_keras(
    make, change, first, second, reassign
):
    """tf.keras's schedules read their attributes at each call, and tf.keras's optimizer calls
    the schedule at each step. The compiled step kept the first value of a schedule that was
    not exactly one of kopt's classes (a subclass of one, a user's own, another library's),
    also after assigning the same schedule again, and of a list of a kopt schedule edited in
    place, while ``_decayed_lr`` and ``get_config`` showed the change. (SGD: each step moves
    the variable by the rate; tf_keras 2.21 gives the same.)"""
    schedule = make()
    opt, var = optimizers.SGD(learning_rate=schedule), kopt.Variable([0.0])
    opt.apply_gradients([(jnp.ones(1), var)])
    change(schedule)
    np.testing.assert_allclose(float(schedule(1.0)), second, rtol=1e-6)
    if reassign:
        opt.learning_rate = schedule
    opt.apply_gradients([(jnp.ones(1), var)])
    np.testing.assert_allclose(var.numpy(), [-first - second], rtol=1e-6)
    # Unchanged since, the schedule makes no new step.
    count = opt.compile_count
    opt.apply_gradients([(jnp.ones(1), var)])
    assert opt.compile_count == count


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.decoupled_weight_decay(kopt.adam(0.01), 0.1, 0.01, mask=[True, False]),
        lambda: kopt.adamw(0.01, weight_decay=0.1, mask=lambda p: [True, False]),
        lambda: kopt.multi_transform({"a": kopt.adam(0.01), "b": kopt.adam(0.01)}, ["a", "b"]),
    ],
    ids=["mask_list", "mask_function", "labels_list"],
)
def test_from_transformation_finds_hyperparameters_behind_a_list_mask(make):
    """The docs give masks and labels as lists in the variables' order; the hyperparameters
    were looked for with one scalar, which such a mask does not fit, so none were found:
    ``opt.learning_rate`` raised AttributeError, and setting it said no piece kept it."""
    opt = optimizers.from_transformation(make())
    np.testing.assert_allclose(float(opt.learning_rate.numpy()), 0.01, rtol=1e-6)
    opt.learning_rate = 0.5
    a, b = kopt.Variable([1.0], name="a"), kopt.Variable([1.0], name="b")
    opt.apply_gradients([(jnp.ones(1), a), (jnp.ones(1), b)])
    # Adam's first step is about the learning rate (the decay, 0.5 * 0.1, on top for a).
    assert float(b.numpy()[0]) == pytest.approx(0.5, abs=1e-4)
