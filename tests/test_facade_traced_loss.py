"""minimize / compute_gradients trace the loss every call and run its gradient as a compiled
program cached by the trace's structure: fresh data every step, no compile after the first,
and losses that cannot be traced (or trace differently every call) still differentiated right.
Numbers against NumPy's hand-derived gradients."""

import gc
import types
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt import optimizers
from kopt.optimizers import _traced_loss


def linear_problem(seed=0, steps=4):
    rng = np.random.default_rng(seed)
    batches = [
        (rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=8).astype(np.float32))
        for _ in range(steps)
    ]
    return rng.normal(size=3).astype(np.float32), batches


def sgd_reference(w, batches, lr):
    """Plain SGD on mean((x @ w + b - y) ** 2), b starting at 0.5, in float64."""
    w, b = w.astype(np.float64), 0.5
    for x, y in batches:
        r = x @ w + b - y
        w, b = w - lr * 2 * x.T @ r / len(y), b - lr * 2 * r.mean()
    return w, b


def test_a_loss_reading_a_new_batch_each_step_compiles_once_and_uses_each_batch(
    backend_compiles,
):
    w0, batches = linear_problem()
    w, b = kopt.Variable(w0), kopt.Variable(np.float32(0.5))
    opt = optimizers.SGD(learning_rate=0.1)
    batch = {}

    @jax.jit
    def mse(w, b, x, y):
        return jnp.mean((x @ w + b - y) ** 2)

    for i, (x, y) in enumerate(batches):
        batch["x"], batch["y"] = jnp.asarray(x), jnp.asarray(y)  # a new batch, same shapes
        if i == 1:
            # The loss's forward and backward passes are one compiled program.
            assert [c.fun_name for c in backend_compiles].count("jit(loss_gradient)") == 1
            backend_compiles.clear()
        # A new closure object every step, as a loop body writes it.
        opt.minimize(lambda: mse(w, b, batch["x"], batch["y"]), [w, b])
    assert backend_compiles == []  # steps 2 to 4: the gradient program and the step reused
    expected_w, expected_b = sgd_reference(w0, batches, 0.1)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-5)
    np.testing.assert_allclose(float(b.numpy()), expected_b, rtol=1e-5)


def test_a_loss_needing_concrete_values_of_its_data_is_differentiated_eagerly():
    """Python control flow on the batch's values (not the variables') works eagerly, where
    only the variables are traced, but not in a trace of the whole loss: such a loss is
    differentiated eagerly, as before. Its first call runs it twice (the failed trace, then
    eagerly); later calls once."""
    w0, batches = linear_problem(seed=1)
    w, b = kopt.Variable(w0), kopt.Variable(np.float32(0.5))
    opt = optimizers.SGD(learning_rate=0.1)
    calls = []

    def branching_loss(x, y):
        calls.append(1)
        r = x @ w + b - y
        if float(jnp.max(jnp.abs(jnp.asarray(y)))) > 1e6:  # never taken; needs y's value
            r = r * 0.0
        return jnp.mean(r**2)

    for x, y in batches:
        opt.minimize(lambda x=x, y=y: branching_loss(x, y), [w, b])
    assert len(calls) == len(batches) + 1
    expected_w, expected_b = sgd_reference(w0, batches, 0.1)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-5)
    np.testing.assert_allclose(float(b.numpy()), expected_b, rtol=1e-5)


def test_one_closure_for_several_losses_keeps_each_compiled(backend_compiles):
    """A helper's lambda around the loss function it is given stands for several losses with
    the same inputs: a second loss through it marked the lambda's code "traced afresh every
    call", and every later call through it (the first loss's too) was differentiated eagerly,
    about twice as slow."""
    w0, batches = linear_problem(seed=3, steps=4)
    w, b = kopt.Variable(w0), kopt.Variable(np.float32(0.5))
    opt = optimizers.SGD(learning_rate=0.1)

    def mse(x, y):
        return jnp.mean((x @ w + b - y) ** 2)

    def mae(x, y):
        return jnp.mean(jnp.abs(x @ w + b - y))

    def huber(x, y):
        r = jnp.abs(x @ w + b - y)
        return jnp.mean(jnp.where(r < 1.0, 0.5 * r**2, r - 0.5))

    def train(loss_fn, x, y):
        opt.minimize(lambda: loss_fn(x, y), [w, b])

    for phase in (mse, mae, mse, mae):
        for x, y in batches:
            train(phase, x, y)
    for x, y in batches:  # three losses in turn, one call each
        for phase in (mse, mae, huber):
            train(phase, x, y)
    backend_compiles.clear()
    for phase in (mse, mae):
        for x, y in batches:
            train(phase, x, y)
    assert backend_compiles == []
    (closure_code,) = [c for c in train.__code__.co_consts if isinstance(c, types.CodeType)]
    assert closure_code not in _traced_loss._EAGER


