"""API.md section 3 for the facade: a rejected or failed call changes nothing, and no update is
lost across threads."""

import copy
import pickle
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt import optimizers


def snapshot(opt, variables):
    """Everything a call could change: variables, weights (iterations, slots), hyperparameters."""
    return {
        "values": [v.numpy() for v in variables],
        "names": [w.name for w in opt.weights],
        "weights": opt.get_weights(),
        "slot_names": list(opt.get_slot_names()),
        "config": opt.get_config(),
    }


def assert_unchanged(before, after):
    assert after["names"] == before["names"]
    assert after["slot_names"] == before["slot_names"]
    assert after["config"] == before["config"]
    for key in ("values", "weights"):
        assert len(after[key]) == len(before[key])
        for b, a in zip(before[key], after[key], strict=True):
            np.testing.assert_array_equal(a, b)


ONES_2 = np.ones(2, np.float32)


def trained_adam():
    a, b = kopt.Variable([1.0, 2.0], name="a"), kopt.Variable([3.0], name="b")
    opt = optimizers.Adam(learning_rate=0.1)
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), b)])
    return opt, a, b


def none_constraint(value):
    """A constraint that forgot to return its value."""


BAD_CALLS = {
    "non-variable": (
        TypeError,
        "item 1",
        lambda opt, a, b: opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), jnp.ones(1))]),
    ),
    "same variable twice": (
        ValueError,
        "a:0 appears twice",
        lambda opt, a, b: opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(2), a)]),
    ),
    "wrong shape": (
        ValueError,
        "b:0 has shape",
        lambda opt, a, b: opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(3), b)]),
    ),
    "wrong dtype": (
        TypeError,
        "b:0 has dtype int32",
        lambda opt, a, b: opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1, jnp.int32), b)]),
    ),
    "integer variable": (
        ValueError,
        "int32 for step",
        lambda opt, a, b: opt.apply_gradients(
            [(jnp.ones(2), a), (jnp.ones(1, jnp.int32), kopt.Variable([1], name="step"))]
        ),
    ),
    "new variable beside a bad one": (
        ValueError,
        "b:0 has shape",
        lambda opt, a, b: opt.apply_gradients(
            [(jnp.ones(1), kopt.Variable([0.0], name="c")), (jnp.ones(2), b)]
        ),
    ),
    "string learning rate": (
        TypeError,
        "learning_rate",
        lambda opt, a, b: setattr(opt, "learning_rate", "0.1"),
    ),
    "beta_1 above 1": (ValueError, "beta_1", lambda opt, a, b: setattr(opt, "beta_1", 1.5)),
    "negative decay": (ValueError, "decay", lambda opt, a, b: setattr(opt, "decay", -0.1)),
    "negative lr": (ValueError, "learning_rate", lambda opt, a, b: setattr(opt, "lr", -1.0)),
    "negative clipnorm": (ValueError, "clipnorm", lambda opt, a, b: setattr(opt, "clipnorm", -1)),
    # get_slot raises tf.keras's KeyError, which is also a ValueError here.
    "unknown slot name": (
        ValueError,
        "No slot 'zzz' for variable 'a:0'",
        lambda opt, a, b: opt.get_slot(a, "zzz"),
    ),
    "get_slot of a non-variable": (
        KeyError,
        "No slots for variable",
        lambda opt, a, b: opt.get_slot(jnp.ones(2), "m"),
    ),
    "grad_loss of the wrong shape": (
        ValueError,
        r"`grad_loss` has shape \(3,\), but the loss has shape \(2,\)",
        lambda opt, a, b: opt.minimize(lambda: a * 2.0, [a], grad_loss=jnp.ones(3)),
    ),
    "negative slot shape": (
        ValueError,
        "`shape` of slot 'q'",
        lambda opt, a, b: opt.add_slot(a, "q", shape=(-1,)),
    ),
    "negative add_weight shape": (
        ValueError,
        "add_weight: `shape` of weight 'x' must be a sequence of ints >= 0, received \\(-1,\\)",
        lambda opt, a, b: opt.add_weight("x", shape=(-1,)),
    ),
    "add_slot initializer that is no value": (
        TypeError,
        "`initializer` must be 'zeros', 'ones', a value or a callable.*received object",
        lambda opt, a, b: opt.add_slot(a, "q", initializer=object()),
    ),
    "constraint returning None": (
        TypeError,
        "the constraint .*none_constraint of c:0 returned None",
        lambda opt, a, b: opt.apply_gradients(
            [(ONES_2, a), (jnp.ones(1), kopt.Variable([1.0], name="c", constraint=none_constraint))]
        ),
    ),
    "set_weights(None)": (
        TypeError,
        "`weights` must be a list",
        lambda opt, a, b: opt.set_weights(None),
    ),
    "negative step count in set_weights": (
        ValueError,
        r"step count \(iterations\) must be >= 0",
        lambda opt, a, b: opt.set_weights([np.int64(-3), *opt.get_weights()[1:]]),
    ),
    "float step count in set_weights": (
        TypeError,
        r"step count \(iterations\) must be an integer",
        lambda opt, a, b: opt.set_weights([np.float32(2.5), *opt.get_weights()[1:]]),
    ),
    "iterations assigned a float": (
        TypeError,
        "iter:0: cannot assign a value of dtype float",
        lambda opt, a, b: opt.iterations.assign(2.7),
    ),
    "iterations assigned past int32": (
        ValueError,
        "iter:0: the value 8589934592 is out of the range of its dtype int32",
        lambda opt, a, b: opt.iterations.assign(2**33),
    ),
    # The hyperparameters' and the step count's own variables were assigned unchecked (the
    # next steps trained on beta_1=1.5, or divided by zero for iterations -1).
    "beta_1 variable assigned above 1": (
        ValueError,
        r"Adam: `beta_1` must be <= 1\.0, received 1\.5",
        lambda opt, a, b: opt.beta_1.assign(1.5),
    ),
    "lr variable assigned a negative": (
        ValueError,
        r"Adam: `learning_rate` must be >= 0, received -0\.1$",
        lambda opt, a, b: opt.lr.assign(-0.1),
    ),
    "beta_2 variable added past 1": (
        ValueError,
        "Adam: `beta_2` must be <= 1",
        lambda opt, a, b: opt.beta_2.assign_add(0.5),
    ),
    "decay variable assigned NaN": (
        ValueError,
        "Adam: `decay` must be finite",
        lambda opt, a, b: opt.decay.assign(np.nan),
    ),
    "iterations assigned a negative": (
        ValueError,
        r"step count \(iterations\) must be >= 0, received -1",
        lambda opt, a, b: opt.iterations.assign(-1),
    ),
    "iterations taken below 0": (
        ValueError,
        r"step count \(iterations\) must be >= 0",
        lambda opt, a, b: opt.iterations.assign_sub(5),
    ),
    # The facade keeps its state in Python objects: inside a jitted function its variables
    # would be left holding tracers.
    "apply_gradients inside jax.jit": (
        RuntimeError,
        "gradient of b:0 is a traced value.*inside jax.jit",
        lambda opt, a, b: jax.jit(
            lambda g: opt.apply_gradients([(ONES_2, a), (g, b)]) and g  # a's is not traced
        )(jnp.ones(1)),
    ),
    "minimize inside jax.jit": (
        RuntimeError,
        "gradient of a:0 is a traced value.*inside jax.jit",
        lambda opt, a, b: jax.jit(lambda x: opt.minimize(lambda: jnp.sum(a * x), [a]) and x)(
            jnp.ones(2)
        ),
    ),
    # The message named the rows as padded for the compiled step ((4,) for 3 rows).
    "sparse gradient rows of the wrong shape": (
        ValueError,
        r"sparse gradient for e:0 \(shape \(10, 2\)\) has values of shape \(3,\) and indices "
        r"of shape \(3,\)",
        lambda opt, a, b: opt.apply_gradients(
            [
                (ONES_2, a),
                (
                    kopt.IndexedSlices(jnp.ones(3), jnp.arange(3), (10, 2)),
                    kopt.Variable(jnp.zeros((10, 2)), name="e"),
                ),
            ]
        ),
    ),
    # These named the functional piece and a leaf path ("scale_by_adam: sparse gradient [1]").
    "sparse gradient with float indices": (
        TypeError,
        "sparse gradient for e:0 has indices of dtype float32, expected integers",
        lambda opt, a, b: opt.apply_gradients(
            [
                (ONES_2, a),
                (
                    kopt.IndexedSlices(jnp.ones((1, 2)), jnp.array([0.0]), (4, 2)),
                    kopt.Variable(jnp.zeros((4, 2)), name="e"),
                ),
            ]
        ),
    ),
    "sparse gradient for a scalar variable": (
        ValueError,
        "sparse gradient for s:0 is for a scalar variable",
        lambda opt, a, b: opt.apply_gradients(
            [
                (ONES_2, a),
                (kopt.IndexedSlices(jnp.ones(1), jnp.array([0])), kopt.Variable(1.0, name="s")),
            ]
        ),
    ),
    "sparse gradient for a constrained variable": (
        RuntimeError,  # tf.keras's type; also a ValueError here
        "constraint function on a sparse variable \\(c:0\\)",
        lambda opt, a, b: opt.apply_gradients(
            [
                (
                    kopt.IndexedSlices(jnp.ones((1, 2)), jnp.array([0]), (2, 2)),
                    kopt.Variable(jnp.ones((2, 2)), name="c", constraint=lambda w: w),
                )
            ]
        ),
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_names_the_culprit_and_changes_nothing(case):
    error, match, call = BAD_CALLS[case]
    opt, a, b = trained_adam()
    before = snapshot(opt, [a, b])
    with pytest.raises(error, match=match):
        call(opt, a, b)
    assert_unchanged(before, snapshot(opt, [a, b]))
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), b)])  # still usable
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize(
    "var_list, error, match",
    [
        (lambda a, b: [a, a], ValueError, "a:0 appears twice"),
        (lambda a, b: [kopt.Variable([1], name="iv")], ValueError, "No gradients provided"),
        (lambda a, b: None, ValueError, "`var_list` must be a list of kopt.Variables"),
        (lambda a, b: lambda: None, ValueError, "`var_list` must be a list of kopt.Variables"),
    ],
)
@pytest.mark.parametrize("make", [optimizers.Adam, optimizers.LossScaleOptimizer])
def test_a_rejected_minimize_keeps_no_assignment_of_the_loss(make, var_list, error, match):
    """A loss that updates a running statistic: a repeated or integer-only var_list was
    refused after the loss's assignment was made (a wrong grad_loss rolled it back), and
    var_list=None was a silent no-op (tf.keras raises)."""
    opt = optimizers.Adam(0.1) if make is optimizers.Adam else make(optimizers.Adam(0.1))
    a, b = kopt.Variable([1.0, 2.0], name="a"), kopt.Variable([3.0], name="b")
    stat = kopt.Variable(0.0, name="stat", trainable=False)

    def loss():
        stat.assign_add(1.0)
        return jnp.sum(a * a) + jnp.sum(b)

    opt.minimize(loss, [a, b])
    before = snapshot(opt, [a, b, stat])
    with pytest.raises(error, match=match):
        opt.minimize(loss, var_list(a, b))
    assert_unchanged(before, snapshot(opt, [a, b, stat]))
    opt.minimize(loss, [a, b])
    assert float(stat.numpy()) == 2.0


