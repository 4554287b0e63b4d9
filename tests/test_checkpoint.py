"""kopt.checkpoint: a run checkpointed half-way and resumed in a new process continues
bit-identically to the uninterrupted run, for the functional API and the facade (sharded params
on 4 simulated devices, slots, scalar slots, accumulators, EMA and loss scale included)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from checkpoint_worker import (
    FACADE,
    FUNCTIONAL,
    SAVED_AT,
    STEPS,
    facade_run,
    facade_values,
    facade_variables,
    functional_run,
    initial_params,
)
from facade_zoo import Lookahead, NormTracker
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kopt
from kopt import optimizers
from kopt.checkpoint import restore_optimizer, restore_state, save_optimizer, save_state

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
WORKER = Path(__file__).resolve().parent / "checkpoint_worker.py"


def test_resumed_in_a_new_process_continues_bit_identically(tmp_path):
    params = initial_params()
    uninterrupted = functional_run(params, FUNCTIONAL.init(params), 0, STEPS)
    half = functional_run(params, FUNCTIONAL.init(params), 0, SAVED_AT)
    save_state(tmp_path / "functional", {"params": half[0], "state": half[1]})

    expected = {}
    for case, make in FACADE.items():
        variables = facade_variables()
        opt = make()
        facade_run(opt, variables, 0, STEPS)
        expected[case] = facade_values(opt, variables)
        variables = facade_variables()
        opt = make()
        facade_run(opt, variables, 0, SAVED_AT)
        save_optimizer(tmp_path / case, opt, variables)

    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    assert result.returncode == 0, result.stderr[-4000:]

    resumed = np.load(tmp_path / "functional.npz")
    leaves = jax.tree.leaves(uninterrupted)
    assert len(resumed.files) == len(leaves)
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(resumed[f"arr_{i}"], np.asarray(leaf), err_msg=f"leaf {i}")
    for case in FACADE:
        resumed = np.load(tmp_path / f"{case}.npz")
        assert sorted(resumed.files) == sorted(expected[case]), case
        for name, value in expected[case].items():
            np.testing.assert_array_equal(resumed[name], value, err_msg=f"{case}: {name}")


def test_restore_state_keeps_structure_and_sharding(tmp_path):
    params = initial_params()
    tx = kopt.chain(kopt.masked(kopt.adam(0.1), {"kernel": True, "bias": False}), kopt.ema(0.9))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)
    save_state(tmp_path / "s", state)
    restored = restore_state(tmp_path / "s", tx.init(params))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_state(tmp_path / "s", state)
    save_state(tmp_path / "s", state, overwrite=True)
    with pytest.raises(FileNotFoundError):
        restore_state(tmp_path / "missing", state)


@pytest.mark.parametrize(
    "like, culprit",
    [
        (
            lambda: kopt.sgd(0.1, momentum=0.9).init({"w": jnp.ones((4, 3))}),
            r"leaf \.slots\['momentum'\]\['w'\] has shape \(2, 3\) in the checkpoint .*, but "
            r"shape \(4, 3\) in `like_state`",
        ),
        (
            lambda: kopt.adam(0.1).init({"w": jnp.ones((2, 3))}),
            r"`like_state` does not have the structure of the state saved at .*: saved but not "
            r"in `like_state`: \['count'\]",
        ),
        (
            lambda: kopt.sgd(0.1, momentum=0.9).init({"u": jnp.ones((2, 3))}),
            r"`like_state` does not have the structure of the state saved at .*: saved but not "
            r"in `like_state`: .*\['w'\]; in `like_state` but not saved: .*\['u'\]",
        ),
    ],
    ids=["other-shapes", "other-structure", "renamed-param"],
)
def test_restore_state_into_a_state_unlike_the_saved_one_names_it(tmp_path, like, culprit):
    """A like_state for params of other shapes got the saved slots of the old shapes back with
    no error; one of another structure got orbax's advice to pass `partial_restore=True`, an
    argument restore_state does not have; one for a renamed param (of uncommitted arrays, read
    into NumPy targets) got NumPy's "truth value of an array ... is ambiguous" from orbax's
    diff of the trees."""
    params = {"w": jnp.ones((2, 3))}
    tx = kopt.sgd(0.1, momentum=0.9)
    _, state = tx.update({"w": jnp.arange(6.0).reshape(2, 3)}, tx.init(params), params)
    save_state(tmp_path / "s", state)
    like_state = like()
    before = jax.tree.map(jnp.copy, like_state)
    with pytest.raises(ValueError, match=r"^restore_state: " + culprit):
        restore_state(tmp_path / "s", like_state)
    chex.assert_trees_all_equal(like_state, before)
    restored = restore_state(tmp_path / "s", tx.init(params))
    chex.assert_trees_all_equal(restored, state)


def test_a_zero_size_leaf_is_saved_and_restored(tmp_path):
    """orbax refuses to save an array of zero size ("Cannot save arrays with zero size"), so a
    state for a param of shape (0, 4) could not be saved; it is made again from the like
    state's shape, dtype and sharding."""
    device = jax.devices()[1]
    params = {"w": jnp.ones(3), "empty": jnp.zeros((0, 4)), "pinned": jnp.zeros((2, 0))}
    params["pinned"] = jax.device_put(params["pinned"], device)
    tx = kopt.adam(0.1)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    save_state(tmp_path / "s", {"params": params, "state": state})
    restored = restore_state(tmp_path / "s", {"params": params, "state": tx.init(params)})
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, {"params": params, "state": state})
    np.testing.assert_allclose(kopt.get_slot(restored["state"], "m")["w"], 0.1, rtol=1e-6)
    pinned = kopt.get_slot(restored["state"], "m")["pinned"]
    assert pinned.committed and pinned.devices() == {device}


