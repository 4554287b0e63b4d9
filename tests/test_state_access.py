"""Reading and setting one piece's hyperparameters and slots where several pieces hold the same
name: the groups of ``multi_transform``, ``masked`` pieces, an SGD beside an ``ema``."""

import ast
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

import kopt

PARAMS = {"body": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, "head": jnp.ones(2)}
LABELS = {"body": {"w": "body", "b": "body"}, "head": "head"}
LABELS_AB = {"body": {"w": "a", "b": "a"}, "head": "b"}
GRADS = {"body": {"w": jnp.full((2, 3), 0.5), "b": jnp.full(3, -1.0)}, "head": jnp.full(2, 2.0)}


def two_groups():
    return kopt.multi_transform({"body": kopt.adam(1e-3), "head": kopt.adam(1e-2)}, LABELS)


def test_get_slot_puts_the_groups_together_as_each_alone_holds_them():
    """It returned the first group's slot, None for the params of the other."""
    tx = two_groups()
    _, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    m = kopt.get_slot(state, "m")
    body, head = kopt.adam(1e-3), kopt.adam(1e-2)
    _, body_state = body.update(GRADS["body"], body.init(PARAMS["body"]), PARAMS["body"])
    _, head_state = head.update(GRADS["head"], head.init(PARAMS["head"]), PARAMS["head"])
    chex.assert_trees_all_equal(m["body"], kopt.get_slot(body_state, "m"))
    chex.assert_trees_all_equal(m["head"], kopt.get_slot(head_state, "m"))
    # where= picks one group: the others' params are None.
    only_head = kopt.get_slot(state, "m", where="head")
    assert only_head["body"]["w"] is None and only_head["body"]["b"] is None
    chex.assert_trees_all_equal(only_head["head"], m["head"])


def test_get_slot_of_masked_pieces_with_a_prefix_mask():
    mask = {"body": True, "head": False}
    inverse = {"body": False, "head": True}
    tx = kopt.chain(
        kopt.masked(kopt.sgd(0.1, momentum=0.9), mask),
        kopt.masked(kopt.sgd(0.5, momentum=0.5), inverse),
    )
    _, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    momentum = kopt.get_slot(state, "momentum")
    np.testing.assert_allclose(momentum["body"]["b"], np.full(3, 0.1))
    np.testing.assert_allclose(momentum["head"], np.full(2, -1.0))


def test_get_slot_refuses_two_pieces_holding_it_for_the_same_params():
    tx = kopt.chain(kopt.sgd(0.1, momentum=0.9), kopt.sgd(0.2, momentum=0.5))
    state = tx.init(PARAMS)
    with pytest.raises(
        ValueError, match=r"get_slot: pieces at \['0', '1'\] hold a slot 'momentum'"
    ):
        kopt.get_slot(state, "momentum")
    _, state = tx.update(GRADS, state, PARAMS)
    np.testing.assert_allclose(kopt.get_slot(state, "momentum", where=0)["head"], [-0.2, -0.2])
    with pytest.raises(ValueError, match=r"no slot 'momentum' under where=3; it is held at"):
        kopt.get_slot(state, "momentum", where=3)


def test_get_hyperparam_names_pieces_that_disagree_and_where_picks_one():
    """It returned the first group's learning rate, silently."""
    state = two_groups().init(PARAMS)
    with pytest.raises(
        ValueError,
        match=r"several pieces hold 'learning_rate' with different values "
        r"\(inner_states/body/inner_state/1: 0.001, inner_states/head/inner_state/1: 0.01\)",
    ):
        kopt.get_hyperparam(state, "learning_rate")
    assert float(kopt.get_hyperparam(state, "learning_rate", where="head")) == np.float32(1e-2)
    assert float(kopt.get_hyperparam(state, "learning_rate", where="body")) == np.float32(1e-3)
    # Equal values are one answer (decoupled weight decay keeps the rate it scales by).
    state = kopt.decoupled_weight_decay(kopt.adam(0.1), 0.01, learning_rate=0.1).init(PARAMS)
    assert float(kopt.get_hyperparam(state, "learning_rate")) == np.float32(0.1)


def test_set_hyperparam_where_changes_one_group_only_and_compiles_once():
    tx = two_groups()
    state = tx.init(PARAMS)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, lr):
        state = kopt.set_hyperparam(state, "learning_rate", lr, where="head")
        updates, state = tx.update(GRADS, state, PARAMS)
        return updates, state

    for lr in (0.5, 0.25):
        updates, state = step(state, jnp.float32(lr))
        assert float(kopt.get_hyperparam(state, "learning_rate", where="head")) == lr
        assert float(kopt.get_hyperparam(state, "learning_rate", where="body")) == np.float32(1e-3)
    # Adam's first two steps move each param by about the learning rate.
    np.testing.assert_allclose(updates["head"], [-0.25, -0.25], rtol=1e-3)
    np.testing.assert_allclose(updates["body"]["b"], np.full(3, 1e-3), rtol=1e-3)
    with pytest.raises(ValueError, match=r"no hyperparameter 'learning_rate' under where='tail'"):
        kopt.set_hyperparam(state, "learning_rate", 0.1, where="tail")


