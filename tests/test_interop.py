"""kopt inside optax, flax and equinox code, and optax inside kopt."""

import re

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest
from flax.training import train_state
from optimizer_zoo import OPTIMIZERS

import kopt


def regression_data():
    x = jax.random.normal(jax.random.key(0), (64, 3))
    y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3
    return x, y


def test_kopt_inside_optax_chain():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads_seq = [np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, -1.0])]
    tx = optax.chain(kopt.adam(0.1), optax.scale(0.5))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads_seq:
        updates, state = step({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    # Halving every Adam step equals Adam with half the learning rate.
    expected = ref.adam([1.0, -2.0, 3.0], grads_seq, lr=0.05)
    np.testing.assert_allclose(params["w"], expected, rtol=1e-6)
    assert float(kopt.get_hyperparam(state, "learning_rate")) == np.float32(0.1)


def test_optax_inside_kopt_chain():
    tx = kopt.chain(optax.clip_by_global_norm(1.0), kopt.sgd(0.1))
    params = {"a": jnp.array([0.0]), "b": jnp.array([0.0])}
    updates, state = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, tx.init(params))
    np.testing.assert_allclose(updates["a"], [-0.06], rtol=1e-6)  # -0.1 * 3 / 5
    np.testing.assert_allclose(updates["b"], [-0.08], rtol=1e-6)
    # Below the threshold the gradient passes unchanged.
    updates, _ = tx.update({"a": jnp.array([0.3]), "b": jnp.array([0.4])}, state)
    np.testing.assert_allclose(updates["a"], [-0.03], rtol=1e-6)


def test_set_hyperparam_reaches_optax_inject_hyperparams():
    tx = kopt.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), kopt.clip_by_value(5))
    params = jnp.zeros(2)
    state = kopt.set_hyperparam(tx.init(params), "learning_rate", 2.0)
    assert float(kopt.get_hyperparam(state, "learning_rate")) == 2.0
    updates, _ = jax.jit(tx.update)(jnp.array([1.0, -1.0]), state, params)
    np.testing.assert_allclose(updates, [-2.0, 2.0])


def test_get_hyperparam_reports_the_value_kopt_uses_under_inject_hyperparams():
    """``optax.inject_hyperparams(kopt.sgd)`` injects values kopt does not use (its state holds
    the learning rate); ``kopt.get_hyperparam`` reports the one used, not the injected one."""
    tx = optax.inject_hyperparams(kopt.sgd)(learning_rate=optax.linear_schedule(1.0, 0.0, 10))
    params = jnp.zeros(1)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(jnp.ones(1), state, params)
        np.testing.assert_allclose(updates, [-1.0])  # the step uses 1.0 throughout
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.8)  # optax's record
    assert float(kopt.get_hyperparam(state, "learning_rate")) == 1.0


def test_get_hyperparam_counts_an_optax_holder_whose_value_is_used():
    """Only an inject_hyperparams around a *kopt* optimizer holds a value nobody uses: one
    around optax's sgd, beside a kopt group, was dropped too, and two learning rates in use
    (0.5 and 0.1, as the updates show) read as 0.1 without an error."""
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    tx = kopt.multi_transform(
        {"body": optax.inject_hyperparams(optax.sgd)(learning_rate=0.5), "head": kopt.sgd(0.1)},
        {"w": "body", "b": "head"},
    )
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.5, -0.5])
    np.testing.assert_allclose(updates["b"], [-0.1, -0.1], rtol=1e-6)
    with pytest.raises(
        ValueError,
        match=r"several pieces hold 'learning_rate' with different values "
        r"\(inner_states/body/inner_state: 0.5, inner_states/head/inner_state: 0.1\)",
    ):
        kopt.get_hyperparam(state, "learning_rate")
    assert float(kopt.get_hyperparam(state, "learning_rate", where="body")) == 0.5
    # Equal values are one answer, as for two kopt pieces.
    state = kopt.set_hyperparam(state, "learning_rate", 0.25)
    assert float(kopt.get_hyperparam(state, "learning_rate")) == 0.25


