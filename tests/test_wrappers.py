"""masked, multi_transform, accumulate_gradients, apply_if_finite and ema."""

import dataclasses
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

import kopt


def test_masked_with_a_mask_tree():
    params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    tx = kopt.masked(kopt.adam(0.1), {"w": True, "b": False})
    state = tx.init(params)
    assert kopt.get_slot(state, "m")["b"] is None
    updates, state = tx.update({"w": jnp.array([1.0, -1.0]), "b": jnp.array([7.0])}, state, params)
    np.testing.assert_allclose(updates["b"], [7.0])  # passes through unchanged
    expected = ref.adam([1.0, 2.0], [[1.0, -1.0]], lr=0.1) - np.array([1.0, 2.0])
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


def test_masked_with_a_callable_and_a_prefix_mask():
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.array([2.0, 2.0])}
    decay_matrices = kopt.masked(
        kopt.add_decayed_weights(0.5), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(decay_matrices.update)(zeros, decay_matrices.init(params), params)
    np.testing.assert_allclose(updates["kernel"], np.full((2, 2), 1.0))
    np.testing.assert_allclose(updates["bias"], [0.0, 0.0])

    nested = {"enc": params, "dec": params}
    prefix = kopt.masked(kopt.add_decayed_weights(0.5), {"enc": True, "dec": False})
    grads = jax.tree.map(jnp.zeros_like, nested)
    updates, _ = prefix.update(grads, prefix.init(nested), nested)
    np.testing.assert_allclose(updates["enc"]["bias"], [1.0, 1.0])
    np.testing.assert_allclose(updates["dec"]["kernel"], np.zeros((2, 2)))


def test_a_mask_or_labels_that_do_not_fit_the_params_are_named_with_the_way_out():
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    mask = {"w": True, "b": False}
    with pytest.raises(ValueError, match=r"masked: `mask` does not fit the params: .*"):
        kopt.masked(kopt.adam(0.1), {"w": True}).init(params)
    # Inside kopt.flatten the params are packed buffers: the message names them and says
    # where the mask belongs, and that order works, as masked(tx) does.
    inner = kopt.flatten(kopt.masked(kopt.adam(0.1), mask))
    with pytest.raises(
        ValueError,
        match=r"masked: `mask` does not fit the params \(they are kopt.flatten's packed buffers "
        r"\['packed float32'\].*masked\(flatten\(tx\), mask\)",
    ):
        inner.init(params)
    outer, plain = (
        kopt.masked(kopt.flatten(kopt.adam(0.1)), mask),
        kopt.masked(kopt.adam(0.1), mask),
    )
    grads = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([5.0, 6.0])}
    got, _ = outer.update(grads, outer.init(params), params)
    want, _ = plain.update(grads, plain.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # kopt.pack's params, and multi_transform's labels.
    with pytest.raises(ValueError, match=r"masked: `mask` .* kopt.pack's packed buffers"):
        kopt.masked(kopt.adam(0.1), mask).init(kopt.pack(params))
    labels = kopt.multi_transform({"a": kopt.sgd(1.0)}, {"w": "a", "b": "a"})
    with pytest.raises(ValueError, match=r"multi_transform: `labels` .* kopt.flatten's"):
        kopt.flatten(labels).init(params)
    # update as well as init: a state made for the tree refuses gradients that do not fit.
    state = plain.init(params)
    with pytest.raises(ValueError, match=r"masked: `mask` does not fit the params"):
        plain.update({"w": grads["w"]}, state, {"w": params["w"]})


@pytest.mark.parametrize("wrap", ["flatten", "pack"])
@pytest.mark.parametrize("kind", ["function", "tree"])
def test_decoupled_weight_decay_refuses_a_mask_of_packed_params_as_masked_does(kind, wrap):
    """Its mask function saw the packed buffers, each 1-D, so ``ndim > 1`` decayed no param,
    silently; a mask tree failed with JAX's pytree structure error, which named neither the
    transformation nor its mask. Both are refused as kopt.masked refuses them, and the mask
    works around kopt.flatten."""
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
    if kind == "function":
        mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    else:
        mask = {"kernel": True, "bias": False}
    tx = kopt.decoupled_weight_decay(kopt.sgd(0.1), 0.5, 0.1, mask=mask)
    with pytest.raises(
        ValueError,
        match=rf"decoupled_weight_decay: `mask` (is a function|does not fit).* kopt\.{wrap}'s "
        r"packed buffers \['packed float32'\]",
    ):
        kopt.flatten(tx).init(params) if wrap == "flatten" else tx.init(kopt.pack(params))
    outer = kopt.decoupled_weight_decay(kopt.flatten(kopt.sgd(0.1)), 0.5, 0.1, mask=mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = outer.update(zeros, outer.init(params), params)
    np.testing.assert_allclose(updates["kernel"], np.full((2, 3), -0.05), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], np.zeros(3))
    # Unpacked, a mask tree that does not fit is named too.
    with pytest.raises(ValueError, match=r"decoupled_weight_decay: `mask` does not fit the params"):
        kopt.decoupled_weight_decay(kopt.sgd(0.1), 0.5, 0.1, mask={"kernel": True}).init(params)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Dense:
    kernel: Any
    bias: Any


def test_packed_buffers_are_named_when_a_loose_leaf_is_an_attribute():
    """kopt.flatten passes the transformation inside it a dict of its packed buffers and loose
    leaves, keyed by path. The message named the buffers only where every loose leaf's path
    was a key or an index (``['w']``), not an attribute (``.kernel``, of a dataclass or an
    Equinox module)."""
    params = _Dense(jnp.ones((100, 100)), jnp.ones(3))  # a kernel over 8,192: loose
    tx = kopt.flatten(kopt.masked(kopt.adam(0.1), _Dense(True, False)))
    with pytest.raises(
        ValueError,
        match=r"masked: `mask` .* kopt.flatten's packed buffers \['packed float32', '.kernel'\]",
    ):
        tx.init(params)


def test_a_mask_of_element_arrays_is_not_said_not_to_fit():
    """A mask holds one bool per leaf: an array of several elements has no truth value, and
    its error was reported as the mask not fitting the params, which it does."""
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    mask = {"w": np.array([[True, False], [True, True]]), "b": True}
    with pytest.raises(ValueError, match="truth value of an array") as error:
        kopt.masked(kopt.add_decayed_weights(0.5), mask).init(params)
    assert "does not fit" not in str(error.value)


@pytest.mark.parametrize("callable_labels", [False, True], ids=["tree", "callable"])
def test_multi_transform(callable_labels):
    params = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
    labels = {"w": "fast", "b": "slow"}
    tx = kopt.multi_transform(
        {"fast": kopt.sgd(1.0), "slow": kopt.sgd(0.1, momentum=0.5)},
        (lambda p: labels) if callable_labels else labels,
    )
    state = tx.init(params)
    g = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([4.0])}
    step = jax.jit(tx.update)
    u1, state = step(g, state, params)
    u2, state = step(g, state, params)
    np.testing.assert_allclose(u2["w"], [-1.0, -2.0])
    np.testing.assert_allclose(u1["b"], [-0.4], rtol=1e-6)
    np.testing.assert_allclose(u2["b"], [0.5 * -0.4 - 0.4], rtol=1e-6)
    assert kopt.get_slot(state.inner_states["slow"], "momentum")["w"] is None