def test_set_hyperparam_where_keeps_an_ema_decay_apart_from_sgd_momentum():
    """An ema after a momentum SGD holds its decay as ``momentum`` too: setting SGD's set both,
    with no way to set one."""
    tx = kopt.chain(kopt.sgd(0.1, momentum=0.9), kopt.ema(0.999))
    state = tx.init(PARAMS)
    state = kopt.set_hyperparam(state, "momentum", 0.5, where=0)
    assert float(kopt.get_hyperparam(state, "momentum", where=0)) == 0.5
    assert float(kopt.get_hyperparam(state, "momentum", where=1)) == np.float32(0.999)
    assert float(kopt.get_hyperparam(state, "momentum", where=np.int64(0))) == 0.5
    both = kopt.set_hyperparam(state, "momentum", 0.25)  # by default, every holder
    assert [float(kopt.get_hyperparam(both, "momentum", where=i)) for i in (0, 1)] == [0.25, 0.25]


@pytest.mark.parametrize("make", [lambda: kopt.sgd(0.1), lambda: kopt.rmsprop(0.1)])
def test_set_hyperparam_refuses_momentum_on_a_piece_built_without_it(make):
    """Built with momentum=0 the piece keeps no velocity (as Keras decides at construction):
    a momentum set later was stored, read back, and ignored."""
    tx = make()
    state = tx.init(PARAMS)
    with pytest.raises(
        ValueError, match=r"set_hyperparam: .*built with momentum=0.*change nothing"
    ):
        kopt.set_hyperparam(state, "momentum", 0.9)
    with pytest.raises(ValueError, match="built with momentum=0"):
        jax.jit(lambda s, m: kopt.set_hyperparam(s, "momentum", m))(state, 0.9)
    kopt.set_hyperparam(state, "momentum", 0.0)  # the value it has: fine
    # Built with momentum, any value may be set, 0 included.
    on = kopt.sgd(0.1, momentum=0.9)
    state = kopt.set_hyperparam(on.init(PARAMS), "momentum", 0.0)
    assert float(kopt.get_hyperparam(state, "momentum")) == 0.0


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one_device", "mesh"])
def test_a_value_set_in_several_pieces_is_a_buffer_of_its_own_in_each(on_mesh):
    """set_hyperparam put one buffer in every piece holding the name (and one learning-rate
    array given to two pieces was one buffer in both): a donating step then failed ("donate
    the same buffer twice"), and on a mesh the process could crash."""
    params = {"k": jnp.ones((4, 4)), "b": jnp.ones(4)}
    if on_mesh:
        mesh = jax.make_mesh((4,), ("d",))
        params = jax.device_put(
            params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
        )
    lr = jnp.asarray(0.1, jnp.float32)
    tx = kopt.multi_transform({"a": kopt.adam(lr), "s": kopt.sgd(lr)}, {"k": "a", "b": "s"})
    grads = jax.tree.map(jnp.ones_like, params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    state = tx.init(params)
    params, state = step(params, state, grads)
    state = kopt.set_hyperparam(state, "learning_rate", 0.05)
    buffers = [
        shard.data.unsafe_buffer_pointer()
        for leaf in jax.tree.leaves(state)
        for shard in leaf.addressable_shards
    ]
    assert len(buffers) == len(set(buffers))
    params, state = step(params, state, grads)
    np.testing.assert_allclose(params["b"], np.full(4, 1 - 0.1 - 0.05), rtol=1e-6)


@pytest.mark.parametrize(
    "name, value",
    [("learning_rate", -0.1), ("beta_1", 1.5), ("epsilon", -1.0), ("momentum", 1.5)],
)
def test_set_hyperparam_refuses_values_the_constructor_refuses(name, value):
    """The constructors and the facade refuse them; set_hyperparam stored them (a momentum
    of 1.5 took SGD to -7e9 in 60 steps)."""
    tx = kopt.chain(kopt.adam(0.1), kopt.sgd(0.1, momentum=0.9))
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=rf"set_hyperparam: `{name}` must be"):
        kopt.set_hyperparam(state, name, value)
    kopt.set_hyperparam(state, name, 0.5)