def test_save_optimizer_saves_and_restores_a_zero_size_variable(tmp_path):
    def variables(value):
        return [
            kopt.Variable(np.full(3, value, np.float32), name="w"),
            kopt.Variable(np.zeros((0, 4), np.float32), name="empty"),
        ]

    w, empty = variables(1.0)
    opt = optimizers.Adam(0.1)
    opt.apply_gradients([(jnp.ones(3), w), (jnp.zeros((0, 4)), empty)])
    save_optimizer(tmp_path / "opt", opt, [w, empty])
    w, empty = variables(0.0)
    restored = restore_optimizer(tmp_path / "opt", [w, empty])
    np.testing.assert_allclose(w.numpy(), 0.9, rtol=1e-6)
    np.testing.assert_allclose(restored.get_slot(w, "m").numpy(), 0.1, rtol=1e-6)
    assert restored.get_slot(empty, "m").shape == (0, 4) and empty.shape == (0, 4)
    assert int(restored.iterations.numpy()) == 1


def test_python_numbers_in_the_tree_restore_as_numbers(tmp_path):
    """A flax ``TrainState``'s ``step`` is the Python int 0 and a param may be a Python float:
    saving worked, but restoring into such a tree raised an AttributeError (no ``.shape``)."""
    params = {"w": jnp.ones(2), "scale": 1.0}
    tx = kopt.adam(0.1)
    grads = {"w": jnp.ones(2), "scale": 0.5}
    _, state = tx.update(grads, tx.init(params), params)
    save_state(tmp_path / "s", {"params": params, "opt_state": state, "step": 3, "done": True})
    like = {"params": params, "opt_state": tx.init(params), "step": 0, "done": False}
    restored = restore_state(tmp_path / "s", like)
    assert restored["step"] == 3 and type(restored["step"]) is int
    assert restored["done"] is True
    assert restored["params"]["scale"] == 1.0
    np.testing.assert_allclose(kopt.get_slot(restored["opt_state"], "m")["scale"], 0.05, rtol=1e-6)