def test_kopt_update_accepts_optax_extra_args_in_kopt_chain():
    # optax.chain passes extra keyword arguments only to pieces that accept them.
    tx = optax.chain(optax.scale_by_adam(), kopt.scale_by_learning_rate(1.0))
    g = jnp.array([1.0, -1.0])
    updates, _ = tx.update(g, tx.init(g), g, value=jnp.float32(0.0))
    np.testing.assert_allclose(updates, [-1.0, 1.0], rtol=1e-5)


def _public_transformations():
    """Every public kopt transformation, each built with its arguments (no arguments where
    the defaults do), and the wrappers around an optax piece that needs ``value=``."""
    inner = kopt.sgd(0.1)
    txs = {}
    for name in kopt.__all__:
        factory = getattr(kopt, name)
        if callable(factory) and not isinstance(factory, type):
            try:
                tx = factory()
            except TypeError:  # takes required arguments: built below
                continue
            if isinstance(tx, kopt.GradientTransformation):
                txs[name] = tx
    txs.update(
        clip_by_value=kopt.clip_by_value(1.0),
        clip_by_norm=kopt.clip_by_norm(1.0),
        clip_by_global_norm=kopt.clip_by_global_norm(1.0),
        add_decayed_weights=kopt.add_decayed_weights(0.1),
        decoupled_weight_decay=kopt.decoupled_weight_decay(inner, 0.1, 0.1),
        masked=kopt.masked(optax.polyak_sgd(), {"w": True}),
        multi_transform=kopt.multi_transform({"a": optax.polyak_sgd()}, {"w": "a"}),
        accumulate_gradients=kopt.accumulate_gradients(optax.polyak_sgd(), 2),
        apply_if_finite=kopt.apply_if_finite(optax.polyak_sgd()),
        flatten=kopt.flatten(optax.polyak_sgd()),
        chain=kopt.chain(kopt.clip_by_norm(1.0), optax.polyak_sgd()),
    )
    return txs


def test_every_transformation_takes_optax_extra_args():
    """optax's extra arguments (``value=`` for a line search, Polyak step sizes...) reach every
    kopt transformation (which ignores them) and, through kopt's wrappers, the optax pieces
    inside that need them; ``nnx.Optimizer.update(..., value=loss)`` passes them this way."""
    txs = _public_transformations()
    assert {"sgd", "rmsprop", "ftrl", "adafactor", "ema", "identity"} <= set(txs)
    p = {"w": jnp.array([1.0, 2.0])}
    g = {"w": jnp.array([0.5, -0.5])}
    around_polyak = ("masked", "multi_transform", "accumulate_gradients", "apply_if_finite")
    around_polyak += ("flatten", "chain")
    for name, tx in txs.items():
        if name not in around_polyak:
            state = tx.init(p)
            with_value, _ = tx.update(g, state, p, value=jnp.float32(0.5))
            plain, _ = tx.update(g, state, p)
            chex.assert_trees_all_close(with_value, plain, custom_message=name)
    # Polyak's step is value / ||g||^2 = 0.5 / 0.5 = 1.0: the value reached the optax piece.
    for name in around_polyak:
        tx = txs[name]
        state = tx.init(p)
        for _ in range(2):  # accumulate_gradients runs the inner update on the 2nd call
            u, state = tx.update(g, state, p, value=jnp.float32(0.5))
        np.testing.assert_allclose(u["w"], [-0.5, 0.5], rtol=1e-6, err_msg=name)


