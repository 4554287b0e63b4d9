"""Optimizer state follows the params' sharding on 4 simulated CPU devices (see conftest.py)."""

import contextlib

import chex
import facade_zoo
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from optimizer_zoo import OPTIMIZERS

import kopt

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")

SPECS = {"rows": P("x", None), "cols": P(None, "x"), "bias": P("x"), "scale": P()}
SHAPES = {"rows": (8, 4), "cols": (4, 8), "bias": (8,), "scale": ()}


@contextlib.contextmanager
def sharded_params(axis_type):
    mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
    context = jax.set_mesh(mesh) if axis_type == AxisType.Explicit else contextlib.nullcontext()
    with context:
        params = {
            name: jax.device_put(
                jnp.full(SHAPES[name], 0.5, jnp.float32), NamedSharding(mesh, SPECS[name])
            )
            for name in SPECS
        }
        yield params


def assert_slots_follow_params(state, params, what):
    """Every slot tree shaped like the params carries each param's sharding."""
    checked = 0
    for slot in kopt.slot_names(state):
        tree = kopt.get_slot(state, slot)
        if jax.tree.structure(tree) != jax.tree.structure(params) or any(
            tree[name].shape != p.shape for name, p in params.items()
        ):
            continue  # Nadam's scalar momentum_cache, Adafactor's factored statistics
        for name, p in params.items():
            leaf = tree[name]
            assert leaf.sharding.is_equivalent_to(p.sharding, p.ndim), (
                f"{what}: slot {slot}[{name!r}] has {leaf.sharding}, param has {p.sharding}"
            )
            checked += 1
    return checked


AXIS_TYPES = pytest.mark.parametrize(
    "axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"]
)


@AXIS_TYPES
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_follows_param_sharding(name, axis_type):
    tx = OPTIMIZERS[name](0.01)
    with sharded_params(axis_type) as params:
        assert assert_slots_follow_params(tx.init(params), params, f"{name} init") > 0
        state = jax.jit(tx.init)(params)
        assert assert_slots_follow_params(state, params, f"{name} jit(init)") > 0

        @jax.jit
        def step(params, state):
            grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
            updates, state = tx.update(grads, state, params)
            return kopt.apply_updates(params, updates), state

        new_params, state = step(params, state)
        new_params, state = step(new_params, state)
        for key, p in params.items():
            assert new_params[key].sharding.is_equivalent_to(p.sharding, p.ndim), key
        assert_slots_follow_params(state, params, f"{name} after two jitted steps")


@AXIS_TYPES
def test_wrapper_state_follows_param_sharding(axis_type):
    tx = kopt.chain(
        kopt.apply_if_finite(kopt.accumulate_gradients(kopt.adam(0.01), every_k=2), 2),
        kopt.ema(0.9, overwrite_frequency=2),
    )
    with sharded_params(axis_type) as params:
        for state in (tx.init(params), jax.jit(tx.init)(params)):
            accumulate_state, ema_state = state[0].inner_state, state[1]
            for name, p in params.items():
                for leaf in (accumulate_state.accumulated[name], ema_state.slots["average"][name]):
                    assert leaf.sharding.is_equivalent_to(p.sharding, p.ndim), name
        grads = jax.tree.map(jnp.ones_like, params)
        update = jax.jit(tx.update)
        for _ in range(2):
            updates, state = update(grads, state, params)
            for name, p in params.items():
                assert updates[name].sharding.is_equivalent_to(p.sharding, p.ndim), name
        updates, state = update(jax.tree.map(lambda g: g * jnp.nan, grads), state, params)
        for name, p in params.items():
            assert updates[name].sharding.is_equivalent_to(p.sharding, p.ndim), name
            assert state[1].slots["average"][name].sharding.is_equivalent_to(p.sharding, p.ndim)


# Adafactor's factored statistics drop one axis of a rank >= 2 param: r the last, c the one
# before; each keeps the sharding of the axes that remain.
FACTORED_SPECS = {
    "rows": {"r": P("x"), "c": P(None)},
    "cols": {"r": P(None), "c": P("x")},
}


@AXIS_TYPES
def test_adafactor_factored_slots_follow_the_remaining_axes(axis_type):
    tx = kopt.adafactor(0.01)
    with sharded_params(axis_type) as params:
        mesh = params["rows"].sharding.mesh

        @jax.jit
        def step(params, state):
            grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
            updates, state = tx.update(grads, state, params)
            return kopt.apply_updates(params, updates), state

        init_state = tx.init(params)
        jit_state = jax.jit(tx.init)(params)
        _, stepped = step(params, jit_state)
        for what, state in (("init", init_state), ("jit(init)", jit_state), ("step", stepped)):
            for name, specs in FACTORED_SPECS.items():
                for slot, spec in specs.items():
                    leaf = kopt.get_slot(state, slot)[name]
                    assert leaf.shape == (SHAPES[name][0] if slot == "r" else SHAPES[name][1],)
                    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), 1), (
                        f"{what}: {slot}[{name!r}] has {leaf.sharding}, expected {spec}"
                    )