def test_uncommitted_leaves_are_read_to_the_host_not_onto_a_device_first(tmp_path, monkeypatch):
    """A state of uncommitted arrays (the usual single-device run) is restored through host
    memory straight to uncommitted arrays: orbax restoring it onto a device first held it
    there twice while each leaf was copied out. Committed leaves are restored in place."""
    import orbax.checkpoint as ocp

    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = kopt.adam(0.1)
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    save_state(
        tmp_path / "s", {"state": state, "pinned": jax.device_put(jnp.ones(2), jax.devices()[0])}
    )
    returned = []
    restore = ocp.StandardCheckpointer.restore

    def spy(self, *args, **kwargs):
        out = restore(self, *args, **kwargs)
        returned.append(out)
        return out

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", spy)
    like = {"state": tx.init(params), "pinned": jax.device_put(jnp.zeros(2), jax.devices()[0])}
    restored = restore_state(tmp_path / "s", like)
    (raw,) = returned
    assert all(type(x) is np.ndarray for x in jax.tree.leaves(raw["state"]))
    assert isinstance(raw["pinned"], jax.Array)
    for a, b in zip(jax.tree.leaves(restored["state"]), jax.tree.leaves(state), strict=True):
        assert isinstance(a, jax.Array) and not a.committed and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored["pinned"].committed and restored["pinned"].devices() == {jax.devices()[0]}


def test_save_optimizer_writes_keyed_config_and_checks_on_restore(tmp_path):
    a = kopt.Variable(jnp.ones(3), name="a")
    b = kopt.Variable(jnp.ones(2), name="b")
    opt = optimizers.Adam(0.1)
    opt.apply_gradients([(jnp.ones(3), a), (jnp.ones(2), b)])
    save_optimizer(tmp_path / "c", opt, [a, b])
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["optimizer"]["class_name"] == "Adam"
    assert config["variables"] == ["a:0", "b:0"]
    assert config["layout"]["slots"] == {"a:0": ["m", "v"], "b:0": ["m", "v"]}
    # written whole under another name, then renamed (every process writes it)
    assert not [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]

    other = kopt.Variable(jnp.ones(3), name="other")
    with pytest.raises(ValueError, match="variables"):
        restore_optimizer(tmp_path / "c", [a, other])
    with pytest.raises(ValueError, match="named 'a:0'"):
        save_optimizer(tmp_path / "d", opt, [a, kopt.Variable(1.0, name="a")])
    with pytest.raises(TypeError, match="JSON"):
        save_optimizer(tmp_path / "e", optimizers.SGD(lambda step: 0.1), [a])
    # restored for variables given in another order, without touching their values
    a.assign(jnp.zeros(3))
    restored = restore_optimizer(tmp_path / "c", [b, a], restore_variables=False)
    np.testing.assert_array_equal(a.numpy(), np.zeros(3))
    np.testing.assert_array_equal(restored.get_slot(b, "m").numpy(), opt.get_slot(b, "m").numpy())
    assert int(restored.iterations.numpy()) == 1


def test_a_schedule_made_from_numpy_values_is_saved_and_restored(tmp_path):
    # Boundaries computed with NumPy (steps per epoch times epochs) and a float32 rate.
    schedule = optimizers.schedules.PiecewiseConstantDecay(
        np.array([1, 2]) * np.int64(2), [np.float32(0.5), 0.25, 0.125]
    )
    var = kopt.Variable(jnp.zeros(2), name="w")
    opt = optimizers.SGD(schedule, momentum=np.float32(0.5))
    opt.apply_gradients([(jnp.ones(2), var)])
    save_optimizer(tmp_path / "c", opt, [var])
    restored = restore_optimizer(tmp_path / "c", [var])
    config = restored.get_config()["learning_rate"]["config"]
    assert config == {"boundaries": [2, 4], "values": [0.5, 0.25, 0.125], "name": None}
    for _ in range(4):
        restored.apply_gradients([(jnp.ones(2), var)])
    # tf.keras's legacy SGD(PiecewiseConstantDecay([2, 4], [0.5, 0.25, 0.125]), momentum=0.5)
    # after five unit gradients (rates 0.5, 0.5, 0.5, 0.25, 0.25)
    np.testing.assert_allclose(var.numpy(), [-3.40625] * 2, rtol=1e-6)


def test_restore_names_a_variable_of_another_shape_and_changes_nothing(tmp_path):
    a = kopt.Variable(jnp.ones(3), name="w")
    opt = optimizers.Adam(0.1)
    opt.apply_gradients([(jnp.ones(3), a)])
    save_optimizer(tmp_path / "c", opt, [a])
    other = kopt.Variable(jnp.full(2, 5.0), name="w")
    with pytest.raises(ValueError, match=r"variable 'w:0' has shape \(2,\).* shape \(3,\)"):
        restore_optimizer(tmp_path / "c", [other])
    np.testing.assert_array_equal(other.numpy(), [5.0, 5.0])