def counting(inner, calls):
    """``inner`` plus a host callback that records every time its update really runs."""

    def update(updates, state, params=None):
        jax.debug.callback(lambda: calls.append(1))
        return inner.update(updates, state, params)

    return kopt.GradientTransformation(inner.init, update)


def accumulate(tx, k, params, micro):
    """Runs the micro-batch gradients through ``tx`` (jitted), checking that the calls between
    boundaries return zeros; the params and state after each call."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for i, g in enumerate(micro, start=1):
        updates, state = step(jnp.asarray(g, jnp.float32), state, params)
        if i % k:
            np.testing.assert_array_equal(updates, np.zeros_like(updates))
        params = kopt.apply_updates(params, updates)
        out.append((params, state))
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulate_gradients_equals_one_step_on_the_reduced_gradient(reduction):
    k = 3
    calls = []
    tx = kopt.accumulate_gradients(counting(kopt.adam(0.1), calls), every_k=k, reduction=reduction)
    w0 = np.array([1.0, -1.0])
    params = jnp.asarray(w0, jnp.float32)
    micro = [np.array([0.5, 1.0]), np.array([-0.25, 2.0]), np.array([1.0, 0.5])] * 2
    micro[3:] = [g * 2.0 - 1.0 for g in micro[3:]]
    params, state = accumulate(tx, k, params, micro)[-1]
    jax.effects_barrier()
    assert len(calls) == 2  # the inner update ran only on the 3rd and 6th call
    assert int(state.inner_state[0].count) == 2
    assert int(state.mini_step) == 0
    reduce = np.mean if reduction == "mean" else np.sum
    steps = [reduce(micro[:3], axis=0), reduce(micro[3:], axis=0)]
    np.testing.assert_allclose(params, ref.adam(w0, steps, lr=0.1), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_micro_batch_spoils_only_its_own_window(bad):
    """The calls between boundaries return exact zeros while the sum holds a NaN or an
    infinity (multiplying the sum by 0 would give NaN), and the sum starts again from zero
    after the boundary, so `apply_if_finite` inside skips that window's update only and the
    next window trains on its own gradients."""
    k = 2
    tx = kopt.accumulate_gradients(kopt.apply_if_finite(kopt.sgd(0.5)), every_k=k)
    w0 = np.array([1.0, -1.0], np.float32)
    micro = [np.array([bad, 1.0]), np.array([0.5, 0.5]), np.array([1.0, 2.0]), np.array([3.0, 0.0])]
    calls = accumulate(tx, k, jnp.asarray(w0), micro)
    for i, (params, state) in enumerate(calls, start=1):
        assert np.all(np.isfinite(params)), f"call {i}: {params}"
        assert np.all(np.isfinite(state.accumulated)) or i == 1, f"call {i}"
    params, state = calls[-1]
    skipped = state.inner_state
    assert int(skipped.total_notfinite) == 1
    assert int(skipped.notfinite_count) == 0  # the second window was finite
    # The first window is skipped; the second is one SGD step on the mean of its two gradients.
    np.testing.assert_allclose(params, w0 - 0.5 * (micro[2] + micro[3]) / 2, rtol=1e-6)


def test_accumulate_gradients_of_bfloat16_in_a_float32_accumulator_matches_numpy():
    """bfloat16 gradients summed in bfloat16 lose their low bits at every micro-batch; with
    ``slot_dtype=jnp.float32`` the sum is float32 and the mean is rounded to bfloat16 once,
    for the inner update. Against NumPy (float32 sums of the bfloat16 values), over two
    windows, with one compile; the default accumulator keeps bfloat16 (Keras 3's)."""
    bf16 = jnp.bfloat16
    k = 64  # sums near 64, where bfloat16's spacing is 0.5
    rng = np.random.default_rng(3)
    micro = [
        np.asarray(jnp.asarray(1.0 + rng.uniform(0, 0.1, 4), bf16), np.float32)
        for _ in range(2 * k)
    ]
    params = jnp.zeros(4, bf16)
    tx = kopt.accumulate_gradients(kopt.sgd(1.0), every_k=k, slot_dtype=jnp.float32)
    state = tx.init(params)
    assert state.accumulated.dtype == jnp.float32 and params.dtype == bf16

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return kopt.apply_updates(params, updates), state

    expected = np.zeros(4, np.float32)
    for window in range(2):
        for g in micro[window * k : (window + 1) * k]:
            params, state = step(params, state, jnp.asarray(g, bf16))
        mean = np.asarray(jnp.asarray(np.sum(micro[window * k : (window + 1) * k], 0) / k, bf16))
        expected = np.asarray(jnp.asarray(expected - mean.astype(np.float32), bf16), np.float32)
        np.testing.assert_array_equal(np.asarray(params, np.float32), expected)
        assert params.dtype == bf16 and state.accumulated.dtype == jnp.float32

    # Accumulated in bfloat16 instead, the same gradients give another (rounded) result.
    plain = kopt.accumulate_gradients(kopt.sgd(1.0), every_k=k)
    p, st = jnp.zeros(4, bf16), plain.init(jnp.zeros(4, bf16))
    assert st.accumulated.dtype == bf16
    for g in micro[:k]:
        u, st = plain.update(jnp.asarray(g, bf16), st, p)
        p = kopt.apply_updates(p, u)
    first = np.asarray(
        jnp.asarray(-np.asarray(jnp.asarray(np.sum(micro[:k], 0) / k, bf16), np.float32), bf16),
        np.float32,
    )
    assert not np.array_equal(np.asarray(p, np.float32), first)


def test_accumulate_gradients_refuses_a_slot_dtype_that_is_not_floating():
    with pytest.raises(TypeError, match=r"accumulate_gradients: `slot_dtype` must be a floating"):
        kopt.accumulate_gradients(kopt.sgd(1.0), every_k=2, slot_dtype=jnp.int32)


def test_accumulate_gradients_branches_copy_nothing_params_sized():
    """The step's conditional returns the sum so far, or the inner update, in one buffer per
    leaf, selected outside it: neither branch copies a params-sized array (the branch not
    taken copied the sum through and filled zero updates, 3x the work of a plain step over
    200 leaves), and off a boundary nothing params-sized is computed inside the conditional.
    The numbers are the reduced-gradient test's above."""
    params = {f"w{i:02d}": jnp.zeros(1000) for i in range(20)}
    tx = kopt.accumulate_gradients(kopt.adam(1e-3), every_k=4)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return kopt.apply_updates(p, updates), s

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    text = hlo.compile().as_text()
    (names,) = re.findall(r"branch_computations=\{(.*?)\}", text)
    between, at_boundary = names.split(", ")  # index 0: the predicate's false branch
    bodies = {
        name: re.search(re.escape(name) + r" \(.*?\n\}", text, re.S).group(0)
        for name in (between, at_boundary)
    }
    for name, body in bodies.items():
        assert not re.search(r"f32\[1000\]\{0\} copy\(", body), (name, body)
    assert "f32[1000]{0} fusion(" not in bodies[between], bodies[between]


def test_accumulate_gradients_accepts_sparse_gradients():
    tx = kopt.accumulate_gradients(kopt.sgd(1.0), every_k=2)
    table = jnp.zeros((4, 2))
    state = tx.init(table)
    rows = kopt.IndexedSlices(jnp.ones((2, 2)), jnp.array([1, 1]), (4, 2))
    _, state = tx.update(rows, state, table)
    updates, state = tx.update(rows, state, table)
    np.testing.assert_allclose(updates, [[0, 0], [-2, -2], [0, 0], [0, 0]])  # mean of 2 * 2


def test_accumulate_gradients_keeps_its_state_for_a_none_gradient_leaf():
    """A None gradient (no gradient for that param this call) leaves the state's structure as
    it was, so ``lax.scan`` and ``jit`` see one state type; at a boundary the inner update gets
    None for it (which kopt's optimizers and optax's stateless ones pass through), and a later
    real gradient for the same param accumulates as usual."""
    params = {"w": jnp.zeros(2), "b": jnp.zeros(2)}
    tx = kopt.accumulate_gradients(optax.sgd(1.0), every_k=2, reduction="sum")
    state = tx.init(params)
    structure = jax.tree.structure(state)
    half = {"w": jnp.ones(2), "b": None}

    def step(state, _):
        updates, state = tx.update(half, state, params)
        return state, updates

    state, updates = jax.lax.scan(step, state, length=2)  # raises if the structure changed
    assert jax.tree.structure(state) == structure
    np.testing.assert_array_equal(updates["w"], [[0, 0], [-2, -2]])
    assert updates["b"] is None

    full = {"w": jnp.ones(2), "b": jnp.full(2, 3.0)}
    _, state = tx.update(half, state, params)
    updates, state = tx.update(full, state, params)
    np.testing.assert_array_equal(updates["w"], [-2, -2])
    np.testing.assert_array_equal(updates["b"], [-3, -3])
    assert jax.tree.structure(state) == structure


def test_accumulate_gradients_keeps_the_window_of_a_param_without_a_gradient_at_the_boundary():
    """A param with gradients early in a window and None at its boundary call: its sum so far
    was reset to zero there and never applied. It is kept for the param's next step instead,
    as Keras 3 keeps the accumulator of a variable a step leaves out."""
    params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    tx = kopt.accumulate_gradients(kopt.sgd(1.0), every_k=2, reduction="sum")
    state = tx.init(params)
    step = jax.jit(tx.update)
    _, state = step({"a": jnp.ones(1), "b": jnp.ones(1)}, state, params)
    updates, state = step({"a": jnp.ones(1), "b": None}, state, params)
    np.testing.assert_array_equal(updates["a"], [-2.0])
    assert updates["b"] is None
    np.testing.assert_array_equal(state.accumulated["a"], [0.0])
    np.testing.assert_array_equal(state.accumulated["b"], [1.0])
    # The next window adds to it: b steps by its three gradients.
    _, state = step({"a": jnp.ones(1), "b": jnp.ones(1)}, state, params)
    updates, state = step({"a": jnp.ones(1), "b": jnp.ones(1)}, state, params)
    np.testing.assert_array_equal(updates["b"], [-3.0])
    np.testing.assert_array_equal(state.accumulated["b"], [0.0])


def test_apply_if_finite_skips_a_bad_step():
    tx = kopt.apply_if_finite(kopt.adam(0.1), max_consecutive_errors=2)
    params = jnp.array([1.0, -1.0])
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, state = step(jnp.array([1.0, 2.0]), state, params)
    params = kopt.apply_updates(params, updates)
    inner_before, params_before = state.inner_state, params
    for bad in (jnp.array([jnp.nan, 1.0]), jnp.array([1.0, jnp.inf])):
        updates, state = step(bad, state, params)
        params = kopt.apply_updates(params, updates)
        np.testing.assert_array_equal(params, params_before)
        jax.tree.map(np.testing.assert_array_equal, state.inner_state, inner_before)
    assert int(state.notfinite_count) == 2 and int(state.total_notfinite) == 2
    assert not bool(state.last_finite)
    # The third bad step in a row goes through to the inner transformation.
    updates, state = step(jnp.array([jnp.nan, 1.0]), state, params)
    assert int(state.inner_state[0].count) == 2
    assert bool(jnp.isnan(updates[0]))
    # A finite step resets the consecutive count, not the total.
    _, state = step(jnp.array([1.0, 1.0]), state, params)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 3
    assert bool(state.last_finite)


def test_ema_first_step_is_the_params_then_averages():
    tx = kopt.chain(kopt.sgd(1.0), kopt.ema(0.9))
    params = jnp.array([1.0])
    state = tx.init(params)
    expected_average = [0.9, 0.9 * 0.9 + 0.1 * 0.8, (0.9 * 0.9 + 0.1 * 0.8) * 0.9 + 0.1 * 0.7]
    for average in expected_average:
        updates, state = tx.update(jnp.array([0.1]), state, params)
        params = kopt.apply_updates(params, updates)
        np.testing.assert_allclose(kopt.get_slot(state, "average"), [average], rtol=1e-6)
    np.testing.assert_allclose(params, [0.7], rtol=1e-6)  # the params follow plain SGD


def test_ema_overwrite_frequency():
    # Keras 3, SGD(lr=1), ema_momentum=0.9, ema_overwrite_frequency=2, gradient 0.1 from 1.0:
    # the second step overwrites the variable with the average, 0.89.
    tx = kopt.chain(kopt.sgd(1.0), kopt.ema(0.9, overwrite_frequency=2))
    params = jnp.array([1.0])
    state = tx.init(params)
    step = jax.jit(tx.update)
    seen = []
    for _ in range(4):
        updates, state = step(jnp.array([0.1]), state, params)
        params = kopt.apply_updates(params, updates)
        seen.append(float(params[0]))
    # Step 3: 0.79, average 0.9 * 0.89 + 0.1 * 0.79 = 0.88; step 4: 0.69, average
    # 0.9 * 0.88 + 0.1 * 0.69 = 0.861, written into the variable.
    np.testing.assert_allclose(seen, [0.9, 0.89, 0.79, 0.861], rtol=1e-6)


def test_ema_of_bfloat16_params_kept_in_float32_matches_numpy():
    # In bfloat16, 0.999 rounds to 1: an average kept in the params' dtype (Keras 3's) never
    # moves from the first step's params. slot_dtype=float32 keeps it, and the sum, in float32.
    import ml_dtypes

    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)
    steps = [rng.normal(size=(3, 4)).astype(np.float32) * 0.05 for _ in range(30)]
    tx = kopt.ema(0.999, overwrite_frequency=25, slot_dtype=jnp.float32)
    frozen = kopt.ema(0.999)
    state, frozen_state = tx.init(params), frozen.init(params)
    assert kopt.get_slot(state, "average").dtype == jnp.float32
    update = jax.jit(tx.update)

    p = np.asarray(params)
    average = None
    for i, u in enumerate(steps):
        new_p = (p.astype(np.float32) + u).astype(ml_dtypes.bfloat16)
        if average is None:
            average = new_p.astype(np.float32)
        else:
            average = np.float32(0.999) * average + np.float32(
                1 - np.float32(0.999)
            ) * new_p.astype(np.float32)
        p = average.astype(ml_dtypes.bfloat16) if i + 1 == 25 else new_p

        updates, state = update(jnp.asarray(u), state, params)
        _, frozen_state = frozen.update(jnp.asarray(u), frozen_state, params)
        params = kopt.apply_updates(params, updates)
        np.testing.assert_allclose(kopt.get_slot(state, "average"), average, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(params), p)
        if i == 0:
            first = np.asarray(kopt.get_slot(frozen_state, "average"))
    assert params.dtype == jnp.bfloat16
    assert update._cache_size() == 1
    np.testing.assert_array_equal(kopt.get_slot(frozen_state, "average"), first)
    assert np.abs(average - first.astype(np.float32)).max() > 1e-3  # the float32 one moved
    with pytest.raises(TypeError, match="ema: `slot_dtype` must be a floating-point dtype"):
        kopt.ema(0.9, slot_dtype=jnp.int32)


