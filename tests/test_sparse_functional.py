"""Row-sparse gradients (IndexedSlices) follow Keras's sparse rules.

Each case warms the slots up with one dense step (so that every row's slots are non-zero), then
applies a gradient touching rows {0, 2, 2} of a [6, 3] table, and compares with the dense step on
the same gradient with the duplicate rows summed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt

TOUCHED = [0, 2]
UNTOUCHED = [1, 3, 4, 5]
RNG = np.random.default_rng(3)
TABLE = RNG.normal(size=(6, 3)).astype(np.float32)
WARMUP = RNG.normal(size=(6, 3)).astype(np.float32)
VALUES = RNG.normal(size=(3, 3)).astype(np.float32)
INDICES = np.array([0, 2, 2], np.int32)


def dense_equivalent():
    g = np.zeros((6, 3), np.float32)
    np.add.at(g, INDICES, VALUES)
    return g


def sparse_and_dense_steps(tx):
    update = jax.jit(tx.update)
    table = jnp.asarray(TABLE)
    updates, state = update(jnp.asarray(WARMUP), tx.init(table), table)
    table = kopt.apply_updates(table, updates)
    sparse = kopt.IndexedSlices(jnp.asarray(VALUES), jnp.asarray(INDICES), (6, 3))
    sparse_updates, sparse_state = update(sparse, state, table)
    dense_updates, dense_state = update(jnp.asarray(dense_equivalent()), state, table)
    return {
        "before": (np.asarray(table), state),
        "sparse": (
            np.asarray(kopt.apply_updates(table, sparse_updates)),
            sparse_state,
            sparse_updates,
        ),
        "dense": (np.asarray(kopt.apply_updates(table, dense_updates)), dense_state),
    }


def slots_of(state):
    return {name: np.asarray(kopt.get_slot(state, name)) for name in kopt.slot_names(state)}


ROW_SPARSE = {
    "sgd": lambda: kopt.sgd(0.1),
    "sgd_momentum": lambda: kopt.sgd(0.1, momentum=0.9),
    "sgd_nesterov": lambda: kopt.sgd(0.1, momentum=0.9, nesterov=True),
    "adagrad": lambda: kopt.adagrad(0.1),
    "adadelta": lambda: kopt.adadelta(1.0),
    "adamax": lambda: kopt.adamax(0.1),
    "rmsprop_momentum": lambda: kopt.rmsprop(0.1, momentum=0.5),
    "rmsprop_centered_momentum": lambda: kopt.rmsprop(0.1, momentum=0.5, centered=True),
    "ftrl": lambda: kopt.ftrl(0.1, l1_regularization_strength=0.01, beta=0.1),
    "ftrl_shrinkage": lambda: kopt.ftrl(0.1, l2_shrinkage_regularization_strength=0.1),
}


@pytest.mark.parametrize("name", list(ROW_SPARSE))
def test_row_sparse_rules_touch_only_the_named_rows(name):
    runs = sparse_and_dense_steps(ROW_SPARSE[name]())
    table0, state0 = runs["before"]
    sparse_table, sparse_state, sparse_updates = runs["sparse"]
    dense_table, dense_state = runs["dense"]
    assert isinstance(sparse_updates, kopt.IndexedSlices)

    np.testing.assert_allclose(
        sparse_table[TOUCHED], dense_table[TOUCHED], rtol=1e-5, atol=1e-7, err_msg=name
    )
    np.testing.assert_array_equal(sparse_table[UNTOUCHED], table0[UNTOUCHED], err_msg=name)
    before, sparse_slots, dense_slots = (
        slots_of(state0),
        slots_of(sparse_state),
        slots_of(dense_state),
    )
    for slot in before:
        np.testing.assert_allclose(
            sparse_slots[slot][TOUCHED], dense_slots[slot][TOUCHED], rtol=1e-5, err_msg=slot
        )
        np.testing.assert_array_equal(
            sparse_slots[slot][UNTOUCHED], before[slot][UNTOUCHED], err_msg=slot
        )


@pytest.mark.parametrize(
    "name, build, decays",
    [
        ("rmsprop", lambda: kopt.rmsprop(0.1, rho=0.8), {"rms": 0.8}),
        ("rmsprop_centered", lambda: kopt.rmsprop(0.1, rho=0.8, centered=True), {"rms": 0.8}),
        ("nadam", lambda: kopt.nadam(0.1, beta_1=0.7, beta_2=0.95), {"m": 0.7, "v": 0.95}),
    ],
)
def test_slots_decay_everywhere_but_params_move_only_on_named_rows(name, build, decays):
    runs = sparse_and_dense_steps(build())
    table0, state0 = runs["before"]
    sparse_table, sparse_state, sparse_updates = runs["sparse"]
    dense_table, dense_state = runs["dense"]
    assert isinstance(sparse_updates, kopt.IndexedSlices)
    np.testing.assert_allclose(sparse_table[TOUCHED], dense_table[TOUCHED], rtol=1e-5)
    np.testing.assert_array_equal(sparse_table[UNTOUCHED], table0[UNTOUCHED])
    before, sparse_slots, dense_slots = (
        slots_of(state0),
        slots_of(sparse_state),
        slots_of(dense_state),
    )
    if name == "rmsprop_centered":
        decays = {**decays, "mg": 0.8}
    for slot, rate in decays.items():
        np.testing.assert_allclose(sparse_slots[slot], dense_slots[slot], rtol=1e-5, err_msg=slot)
        np.testing.assert_allclose(
            sparse_slots[slot][UNTOUCHED], rate * before[slot][UNTOUCHED], rtol=1e-6, err_msg=slot
        )


@pytest.mark.parametrize(
    "build, moves_untouched_rows",
    [
        (lambda: kopt.adam(0.1), True),
        (lambda: kopt.adam(0.1, amsgrad=True), True),
        (lambda: kopt.adamw(0.1, weight_decay=0.1), True),
        (lambda: kopt.lion(0.1), True),
        (lambda: kopt.lamb(0.1), True),
        (lambda: kopt.adafactor(0.1), False),
    ],
    ids=["adam", "adam_amsgrad", "adamw", "lion", "lamb", "adafactor"],
)
def test_dense_rules_treat_a_sparse_gradient_as_dense(build, moves_untouched_rows):
    runs = sparse_and_dense_steps(build())
    sparse_table, sparse_state, _ = runs["sparse"]
    dense_table, dense_state = runs["dense"]
    np.testing.assert_allclose(sparse_table, dense_table, rtol=1e-6, atol=1e-7)
    for slot, value in slots_of(dense_state).items():
        np.testing.assert_allclose(slots_of(sparse_state)[slot], value, rtol=1e-6, err_msg=slot)
    # Keras's sparse Adam is the dense rule: every row decays and moves (Adafactor's step is
    # proportional to the gradient, so its untouched rows stay).
    table0, _ = runs["before"]
    assert np.all(sparse_table[UNTOUCHED] != table0[UNTOUCHED]) == moves_untouched_rows


SAME_AS_DENSE = {
    "sgd": lambda: kopt.sgd(0.1),
    "rmsprop": lambda: kopt.rmsprop(0.1),
    "rmsprop_centered": lambda: kopt.rmsprop(0.1, centered=True),
    "adam": lambda: kopt.adam(0.1),
    "adagrad": lambda: kopt.adagrad(0.1),
    "adamw": lambda: kopt.adamw(0.1),
    "lion": lambda: kopt.lion(0.1),
    "lamb": lambda: kopt.lamb(0.1),
    "adafactor": lambda: kopt.adafactor(0.1),
}
NOT_AS_DENSE = {
    "sgd_momentum": lambda: kopt.sgd(0.1, momentum=0.9),
    "rmsprop_momentum": lambda: kopt.rmsprop(0.1, momentum=0.9),
    "adamax": lambda: kopt.adamax(0.1),
    "nadam": lambda: kopt.nadam(0.1),
    "ftrl": lambda: kopt.ftrl(0.1),
    "adadelta": lambda: kopt.adadelta(1.0, rho=0.5, epsilon=1e-3),
}


@pytest.mark.parametrize("name", [*SAME_AS_DENSE, *NOT_AS_DENSE])
def test_which_sparse_rules_give_the_dense_rules_numbers(name):
    """docs/deviations.md: minimize over ``jnp.take`` (the dense rule on a gradient with zero
    rows) gives the sparse rule's numbers for these optimizers only. Adadelta was listed among
    them, but its dense rule decays both accumulators of a row with a zero gradient, which the
    sparse rule leaves: row 0's later step differs."""
    tx = {**SAME_AS_DENSE, **NOT_AS_DENSE}[name]()
    sparse = dense = jnp.asarray(TABLE[:4])
    sparse_state = dense_state = tx.init(sparse)
    for row in [0, 1, 1, 1, 0]:
        g = kopt.IndexedSlices(jnp.asarray(VALUES[:1]), jnp.array([row]), (4, 3))
        updates, sparse_state = tx.update(g, sparse_state, sparse)
        sparse = kopt.apply_updates(sparse, updates)
        updates, dense_state = tx.update(g.to_dense(), dense_state, dense)
        dense = kopt.apply_updates(dense, updates)
    same = np.allclose(sparse, dense, rtol=1e-5, atol=1e-6)
    assert same == (name in SAME_AS_DENSE), np.abs(np.asarray(sparse - dense)).max()


