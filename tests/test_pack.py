"""kopt.pack: params as one buffer per dtype, checked against the same optimizers unpacked."""

import copy
import gc
import os
import pickle
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_cases import (
    OPTIMIZER_CASES,
    assert_close,
    functional_optimizer,
    gradient_stream,
    initial_params,
    tolerance_for,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kopt

# Elementwise optimizers only (see test_flat.py), and dense gradients: jax.grad of a packed
# loss never makes IndexedSlices.
PACKABLE = [
    c
    for c in OPTIMIZER_CASES
    if c["class_name"] not in ("Lamb", "Adafactor")
    and "clipnorm" not in c["kwargs"]
    and c["sparse"] is None
]


def tree():
    return {
        "dense": {
            "kernel": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
            "bias": jnp.array([0.5, -0.25, 1.0, 0.0], jnp.float32),
        },
        "scale": jnp.array(2.0, jnp.float32),
        "half": jnp.array([1.0, -2.0, 0.5], jnp.bfloat16),
        "big": jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 64,
    }


def state_slots(state):
    """The slots as the state keeps them (``kopt.get_slot`` unpacks them)."""
    holders = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kopt.OptimizerState))
    return {
        name: slot
        for holder in holders
        if isinstance(holder, kopt.OptimizerState)
        for name, slot in holder.slots.items()
    }


def loss(params, x):
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"]) * params["scale"]
    return (
        jnp.sum(h**2)
        + jnp.sum(params["half"].astype(jnp.float32) ** 2)
        + jnp.sum(jnp.sin(params["big"]))
    )


@pytest.mark.parametrize("case", PACKABLE, ids=[c["id"] for c in PACKABLE])
def test_packed_optimizer_matches_keras(case):
    params = kopt.pack(initial_params(case))
    assert len(params.buffers) == 1
    tx = functional_optimizer(case)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in gradient_stream(case):
        updates, state = update(kopt.pack(grads), state, params)
        params = kopt.apply_updates(params, updates)
    rtol = tolerance_for(case)
    expected = case["expected"]
    variables = params.unpack()
    for i, (p, e) in enumerate(zip(variables, expected["variables"], strict=True)):
        assert_close(p, e, f"{case['id']}: variable {i}", rtol)
        for name, value in expected["slots"][i].items():
            assert isinstance(state_slots(state)[name], kopt.Packed), name
            slot = kopt.get_slot(state, name)  # unpacked: shaped like the original params
            assert_close(slot[i], value, f"{case['id']}: slot {name}[{i}]", rtol)


def test_pack_groups_by_dtype_and_round_trips():
    params = tree()
    packed = kopt.pack(params, max_leaf_size=16)
    assert set(packed.buffers) == {"packed float32", "packed bfloat16", "['big']"}
    assert packed.buffers["packed float32"].shape == (12 + 4 + 1,)
    assert packed.buffers["packed bfloat16"].dtype == jnp.bfloat16
    back = packed.unpack()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(back), strict=True
    ):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    everything = kopt.pack(params)
    assert set(everything.buffers) == {"packed float32", "packed bfloat16"}
    assert "5 leaves" in repr(everything)


def _flax_bytes(value, target):
    serialization = pytest.importorskip("flax.serialization")
    return serialization.from_bytes(target, serialization.to_bytes(value))


def _flax_state_dict(value, target):
    serialization = pytest.importorskip("flax.serialization")
    saved = serialization.msgpack_serialize(serialization.to_state_dict(value))
    return serialization.from_state_dict(target, serialization.msgpack_restore(saved))


