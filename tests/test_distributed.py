"""Sharded training on 4 simulated CPU devices: ZeRO-1 (``kopt.shard_state``) and the facade with
sharded ``kopt.Variable``s (FSDP-style params). The functional optimizers' init sharding is
covered by test_sharding.py.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optimizer_zoo import OPTIMIZERS

import kopt
from kopt import optimizers

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")

RNG = np.random.default_rng(1)
PARAMS = {
    "kernel": RNG.normal(size=(16, 12)).astype(np.float32),
    "bias": RNG.normal(size=(8,)).astype(np.float32),
    "embedding": RNG.normal(size=(6, 20)).astype(np.float32),
}
GRADS = [
    jax.tree.map(lambda p, k=k: RNG.normal(size=p.shape).astype(np.float32), PARAMS)
    for k in range(4)
]


def bytes_on(tree, device):
    """Bytes of ``tree``'s leaves held by ``device``."""
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def test_leaf_sharding_picks_the_largest_divisible_dimension():
    mesh = jax.make_mesh((4,), ("data",))
    cases = {
        (16, 12): P("data", None),
        (6, 20): P(None, "data"),
        (8,): P("data"),
        (3, 5): P(),
        (): P(),
        (12, 12): P("data", None),
        (2, 4): P(None, "data"),
    }
    for shape, spec in cases.items():
        assert kopt.distributed.leaf_sharding(shape, mesh, "data").spec == spec, shape
    state = kopt.adam().init(PARAMS)
    by_default = kopt.state_sharding(state, mesh, "data")  # every array leaf is split
    assert kopt.get_slot(by_default, "m")["embedding"].spec == P(None, "data")
    with_params = kopt.state_sharding(kopt.adafactor().init(PARAMS), mesh, "data", PARAMS)
    assert kopt.get_slot(with_params, "r")["kernel"].spec == P()  # factored: replicated
    assert kopt.get_slot(with_params, "v")["kernel"].spec == P("data", None)
    with pytest.raises(ValueError, match="'model' is not an axis"):
        kopt.state_sharding(kopt.adam().init(PARAMS), mesh, "model")


@pytest.mark.parametrize(
    "mesh, axis_name, culprit",
    [
        (None, "data", r"`mesh` must be a jax.sharding.Mesh, received NoneType"),
        (
            "mesh",
            0,
            r"`axis_name` must be a mesh axis name \(a str\) or a tuple of them, "
            r"received int: 0",
        ),
        ("mesh", ("data", 0), r"`axis_name` .* received tuple"),
    ],
    ids=["no-mesh", "int-axis", "int-in-tuple"],
)
def test_state_sharding_names_a_mesh_or_axis_name_of_the_wrong_type(mesh, axis_name, culprit):
    """They failed with "'NoneType' object has no attribute 'shape'" and "'int' object is not
    iterable"."""
    mesh = jax.make_mesh((4,), ("data",)) if mesh == "mesh" else mesh
    state = kopt.adam().init(PARAMS)
    with pytest.raises(TypeError, match=r"^state_sharding: " + culprit):
        kopt.state_sharding(state, mesh, axis_name)
    with pytest.raises(TypeError, match=r"^state_sharding: " + culprit):
        kopt.shard_state(state, mesh, axis_name)


def _split_params():
    """Two (8, 8) params split differently over "model" and a replicated bias, on a 2 x 2
    ("data", "model") mesh: ``(mesh, specs, params)``."""
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    specs = {"a": P("model", None), "b": P(None, "model"), "bias": P()}
    params = {
        name: jax.device_put(np.ones(shape, np.float32), NamedSharding(mesh, specs[name]))
        for name, shape in {"a": (8, 8), "b": (8, 8), "bias": (8,)}.items()
    }
    return mesh, specs, params


def _two_momentum_steps_keep_the_splits(tx, shardings, mesh, specs, params):
    """Two ZeRO-1 steps of a momentum SGD (lr 0.1, momentum 0.9) with gradients of 2: each
    param keeps its split and reaches 0.42. Returns the state."""
    state = kopt.shard_state(tx.init(params), mesh, "data", params)
    update = kopt.jit_update(tx, shardings)
    grads = jax.tree.map(
        lambda p: jax.device_put(np.full(p.shape, 2.0, np.float32), p.sharding), params
    )
    for _ in range(2):
        params, state = update(grads, state, params)
    for name, p in params.items():  # 1 - 0.1 * 2, then - (0.9 * 0.2 + 0.1 * 2)
        assert p.sharding.spec == specs[name]
        np.testing.assert_allclose(p, 0.42, rtol=1e-6)
    return state