def test_chain_passes_extra_args_only_where_accepted():
    seen = []

    def takes_value(updates, state, params=None, *, value):
        seen.append(("takes_value", value))
        return updates, state

    def plain(updates, state, params=None):
        seen.append(("plain", None))
        return updates, state

    pieces = [
        kopt.GradientTransformation(lambda p: (), takes_value),
        kopt.GradientTransformation(lambda p: (), plain),
        optax.scale(2.0),  # an optax piece without extra arguments
    ]
    tx = kopt.chain(*pieces)
    u, _ = tx.update(jnp.ones(1), tx.init(jnp.ones(1)), None, value=3.0, other=4.0)
    assert seen == [("takes_value", 3.0), ("plain", None)]
    np.testing.assert_allclose(u, [2.0])


def test_chain_does_not_hide_a_type_error_raised_inside_a_piece():
    """A TypeError from a piece's own code propagates; it is not taken for a refused extra
    argument (the piece is not run a second time without the arguments)."""
    calls = []

    def buggy(updates, state, params=None, **extra_args):
        calls.append(extra_args)
        raise TypeError("f() got an unexpected keyword argument 'bogus'")

    tx = kopt.chain(kopt.GradientTransformation(lambda p: (), buggy))
    with pytest.raises(TypeError, match="bogus"):
        tx.update(jnp.ones(1), tx.init(jnp.ones(1)), None, value=1.0)
    assert calls == [{"value": 1.0}]


def test_nnx_optimizer_update_with_value_for_every_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    for name in ("sgd", "rmsprop", "ftrl", "adafactor", "adam"):
        model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, getattr(kopt, name)(), wrt=nnx.Param)
        loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(jnp.ones((1, 2))) ** 2))(model)
        optimizer.update(model, grads, value=loss)
        assert int(optimizer.step[...]) == 1, name


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


def test_flax_train_state_trains():
    x, y = regression_data()
    model = LinenMLP()
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(1), x), tx=kopt.adam(3e-2)
    )

    @jax.jit
    def step(state):
        def loss_fn(params):
            return jnp.mean((state.apply_fn(params, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    state, first = step(state)
    for _ in range(60):
        state, loss = step(state)
    assert float(loss) < 0.1 * float(first)
    assert int(state.step) == 61
    assert int(state.opt_state[0].count) == 61


@pytest.mark.parametrize("flat", [False, True], ids=["adam", "flatten(adam)"])
def test_nnx_optimizer_trains(flat):
    """``nnx.Optimizer`` initialises with the model's ``Variable`` boxes and updates with the bare
    arrays; ``kopt.flatten`` takes both for the same leaves and trains as the plain optimizer."""
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 16, rngs=rngs)
            self.out = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.tanh(self.hidden(x)))

    x, y = regression_data()
    model = MLP(nnx.Rngs(0))
    reference = MLP(nnx.Rngs(0))
    tx = kopt.flatten(kopt.adam(3e-2)) if flat else kopt.adam(3e-2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    first = step(model, optimizer)
    for _ in range(60):
        loss = step(model, optimizer)
    assert float(loss) < 0.1 * float(first)

    # The same 61 steps as the plain functional loop over the model's arrays.
    graphdef, params = nnx.split(reference, nnx.Param)
    plain = kopt.adam(3e-2)
    state = plain.init(params)
    for _ in range(61):
        grads = jax.grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2))(params)
        updates, state = plain.update(grads, state, params)
        params = kopt.apply_updates(params, updates)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        nnx.to_pure_dict(params),
        rtol=1e-4,
        atol=1e-5,
    )


