"""Cross-replica gradient aggregation: ``kopt.aggregate_gradients`` inside ``jax.shard_map`` on 4
simulated CPU devices, and the facade's per-replica path (``PerReplica``, ``gradient_aggregator``).

Each replicated step is checked against the single-device step on the full batch, whose gradient
is itself checked against NumPy.
"""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kopt
from kopt.optimizers import SGD, Adam, PerReplica

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")

RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, 3)).astype(np.float32)
Y = RNG.normal(size=(16,)).astype(np.float32)
PARAMS = {"w": np.array([0.5, -0.25, 1.0], np.float32), "b": np.array(0.1, np.float32)}


def loss_sum(params, x, y):
    return jnp.sum((x @ params["w"] + params["b"] - y) ** 2)


def loss_mean(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def numpy_gradient(params, x, y, reduction):
    """d/dparams of sum (or mean) of (x w + b - y)^2."""
    residual = x @ params["w"] + params["b"] - y
    scale = 1.0 if reduction == "sum" else 1.0 / len(y)
    return {"w": scale * 2 * x.T @ residual, "b": np.asarray(scale * 2 * residual.sum())}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("check_vma", [True, False], ids=["pcast", "no_check_vma"])
def test_shard_map_aggregation_equals_full_batch_step(reduction, check_vma):
    loss = loss_sum if reduction == "sum" else loss_mean
    full_grads = jax.grad(loss)(PARAMS, X, Y)
    chex.assert_trees_all_close(full_grads, numpy_gradient(PARAMS, X, Y, reduction), rtol=1e-5)

    tx = kopt.adam(0.05)
    expected_params, expected_state = PARAMS, tx.init(PARAMS)
    for _ in range(3):
        grads = jax.grad(loss)(expected_params, X, Y)
        updates, expected_state = tx.update(grads, expected_state, expected_params)
        expected_params = kopt.apply_updates(expected_params, updates)

    replicated_tx = kopt.chain(kopt.aggregate_gradients("data", reduction), kopt.adam(0.05))
    mesh = jax.make_mesh((4,), ("data",))

    @jax.jit
    @partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P()),
        check_vma=check_vma,
    )
    def step(params, state, x, y):
        # This replica's gradient on its quarter of the batch. Under check_vma, autodiff would
        # already sum the gradient of a replicated param; pcast makes it per-replica.
        local = jax.lax.pcast(params, "data", to="varying") if check_vma else params
        grads = jax.grad(loss)(local, x, y)
        updates, state = replicated_tx.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    batch_sharding = NamedSharding(mesh, P("data"))
    x, y = jax.device_put(X, batch_sharding), jax.device_put(Y, batch_sharding)
    params, state = PARAMS, replicated_tx.init(PARAMS)
    for _ in range(3):
        params, state = step(params, state, x, y)
    chex.assert_trees_all_close(params, expected_params, rtol=1e-5, atol=1e-6)


def test_facade_per_replica_sums_before_clipping():
    per_replica = np.array([[3.0, 0.0], [0.0, 4.0], [3.0, 4.0]], np.float32)
    var = kopt.Variable([1.0, 1.0])
    opt = SGD(learning_rate=0.5, clipnorm=5.0)
    opt.apply_gradients([(PerReplica(jnp.asarray(per_replica)), var)])

    total = per_replica.sum(axis=0)  # [6, 8], norm 10
    clipped_after_sum = total * 5.0 / max(np.linalg.norm(total), 5.0)
    np.testing.assert_allclose(var.numpy(), 1.0 - 0.5 * clipped_after_sum, rtol=1e-6)
    clipped_before_sum = sum(g * 5.0 / max(np.linalg.norm(g), 5.0) for g in per_replica)
    assert not np.allclose(var.numpy(), 1.0 - 0.5 * clipped_before_sum)


