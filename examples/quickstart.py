"""Quick start: train a small classifier on scikit-learn's handwritten digits with kopt.

Each optimizer trains the same one-hidden-layer MLP (plain ``jax.numpy``) twice, from the same
initial weights on the same mini-batches:

1. with the Keras facade: ``kopt.Variable`` weights and ``opt.minimize(loss, var_list)``;
2. with the functional core: a ``jax.jit``-compiled step around a kopt transformation.

Both APIs run the same maths, so the two runs end at the same weights (the table prints the
largest difference). The script prints a table (final loss, test accuracy, ms per step for each
API) and saves the loss curves to a PNG.

Run:
    python examples/quickstart.py     # about 20 s of CPU time, mostly compiling
    python examples/quickstart.py --steps 50 --out /tmp/loss.png
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from tqdm import tqdm

import kopt

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "quickstart_loss.png"
HIDDEN = 64
BATCH_SIZE = 64
WARMUP_STEPS = 2  # steps left out of the ms/step figures: they include compilation

# name -> (Keras-style facade optimizer, functional transformation): the same algorithm and
# hyperparameters through both APIs.
OPTIMIZERS: dict[str, tuple[Callable[[], kopt.optimizers.Optimizer], Callable[[], object]]] = {
    "SGD momentum": (
        lambda: kopt.optimizers.SGD(learning_rate=0.05, momentum=0.9),
        lambda: kopt.sgd(learning_rate=0.05, momentum=0.9),
    ),
    "Adam": (
        lambda: kopt.optimizers.Adam(learning_rate=3e-3),
        lambda: kopt.adam(learning_rate=3e-3),
    ),
    "AdamW": (
        lambda: kopt.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.01),
        lambda: kopt.adamw(learning_rate=3e-3, weight_decay=0.01),
    ),
    "RMSprop": (
        lambda: kopt.optimizers.RMSprop(learning_rate=3e-3),
        lambda: kopt.rmsprop(learning_rate=3e-3),
    ),
    "Adagrad": (
        lambda: kopt.optimizers.Adagrad(learning_rate=0.1),
        lambda: kopt.adagrad(learning_rate=0.1),
    ),
    "Lion": (
        lambda: kopt.optimizers.Lion(learning_rate=1e-3),
        lambda: kopt.lion(learning_rate=1e-3),
    ),
}


def load_data(seed: int = 0):
    """Digits (8x8 images, 10 classes) scaled to [0, 1], split 80 / 20 into train and test."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return (x[train], y[train]), (x[test], y[test])


def init_params(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (n_in, HIDDEN)) * jnp.sqrt(2.0 / n_in),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, n_out)) * jnp.sqrt(1.0 / HIDDEN),
        "b2": jnp.zeros(n_out),
    }


def predict(params, x):
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


@jax.jit
def loss_fn(params, x, y):
    """Mean softmax cross-entropy. ``params`` may hold arrays or ``kopt.Variable``s."""
    log_probs = jax.nn.log_softmax(predict(params, x))
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


@jax.jit
def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(predict(params, x), axis=-1) == y)