def test_a_loss_whose_trace_changes_every_call_stops_compiling(backend_compiles):
    """A Python number that changes every step is a constant of each trace, so no two traces
    are alike: after four compiles in vain (a closure may stand for a few losses, each traced
    alike every call) the loss is differentiated eagerly from its trace (not called again),
    with each step's number."""
    w0, batches = linear_problem(seed=2, steps=9)
    w, b = kopt.Variable(w0), kopt.Variable(np.float32(0.5))
    opt = optimizers.SGD(learning_rate=0.1)
    calls = []

    def weighted_loss(x, y, weight):
        calls.append(1)
        return weight * jnp.mean((x @ w + b - y) ** 2)

    weights = [1.0 + 0.25 * i for i in range(len(batches))]
    for i, ((x, y), weight) in enumerate(zip(batches, weights, strict=True)):
        if i == 7:
            backend_compiles.clear()
        opt.minimize(lambda x=x, y=y, weight=weight: weighted_loss(x, y, weight), [w, b])
    assert backend_compiles == []
    assert len(calls) == len(batches)
    ww, bb = w0.astype(np.float64), 0.5
    for (x, y), weight in zip(batches, weights, strict=True):
        r = x @ ww + bb - y
        ww, bb = ww - 0.1 * weight * 2 * x.T @ r / len(y), bb - 0.1 * weight * 2 * r.mean()
    np.testing.assert_allclose(w.numpy(), ww, rtol=1e-5)
    np.testing.assert_allclose(float(b.numpy()), bb, rtol=1e-5)


def test_compute_gradients_with_grad_loss_and_unread_variables():
    """A vector loss with ``grad_loss`` (the cotangent), and a variable the loss does not read
    (None), through the compiled path: against NumPy."""
    x = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], np.float32)
    w, unused = kopt.Variable([0.3, -0.2]), kopt.Variable([1.0])
    opt = optimizers.SGD()
    cotangent = np.array([1.0, -2.0, 0.5], np.float32)
    for _ in range(2):
        (gw, vw), (gu, vu) = opt.compute_gradients(lambda: (x @ w) ** 2, [w, unused], cotangent)
        assert vw is w and vu is unused and gu is None
        expected = x.T @ (cotangent * 2 * (x @ np.array([0.3, -0.2])))
        np.testing.assert_allclose(np.asarray(gw), expected, rtol=1e-6)


def test_a_loss_assigning_a_different_variable_each_step_assigns_the_right_one():
    """Two moving statistics of the same shape, the loss assigning one or the other by step:
    the traces differ only in which variable gets the value, and each step must assign its own
    (a cached program must not hand the value to the variable of an earlier step)."""
    w = kopt.Variable([1.0, 2.0])
    stats = [kopt.Variable([0.0, 0.0], trainable=False) for _ in range(2)]
    opt = optimizers.SGD(learning_rate=0.0)
    for step in range(4):
        target = stats[step % 2]

        factor = jnp.asarray(step + 1.0)  # an array: every step traces the same operations

        def loss(target=target, factor=factor):
            target.assign(w * factor)
            return jnp.sum(w**2)

        opt.minimize(loss, [w])
        np.testing.assert_array_equal(target.numpy(), [step + 1.0, 2 * (step + 1.0)])
    np.testing.assert_array_equal(stats[0].numpy(), [3.0, 6.0])
    np.testing.assert_array_equal(stats[1].numpy(), [4.0, 8.0])