def test_adafactor_factored_slots_stay_on_a_committed_params_device():
    device = jax.devices()[1]
    p = jax.device_put(jnp.ones((4, 3)), device)
    state = kopt.adafactor(0.01).init({"w": p})
    for slot in ("r", "c", "v"):
        leaf = kopt.get_slot(state, slot)["w"]
        assert leaf.devices() == {device} and leaf.committed, slot


# Sparse gradients (IndexedSlices) for tables split by rows and by columns. Over Explicit mesh
# axes JAX asks a gather or a scatter on a split axis for its output's sharding; the sparse
# rules must give it (and keep the table's), the same result as on one device.
TABLE_SPECS = {"rows": P("x", None), "cols": P(None, "x")}
TABLE = np.linspace(-1.0, 1.0, 32, dtype=np.float32).reshape(8, 4)
# Two steps: the same row twice and a negative (ignored) index, then an index past the end;
# the second step's rows are split over the mesh, as a data-parallel batch's would be.
SPARSE_STEPS = [
    (np.array([1, 6, 1, -1], np.int32), P()),
    (np.array([5, 2, 9, 5], np.int32), P("x")),
]


def sparse_gradients(mesh=None):
    """Per step, {table name: IndexedSlices}; placed on ``mesh`` as SPARSE_STEPS says."""
    steps = []
    for k, (indices, spec) in enumerate(SPARSE_STEPS):
        if mesh is not None:
            indices = jax.device_put(indices, NamedSharding(mesh, spec))
        grads = {}
        for j, name in enumerate(TABLE_SPECS):
            values = np.full((4, 4), 0.5 + k, np.float32) * np.arange(1, 5)[:, None] * (j + 1)
            if mesh is not None:
                values = jax.device_put(values, NamedSharding(mesh, P(*spec, None)))
            grads[name] = kopt.IndexedSlices(jnp.asarray(values), jnp.asarray(indices), (8, 4))
        steps.append(grads)
    return steps


def sharded_tables(axis_type):
    """The tables on a 4-device mesh, as ``jax.make_mesh`` users place them (no mesh context)."""
    mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
    return mesh, {
        name: jax.device_put(TABLE, NamedSharding(mesh, spec)) for name, spec in TABLE_SPECS.items()
    }


# Explicit axes (where the row gathers and scatters must name their sharding) for every
# optimizer; automatic axes, where XLA chooses, for a few, to keep the suite's time down.
SPARSE_CASES = [(n, AxisType.Explicit) for n in OPTIMIZERS] + [
    (n, AxisType.Auto) for n in ("sgd", "adam", "adagrad")
]