def test_equinox_model_trains_with_none_leaves():
    x, y = regression_data()
    model = eqx.nn.MLP(3, 1, 16, 1, activation=jax.nn.tanh, key=jax.random.key(2))
    tx = kopt.chain(kopt.clip_by_global_norm(10.0), kopt.adam(3e-2))
    params = eqx.filter(model, eqx.is_inexact_array)
    assert None in jax.tree.leaves(params, is_leaf=lambda v: v is None)
    state = tx.init(params)

    @eqx.filter_jit
    def step(model, state):
        def loss_fn(m):
            return jnp.mean((jax.vmap(m)(x) - y) ** 2)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, loss

    model, state, first = step(model, state)
    for _ in range(60):
        model, state, loss = step(model, state)
    assert float(loss) < 0.1 * float(first)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: kopt.accumulate_gradients(tx, 2),
        lambda tx: kopt.apply_if_finite(tx, 2),
        lambda tx: kopt.chain(tx, kopt.ema(0.9, overwrite_frequency=2)),
    ],
    ids=["accumulate", "apply_if_finite", "ema"],
)
def test_wrappers_accept_equinox_trees(wrap):
    model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    tx = wrap(kopt.sgd(0.1))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    for _ in range(2):
        updates, state = update(grads, state, params)
        model = eqx.apply_updates(model, updates)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(updates))


def _equinox_params_and_grads():
    model = eqx.nn.MLP(2, 1, 3, 1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    return params, grads


@pytest.mark.parametrize(
    "make",
    [
        lambda lib, mask: lib.masked(lib.sgd(0.1), mask),
        lambda lib, mask: (
            kopt.adamw(0.1, weight_decay=0.5, epsilon=1e-30, mask=mask)
            if lib is kopt
            else optax.adamw(0.1, eps=1e-30, weight_decay=0.5, mask=mask)
        ),
        lambda lib, mask: (
            kopt.decoupled_weight_decay(kopt.sgd(0.1), 0.5, 0.1, mask=mask)
            if lib is kopt
            else optax.chain(optax.masked(optax.add_decayed_weights(0.5), mask), optax.sgd(0.1))
        ),
    ],
    ids=["masked", "adamw", "decoupled_weight_decay"],
)
def test_a_mask_made_from_an_equinox_module_is_a_tree_not_a_function(make):
    """``jax.tree.map(f, model)`` of an equinox module is a module again, and callable (its
    ``__call__``), but it holds bools: it was called as ``mask(params)``, which failed inside
    the model. optax takes it as the tree it is."""
    params, grads = _equinox_params_and_grads()
    mask = jax.tree.map(lambda p: p.ndim > 1, params)
    assert callable(mask)
    out = []
    for lib in (kopt, optax):
        tx = make(lib, mask)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        out.append(updates)
    chex.assert_trees_all_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_multi_transform_labels_made_from_an_equinox_module():
    params, grads = _equinox_params_and_grads()
    labels = jax.tree.map(lambda p: "kernel" if p.ndim > 1 else "bias", params)
    tx = kopt.multi_transform({"kernel": kopt.sgd(0.1), "bias": kopt.sgd(0.3)}, labels)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    expected = jax.tree.map(lambda p: jnp.full_like(p, -0.05 if p.ndim > 1 else -0.15), params)
    chex.assert_trees_all_close(updates, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda lib, mask, labels: lib.masked(lib.adam(0.1), mask),
        lambda lib, mask, labels: lib.masked(lib.adam(0.1), lambda params: mask),
        lambda lib, mask, labels: lib.multi_transform(
            {"x": lib.adam(0.1), "y": lib.sgd(0.1, 0.9)}, labels
        ),
        lambda lib, mask, labels: lib.adamw(0.1, mask=mask),
    ],
    ids=["masked", "masked-callable", "multi_transform", "adamw-mask"],
)
def test_tree_map_params_maps_the_param_trees_of_a_masked_state(make):
    """``optax.tree_utils.tree_map_params`` calls ``init`` with a placeholder for the params
    (a tree with no leaves); a mask shaped like the real params did not fit it, so every
    masked kopt state failed, where optax's map."""
    params = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}}
    mask = {"a": True, "b": {"c": False}}
    labels = {"a": "x", "b": {"c": "y"}}
    mapped = []
    for lib in (kopt, optax):
        tx = make(lib, mask, labels)
        state = tx.init(params)
        mapped.append(optax.tree_utils.tree_map_params(tx, lambda p: p + 7.0, state))
        # Only the param-shaped trees moved: the counts and hyperparameters did not.
        scalars = [x for x in jax.tree.leaves(mapped[-1]) if jnp.ndim(x) == 0]
        assert scalars == [x for x in jax.tree.leaves(state) if jnp.ndim(x) == 0]
    chex.assert_trees_all_close(kopt.get_slot(mapped[0], "m")["a"], jnp.full(3, 7.0))
    first = [x for x in jax.tree.leaves(mapped[0]) if jnp.ndim(x) > 0]
    assert first and all(bool(jnp.all(x == 7.0)) for x in first)