# aggregate_gradients under shard_map is covered in test_aggregation.py; here, under vmap.


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_aggregate_gradients_under_vmap(reduction):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = rng.normal(size=(16,)).astype(np.float32)
    w = np.array([0.5, -1.0, 2.0], np.float32)
    tx = kopt.aggregate_gradients("replica", reduction=reduction)

    def replica(x, y):
        def loss(w):
            r = (x @ w - y) ** 2
            return jnp.sum(r) if reduction == "sum" else jnp.mean(r)

        g = {"w": jax.grad(loss)(jnp.asarray(w))}
        return tx.update(g, tx.init(g))[0]["w"]

    out = jax.vmap(replica, axis_name="replica")(x.reshape(4, 4, 3), y.reshape(4, 4))
    full = 2.0 * x.T.astype(np.float64) @ (x.astype(np.float64) @ w - y)  # d/dw sum of squares
    expected = full if reduction == "sum" else full / 16
    for r in range(4):
        np.testing.assert_allclose(out[r], expected, rtol=1e-5)


def test_aggregate_gradients_densifies_sparse_gradients():
    tx = kopt.aggregate_gradients("i")

    def replica(row):
        g = kopt.IndexedSlices(jnp.ones((1, 2)), row[None], (3, 2))
        return tx.update(g, tx.init(jnp.zeros((3, 2))))[0]

    out = jax.vmap(replica, axis_name="i")(jnp.array([0, 2, 2]))
    np.testing.assert_array_equal(out[0], [[1, 1], [0, 0], [2, 2]])