def test_state_sharding_matches_each_slot_to_its_own_param():
    """Two params of one shape, split differently over ``"model"``: each slot keeps its own
    param's split and adds the ``"data"`` one (matched by tree position; by shape alone both
    got the same sharding, and an explicit mesh refused the step). A factored statistic of
    a bias's shape stays replicated."""
    mesh, specs, params = _split_params()
    factored = kopt.state_sharding(kopt.adafactor().init(params), mesh, "data", params)
    assert kopt.get_slot(factored, "r")["a"].spec == P()  # shaped like "bias", not its slot
    tx = kopt.sgd(0.1, momentum=0.9)
    shardings = kopt.state_sharding(tx.init(params), mesh, "data", params)
    state = _two_momentum_steps_keep_the_splits(tx, shardings, mesh, specs, params)
    momentum = kopt.get_slot(state, "momentum")
    assert momentum["a"].sharding.spec == P("model", "data")
    assert momentum["b"].sharding.spec == P("data", "model")
    assert momentum["bias"].sharding.spec == P("data")


def test_state_sharding_matches_the_slots_of_masked_and_multi_transform_pieces():
    """The slots of masked pieces and multi_transform groups are shaped like the params but
    for the params left out (None): they were matched by shape alone, losing each param's
    split over "model" (and an explicit mesh refused the step)."""
    mesh, specs, params = _split_params()
    tx = kopt.multi_transform(
        {"x": kopt.sgd(0.1, momentum=0.9), "y": kopt.sgd(0.1, momentum=0.9)},
        {"a": "y", "b": "x", "bias": "x"},
    )
    shardings = kopt.state_sharding(tx.init(params), mesh, "data", params)
    x = shardings.inner_states["x"].inner_state.slots["momentum"]
    y = shardings.inner_states["y"].inner_state.slots["momentum"]
    assert x == {
        "a": None,
        "b": NamedSharding(mesh, P("data", "model")),
        "bias": NamedSharding(mesh, P("data")),
    }
    assert y == {"a": NamedSharding(mesh, P("model", "data")), "b": None, "bias": None}
    state = _two_momentum_steps_keep_the_splits(tx, shardings, mesh, specs, params)
    assert kopt.get_slot(state, "momentum")["a"].sharding.spec == P("model", "data")


def test_state_sharding_matches_flatten_loose_slots_to_their_own_params():
    """kopt.flatten keeps the two split params loose, in a dict keyed by path: each slot is
    matched to its param through the layout (by shape alone both got one sharding, and an
    explicit mesh refused the step); the packed buffer is split over ``"data"``."""
    mesh, specs, params = _split_params()
    tx = kopt.flatten(kopt.sgd(0.1, momentum=0.9), max_leaf_size=16)
    shardings = kopt.state_sharding(tx.init(params), mesh, "data", params)
    slots = shardings.inner_state.slots["momentum"]
    assert slots == {
        "['a']": NamedSharding(mesh, P("model", "data")),
        "['b']": NamedSharding(mesh, P("data", "model")),
        "packed float32": NamedSharding(mesh, P("data")),
    }
    _two_momentum_steps_keep_the_splits(tx, shardings, mesh, specs, params)