def test_flatten_passes_single_values_on_but_not_param_shaped_extra_args():
    """The piece inside ``flatten`` sees packed buffers: a ``grad=`` tree or a ``value_fn=`` of
    the params would not fit it, so they are left out (a clear missing-argument error) rather
    than passed in the wrong shape."""
    seen = {}

    def spy(updates, state, params=None, **extra_args):
        seen.update(extra_args)
        return updates, state

    tx = kopt.flatten(kopt.GradientTransformation(lambda params: (), spy))
    params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    tx.update(
        params, tx.init(params), params, value=jnp.float32(1.0), grad=params, value_fn=jnp.sum
    )
    assert set(seen) == {"value"}


def test_python_float_params_train_as_in_optax():
    """optax takes a Python float param (its slots are ``jnp.zeros_like(1.0)``); kopt does too,
    with optax's numbers, slots of that dtype and updates that are arrays."""
    params = {"w": 1.0, "b": jnp.ones(2)}
    grads = {"w": jnp.float32(0.5), "b": jnp.full(2, -0.25)}
    mask = {"w": True, "b": False}
    pairs = [
        (kopt.sgd(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
        (
            kopt.masked(kopt.chain(kopt.add_decayed_weights(0.2), kopt.sgd(0.1)), mask),
            optax.masked(optax.chain(optax.add_decayed_weights(0.2), optax.sgd(0.1)), mask),
        ),
    ]
    for tx, reference in pairs:
        state, ref_state, p, ref_p = tx.init(params), reference.init(params), params, params
        for _ in range(2):
            updates, state = tx.update(grads, state, p)
            ref_updates, ref_state = reference.update(grads, ref_state, ref_p)
            p, ref_p = kopt.apply_updates(p, updates), optax.apply_updates(ref_p, ref_updates)
        assert isinstance(updates["w"], jax.Array)
        chex.assert_trees_all_close(p, ref_p)
    slot = kopt.get_slot(kopt.adam(0.1).init(params), "m")["w"]
    assert slot.dtype == jnp.zeros_like(1.0).dtype and slot.shape == ()
    chex.assert_trees_all_equal(
        kopt.pack(params).unpack(), {"w": jnp.float32(1.0), "b": params["b"]}
    )


@pytest.mark.parametrize(
    "tx",
    [
        *[factory(0.1) for factory in OPTIMIZERS.values()],
        kopt.chain(kopt.sgd(0.1), kopt.ema(0.9)),
        kopt.decoupled_weight_decay(kopt.sgd(0.1), 0.1),
        kopt.flatten(kopt.adam(0.1)),
    ],
    ids=[*OPTIMIZERS, "ema", "decoupled_weight_decay", "flatten"],
)
def test_a_python_float_param_trains_as_its_float32_array(tx):
    """optax makes a Python float param a float32 array; kopt's every rule that reads the
    param (FTRL, weight decay, Lamb's and Adafactor's norms, EMA) must too. The state is not
    weakly typed (a jitted step would compile again when the update's state is not)."""
    grads = {"w": jnp.float32(0.5), "b": jnp.full(2, -0.25)}
    results = []
    for w in (1.0, jnp.float32(1.0)):
        params = {"w": w, "b": jnp.ones(2)}
        state = tx.init(params)
        assert not any(getattr(leaf, "weak_type", False) for leaf in jax.tree.leaves(state))
        updates, state = tx.update(grads, state, params)
        results.append((kopt.apply_updates(params, updates), state))
    chex.assert_trees_all_equal(*results)


def test_set_hyperparam_keeps_an_optax_named_chain_state_as_it_is(backend_compiles):
    """``optax.named_chain`` keeps its pieces' states in an ``OrderedDict``; ``set_hyperparam``
    made it a plain dict, a new tree structure: a jitted step compiled again, and a checkpoint
    of the new state no longer fitted the old one."""
    tx = optax.named_chain(("clip", optax.clip_by_global_norm(1.0)), ("opt", kopt.sgd(0.1)))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    new_state = kopt.set_hyperparam(state, "learning_rate", 0.5)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    traces = []

    @jax.jit
    def step(state):
        traces.append(None)
        return tx.update({"w": jnp.array([0.3, -0.4])}, state, params)

    step(state)
    compiled = len(backend_compiles)
    updates, _ = step(new_state)
    assert len(traces) == 1 and len(backend_compiles) == compiled
    np.testing.assert_allclose(updates["w"], [-0.15, 0.2], rtol=1e-6)


def test_set_hyperparam_on_an_nnx_optimizer_state_keeps_its_boxes(backend_compiles):
    """``nnx.Optimizer`` keeps each state leaf in an ``OptState`` box; ``set_hyperparam`` put a
    bare array in its place, so the next ``nnx.jit`` step was traced and compiled again. The
    new value keeps its box, and the step uses it without recompiling."""
    nnx = pytest.importorskip("flax.nnx")
    x = jnp.array([[1.0, 2.0], [-1.0, 0.5]])
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    tx = kopt.chain(kopt.clip_by_value(100.0), kopt.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    traces = []

    def loss_fn(m):
        return jnp.sum(m(x) ** 2)

    @nnx.jit
    def step(model, optimizer):
        traces.append(None)
        optimizer.update(model, nnx.grad(loss_fn)(model))

    step(model, optimizer)
    box = optimizer.opt_state[1].hyperparams["learning_rate"]
    optimizer.opt_state = kopt.set_hyperparam(optimizer.opt_state, "learning_rate", 0.5)
    new_box = optimizer.opt_state[1].hyperparams["learning_rate"]
    assert type(new_box) is type(box) and float(box[...]) == np.float32(0.1)  # old one unchanged
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.grad(lambda p: loss_fn(nnx.merge(nnx.graphdef(model), p)))(before)
    compiled = len(backend_compiles)
    step(model, optimizer)
    assert len(traces) == 1 and len(backend_compiles) == compiled
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, before, grads)
    chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.flatten(kopt.adam(0.1)),
        lambda: kopt.chain(kopt.clip_by_global_norm(1.0), kopt.flatten(kopt.sgd(0.1, 0.9))),
        lambda: kopt.masked(kopt.flatten(kopt.adam(0.1)), {"a": True, "b": {"c": False}}),
    ],
    ids=["flatten", "chain", "masked"],
)
def test_tree_map_params_on_a_flatten_state_says_why_it_cannot(make):
    """A flatten state's slots are packed buffers, so ``tree_map_params`` has no param trees
    to map in it; it failed with a pytree-structure error that named neither flatten nor a way
    out. It now raises a ValueError naming both, and the state is left as it was."""
    params = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}}
    tx = make()
    state = tx.init(params)
    before = jax.tree.map(np.asarray, state)
    with pytest.raises(ValueError, match=r"flatten: optax.tree_utils.tree_map_params") as info:
        optax.tree_utils.tree_map_params(tx, lambda p: p + 1.0, state)
    assert "kopt.state_sharding" in str(info.value)
    chex.assert_trees_all_equal(state, before)
    # An empty params tree, which is not the placeholder, still makes an (empty) state.
    assert kopt.flatten(kopt.adam()).init({}).layout.keys == ()