@pytest.mark.parametrize("custom_objects", [3, ["Adam"], "Adam"], ids=["int", "list", "str"])
def test_restore_names_custom_objects_that_are_not_a_dict(tmp_path, custom_objects):
    """An int failed with "'int' object is not iterable", a list or a str with dict()'s
    "dictionary update sequence element #0 ...", naming no argument."""
    var = kopt.Variable(jnp.ones(3), name="w")
    opt = optimizers.Adam(0.1)
    opt.apply_gradients([(jnp.ones(3), var)])
    save_optimizer(tmp_path / "c", opt, [var])
    var.assign(jnp.full(3, 5.0))
    with pytest.raises(
        TypeError,
        match=r"^restore_optimizer: `custom_objects` must be a dict .*, received "
        + type(custom_objects).__name__,
    ):
        restore_optimizer(tmp_path / "c", [var], custom_objects=custom_objects)
    np.testing.assert_array_equal(var.numpy(), [5.0] * 3)


def test_an_accumulating_optimizer_saved_with_its_variables_in_any_order_restores(tmp_path):
    """Gradient accumulators are kept in training order; saving with the variables in another
    order stores them in training order, so the restored optimizer continues exactly."""

    def fresh():
        return [kopt.Variable([1.0, 2.0, 3.0], name="kernel"), kopt.Variable([0.5], name="bias")]

    grads = [[jnp.full(3, 0.1 * i), jnp.full(1, -0.2 * i)] for i in range(1, 6)]
    variables = fresh()
    opt = optimizers.Lion(0.1, gradient_accumulation_steps=2)
    for g in grads[:3]:
        opt.apply_gradients(zip(g, variables, strict=True))
    save_optimizer(tmp_path / "c", opt, [variables[1], variables[0]])
    resumed_variables = fresh()
    resumed = restore_optimizer(tmp_path / "c", resumed_variables)
    for g in grads[3:]:
        opt.apply_gradients(zip(g, variables, strict=True))
        resumed.apply_gradients(zip(g, resumed_variables, strict=True))
    for v, r in zip(variables, resumed_variables, strict=True):
        np.testing.assert_array_equal(r.numpy(), v.numpy())
    with pytest.raises(ValueError, match="must be exactly those"):
        save_optimizer(tmp_path / "d", opt, [variables[0]])


@pytest.mark.parametrize(
    "make, momentum",
    [
        (lambda: optimizers.SGD(0.1), 0.5),  # momentum assigned to an SGD made without it
        (lambda: optimizers.SGD(0.1, momentum=0.9, nesterov=True), 0.0),
        (lambda: optimizers.RMSprop(0.01), 0.5),
        (lambda: optimizers.LossScaleOptimizer(optimizers.RMSprop(0.01, momentum=0.5)), 0.0),
    ],
    ids=["sgd-on", "sgd-off", "rmsprop-on", "loss-scale-rmsprop-off"],
)
def test_momentum_assigned_after_construction_restores(tmp_path, make, momentum):
    """As in tf.keras, whether momentum is on is fixed when the optimizer is made; assigning
    `momentum` later changes its value only, and `get_config` shows the new value. The
    checkpoint keeps the choice, so the restored optimizer has the same slots and continues
    exactly (rebuilt from the config alone, it would have had them or not by the new value)."""

    def fresh():
        return [kopt.Variable([1.0, -2.0, 3.0], name="w")]

    grads = [[jnp.asarray([0.5, -0.25, 1.0]) * i] for i in range(1, 6)]
    variables = fresh()
    opt = make()
    opt.apply_gradients(zip(grads[0], variables, strict=True))
    opt.momentum = momentum
    opt.apply_gradients(zip(grads[1], variables, strict=True))
    assert opt.get_config().get("momentum", momentum) == momentum
    slots = opt.get_slot_names()
    save_optimizer(tmp_path / "c", opt, variables)
    resumed_variables = fresh()
    resumed = restore_optimizer(tmp_path / "c", resumed_variables)
    assert resumed.get_slot_names() == slots
    for g in grads[2:]:
        opt.apply_gradients(zip(g, variables, strict=True))
        resumed.apply_gradients(zip(g, resumed_variables, strict=True))
    np.testing.assert_array_equal(resumed_variables[0].numpy(), variables[0].numpy())
    assert int(resumed.iterations.numpy()) == int(opt.iterations.numpy()) == 5


