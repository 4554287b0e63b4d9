"""Train an equinox model with a kopt optimizer.

Equinox models are pytrees that mix arrays with other fields (activation functions, static
sizes). The usual equinox pattern works unchanged with kopt: initialise the optimizer on the
model's arrays (``eqx.filter(model, eqx.is_array)``), differentiate with
``eqx.filter_value_and_grad``, and apply the updates with ``eqx.apply_updates``.

The model is an ``eqx.nn.MLP`` fitting a noisy 1-D function, trained with Lion (Keras 3
semantics) after a warmup-then-cosine learning-rate schedule.

Run:
    python examples/equinox_mlp.py --steps 1000
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
from tqdm import tqdm

import kopt


def make_data(key: jax.Array, n: int = 256):
    """``y = sin(3x) + 0.5 x`` on [-2, 2] with a little noise."""
    k1, k2 = jax.random.split(key)
    x = jax.random.uniform(k1, (n, 1), minval=-2.0, maxval=2.0)
    y = jnp.sin(3 * x) + 0.5 * x + 0.05 * jax.random.normal(k2, (n, 1))
    return x, y


def mse(model: eqx.nn.MLP, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    data_key, model_key = jax.random.split(jax.random.key(0))
    x, y = make_data(data_key)
    model = eqx.nn.MLP(in_size=1, out_size=1, width_size=64, depth=2, key=model_key)

    learning_rate = kopt.schedules.cosine_decay(
        1e-4, decay_steps=args.steps, warmup_target=1e-3, warmup_steps=max(args.steps // 20, 1)
    )
    tx = kopt.lion(learning_rate=learning_rate)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    print(f"equinox MLP fitting sin(3x) + x/2 with kopt.lion, {args.steps} full-batch steps")
    first = float(mse(model, x, y))
    report_every = max(args.steps // 5, 1)
    for i in tqdm(range(args.steps), leave=False, disable=args.steps < 100):
        model, opt_state, loss = step(model, opt_state, x, y)
        if (i + 1) % report_every == 0:
            tqdm.write(f"step {i + 1:5d}  mse {float(loss):.5f}")
    final = float(mse(model, x, y))
    print(f"mse: {first:.4f} before, {final:.5f} after ({first / final:.0f}x lower)")


if __name__ == "__main__":
    main()
