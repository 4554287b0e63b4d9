"""Data-parallel training over several local processes with JAX's distributed runtime.

    python examples/data_parallel.py --num-processes 2 --steps 20

The parent starts ``--num-processes`` copies of this script (``--process-id i``) on this machine.
Each child simulates 2 CPU devices, joins the others through ``jax.distributed.initialize`` (gloo
collectives on the CPU), and holds its own shard of a synthetic regression batch. Together they
form one global mesh of ``2 * N`` devices. The parameters are replicated; the batch is split over
the mesh's ``data`` axis; ``jax.jit`` of the loss over the global batch averages the gradients
over every device of every process. The model (a small MLP) is trained twice:

1. with the functional API, ``kopt.adam``, inside ``jax.shard_map``: each device takes the
   gradient of its own slice and ``kopt.aggregate_gradients("data", "mean")`` averages them;
2. with the Keras facade, ``kopt.optimizers.Adam`` over ``kopt.Variable``s that hold the
   replicated global arrays; the gradients come from a ``jax.jit`` of the global mean loss.

Each child checks that the loss fell, that both runs agree, and (by a cross-process all-gather)
that every process holds the same parameters; it writes a digest of them that the parent
compares too. Exit status 0 when all holds; otherwise non-zero with a message. The parent kills
the children if they outlive ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEVICES_PER_PROCESS = 2
FEATURES = 8
HIDDEN = 16
ROWS_PER_DEVICE = 32
LEARNING_RATE = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds, for the parent")
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.num_processes < 1:
        parser.error(f"--num-processes must be >= 1, received {args.num_processes}")
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (to see the loss fall), received {args.steps}")
    return args


# --- the parent ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()
    for child in children:
        child.wait()


def run_parent(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="kopt-data-parallel-") as out_dir:
        return run_processes(args, Path(out_dir))


def run_processes(args: argparse.Namespace, out_dir: Path) -> int:
    port = free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    env["JAX_PLATFORMS"] = "cpu"
    print(
        f"starting {args.num_processes} processes x {DEVICES_PER_PROCESS} CPU devices, "
        f"coordinator 127.0.0.1:{port}",
        flush=True,
    )
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                f"--num-processes={args.num_processes}",
                f"--steps={args.steps}",
                f"--process-id={i}",
                f"--port={port}",
                f"--out-dir={out_dir}",
            ],
            env=env,
        )
        for i in range(args.num_processes)
    ]
    deadline = time.monotonic() + args.timeout
    try:
        while any(child.poll() is None for child in children):
            failed = [i for i, c in enumerate(children) if c.poll() not in (None, 0)]
            if failed:
                stop(children)
                codes = [children[i].returncode for i in failed]
                print(f"error: process(es) {failed} exited with {codes}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                stop(children)
                print(
                    f"error: the processes did not finish within {args.timeout:.0f} s; killed",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.1)
    except KeyboardInterrupt:
        stop(children)
        raise
    codes = [child.returncode for child in children]
    if any(codes):
        print(f"error: processes exited with {codes}", file=sys.stderr)
        return 1
    results = [
        json.loads((out_dir / f"process_{i}.json").read_text()) for i in range(args.num_processes)
    ]
    for api in ("functional", "facade"):
        digests = {r[api]["digest"] for r in results}
        if len(digests) != 1:
            print(
                f"error: the {api} parameters differ between processes: {digests}", file=sys.stderr
            )
            return 1
    first = results[0]
    print(
        f"ok: {args.num_processes} processes, {first['devices']} devices, {args.steps} steps; "
        f"functional loss {first['functional']['losses'][0]:.4f} -> "
        f"{first['functional']['losses'][-1]:.4f}, facade loss "
        f"{first['facade']['losses'][0]:.4f} -> {first['facade']['losses'][-1]:.4f}; "
        "parameters identical on every process",
        flush=True,
    )
    return 0


# --- a child ------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    )
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    try:
        result = train(args)
    finally:
        jax.distributed.shutdown()
    Path(args.out_dir, f"process_{args.process_id}.json").write_text(json.dumps(result))
    return 0


def train(args: argparse.Namespace) -> dict:
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import kopt

    pid = args.process_id

    def log(message: str) -> None:
        sys.stdout.write(f"[process {pid}] {message}\n")  # one write: lines do not interleave
        sys.stdout.flush()

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    log(
        f"{jax.local_device_count()} local of {jax.device_count()} global devices, "
        f"{jax.process_count()} processes"
    )

    # This process's rows of a synthetic regression batch: y = tanh(x A) b + noise, with the
    # same A, b everywhere (seed 0) and different rows in each process (seed 1 + pid).
    truth = np.random.default_rng(0)
    a_true = truth.normal(size=(FEATURES, 4)).astype(np.float32)
    b_true = truth.normal(size=(4,)).astype(np.float32)
    rows = np.random.default_rng(1 + pid)
    local_rows = ROWS_PER_DEVICE * jax.local_device_count()
    x_local = rows.normal(size=(local_rows, FEATURES)).astype(np.float32)
    y_local = np.tanh(x_local @ a_true) @ b_true + 0.01 * rows.normal(size=local_rows)
    x = jax.make_array_from_process_local_data(batch_sharding, x_local)
    y = jax.make_array_from_process_local_data(batch_sharding, y_local.astype(np.float32))

    init = np.random.default_rng(2)  # the same initial parameters on every process
    host_params = {
        "w1": (init.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (init.normal(size=(HIDDEN,)) / np.sqrt(HIDDEN)).astype(np.float32),
        "b2": np.zeros((), np.float32),
    }

    def replicate(value: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(value.shape, replicated, lambda index: value[index])

    def loss_fn(params, x, y):
        hidden = jnp.tanh(x @ params["w1"] + params["b1"])
        return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)

    # 1. Functional: shard_map, per-device gradients averaged by kopt.aggregate_gradients.
    tx = kopt.chain(kopt.aggregate_gradients("data", "mean"), kopt.adam(LEARNING_RATE))

    @jax.jit
    @partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P(), P()),
    )
    def functional_step(params, state, x, y):
        local = jax.lax.pcast(params, "data", to="varying")  # per-device gradients
        loss, grads = jax.value_and_grad(loss_fn)(local, x, y)
        updates, state = tx.update(grads, state, params)
        return kopt.apply_updates(params, updates), state, jax.lax.pmean(loss, "data")

    params = jax.tree.map(replicate, host_params)
    state = jax.jit(tx.init, out_shardings=replicated)(params)
    functional_losses = []
    for step in range(args.steps):
        params, state, loss = functional_step(params, state, x, y)
        functional_losses.append(float(loss.addressable_data(0)))
        if step % 5 == 0 or step == args.steps - 1:
            log(f"functional step {step:3d}  loss {functional_losses[-1]:.5f}")
    functional_params = params

    # 2. Facade: kopt.Variables holding replicated global arrays; jit over the global batch
    #    averages the gradients across all devices.
    variables = {name: kopt.Variable(replicate(v), name=name) for name, v in host_params.items()}
    names = list(host_params)
    opt = kopt.optimizers.Adam(learning_rate=LEARNING_RATE)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn), out_shardings=replicated)
    facade_losses = []
    for step in range(args.steps):
        loss, grads = value_and_grad({n: variables[n].value for n in names}, x, y)
        opt.apply_gradients([(grads[n], variables[n]) for n in names])
        facade_losses.append(float(loss.addressable_data(0)))
        if step % 5 == 0 or step == args.steps - 1:
            log(f"facade     step {step:3d}  loss {facade_losses[-1]:.5f}")
    facade_params = {n: variables[n].value for n in names}

    result = {"devices": jax.device_count()}
    for api, params, losses in (
        ("functional", functional_params, functional_losses),
        ("facade", facade_params, facade_losses),
    ):
        if not losses[-1] < 0.7 * losses[0]:
            raise SystemExit(f"[process {pid}] error: the {api} loss did not fall: {losses}")
        local = {n: np.asarray(params[n].addressable_data(0)) for n in names}
        digest = hashlib.sha256(b"".join(local[n].tobytes() for n in names)).hexdigest()
        # Every process's parameters, gathered to every process: all must be identical.
        gathered = multihost_utils.process_allgather(
            np.concatenate([local[n].ravel() for n in names]), tiled=False
        )
        if not all(np.array_equal(gathered[0], g) for g in gathered):
            raise SystemExit(f"[process {pid}] error: the {api} parameters differ across processes")
        result[api] = {"digest": digest, "losses": losses}
        log(f"{api}: loss {losses[0]:.5f} -> {losses[-1]:.5f}, params identical on all processes")
    for n in names:
        np.testing.assert_allclose(
            np.asarray(facade_params[n].addressable_data(0)),
            np.asarray(functional_params[n].addressable_data(0)),
            rtol=1e-4,
            atol=1e-5,
            err_msg=f"facade and functional runs disagree on {n}",
        )
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.process_id is None:
        return run_parent(args)
    return run_child(args)


if __name__ == "__main__":
    sys.exit(main())