def test_a_custom_optimizers_add_weight_state_is_saved_and_restored(tmp_path):
    grads = [jnp.full(2, float(i)) for i in range(1, 6)]
    var = kopt.Variable(jnp.ones(2), name="w")
    opt = NormTracker()
    for g in grads[:2]:
        opt.apply_gradients([(g, var)])
    save_optimizer(tmp_path / "c", opt, [var])
    resumed_var = kopt.Variable(jnp.zeros(2), name="w")
    resumed = restore_optimizer(
        tmp_path / "c", [resumed_var], custom_objects={"NormTracker": NormTracker}
    )
    assert float(resumed.norm_ema.numpy()) == float(opt.norm_ema.numpy()) != 0.0
    for g in grads[2:]:
        opt.apply_gradients([(g, var)])
        resumed.apply_gradients([(g, resumed_var)])
    np.testing.assert_array_equal(resumed_var.numpy(), var.numpy())


class _Split(optimizers.Optimizer):
    """Adam for matrices and momentum SGD for vectors, held in a dict; Adam keeps its own
    step count, which the wrapper moves."""

    def __init__(self, name="Split"):
        super().__init__(name)
        self.inner = {"mat": optimizers.Adam(0.05), "vec": optimizers.SGD(0.05, momentum=0.9)}

    def _pick(self, var):
        return self.inner["mat" if var.ndim > 1 else "vec"]

    def _create_slots(self, var_list):
        for var in var_list:
            self._pick(var)._create_slots([var])

    def _resource_apply_dense(self, grad, var, apply_state=None):
        self._pick(var)._resource_apply_dense(grad, var)
        if var.ndim > 1:
            self.inner["mat"].iterations.assign_add(1)


@pytest.mark.parametrize("make", [lambda: Lookahead(optimizers.Adam(0.05)), _Split])
def test_the_state_of_an_optimizer_held_by_another_is_saved_and_restored(tmp_path, make):
    """A wrapper's step updates the slots (and step count) of the optimizers it holds, but
    the checkpoint stored only the wrapper's own: a resumed Lookahead went on with its inner
    Adam's moments at zero, silently."""

    def fresh():
        return [
            kopt.Variable(np.ones((2, 2), np.float32), name="w"),
            kopt.Variable(np.zeros(2, np.float32), name="b"),
        ]

    rng = np.random.default_rng(0)
    grads = [
        [jnp.asarray(rng.normal(size=v.shape), jnp.float32) for v in fresh()] for _ in range(7)
    ]
    variables, opt = fresh(), make()
    for g in grads[:4]:
        opt.apply_gradients(zip(g, variables, strict=True))
    save_optimizer(tmp_path / "c", opt, variables)
    custom = {"Lookahead": Lookahead, "_Split": _Split}
    resumed_variables = fresh()
    resumed = restore_optimizer(tmp_path / "c", resumed_variables, custom_objects=custom)
    inner = opt._optimizer if isinstance(opt, Lookahead) else opt.inner["mat"]
    resumed_inner = resumed._optimizer if isinstance(resumed, Lookahead) else resumed.inner["mat"]
    np.testing.assert_array_equal(
        resumed_inner.get_slot(resumed_variables[0], "m").numpy(),
        inner.get_slot(variables[0], "m").numpy(),
    )
    if isinstance(opt, _Split):  # (a Lookahead's inner count is its own, from its first step)
        assert int(resumed_inner.iterations.numpy()) == int(inner.iterations.numpy()) == 4
    for g in grads[4:]:
        opt.apply_gradients(zip(g, variables, strict=True))
        resumed.apply_gradients(zip(g, resumed_variables, strict=True))
    for a, b in zip(resumed_variables, variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def mean_over_replicas(pairs):
    return [
        (jnp.mean(g.values, axis=0), v) if isinstance(g, optimizers.PerReplica) else (g, v)
        for g, v in pairs
    ]


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "loss_scale"])
def test_gradient_hooks_must_be_passed_back_to_restore(tmp_path, wrap):
    """A checkpoint stores no functions. Restoring without the saved optimizer's own
    gradient_aggregator went on summing replicas where it had averaged them, silently."""
    var = kopt.Variable([0.0], name="w")
    opt = optimizers.SGD(0.1, gradient_aggregator=mean_over_replicas)
    if wrap:
        opt = optimizers.LossScaleOptimizer(opt, dynamic=False, initial_scale=1.0)
    grads = optimizers.PerReplica(jnp.ones((8, 1)))
    opt.apply_gradients([(grads, var)])
    save_optimizer(tmp_path / "ckpt", opt, [var])
    var.assign([5.0])

    with pytest.raises(ValueError, match="gradient_aggregator=") as info:
        restore_optimizer(tmp_path / "ckpt", [var])
    assert "gradient_transformers" not in str(info.value)
    assert float(var.numpy()[0]) == 5.0  # nothing changed

    restored = restore_optimizer(tmp_path / "ckpt", [var], gradient_aggregator=mean_over_replicas)
    restored.apply_gradients([(grads, var)])
    np.testing.assert_allclose(var.numpy(), [-0.2], rtol=1e-6)  # averaged: -0.1 twice


