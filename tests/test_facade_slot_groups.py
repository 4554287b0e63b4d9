"""The facade keeps small slots in shared buffers; each still behaves as its own variable."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt import optimizers
from kopt.optimizers._slot_groups import (
    MAX_GROUP_ELEMENTS,
    MAX_GROUP_MEMBERS,
    MAX_GROUPED_SIZE,
    PackedSlot,
)


def small_model():
    return [kopt.Variable(jnp.full((2, 3), float(i)), name=f"w{i}") for i in range(4)] + [
        kopt.Variable(jnp.zeros(MAX_GROUPED_SIZE + 1), name="big")
    ]


def numpy_adam(p, grads, lr=0.1, b1=0.9, b2=0.999, eps=1e-7):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - lr_t * m / (np.sqrt(v) + eps)
    return p, m, v


def adam_steps(variables, steps, seed):
    """A fresh Adam(0.1) stepped ``steps`` times with random gradients; returns it and them."""
    opt = optimizers.Adam(learning_rate=0.1)
    rng = np.random.default_rng(seed)
    grads = [
        [rng.standard_normal(v.shape).astype(np.float32) for v in variables] for _ in range(steps)
    ]
    for gs in grads:
        opt.apply_gradients(zip([jnp.asarray(g) for g in gs], variables, strict=True))
    return opt, grads


def test_small_slots_are_grouped_and_step_like_their_own_variables():
    variables = small_model()
    opt, grads = adam_steps(variables, 3, seed=0)
    assert opt.compile_count == 1
    for i, v in enumerate(variables):
        m, s = opt.get_slot(v, "m"), opt.get_slot(v, "v")
        assert isinstance(m, PackedSlot) == (v.size <= MAX_GROUPED_SIZE), v.name
        assert (m.shape, m.dtype, s.shape) == (v.shape, v.dtype, v.shape)
        p, em, ev = numpy_adam(np.full(v.shape, float(i) if i < 4 else 0.0), [g[i] for g in grads])
        np.testing.assert_allclose(v.numpy(), p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.numpy(), em, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(s.value), ev, rtol=1e-5, atol=1e-7)


def test_many_small_slots_are_split_into_groups_of_bounded_size():
    """XLA:CPU compiles many slices of one buffer slowly, so groups are capped (and balanced: no
    group of one is left over); every slot still steps like its own variable."""
    count = 2 * MAX_GROUP_MEMBERS + 3
    variables = [
        kopt.Variable(jnp.full((i % 3 + 1,), float(i)), name=f"w{i}") for i in range(count)
    ]
    opt, grads = adam_steps(variables, 2, seed=1)
    assert opt.compile_count == 1
    sizes = sorted(len(g.members) for g in opt._slot_groups)
    assert sum(sizes) == 2 * count  # m and v, all float32
    assert sizes[-1] <= MAX_GROUP_MEMBERS and sizes[-1] - sizes[0] <= 1, sizes
    for i, v in enumerate(variables):
        assert isinstance(opt.get_slot(v, "m"), PackedSlot)
        p, m, _ = numpy_adam(np.full(v.shape, float(i)), [g[i] for g in grads])
        np.testing.assert_allclose(v.numpy(), p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(opt.get_slot(v, "m").numpy(), m, rtol=1e-5, atol=1e-6)


def test_groups_of_larger_slots_are_capped_by_their_element_count():
    """XLA:CPU's compile time also grows with the members' sizes, so a group holds about
    ``MAX_GROUP_ELEMENTS`` elements; the groups come out about equal, and a slot larger than a
    group's share does not leave the small slots after it in groups of one."""
    size = MAX_GROUP_ELEMENTS // 8
    shapes = [(MAX_GROUPED_SIZE,)] + [(3,)] * 40 + [(8, size // 8)] * 20
    variables = [kopt.Variable(jnp.full(s, 0.5 * i), name=f"w{i}") for i, s in enumerate(shapes)]
    opt, grads = adam_steps(variables, 2, seed=2)
    assert opt.compile_count == 1
    groups = [[m.size for m in g.members] for g in opt._slot_groups]
    for members in groups:
        assert 2 <= len(members) <= MAX_GROUP_MEMBERS, groups
        assert sum(members) <= MAX_GROUP_ELEMENTS, groups
    # The 80 small slots (m and v) and the 40 of 1/8 of the cap, in as few groups as the caps
    # allow, give or take one; the large slots alone are not grouped.
    assert len(groups) <= 3 + 5 + 1, groups
    for v in variables:
        assert isinstance(opt.get_slot(v, "v"), PackedSlot) == (v.size < MAX_GROUPED_SIZE), v.name
    for i, v in enumerate(variables):
        p, m, s = numpy_adam(np.full(v.shape, 0.5 * i), [g[i] for g in grads])
        np.testing.assert_allclose(v.numpy(), p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(opt.get_slot(v, "m").numpy(), m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(opt.get_slot(v, "v").numpy(), s, rtol=1e-5, atol=1e-7)


def test_off_the_cpu_groups_are_capped_by_members_only():
    """The element cap is for XLA:CPU's compile time; elsewhere each array passed costs the host
    a few microseconds, so groups take up to ``MAX_GROUP_MEMBERS`` slots of any size."""
    from kopt.optimizers._slot_groups import _chunks

    class Slot:
        def __init__(self, size):
            self._storage = np.zeros(size, np.float32)

    members = [Slot(MAX_GROUP_ELEMENTS // 4) for _ in range(2 * MAX_GROUP_MEMBERS + 3)]
    uncapped = [len(c) for c in _chunks(members, math.inf)]
    assert len(uncapped) == 3 and max(uncapped) - min(uncapped) <= 1, uncapped
    capped = [len(c) for c in _chunks(members, MAX_GROUP_ELEMENTS)]
    assert sum(capped) == len(members) and max(capped) == 4, capped


def test_a_step_over_some_variables_leaves_the_others_slots_alone():
    a, b, c = (kopt.Variable(jnp.zeros(3)) for _ in range(3))
    opt = optimizers.SGD(learning_rate=1.0, momentum=0.5)
    opt.apply_gradients([(jnp.ones(3), a), (jnp.ones(3), b), (jnp.ones(3), c)])
    assert isinstance(opt.get_slot(b, "momentum"), PackedSlot)
    opt.apply_gradients([(jnp.ones(3), a), (2 * jnp.ones(3), c)])
    np.testing.assert_allclose(opt.get_slot(a, "momentum").numpy(), [-1.5] * 3)
    np.testing.assert_allclose(opt.get_slot(b, "momentum").numpy(), [-1.0] * 3)
    np.testing.assert_allclose(opt.get_slot(c, "momentum").numpy(), [-2.5] * 3)
    np.testing.assert_allclose(b.numpy(), [-1.0] * 3)


def test_assigning_a_slot_feeds_the_next_step_and_values_read_earlier_stay_valid():
    a, b = kopt.Variable(jnp.zeros(2)), kopt.Variable(jnp.zeros(2))
    opt = optimizers.SGD(learning_rate=1.0, momentum=0.5)
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(2), b)])
    slot = opt.get_slot(a, "momentum")
    before = slot.value
    slot.assign([10.0, 20.0])
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(2), b)])
    np.testing.assert_allclose(np.asarray(before), [-1.0, -1.0])  # not donated away
    np.testing.assert_allclose(slot.numpy(), [4.0, 9.0])  # 0.5 * [10, 20] - 1
    np.testing.assert_allclose(opt.get_slot(b, "momentum").numpy(), [-1.5, -1.5])
    with pytest.raises(ValueError, match="shape"):
        slot.assign(jnp.zeros(3))
    np.testing.assert_allclose(slot.numpy(), [4.0, 9.0])