def test_scan_cond_and_jit_traced_afresh_in_the_loss_compile_nothing_after_the_first_step(
    backend_compiles,
):
    """``lax.scan`` and ``lax.cond`` called in the closure itself, and a jitted function made
    anew each step, give new inner jaxprs at every trace, alike in structure: the cached program
    is reused (they counted by identity, so the loss fell back to eager differentiation, which
    compiled the scan and the cond again at every step). The jitted function takes the batch
    as arguments: one that closed over it would hold the batch as its constants, and still
    count by identity. Against NumPy SGD."""
    w0, batches = linear_problem(seed=3, steps=5)
    w, b = kopt.Variable(w0), kopt.Variable(np.float32(0.5))
    opt = optimizers.SGD(learning_rate=0.1)
    for i, (x, y) in enumerate(batches):
        if i == 2:
            backend_compiles.clear()

        x, y = jnp.asarray(x), jnp.asarray(y)

        def loss(x=x, y=y):
            residuals = jax.jit(lambda w, b, x, y: x @ w + b - y)(w, b, x, y)
            total, _ = jax.lax.scan(lambda c, r: (c + r**2, None), 0.0, residuals)
            return jax.lax.cond(total > 1e9, lambda: total * 0.0, lambda: total / len(y))

        opt.minimize(loss, [w, b])
    assert [c.fun_name for c in backend_compiles] == []
    expected_w, expected_b = sgd_reference(w0, batches, 0.1)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-5)
    np.testing.assert_allclose(float(b.numpy()), expected_b, rtol=1e-5)


def test_a_loss_found_to_change_every_call_keeps_no_batch_alive():
    """A ``custom_gradient`` rule closing over the batch is a new function in every trace, so
    the loss is found to change every call; the earlier traces' cached programs and keys, which
    hold that rule and so their batches, are dropped then. Gradients against NumPy."""
    w = kopt.Variable(np.ones(4, np.float32))
    opt = optimizers.SGD(learning_rate=0.1)
    expected = np.ones(4)
    alive = []
    for step in range(5):  # found at the fifth call: four structures, none repeated
        x = jnp.asarray(np.arange(4, dtype=np.float32) + step)

        def loss(x=x):
            # sum(x * w), its cotangent multiplied by x[0] + 1 (= step + 1) by the rule
            scaled = jax.custom_gradient(
                lambda u: (jnp.sum(u), lambda g: (g * (x[0] + 1.0) * jnp.ones_like(u),))
            )
            return scaled(x * w)

        opt.minimize(loss, [w])
        expected = expected - 0.1 * np.asarray(x) * (step + 1.0)
        alive.append(weakref.ref(x))
        del x, loss
    gc.collect()
    assert [ref() is None for ref in alive] == [True] * 5
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


def test_one_loss_over_batches_of_new_lengths_keeps_a_bounded_record(monkeypatch):
    """The record of each loss's traces was bounded by the number of losses only: one loss over
    batches of a new length every step (variable-length sequences) added an entry per length,
    without end. The bound counts input signatures now."""
    monkeypatch.setattr(_traced_loss, "_SEEN", {})
    monkeypatch.setattr(_traced_loss, "_MAX_SEEN", 4, raising=False)
    w = kopt.Variable(np.ones(3, np.float32))
    opt = optimizers.SGD(learning_rate=0.01)
    expected = np.ones(3)
    most = 0
    for length in range(1, 11):
        x = jnp.ones((length, 3))
        opt.minimize(lambda x=x: jnp.sum(x @ w), [w])
        expected = expected - 0.01 * length
        most = max(most, sum(len(s) for s in _traced_loss._SEEN.values()))
    assert most <= 5  # cleared once it holds more than _MAX_SEEN
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


def test_two_losses_through_a_loss_scale_optimizer_keep_their_own_programs(backend_compiles):
    """A LossScaleOptimizer wraps every loss in the same scaled-loss function: two different
    losses of the same variables must still count as two losses, each with its program, not as
    one loss whose trace changes (which sends both to eager differentiation)."""
    w = kopt.Variable([1.0, -2.0])
    opt = optimizers.LossScaleOptimizer(
        optimizers.SGD(learning_rate=0.1), dynamic=False, initial_scale=4.0
    )
    square = jax.jit(lambda w: jnp.sum(w**2))
    cube = jax.jit(lambda w: jnp.sum(w**3))
    expected = np.array([1.0, -2.0])
    for step in range(4):
        if step % 2 == 0:
            opt.minimize(lambda: square(w), [w])
            expected = expected - 0.1 * 2 * expected
        else:
            opt.minimize(lambda: cube(w), [w])
            expected = expected - 0.1 * 3 * expected**2
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert [c.fun_name for c in backend_compiles].count("jit(loss_gradient)") == 2


def test_a_loss_that_is_a_variable_or_holds_one_has_its_gradient():
    """A loss returning a variable itself (or a list holding one) read it only when it was
    converted to an array, after reads were no longer recorded: its gradient was None (and
    ``minimize`` said no variable had one). tf.keras's tape gives 1."""
    v, w = kopt.Variable(2.0, name="v"), kopt.Variable(3.0, name="w")
    opt = optimizers.SGD(0.1)
    ((g, _),) = opt.compute_gradients(lambda: v, [v])
    assert float(g) == 1.0
    (gv, _), (gw, _) = opt.compute_gradients(lambda: [v * v, w], [v, w])
    assert (float(gv), float(gw)) == (4.0, 1.0)
    opt.minimize(lambda: v, [v])
    np.testing.assert_allclose(v.numpy(), 1.9, rtol=1e-6)


