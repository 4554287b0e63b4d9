"""Count arguments take NumPy integers as well as ints (a count read from an array or a config),
keep them as Python ints, and refuse bools, floats and arrays naming the argument."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt import optimizers

COUNTS = {
    "flatten max_leaf_size": lambda n: kopt.flatten(kopt.adam(0.1), max_leaf_size=n),
    "pack max_leaf_size": lambda n: kopt.pack({"x": jnp.zeros(3)}, max_leaf_size=n),
    "accumulate_gradients every_k": lambda n: kopt.accumulate_gradients(kopt.sgd(1.0), n),
    "apply_if_finite max_consecutive_errors": lambda n: kopt.apply_if_finite(kopt.sgd(1.0), n),
    "ema overwrite_frequency": lambda n: kopt.ema(0.5, n),
    "LossScaleOptimizer dynamic_growth_steps": lambda n: optimizers.LossScaleOptimizer(
        optimizers.SGD(0.1), dynamic_growth_steps=n
    ),
    "AdamW gradient_accumulation_steps": lambda n: optimizers.AdamW(gradient_accumulation_steps=n),
    "AdamW ema_overwrite_frequency": lambda n: optimizers.AdamW(
        use_ema=True, ema_overwrite_frequency=n
    ),
}


@pytest.mark.parametrize("name", COUNTS)
@pytest.mark.parametrize("count", [np.int64(2), np.int32(2), np.uint8(2)])
def test_a_numpy_integer_is_taken_as_a_count(name, count):
    COUNTS[name](count)


@pytest.mark.parametrize("name", COUNTS)
@pytest.mark.parametrize("bad", [True, 2.0, np.float32(2.0), np.array([2]), "2"])
def test_a_bool_float_array_or_string_is_refused_naming_the_argument(name, bad):
    argument = name.split()[-1]
    with pytest.raises(ValueError, match=f"`?{argument}`?"):
        COUNTS[name](bad)


def test_numpy_counts_behave_as_their_ints():
    params = {"w": jnp.zeros(3)}
    tx = kopt.accumulate_gradients(kopt.sgd(1.0), every_k=np.int64(2))
    state = tx.init(params)
    updates = []
    for g in (1.0, 3.0):
        u, state = tx.update({"w": jnp.full(3, g)}, state, params)
        updates.append(float(u["w"][0]))
    assert updates == [0.0, -2.0]  # the mean of the two, applied on the second call

    opt = optimizers.AdamW(
        gradient_accumulation_steps=np.int64(2), use_ema=True, ema_overwrite_frequency=np.int32(3)
    )
    config = opt.get_config()
    assert type(config["gradient_accumulation_steps"]) is int
    assert type(config["ema_overwrite_frequency"]) is int
    json.dumps(config)
    lso = optimizers.LossScaleOptimizer(optimizers.SGD(0.1), dynamic_growth_steps=np.int64(3))
    assert type(lso.get_config()["dynamic_growth_steps"]) is int
    json.dumps(lso.get_config())