@pytest.mark.parametrize(
    "loss, error, match",
    [
        (lambda: None, ValueError, "the loss returned None"),
        (lambda x: x, TypeError, "`loss` must be a zero-argument callable.*requires `x`"),
        (lambda x, y=1.0: x, TypeError, "requires `x`$"),
    ],
)
def test_a_loss_that_is_not_a_loss_function_is_named(loss, error, match):
    """JAX's "None is not a valid value for jnp.array", or Python's missing-argument error."""
    opt, a, b = trained_adam()
    before = snapshot(opt, [a, b])
    with pytest.raises(error, match=match):
        opt.minimize(loss, [a, b])
    assert_unchanged(before, snapshot(opt, [a, b]))


@pytest.mark.parametrize(
    "step_count, error, match",
    [
        (lambda: kopt.Variable(0.5), TypeError, r"step count \(iterations\) must be an integer"),
        (lambda: kopt.Variable([0, 5]), ValueError, r"`iterations` must be a scalar.*\(2,\)"),
        (lambda: kopt.Variable(-2), ValueError, r"step count \(iterations\) must be >= 0"),
    ],
)
def test_iterations_setter_refuses_a_variable_that_is_no_step_count(step_count, error, match):
    """Any kopt.Variable was taken: a float one counted 0.5, 1.5...; a (2,)-shaped one made
    Adam's bias correction per element. Refused as set_weights refuses such a count."""
    opt, var = optimizers.Adam(0.1), kopt.Variable([1.0, 2.0])
    with pytest.raises(error, match=match):
        opt.iterations = step_count()
    assert opt.weights == []
    opt.apply_gradients([(jnp.ones(2), var)])
    assert int(opt.iterations.numpy()) == 1
    np.testing.assert_allclose(var.numpy(), [0.9, 1.9], rtol=1e-5)  # Adam's first step: -lr


