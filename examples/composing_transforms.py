"""Compose kopt's building blocks: clipping, masked weight decay, per-layer optimizers,
gradient accumulation, schedules, and hyperparameters changed inside a jitted step.

Every kopt optimizer is a short ``kopt.chain`` of pieces that are public too, so a training
recipe is a chain you write yourself. Three recipes train the same MLP on scikit-learn's digits:

1. AdamW by hand: global-norm clipping, Adam scaling, weight decay on the weight matrices only
   (``kopt.masked``), a warmup-then-cosine learning rate (``kopt.schedules``), with gradients
   accumulated over 4 micro-batches (``kopt.accumulate_gradients``).
2. One optimizer per layer group (``kopt.multi_transform``): Adam for the hidden layer, SGD with
   momentum for the output layer.
3. Reduce-on-plateau: the learning rate is an argument of the jitted step, written into the
   optimizer state with ``kopt.set_hyperparam``; changing it never recompiles.

Run:
    python examples/composing_transforms.py --steps 400
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from tqdm import tqdm

import kopt

HIDDEN = 64
MICRO_BATCH = 32
ACCUMULATE = 4  # micro-batches per optimizer update in recipe 1


def load_data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"w": jax.random.normal(k1, (64, HIDDEN)) * 0.18, "b": jnp.zeros(HIDDEN)},
        "output": {"w": jax.random.normal(k2, (HIDDEN, 10)) * 0.12, "b": jnp.zeros(10)},
    }


def predict(params, x):
    h = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["output"]["w"] + params["output"]["b"]


def loss_fn(params, x, y):
    log_probs = jax.nn.log_softmax(predict(params, x))
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(predict(params, x), axis=-1) == y))


def weights_only(params):
    """The weight-decay mask: True for weight matrices, False for biases."""
    return {layer: {"w": True, "b": False} for layer in params}


def layer_labels(params):
    """``multi_transform`` labels: which optimizer each leaf belongs to."""
    return {"hidden": {"w": "body", "b": "body"}, "output": {"w": "head", "b": "head"}}


def recipe_adamw_by_hand(micro_steps: int):
    updates = max(micro_steps // ACCUMULATE, 1)
    learning_rate = kopt.schedules.cosine_decay(
        0.0,  # start of the warmup
        decay_steps=updates,
        warmup_target=1e-2,
        warmup_steps=max(updates // 10, 1),
    )
    return kopt.accumulate_gradients(
        kopt.chain(
            kopt.clip_by_global_norm(1.0),
            kopt.scale_by_adam(),
            kopt.masked(kopt.add_decayed_weights(1e-2), weights_only),
            kopt.scale_by_learning_rate(learning_rate),
        ),
        every_k=ACCUMULATE,
    )


def recipe_per_layer():
    return kopt.multi_transform(
        {"body": kopt.adam(3e-3), "head": kopt.sgd(0.05, momentum=0.9)}, layer_labels
    )


def make_step(tx):
    @jax.jit
    def step(params, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return kopt.apply_updates(params, updates), opt_state, loss

    return step


def batches(n: int, steps: int, rng: np.random.Generator):
    for _ in range(steps):
        yield rng.choice(n, MICRO_BATCH, replace=False)


def run_recipe(name, tx, steps, data, params0, progress):
    (x, y), (x_test, y_test) = data
    step = make_step(tx)
    params, opt_state = params0, jax.jit(tx.init)(params0)
    rng = np.random.default_rng(1)
    for idx in tqdm(
        batches(len(x), steps, rng), total=steps, desc=name, leave=False, disable=not progress
    ):
        params, opt_state, _ = step(params, opt_state, x[idx], y[idx])
    return params, opt_state, float(loss_fn(params, x, y)), accuracy(params, x_test, y_test)


def reduce_on_plateau(steps, data, params0, progress):
    """Recipe 3: a Python controller picks the learning rate; the jitted step writes it."""
    (x, y), (x_test, y_test) = data
    tx = kopt.chain(kopt.clip_by_global_norm(1.0), kopt.adam(learning_rate=3e-2))
    traces = 0

    @jax.jit
    def step(params, opt_state, xb, yb, learning_rate):
        nonlocal traces
        traces += 1  # runs once per compilation, not once per call
        opt_state = kopt.set_hyperparam(opt_state, "learning_rate", learning_rate)
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return kopt.apply_updates(params, updates), opt_state, loss

    params, opt_state = params0, jax.jit(tx.init)(params0)
    lr, best, patience, evaluate_every = 3e-2, np.inf, 0, max(steps // 20, 1)
    rng = np.random.default_rng(1)
    used = set()
    for i, idx in enumerate(
        tqdm(
            batches(len(x), steps, rng),
            total=steps,
            desc="plateau",
            leave=False,
            disable=not progress,
        )
    ):
        used.add(lr)
        params, opt_state, _ = step(params, opt_state, x[idx], y[idx], jnp.float32(lr))
        if (i + 1) % evaluate_every == 0:
            current = float(loss_fn(params, x, y))
            if current < 0.95 * best:  # a 5% improvement resets the patience
                best, patience = current, 0
            else:
                patience += 1
                if patience >= 2:
                    lr, patience = lr * 0.5, 0
    stored = float(kopt.get_hyperparam(opt_state, "learning_rate"))
    return (
        params,
        float(loss_fn(params, x, y)),
        accuracy(params, x_test, y_test),
        used,
        stored,
        traces,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="micro-batch steps per recipe")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    progress = args.steps >= 100
    data = load_data()
    params0 = jax.device_put(init_params(jax.random.key(0)), jax.devices()[0])

    print(f"MLP on digits, {args.steps} micro-batches of {MICRO_BATCH} per recipe")

    tx = recipe_adamw_by_hand(args.steps)
    _, state, loss, acc = run_recipe("adamw by hand", tx, args.steps, data, params0, progress)
    inner = state.inner_state  # the chain's state inside the accumulator
    print(
        f"1. clip + adam + masked decay + cosine schedule, accumulated x{ACCUMULATE}: "
        f"loss {loss:.4f}, test accuracy {acc:.1%}"
    )
    print(
        f"   optimizer updates: {args.steps // ACCUMULATE} (inner step count "
        f"{int(inner[3].count)}), last learning rate "
        f"{float(kopt.get_hyperparam(state, 'learning_rate')):.2e}, Adam slots: "
        f"{kopt.slot_names(state)}"
    )

    _, state, loss, acc = run_recipe(
        "per layer", recipe_per_layer(), args.steps, data, params0, progress
    )
    print(
        f"2. multi_transform (Adam for the hidden layer, SGD momentum for the output): "
        f"loss {loss:.4f}, test accuracy {acc:.1%}"
    )

    _, loss, acc, used, stored, traces = reduce_on_plateau(args.steps, data, params0, progress)
    print(
        f"3. reduce on plateau via kopt.set_hyperparam: loss {loss:.4f}, test accuracy "
        f"{acc:.1%}; learning rates used {sorted(used, reverse=True)} (the state holds "
        f"{stored:.3g}, the last one); the step was traced {traces}x"
    )
    assert traces == 1, "changing a hyperparameter must not retrace the step"


if __name__ == "__main__":
    main()