def batches(n_train: int, steps: int, seed: int = 0) -> np.ndarray:
    """``steps`` rows of mini-batch indices, reshuffling once per epoch."""
    rng = np.random.default_rng(seed)
    per_epoch = n_train // BATCH_SIZE
    epochs = -(-steps // per_epoch)
    order = np.concatenate(
        [rng.permutation(n_train)[: per_epoch * BATCH_SIZE] for _ in range(epochs)]
    )
    return order.reshape(-1, BATCH_SIZE)[:steps]


def train_facade(make_optimizer, params0, data, batch_idx, progress: bool):
    """The tf.keras way: Variables and ``opt.minimize(loss_callable, var_list)``."""
    (x, y), _ = data
    weights = {name: kopt.Variable(value, name=name) for name, value in params0.items()}
    var_list = list(weights.values())
    opt = make_optimizer()
    start = time.perf_counter()
    for i, idx in enumerate(tqdm(batch_idx, desc="facade", leave=False, disable=not progress)):
        if i == WARMUP_STEPS:
            jax.block_until_ready([v.value for v in var_list])
            start = time.perf_counter()
        xb, yb = x[idx], y[idx]
        # The loss is a zero-argument callable, as in tf.keras. It may call a jitted function:
        # kopt.Variable is a pytree, so `loss_fn` traces through the weights being trained.
        opt.minimize(lambda xb=xb, yb=yb: loss_fn(weights, xb, yb), var_list=var_list)
    jax.block_until_ready([v.value for v in var_list])
    return {name: v.value for name, v in weights.items()}, ms_per_step(start, len(batch_idx))


def train_functional(make_transformation, params0, data, batch_idx, progress: bool):
    """The optax way: a pure, jitted step over (params, optimizer state)."""
    (x, y), _ = data
    tx = make_transformation()

    @jax.jit
    def step(params, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return kopt.apply_updates(params, updates), opt_state, loss

    # Initialised under jit, the whole state lives on the params' device from the start, so
    # `step` sees the same input placement on every call and compiles once.
    params, opt_state = params0, jax.jit(tx.init)(params0)
    losses, start = [], time.perf_counter()
    for i, idx in enumerate(tqdm(batch_idx, desc="jitted", leave=False, disable=not progress)):
        if i == WARMUP_STEPS:
            jax.block_until_ready(params)
            start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
        losses.append(loss)
    jax.block_until_ready(params)
    return params, np.asarray(losses), ms_per_step(start, len(batch_idx))


def ms_per_step(start: float, steps: int) -> float:
    """Milliseconds per step since ``start``, over the steps after the warm-up ones."""
    timed = steps - WARMUP_STEPS
    return 1e3 * (time.perf_counter() - start) / timed if timed > 0 else float("nan")


def smooth(values: np.ndarray, momentum: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average, to read noisy mini-batch losses."""
    out, average = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        average = momentum * average + (1 - momentum) * v
        out[i] = average / (1 - momentum ** (i + 1))
    return out


def plot(curves: dict[str, np.ndarray], steps: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, (name, losses) in enumerate(curves.items()):
        steps_axis = np.arange(1, len(losses) + 1)
        ax.plot(steps_axis, smooth(losses), styles[i % len(styles)], label=name, linewidth=1.6)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (cross-entropy, batch {BATCH_SIZE}, smoothed)")
    ax.set_title(f"kopt optimizers: MLP on scikit-learn digits, {steps} steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to save the plot")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    progress = args.steps >= 100

    data = load_data(args.seed)
    (x_train, y_train), (x_test, y_test) = data
    n_classes = int(y_train.max()) + 1
    # Committed to a device up front: a jitted function then sees the same input placement on
    # every call, instead of compiling again once uncommitted inputs become committed outputs.
    params0 = jax.device_put(
        init_params(jax.random.key(args.seed), x_train.shape[1], n_classes), jax.devices()[0]
    )
    batch_idx = batches(len(x_train), args.steps, args.seed)
    print(
        f"digits: {len(x_train)} train / {len(x_test)} test images, MLP 64-{HIDDEN}-10, "
        f"{args.steps} steps of batch {BATCH_SIZE}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}"
    )

    header = (
        f"{'optimizer':<13} {'final loss':>10} {'test acc':>9} {'facade ms/step':>15} "
        f"{'jitted ms/step':>15} {'max |w_facade - w_jitted|':>26}"
    )
    print(header)
    print("-" * len(header))
    curves = {}
    for name, (make_optimizer, make_transformation) in OPTIMIZERS.items():
        facade_params, facade_ms = train_facade(make_optimizer, params0, data, batch_idx, progress)
        params, losses, jit_ms = train_functional(
            make_transformation, params0, data, batch_idx, progress
        )
        curves[name] = losses
        final_loss = float(loss_fn(params, x_train, y_train))
        test_acc = float(accuracy(params, x_test, y_test))
        diff = max(float(jnp.max(jnp.abs(facade_params[k] - params[k]))) for k in params)
        print(
            f"{name:<13} {final_loss:>10.4f} {test_acc:>9.1%} {facade_ms:>15.2f} "
            f"{jit_ms:>15.3f} {diff:>26.1e}"
        )

    plot(curves, args.steps, args.out)
    print(
        "final loss: on the full training set; ms/step: mean wall time of the steps after "
        f"the first {WARMUP_STEPS} (which compile)"
    )
    print(f"saved the loss curves to {args.out}")


if __name__ == "__main__":
    main()