def test_facade_per_replica_matches_full_batch_adam():
    """Per-replica gradients of a summed loss, summed by the default aggregator, equal the
    full-batch gradient: the facade step equals the single-device full-batch functional step."""
    per_replica = {
        name: np.stack([numpy_gradient(PARAMS, X[i::4], Y[i::4], "sum")[name] for i in range(4)])
        for name in PARAMS
    }
    variables = {name: kopt.Variable(value, name=name) for name, value in PARAMS.items()}
    opt = Adam(learning_rate=0.05)
    opt.apply_gradients(
        [(PerReplica(jnp.asarray(per_replica[name])), variables[name]) for name in PARAMS]
    )

    tx = kopt.adam(0.05)
    grads = numpy_gradient(PARAMS, X, Y, "sum")
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    expected = kopt.apply_updates(PARAMS, updates)
    for name in PARAMS:
        np.testing.assert_allclose(variables[name].numpy(), expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["one device", "mesh"])
def test_facade_per_replica_gradients_from_pmap_leave_the_variable_where_it_is(placement):
    """``pmap`` returns its values on a mesh of its own: the step ran there, moving a
    single-device variable onto that mesh (and tracing again), and failed for a variable on a
    mesh of the user's."""
    per_replica = np.arange(8, dtype=np.float32).reshape(4, 2)
    from_pmap = jax.pmap(lambda g: g)(per_replica)
    value = np.zeros(2, np.float32)
    if placement == "mesh":
        value = jax.device_put(value, NamedSharding(jax.make_mesh((4,), ("data",)), P()))
    var = kopt.Variable(value)
    sharding = var.value.sharding
    opt = SGD(learning_rate=0.5)
    for _ in range(2):
        opt.apply_gradients([(PerReplica(from_pmap), var)])
    np.testing.assert_allclose(var.numpy(), -per_replica.sum(axis=0))
    assert var.value.sharding == sharding
    assert opt.compile_count == 1


def test_facade_per_replica_gradients_from_pmap_for_a_plain_variable_compile_once(
    backend_compiles,
):
    """The values were moved onto the uncommitted variable's device, committed: the first step
    returned the variable, its slots and ``iterations`` committed there, and the second
    compiled again (without tracing again)."""
    per_replica = np.arange(8, dtype=np.float32).reshape(4, 2)
    from_pmap = jax.pmap(lambda g: g)(per_replica)
    var = kopt.Variable(np.zeros(2, np.float32))
    device = var.value.devices()
    opt = SGD(learning_rate=0.5, momentum=0.5)
    opt.apply_gradients([(PerReplica(from_pmap), var)])
    first = len(backend_compiles)
    for _ in range(2):
        opt.apply_gradients([(PerReplica(from_pmap), var)])
    assert len(backend_compiles) == first
    # momentum 0.5 against a constant gradient g: the velocity is -0.5 g, -0.75 g, -0.875 g
    np.testing.assert_allclose(var.numpy(), -2.125 * per_replica.sum(axis=0))
    assert var.value.devices() == device