@pytest.mark.parametrize(
    "round_trip", [_flax_bytes, _flax_state_dict], ids=["flax-bytes", "flax-state-dict"]
)
def test_packed_params_and_their_state_round_trip_through_flax_serialization(round_trip):
    """flax.serialization refused a Packed ("can not serialize 'Packed' object"), so neither
    packed params nor any state made from them could be saved with it. It saves the unpacked
    tree, so a checkpoint also restores into another layout, or into the tree itself."""
    params = tree()
    zeros = jax.tree.map(jnp.zeros_like, params)
    packed = kopt.pack(params)
    tx = kopt.adam(0.1)
    _, state = tx.update(kopt.pack(jax.tree.map(jnp.ones_like, params)), tx.init(packed), packed)
    restored = round_trip(packed, kopt.pack(zeros))
    assert isinstance(restored, kopt.Packed) and restored.layout is packed.layout
    chex.assert_trees_all_equal(restored.unpack(), params)
    restored_state = round_trip(state, tx.init(kopt.pack(zeros)))
    assert jax.tree.structure(restored_state) == jax.tree.structure(state)
    chex.assert_trees_all_equal(restored_state, state)
    # One Adam step with unit gradients: m = 1 - beta_1.
    expected = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    chex.assert_trees_all_close(kopt.get_slot(restored_state, "m"), expected, rtol=2e-2)
    # The unpacked tree is saved: it restores into another layout, and into the tree itself.
    chex.assert_trees_all_equal(
        round_trip(packed, kopt.pack(zeros, max_leaf_size=16)).unpack(), params
    )
    chex.assert_trees_all_equal(round_trip(packed, zeros), params)
    chex.assert_trees_all_equal(round_trip(params, kopt.pack(zeros)).unpack(), params)


