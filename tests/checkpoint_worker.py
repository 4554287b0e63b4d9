"""Training runs for test_checkpoint.py; run as a script, it resumes them from checkpoints in a
new process: ``python tests/checkpoint_worker.py DIR`` reads DIR/<case> and writes
DIR/<case>.npz with the final values."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kopt
from kopt import optimizers
from kopt.checkpoint import restore_optimizer, restore_state

STEPS, SAVED_AT = 6, 3
SPECS = {"kernel": P("data", None), "bias": P("data")}


def mesh():
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))


def initial_params():
    """The same sharded params in every process."""
    rng = np.random.default_rng(0)
    values = {"kernel": rng.normal(size=(8, 4)), "bias": rng.normal(size=(4,))}
    m = mesh()
    return {
        k: jax.device_put(jnp.asarray(v, jnp.float32), NamedSharding(m, SPECS[k]))
        for k, v in values.items()
    }


def batch(step):
    rng = np.random.default_rng(100 + step)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    return x, np.sin(x[:, :4]).astype(np.float32)


def loss_fn(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["kernel"] + params["bias"]) - y) ** 2)


FUNCTIONAL = kopt.chain(kopt.clip_by_global_norm(1.0), kopt.adam(0.05, amsgrad=True))


@jax.jit
def functional_step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = FUNCTIONAL.update(grads, state, params)
    return kopt.apply_updates(params, updates), state


def functional_run(params, state, start, stop):
    for step in range(start, stop):
        params, state = functional_step(params, state, *batch(step))
    return params, state


FACADE = {
    "adam": lambda: optimizers.Adam(0.05, amsgrad=True, clipnorm=1.0),
    "nadam": lambda: optimizers.Nadam(0.05),
    "lion_ema_accumulation": lambda: optimizers.Lion(
        learning_rate=optimizers.schedules.ExponentialDecay(0.02, 3, 0.5),
        weight_decay=0.1,
        use_ema=True,
        ema_overwrite_frequency=2,
        gradient_accumulation_steps=2,
    ),
    "loss_scale": lambda: optimizers.LossScaleOptimizer(
        optimizers.SGD(0.1, momentum=0.9), initial_scale=8.0, dynamic_growth_steps=2
    ),
}


def facade_variables():
    return [kopt.Variable(v, name=k) for k, v in initial_params().items()]


gradient = jax.jit(jax.grad(loss_fn))


def facade_run(opt, variables, start, stop):
    for step in range(start, stop):
        grads = gradient({v.name[:-2]: v.value for v in variables}, *batch(step))
        opt.apply_gradients([(grads[v.name[:-2]], v) for v in variables])


def facade_values(opt, variables):
    """Every variable and optimizer weight, by name."""
    out = {v.name: v.numpy() for v in variables}
    out.update({"opt/" + w.name: w.numpy() for w in opt.weights})
    return out


def resume(directory):
    params = initial_params()
    like = {"params": params, "state": FUNCTIONAL.init(params)}
    restored = restore_state(directory / "functional", like)
    params, state = functional_run(restored["params"], restored["state"], SAVED_AT, STEPS)
    for name, leaf in params.items():
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh(), SPECS[name]), leaf.ndim)
    np.savez(directory / "functional.npz", *jax.tree.leaves((params, state)))
    for case in FACADE:
        variables = facade_variables()
        opt = restore_optimizer(directory / case, variables)
        facade_run(opt, variables, SAVED_AT, STEPS)
        np.savez(directory / f"{case}.npz", **facade_values(opt, variables))


if __name__ == "__main__":
    resume(Path(sys.argv[1]))