def test_custom_gradient_aggregator_averages_and_is_skipped_when_told():
    calls = []

    def average_replicas(grads_and_vars):
        calls.append(len(grads_and_vars))
        return [
            (jnp.mean(g.values, axis=0) if isinstance(g, PerReplica) else g, v)
            for g, v in grads_and_vars
        ]

    per_replica = np.array([[1.0, 2.0], [3.0, 6.0]], np.float32)
    var = kopt.Variable([0.0, 0.0])
    opt = SGD(learning_rate=1.0, gradient_aggregator=average_replicas)
    opt.apply_gradients([(PerReplica(jnp.asarray(per_replica)), var)])
    np.testing.assert_allclose(var.numpy(), -per_replica.mean(axis=0))
    assert calls == [1]  # traced once into the compiled step

    # experimental_aggregate_gradients=False: the caller aggregated already (e.g. with
    # jax.lax.pmean in its own pmap); the aggregator is skipped and the gradient applied as is.
    averaged = per_replica.mean(axis=0)
    opt.apply_gradients([(jnp.asarray(averaged), var)], experimental_aggregate_gradients=False)
    np.testing.assert_allclose(var.numpy(), -2 * averaged)
    assert calls == [1]  # not called, not even traced into the second program

    before = var.numpy().copy()
    # It said "still per-replica after aggregation; reduce it in your gradient_aggregator",
    # although no aggregation ran.
    with pytest.raises(
        ValueError, match="per-replica, but experimental_aggregate_gradients=False skips the"
    ):
        opt.apply_gradients(
            [(PerReplica(jnp.asarray(per_replica)), var)], experimental_aggregate_gradients=False
        )
    np.testing.assert_array_equal(var.numpy(), before)
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize(
    "wrap, nan_step",
    [
        (lambda tx: kopt.apply_if_finite(tx, max_consecutive_errors=2), 1),
        (lambda tx: kopt.accumulate_gradients(tx, every_k=2), None),
    ],
    ids=["apply_if_finite", "accumulate_gradients"],
)
def test_wrappers_with_a_skipping_branch_run_on_per_device_shards_in_shard_map(wrap, nan_step):
    """A param sharded over the mesh axis is updated shard by shard inside ``shard_map``: the
    inner update varies per device, and the wrapper's skipping branch must return zeros of the
    same (varying) type. Each device's shard ends as the unsharded run on that shard alone."""
    rng = np.random.default_rng(1)
    params = rng.normal(size=(8, 3)).astype(np.float32)
    grads = [rng.normal(size=(8, 3)).astype(np.float32) for _ in range(4)]
    if nan_step is not None:
        grads[nan_step][5, 2] = np.nan  # on the third device's shard only
    tx = wrap(kopt.adam(0.1))

    def train(params, grads):
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, params)
            params = kopt.apply_updates(params, updates)
        return params

    mesh = jax.make_mesh((4,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    sharded = jax.jit(jax.shard_map(train, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    got = np.asarray(
        sharded(jax.device_put(params, sharding), [jax.device_put(g, sharding) for g in grads])
    )

    # The references run jitted: eagerly, each step's lax.cond compiled a program of its own.
    alone = jax.jit(train)
    expected = np.concatenate(
        [alone(params[rows], [g[rows] for g in grads]) for rows in np.split(np.arange(8), 4)]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(got))
    if nan_step is not None:  # the skipped step moved the NaN device's shard less than the others
        unskipped = alone(params, [np.nan_to_num(g, nan=0.0) for g in grads])
        assert not np.allclose(got[4:6], unskipped[4:6]) and np.allclose(got[:4], unskipped[:4])


@pytest.mark.parametrize("how", ["shard_map", "shard_map_no_check_vma", "pmap"])
def test_apply_if_finite_around_aggregation_skips_on_every_replica_together(how):
    """With ``apply_if_finite`` outside the aggregation, one replica's NaN gradient used to make
    that replica skip the branch holding the ``psum`` while the others waited in it (a hang,
    or an abort after XLA's rendezvous timeout). The decision is now shared: all skip."""
    tx = kopt.apply_if_finite(
        kopt.chain(kopt.aggregate_gradients("data", "mean"), kopt.sgd(0.1)), 2
    )
    params = jnp.zeros(3)
    grads = np.ones((4, 3), np.float32)
    grads[2, 0] = np.nan  # one replica's gradient only

    def step(g):
        state = tx.init(params)
        updates, state = tx.update(g[0] if how != "pmap" else g, state, params)
        counters = jnp.stack([state.notfinite_count, state.total_notfinite])
        return kopt.apply_updates(params, updates)[None], counters[None]

    mesh = jax.make_mesh((4,), ("data",))

    def run(grads):
        if how == "pmap":
            return jax.pmap(step, axis_name="data")(grads)
        return jax.jit(
            jax.shard_map(
                step,
                mesh=mesh,
                in_specs=P("data"),
                out_specs=(P("data"), P("data")),
                check_vma=how == "shard_map",
            )
        )(jax.device_put(grads, NamedSharding(mesh, P("data"))))

    new, counters = run(grads)
    np.testing.assert_array_equal(np.asarray(new).reshape(4, 3), 0.0)  # skipped everywhere
    np.testing.assert_array_equal(np.asarray(counters).reshape(4, 2), 1)

    # A finite step on every replica still runs the aggregated update.
    new, _ = run(np.ones((4, 3), np.float32))
    np.testing.assert_allclose(np.asarray(new).reshape(4, 3), -0.1)


def test_apply_if_finite_without_collectives_decides_per_replica():
    """Independent replicas (an ensemble, no aggregation) keep deciding on their own."""
    tx = kopt.apply_if_finite(kopt.sgd(0.1), 2)
    grads = np.ones((4, 3), np.float32)
    grads[2, 0] = np.nan

    def step(g):
        updates, _ = tx.update(g, tx.init(jnp.zeros(3)), jnp.zeros(3))
        return updates

    out = np.asarray(jax.pmap(step, axis_name="data")(grads))
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_allclose(out[[0, 1, 3]], -0.1)


def _ragged_all_to_all_of_nothing(u):
    sizes = jnp.zeros(4, jnp.int32)
    return jax.lax.ragged_all_to_all(u, jnp.zeros_like(u), *[sizes] * 4, axis_name="data")


@pytest.mark.parametrize(
    "exchange, joint",
    [(_ragged_all_to_all_of_nothing, True), (lambda u: u * jax.lax.axis_index("data"), False)],
    ids=["ragged_all_to_all", "axis_index"],
)
def test_apply_if_finite_decides_jointly_around_any_collective(exchange, joint):
    """Collectives were found by a list of names, which missed ``ragged_all_to_all`` (and
    ``pbroadcast``, ``psend``...): one replica's NaN left it out of an exchange the others
    waited in. Any primitive naming an axis now counts, except those that exchange nothing,
    such as ``axis_index`` and the ``pvary`` casts ``shard_map`` inserts."""
    piece = kopt.GradientTransformation(lambda params: (), lambda u, s, p=None: (exchange(u), s))
    tx = kopt.apply_if_finite(kopt.chain(piece, kopt.sgd(0.1)), 2)
    grads = np.ones((4, 3), np.float32)
    grads[2, 0] = np.nan  # one replica's gradient only

    def skipped(g):
        return tx.update(g[0], tx.init(jnp.zeros(3)), jnp.zeros(3))[1].total_notfinite[None]

    mesh = jax.make_mesh((4,), ("data",))
    run = jax.jit(jax.shard_map(skipped, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    counts = run(jax.device_put(grads, NamedSharding(mesh, P("data"))))
    np.testing.assert_array_equal(counts, [1, 1, 1, 1] if joint else [0, 0, 1, 0])


def test_apply_if_finite_around_an_update_with_its_own_shard_map():
    """A shard_map inside the wrapped update binds its own axis: its psum is not an exchange
    between the callers' replicas, and a pmin over that axis outside it was an unbound-axis
    error."""
    mesh = jax.make_mesh((4,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))

    def sharded_norm_clip():
        def update(updates, state, params=None):
            sq = jax.shard_map(
                lambda x: jax.lax.psum(jnp.sum(x * x), "i"),
                mesh=mesh,
                in_specs=P("i"),
                out_specs=P(),
            )(updates)
            return updates / jnp.maximum(1.0, jnp.sqrt(sq)), state

        return kopt.GradientTransformation(lambda params: (), update)

    tx = kopt.apply_if_finite(kopt.chain(sharded_norm_clip(), kopt.sgd(0.1)), 3)
    params = jax.device_put(jnp.ones(8), NamedSharding(mesh, P("i")))
    updates, _ = jax.jit(tx.update)(jnp.full(8, 2.0), tx.init(params), params)
    np.testing.assert_allclose(updates, -0.1 * 2.0 / np.sqrt(32.0), rtol=1e-6)