def test_an_optax_piece_gets_sparse_gradients_dense():
    """An optax piece knows no kopt.IndexedSlices: it took the integer row indices for
    gradient values (optax.clip(2) clipped rows [1, 4] to [1, 2], moving the wrong rows), or
    failed inside JAX naming nothing. kopt's chain, wrappers and from_transformation now give
    it the dense gradient."""
    params = jnp.zeros((6, 2))
    grad = kopt.IndexedSlices(jnp.full((2, 2), 5.0), jnp.array([1, 4]), (6, 2))
    want = np.zeros((6, 2))
    want[[1, 4]] = -2.0
    tx = kopt.chain(optax.clip(2.0), kopt.sgd(1.0))
    updates, _ = tx.update(grad, tx.init(params), params)
    np.testing.assert_array_equal(kopt.apply_updates(params, updates), want)
    masked = kopt.masked(kopt.chain(optax.clip(2.0), kopt.sgd(1.0)), {"e": True, "w": False})
    tree = {"e": params, "w": jnp.zeros(2)}
    updates, _ = masked.update({"e": grad, "w": jnp.ones(2)}, masked.init(tree), tree)
    np.testing.assert_array_equal(kopt.apply_updates(tree, updates)["e"], want)
    # Without a dense_shape the param gives the shape; with neither, the error says so.
    rows = kopt.IndexedSlices(jnp.full((2, 2), 5.0), jnp.array([1, 4]))
    updates, _ = tx.update(rows, tx.init(params), params)
    np.testing.assert_array_equal(kopt.apply_updates(params, updates), want)
    with pytest.raises(ValueError, match="not kopt's .* dense_shape"):
        kopt.chain(optax.scale(1.0)).update(rows, kopt.chain(optax.scale(1.0)).init(params))
    for transformation in (
        kopt.chain(optax.clip(2.0), kopt.sgd(1.0)),
        optax.chain(optax.clip(2.0), optax.sgd(1.0)),
    ):
        variable = kopt.Variable(jnp.zeros((6, 2)))
        opt = kopt.optimizers.from_transformation(transformation)
        opt.apply_gradients([(grad, variable)])
        np.testing.assert_array_equal(variable.numpy(), want)


