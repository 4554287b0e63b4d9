"""Run by test_data_parallel.py in two processes of two CPU devices each (``python
tests/multiprocess_worker.py PROCESS_ID PORT``): the facade's ``PerReplica`` gradients across
processes, and an EMA started from a param spanning both. Exits 0 when every check holds."""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
PID, PORT = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(
    f"127.0.0.1:{PORT}", num_processes=2, process_id=PID, initialization_timeout=60
)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kopt  # noqa: E402
from kopt import optimizers  # noqa: E402


def main():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rng = np.random.default_rng(0)  # the same numbers in every process
    w0 = rng.normal(size=(8, 3)).astype(np.float32)
    replicas = rng.normal(size=(jax.device_count(), 8, 3)).astype(np.float32)
    sharding = NamedSharding(mesh, P("data", None))
    var = kopt.Variable(jax.make_array_from_callback(w0.shape, sharding, lambda i: w0[i]), name="w")
    opt = optimizers.SGD(0.1, momentum=0.9)

    def value():
        return np.asarray(multihost_utils.process_allgather(var.value, tiled=True))

    # pmap's values in one process: this process's two replicas only.
    mine = replicas[2 * PID : 2 * PID + 2]
    local = jax.pmap(lambda g: g)(mine)
    try:
        opt.apply_gradients([(optimizers.PerReplica(local), var)])
    except ValueError as e:
        assert "w:0" in str(e) and "only this process's replicas" in str(e), e
    else:
        raise AssertionError("a process-local PerReplica was not refused")
    np.testing.assert_array_equal(value(), w0)
    assert int(opt.iterations.numpy()) == 0 and opt.weights == [opt.iterations], opt.weights

    # The way out the message names: one array of every process's replicas.
    both = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    opt.apply_gradients([(optimizers.PerReplica(both), var)])
    np.testing.assert_allclose(value(), w0 - 0.1 * replicas.sum(0), rtol=1e-5, atol=1e-6)

    # An EMA starts from a copy of a param that spans both processes (a transfer would refuse it).
    state = kopt.chain(kopt.sgd(0.1), kopt.ema(0.5)).init({"w": var.value})
    average = kopt.get_slot(state, "average")["w"]
    assert average.sharding == var.value.sharding, average.sharding
    gathered = np.asarray(multihost_utils.process_allgather(average, tiled=True))
    np.testing.assert_array_equal(gathered, value())
    print(f"process {PID}: ok", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        jax.distributed.shutdown()