def test_gradient_transformers_are_named_when_missing(tmp_path):
    var = kopt.Variable([0.0], name="w")
    double = lambda pairs: [(2 * g, v) for g, v in pairs]  # noqa: E731
    opt = optimizers.SGD(0.1, gradient_transformers=[double])
    opt.apply_gradients([(jnp.ones(1), var)])
    save_optimizer(tmp_path / "ckpt", opt, [var])
    with pytest.raises(ValueError, match="gradient_transformers"):
        restore_optimizer(tmp_path / "ckpt", [var])
    restored = restore_optimizer(tmp_path / "ckpt", [var], gradient_transformers=[double])
    restored.apply_gradients([(jnp.ones(1), var)])
    np.testing.assert_allclose(var.numpy(), [-0.4], rtol=1e-6)


def test_restore_state_into_an_eval_shape_over_an_explicit_mesh(tmp_path):
    """``jax.eval_shape`` of an init over a mesh with explicit axes gives shardings on an
    abstract mesh, which orbax cannot place (it failed with ``_device_assignment is not
    implemented``): those leaves come back with the shardings they were saved with."""
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    w = np.arange(32.0, dtype=np.float32).reshape(8, 4)
    params = {"w": jax.device_put(w, NamedSharding(mesh, P("data", None)))}
    tx = kopt.adam(0.1)
    _, state = tx.update({"w": jnp.ones((8, 4))}, tx.init(params), params)
    save_state(tmp_path / "s", state)
    like = jax.eval_shape(tx.init, params)
    restored = restore_state(tmp_path / "s", like)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)


def test_a_from_transformation_optimizer_restores_with_its_transformation(tmp_path):
    """A config holds no functions: the transformation is passed back through
    ``custom_objects``; without it the restore names the way out and builds nothing."""
    tx = kopt.chain(kopt.clip_by_global_norm(1.0), optax.adam(0.1))
    opt = optimizers.from_transformation(tx, name="mine")
    opt.clipnorm = 2.0  # in the config, and restored
    var = kopt.Variable(jnp.ones(3), name="w")
    grad = jnp.array([1.0, 2.0, 3.0])
    for _ in range(3):
        opt.apply_gradients([(grad, var)])
    save_optimizer(tmp_path / "c", opt, [var])
    other = kopt.Variable(jnp.zeros(3), name="w")
    with pytest.raises(TypeError, match=r"custom_objects=\{'transformation': tx\}"):
        restore_optimizer(tmp_path / "c", [other])
    np.testing.assert_array_equal(other.numpy(), np.zeros(3))
    restored = restore_optimizer(tmp_path / "c", [other], custom_objects={"transformation": tx})
    assert restored.get_config() == {
        "name": "mine",
        "clipnorm": 2.0,
        "held": {"global_clipnorm": 1.0},  # the wrapped clip piece's threshold
    }
    assert int(restored.iterations.numpy()) == 3
    opt.apply_gradients([(grad, var)])
    restored.apply_gradients([(grad, other)])
    np.testing.assert_array_equal(other.numpy(), var.numpy())