@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda opt: pickle.loads(pickle.dumps(opt))])
def test_a_copied_optimizer_checks_its_own_hyperparameter_variables(copy_of):
    """The copy's variables are checked against the copy; a variable copied alone is plain."""
    opt, a, b = copy_of(trained_adam()[0]), kopt.Variable([1.0, 2.0]), kopt.Variable([3.0])
    with pytest.raises(ValueError, match="Adam: `beta_1` must be <= 1.0"):
        opt.beta_1.assign(1.5)
    with pytest.raises(ValueError, match=r"step count \(iterations\) must be >= 0"):
        opt.iterations.assign(-1)
    assert float(opt.beta_1.numpy()) == pytest.approx(0.9)
    assert int(opt.iterations.numpy()) == 1
    opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), b)])
    alone = copy.deepcopy(opt.beta_1)
    alone.assign(1.5)
    assert float(alone.numpy()) == 1.5 and float(opt.beta_1.numpy()) == pytest.approx(0.9)


def test_an_iterations_variable_given_is_checked_on_assignment():
    opt = optimizers.Adam(0.1)
    opt.iterations = steps = kopt.Variable(3)
    with pytest.raises(ValueError, match=r"step count \(iterations\) must be >= 0"):
        steps.assign(-1)
    assert int(opt.iterations.numpy()) == 3


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: optimizers.SGD(learning_rate="0.1"), TypeError, "learning_rate"),
        (lambda: optimizers.SGD(momentum=1.5), ValueError, "momentum"),
        (lambda: optimizers.RMSprop(momentum=-0.5), ValueError, "momentum"),
        (lambda: optimizers.SGD(decay=-0.1), ValueError, "decay"),
        (lambda: optimizers.Adam(beta_1="0.9"), TypeError, "beta_1"),
        (lambda: optimizers.SGD(clipvalue=[1.0]), TypeError, "clipvalue"),
        # These raised Python's or NumPy's own errors, some only at the first step.
        (
            lambda: optimizers.SGD(learning_rate=np.complex64(1)),
            TypeError,
            "SGD: `learning_rate` must be a real number",
        ),
        (
            lambda: optimizers.Adagrad(initial_accumulator_value="0.1"),
            TypeError,
            "Adagrad: `initial_accumulator_value` must be a number or a scalar array; received str",
        ),
        (
            lambda: optimizers.SGD(gradient_transformers=lambda gv: gv),
            TypeError,
            "SGD: `gradient_transformers` must be a list of callables",
        ),
        (
            lambda: optimizers.SGD(gradient_transformers=[3]),
            TypeError,
            "SGD: `gradient_transformers` item 0 must be a callable.*received int: 3",
        ),
        (
            lambda: optimizers.Adam(gradient_aggregator=3),
            TypeError,
            "Adam: `gradient_aggregator` must be a callable.*received int: 3",
        ),
    ],
)
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        ("Adam", {"beta_1": 1.5}),
        ("Adam", {"epsilon": -1.0}),
        ("Adamax", {"beta_1": -0.1}),
        ("Nadam", {"beta_2": 1.5}),
        ("RMSprop", {"rho": 2.0}),
        ("Adadelta", {"rho": 1.5}),
        ("AdamW", {"weight_decay": -1.0}),
        ("Lamb", {"beta_2": -1.0}),
        ("Adafactor", {"clip_threshold": 0.0}),
    ],
)
def test_out_of_range_constructor_argument_names_the_class_not_the_inner_piece(cls, kwargs):
    ((arg, value),) = kwargs.items()
    with pytest.raises(ValueError) as info:
        getattr(optimizers, cls)(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{cls}: `{arg}`"), message
    assert f"received {value}" in message, message  # as given, not its float32 rounding
    assert "scale_by" not in message and "add_decayed" not in message, message


def test_a_callable_hyperparameter_is_read_at_the_first_step_and_checked_there():
    calls = []

    def learning_rate():
        calls.append(1)
        return 0.1

    opt = optimizers.Adam(learning_rate=learning_rate, beta_1=1.5)
    assert not calls  # the constructor does not call it
    var = kopt.Variable([1.0])
    with pytest.raises(ValueError, match="^Adam: `beta_1`"):
        opt.apply_gradients([(jnp.ones(1), var)])
    np.testing.assert_array_equal(var.numpy(), [1.0])
    assert opt.weights == []  # no slots and no step count were made


def test_sgd_momentum_above_one_is_refused_after_construction_too():
    opt = optimizers.SGD(learning_rate=0.1, momentum=0.5)
    var = kopt.Variable([1.0])
    opt.apply_gradients([(jnp.ones(1), var)])
    before = snapshot(opt, [var])
    with pytest.raises(ValueError, match="momentum"):
        opt.momentum = 1.5
    assert_unchanged(before, snapshot(opt, [var]))


class Boom(Exception):
    pass


def raising_transformer(grads_and_vars):
    if len(grads_and_vars) > 1:
        raise Boom("transformer")
    return grads_and_vars


def raising_constraint(w):
    raise Boom("constraint")


@pytest.mark.parametrize("name", ["Adam", "Nadam", "Ftrl"])
@pytest.mark.parametrize("failure", ["transformer", "constraint"])
def test_exception_mid_step_changes_nothing_and_creates_no_slots(name, failure):
    a = kopt.Variable([1.0, 2.0], name="a")
    b = kopt.Variable(
        [3.0], name="b", constraint=raising_constraint if failure == "constraint" else None
    )
    transformers = [raising_transformer] if failure == "transformer" else None
    opt = getattr(optimizers, name)(learning_rate=0.1, gradient_transformers=transformers)
    fresh = snapshot(opt, [a, b])
    with pytest.raises(Boom):  # on a fresh optimizer: no weights at all afterwards
        opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), b)])
    assert_unchanged(fresh, snapshot(opt, [a, b]))
    assert opt.weights == []

    opt.apply_gradients([(jnp.ones(2), a)])
    before = snapshot(opt, [a, b])
    with pytest.raises(Boom):  # b's slots would be new: they must not stay
        opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), b)])
    assert_unchanged(before, snapshot(opt, [a, b]))
    with pytest.raises(KeyError):
        opt.get_slot(b, opt.get_slot_names()[0])
    opt.apply_gradients([(jnp.ones(2), a)])  # the optimizer still works
    assert int(opt.iterations.numpy()) == 2
    assert not np.array_equal(a.numpy(), before["values"][0])


