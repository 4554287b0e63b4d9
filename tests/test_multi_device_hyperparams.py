"""A state's counts and hyperparameters placed as its params are: an eager ``init`` puts them on
the params' mesh or device, and ``kopt.set_hyperparam`` outside a jitted step gives the new value
the old one's placement (mesh-replicated, one copy per device under ``pmap``, or committed to one
device), so the next step neither compiles again nor fails."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kopt

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")


def counted_step(tx, params):
    """A jitted step with a constant gradient, and the list of its traces (one per compile)."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    compiles = []

    @jax.jit
    def step(params, state):
        compiles.append(1)
        updates, state = tx.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    return step, compiles


@pytest.mark.parametrize("spec", [P(), P("data", None)], ids=["replicated", "sharded"])
def test_set_hyperparam_between_jitted_steps_on_a_mesh_does_not_recompile(spec):
    mesh = jax.make_mesh((4,), ("data",))
    tx = kopt.adam(0.1)
    params = {"w": jax.device_put(np.ones((8, 2), np.float32), NamedSharding(mesh, spec))}
    step, compiles = counted_step(tx, params)

    state = jax.jit(tx.init)(params)
    params, state = step(params, state)
    params, state = step(params, state)
    before = len(compiles)
    for lr in (0.05, 0.01):
        state = kopt.set_hyperparam(state, "learning_rate", lr)
        lr_leaf = kopt.get_hyperparam(state, "learning_rate")
        assert lr_leaf.sharding.is_equivalent_to(NamedSharding(mesh, P()), 0)
        params, state = step(params, state)
    assert len(compiles) == before
    assert float(kopt.get_hyperparam(state, "learning_rate")) == np.float32(0.01)


def test_set_hyperparam_outside_pmap_keeps_one_copy_per_device():
    tx = kopt.sgd(0.1)
    params = np.zeros((4, 3), np.float32)
    state = jax.pmap(tx.init)(params)

    def step(p, s):
        updates, s = tx.update(jnp.ones(3), s, p)
        return kopt.apply_updates(p, updates), s

    state = kopt.set_hyperparam(state, "learning_rate", 0.5)
    assert kopt.get_hyperparam(state, "learning_rate").shape == (4,)
    new, state = jax.pmap(step)(params, state)
    np.testing.assert_allclose(new, -0.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.adam(0.1),
        lambda: kopt.nadam(),
        lambda: kopt.chain(kopt.clip_by_global_norm(1.0), kopt.adamw()),
        lambda: kopt.apply_if_finite(kopt.accumulate_gradients(kopt.adam(), 2)),
        lambda: kopt.chain(kopt.sgd(0.1), kopt.ema(0.9)),
        lambda: kopt.decoupled_weight_decay(kopt.lion(), 0.1, 0.01),
    ],
    ids=["adam", "nadam", "clip+adamw", "apply_if_finite(accumulate)", "ema", "weight_decay"],
)
def test_an_eager_init_on_a_mesh_gives_a_state_the_step_compiles_once_for(make):
    """The counts and hyperparameters of an eager init sat on one device; the first step
    returned them on the mesh, so the second compiled again."""
    mesh = jax.make_mesh((4,), ("data",))
    tx = make()
    params = {"w": jax.device_put(np.ones((8, 2), np.float32), NamedSharding(mesh, P("data")))}
    step, compiles = counted_step(tx, params)

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert len(compiles) == 1


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_an_eager_adafactor_init_on_a_mesh_gives_a_state_the_step_compiles_once_for(axis_type):
    """The column statistic of a kernel split by rows is replicated: the init spelled it
    ``P(None,)``, the step over automatic axes ``P()``; and a vector's placeholder statistics
    stayed on one device while the step returned them on the mesh."""
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    tx = kopt.adafactor(0.1)
    params = {
        "kernel": jax.device_put(np.ones((8, 2), np.float32), NamedSharding(mesh, P("data"))),
        "bias": jax.device_put(np.ones(8, np.float32), NamedSharding(mesh, P("data"))),
    }
    step, compiles = counted_step(tx, params)
    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert len(compiles) == 1


