"""Train a flax model of many small layers with its params packed by ``kopt.pack``.

A jitted training step pays for every array it takes and returns, so a model of many small
parameter arrays spends much of its step on them. ``kopt.pack(params)`` stores the params in
one buffer per dtype; the model reads them through ``unpack()`` inside the loss, the gradient
comes out packed, and so do the optimizer's slots. This script trains the same model from the
same start twice, once on the params as flax made them and once packed, checks that both reach
the same params, and prints milliseconds per step of each.

The model is a deep, narrow MLP (24 blocks of dense + LayerNorm, about 100 parameter arrays)
on scikit-learn's 8x8 handwritten digits.

Run:
    python examples/packed_params.py --steps 300
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import kopt

BATCH_SIZE = 64


class DeepMLP(nn.Module):
    """``depth`` residual blocks of Dense + LayerNorm on a 32-wide stream."""

    depth: int = 24

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32)(x)
        for _ in range(self.depth):
            x = x + nn.relu(nn.LayerNorm()(nn.Dense(32)(x)))
        return nn.Dense(10)(x)


def loss_fn(model, params, x, y):
    logits = model.apply({"params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def train(model, params, tx, batches, packed: bool):
    """Runs the steps; returns the final params (unpacked) and the median ms per step."""
    if packed:
        params = kopt.pack(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            return loss_fn(model, p.unpack() if packed else p, x, y)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return kopt.apply_updates(params, updates), opt_state, value

    opt_state = tx.init(params)
    times = []
    for x, y in batches:
        start = time.perf_counter()
        params, opt_state, value = step(params, opt_state, x, y)
        value.block_until_ready()
        times.append(time.perf_counter() - start)
    steady = times[1:] or times  # the first step compiles
    return (params.unpack() if packed else params), float(value), 1e3 * float(np.median(steady))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--depth", type=int, default=24, help="residual blocks (24: about 100 parameter arrays)"
    )
    args = parser.parse_args()

    digits = load_digits()
    x_all = jnp.asarray(digits.data / 16.0, jnp.float32)
    y_all = jnp.asarray(digits.target, jnp.int32)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.steps):
        idx = rng.integers(0, len(x_all), BATCH_SIZE)
        batches.append((x_all[idx], y_all[idx]))

    model = DeepMLP(depth=args.depth)
    params = model.init(jax.random.key(0), x_all[:1])["params"]
    n_arrays = len(jax.tree.leaves(params))
    n_params = sum(p.size for p in jax.tree.leaves(params))
    tx = kopt.adam(learning_rate=1e-3)

    plain, plain_loss, plain_ms = train(model, params, tx, batches, packed=False)
    packed, packed_loss, packed_ms = train(model, params, tx, batches, packed=True)

    worst = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(packed), strict=True)
    )
    print(f"{n_params:,} params in {n_arrays} arrays, {args.steps} Adam steps of {BATCH_SIZE}")
    print(f"{'params':<10}{'final loss':>12}{'ms/step':>10}")
    print(f"{'as flax':<10}{plain_loss:>12.4f}{plain_ms:>10.3f}")
    print(f"{'packed':<10}{packed_loss:>12.4f}{packed_ms:>10.3f}")
    print(f"largest difference between the two final params: {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("packed and unpacked training disagree")


if __name__ == "__main__":
    main()