def test_threads_lose_no_update():
    var = kopt.Variable(0.0)
    opt = optimizers.SGD(learning_rate=1.0)

    def work():
        for _ in range(50):
            opt.apply_gradients([(jnp.float32(1.0), var)])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert float(var.numpy()) == -200.0
    assert int(opt.iterations.numpy()) == 200
    assert opt.compile_count == 1


def test_step_count_from_a_longer_run_saturates_in_set_weights():
    """tf.keras saves ``iterations`` as int64: a count past int32 is capped at ``2**31 - 1``, as
    training caps it, instead of wrapping to a negative (or zero) count."""
    for saved in (2**31 + 5, 2**32 + 7, 2**33):
        opt, a, b = trained_adam()
        opt.set_weights([np.int64(saved), *opt.get_weights()[1:]])
        assert int(opt.iterations.numpy()) == 2**31 - 1
        opt.apply_gradients([(jnp.ones(2), a), (jnp.ones(1), b)])
        assert int(opt.iterations.numpy()) == 2**31 - 1
        assert np.all(np.isfinite(a.numpy()))


def test_variable_assign_add_loses_no_update_across_threads():
    """``assign_add``/``assign_sub`` are atomic: against each other and against optimizer steps
    on the same variable."""
    counter = kopt.Variable(0.0)
    var = kopt.Variable(0.0)
    opt = optimizers.SGD(learning_rate=1.0)

    def add():
        for _ in range(100):
            counter.assign_add(1.0)
            var.assign_add(1.0)

    def sub():
        for _ in range(100):
            counter.assign_sub(0.5)

    def step():
        for _ in range(100):
            opt.apply_gradients([(jnp.float32(1.0), var)])  # var -= 1

    threads = [threading.Thread(target=f) for f in (add, add, sub, step, step)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert float(counter.numpy()) == 150.0
    assert float(var.numpy()) == 0.0
    assert int(opt.iterations.numpy()) == 200


def test_threads_minimizing_their_own_variables_share_one_optimizer():
    variables = [kopt.Variable(float(i)) for i in range(4)]
    opt = optimizers.SGD(learning_rate=0.25)

    def work(var):
        for _ in range(10):
            opt.minimize(lambda: (var - 10.0) ** 2, [var])

    threads = [threading.Thread(target=work, args=(v,)) for v in variables]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, var in enumerate(variables):  # w <- w - 0.25 * 2 (w - 10): halves the distance
        np.testing.assert_allclose(var.numpy(), 10.0 - (10.0 - i) * 0.5**10, rtol=1e-6)
    assert int(opt.iterations.numpy()) == 40


def test_threads_minimizing_a_shared_variable_while_another_reads_it():
    shared = kopt.Variable(np.zeros(64, np.float32))
    opt = optimizers.SGD(learning_rate=0.01)
    errors, stop = [], threading.Event()

    def train():
        try:
            for _ in range(15):
                opt.minimize(lambda: jnp.sum((shared - 1.0) ** 2), [shared])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def watch():
        try:
            while not stop.is_set():
                np.asarray(shared)
                shared.numpy()
                float(jnp.sum(shared.value))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    watcher = threading.Thread(target=watch)
    watcher.start()
    trainers = [threading.Thread(target=train) for _ in range(3)]
    for t in trainers:
        t.start()
    for t in trainers:
        t.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert int(opt.iterations.numpy()) == 45
    assert np.all(shared.numpy() > 0.5)  # every step moved it towards 1 (w <- 0.98 w + 0.02)


def test_copies_taken_while_another_thread_steps_are_whole():
    """Copies and pickles of a variable, and copies of its optimizer, taken while another thread
    steps it: the step donated the buffer a copy was still reading ("Array has been deleted")."""
    v = kopt.Variable(np.zeros(1000, np.float32), name="v")
    opt = optimizers.Adam(learning_rate=0.01)
    opt.apply_gradients([(jnp.ones(1000), v)])
    errors, done = [], threading.Event()

    def train():
        for _ in range(300):
            opt.apply_gradients([(jnp.ones(1000), v)])
        done.set()

    copies = [
        copy.deepcopy,
        lambda x: pickle.loads(pickle.dumps(x)),
        lambda x: copy.deepcopy(opt),
        lambda x: copy.deepcopy((opt, [x])),
    ]
    trainer = threading.Thread(target=train)
    trainer.start()
    n = 0
    while not done.is_set() or n < len(copies):
        try:
            copied = copies[n % len(copies)](v)
            if isinstance(copied, kopt.Variable):
                assert np.all(copied.numpy() <= 0.0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        n += 1
    trainer.join()
    assert errors == []
    assert int(opt.iterations.numpy()) == 301


def test_get_weights_while_another_thread_steps_is_one_step():
    """get_weights read each weight by itself: a step landing in between gave ``iterations``
    of one step and slots of the next. It reads under the lock each step holds."""
    var = kopt.Variable(np.zeros(4, np.float32))
    opt = optimizers.Adam(learning_rate=0.01)
    opt.apply_gradients([(jnp.ones(4), var)])
    iterations = opt.iterations
    read_count = iterations.numpy
    stepper = []

    def read_then_step():  # a step starts in another thread once the count is read
        count = read_count()
        if not stepper:
            stepper.append(
                threading.Thread(target=opt.apply_gradients, args=([(jnp.ones(4), var)],))
            )
            stepper[0].start()
            stepper[0].join(timeout=0.5)  # ends at once unless get_weights holds the lock
        return count

    iterations.numpy = read_then_step
    try:
        weights = opt.get_weights()
    finally:
        del iterations.numpy
    stepper[0].join()
    count = int(weights[0])
    assert count == 1
    m, v = weights[1:]  # constant gradients of 1: m = 1 - 0.9**t, v = 1 - 0.999**t
    np.testing.assert_allclose(m, 1 - 0.9**count, atol=1e-6)
    np.testing.assert_allclose(v, 1 - 0.999**count, atol=1e-6)
    assert int(opt.iterations.numpy()) == 2


def test_a_copy_used_from_two_threads_at_once_finds_every_slot():
    """A copy made with its variables re-keys its slots to the copied variables at its first
    use: a second thread using it meanwhile did not find them (KeyError). It waits now."""
    variables = [kopt.Variable(np.zeros(2, np.float32), name=f"v{i}") for i in range(3)]
    opt = optimizers.Adam(learning_rate=0.1)
    opt.apply_gradients([(jnp.ones(2), v) for v in variables])
    copied, copied_variables = copy.deepcopy((opt, variables))
    owners, entered, release = copied._owners, threading.Event(), threading.Event()

    def slow_owners():  # the first use stops while it re-keys
        entered.set()
        release.wait()
        return owners()

    copied._owners = slow_owners
    errors = []

    def use():
        try:
            for v in copied_variables:
                copied.get_slot(v, "m")
        except KeyError as e:
            errors.append(e)

    first = threading.Thread(target=use)
    first.start()
    entered.wait()
    second = threading.Thread(target=use)
    second.start()
    second.join(timeout=0.5)  # ends at once, finding no slot, unless it waits for the first
    release.set()
    first.join()
    second.join()
    del copied._owners
    assert errors == []
    for v, original in zip(copied_variables, variables, strict=True):
        np.testing.assert_array_equal(
            copied.get_slot(v, "m").numpy(), opt.get_slot(original, "m").numpy()
        )


PLAIN_ATTRIBUTES = {
    "Adam epsilon < 0": (lambda: optimizers.Adam(0.1), "epsilon", -1.0, "Adam: `epsilon`"),
    "Adam epsilon NaN": (lambda: optimizers.Adam(0.1), "epsilon", float("nan"), "`epsilon`"),
    "Adam epsilon None": (lambda: optimizers.Adam(0.1), "epsilon", None, "`epsilon`"),
    "RMSprop epsilon < 0": (lambda: optimizers.RMSprop(0.1), "epsilon", -1.0, "`epsilon`"),
    "AdamW beta_1 > 1": (lambda: optimizers.AdamW(0.1), "beta_1", 1.5, "AdamW: `beta_1`"),
    "Lamb epsilon < 0": (lambda: optimizers.Lamb(0.1), "epsilon", -1.0, "Lamb: `epsilon`"),
    "Adafactor clip_threshold 0": (
        lambda: optimizers.Adafactor(0.1),
        "clip_threshold",
        0.0,
        "`clip_threshold`",
    ),
    "Lion weight_decay < 0": (
        lambda: optimizers.Lion(0.1, weight_decay=0.1),
        "weight_decay",
        -0.5,
        "`weight_decay`",
    ),
    "Lion ema_momentum > 1": (
        lambda: optimizers.Lion(0.1, use_ema=True),
        "ema_momentum",
        1.5,
        "`ema_momentum`",
    ),
    "Lion ema_overwrite_frequency < 1": (
        lambda: optimizers.Lion(0.1, use_ema=True),
        "ema_overwrite_frequency",
        -1,
        "`ema_overwrite_frequency`",
    ),
    "Lion gradient_accumulation_steps 1": (
        lambda: optimizers.Lion(0.1),
        "gradient_accumulation_steps",
        1,
        "`gradient_accumulation_steps`",
    ),
    "Adam epsilon < 0, callable learning rate": (
        lambda: optimizers.Adam(lambda: 0.1),
        "epsilon",
        -1.0,
        "Adam: `epsilon`",
    ),
}


@pytest.mark.parametrize("case", list(PLAIN_ATTRIBUTES))
def test_plain_attributes_set_out_of_range_are_refused_like_the_constructor_refuses_them(case):
    make, attr, value, match = PLAIN_ATTRIBUTES[case]
    opt = make()
    var = kopt.Variable([1.0, 2.0])
    opt.apply_gradients([(jnp.ones(2), var)])
    old = getattr(opt, attr)
    before = snapshot(opt, [var])
    with pytest.raises((ValueError, TypeError), match=match):
        setattr(opt, attr, value)
    assert getattr(opt, attr) == old
    assert_unchanged(before, snapshot(opt, [var]))
    opt.apply_gradients([(jnp.ones(2), var)])  # the optimizer still trains
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize("attr", ["learning_rate", "lr"])
def test_nadam_refuses_a_schedule_assigned_later_as_its_constructor_does(attr):
    opt = optimizers.Nadam(0.1)
    var = kopt.Variable([1.0, 2.0])
    opt.apply_gradients([(jnp.ones(2), var)])
    before = snapshot(opt, [var])
    with pytest.raises(ValueError, match="Nadam optimizer does not support"):
        setattr(opt, attr, optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))
    assert_unchanged(before, snapshot(opt, [var]))
    opt.apply_gradients([(jnp.ones(2), var)])
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.1)