def test_weights_round_trip_through_get_and_set_weights():
    variables = small_model()
    opt = optimizers.Adam(learning_rate=0.1)
    opt.apply_gradients([(jnp.ones(v.shape), v) for v in variables])
    weights = opt.get_weights()
    other = optimizers.Adam.from_config(opt.get_config())
    twins = [kopt.Variable(v.numpy()) for v in variables]
    other._create_all_weights(twins)
    other.set_weights(weights)
    for x, y in zip(other.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(x, y)
    for opt_, vs in ((opt, variables), (other, twins)):
        opt_.apply_gradients([(jnp.ones(v.shape), v) for v in vs])
    for v, t in zip(variables, twins, strict=True):
        np.testing.assert_array_equal(v.numpy(), t.numpy())


def test_a_grouped_slot_is_a_pytree_leaf_inside_jit():
    a, b = kopt.Variable(jnp.ones(2)), kopt.Variable(jnp.ones(2))
    opt = optimizers.Adagrad(learning_rate=0.1)
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(2), b)])
    slot = opt.get_slot(a, "accumulator")
    assert isinstance(slot, PackedSlot)
    total = jax.jit(lambda s: jnp.sum(s * 2))(slot)
    np.testing.assert_allclose(total, 2 * np.sum(slot.numpy()))


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
def test_grouped_slots_follow_the_model_onto_a_mesh_and_compile_once():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("x",))
    small = [kopt.Variable(jnp.ones(3)), kopt.Variable(jnp.ones(3))]
    opt = optimizers.Adam(learning_rate=0.1)
    opt.apply_gradients([(jnp.ones(3), v) for v in small])
    assert isinstance(opt.get_slot(small[0], "m"), PackedSlot)
    rows = kopt.Variable(jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh, P("x", None))))
    grads = [(jnp.ones(3), small[0]), (jnp.ones(3), small[1])]
    grads.append((jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh, P("x", None))), rows))
    count = opt.compile_count
    for _ in range(3):
        opt.apply_gradients(grads)
    assert opt.compile_count == count + 1
    assert rows.value.sharding.spec == P("x", None)
    np.testing.assert_allclose(small[0].numpy(), np.full(3, 0.6), rtol=1e-5)