def test_a_flax_train_state_of_packed_params_round_trips():
    serialization = pytest.importorskip("flax.serialization")
    train_state = pytest.importorskip("flax.training.train_state")
    params = tree()
    tx = kopt.sgd(0.1, momentum=0.9)

    def make(packed):  # TrainState.create looks for a key in the params: a Packed has none
        return train_state.TrainState(
            step=0, apply_fn=None, params=packed, tx=tx, opt_state=tx.init(packed)
        )

    saved = make(kopt.pack(params))
    updates, opt_state = tx.update(
        kopt.pack(jax.tree.map(jnp.ones_like, params)), saved.opt_state, saved.params
    )
    saved = saved.replace(
        step=1, params=kopt.apply_updates(saved.params, updates), opt_state=opt_state
    )
    fresh = make(kopt.pack(jax.tree.map(jnp.zeros_like, params)))
    restored = serialization.from_bytes(fresh, serialization.to_bytes(saved))
    assert int(restored.step) == 1 and isinstance(restored.params, kopt.Packed)
    # One step of 0.1 with unit gradients moves every param by -0.1.
    expected = jax.tree.map(lambda p: p - 0.1, params)
    chex.assert_trees_all_close(restored.params.unpack(), expected, rtol=2e-2, atol=1e-5)
    chex.assert_trees_all_equal(restored.params, saved.params)
    chex.assert_trees_all_equal(restored.opt_state, saved.opt_state)


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.adam(0.05),
        lambda: kopt.sgd(0.1, momentum=0.9, nesterov=True),
        lambda: kopt.rmsprop(0.01, momentum=0.5, centered=True),
        lambda: kopt.adagrad(0.1),
        lambda: kopt.adamw(0.05, weight_decay=0.1),
        lambda: kopt.lion(0.01),
    ],
    ids=["adam", "sgd_nesterov", "rmsprop_centered", "adagrad", "adamw", "lion"],
)
def test_training_on_packed_params_matches_the_tree(make):
    x = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)
    tx = make()

    @jax.jit
    def tree_step(params, state):
        grads = jax.grad(loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    @jax.jit
    def packed_step(packed, state):
        grads = jax.grad(lambda p: loss(p.unpack(), x))(packed)
        assert isinstance(grads, kopt.Packed)
        updates, state = tx.update(grads, state, packed)
        return kopt.apply_updates(packed, updates), state

    params = tree()
    packed = kopt.pack(params, max_leaf_size=16)
    state, packed_state = tx.init(params), tx.init(packed)
    for _ in range(5):
        params, state = tree_step(params, state)
        packed, packed_state = packed_step(packed, packed_state)
    chex.assert_trees_all_close(packed.unpack(), params, rtol=1e-5, atol=1e-6)
    for name in kopt.slot_names(state):
        chex.assert_trees_all_close(
            kopt.get_slot(packed_state, name),
            kopt.get_slot(state, name),
            rtol=1e-5,
            atol=1e-6,
        )


def test_gradient_of_a_packed_loss_is_one_concatenation_not_a_pad_per_leaf():
    params = {f"w{i:02d}": jnp.ones(10) for i in range(30)}
    packed = kopt.pack(params)

    def packed_loss(p):
        return sum(jnp.sum(v**2) for v in p.unpack().values())

    grads = jax.grad(packed_loss)(packed)
    np.testing.assert_allclose(grads.buffers["packed float32"], np.full(300, 2.0))
    jaxpr = jax.make_jaxpr(jax.grad(packed_loss))(packed)
    primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    # A slice per leaf would transpose to 30 buffer-sized pads summed: 30x the work.
    assert "pad" not in primitives and "dynamic_update_slice" not in primitives, primitives


def test_hyperparameters_change_without_retracing():
    tx = kopt.sgd(learning_rate=0.1, momentum=0.5)
    packed = kopt.pack(tree())
    grads = jax.tree.map(jnp.ones_like, packed)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(packed, state):
        updates, state = tx.update(grads, state, packed)
        return kopt.apply_updates(packed, updates), state

    state = tx.init(packed)
    for lr in (0.1, 0.2, 0.3):
        state = kopt.set_hyperparam(state, "learning_rate", lr)
        packed, state = step(packed, state)
    # momentum a: -0.1, -0.05 - 0.2, -0.125 - 0.3 per unit gradient
    bias = kopt.get_slot(state, "momentum")["dense"]["bias"]
    np.testing.assert_allclose(bias, [-0.425] * 4, rtol=1e-6)


def test_bad_inputs_are_rejected_naming_the_culprit():
    with pytest.raises(TypeError, match=r"pack: param \['n'\] must be a floating-point array"):
        kopt.pack({"x": jnp.zeros(2), "n": jnp.zeros(2, jnp.int32)})
    for bad in (-1, True, 1.5, "fast"):
        with pytest.raises(ValueError, match=r"pack: `max_leaf_size` .*" + repr(bad).split(".")[0]):
            kopt.pack({"x": jnp.zeros(2)}, max_leaf_size=bad)
    packed = kopt.pack({"x": jnp.zeros(2)})
    with pytest.raises(TypeError, match="already a Packed"):
        kopt.pack(packed)
    # Gradients packed with another layout do not match the params, and nothing is updated.
    params = kopt.pack(tree())
    tx = kopt.adam(0.1)
    state = tx.init(params)
    before = jax.tree.map(np.asarray, state)
    with pytest.raises(ValueError, match=r"unexpected .*\['big'\]"):
        tx.update(kopt.pack(tree(), max_leaf_size=16), state, params)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), before)


PER_TENSOR = {
    "scale_by_lamb": lambda: kopt.lamb(0.01),
    "scale_by_adafactor": lambda: kopt.adafactor(0.1),
    "clip_by_norm": lambda: kopt.chain(kopt.clip_by_norm(1.0), kopt.sgd(0.1)),
}


@pytest.mark.parametrize("owner", list(PER_TENSOR))
@pytest.mark.parametrize("wrap", ["pack", "flatten"])
def test_per_tensor_pieces_refuse_packed_buffers(owner, wrap):
    """Lamb's trust ratio, Adafactor's factored moments and clip_by_norm's norm are per tensor:
    on a packed buffer they would silently be one ratio, one factorisation, one norm for
    every leaf in it. They are refused there, and allowed where no leaf is packed."""
    params = tree()
    make = PER_TENSOR[owner]

    def init(max_leaf_size):
        if wrap == "pack":
            return make().init(kopt.pack(params, max_leaf_size=max_leaf_size))
        return kopt.flatten(make(), max_leaf_size=max_leaf_size).init(params)

    with pytest.raises(ValueError, match=rf"{owner}: its step depends on each tensor's"):
        init(8192)
    assert jax.tree.leaves(init(0))  # nothing packed