def test_get_slot_puts_together_optax_multi_transform_groups_of_kopt_pieces():
    """optax marks the params a group leaves out with MaskedNode, not None: the groups were
    taken to hold the slot for the same params."""
    import optax

    params = {"w": jnp.ones(2), "b": jnp.ones(3)}
    tx = optax.multi_transform(
        {"x": kopt.sgd(0.1, momentum=0.9), "y": kopt.sgd(0.5, momentum=0.9)},
        {"w": "x", "b": "y"},
    )
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    momentum = kopt.get_slot(state, "momentum")
    np.testing.assert_allclose(momentum["w"], [-0.1, -0.1], rtol=1e-6)
    np.testing.assert_allclose(momentum["b"], [-0.5, -0.5, -0.5], rtol=1e-6)


def _masked_adam_then_masked_sgd():
    return kopt.chain(
        kopt.masked(kopt.adam(0.1), {"body": True, "head": False}),
        kopt.masked(kopt.sgd(0.5), {"body": False, "head": True}),
    )


def test_an_integer_where_counts_in_the_outermost_chain_only():
    """kopt.adam is itself a chain (its learning rate at position 1): where=1, meant for the
    SGD at position 1 of the user's chain, also set Adam's learning rate."""
    tx = _masked_adam_then_masked_sgd()
    state = kopt.set_hyperparam(tx.init(PARAMS), "learning_rate", 0.01, where=1)
    assert float(kopt.get_hyperparam(state, "learning_rate", where=1)) == np.float32(0.01)
    assert float(kopt.get_hyperparam(state, "learning_rate", where=0)) == np.float32(0.1)
    # A tuple that starts with the outer position reaches into the piece there.
    inner = kopt.get_hyperparam(state, "learning_rate", where=(0, "inner_state", 1))
    assert float(inner) == np.float32(0.1)
    updates, _ = tx.update(GRADS, state, PARAMS)
    np.testing.assert_allclose(updates["head"], -0.01 * np.asarray(GRADS["head"]), rtol=1e-6)
    body_b = ref.adam(PARAMS["body"]["b"], [GRADS["body"]["b"]], lr=0.1) - 1.0
    np.testing.assert_allclose(updates["body"]["b"], body_b, rtol=1e-5)
    # Integer multi_transform labels are counted the same way: label 1 is not position 1
    # inside label 0's Adam.
    tx = kopt.multi_transform({0: kopt.adam(0.1), 1: kopt.sgd(0.5)}, {"body": 0, "head": 1})
    state = kopt.set_hyperparam(tx.init(PARAMS), "learning_rate", 0.01, where=1)
    assert float(kopt.get_hyperparam(state, "learning_rate", where=0)) == np.float32(0.1)
    assert float(kopt.get_hyperparam(state, "learning_rate", where=1)) == np.float32(0.01)
    # get_slot too: the momentum of the chain nested at position 1, not of position 1 in
    # the SGD at position 0.
    tx = kopt.chain(
        kopt.sgd(0.1, momentum=0.9), kopt.chain(kopt.identity(), kopt.sgd(0.2, momentum=0.5))
    )
    _, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    head_in = -0.1 * np.asarray(GRADS["head"])  # what the first SGD hands the nested chain
    np.testing.assert_allclose(
        kopt.get_slot(state, "momentum", where=1)["head"], -0.2 * head_in, rtol=1e-6
    )


def test_the_where_advice_in_an_error_picks_each_piece():
    """The error told the user to pass "a chain position" when where=1 had just been passed
    and matched both pieces; it now gives a where= that picks each one, and each does."""
    import optax

    tx = optax.chain(
        optax.masked(kopt.adam(0.1), {"body": True, "head": False}),
        optax.masked(kopt.adam(0.2), {"body": False, "head": True}),
    )
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="different values") as error:
        kopt.get_hyperparam(state, "learning_rate")
    assert "where=0 for 0/inner_state/1, where=1 for 1/inner_state/1" in str(error.value)
    assert float(kopt.get_hyperparam(state, "learning_rate", where=1)) == np.float32(0.2)
    tx = kopt.chain(
        kopt.multi_transform({"a": kopt.adam(1e-3), "b": kopt.adam(1e-2)}, LABELS_AB),
        kopt.chain(kopt.adam(0.2), kopt.sgd(0.3)),
    )
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="different values") as error:
        kopt.get_hyperparam(state, "learning_rate")
    advice = re.findall(r"where=(.*?) for [\w/]+", str(error.value).split("pick one: ")[1])
    expected = {"'a'": 1e-3, "'b'": 1e-2, "(1, 0)": 0.2, "(1, 1)": 0.3}
    assert advice == list(expected)
    for where, value in expected.items():
        got = kopt.get_hyperparam(state, "learning_rate", where=ast.literal_eval(where))
        assert float(got) == np.float32(value)