def test_reading_and_writing_grouped_slots_compiles_nothing():
    """``get_weights``/``set_weights`` (and so checkpoints) read and write every grouped slot;
    one jitted slice or update per slot shape made the first of them compile for seconds."""
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
    )
    variables = [kopt.Variable(jnp.ones((i, 2 + i % 3))) for i in range(1, 13)]  # 12 shapes
    opt = optimizers.Adam(0.1)
    opt.apply_gradients([(jnp.ones(v.shape), v) for v in variables])
    assert any(isinstance(s, PackedSlot) for s in opt.weights)
    before = len(compiles)
    weights = opt.get_weights()
    opt.set_weights([w + 1 for w in weights])
    again = opt.get_weights()
    assert len(compiles) == before
    for w, a in zip(weights, again, strict=True):
        np.testing.assert_array_equal(a, w + 1)
    # The written values feed the next step, which compiles nothing new either.
    slot = opt.get_slot(variables[0], "m")
    zeros = [(jnp.zeros(v.shape), v) for v in variables]
    slot.assign(np.full(slot.shape, 5.0, np.float32))
    before = len(compiles)
    np.testing.assert_array_equal(opt.get_slot(variables[0], "m").numpy(), 5.0)
    opt.apply_gradients(zeros)
    np.testing.assert_allclose(opt.get_slot(variables[0], "m").numpy(), 4.5, rtol=1e-6)
    # Values written on the host go back uncommitted, as the buffer was: a committed one would
    # make the step compile again. A value read is uncommitted too, like a fresh array.
    assert len(compiles) == before
    assert not opt.get_slot(variables[0], "m").value.committed


def test_a_fresh_optimizer_over_many_shapes_compiles_only_its_step(backend_compiles):
    """Building a group's buffer eagerly compiled a ``ravel`` per slot shape: hundreds of
    one-off compiles, seconds, before the first step over a model of many small variables.
    (Slot placement, committed or not, is checked by the step-cache tests.)"""

    def model(count, width):  # distinct shapes, made from NumPy: no compile per shape
        shapes = [(i % 3 + 1, width + i) for i in range(count)]
        return [(np.ones(s, np.float32), kopt.Variable(np.ones(s, np.float32))) for s in shapes]

    # Another optimizer over other shapes first: what compiles once per process is done.
    optimizers.Adam(0.1).apply_gradients(model(3, 1))
    grads = [(jax.device_put(g), v) for g, v in model(40, 211)]
    opt = optimizers.Adam(0.1)
    before = len(backend_compiles)
    opt.apply_gradients(grads)
    assert len(backend_compiles) == before + 1  # the step
    assert opt.compile_count == 1 and len(opt._slot_groups) >= 2
    assert not any(g.buffer.committed for g in opt._slot_groups)  # as the variables are
    np.testing.assert_allclose(opt.get_slot(grads[5][1], "m").numpy(), 0.1, rtol=1e-6)