def test_a_schedule_the_compiled_step_cannot_call_is_refused_naming_it():
    """A tf.keras schedule (TensorFlow operations) failed at the first step with JAX's
    TracerArrayConversionError, naming neither the schedule nor the hyperparameter."""

    class NumpySchedule:  # computes on concrete values, as a TensorFlow one does
        def __call__(self, step):
            return float(np.asarray(step)) * 0.0 + 0.1

    var = kopt.Variable([1.0, 2.0])
    with pytest.raises(TypeError, match="`learning_rate` \\(NumpySchedule\\) cannot run"):
        kopt.optimizers.Adam(NumpySchedule())
    opt = kopt.optimizers.Adam(0.1)
    with pytest.raises(TypeError, match="`beta_1` \\(NumpySchedule\\) cannot run"):
        opt.beta_1 = NumpySchedule()
    opt.apply_gradients([(jnp.ones(2), var)])  # the old value trains on
    assert float(opt.beta_1.numpy()) == pytest.approx(0.9)


class _Warmup(optimizers.schedules.LearningRateSchedule):
    """A user's own schedule with a Python `if` on the step: it needs a concrete step."""

    def __call__(self, step):
        return 0.01 if step < 100 else 0.1

    def get_config(self):
        return {}


class _TfKerasLike:
    """Stands for a tf.keras schedule (the suite never imports TensorFlow): a class of the
    tf_keras package, whose TensorFlow operations take no traced step."""

    __module__ = "tf_keras.src.optimizers.schedules.learning_rate_schedule"

    def __call__(self, step):
        return np.float32(np.asarray(step)) * 0.0 + 0.1