def _sgd_m():
    return kopt.sgd(0.1, momentum=0.9)


@pytest.mark.parametrize(
    "build, reference",
    [
        (
            lambda: kopt.chain(kopt.clip_by_global_norm(1.0), _sgd_m()),
            lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)),
        ),
        (lambda: kopt.masked(_sgd_m(), {"w": True, "b": True}), None),
        (lambda: kopt.multi_transform({"s": _sgd_m()}, {"w": "s", "b": "s"}), None),
        (lambda: kopt.apply_if_finite(_sgd_m(), 2), None),
        (lambda: kopt.accumulate_gradients(_sgd_m(), 2), None),
        (lambda: kopt.chain(_sgd_m(), kopt.ema(0.5)), None),
        (
            lambda: kopt.decoupled_weight_decay(kopt.sgd(0.1), 0.5, 0.1),
            lambda: optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1)),
        ),
    ],
    ids=["chain", "masked", "multi_transform", "apply_if_finite", "accumulate", "ema", "decay"],
)
def test_wrappers_pass_a_none_gradient_through(build, reference):
    """A None gradient leaf where the param is an array passes every wrapper as None (the
    param is neither stepped nor decayed) and keeps its slots; the other leaves move as optax
    moves them (optax's momentum SGD, clipping and decay take such a None too)."""
    tx, ref_tx = build(), (reference or (lambda: optax.sgd(0.1, momentum=0.9)))()
    grads = {"w": jnp.array([3.0, -4.0]), "b": None}
    params = ref_params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, 4.0])}
    state, ref_state = tx.init(params), ref_tx.init(params)
    every = 2 if isinstance(state, kopt.AccumulateState) else 1
    structure = jax.tree.structure(state)
    for call in range(2 * every):
        updates, state = jax.jit(tx.update)(grads, state, params)
        assert updates["b"] is None and jax.tree.structure(state) == structure
        if (call + 1) % every:
            np.testing.assert_array_equal(updates["w"], [0.0, 0.0])
            continue
        ref_updates, ref_state = ref_tx.update(grads, ref_state, ref_params)
        np.testing.assert_allclose(updates["w"], ref_updates["w"], rtol=1e-6)
        params = kopt.apply_updates(params, updates)
        ref_params = {**ref_params, "w": ref_params["w"] + ref_updates["w"]}  # b: None
    if "momentum" in kopt.slot_names(state):
        np.testing.assert_array_equal(kopt.get_slot(state, "momentum")["b"], [0.0, 0.0])


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.float16, jnp.bfloat16, jnp.float64, jnp.complex64, jnp.int32]
)
def test_all_finite_finds_each_kind_of_non_finite_value_in_every_dtype(dtype):
    """Checked against NumPy's ``isfinite``, jitted and not, for a NaN and each infinity beside
    the largest finite values, in every float dtype and complex (an integer leaf is finite)."""
    dtype = jnp.dtype(dtype) if dtype != jnp.float64 or jax.config.x64_enabled else jnp.float32
    if jnp.issubdtype(dtype, jnp.integer):
        x = np.arange(-5, 5, dtype=dtype)
        assert bool(kopt.all_finite({"x": x})) and bool(jax.jit(kopt.all_finite)({"x": x}))
        return
    big = float(jnp.finfo(dtype).max)
    base = np.array([1.0, -2.0, big, big, -big, 0.0, -0.0, 3.0], np.float64)
    cases = [None, np.nan, np.inf, -np.inf]
    if jnp.issubdtype(dtype, jnp.complexfloating):
        cases += [complex(0.0, np.nan), complex(np.inf, 0.0)]
    jitted = jax.jit(kopt.all_finite)
    for bad in cases:
        values = base.astype(np.complex128 if jnp.issubdtype(dtype, jnp.complexfloating) else None)
        if bad is not None:
            values[5] = bad
        x = jnp.asarray(values, dtype)
        expected = bool(np.isfinite(np.asarray(x, np.complex128)).all())
        assert expected == (bad is None)
        tree = {"a": jnp.ones(3, dtype), "b": [x]}
        assert bool(kopt.all_finite(tree)) == expected, (dtype, bad)
        assert bool(jitted(tree)) == expected, (dtype, bad)