def test_a_from_transformation_optimizer_keeps_the_hyperparameters_set_on_it(tmp_path):
    """The values set as attributes were in neither the config nor the weights: the restored
    optimizer went on with the transformation's own (0.1, not 0.01)."""
    tx = kopt.sgd(0.1, momentum=0.9)
    opt = optimizers.from_transformation(tx)
    opt.learning_rate, opt.momentum = 0.01, 0.5
    var = kopt.Variable(jnp.ones(2), name="w")
    opt.apply_gradients([(jnp.ones(2), var)])
    save_optimizer(tmp_path / "c", opt, [var])
    other = kopt.Variable(jnp.zeros(2), name="w")
    restored = restore_optimizer(tmp_path / "c", [other], custom_objects={"transformation": tx})
    assert float(restored.learning_rate.numpy()) == pytest.approx(0.01)
    assert float(restored.momentum.numpy()) == 0.5
    opt.apply_gradients([(jnp.ones(2), var)])
    restored.apply_gradients([(jnp.ones(2), other)])
    np.testing.assert_array_equal(other.numpy(), var.numpy())


def test_a_wrapper_saved_without_its_held_optimizers_state_still_restores(tmp_path, monkeypatch):
    """A checkpoint written before held optimizers' state was kept (as kopt wrote them) was
    refused as not matching; it restores what it has, the held optimizer starting afresh."""
    import kopt.checkpoint as checkpoint

    variables = [
        kopt.Variable(np.ones((2, 2), np.float32), name="w"),
        kopt.Variable(np.zeros(2, np.float32), name="b"),
    ]
    opt = Lookahead(optimizers.Adam(0.05))
    for _ in range(2):
        opt.apply_gradients([(jnp.ones((2, 2)), variables[0]), (jnp.ones(2), variables[1])])
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_nested", lambda optimizer: [])  # the older layout
        save_optimizer(tmp_path / "c", opt, variables)
    with pytest.warns(UserWarning, match="start afresh"):
        resumed = restore_optimizer(
            tmp_path / "c", variables, custom_objects={"Lookahead": Lookahead}
        )
    np.testing.assert_array_equal(
        resumed.get_slot(variables[0], "slow").numpy(), opt.get_slot(variables[0], "slow").numpy()
    )
    assert int(resumed.iterations.numpy()) == 2


@pytest.mark.parametrize(
    "make, flag",
    [(lambda: optimizers.Adam(0.1), "amsgrad"), (lambda: optimizers.RMSprop(0.1), "centered")],
)
def test_a_slot_a_flag_made_and_no_longer_uses_restores(tmp_path, make, flag):
    """Switching a structural flag on then off keeps its slot (as tf.keras); the checkpoint
    held it, and the restored optimizer, built from the config with the flag off, refused the
    layout. Then the flag back on continues from the kept slot, as it would have."""
    opt, var = make(), kopt.Variable([1.0, 2.0], name="w")
    grads = [jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5]), jnp.array([-1.0, 3.0])]
    setattr(opt, flag, True)
    opt.apply_gradients([(grads[0], var)])
    setattr(opt, flag, False)
    opt.apply_gradients([(grads[1], var)])
    save_optimizer(tmp_path / "c", opt, [var])
    other = kopt.Variable(jnp.zeros(2), name="w")
    restored = restore_optimizer(tmp_path / "c", [other])
    assert restored.get_slot_names() == opt.get_slot_names()
    for o in (opt, restored):
        setattr(o, flag, True)
    opt.apply_gradients([(grads[2], var)])
    restored.apply_gradients([(grads[2], other)])
    np.testing.assert_array_equal(other.numpy(), var.numpy())


_SAVES = 24