@pytest.mark.parametrize(
    "schedule, hinted", [(_Warmup(), False), (_TfKerasLike(), True)], ids=["own", "tf_keras"]
)
def test_only_a_tf_keras_schedule_is_told_to_use_kopts_class(schedule, hinted):
    """The refusal of a schedule the compiled step cannot call always ended with advice about
    tf.keras schedules ("use kopt.optimizers.schedules' class of that name"), also for a
    user's own schedule, which has no class of that name in kopt."""
    opt, var = optimizers.SGD(0.1), kopt.Variable([1.0, 2.0])
    opt.apply_gradients([(jnp.ones(2), var)])
    before = snapshot(opt, [var])
    name = type(schedule).__name__
    with pytest.raises(TypeError, match=f"`learning_rate` \\({name}\\) cannot run") as info:
        opt.learning_rate = schedule
    assert ("A tf.keras schedule computes with TensorFlow" in str(info.value)) == hinted
    assert_unchanged(before, snapshot(opt, [var]))
    with pytest.raises(TypeError, match=f"`learning_rate` \\({name}\\) cannot run") as info:
        optimizers.SGD(schedule)
    assert ("A tf.keras schedule computes with TensorFlow" in str(info.value)) == hinted


def test_a_gradient_of_another_library_is_named():
    class Tensor:  # a TensorFlow tensor's shape and dtype, which JAX cannot read
        shape = (2,)
        dtype = "tf.float32"

    var = kopt.Variable([1.0, 2.0], name="w")
    opt = kopt.optimizers.SGD(0.1)
    with pytest.raises(TypeError, match="gradient for w:0 must be a JAX or NumPy array"):
        opt.apply_gradients([(Tensor(), var)])
    np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])
    table = kopt.Variable(np.zeros((5, 2), np.float32), name="table")
    per_replica = kopt.optimizers.PerReplica(
        kopt.IndexedSlices(jnp.ones((2, 2, 2)), jnp.array([[0, 1], [1, 4]]), (5, 2))
    )
    with pytest.raises(TypeError, match="per-replica gradient for table:0 holds an IndexedSl"):
        opt.apply_gradients([(per_replica, table)])
    assert opt.iterations.numpy() == 0 and not table.numpy().any()