def test_all_finite_is_computed_once_in_a_step_that_selects_every_leaf_on_it():
    """XLA rewrote ``jnp.all`` of the stacked per-leaf flags into a chain of `and`s and copied
    that chain into every elementwise consumer: each of the n selects below took all n flags,
    O(n**2) instructions to compile (a LossScaleOptimizer's step over 100 variables compiled
    3-4x as long as without the selects). The flag is checked against NumPy's."""

    def tree_of(leaves):
        return {
            "dense": [jnp.asarray(x) for x in leaves[:10]],
            "bf16": jnp.asarray(leaves[10], jnp.bfloat16),
            "sparse": kopt.IndexedSlices(
                jnp.asarray(leaves[11]).reshape(-1, 1), jnp.zeros(13, int)
            ),
        }

    def step(tree):
        finite = kopt.all_finite(tree)
        return finite, [jnp.where(finite, x * 2.0 + 1.0, x) for x in tree["dense"]]

    clean = [np.linspace(-1.0, 1.0, i + 2).astype(np.float32) for i in range(12)]
    compiled = jax.jit(step).lower(tree_of(clean)).compile()
    headers = [line for line in compiled.as_text().splitlines() if line.startswith("%fused")]
    assert max(h.count("pred[]") + h.count("s8[]") for h in headers) <= 2
    for where, bad in [(None, None), (7, np.nan), (10, np.inf), (11, -np.inf), (0, np.inf)]:
        leaves = [x.copy() for x in clean]
        if bad is not None:
            leaves[where][1] = bad
        expected = all(np.isfinite(x).all() for x in leaves)
        assert bool(compiled(tree_of(leaves))[0]) == expected
        assert bool(kopt.all_finite(tree_of(leaves))) == expected
    assert bool(kopt.all_finite({})) is True