@pytest.mark.parametrize("device", [1, None], ids=["on_device_1", "uncommitted"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.adam(0.1),
        lambda: kopt.chain(kopt.clip_by_global_norm(1.0), kopt.adamw()),
        lambda: kopt.apply_if_finite(kopt.accumulate_gradients(kopt.adam(), 2)),
        lambda: kopt.chain(kopt.sgd(0.1), kopt.ema(0.9)),
        lambda: kopt.flatten(kopt.sgd(0.1, momentum=0.9)),
        # optax pieces: their step counts start uncommitted beside committed slots
        lambda: kopt.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)),
        lambda: kopt.apply_if_finite(kopt.masked(optax.adam(0.1), {"w": True, "b": False})),
    ],
    ids=[
        "adam",
        "clip+adamw",
        "apply_if_finite(accumulate)",
        "ema",
        "flatten",
        "chain(optax)",
        "apply_if_finite(masked(optax))",
    ],
)
def test_an_eager_init_beside_params_on_one_device_gives_a_state_the_step_compiles_once_for(
    make, device, backend_compiles
):
    """Params committed to a device got committed slots beside uncommitted counts and
    hyperparameters; the first step returned those committed, so the second compiled again
    (without tracing again). Uncommitted params keep an uncommitted state."""
    tx = make()
    params = {"w": jnp.ones((4, 2)), "b": jnp.ones(2)}
    if device is not None:
        params = jax.device_put(params, jax.devices()[device])
    state = tx.init(params)
    committed = {leaf.committed for leaf in jax.tree.leaves(state)}
    assert committed == {device is not None}
    if device is not None:
        assert {d for leaf in jax.tree.leaves(state) for d in leaf.devices()} == {
            jax.devices()[device]
        }
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    params, state = step(params, state)
    first = len(backend_compiles)
    for _ in range(2):
        params, state = step(params, state)
    assert len(backend_compiles) == first


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)),
        lambda: kopt.accumulate_gradients(kopt.flatten(optax.adam(0.1)), 2),
        lambda: kopt.decoupled_weight_decay(optax.adam(0.1), 0.1, 0.01),
    ],
    ids=["chain", "accumulate(flatten)", "weight_decay"],
)
def test_an_eager_init_of_optax_pieces_in_kopt_combinators_on_a_mesh_compiles_once(
    make, backend_compiles
):
    """An optax piece's step count stayed uncommitted beside slots on the mesh; the first step
    returned it there, so the second compiled again (without tracing again)."""
    mesh = jax.make_mesh((4,), ("data",))
    tx = make()
    params = {"w": jax.device_put(np.ones((8, 2), np.float32), NamedSharding(mesh, P("data")))}
    step, _ = counted_step(tx, params)
    state = tx.init(params)
    params, state = step(params, state)
    first = len(backend_compiles)
    for _ in range(2):
        params, state = step(params, state)
    assert len(backend_compiles) == first


def test_set_hyperparam_keeps_a_state_on_one_device_there():
    device = jax.devices()[1]
    tx = kopt.adam(0.1)
    params = jax.device_put({"w": jnp.ones((4, 2))}, device)
    step, compiles = counted_step(tx, params)
    state = tx.init(params)
    params, state = step(params, state)
    state = kopt.set_hyperparam(state, "learning_rate", 0.05)
    lr = kopt.get_hyperparam(state, "learning_rate")
    assert lr.committed and lr.devices() == {device}
    params, state = step(params, state)
    # The step's own traces: set_hyperparam's small programs, compiled the first time they
    # run in the process, made a count of every backend compile depend on the tests before.
    assert len(compiles) == 1 and step._cache_size() == 1
    # An uncommitted state takes an uncommitted value.
    state = kopt.set_hyperparam(tx.init({"w": jnp.ones((4, 2))}), "learning_rate", 0.05)
    assert not kopt.get_hyperparam(state, "learning_rate").committed


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.optimizers.Adam(0.01, clipnorm=1.0),
        lambda: kopt.optimizers.Adam(kopt.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)),
        lambda: kopt.optimizers.LossScaleOptimizer(kopt.optimizers.SGD(0.1, momentum=0.9)),
    ],
    ids=["Adam-clipnorm", "Adam-schedule", "LossScale"],
)
def test_a_facade_step_on_a_mesh_copies_no_hyperparameter_to_it(make):
    """The hyperparameter variables and the step's scalar constants (epsilon, a clip
    threshold) stayed on the default device, and every step copied them onto the mesh."""
    mesh = jax.make_mesh((4,), ("data",))
    w = kopt.Variable(jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P("data"))))
    b = kopt.Variable(jax.device_put(np.zeros(4, np.float32), NamedSharding(mesh, P())))
    grads = [jax.device_put(jnp.full(v.shape, 0.5), v.value.sharding) for v in (w, b)]
    opt = make()
    for _ in range(2):
        opt.apply_gradients(zip(grads, [w, b], strict=True))
    with jax.transfer_guard("disallow"):
        opt.apply_gradients(zip(grads, [w, b], strict=True))
    assert int(opt.iterations.numpy()) == 3 and opt.compile_count == 1


def test_a_learning_rate_variable_of_the_users_serves_optimizers_on_two_meshes():
    """The step placed the hyperparameter variables on its mesh, the user's own too: a second
    optimizer, on other devices, sharing it then failed on incompatible devices."""
    devices = jax.devices()
    meshes = [jax.sharding.Mesh(devices[:2], ("data",)), jax.sharding.Mesh(devices[2:4], ("data",))]
    lr = kopt.Variable(0.1)
    variables = [
        kopt.Variable(jax.device_put(np.ones(8, np.float32), NamedSharding(m, P("data"))))
        for m in meshes
    ]
    optimizers = [kopt.optimizers.SGD(lr), kopt.optimizers.SGD(lr)]
    for _ in range(2):
        for opt, var in zip(optimizers, variables, strict=True):
            opt.apply_gradients([(jnp.ones(8), var)])
    for opt, var in zip(optimizers, variables, strict=True):
        np.testing.assert_allclose(var.numpy(), 0.8, rtol=1e-6)
        assert opt.compile_count == 1