@pytest.mark.parametrize(
    "make",
    [
        lambda: kopt.optimizers.Adam(0.1, clipnorm=1.0),
        lambda: kopt.optimizers.AdamW(0.1, use_ema=True, gradient_accumulation_steps=2),
        lambda: kopt.optimizers.LossScaleOptimizer(kopt.optimizers.SGD(0.1, momentum=0.9)),
        lambda: kopt.optimizers.SGD(0.1, gradient_transformers=[lambda gv: gv]),
    ],
    ids=["Adam", "AdamW-ema", "LossScale", "SGD-hooks"],
)
def test_an_optimizer_no_longer_used_is_freed_without_the_cycle_collector(make):
    """Its compiled steps held it (and the check on its hyperparameter variables did), so a
    search making an optimizer per trial kept every trial's slots until a cyclic collection."""
    import gc
    import weakref

    var = kopt.Variable(jnp.ones(4))
    opt = make()
    for _ in range(2):
        opt.apply_gradients([(jnp.ones(4), var)])
    opt.minimize(lambda: jnp.sum(var.value**2), [var])
    opt.learning_rate = 0.2
    slot = opt.weights[-1]
    ref, slot_ref = weakref.ref(opt), weakref.ref(slot)
    del slot
    gc.disable()
    try:
        del opt
        assert ref() is None and slot_ref() is None
    finally:
        gc.enable()