def test_several_losses_in_a_dict_or_of_several_shapes_are_summed_as_tf_keras_does():
    """tf.keras's tape differentiates a structure of targets as their sum. A dict failed (an
    object array), and a list of losses of different shapes could not be stacked."""
    a, b = kopt.Variable(1.0, name="a"), kopt.Variable([1.0, 2.0], name="b")
    opt = optimizers.SGD(0.1)
    (ga, _), (gb, _) = opt.compute_gradients(lambda: {"ce": a * a, "reg": b * 3.0}, [a, b])
    assert float(ga) == 2.0
    np.testing.assert_array_equal(gb, [3.0, 3.0])
    (ga, _), (gb, _) = opt.compute_gradients(lambda: (a * a, b * b), [a, b])
    assert float(ga) == 2.0
    np.testing.assert_array_equal(gb, [2.0, 4.0])
    # One shape: stacked, so a grad_loss weighs each loss (as a tape's output_gradients).
    (ga, _), (gb, _) = opt.compute_gradients(lambda: [a * a, b[0]], [a, b], jnp.array([0.5, 2.0]))
    assert float(ga) == 1.0
    np.testing.assert_array_equal(gb, [2.0, 0.0])
    with pytest.raises(ValueError, match="empty dict") as error:
        opt.minimize(lambda: {}, [a])
    assert "minimize" in str(error.value)
    assert float(a.numpy()) == 1.0 and int(opt.iterations.numpy()) == 0


def test_var_list_may_be_any_iterable_of_variables():
    """tf.keras flattens ``var_list``; ``weights.values()`` (or a generator) was refused as
    one item that is not a variable."""
    weights = {"a": kopt.Variable(1.0, name="a"), "b": kopt.Variable(2.0, name="b")}
    opt = optimizers.SGD(0.1)
    opt.minimize(lambda: weights["a"] * 1.0 + weights["b"] * 2.0, weights.values())
    opt.minimize(lambda: weights["a"] * 1.0, (v for v in [weights["a"]]))
    np.testing.assert_allclose(weights["a"].numpy(), 0.8, rtol=1e-6)
    np.testing.assert_allclose(weights["b"].numpy(), 1.8, rtol=1e-6)
    # A pytree mapping of them (flax's FrozenDict) is its values, as before.
    from flax.core import FrozenDict

    opt.minimize(lambda: weights["a"] * 1.0 + weights["b"] * 1.0, FrozenDict(weights))
    np.testing.assert_allclose(weights["b"].numpy(), 1.7, rtol=1e-6)


def test_jax_nn_functions_and_jitted_functions_of_variables_in_a_loss():
    """``jax.nn.relu`` and ``jax.nn.sigmoid`` differentiate a variable's value (their derivative
    rules call lax, which takes arrays: a bare variable goes in as ``v.value``); a jitted or
    vmapped function given a variable in a loss still gets a variable, whose ``value`` it may
    read."""
    v = kopt.Variable(np.array([-1.0, 2.0], np.float32), name="gate")
    opt = optimizers.SGD(1.0)
    ((g, _),) = opt.compute_gradients(lambda: jnp.sum(jax.nn.relu(v.value)), [v])
    np.testing.assert_array_equal(g, [0.0, 1.0])
    ((g, _),) = opt.compute_gradients(lambda: jnp.sum(jax.nn.sigmoid(v.value)), [v])
    s = 1 / (1 + np.exp(-np.array([-1.0, 2.0])))
    np.testing.assert_allclose(g, s * (1 - s), rtol=1e-6)
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])

    def per_example(w, row):
        return jnp.sum(w.value * row) ** 2

    ((g, _),) = opt.compute_gradients(lambda: jax.jit(per_example)(v, x[0]), [v])
    np.testing.assert_allclose(g, 2 * 3.0 * np.array([1.0, 2.0]), rtol=1e-6)
    ((g, _),) = opt.compute_gradients(
        lambda: jnp.sum(jax.vmap(per_example, in_axes=(None, 0))(v, x)), [v]
    )
    np.testing.assert_allclose(g, 2 * 3.0 * x[0] + 2 * 5.0 * x[1], rtol=1e-6)
    # Outside a loss, a jitted function gets a variable of its own too.
    kinds = []
    jax.jit(lambda w: kinds.append(type(w)) or w.value)(v)
    assert kinds[0] is kopt.Variable


