"""Helpers shared by ``generate.py`` and ``combos.py``: JSON conversion, per-case random data
and what a tf.keras legacy run records."""

from __future__ import annotations

import zlib

import numpy as np
import tensorflow as tf

BASE_SEED = 20240601


# --------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------


def to_json_array(x):
    """Nested lists of exact float32 values (or Python ints for int arrays)."""
    arr = np.asarray(x)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64).tolist()
    if arr.dtype.kind == "b":
        return arr.tolist()
    arr = arr.astype(np.float32)
    if arr.ndim == 0:
        return float(arr)
    return [to_json_array(a) for a in arr]


def json_safe(obj):
    """Make a (Keras config) object JSON-serialisable; numbers stay numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)  # exact for float32/float64
    if isinstance(obj, float):
        return obj
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (tf.Tensor, tf.Variable)):
        return json_safe(obj.numpy())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.item()) if obj.ndim == 0 else to_json_array(obj)
    raise TypeError(f"cannot make {type(obj).__name__} JSON-safe: {obj!r}")


# --------------------------------------------------------------------------
# Case data
# --------------------------------------------------------------------------


def case_rng(case_id: str) -> np.random.Generator:
    """The random numbers of one case, from its id."""
    return np.random.default_rng(BASE_SEED + zlib.crc32(case_id.encode()))


def legacy_expected(opt, tf_vars) -> dict:
    """What a tf.keras legacy run ends with: the variables, each variable's slots (those it
    has), the step count, the slot and weight names, the weights and the config."""
    slot_names = list(opt.get_slot_names())
    return {
        "variables": [to_json_array(v.numpy()) for v in tf_vars],
        "slots": [
            {
                name: to_json_array(opt.get_slot(v, name).numpy())
                for name in slot_names
                if _has_slot(opt, v, name)
            }
            for v in tf_vars
        ],
        "iterations": int(opt.iterations.numpy()),
        "slot_names": slot_names,
        "weight_names": [w.name for w in opt.weights],
        "weights": [to_json_array(w) for w in opt.get_weights()],
        "config": json_safe(opt.get_config()),
    }


def _has_slot(opt, var, name) -> bool:
    try:
        opt.get_slot(var, name)
    except KeyError:
        return False
    return True