def test_a_loss_that_assigns_keeps_every_threads_assignments():
    """The loss's assignments are traced from the values it read and written back after: two
    threads' minimize calls interleaved lost some (tf.keras's count is exact)."""
    seen, w = kopt.Variable(0.0), kopt.Variable([1.0, 2.0])
    opt = kopt.optimizers.SGD(0.01)

    def loss():
        seen.assign_add(1.0)
        return jnp.sum(w.value**2)

    def train():
        for _ in range(40):
            opt.minimize(loss, [w])

    threads = [threading.Thread(target=train) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert float(seen.numpy()) == 80.0 and int(opt.iterations.numpy()) == 80


def test_a_loss_scale_step_in_another_thread_cannot_come_between_scaling_and_unscaling():
    """minimize scaled the loss by the scale it read and unscaled the gradients by the scale
    read later: another thread's skipped step in between (halving the scale) doubled the
    gradient applied."""
    v, other = kopt.Variable(np.zeros(4, np.float32)), kopt.Variable(np.zeros(4, np.float32))
    opt = kopt.optimizers.LossScaleOptimizer(kopt.optimizers.SGD(1.0))
    unscale = opt.get_unscaled_gradients
    stepping = []

    def unscale_after_another_step(grads):
        # The other thread's non-finite step, started between the scaling and the unscaling.
        thread = threading.Thread(
            target=lambda: opt.apply_gradients([(jnp.full(4, jnp.inf), other)])
        )
        thread.start()
        thread.join(timeout=0.5)  # it waits for the lock this minimize holds
        stepping.append(thread)
        return unscale(grads)

    opt.get_unscaled_gradients = unscale_after_another_step
    opt.minimize(lambda: jnp.sum(v.value), [v])
    stepping[0].join()
    np.testing.assert_array_equal(v.numpy(), -np.ones(4))
    assert float(opt.loss_scale.numpy()) == 2.0**14  # the other step ran, after


def test_a_shallow_copy_leaves_the_hyperparameter_variables_checked(monkeypatch):
    """The copy took over the checks of the variables it shares, and once it was freed no
    assignment was checked. A learning rate assigned each step builds no functional twin to
    check it (that made `assign` four times slower)."""
    import copy
    import gc

    opt = kopt.optimizers.Adam(0.1)
    clone = copy.copy(opt)
    del clone
    gc.collect()
    with pytest.raises(ValueError, match="`beta_1` must be <= 1"):
        opt.beta_1.assign(1.5)
    assert float(opt.beta_1.numpy()) == pytest.approx(0.9)
    built = []
    original = type(opt)._build_transformation
    monkeypatch.setattr(
        type(opt), "_build_transformation", lambda self, hp: built.append(1) or original(self, hp)
    )
    opt.learning_rate.assign(0.2)
    with pytest.raises(ValueError, match="`learning_rate` must be >= 0"):
        opt.learning_rate.assign(-0.1)
    assert built == [] and float(opt.learning_rate.numpy()) == pytest.approx(0.2)