def test_a_callable_var_list_built_by_the_loss_keeps_one_steps_assignments():
    """tf.keras's lazy-build pattern: ``var_list`` a callable, the model built by the loss's
    first call. The loss then runs twice on that step, and both runs' assignments were kept (a
    moving mean moved twice); the second run's are now the step's."""
    x = np.full((4, 3), 2.0, np.float32)

    class Layer:
        def __init__(self):
            self.w = None
            self.moving_mean = kopt.Variable(np.zeros(3, np.float32), trainable=False)

        def __call__(self, x):
            if self.w is None:
                self.w = kopt.Variable(np.full((3, 1), 0.1, np.float32), name="w")
            batch_mean = jnp.mean(x, 0)
            self.moving_mean.assign(0.9 * self.moving_mean + 0.1 * batch_mean)
            return (x - batch_mean + 1.0) @ self.w

    layer = Layer()
    opt = optimizers.SGD(0.1)
    for step in range(3):
        opt.minimize(lambda: jnp.mean(layer(x) ** 2), lambda: [] if layer.w is None else [layer.w])
        # m <- 0.9 m + 0.1 * 2.0, once per step
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), 2.0 * (1 - 0.9 ** (step + 1)), rtol=1e-6
        )
        assert int(opt.iterations.numpy()) == step + 1


def test_an_integer_loss_is_refused_and_changes_nothing():
    """Its gradients came out as zeros and the step was taken (Adam moved the variable);
    tf.keras raises "No gradients provided for any variable"."""
    a = kopt.Variable([0.9, 1.5], name="a")
    opt = optimizers.Adam(0.1)
    opt.minimize(lambda: jnp.sum(a * a), [a])
    before = a.numpy()
    with pytest.raises(ValueError, match="loss has dtype int32.*No gradients"):
        opt.minimize(lambda: jnp.sum(a).astype(jnp.int32), [a])
    np.testing.assert_array_equal(a.numpy(), before)
    assert int(opt.iterations.numpy()) == 1


@pytest.mark.parametrize("callable_var_list", [True, False], ids=["callable", "list"])
def test_a_variable_the_loss_builds_beside_built_ones_holds_its_value(callable_var_list):
    """Made while the loss was traced, it held a value of that trace, and the step (or the
    next) failed on it. Numbers as tf.keras's legacy SGD gives them for this loop."""
    a = kopt.Variable(np.array([1.0, 2.0], np.float32), name="a")
    made = []

    def loss():
        if not made:
            made.append(kopt.Variable(lambda: jnp.full((1,), 5.0), name="lazy"))
        return jnp.sum(made[0] * a)

    opt = optimizers.SGD(0.1)
    var_list = (lambda: [a, *made]) if callable_var_list else [a]
    opt.minimize(loss, var_list)
    np.testing.assert_allclose(a.numpy(), [0.5, 1.5], rtol=1e-6)
    np.testing.assert_allclose(made[0].numpy(), [4.7] if callable_var_list else [5.0], rtol=1e-6)
    opt.minimize(loss, var_list)  # and the next step reads it
    np.testing.assert_allclose(made[0].numpy(), [4.5] if callable_var_list else [5.0], rtol=1e-6)
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize("lists", [("az", "z"), ("za", "a"), ("z", "az")])
def test_a_loss_minimized_over_part_of_the_variables_it_reads(lists):
    """Freezing a variable the loss still reads (a GAN's alternating steps): its trace has
    the same equations with the variable captured instead of an input, and was taken for
    the other's cached program (an AssertionError, for this and any later optimizer).
    Numbers as tf.keras's legacy SGD gives them."""
    for _ in range(2):  # fresh variables and optimizer: the cache is the process's
        z, a = kopt.Variable([1.0], name="z"), kopt.Variable([2.0], name="a")
        opt = optimizers.SGD(0.1)
        expected = {"z": 1.0, "a": 2.0}

        def loss(z=z, a=a):
            return jnp.sum(z * a)

        for names in lists:
            grads = {"z": expected["a"], "a": expected["z"]}
            opt.minimize(loss, [{"z": z, "a": a}[n] for n in names])
            for n in names:
                expected[n] -= 0.1 * grads[n]
        np.testing.assert_allclose([z.numpy()[0], a.numpy()[0]], [expected["z"], expected["a"]])