@pytest.mark.parametrize(
    "build",
    [
        lambda: kopt.sgd(0.1, momentum=0.9),
        lambda: kopt.rmsprop(0.1, momentum=0.9),
        lambda: kopt.adamax(0.1),
        lambda: kopt.adadelta(1.0),
    ],
    ids=["sgd_momentum", "rmsprop_momentum", "adamax", "adadelta"],
)
def test_padding_rows_go_at_the_index_past_the_table_not_at_a_real_one(build):
    """docs/performance.md advised padding a sparse gradient with zero rows "at any index, or
    at var.shape[0]". A zero row at index 0 names row 0, which these rules then step (its
    momentum moves it, Adamax's and Adadelta's slots decay); at var.shape[0] it is skipped."""
    tx = build()
    table = jnp.asarray(TABLE[:4])
    first = kopt.IndexedSlices(jnp.asarray(VALUES[:1]), jnp.array([0]), (4, 3))
    updates, state = tx.update(first, tx.init(table), table)  # row 0 gets a history
    table = kopt.apply_updates(table, updates)

    def step(padding_index):
        values, indices = jnp.asarray(VALUES[1:2]), jnp.array([1])
        if padding_index is not None:
            values = jnp.concatenate([values, jnp.zeros((1, 3))])
            indices = jnp.array([1, padding_index])
        updates, new_state = tx.update(kopt.IndexedSlices(values, indices, (4, 3)), state, table)
        return kopt.apply_updates(table, updates), slots_of(new_state)

    unpadded, unpadded_slots = step(None)
    past_the_end, past_the_end_slots = step(4)
    np.testing.assert_array_equal(past_the_end, unpadded)
    for name, value in unpadded_slots.items():
        np.testing.assert_array_equal(past_the_end_slots[name], value, err_msg=name)
    at_row_0, at_row_0_slots = step(0)
    assert not np.array_equal(at_row_0, unpadded) or any(
        not np.array_equal(at_row_0_slots[name], value) for name, value in unpadded_slots.items()
    )