@pytest.mark.parametrize(
    "name, axis_type", SPARSE_CASES, ids=[f"{n}-{str(t).split('.')[-1]}" for n, t in SPARSE_CASES]
)
def test_sparse_step_on_sharded_tables_matches_one_device(name, axis_type):
    tx = OPTIMIZERS[name](0.1)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    def run(params, steps):
        state = tx.init(params)
        for grads in steps:
            params, state = step(params, state, grads)
        return params, state

    mesh, tables = sharded_tables(axis_type)
    params, state = run(tables, sparse_gradients(mesh))
    expected_params, expected_state = run(
        {name: jnp.asarray(TABLE) for name in TABLE_SPECS}, sparse_gradients()
    )
    chex.assert_trees_all_close(params, expected_params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(state, expected_state, rtol=1e-6, atol=1e-6)
    for key, table in tables.items():
        assert params[key].sharding.is_equivalent_to(table.sharding, 2), key
    assert_slots_follow_params(state, tables, f"{name} after two sparse steps")


@pytest.mark.parametrize(
    "name, axis_type",
    [(n, AxisType.Explicit) for n in ("SGD", "Adam", "Adagrad", "RMSprop", "Ftrl")]
    + [("Adagrad", AxisType.Auto)],
)
def test_facade_sparse_step_on_sharded_tables_matches_one_device(name, axis_type):
    def run(tables, steps):
        opt = facade_zoo.make(name)
        variables = {key: kopt.Variable(table, name=key) for key, table in tables.items()}
        for grads in steps:
            opt.apply_gradients([(grads[key], variables[key]) for key in variables])
        return opt, variables

    mesh, tables = sharded_tables(axis_type)
    opt, variables = run(tables, sparse_gradients(mesh))
    expected_opt, expected = run({key: TABLE for key in TABLE_SPECS}, sparse_gradients())
    for key, table in tables.items():
        np.testing.assert_allclose(variables[key].numpy(), expected[key].numpy(), rtol=1e-6)
        assert variables[key].value.sharding.is_equivalent_to(table.sharding, 2), key
        for slot in opt.get_slot_names():
            value = opt.get_slot(variables[key], slot).value
            np.testing.assert_allclose(
                value, expected_opt.get_slot(expected[key], slot).numpy(), rtol=1e-6, atol=1e-6
            )
            assert value.sharding.is_equivalent_to(table.sharding, 2), (key, slot)


# On a 2 x 2 ("data", "model") mesh with Explicit axes, the rows of a gradient from a 2-D step
# split rows over "data" and columns over "model", beside tables split either way.
TABLE_SPECS_2D = [P(None, "model"), P("data", None), P("model", None)]


def sparse_gradients_2d(mesh=None):
    """Per step, the IndexedSlices of SPARSE_STEPS for one table; on ``mesh``, the values split
    rows over "data" and columns over "model"."""
    steps = []
    for k, (indices, _) in enumerate(SPARSE_STEPS):
        values = np.full((4, 4), 0.5 + k, np.float32) * np.arange(1, 5)[:, None]
        if mesh is not None:
            values = jax.device_put(values, NamedSharding(mesh, P("data", "model")))
            indices = jax.device_put(indices, NamedSharding(mesh, P("data")))
        steps.append(kopt.IndexedSlices(jnp.asarray(values), jnp.asarray(indices), (8, 4)))
    return steps


def _explicit_2d_table(spec):
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    return mesh, jax.device_put(TABLE, NamedSharding(mesh, spec))


@pytest.mark.parametrize("spec", TABLE_SPECS_2D, ids=str)
@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad"])
def test_sparse_step_with_values_split_over_two_axes_matches_one_device(name, spec):
    """The sum of repeated rows scattered the values into replicated zeros, which Explicit axes
    refused beside values split over "model" ("provide output PartitionSpec for the scatter
    update")."""
    tx = OPTIMIZERS[name](0.1)

    @jax.jit
    def step(params, state, grad):
        updates, state = tx.update({"t": grad}, state, params)
        return kopt.apply_updates(params, updates), state

    def run(table, steps):
        params = {"t": table}
        state = tx.init(params)
        for grad in steps:
            params, state = step(params, state, grad)
        return params, state

    mesh, table = _explicit_2d_table(spec)
    params, state = run(table, sparse_gradients_2d(mesh))
    expected_params, expected_state = run(jnp.asarray(TABLE), sparse_gradients_2d())
    chex.assert_trees_all_close(params, expected_params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(state, expected_state, rtol=1e-6, atol=1e-6)
    assert params["t"].sharding.is_equivalent_to(table.sharding, 2)


@pytest.mark.parametrize("spec", TABLE_SPECS_2D, ids=str)
def test_facade_sparse_step_with_values_split_over_two_axes_matches_one_device(spec):
    def run(table, steps):
        opt = facade_zoo.make("Adam")
        variable = kopt.Variable(table, name="emb")
        for grad in steps:
            opt.apply_gradients([(grad, variable)])
        return opt, variable

    mesh, table = _explicit_2d_table(spec)
    opt, variable = run(table, sparse_gradients_2d(mesh))
    expected_opt, expected = run(TABLE, sparse_gradients_2d())
    np.testing.assert_allclose(variable.numpy(), expected.numpy(), rtol=1e-6)
    assert variable.value.sharding.is_equivalent_to(table.sharding, 2)
    for slot in opt.get_slot_names():
        np.testing.assert_allclose(
            opt.get_slot(variable, slot).numpy(),
            expected_opt.get_slot(expected, slot).numpy(),
            rtol=1e-6,
            atol=1e-6,
        )


@AXIS_TYPES
@pytest.mark.parametrize("per_replica", [False, True], ids=["reduced", "per-replica"])
def test_facade_gradient_split_otherwise_than_its_variable_on_its_mesh(axis_type, per_replica):
    """Over explicit axes JAX refuses arithmetic between arrays split differently: the step
    takes the gradient in its variable's split (as XLA does over automatic axes)."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type, axis_type))
    w0 = np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(4, 6)
    grad = np.linspace(0.5, 2.0, 24, dtype=np.float32).reshape(4, 6)
    var = kopt.Variable(jax.device_put(w0, NamedSharding(mesh, P("model", None))), name="w")
    if per_replica:  # two replicas' halves, the replica axis unsplit
        halves = np.stack([grad / 4, 3 * grad / 4])
        g = kopt.optimizers.PerReplica(
            jax.device_put(halves, NamedSharding(mesh, P(None, "data", "model")))
        )
    else:
        g = jax.device_put(grad, NamedSharding(mesh, P("data", "model")))
    opt = kopt.optimizers.Adam(0.1)
    for _ in range(2):
        opt.apply_gradients([(g, var)])
    m = 0.1 * grad * (1 + 0.9)
    v = 0.001 * grad**2 * (1 + 0.999)
    lr = 0.1 * np.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    expected = w0 - 0.1 * grad / (np.abs(grad) + 1e-7) - lr * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert var.value.sharding.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2)
    assert opt.compile_count == 1