def test_inject_hyperparams_around_a_kopt_optimizer_keeps_the_sparse_rule():
    """optax.inject_hyperparams(kopt.sgd) hands the gradients to the kopt piece it builds:
    made dense for it, the momentum of rows a step does not name decayed too (Keras's
    sparse rule leaves them)."""
    table = jnp.ones((2, 1))
    grad = kopt.IndexedSlices(jnp.ones((1, 1)), jnp.array([0]), (2, 1))
    injected = optax.inject_hyperparams(kopt.sgd)(learning_rate=0.1, momentum=0.9)
    results = []
    for tx in (kopt.sgd(0.1, momentum=0.9), kopt.chain(kopt.clip_by_value(10.0), injected)):
        params, state = table, tx.init(table)
        for g in (kopt.IndexedSlices(jnp.ones((2, 1)), jnp.array([0, 1]), (2, 1)), grad):
            updates, state = tx.update(g, state, params)
            params = kopt.apply_updates(params, updates)
        results.append(np.asarray(params))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6)
    np.testing.assert_allclose(results[0][1], [0.9], rtol=1e-6)  # row 1's momentum kept


def _sparse_params_and_grads():
    params = {"emb": jnp.ones((6, 2)), "w": jnp.ones(2)}
    rows = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    # Row 1 twice (summed) and row 6, outside the table (dropped).
    grads = {"emb": kopt.IndexedSlices(rows, jnp.array([1, 4, 1, 6]), (6, 2)), "w": jnp.ones(2)}
    return params, grads


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_optax_apply_updates_and_flax_train_state_take_sparse_updates(jit):
    """optax.apply_updates (which flax's TrainState.apply_gradients calls) adds each update to
    its param with `+`, which failed for an IndexedSlices update: "unsupported operand
    type(s) for +: 'ArrayImpl' and 'IndexedSlices'". The rows are now scatter-added."""
    params, grads = _sparse_params_and_grads()
    tx = kopt.adagrad(0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert isinstance(updates["emb"], kopt.IndexedSlices)
    want = kopt.apply_updates(params, updates)
    assert np.flatnonzero(np.any(want["emb"] != 1, axis=1)).tolist() == [1, 4]
    apply = jax.jit(optax.apply_updates) if jit else optax.apply_updates
    chex.assert_trees_all_equal(apply(params, updates), want)
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=kopt.adagrad(0.1))
    step = jax.jit(state.apply_gradients) if jit else state.apply_gradients
    chex.assert_trees_all_equal(step(grads=grads).params, want)