def test_adagrad_sums_duplicates_before_squaring():
    # tf.keras: Adagrad with indices [0, 0] and values [1, 1] gives accumulator[0] = (1 + 1)**2.
    tx = kopt.adagrad(1.0, initial_accumulator_value=0.0, epsilon=0.0)
    table = jnp.zeros((3, 2))
    grad = kopt.IndexedSlices(jnp.ones((2, 2)), jnp.array([0, 0]))
    updates, state = tx.update(grad, tx.init(table), table)
    np.testing.assert_array_equal(kopt.get_slot(state, "accumulator"), [[4, 4], [0, 0], [0, 0]])
    np.testing.assert_array_equal(kopt.apply_updates(table, updates), [[-1, -1], [0, 0], [0, 0]])


def test_sgd_without_momentum_scatter_adds_duplicates():
    tx = kopt.sgd(0.5)
    table = jnp.zeros((4, 1))
    grad = kopt.IndexedSlices(jnp.array([[1.0], [2.0], [4.0]]), jnp.array([3, 1, 3]))
    updates, _ = jax.jit(tx.update)(grad, tx.init(table), table)
    np.testing.assert_array_equal(kopt.apply_updates(table, updates), [[0.0], [-1.0], [0], [-2.5]])


def test_sparse_and_dense_leaves_mix_in_one_tree():
    tx = kopt.chain(kopt.clip_by_norm(10.0), kopt.adagrad(1.0, initial_accumulator_value=0.0))
    params = {"emb": jnp.zeros((5, 2)), "w": jnp.zeros(2)}
    grads = {
        "emb": kopt.IndexedSlices(jnp.array([[3.0, 4.0]]), jnp.array([4])),
        "w": jnp.array([2.0, -2.0]),
    }
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    new = kopt.apply_updates(params, updates)
    np.testing.assert_allclose(new["emb"][4], [-1.0, -1.0], rtol=1e-6)  # -g / sqrt(g**2)
    np.testing.assert_array_equal(new["emb"][:4], np.zeros((4, 2)))
    np.testing.assert_allclose(new["w"], [-1.0, 1.0], rtol=1e-6)