def test_a_mask_or_labels_function_refuses_packed_buffers():
    """A mask or label function maps over what it is given: on kopt.pack's params, or inside
    kopt.flatten, it saw each packed buffer as one leaf and selected whole buffers (a "decay
    kernels only" mask decayed nothing, a "freeze biases" label froze the model), silently."""
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    decay_mask = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)  # noqa: E731
    labels = lambda p: jax.tree.map(lambda a: "train" if a.ndim > 1 else "freeze", p)  # noqa: E731
    split = {"train": kopt.sgd(1.0), "freeze": optax.set_to_zero()}
    cases = [
        ("masked", "mask", kopt.masked(kopt.add_decayed_weights(0.5), decay_mask)),
        ("multi_transform", "labels", kopt.multi_transform(split, labels)),
        ("masked", "mask", kopt.adamw(1.0, weight_decay=0.5, mask=decay_mask)),
    ]
    for owner, what, tx in cases:
        for wrap, where in ((kopt.pack, "kopt.pack"), (None, "kopt.flatten")):
            p, t = (wrap(params), tx) if wrap else (params, kopt.flatten(tx))
            with pytest.raises(ValueError, match=rf"{owner}: `{what}` .* {where}'s packed buffers"):
                t.init(p)
        with pytest.raises(ValueError, match="a smaller max_leaf_size packs fewer"):
            tx.init(kopt.pack(params))  # the way out it gives is the right way round
        # Unpacked, the same pieces select by param, and so they do on a pack with nothing
        # packed (every param over max_leaf_size stays loose).
        tx.init(params)
        tx.init(kopt.pack(params, max_leaf_size=1))
    # A mask tree says what it selects: a True prefix selects every buffer, as it does every
    # param (only functions of the params are refused).
    for tx in (
        kopt.flatten(kopt.masked(kopt.sgd(0.1), True)),
        kopt.flatten(kopt.multi_transform({"all": kopt.sgd(0.1)}, "all")),
    ):
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
        np.testing.assert_allclose(updates["dense"]["bias"], np.full(3, -0.1), rtol=1e-6)
    kopt.masked(kopt.adam(0.1), True).init(kopt.pack(params))
    # masked outside flatten sees the params whole.
    outer = kopt.masked(kopt.flatten(kopt.add_decayed_weights(0.5)), decay_mask)
    updates, _ = outer.update(jax.tree.map(jnp.zeros_like, params), outer.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], np.full((4, 3), 0.5))
    np.testing.assert_allclose(updates["dense"]["bias"], np.zeros(3))