def test_auto_max_leaf_size_packs_every_leaf_on_gpus_and_small_ones_elsewhere(monkeypatch):
    """The default, ``"auto"``, follows where the params live: on GPUs every leaf is packed
    (measured there, benchmarks/RESULTS.md), elsewhere large leaves stay loose. No GPU here:
    JAX's default backend, which decides for host arrays and under a trace, is stood in for."""
    big = np.ones((130, 130), np.float32)  # 16,900 elements: over the CPU's 16,384
    host = {"big": big, "b": np.zeros(3, np.float32)}
    on_cpu = jax.tree.map(jnp.asarray, host)
    assert set(kopt.pack(on_cpu).buffers) == {"packed float32", "['big']"}
    assert set(kopt.pack(on_cpu, max_leaf_size="auto").buffers) == {"packed float32", "['big']"}
    assert set(kopt.pack(on_cpu, max_leaf_size=None).buffers) == {"packed float32"}

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    packed = kopt.pack(host)
    assert set(packed.buffers) == {"packed float32"}
    np.testing.assert_array_equal(packed.unpack()["big"], big)
    # Arrays on CPU devices decide for themselves, whatever the default backend.
    assert set(kopt.pack(on_cpu).buffers) == {"packed float32", "['big']"}
    # Under a trace the default backend decides.
    keys = jax.jit(lambda p: jnp.asarray(len(kopt.pack(p).buffers)))(on_cpu)
    assert int(keys) == 1
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # unmeasured: the CPU's default
    assert set(kopt.pack(host).buffers) == {"packed float32", "['big']"}


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_sharded_leaves_stay_loose_and_keep_their_sharding(axis_type):
    mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
    params = {
        "rows": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("x", None))),
        "bias": jax.device_put(jnp.ones(8), NamedSharding(mesh, P())),
    }
    packed = kopt.pack(params)
    assert set(packed.buffers) == {"packed float32", "['rows']"}
    tx = kopt.adam(0.1)

    @jax.jit
    def step(packed, state):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, packed), state, packed)
        return kopt.apply_updates(packed, updates), state

    packed, state = step(packed, tx.init(packed))
    rows = packed.buffers["['rows']"]
    assert rows.sharding.is_equivalent_to(params["rows"].sharding, rows.ndim)
    for slot in ("m", "v"):
        leaf = state_slots(state)[slot].buffers["['rows']"]
        assert leaf.sharding.is_equivalent_to(rows.sharding, rows.ndim), slot


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
def test_leaves_committed_to_different_devices_are_named():
    """A buffer lives on one device: leaves committed to two cannot be packed together, and
    JAX's error named neither leaf, only `parts[0]` of an internal function."""
    first, second = jax.devices()[:2]
    params = {
        "a": jax.device_put(jnp.ones(3), first),
        "b": jax.device_put(jnp.ones(2), second),
        "c": jnp.ones(2),  # not committed: goes with the others
    }
    with pytest.raises(
        ValueError,
        match=r"pack: params \['a'\] \(device ids \[0\]\) and \['b'\] \(device ids \[1\]\) "
        r"are committed to different devices",
    ):
        kopt.pack(params)
    with pytest.raises(ValueError, match=r"flatten: params \['a'\] .* and \['b'\]"):
        kopt.flatten(kopt.adam(0.1)).init(params)
    # On one device, with an uncommitted leaf, they pack there.
    params["b"] = jax.device_put(params["b"], first)
    assert kopt.pack(params).buffers["packed float32"].devices() == {first}


def test_packed_params_work_with_optax_pieces_and_key_paths():
    optax = pytest.importorskip("optax")
    params = tree()
    packed = kopt.pack(params)
    tx = kopt.chain(optax.clip_by_global_norm(1.0), kopt.adam(0.1))
    state = tx.init(packed)
    grads = jax.tree.map(jnp.ones_like, packed)
    updates, state = jax.jit(tx.update)(grads, state, packed)
    new = optax.apply_updates(packed, updates)
    assert isinstance(new, kopt.Packed)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(new)[0]]
    assert paths == ["['packed float32']", "['packed bfloat16']"]
    # The same steps on the tree: clipping by the global norm sees the same values.
    tree_updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    chex.assert_trees_all_close(updates.unpack(), tree_updates, rtol=1e-5)