ALL_SPARSE = {
    **ROW_SPARSE,
    "adam": lambda: kopt.adam(0.1),
    "adam_amsgrad": lambda: kopt.adam(0.1, amsgrad=True),
    "nadam": lambda: kopt.nadam(0.1),
    "rmsprop": lambda: kopt.rmsprop(0.1),
    "lion": lambda: kopt.lion(0.1),
}


# Negative indices that would count from the end (-1, -6), one past that (-7), one past the
# last row (6) and far past it (100).
BAD_INDICES = [-1, -6, -7, 6, 100]


@pytest.mark.parametrize("name", list(ALL_SPARSE))
def test_an_index_outside_the_table_names_no_row(name):
    """Negative indices do not count from the end and large ones are not clamped: the rows
    they name are ignored by the slots and the params alike (a compiled step cannot raise).

    The index is data, not shape: every bad index runs through the same compiled step."""
    tx = ALL_SPARSE[name]()
    update = jax.jit(tx.update)
    table = jnp.asarray(TABLE)
    state = tx.init(table)
    without = kopt.IndexedSlices(jnp.asarray(VALUES), jnp.asarray(INDICES), (6, 3))
    updates, good_state = update(without, state, table)
    expected_table = np.asarray(kopt.apply_updates(table, updates))
    expected_slots = slots_of(good_state)
    for bad in BAD_INDICES:
        with_bad = kopt.IndexedSlices(
            jnp.asarray(np.concatenate([VALUES, 100 * VALUES[:1]])),
            jnp.asarray(np.append(INDICES, bad).astype(np.int32)),
            (6, 3),
        )
        bad_updates, bad_state = update(with_bad, state, table)
        np.testing.assert_array_equal(
            np.asarray(kopt.apply_updates(table, bad_updates)),
            expected_table,
            err_msg=f"index {bad}",
        )
        for slot, value in expected_slots.items():
            np.testing.assert_array_equal(
                slots_of(bad_state)[slot], value, err_msg=f"{slot}, index {bad}"
            )
        np.testing.assert_array_equal(
            with_bad.to_dense(), without.to_dense(), err_msg=f"index {bad}"
        )


def test_the_facade_ignores_an_index_outside_the_table():
    for name in ("SGD", "Adagrad", "RMSprop", "Adam"):
        var = kopt.Variable([[1.0], [2.0], [3.0]])
        ref = kopt.Variable([[1.0], [2.0], [3.0]])
        opt, ref_opt = getattr(kopt.optimizers, name)(0.1), getattr(kopt.optimizers, name)(0.1)
        bad = kopt.IndexedSlices(jnp.array([[1.0], [0.5]]), jnp.array([-1, 1]), (3, 1))
        opt.apply_gradients([(bad, var)])
        ref_opt.apply_gradients(
            [(kopt.IndexedSlices(jnp.array([[0.5]]), jnp.array([1]), (3, 1)), ref)]
        )
        np.testing.assert_array_equal(var.numpy(), ref.numpy(), err_msg=name)
        for slot in opt.get_slot_names():
            np.testing.assert_array_equal(
                opt.get_slot(var, slot).numpy(), ref_opt.get_slot(ref, slot).numpy(), err_msg=slot
            )


