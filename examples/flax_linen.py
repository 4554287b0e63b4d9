"""Train a flax.linen model with a kopt optimizer inside flax's ``TrainState``.

A kopt transformation follows the optax protocol (``init`` / ``update``), so it goes wherever
flax expects an optax one: here ``TrainState.create(..., tx=kopt.adamw(...))``. The optimizer
state lives in ``state.opt_state``, where kopt's helpers read it: the scheduled learning rate
with ``kopt.get_hyperparam`` and Adam's moments with ``kopt.get_slot``.

The model is a small convolutional network on scikit-learn's 8x8 handwritten digits.

Run:
    python examples/flax_linen.py --steps 300
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state
from sklearn.datasets import load_digits
from tqdm import tqdm

import kopt

BATCH_SIZE = 64


class ConvNet(nn.Module):
    """Two 3x3 convolutions and a dense head for 8x8 grey images."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def load_data():
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(images))
    split = int(0.8 * len(images))
    return (images[order[:split]], labels[order[:split]]), (
        images[order[split:]],
        labels[order[split:]],
    )


def cross_entropy(logits, labels):
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


@jax.jit
def train_step(state: train_state.TrainState, images, labels):
    def loss_fn(params):
        return cross_entropy(state.apply_fn({"params": params}, images), labels)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


@jax.jit
def accuracy(state: train_state.TrainState, images, labels):
    logits = state.apply_fn({"params": state.params}, images)
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    (x_train, y_train), (x_test, y_test) = load_data()
    model = ConvNet()
    params = model.init(jax.random.key(0), x_train[:1])["params"]

    learning_rate = kopt.schedules.cosine_decay(3e-3, decay_steps=args.steps, alpha=0.1)
    tx = kopt.chain(
        kopt.clip_by_global_norm(1.0),
        kopt.adamw(learning_rate=learning_rate, weight_decay=1e-4),
    )
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"flax ConvNet ({n_params} parameters) on digits, kopt.adamw in a TrainState")

    rng = np.random.default_rng(0)
    report_every = max(args.steps // 5, 1)
    for step in tqdm(range(args.steps), leave=False, disable=args.steps < 100):
        idx = rng.choice(len(x_train), BATCH_SIZE, replace=False)
        state, loss = train_step(state, x_train[idx], y_train[idx])
        if (step + 1) % report_every == 0 or step + 1 == args.steps:
            lr = kopt.get_hyperparam(state.opt_state, "learning_rate")
            tqdm.write(
                f"step {step + 1:4d}  batch loss {float(loss):.4f}  learning rate {float(lr):.2e}"
            )

    m = kopt.get_slot(state.opt_state, "m")  # Adam's first moment, shaped like the params
    print(f"first-moment slot for Dense_1/kernel: shape {m['Dense_1']['kernel'].shape}")
    print(f"test accuracy: {float(accuracy(state, x_test, y_test)):.1%}")


if __name__ == "__main__":
    main()
