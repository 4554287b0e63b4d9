"""Bad input to the functional core raises ValueError/TypeError naming the culprit."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optimizer_zoo import OPTIMIZERS

import kopt


def params():
    return {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}


def grads(**overrides):
    g = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    g["dense"].update(overrides)
    return g


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_missing_gradient_names_the_path(name, jit):
    tx = OPTIMIZERS[name](0.1)
    update = jax.jit(tx.update) if jit else tx.update
    bad = {"dense": {"kernel": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match=re.escape("missing ['dense']['bias']")):
        update(bad, tx.init(params()), params())


def test_extra_gradient_names_the_path():
    tx = kopt.adam()
    with pytest.raises(ValueError, match=re.escape("unexpected ['dense']['scale']")):
        tx.update(grads(scale=jnp.ones(2)), tx.init(params()), params())


@pytest.mark.parametrize(
    "build",
    [lambda: kopt.adam(), lambda: kopt.accumulate_gradients(kopt.adam(), 2)],
    ids=["adam", "accumulate_gradients"],
)
def test_a_gradient_for_a_none_param_names_the_path(build):
    """A None param is an empty subtree: a gradient there is refused, naming it
    (accumulate_gradients failed with an AttributeError)."""
    tx, p = build(), {"w": jnp.ones(2), "b": None}
    with pytest.raises(ValueError, match=re.escape("gradient ['b'] is given where the param")):
        tx.update({"w": jnp.ones(2), "b": jnp.ones(2)}, tx.init(p), p)


def test_flatten_refuses_a_none_gradient_naming_it():
    """flatten steps packed buffers, where one param cannot be skipped (its message said
    'missing', of a gradient that was there as None)."""
    tx, p = kopt.flatten(kopt.sgd()), {"w": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=re.escape("gradient ['b'] is None, but every param")):
        tx.update({"w": jnp.ones(2), "b": None}, tx.init(p), p)


_WRAPPERS = {
    "masked": lambda: kopt.masked(kopt.adam(), {"dense": {"kernel": True, "bias": False}}),
    "multi_transform": lambda: kopt.multi_transform(
        {"a": kopt.adam(), "s": kopt.sgd()}, {"dense": {"kernel": "a", "bias": "s"}}
    ),
    "accumulate_gradients": lambda: kopt.accumulate_gradients(kopt.sgd(), 2),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "bad, culprit",
    [
        (
            grads(scale=jnp.ones(2)),
            "the gradient tree does not match the params: unexpected ['dense']['scale']",
        ),
        (
            {"dense": {"kernel": jnp.ones((3, 2))}},
            "the gradient tree does not match the params: missing ['dense']['bias']",
        ),
        (
            grads(kernel=jnp.ones((2, 3))),
            "gradient ['dense']['kernel'] has shape (2, 3), expected (3, 2)",
        ),
        (grads(bias=jnp.ones(1)), "gradient ['dense']['bias'] has shape (1,), expected (2,)"),
    ],
    ids=["stray", "missing", "kernel-shape", "bias-broadcasts"],
)
@pytest.mark.parametrize("name", list(_WRAPPERS))
def test_wrappers_blame_gradients_that_do_not_fit_the_params(name, bad, culprit, jit):
    """masked and multi_transform said their mask or labels did not fit (they did), and
    masked let a wrong shape through where the mask is False; accumulate_gradients gave bare
    JAX errors, or broadcast a (1,) gradient over a (2,) param without a word."""
    tx = _WRAPPERS[name]()
    state = tx.init(params())
    before = jax.tree.map(jnp.copy, state)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=re.escape(f"{name}: {culprit}")):
        update(bad, state, params())
    chex.assert_trees_all_equal(state, before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_wrong_gradient_shape_names_path_and_shapes(name):
    tx = OPTIMIZERS[name](0.1)
    with pytest.raises(ValueError) as info:
        tx.update(grads(kernel=jnp.ones((2, 3))), tx.init(params()), params())
    message = str(info.value)
    assert "['dense']['kernel']" in message
    assert "(2, 3)" in message and "(3, 2)" in message


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("rows", [1, 2])
def test_a_state_made_for_params_of_other_shapes_names_the_slot(name, rows):
    """A state from before a layer was resized: a slot of one row broadcast over the new
    param silently (the state changed shape), another size failed with JAX's broadcasting
    error naming no param."""
    tx = OPTIMIZERS[name](0.1)
    old = {"dense": {"kernel": jnp.ones((rows, 2)), "bias": jnp.zeros(2)}}
    state = tx.init(old)
    if not any(jnp.shape(x) == (rows, 2) for x in jax.tree.leaves(state)):
        pytest.skip("no slot shaped like the kernel")
    with pytest.raises(
        ValueError,
        match=re.escape("of ['dense']['kernel'] has shape (") + r".*the param has shape \(3, 2\)",
    ):
        jax.jit(tx.update)(grads(), state, params())


@pytest.mark.parametrize(
    "build", [kopt.adam, lambda: kopt.clip_by_global_norm(1.0)], ids=["adam", "clip_by_global_norm"]
)
def test_integer_gradient_is_a_type_error(build):
    """clip_by_global_norm took int32 gradients and returned them as int zeros."""
    tx = build()
    with pytest.raises(TypeError, match=re.escape("['dense']['bias'] must be a floating-point")):
        tx.update(grads(bias=jnp.ones(2, jnp.int32)), tx.init(params()), params())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize(
    "bad, culprit",
    [
        (
            kopt.IndexedSlices(jnp.ones((1, 2), jnp.int32), jnp.array([0])),
            "must be a floating-point array, received ArrayImpl of dtype int32",
        ),
        (
            jnp.ones((3, 2), jnp.complex64),
            r"is complex \(complex64\), but its param is real \(float32\)",
        ),
        (
            kopt.IndexedSlices(jnp.ones((1, 2), jnp.complex64), jnp.array([0])),
            r"is complex \(complex64\), but its param is real \(float32\)",
        ),
    ],
    ids=["sparse-int32", "complex", "sparse-complex"],
)
def test_a_gradient_the_param_cannot_take_names_the_path(name, bad, culprit):
    """Integer rows of an IndexedSlices were taken (SGD's update truncated to int zeros), and
    a complex gradient of a real param was cast to real (its imaginary part dropped)."""
    tx = OPTIMIZERS[name](0.1)
    p = params()
    state = tx.init(p)
    before = jax.tree.map(jnp.copy, (p, state))
    with pytest.raises(TypeError, match=re.escape("['dense']['kernel'] ") + culprit):
        tx.update(grads(kernel=bad), state, p)
    chex.assert_trees_all_equal((p, state), before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_integer_param_in_init_names_the_path(name):
    bad = {"dense": {"kernel": jnp.ones((3, 2)), "step": jnp.zeros((), jnp.int32)}}
    with pytest.raises(TypeError, match=re.escape("['dense']['step']")) as info:
        OPTIMIZERS[name](0.1).init(bad)
    assert "int32" in str(info.value)


@pytest.mark.parametrize("leaf", [1, True, "w"], ids=repr)
def test_python_int_bool_or_str_param_is_refused_naming_the_path(leaf):
    """A Python float param is taken (as optax takes it); an int is not, as an int32 is not."""
    with pytest.raises(TypeError, match=re.escape("['n']") + ".*" + type(leaf).__name__):
        kopt.adam(0.1).init({"w": 1.0, "n": leaf})


@pytest.mark.parametrize("value", ["fast", None, [0.1], {"lr": 0.1}], ids=repr)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_numeric_learning_rate_is_a_type_error(name, value):
    with pytest.raises(TypeError, match="`learning_rate`"):
        OPTIMIZERS[name](value)


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: kopt.adam(learning_rate=-0.1), "learning_rate"),
        (lambda: kopt.sgd(learning_rate=-1.0), "learning_rate"),
        (lambda: kopt.sgd(momentum=1.5), "momentum"),
        (lambda: kopt.sgd(momentum=-0.1), "momentum"),
        (lambda: kopt.rmsprop(momentum=1.5), "momentum"),
        (lambda: kopt.adam(epsilon=-1e-7), "epsilon"),
        (lambda: kopt.adagrad(epsilon=-1.0), "epsilon"),
        (lambda: kopt.rmsprop(epsilon=-1.0), "epsilon"),
        (lambda: kopt.adam(beta_1=1.5), "beta_1"),
        (lambda: kopt.adamax(beta_2=-0.5), "beta_2"),
        (lambda: kopt.rmsprop(rho=1.5), "rho"),
        (lambda: kopt.adagrad(initial_accumulator_value=-0.1), "initial_accumulator_value"),
        (lambda: kopt.ftrl(learning_rate_power=0.5), "learning_rate_power"),
        (lambda: kopt.ftrl(l1_regularization_strength=-1.0), "l1_regularization_strength"),
        (lambda: kopt.ftrl(l2_regularization_strength=-1.0), "l2_regularization_strength"),
        (
            lambda: kopt.ftrl(l2_shrinkage_regularization_strength=-1.0),
            "l2_shrinkage_regularization_strength",
        ),
        (lambda: kopt.adamw(weight_decay=-0.1), "weight_decay"),
        (lambda: kopt.adamw(weight_decay=None), "weight_decay"),
        (lambda: kopt.lion(beta_1=0.0), "beta_1"),
        (lambda: kopt.adafactor(clip_threshold=0.0), "clip_threshold"),
        (lambda: kopt.adam(learning_rate=float("nan")), "learning_rate"),
        (lambda: kopt.adam(learning_rate=jnp.ones(2)), "learning_rate"),
        (lambda: kopt.sgd(decay=-1.0), "decay"),
        (lambda: kopt.clip_by_norm(-1.0), "clipnorm"),
        (lambda: kopt.clip_by_value(-1.0), "clipvalue"),
        (lambda: kopt.clip_by_global_norm(-1.0), "global_clipnorm"),
        (lambda: kopt.ema(momentum=1.5), "momentum"),
        (lambda: kopt.ema(overwrite_frequency=0), "overwrite_frequency"),
        (lambda: kopt.accumulate_gradients(kopt.sgd(), every_k=0), "every_k"),
        (lambda: kopt.accumulate_gradients(kopt.sgd(), 2, reduction="max"), "reduction"),
        (lambda: kopt.apply_if_finite(kopt.sgd(), -1), "max_consecutive_errors"),
        (lambda: kopt.aggregate_gradients("i", reduction="max"), "reduction"),
    ],
)
def test_out_of_range_argument_is_a_value_error_naming_it(build, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        build()


@pytest.mark.parametrize("axis_name", [0, np.int64(1), ("data", 0)], ids=repr)
def test_aggregate_gradients_refuses_an_integer_axis_name(axis_name):
    """jax.lax.psum reads an integer as a positional axis of the array: outside shard_map,
    aggregate_gradients(0) summed each gradient over its first dimension and returned
    gradients of other shapes, with no error."""
    with pytest.raises(TypeError, match=r"aggregate_gradients: `axis_name` must name a mapped"):
        kopt.aggregate_gradients(axis_name)


def test_bool_hyperparameter_is_a_type_error():
    with pytest.raises(TypeError, match="`learning_rate`"):
        kopt.sgd(learning_rate=True)


@pytest.mark.parametrize(
    "build, name, value, match",
    [
        (kopt.adafactor, "clip_threshold", 0.0, "`clip_threshold` must be > 0.0"),
        (kopt.lion, "beta_1", 0.0, r"the Lion piece at 0\): `beta_1` must be > 0.0"),
        (kopt.sgd, "learning_rate", np.complex64(0.1 + 5j), "`learning_rate` must be real"),
        (kopt.adam, "beta_1", np.complex128(0.5 + 1j), "`beta_1` must be real"),
    ],
    ids=["adafactor-clip_threshold", "lion-beta_1", "np-complex64", "np-complex128"],
)
def test_set_hyperparam_refuses_what_the_constructor_refuses(build, name, value, match):
    """set_hyperparam took a clip_threshold of 0 (every update zero), Lion's beta_1 of 0, and
    NumPy complex scalars (the imaginary part dropped), which the constructors refuse."""
    with pytest.raises((TypeError, ValueError), match=f"`{name}`"):
        build(**{name: value})
    state = build().init(params())
    before = jax.tree.map(jnp.copy, state)
    with pytest.raises(
        TypeError if np.iscomplexobj(value) else ValueError, match="set_hyperparam.*" + match
    ):
        kopt.set_hyperparam(state, name, value)
    chex.assert_trees_all_equal(state, before)
    # A beta_1 of 0 is fine for Adam.
    adam_state = kopt.set_hyperparam(kopt.adam().init(params()), "beta_1", 0.0)
    assert float(kopt.get_hyperparam(adam_state, "beta_1")) == 0.0


def test_get_hyperparam_lists_the_known_names():
    state = kopt.adam().init(params())
    with pytest.raises(ValueError, match="'nope'") as info:
        kopt.get_hyperparam(state, "nope")
    for known in ("learning_rate", "beta_1", "beta_2", "epsilon"):
        assert known in str(info.value)


def test_set_hyperparam_rejects_unknown_names_and_bad_values():
    state = kopt.sgd().init(params())
    with pytest.raises(ValueError, match=r"set_hyperparam: .*'beta_9'.*learning_rate"):
        kopt.set_hyperparam(state, "beta_9", 0.5)
    for value in ("0.5", None, [0.5], lambda step: 0.5):
        with pytest.raises(TypeError, match="`learning_rate`"):
            kopt.set_hyperparam(state, "learning_rate", value)
    with pytest.raises(ValueError, match="`learning_rate`.*scalar"):
        kopt.set_hyperparam(state, "learning_rate", jnp.ones(2))


def test_get_slot_lists_the_known_slots():
    state = kopt.adam(amsgrad=True).init(params())
    with pytest.raises(ValueError, match=r"'momentum'.*\['m', 'v', 'vhat'\]"):
        kopt.get_slot(state, "momentum")


@pytest.mark.parametrize("name", ["ftrl", "adamw", "lamb", "adafactor"])
def test_missing_params_are_named(name):
    tx = OPTIMIZERS[name](0.1)
    with pytest.raises(ValueError, match="`params`"):
        tx.update(grads(), tx.init(params()))


def test_ema_without_params():
    tx = kopt.ema(0.9)
    with pytest.raises(ValueError, match="`params`"):
        tx.update(grads(), tx.init(params()))


def test_chain_rejects_a_non_transformation():
    with pytest.raises(TypeError, match="argument 1"):
        kopt.chain(kopt.sgd(), kopt.sgd)


def test_chain_rejects_a_state_of_the_wrong_length():
    tx = kopt.chain(kopt.clip_by_value(1.0), kopt.sgd())
    with pytest.raises(ValueError, match="2 transformations"):
        tx.update(grads(), (tx.init(params())[0],), params())


def test_multi_transform_names_an_unknown_label():
    tx = kopt.multi_transform({"a": kopt.sgd()}, {"dense": {"kernel": "a", "bias": "b"}})
    with pytest.raises(ValueError, match=r"\['b'\]"):
        tx.init(params())


def test_bad_sparse_gradients_are_named():
    tx = kopt.adagrad()
    table = {"emb": jnp.ones((6, 3))}
    state = tx.init(table)
    wrong_rows = kopt.IndexedSlices(jnp.ones((2, 4)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match=re.escape("['emb']")):
        tx.update({"emb": wrong_rows}, state, table)
    wrong_shape = kopt.IndexedSlices(jnp.ones((2, 3)), jnp.array([0, 1]), (7, 3))
    with pytest.raises(ValueError, match=r"dense_shape \(7, 3\)"):
        tx.update({"emb": wrong_shape}, state, table)
    float_indices = kopt.IndexedSlices(jnp.ones((2, 3)), jnp.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="indices"):
        tx.update({"emb": float_indices}, state, table)
    # A scalar has no rows (the message said "rows of shape (), expected rows of a table of
    # shape ()").
    scalar = {"s": jnp.ones(())}
    with pytest.raises(ValueError, match=r"\['s'\] is for a scalar param, which has no rows"):
        tx.update({"s": kopt.IndexedSlices(jnp.ones(1), jnp.array([0]))}, tx.init(scalar), scalar)


@pytest.mark.parametrize(
    "table, values, indices",
    [
        ((6, 3), (3, 3), [0, 1]),
        ((6, 3), (2, 3), [0, 1, 2]),
        ((6, 3), (2, 3), [[0], [1]]),
        ((6,), (), [0]),
    ],
    ids=["more-values", "more-indices", "2d-indices", "values-without-rows"],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "build, owner",
    [
        *((OPTIMIZERS[name], f"scale_by_{name}") for name in OPTIMIZERS if name != "adamw"),
        (lambda lr: kopt.chain(optax.clip(3.0), kopt.sgd(lr)), "IndexedSlices.to_dense"),
    ],
    ids=[*(name for name in OPTIMIZERS if name != "adamw"), "optax-in-kopt-chain"],
)
def test_sparse_values_and_indices_that_disagree_are_named(
    build, owner, jit, table, values, indices
):
    """Values and indices of different lengths gave a bare JAX broadcast error naming nothing,
    and indices of shape [n, 1] (which tf.keras refuses) were taken by some optimizers."""
    params = {"emb": jnp.zeros(table), "w": jnp.zeros(3)}
    tx = build(0.1)
    state = tx.init(params)
    before = jax.tree.map(jnp.copy, state)
    bad = kopt.IndexedSlices(jnp.ones(values), jnp.array(indices), table)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=re.escape(f"{owner}: sparse gradient ['emb']")) as info:
        update({"emb": bad, "w": jnp.ones(3)}, state, params)
    message = str(info.value)
    assert f"values of shape {values}" in message
    assert f"indices of shape {np.shape(indices)}" in message
    chex.assert_trees_all_equal(state, before)


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="`decay_steps`"):
        kopt.schedules.exponential_decay(0.1, decay_steps=0, decay_rate=0.5)
    with pytest.raises(TypeError, match="`initial_learning_rate`"):
        kopt.schedules.cosine_decay("0.1", decay_steps=10)
    with pytest.raises(ValueError, match="boundaries"):
        kopt.schedules.piecewise_constant_decay([1, 2], [0.1, 0.2])


def test_apply_updates_refuses_to_broadcast():
    params = {"dense": {"kernel": jnp.ones((3, 1))}}
    with pytest.raises(ValueError, match=re.escape("['dense']['kernel']")) as info:
        kopt.apply_updates(params, {"dense": {"kernel": jnp.ones(3)}})
    assert "(3,)" in str(info.value) and "(3, 1)" in str(info.value)


@pytest.mark.parametrize(
    "build, flag",
    [
        # optax's positional order, passed to kopt's Keras order: eps_root lands on amsgrad,
        # eps on rmsprop's momentum... and a third number on sgd's nesterov.
        (lambda: kopt.adam(1e-3, 0.9, 0.999, 1e-8, 1e-8), "amsgrad"),
        (lambda: kopt.adamw(1e-3, 0.01, 0.9, 0.999, 1e-8, 1e-8), "amsgrad"),
        (lambda: kopt.sgd(0.1, 0.9, 0.5), "nesterov"),
        (lambda: kopt.rmsprop(0.1, 0.9, 0.0, 1e-7, 1), "centered"),
        (lambda: kopt.adafactor(relative_step=0), "relative_step"),
    ],
)
def test_a_flag_given_a_number_is_a_type_error(build, flag):
    with pytest.raises(TypeError, match=f"`{flag}` must be a bool, received"):
        build()


def test_numpy_bools_are_flags():
    import numpy as np

    tx = kopt.adam(amsgrad=np.bool_(True))
    assert "vhat" in kopt.slot_names(tx.init(params()))


SLOT_DTYPE_OPTIMIZERS = {
    "sgd": lambda d: kopt.sgd(0.1, momentum=0.9, slot_dtype=d),
    "adam": lambda d: kopt.adam(slot_dtype=d),
    "adamw": lambda d: kopt.adamw(slot_dtype=d),
    "adagrad": lambda d: kopt.adagrad(slot_dtype=d),
    "adadelta": lambda d: kopt.adadelta(slot_dtype=d),
    "adamax": lambda d: kopt.adamax(slot_dtype=d),
    "nadam": lambda d: kopt.nadam(slot_dtype=d),
    "rmsprop": lambda d: kopt.rmsprop(momentum=0.9, centered=True, slot_dtype=d),
    "ftrl": lambda d: kopt.ftrl(slot_dtype=d),
    "lion": lambda d: kopt.lion(slot_dtype=d),
    "lamb": lambda d: kopt.lamb(slot_dtype=d),
    "adafactor": lambda d: kopt.adafactor(slot_dtype=d),
}


@pytest.mark.parametrize("name", list(SLOT_DTYPE_OPTIMIZERS))
@pytest.mark.parametrize(
    "dtype, shown", [(jnp.int32, "int32"), (bool, "bool"), ("not a dtype", "'not a dtype'")]
)
def test_a_slot_dtype_that_is_not_floating_is_a_type_error(name, dtype, shown):
    # An integer slot_dtype was accepted: Adam's m and v came out int32, every moment was
    # truncated to a whole number, and the run went on without training.
    with pytest.raises(
        TypeError, match=re.escape(f"`slot_dtype` must be a floating-point dtype, received {shown}")
    ):
        SLOT_DTYPE_OPTIMIZERS[name](dtype)
    for ok in (None, jnp.float32, "bfloat16"):
        SLOT_DTYPE_OPTIMIZERS[name](ok).init(params())


def _optax_adam_state():
    import optax

    return optax.adam(0.1).init(params())


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "build, make_state, culprit",
    [
        (
            lambda: kopt.adam(),
            params,
            r"chain: `state` was not made by this chain's init "
            r"\(received a dict with keys \['dense'\] \(the params\?\)",
        ),
        (lambda: kopt.adam(), lambda: None, r"chain: `state` .* \(received None"),
        (
            lambda: kopt.adam(),
            lambda: kopt.sgd(momentum=0.9).init(params()),
            r"chain: `state` .*received an OptimizerState",
        ),
        (
            lambda: kopt.sgd(momentum=0.9),
            lambda: kopt.rmsprop().init(params()),
            r"scale_by_sgd: `state` was not made by this transformation's init .* without "
            r"\['momentum'\]",
        ),
        (
            lambda: kopt.adam(),
            lambda: kopt.adam(amsgrad=True).init(params()),
            r"scale_by_adam: `state` was not made by this transformation's init .* slots "
            r"\['m', 'v', 'vhat'\], expected .* slots \['m', 'v'\] only",
        ),
        (
            lambda: kopt.rmsprop(),
            lambda: kopt.rmsprop(centered=True).init(params()),
            r"scale_by_rmsprop: `state` .* slots \['mg', 'rms'\], expected .* slots \['rms'\] only",
        ),
        (
            lambda: kopt.sgd(),
            lambda: kopt.sgd(momentum=0.9).init(params()),
            r"scale_by_sgd: `state` .* slots \['momentum'\], expected .* slots \[\] only",
        ),
        (
            lambda: kopt.adam(),
            _optax_adam_state,
            r"scale_by_adam: `state` .*received optax's ScaleByAdamState",
        ),
        (
            lambda: kopt.chain(kopt.clip_by_global_norm(1.0), kopt.sgd()),
            lambda: (kopt.sgd().init(params()), kopt.sgd().init(params())),
            r"clip_by_global_norm: `state` .* without \['global_clipnorm'\]",
        ),
        (
            lambda: kopt.masked(kopt.sgd(), {"dense": True}),
            lambda: kopt.sgd().init(params()),
            r"masked: `state` .* expected kopt's MaskedState",
        ),
        (
            lambda: kopt.accumulate_gradients(kopt.sgd(), 2),
            lambda: kopt.sgd().init(params()),
            r"accumulate_gradients: `state` .* expected kopt's AccumulateState",
        ),
        (
            lambda: kopt.apply_if_finite(kopt.sgd()),
            lambda: None,
            r"apply_if_finite: `state` .*received None",
        ),
        (
            lambda: kopt.flatten(kopt.sgd()),
            lambda: kopt.sgd().init(params()),
            r"flatten: `state` .* expected kopt's FlattenedState",
        ),
        (
            lambda: kopt.multi_transform({"a": kopt.sgd()}, {"dense": "a"}),
            lambda: kopt.multi_transform({"b": kopt.sgd()}, {"dense": "b"}).init(params()),
            r"multi_transform: `state` .* labels are \['b'\], expected \['a'\]",
        ),
    ],
    ids=[
        "params",
        "None",
        "sgd-into-adam",
        "rmsprop-into-sgd",
        "amsgrad-into-adam",
        "centered-into-rmsprop",
        "momentum-into-sgd",
        "optax-adam",
        "sgd-into-clip",
        "into-masked",
        "into-accumulate",
        "into-apply_if_finite",
        "into-flatten",
        "other-labels",
    ],
)
def test_a_state_not_made_by_init_is_named(build, make_state, culprit, jit):
    """A state that init did not make (forgot init and passed the params, None, another
    optimizer's state) failed deep inside with AttributeError or KeyError; one of a variant
    with more slots (amsgrad, centered, momentum) was taken, its extra slots dropped."""
    tx, state = build(), make_state()
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(TypeError, match=culprit):
        update(grads(), state, params())


def test_a_state_made_for_other_params_is_named():
    tx = kopt.adam()
    with pytest.raises(
        ValueError,
        match=r"scale_by_adam: the state's slots do not fit the "
        r"params: the state was made for other params",
    ):
        tx.update({"x": jnp.ones(2)}, tx.init(params()), {"x": jnp.ones(2)})


@pytest.mark.parametrize(
    "updates, culprit",
    [
        ({"dense": {"kernel": jnp.ones((3, 2))}}, r"missing \['dense'\]\['bias'\]"),
        (grads(scale=jnp.ones(2)), r"unexpected \['dense'\]\['scale'\]"),
        ([jnp.ones((3, 2)), jnp.ones(2)], r"missing .*; unexpected \[0\], \[1\]"),
    ],
    ids=["missing", "stray", "list"],
)
def test_apply_updates_names_updates_that_do_not_match_the_params(updates, culprit):
    """JAX's bare pytree structure error named neither apply_updates nor the argument."""
    p = params()
    before = jax.tree.map(jnp.copy, p)
    with pytest.raises(
        ValueError,
        match=r"^apply_updates: `updates` does not match the "
        rf"`params`: {culprit}",
    ):
        kopt.apply_updates(p, updates)
    chex.assert_trees_all_equal(p, before)
    # None updates, and None params with an update, still pass as before.
    out = kopt.apply_updates({"w": jnp.ones(2), "b": None}, {"w": None, "b": jnp.ones(1)})
    np.testing.assert_array_equal(out["w"], [1.0, 1.0])
    assert out["b"] is None


@pytest.mark.parametrize(
    "build, named",
    [
        (lambda: kopt.accumulate_gradients(kopt.sgd, 2), "accumulate_gradients: `transformation`"),
        (lambda: kopt.apply_if_finite(None, 2), "apply_if_finite: `transformation`"),
        (lambda: kopt.masked(kopt.adam, {"w": True}), "masked: `transformation`"),
        (
            lambda: kopt.decoupled_weight_decay(kopt.lion, 0.1),
            "decoupled_weight_decay: `inner`",
        ),
        (
            lambda: kopt.multi_transform({"a": kopt.sgd}, {"w": "a"}),
            r"multi_transform: `transformations\['a'\]`",
        ),
        (lambda: kopt.flatten(3), "flatten: `transformation`"),
        (lambda: kopt.flatten(kopt.adam), "flatten: `transformation`"),
        (lambda: kopt.jit_update(3, None), "jit_update: `transformation`"),
    ],
)
def test_wrappers_name_an_argument_that_is_not_a_transformation(build, named):
    """They raised AttributeError ('function' object has no attribute 'update'), at init or at
    the first update; a factory passed for what it makes is named as such."""
    with pytest.raises(TypeError, match=named + " must be a transformation"):
        build()


@pytest.mark.parametrize(
    "values, indices, message",
    [
        ((3, 3), [0, 1], r"values of shape \(3, 3\) and indices of shape \(2,\)"),
        ((2, 3), [[0], [1]], r"indices of shape \(2, 1\)"),
        ((2, 4), [0, 1], r"rows of shape \(4,\), expected rows of a table of shape \(6, 3\)"),
    ],
    ids=["more-values", "2d-indices", "other-rows"],
)
def test_apply_updates_names_a_sparse_update_that_does_not_fit(values, indices, message):
    """apply_updates scatter-added any rows it was given: a values/indices mismatch was a bare
    JAX broadcast error naming nothing, and [n, 1] indices were taken."""
    params = {"emb": jnp.ones((6, 3)), "w": jnp.ones(2)}
    updates = {
        "emb": kopt.IndexedSlices(jnp.ones(values), jnp.array(indices), (6, 3)),
        "w": jnp.ones(2),
    }
    with pytest.raises(ValueError, match=r"apply_updates: sparse update \['emb'\] .*" + message):
        kopt.apply_updates(params, updates)
    with pytest.raises(ValueError, match=r"apply_updates: sparse update \['emb'\]"):
        jax.jit(kopt.apply_updates)(params, updates)
    np.testing.assert_array_equal(params["emb"], np.ones((6, 3)))  # the params are not changed