def test_packing_and_unpacking_outside_jit_compile_once_however_many_shapes(backend_compiles):
    """Eagerly, each leaf's ``ravel`` (and, unpacking, each ``reshape``) compiled a program of
    its own per shape: hundreds for the first ``kopt.pack`` of a model of many small params.
    Shapes no other test uses, so that programs compiled earlier in the process hide none."""
    rng = np.random.default_rng(5)
    shapes = [(3, 19), (23,), (2, 3, 13), (37, 1), (5, 2, 9), (41,)]
    params = {f"p{i}": jnp.asarray(rng.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}
    backend_compiles.clear()
    packed = kopt.pack(params)
    assert len(backend_compiles) <= 1
    expected = np.concatenate([np.ravel(np.asarray(params[k])) for k in params])
    np.testing.assert_array_equal(packed.buffers["packed float32"], expected)
    backend_compiles.clear()
    unpacked = packed.unpack()
    assert len(backend_compiles) <= 1
    for key, value in params.items():
        np.testing.assert_array_equal(unpacked[key], np.asarray(value))


def test_equal_layouts_are_one_object_so_a_jitted_call_compares_them_by_identity():
    """A jitted call compares the layout in its arguments' structure with the compiled one;
    equal layouts made apart (params and gradients packed separately) were compared field by
    field, about 70 us per comparison over 1,000 leaves, twice per step."""
    a, b = kopt.pack(tree()), kopt.pack(tree())
    assert a.layout is b.layout
    assert pickle.loads(pickle.dumps(a)).layout is a.layout
    assert copy.deepcopy(a).layout is a.layout
    other = kopt.pack(tree(), max_leaf_size=16).layout
    assert other != a.layout and {a.layout: 1}.get(other) is None
    assert state_slots(kopt.adam(0.1).init(b))["m"].layout is a.layout


def test_a_layout_nothing_uses_any_more_is_dropped():
    """Layouts are interned in a weak dictionary; keyed by the layout itself, its key kept
    every layout ever made alive (with its tree structure), one per model packed."""
    params = {"only_in_the_drop_test": jnp.zeros(3)}
    layout = weakref.ref(kopt.pack(params).layout)
    gc.collect()
    assert layout() is None
    # Made again, it is interned again.
    assert kopt.pack(params).layout is kopt.pack(params).layout


def test_threads_making_the_same_new_layout_at_once_get_one_object():
    """Interning was a bare WeakValueDictionary.setdefault, which is not atomic: threads that
    packed the same new tree at once could each keep an object of their own (equal, but
    compared field by field in every jitted call). Threads switch as often as they can here,
    so that the race shows in some rounds (about 1 in 20 did)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for round_ in range(200):
            params = {f"thread_race_{round_}": jnp.zeros(3)}
            barrier, made = threading.Barrier(8), []

            def make(params=params, barrier=barrier, made=made):
                barrier.wait()
                made.append(kopt.pack(params).layout)

            threads = [threading.Thread(target=make) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(made) == 8
            assert all(layout is made[0] for layout in made), f"round {round_}"
    finally:
        sys.setswitchinterval(switch)


def test_a_layout_unpickled_in_another_process_equals_the_one_made_there(tmp_path):
    """String hashes differ between processes: a layout must not carry its hash along."""
    path = tmp_path / "packed.pkl"
    path.write_bytes(pickle.dumps(kopt.pack(tree())))
    script = (
        "import pickle, sys; import jax.numpy as jnp; import kopt\n"
        "sys.path.insert(0, sys.argv[2]); from test_pack import tree\n"
        "loaded = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "fresh = kopt.pack(tree())\n"
        "assert loaded.layout is fresh.layout and loaded.layout == fresh.layout\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "JAX_PLATFORMS": "cpu"}
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), here], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