def test_masked_takes_its_transformation_by_the_contracts_name():
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    tx = kopt.masked(transformation=kopt.add_decayed_weights(0.5), mask={"w": True, "b": False})
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], [0.5, 0.5])


@pytest.mark.parametrize(
    "build, culprit",
    [
        (
            lambda: kopt.masked(kopt.sgd(0.1), {"w": True, "b": None}),
            r"masked: `mask` is None at \['b'\]",
        ),
        (
            lambda: kopt.multi_transform({"a": kopt.sgd(0.1)}, {"w": "a", "b": None}),
            r"multi_transform: `labels` is None at \['b'\]",
        ),
        (
            lambda: kopt.multi_transform(
                {"a": kopt.sgd(0.1)},
                lambda p: jax.tree.map(lambda x: "a" if x.ndim > 1 else None, p),
            ),
            r"multi_transform: `labels` is None at \['b'\]",
        ),
        (
            lambda: kopt.multi_transform({"a": kopt.sgd(0.1)}, lambda p: None),
            r"multi_transform: `labels` is None at <root>",
        ),
    ],
    ids=["mask-leaf", "label-leaf", "label-function", "labels-function-None"],
)
def test_a_param_without_a_mask_value_or_label_is_refused(build, culprit):
    """A None mask value or label over a param selected no transformation, and the raw
    gradient came back as the update (an ascent step); optax refuses such labels too."""
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=culprit):
        build().init(params)
    # update too, given a state of the same kind whose mask or labels select every leaf
    tx = build()
    if "masked" in culprit:
        state = kopt.masked(kopt.sgd(0.1), {"w": True, "b": True}).init(params)
    else:
        state = kopt.multi_transform({"a": kopt.sgd(0.1)}, {"w": "a", "b": "a"}).init(params)
    before = jax.tree.map(np.asarray, state)
    with pytest.raises(ValueError, match=culprit):
        tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    chex.assert_trees_all_equal(state, before)