@pytest.mark.parametrize(
    "table_dtype, rows_dtype",
    [
        (jnp.float32, jnp.float32),
        (jnp.float16, jnp.float32),
        (jnp.bfloat16, jnp.float32),
        (jnp.float32, jnp.bfloat16),
    ],
)
@pytest.mark.parametrize("numpy_table", [False, True], ids=["jax", "numpy"])
def test_a_sparse_update_adds_to_a_table_in_the_dtype_of_the_dense_sum(
    table_dtype, rows_dtype, numpy_table
):
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(6, 3)), table_dtype)
    if numpy_table:
        table = np.asarray(table)
    rows = jnp.asarray(rng.normal(size=(4, 3)) * 1e-2, rows_dtype)
    update = kopt.IndexedSlices(rows, jnp.array([1, 4, 1, 6]), (6, 3))
    dense_sum = table + update.to_dense()
    # The dense sum adds row 1's two rows in their own dtype first (bfloat16 rounds it).
    atol = 1e-6 + 0.02 * float(jnp.finfo(rows_dtype).eps)
    for total in (table + update, update + table):
        assert total.dtype == dense_sum.dtype
        np.testing.assert_allclose(np.asarray(total, np.float32), dense_sum, rtol=0, atol=atol)
    applied = optax.apply_updates(table, update)
    assert applied.dtype == table.dtype
    np.testing.assert_array_equal(applied, kopt.apply_updates(table, update))


@pytest.mark.parametrize(
    "other, error, culprit",
    [
        (jnp.zeros((6, 4)), ValueError, "sparse update has rows of shape (2,)"),
        (jnp.zeros(()), ValueError, "sparse update is for a scalar param"),
        (jnp.zeros((5, 2)), ValueError, "sparse update has dense_shape (6, 2), expected (5, 2)"),
        (1.0, TypeError, "unsupported operand"),
    ],
    ids=["other-rows", "scalar", "other-table", "python-float"],
)
def test_adding_a_sparse_update_to_what_it_does_not_fit_is_refused(other, error, culprit):
    _, grads = _sparse_params_and_grads()
    before = jax.tree.map(jnp.copy, (other, grads["emb"]))
    with pytest.raises(error, match=re.escape(culprit)):
        other + grads["emb"]
    chex.assert_trees_all_equal((other, grads["emb"]), before)


def test_an_optax_piece_outside_kopt_chain_that_makes_the_indices_floats_is_named():
    """optax.chain hands an IndexedSlices to its optax pieces, which take the indices for
    gradient values; where they come out as floats, the kopt piece after says why."""
    params, grads = _sparse_params_and_grads()
    tx = optax.chain(optax.scale(0.5), kopt.sgd(0.1))
    with pytest.raises(TypeError, match=r"\['emb'\] has indices of dtype float32.*kopt\.chain"):
        tx.update(grads, tx.init(params), params)
