"""The things being timed: one closure per library that runs one optimizer step and waits for it.

Every builder takes the optimizer's name and a configuration (``n_params`` float32 values in
``n_leaves`` vectors), builds params, gradients and state, runs the step once (compiling it)
and returns the step. Imports happen inside the builders, so a missing peer only fails its own
rows: builders raise :class:`Unavailable` with the reason.

Waiting: a jitted step waits on one output array. XLA runs a step as one executable whose
outputs become ready together, and the next step consumes them, so waiting on one is enough
and avoids timing a walk over hundreds of leaves.
"""

from __future__ import annotations

from typing import Any

from harness import Step, jax_tree, numpy_leaves

# The same hyperparameters in every library (each library keeps its own epsilon placement).
ADAM = {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
SGD_MOMENTUM = {"learning_rate": 0.01, "momentum": 0.9}
RMSPROP = {"learning_rate": 1e-3, "rho": 0.9, "epsilon": 1e-7}
ADAGRAD = {"learning_rate": 1e-3, "initial_accumulator_value": 0.1, "epsilon": 1e-7}


class Unavailable(Exception):
    """A contender that cannot run here (a missing library, an unsupported feature)."""


def kopt_transformation(optimizer: str):
    import kopt

    return {
        "adam": lambda: kopt.adam(**ADAM),
        "sgd_momentum": lambda: kopt.sgd(**SGD_MOMENTUM),
        "rmsprop": lambda: kopt.rmsprop(**RMSPROP),
        "adagrad": lambda: kopt.adagrad(**ADAGRAD),
    }[optimizer]()


def optax_transformation(optimizer: str):
    try:
        import optax
    except ImportError as e:
        raise Unavailable("optax is not installed") from e
    return {
        "adam": lambda: optax.adam(ADAM["learning_rate"], b1=0.9, b2=0.999, eps=ADAM["epsilon"]),
        "sgd_momentum": lambda: optax.sgd(**SGD_MOMENTUM),
        "rmsprop": lambda: optax.rmsprop(
            RMSPROP["learning_rate"], decay=RMSPROP["rho"], eps=RMSPROP["epsilon"]
        ),
        "adagrad": lambda: optax.adagrad(
            ADAGRAD["learning_rate"],
            initial_accumulator_value=ADAGRAD["initial_accumulator_value"],
            eps=ADAGRAD["epsilon"],
        ),
    }[optimizer]()


def jitted_step(transformation, apply_updates):
    """``(params, state, grads) -> (params, state)``, jitted, params and state donated."""
    import jax

    def step(params, state, grads):
        updates, state = transformation.update(grads, state, params)
        return apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def pure_step(transformation, apply_updates, params, grads, repeat: int = 1, jitted=None) -> Step:
    """A step closure over a jitted, donated pure step of ``transformation``: ``repeat`` steps
    dispatched back to back, then one wait. ``jitted``: that step, already made by
    :func:`jitted_step` (compiled steps are reused), else a new one."""
    fn = jitted_step(transformation, apply_updates) if jitted is None else jitted
    box = [params, transformation.init(params)]
    last = last_leaf(params)

    def step():
        for _ in range(repeat):
            box[0], box[1] = fn(box[0], box[1], grads)
        last(box[0]).block_until_ready()

    step()
    return step


def last_leaf(tree):
    """A cheap accessor of one output array to wait on (a dict's last key, a Packed's buffer)."""
    if isinstance(tree, dict):
        key = max(tree)
        return lambda t: t[key]
    key = list(tree.buffers)[-1]
    return lambda t: t.buffers[key]


def kopt_pure(optimizer: str, n_params: int, n_leaves: int, wrap=None, pack=False) -> Step:
    """kopt's jitted step; ``pack``: params and gradients as :func:`kopt.pack` buffers (the
    gradient of a loss taken with respect to packed params is packed)."""
    import kopt

    tx = kopt_transformation(optimizer)
    if wrap is not None:
        tx = wrap(tx)
    params = jax_tree(n_params, n_leaves, 0)
    grads = jax_tree(n_params, n_leaves, 1)
    if pack:
        params, grads = kopt.pack(params), kopt.pack(grads)
    return pure_step(tx, kopt.apply_updates, params, grads)


def mlp_params(n_params: int, n_leaves: int, seed: int) -> dict[str, Any]:
    """An MLP of ``n_leaves // 2`` square tanh layers (kernel and bias) of about ``n_params``,
    made on the default device (a 100M-param model took seconds to draw on the host and copy)."""
    import jax
    import jax.numpy as jnp

    layers = max(n_leaves // 2, 1)
    width = max(int((n_params / layers) ** 0.5), 2)
    draw = jax.jit(
        lambda key: jax.random.normal(key, (width, width), jnp.float32) / jnp.sqrt(width)
    )
    keys = jax.random.split(jax.random.key(seed), layers)
    params = {}
    for i in range(layers):
        params[f"w{i:04d}"] = draw(keys[i])
        params[f"b{i:04d}"] = jnp.zeros(width, jnp.float32)
    return params


def mlp_loss(params: dict[str, Any], x, y):
    import jax.numpy as jnp

    h = x
    for i in range(len(params) // 2):
        h = jnp.tanh(h @ params[f"w{i:04d}"] + params[f"b{i:04d}"])
    return jnp.mean((h - y) ** 2)


def train_step(
    library: str,
    optimizer: str,
    n_params: int,
    n_leaves: int,
    batch=64,
    repeat: int = 1,
    max_leaf_size: int | str | None = "auto",
) -> Step:
    """A whole jitted training step of an MLP (loss, gradient, update), params and state
    donated: ``library`` is ``"optax"``, ``"kopt"`` or ``"kopt.pack"`` (params packed with
    ``max_leaf_size``, the model reading them through ``unpack()``). Each call runs ``repeat``
    steps back to back, then waits once."""
    import jax
    import jax.numpy as jnp

    params = jax.device_put(mlp_params(n_params, n_leaves, 0))
    width = params["w0000"].shape[0]
    x = jax.random.normal(jax.random.key(1), (batch, width))
    y = jnp.tanh(jax.random.normal(jax.random.key(2), (batch, width)))
    if library == "optax":
        import optax

        tx, apply_updates, loss = optax_transformation(optimizer), optax.apply_updates, mlp_loss
    else:
        import kopt

        tx, apply_updates, loss = kopt_transformation(optimizer), kopt.apply_updates, mlp_loss
        if library == "kopt.pack":
            params = kopt.pack(params, max_leaf_size=max_leaf_size)

            def loss(p, x, y):
                return mlp_loss(p.unpack(), x, y)

    def step_fn(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state

    fn = jax.jit(step_fn, donate_argnums=(0, 1))
    box = [params, tx.init(params)]
    last = last_leaf(params)

    def step():
        for _ in range(repeat):
            box[0], box[1] = fn(box[0], box[1], x, y)
        last(box[0]).block_until_ready()

    step()
    return step


def facade_minimize(optimizer: str, n_params: int, n_leaves: int, batch=64) -> Step:
    """``opt.minimize(loss, variables)`` over the MLP of :func:`train_step`, as the facade's
    documentation writes it: the closure calls a ``jax.jit``-compiled loss of the variables."""
    import jax
    import jax.numpy as jnp

    import kopt
    from kopt import optimizers

    params = {k: kopt.Variable(v) for k, v in mlp_params(n_params, n_leaves, 0).items()}
    width = params["w0000"].shape[0]
    x = jax.random.normal(jax.random.key(1), (batch, width))
    y = jnp.tanh(jax.random.normal(jax.random.key(2), (batch, width)))
    loss = jax.jit(mlp_loss)
    variables = list(params.values())
    opt = _keras_like(optimizers, optimizer)

    def step():
        opt.minimize(lambda: loss(params, x, y), variables)
        opt.iterations.value.block_until_ready()

    step()
    return step


def optax_pure(optimizer: str, n_params: int, n_leaves: int) -> Step:
    import optax

    tx = optax_transformation(optimizer)
    params = jax_tree(n_params, n_leaves, 0)
    return pure_step(tx, optax.apply_updates, params, jax_tree(n_params, n_leaves, 1))


def kopt_facade(optimizer: str, n_params: int, n_leaves: int, loss_scale: bool = False) -> Step:
    """``kopt.optimizers.<Optimizer>(...).apply_gradients(zip(grads, variables))``, inside a
    dynamic ``LossScaleOptimizer`` with ``loss_scale`` (the gradients are finite)."""
    import jax.numpy as jnp

    try:
        import kopt
        from kopt import optimizers
    except ImportError as e:
        raise Unavailable(f"kopt.optimizers cannot be imported ({e})") from e
    if not hasattr(kopt, "Variable"):
        raise Unavailable("kopt.Variable does not exist yet")
    variables = [kopt.Variable(x) for x in numpy_leaves(n_params, n_leaves, 0)]
    grads = [jnp.asarray(x) for x in numpy_leaves(n_params, n_leaves, 1)]
    opt = _keras_like(optimizers, optimizer)
    if loss_scale:
        opt = optimizers.LossScaleOptimizer(opt)

    def step():
        opt.apply_gradients(zip(grads, variables, strict=True))
        # Reading a variable's value hands its buffer out, so the next update would copy it
        # first; the step count comes out of the same program and costs a scalar.
        opt.iterations.value.block_until_ready()

    step()
    return step


def _keras_like(module, optimizer: str):
    """An optimizer from a Keras-style ``optimizers`` module (kopt's, Keras 3's, tf.keras's)."""
    if optimizer == "adam":
        return module.Adam(**ADAM)
    if optimizer == "sgd_momentum":
        return module.SGD(**SGD_MOMENTUM)
    if optimizer == "rmsprop":
        return module.RMSprop(**RMSPROP)
    if optimizer == "adagrad":
        return module.Adagrad(**ADAGRAD)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def _keras3():
    import os

    backend = os.environ.get("KERAS_BACKEND", "jax")
    if backend != "jax":
        raise Unavailable(f"KERAS_BACKEND is {backend!r}; the Keras 3 rows need 'jax'")
    os.environ["KERAS_BACKEND"] = "jax"
    try:
        import keras
    except ImportError as e:
        raise Unavailable(f"Keras 3 is not installed ({e})") from e
    if not keras.__version__.startswith("3."):
        raise Unavailable(f"keras {keras.__version__} is not Keras 3")
    return keras


def keras3_eager(optimizer: str, n_params: int, n_leaves: int) -> Step:
    """Keras 3 (JAX backend) ``apply_gradients`` called eagerly, as a Keras user would."""
    import jax.numpy as jnp

    keras = _keras3()
    variables = [keras.Variable(x) for x in numpy_leaves(n_params, n_leaves, 0)]
    grads = [jnp.asarray(x) for x in numpy_leaves(n_params, n_leaves, 1)]
    opt = _keras_like(keras.optimizers, optimizer)

    def step():
        opt.apply_gradients(zip(grads, variables, strict=True))
        variables[-1].value.block_until_ready()

    step()
    return step


def keras3_stateless(optimizer: str, n_params: int, n_leaves: int) -> Step:
    """Keras 3's ``stateless_apply`` under ``jax.jit``, optimizer and model variables donated."""
    import jax
    import jax.numpy as jnp

    keras = _keras3()
    variables = [keras.Variable(x) for x in numpy_leaves(n_params, n_leaves, 0)]
    grads = [jnp.asarray(x) for x in numpy_leaves(n_params, n_leaves, 1)]
    opt = _keras_like(keras.optimizers, optimizer)
    opt.build(variables)
    fn = jax.jit(opt.stateless_apply, donate_argnums=(0, 2))
    box = [[v.value for v in opt.variables], [v.value for v in variables]]

    def step():
        box[1], box[0] = fn(box[0], grads, box[1])
        box[1][-1].block_until_ready()

    step()
    return step


def tf_keras_legacy(optimizer: str, n_params: int, n_leaves: int, compiled: bool) -> Step:
    """tf.keras's legacy optimizer (``tf_keras.optimizers.legacy``), eager or in tf.function."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise Unavailable("tensorflow is not installed") from e
    try:
        import tf_keras

        legacy = tf_keras.optimizers.legacy
    except (ImportError, AttributeError):
        legacy = getattr(getattr(tf.keras, "optimizers", None), "legacy", None)
    if legacy is None:
        raise Unavailable("neither tf_keras nor tf.keras.optimizers.legacy is available")
    variables = [tf.Variable(x) for x in numpy_leaves(n_params, n_leaves, 0)]
    grads = [tf.constant(x) for x in numpy_leaves(n_params, n_leaves, 1)]
    opt = _keras_like(legacy, optimizer)

    def apply(gs):
        opt.apply_gradients(zip(gs, variables, strict=True))

    run = tf.function(apply) if compiled else apply

    def step():
        run(grads)

    step()
    return step


def torch_fused(optimizer: str, n_params: int, n_leaves: int) -> Step:
    """torch.optim with ``fused=True`` (the fastest CPU implementation, torch >= 2.4)."""
    try:
        import torch
    except ImportError as e:
        raise Unavailable("torch is not installed") from e
    params = [torch.nn.Parameter(torch.from_numpy(x)) for x in numpy_leaves(n_params, n_leaves, 0)]
    for p, g in zip(params, numpy_leaves(n_params, n_leaves, 1), strict=True):
        p.grad = torch.from_numpy(g)
    kwargs: dict[str, Any] = {"fused": True}
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=ADAM["learning_rate"], eps=ADAM["epsilon"], **kwargs)
    elif optimizer == "sgd_momentum":
        opt = torch.optim.SGD(
            params, lr=SGD_MOMENTUM["learning_rate"], momentum=SGD_MOMENTUM["momentum"], **kwargs
        )
    else:
        raise Unavailable(f"no fused torch {optimizer}")
    try:
        with torch.no_grad():
            opt.step()
    except RuntimeError as e:
        raise Unavailable(f"fused torch.optim is not supported here ({e})") from e

    def step():
        with torch.no_grad():
            opt.step()

    return step


# --- the rest of the functional core: modern optimizers and the transformations users chain ---

# Each case: kopt's transformation, optax's nearest equivalent, and calls per timed unit (an
# accumulating wrapper is timed over whole cycles: one call of every ``every_k`` runs the inner
# update). Where the maths differ the table says how (see ``MODERN_NOTES``).
ACCUMULATE_K = 4
WEIGHT_DECAY = 0.004
MODERN_CASES = (
    "adamw",
    "lion",
    "lamb",
    "adafactor",
    "clip_by_global_norm+adam",
    "adamw masked",
    "multi_transform",
    "accumulate_gradients",
    "apply_if_finite",
    "adam+ema",
    "decoupled_weight_decay",
)
MODERN_NOTES = {
    "adamw": "epsilon: kopt Keras's (to sqrt(v)), optax after bias correction",
    "lion": "same maths (optax weight_decay=0)",
    "lamb": "same maths (optax weight_decay=0)",
    "adafactor": "kopt Keras 3's (step min(lr, 1/sqrt(t))), optax's fixed lr; 1-D leaves: "
    "neither factors",
    "clip_by_global_norm+adam": "clip 1.0; Adam epsilon as in adamw",
    "adamw masked": "decay on every other leaf (mask)",
    "multi_transform": "adam on even leaves, sgd on odd ones",
    "accumulate_gradients": f"every_k={ACCUMULATE_K}, mean; kopt sums then divides, "
    f"optax.MultiSteps keeps a running mean; times per call",
    "apply_if_finite": "adam inside, gradients finite",
    "adam+ema": "EMA 0.99 of the params; optax: optax.incremental_update after the step",
    "decoupled_weight_decay": "kopt.decoupled_weight_decay(kopt.adam) against optax.adamw",
}


def _even_leaves(tree):
    """A mask of the params: True on every other leaf (by sorted key)."""
    return {k: i % 2 == 0 for i, k in enumerate(sorted(tree))}


def kopt_modern(case: str):
    """kopt's transformation for one of :data:`MODERN_CASES`."""
    import kopt

    adam = lambda: kopt.adam(**ADAM)  # noqa: E731
    lr = ADAM["learning_rate"]
    if case == "adamw":
        return kopt.adamw(lr, WEIGHT_DECAY, epsilon=ADAM["epsilon"])
    if case == "lion":
        return kopt.lion(lr, 0.9, 0.99)
    if case == "lamb":
        return kopt.lamb(lr, epsilon=ADAM["epsilon"])
    if case == "adafactor":
        return kopt.adafactor(lr)
    if case == "clip_by_global_norm+adam":
        return kopt.chain(kopt.clip_by_global_norm(1.0), adam())
    if case == "adamw masked":
        return kopt.adamw(lr, WEIGHT_DECAY, epsilon=ADAM["epsilon"], mask=_even_leaves)
    if case == "multi_transform":
        return kopt.multi_transform(
            {"adam": adam(), "sgd": kopt.sgd(**SGD_MOMENTUM)},
            lambda p: {k: "adam" if m else "sgd" for k, m in _even_leaves(p).items()},
        )
    if case == "accumulate_gradients":
        return kopt.accumulate_gradients(adam(), ACCUMULATE_K)
    if case == "apply_if_finite":
        return kopt.apply_if_finite(adam(), 5)
    if case == "adam+ema":
        return kopt.chain(adam(), kopt.ema(0.99))
    if case == "decoupled_weight_decay":
        return kopt.decoupled_weight_decay(adam(), WEIGHT_DECAY, lr)
    raise ValueError(f"unknown case {case!r}")


def optax_modern(case: str):
    """optax's nearest equivalent of :func:`kopt_modern`'s ``case``."""
    try:
        import optax
    except ImportError as e:
        raise Unavailable("optax is not installed") from e
    lr, eps = ADAM["learning_rate"], ADAM["epsilon"]
    adam = lambda: optax.adam(lr, b1=0.9, b2=0.999, eps=eps)  # noqa: E731
    if case in ("adamw", "decoupled_weight_decay"):
        return optax.adamw(lr, b1=0.9, b2=0.999, eps=eps, weight_decay=WEIGHT_DECAY)
    if case == "lion":
        return optax.lion(lr, b1=0.9, b2=0.99, weight_decay=0.0)
    if case == "lamb":
        return optax.lamb(lr, b1=0.9, b2=0.999, eps=eps, weight_decay=0.0)
    if case == "adafactor":
        return optax.adafactor(lr)
    if case == "clip_by_global_norm+adam":
        return optax.chain(optax.clip_by_global_norm(1.0), adam())
    if case == "adamw masked":
        return optax.adamw(
            lr, b1=0.9, b2=0.999, eps=eps, weight_decay=WEIGHT_DECAY, mask=_even_leaves
        )
    if case == "multi_transform":
        return optax.multi_transform(
            {"adam": adam(), "sgd": optax.sgd(**SGD_MOMENTUM)},
            lambda p: {k: "adam" if m else "sgd" for k, m in _even_leaves(p).items()},
        )
    if case == "accumulate_gradients":
        return optax.MultiSteps(adam(), every_k_schedule=ACCUMULATE_K)
    if case == "apply_if_finite":
        return optax.apply_if_finite(adam(), 5)
    if case == "adam+ema":
        return optax.chain(adam(), _optax_param_ema(0.99))
    raise ValueError(f"unknown case {case!r}")


def _optax_param_ema(momentum: float):
    """An EMA of the params after each update, as optax users keep one (``incremental_update``
    of the updated params), made a transformation so the step has the same shape as kopt's.
    The first step sets the average to the params, as kopt's (and Keras 3's) does."""
    import jax
    import jax.numpy as jnp
    import optax

    def init(params):
        return (jnp.zeros([], jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None):
        count, average = state
        new_params = optax.apply_updates(params, updates)
        step_size = jnp.where(count == 0, 1.0, 1.0 - momentum)
        average = optax.incremental_update(new_params, average, step_size)
        return updates, (optax.safe_increment(count), average)

    return optax.GradientTransformation(init, update)


def modern_calls(case: str) -> int:
    """Calls of the step per timed unit: a whole accumulation cycle for the accumulators."""
    return ACCUMULATE_K if case == "accumulate_gradients" else 1


_MODERN_STEPS: dict[tuple[str, str], Any] = {}
_MODERN_TREES: dict[tuple[int, int, int], Any] = {}


def modern_pure(library: str, case: str, n_params: int, n_leaves: int) -> Step:
    """The jitted, donated pure step of ``case`` in ``library`` (``"kopt"`` or ``"optax"``),
    ``modern_calls(case)`` calls per timed unit.

    Each call builds fresh buffers (copies of params and gradients made once per size) around
    one jitted step per library and case, compiled once: the suite times many pairs, and
    drawing 10M random values and compiling a 200-leaf step for every round of every pair was
    most of its time. :func:`clear_modern_cache` frees them."""
    import jax
    import jax.numpy as jnp

    key = (library, case)
    if key not in _MODERN_STEPS:
        if library == "kopt":
            import kopt

            tx, apply_updates = kopt_modern(case), kopt.apply_updates
        else:
            tx = optax_modern(case)
            import optax

            apply_updates = optax.apply_updates
        _MODERN_STEPS[key] = (tx, apply_updates, jitted_step(tx, apply_updates))
    tx, apply_updates, fn = _MODERN_STEPS[key]
    trees = []
    for seed in (0, 1):
        base = _MODERN_TREES.get((n_params, n_leaves, seed))
        if base is None:
            base = _MODERN_TREES[(n_params, n_leaves, seed)] = jax_tree(n_params, n_leaves, seed)
        trees.append(jax.tree.map(jnp.copy, base))
    params, grads = trees
    return pure_step(tx, apply_updates, params, grads, repeat=modern_calls(case), jitted=fn)


def clear_modern_cache() -> None:
    _MODERN_STEPS.clear()
    _MODERN_TREES.clear()