@pytest.mark.parametrize(
    "build, culprit",
    [
        (lambda: kopt.masked(kopt.sgd(0.1), None), "masked: `mask` is None"),
        (
            lambda: kopt.multi_transform({"a": kopt.sgd(0.1)}, None),
            "multi_transform: `labels` is None",
        ),
    ],
    ids=["masked", "multi_transform"],
)
def test_a_none_mask_or_labels_is_refused_when_built(build, culprit):
    with pytest.raises(ValueError, match=culprit):
        build()


def test_a_none_label_over_a_none_param_or_a_none_gradient_still_works():
    """None over an empty subtree selects nothing, and a None *gradient* under a label keeps
    passing as None (the param is not stepped)."""
    params = {"w": jnp.ones(2), "b": None}
    tx = kopt.multi_transform({"a": kopt.sgd(0.5)}, {"w": "a", "b": None})
    updates, _ = tx.update({"w": jnp.ones(2), "b": None}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.5, -0.5])
    assert updates["b"] is None
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    tx = kopt.masked(kopt.sgd(0.5), {"w": True, "b": True})
    updates, _ = tx.update({"w": jnp.ones(2), "b": None}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.5, -0.5])
    assert updates["b"] is None


def test_ema_keeps_the_average_of_a_param_without_a_gradient():
    """A None gradient keeps a param's slots through every optimizer and wrapper; ema moved
    that param's average towards it (here a value set outside the optimizer)."""
    tx = kopt.chain(kopt.sgd(0.5), kopt.ema(0.5))
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    step = jax.jit(tx.update)
    updates, state = step({"w": jnp.ones(2), "b": jnp.ones(2)}, tx.init(params), params)
    params = kopt.apply_updates(params, updates)  # both 0.5; the first average is the params
    params = {"w": params["w"], "b": jnp.full(2, 10.0)}
    updates, state = step({"w": jnp.ones(2), "b": None}, state, params)
    assert updates["b"] is None
    average = kopt.get_slot(state, "average")
    np.testing.assert_array_equal(average["b"], [0.5, 0.5])
    np.testing.assert_allclose(average["w"], 0.5 * 0.5 + 0.5 * (0.5 - 0.5))  # w: 0.5 -> 0.0