@pytest.mark.parametrize(
    "tx",
    [
        kopt.adafactor(0.1),
        kopt.flatten(kopt.adafactor(0.1), max_leaf_size=0),
        kopt.masked(kopt.adafactor(0.1), {"kernel": True, "bias": True, "embedding": False}),
    ],
    ids=["adafactor", "flatten", "masked"],
)
def test_state_sharding_without_params_keeps_factored_statistics_replicated(tx):
    """Without ``params`` Adafactor's factored ``r`` and ``c`` were both split over "data", and
    on an explicit mesh (jax.make_mesh's default) the step refused their outer product: the
    slots now show the params' shapes, as ``params`` would."""
    mesh = jax.make_mesh((4,), ("data",))
    state = tx.init(PARAMS)
    shardings = kopt.state_sharding(state, mesh, "data")
    assert shardings == kopt.state_sharding(state, mesh, "data", PARAMS)
    assert kopt.get_slot(shardings, "r")["kernel"].spec == P()
    assert kopt.get_slot(shardings, "v")["kernel"].spec == P("data", None)
    expected, _ = jax.jit(tx.update)(GRADS[0], state, PARAMS)
    params, _ = kopt.jit_update(tx, shardings)(
        GRADS[0], kopt.shard_state(state, mesh, "data"), PARAMS
    )
    chex.assert_trees_all_close(params, kopt.apply_updates(PARAMS, expected), rtol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero1_state_is_a_quarter_per_device_and_trains_like_unsharded(name):
    mesh = jax.make_mesh((4,), ("data",))
    replicated = NamedSharding(mesh, P())
    tx = OPTIMIZERS[name](0.01)

    # The reference: the same optimizer, unsharded, on one device.
    params, state = PARAMS, tx.init(PARAMS)
    plain_step = jax.jit(
        lambda g, s, p: (lambda u, s: (kopt.apply_updates(p, u), s))(*tx.update(g, s, p))
    )
    for grads in GRADS:
        params, state = plain_step(grads, state, params)
    expected_params, expected_state = params, state

    params = jax.device_put(PARAMS, replicated)
    state = tx.init(params)
    param_shapes = {p.shape for p in PARAMS.values()}

    def param_shaped(tree):
        return [leaf for leaf in jax.tree.leaves(tree) if leaf.shape in param_shapes]

    full_bytes = sum(leaf.nbytes for leaf in param_shaped(state))
    assert full_bytes > 0
    state = kopt.shard_state(state, mesh, "data", params)
    shardings = kopt.state_sharding(state, mesh, "data", params)
    step = kopt.jit_update(tx, shardings, replicated)
    for grads in GRADS:
        params, state = step(jax.device_put(grads, replicated), state, params)

    for device in jax.devices():
        assert bytes_on(param_shaped(state), device) * 4 == full_bytes, (name, device)
    for leaf in param_shaped(state):
        assert "data" in leaf.sharding.spec, (name, leaf.shape, leaf.sharding)
    for leaf in jax.tree.leaves(params):
        assert leaf.sharding.is_fully_replicated
    chex.assert_trees_all_close(params, expected_params, rtol=2e-6, atol=1e-7)
    chex.assert_trees_all_close(
        jax.device_get(state), jax.device_get(expected_state), rtol=2e-6, atol=1e-7
    )


FACADE = {
    "SGD": lambda: optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "Adam": lambda: optimizers.Adam(0.1, amsgrad=True),
    "Adagrad": lambda: optimizers.Adagrad(0.1),
    "Adadelta": lambda: optimizers.Adadelta(1.0),
    "Adamax": lambda: optimizers.Adamax(0.1),
    "Nadam": lambda: optimizers.Nadam(0.1),
    "RMSprop": lambda: optimizers.RMSprop(0.1, momentum=0.5, centered=True),
    "Ftrl": lambda: optimizers.Ftrl(0.1, l1_regularization_strength=0.01),
    "AdamW": lambda: optimizers.AdamW(0.1),
    "Lion": lambda: optimizers.Lion(0.1),
    "Lamb": lambda: optimizers.Lamb(0.1),
    "Adafactor": lambda: optimizers.Adafactor(0.1),
}
FSDP_SPECS = {"kernel": P("data", None), "bias": P("data"), "embedding": P(None, "data")}


@functools.cache
def trained_unsharded(name):
    """Two steps of ``FACADE[name]`` on unsharded variables: their values, the reference of
    both gradient placements below (computed once per optimizer)."""
    reference = FACADE[name]()
    plain = {k: kopt.Variable(v, name=k) for k, v in PARAMS.items()}
    for grads in GRADS[:2]:
        reference.apply_gradients([(jnp.asarray(grads[k]), plain[k]) for k in PARAMS])
    return {k: np.array(v.numpy()) for k, v in plain.items()}


@pytest.mark.parametrize(
    "name, grads_placement",
    [(n, placement) for n in FACADE for placement in ("sharded", "replicated")],
)
def test_facade_sharded_variables_keep_sharding_and_slots_follow(name, grads_placement):
    mesh = jax.make_mesh((4,), ("data",))
    shardings = {k: NamedSharding(mesh, spec) for k, spec in FSDP_SPECS.items()}
    variables = {
        k: kopt.Variable(jax.device_put(v, shardings[k]), name=k) for k, v in PARAMS.items()
    }
    opt = FACADE[name]()
    for grads in GRADS[:2]:
        if grads_placement == "sharded":
            grads = {k: jax.device_put(g, shardings[k]) for k, g in grads.items()}
        opt.apply_gradients([(jnp.asarray(grads[k]), variables[k]) for k in PARAMS])

    plain = trained_unsharded(name)
    checked = 0
    for key, var in variables.items():
        assert var.value.sharding.is_equivalent_to(shardings[key], len(var.shape)), (
            key,
            var.value.sharding,
        )
        np.testing.assert_allclose(var.numpy(), plain[key], rtol=1e-5, atol=1e-6)
        for slot_name in opt.get_slot_names():
            slot = opt.get_slot(var, slot_name)
            if slot.shape != var.shape:  # Adafactor's factored statistics drop an axis
                if len(var.shape) >= 2:
                    spec = list(FSDP_SPECS[key]) + [None] * (len(var.shape) - len(FSDP_SPECS[key]))
                    del spec[-1 if slot_name == "r" else -2]
                    expected = NamedSharding(mesh, P(*spec))
                    assert slot.value.sharding.is_equivalent_to(expected, len(slot.shape)), (
                        f"{name}: slot {slot_name} of {key} has {slot.value.sharding}"
                    )
                    checked += 1
                continue
            assert slot.value.sharding.is_equivalent_to(shardings[key], len(var.shape)), (
                f"{name}: slot {slot_name} of {key} has {slot.value.sharding}"
            )
            checked += 1
    assert checked > 0


def test_jit_update_keeps_params_shardings_by_default():
    """Without ``params_shardings`` the new params keep their params' shardings, and params on
    one device come back replicated over the state's mesh (ZeRO-1 as docs/distribution.md
    writes it); only the state is split."""
    mesh = jax.make_mesh((4,), ("data",))
    tx = kopt.adam(0.1)
    grads = {"w": jnp.ones((16, 3)), "b": jnp.ones(8)}
    expected = kopt.apply_updates(
        {"w": jnp.zeros((16, 3)), "b": jnp.zeros(8)},
        tx.update(grads, tx.init(grads), grads)[0],
    )
    cases = {
        "uncommitted": {"w": jnp.zeros((16, 3)), "b": jnp.zeros(8)},
        "replicated": jax.device_put(
            {"w": jnp.zeros((16, 3)), "b": jnp.zeros(8)}, NamedSharding(mesh, P())
        ),
        "own": {
            "w": jax.device_put(jnp.zeros((16, 3)), NamedSharding(mesh, P(None, None))),
            "b": jax.device_put(jnp.zeros(8), NamedSharding(mesh, P("data"))),
        },
    }
    for case, params in cases.items():
        state = kopt.shard_state(tx.init(params), mesh, "data", params)
        update = kopt.jit_update(tx, kopt.state_sharding(state, mesh, "data", params))
        new_params, state = update(grads, state, params)
        assert kopt.get_slot(state, "m")["w"].sharding.spec == P("data", None), case
        assert new_params["w"].sharding.is_fully_replicated, case
        b_spec = P("data") if case == "own" else P()
        assert new_params["b"].sharding.spec == b_spec, case
        chex.assert_trees_all_close(new_params, expected, rtol=1e-6)
        new_params, state = update(grads, state, new_params)
        assert new_params["w"].sharding.is_fully_replicated, case


def test_jit_update_places_a_state_restored_to_the_host():
    """A state from ``jax.device_get`` (or a pickle, or a fresh unsharded ``init``) is put on
    the state's shardings before the donating step, which failed inside XLA before; from the
    host copy the step gives what it gives from the state on the devices."""
    mesh = jax.make_mesh((4,), ("data",))
    params = {"w": jnp.ones((8, 6))}
    grads = {"w": jnp.full((8, 6), 0.1)}
    tx = kopt.adam(0.01)
    state = kopt.shard_state(tx.init(params), mesh, "data", params)
    update = kopt.jit_update(tx, kopt.state_sharding(state, mesh, "data", params))
    params, state = update(grads, state, params)
    host = jax.device_get(state)
    from_devices = update(grads, state, params)  # donates state
    from_host = update(grads, host, params)
    assert kopt.get_slot(from_host[1], "m")["w"].sharding.spec == P("data", None)
    chex.assert_trees_all_equal(jax.device_get(from_host), jax.device_get(from_devices))
    fresh = update(grads, tx.init(params), params)[1]
    assert kopt.get_slot(fresh, "m")["w"].sharding.spec == P("data", None)