@pytest.mark.parametrize("name", ["Adagrad", "RMSprop", "Ftrl"])
def test_the_facade_takes_an_empty_gradient_for_an_empty_table(name):
    """A table with no rows (an empty embedding) and a gradient naming none: tf.keras steps
    and changes nothing; the padded row the step adds has no table row to clamp to."""
    table = kopt.Variable(np.zeros((0, 2), np.float32))
    opt = getattr(kopt.optimizers, name)(0.1)
    grad = kopt.IndexedSlices(jnp.zeros((0, 2)), jnp.zeros((0,), jnp.int32), (0, 2))
    opt.apply_gradients([(grad, table)])
    assert table.shape == (0, 2) and int(opt.iterations.numpy()) == 1


@pytest.mark.parametrize(
    "dtype, rows", [(np.uint8, 256), (np.uint8, 300), (np.int16, 32768), (np.uint16, 70000)]
)
@pytest.mark.parametrize("build", [lambda: kopt.sgd(1.0), lambda: kopt.adagrad(1.0)])
def test_narrow_integer_indices_name_their_rows(dtype, rows, build):
    """The updates mark a row outside the table with the index ``rows``, which a uint8 or int16
    cannot hold: 256 wrapped to 0 and 300 to 44, so every update landed on row 0 or 44 (or
    int16 raised an OverflowError). Narrow indices are now taken as int32."""
    table = jnp.zeros((rows, 2))
    named = [5, 100, 250]
    g = kopt.IndexedSlices(jnp.ones((3, 2)), jnp.asarray(np.array(named, dtype)), (rows, 2))
    tx = build()
    updates, _ = tx.update(g, tx.init(table), table)
    moved = np.flatnonzero(np.any(np.asarray(kopt.apply_updates(table, updates)) != 0, axis=1))
    assert moved.tolist() == named
    assert kopt.IndexedSlices(g.values, np.array(named, dtype)).indices.dtype == np.int32


def test_the_facade_steps_the_rows_of_uint8_indices():
    table = kopt.Variable(jnp.ones((256, 2)))
    g = kopt.IndexedSlices(jnp.ones((3, 2)), jnp.array([5, 7, 9], jnp.uint8), (256, 2))
    kopt.optimizers.Ftrl(0.1).apply_gradients([(g, table)])
    moved = np.flatnonzero(np.any(table.numpy() != 1, axis=1))
    assert moved.tolist() == [5, 7, 9]


def test_wider_update_rows_on_a_low_precision_table_round_once_without_widening_it():
    """float32 update rows for a float16 table widened the whole table to float32 (a table-sized
    temporary, twice the table). Each named row's sum is now rounded once, as the dense sum."""
    rows, dim = 4099, 7
    rng = np.random.default_rng(3)
    table = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float16)
    indices = jnp.asarray([3, 17, 3, 4000, rows + 5, 17], jnp.int32)  # repeats, one outside
    values = jnp.asarray(rng.normal(size=(6, dim)) * 1e-3, jnp.float32)
    sparse = kopt.IndexedSlices(values, indices, (rows, dim))
    out = kopt.apply_updates(table, sparse)
    dense = jnp.zeros((rows, dim)).at[indices].add(values, mode="drop")
    assert out.dtype == jnp.float16
    np.testing.assert_array_equal(out, kopt.apply_updates(table, dense))
    compiled = jax.jit(kopt.apply_updates, donate_argnums=0).lower(table, sparse).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < table.nbytes / 4, temp


def test_the_facade_names_the_variable_of_a_sparse_gradient_with_another_dense_shape():
    """The error named the functional piece and a list position ("scale_by_adagrad: sparse
    gradient [1] ..."), and Python-list indices raised an AttributeError."""
    a = kopt.Variable(np.zeros((4, 3), np.float32), name="user_emb")
    b = kopt.Variable(np.zeros((6, 3), np.float32), name="item_emb")
    opt = kopt.optimizers.Adagrad(0.1)
    g = kopt.IndexedSlices(jnp.ones((2, 3)), jnp.array([0, 5]), (7, 3))
    with pytest.raises(ValueError, match=r"item_emb:0 has dense_shape \(7, 3\).*\(6, 3\)"):
        opt.apply_gradients([(jnp.ones((4, 3)), a), (g, b)])
    assert int(opt.iterations.numpy()) == 0 and not a.numpy().any()
    opt.apply_gradients([(kopt.IndexedSlices([[1.0, 1.0, 1.0]], [5], (6, 3)), b)])
    assert np.flatnonzero(b.numpy().any(axis=1)).tolist() == [5]