def test_a_checkpoint_taken_while_another_thread_steps_is_one_step(tmp_path):
    """save_optimizer read the step count, the slots and the variables without the lock each
    step holds: some checkpoints had the variable a step ahead of `iterations`."""
    import threading

    # Momentum 0.5 on a gradient of 1: m -> 0.5 m - 1 (towards -2), w -> w + m, in float32.
    m, w, after = np.float32(0.0), np.float32(0.0), [0.0]
    for _ in range(200_000):
        m = np.float32(np.float32(0.5) * m - np.float32(1.0))
        w = np.float32(w + m)
        after.append(float(w))
    var = kopt.Variable(np.zeros(4, np.float32), name="w")
    opt = optimizers.SGD(1.0, momentum=0.5)
    stop = threading.Event()

    def train():
        while not stop.is_set() and int(opt.iterations.numpy()) < len(after) - 100:
            opt.apply_gradients([(jnp.ones(4), var)])

    opt.apply_gradients([(jnp.ones(4), var)])
    worker = threading.Thread(target=train)
    worker.start()
    try:
        for i in range(_SAVES):
            save_optimizer(tmp_path / f"c{i}", opt, [var])
            restored_var = kopt.Variable(jnp.zeros(4), name="w")
            restored = restore_optimizer(tmp_path / f"c{i}", [restored_var])
            n = int(restored.iterations.numpy())
            # A step more or less would be 2 away.
            np.testing.assert_allclose(restored_var.numpy(), after[n], atol=0.5, err_msg=f"{i}")
    finally:
        stop.set()
        worker.join()


def test_a_checkpoint_of_some_of_the_trained_variables_restores_for_those(tmp_path):
    """Saving only `w` (a frozen `b` left out) filed `b`'s slots as other weights, and no call
    restored the checkpoint: with `[w]` the layout did not match, with `[w, b]` the variables
    did not."""
    w, b = kopt.Variable([1.0, 2.0], name="w"), kopt.Variable([0.5], name="b")
    opt = optimizers.Adam(0.1)
    for _ in range(3):
        opt.apply_gradients([(jnp.array([1.0, -2.0]), w), (jnp.ones(1), b)])
    save_optimizer(tmp_path / "c", opt, [w])
    other = kopt.Variable(jnp.zeros(2), name="w")
    restored = restore_optimizer(tmp_path / "c", [other])
    np.testing.assert_array_equal(
        restored.get_slot(other, "v").numpy(), opt.get_slot(w, "v").numpy()
    )
    opt.apply_gradients([(jnp.array([0.5, 0.5]), w)])
    restored.apply_gradients([(jnp.array([0.5, 0.5]), other)])
    np.testing.assert_array_equal(other.numpy(), w.numpy())
    with pytest.raises(ValueError, match=r"checkpoint has variables \['w:0'\]"):
        restore_optimizer(tmp_path / "c", [kopt.Variable([0.0, 0.0], name="w"), b])


@pytest.mark.parametrize(
    "make",
    [lambda: optimizers.Adam(0.1), lambda: optimizers.SGD(0.1, momentum=0.9)],
    ids=["Adam", "SGD"],
)
def test_a_restored_optimizer_lists_its_weights_in_the_saved_order(tmp_path, make):
    """Restoring made every slot in one go over the variables as given to save_optimizer, not
    in the order the saved optimizer had made them: the two optimizers' get_weights did not line
    up, and set_weights across them put one variable's slot on another of the same shape."""
    shapes = {"a": (3,), "b": (2,), "c": (2,)}
    variables = {n: kopt.Variable(np.ones(s, np.float32), name=n) for n, s in shapes.items()}
    opt = make()
    opt.apply_gradients([(jnp.ones(2), variables["b"])])  # b's slots first
    opt.apply_gradients(
        [(jnp.full(s, float(i + 1)), variables[n]) for i, (n, s) in enumerate(shapes.items())]
    )
    save_optimizer(tmp_path / "c", opt, list(variables.values()))
    # An older checkpoint, without the order: restored as before, its slots in place.
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "old").mkdir()
    os.symlink(tmp_path / "c" / "state", tmp_path / "old" / "state")
    config.pop("order", None)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    for path in ("c", "old"):
        fresh = {n: kopt.Variable(np.zeros(s, np.float32), name=n) for n, s in shapes.items()}
        restored = restore_optimizer(tmp_path / path, list(fresh.values()))
        if path == "c":
            assert [w.name for w in restored.weights] == [w.name for w in opt.weights]
            restored.set_weights(opt.get_weights())
        for slot in opt.get_slot_names():
            for n in shapes:
                np.testing.assert_array_equal(
                    restored.get_slot(fresh[n], slot).numpy(),
                    opt.get_slot(variables[n], slot).numpy(),
                    err_msg=f"{path}: {slot} of {n}",
                )
