"""Generate golden-value fixtures for kopt from tf.keras (legacy) and Keras 3.

The fixtures let kopt's test suite compare its numbers with the reference
implementations without needing TensorFlow or Keras at test time.

How to run (from the repository root)::

    python tests/golden/generate.py

Any Python environment with the packages below works.  The script writes

* ``tests/golden/fixtures/optimizers.json`` -- optimizer trajectories,
* ``tests/golden/fixtures/schedules.json``  -- learning-rate schedule values,
* ``tests/golden/fixtures/attribute_changes.json`` -- attributes assigned between steps, and
* ``tests/golden/fixtures/combos.json`` -- many options at once (drawn by ``combos.py``).

Versions that produced the committed fixtures (also recorded inside each JSON
file under ``"versions"``):

* tensorflow-cpu 2.21.0
* tf-keras 2.21.0      (``tf_keras.optimizers.legacy.*`` = OptimizerV2 classes,
                         ``tf_keras.optimizers.schedules.*``)
* keras 3.15.1         (``keras.optimizers.*``), run on the JAX backend
* jax / jaxlib 0.10.2, numpy 2.4.6, Python 3.11

The Keras 3 backend defaults to ``jax`` (kopt is a JAX library); set
``KERAS_BACKEND=tensorflow`` before running to use the TF backend instead
(the maths is backend independent; the backend used is recorded in the
fixture metadata).

Determinism
-----------
Every case draws its data from ``numpy.random.default_rng(seed)`` where
``seed = BASE_SEED + zlib.crc32(case_id)``, so adding or removing a case never
changes the data of another case.  Initial values are ``N(0, 1)`` and dense
gradients ``N(0, 1) * 0.5``; everything is float32.  Floats are written as
``float(np.float32(x))``, i.e. the exact float32 value as a JSON number.

Slot-name mapping for Keras 3
-----------------------------
Keras 3 optimizers have no ``get_slot``; their state is the flat list
``optimizer.variables``.  We record that list verbatim (path, value) under
``expected["keras3_variables"]`` and *also* map the per-parameter state into
``expected["slots"]`` with kopt's slot names:

=========  ======================  ==========
optimizer  Keras 3 state            kopt slot
=========  ======================  ==========
AdamW      ``momentum``             ``m``
AdamW      ``velocity``             ``v``
AdamW      ``velocity_hat``         ``vhat``   (amsgrad only)
Lion       ``momentum``             ``m``
Lamb       ``momentum``             ``m``
Lamb       ``velocity``             ``v``
Adafactor  row accumulator          ``r``      (shape ``shape[:-1]``; ndim >= 2 only)
Adafactor  column accumulator       ``c``      (shape ``shape[:-2] + shape[-1:]``; ndim >= 2 only)
Adafactor  ``velocity``             ``v``
=========  ======================  ==========

The mapping reads Keras' own per-parameter lists (``_momentums``,
``_velocities``, ``_velocity_hats``, ``_r``, ``_c``, ``_v``), indexed by
parameter position, because Adafactor's ``r`` and ``c`` share one name.
Adafactor's scalar int placeholders for ``r``/``c`` of parameters with
ndim < 2 are *not* mapped (they stay visible in ``keras3_variables``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Plain Eigen kernels, so the numbers do not depend on the CPU's oneDNN paths.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import combos  # noqa: E402
from common import BASE_SEED, case_rng, json_safe, legacy_expected, to_json_array  # noqa: E402

STEPS = 12
FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures"
SCHEDULE_STEPS = [0, 1, 2, 3, 5, 7, 10, 11, 15, 20, 30, 50, 100, 200]

# Shapes of the variables of a case.
DENSE_SHAPES = [("w0", (3,)), ("w1", (2, 3))]
ADAFACTOR_SHAPES = [("w0", (3,)), ("w1", (2, 3)), ("w2", (2, 3, 4))]
SPARSE_SHAPES = [("w0", (3,)), ("w1", (2, 3)), ("emb", (6, 3))]
SPARSE_VAR_INDEX = 2
# Row indices of the IndexedSlices gradient, cycled over the steps.  Every
# pattern has a duplicate index; row 5 is never touched and every step leaves
# some of rows 0-4 untouched too.
SPARSE_INDEX_PATTERNS = [
    [0, 2, 2],
    [1, 3, 1],
    [4, 0, 4],
    [2, 1, 2],
    [3, 3, 0],
    [0, 4, 0],
]

LEGACY = tf_keras.optimizers.legacy
SCHED = tf_keras.optimizers.schedules


def make_data(case_id, shapes, sparse_index=None):
    """Initial values, dense gradients and (optionally) sparse gradients."""
    rng = case_rng(case_id)
    initial = [rng.standard_normal(shape).astype(np.float32) for _, shape in shapes]
    grads = []
    sparse_steps = []
    for step in range(STEPS):
        row = []
        for i, (_, shape) in enumerate(shapes):
            if i == sparse_index:
                indices = SPARSE_INDEX_PATTERNS[step % len(SPARSE_INDEX_PATTERNS)]
                values = (rng.standard_normal((len(indices),) + shape[1:]) * 0.5).astype(np.float32)
                sparse_steps.append((np.asarray(indices, np.int64), values))
                row.append(None)
            else:
                row.append((rng.standard_normal(shape) * 0.5).astype(np.float32))
        grads.append(row)
    return initial, grads, sparse_steps


# --------------------------------------------------------------------------
# Case definitions
# --------------------------------------------------------------------------


def legacy_cases():
    """(id, class_name, kwargs, schedule-or-None, sparse?) for tf_keras legacy."""
    cases = []

    def add(cid, cls, kwargs, schedule=None, sparse=False):
        cases.append((cid, cls, kwargs, schedule, sparse))

    # SGD
    add("legacy_sgd", "SGD", {"learning_rate": 0.1})
    add("legacy_sgd_momentum", "SGD", {"learning_rate": 0.1, "momentum": 0.9})
    add("legacy_sgd_nesterov", "SGD", {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True})
    add("legacy_sgd_momentum_decay", "SGD", {"learning_rate": 0.1, "momentum": 0.9, "decay": 0.1})
    # Adam
    add("legacy_adam", "Adam", {"learning_rate": 0.1})
    add("legacy_adam_amsgrad", "Adam", {"learning_rate": 0.1, "amsgrad": True})
    add("legacy_adam_decay", "Adam", {"learning_rate": 0.1, "decay": 0.1})
    # Adagrad
    add("legacy_adagrad", "Adagrad", {"learning_rate": 0.1})
    add(
        "legacy_adagrad_init_acc",
        "Adagrad",
        {"learning_rate": 0.1, "initial_accumulator_value": 0.5},
    )
    # Adadelta
    add("legacy_adadelta", "Adadelta", {"learning_rate": 1.0})
    add("legacy_adadelta_rho", "Adadelta", {"learning_rate": 1.0, "rho": 0.9})
    # Adamax
    add("legacy_adamax", "Adamax", {"learning_rate": 0.1})
    # Nadam (note: Nadam's `schedule_decay` overwrites `decay`, default 0.004)
    add("legacy_nadam", "Nadam", {"learning_rate": 0.1})
    add("legacy_nadam_schedule_decay", "Nadam", {"learning_rate": 0.1, "schedule_decay": 0.01})
    # RMSprop
    add("legacy_rmsprop", "RMSprop", {"learning_rate": 0.1})
    add("legacy_rmsprop_centered", "RMSprop", {"learning_rate": 0.1, "centered": True})
    add("legacy_rmsprop_momentum", "RMSprop", {"learning_rate": 0.1, "momentum": 0.9})
    add(
        "legacy_rmsprop_momentum_centered",
        "RMSprop",
        {"learning_rate": 0.1, "momentum": 0.9, "centered": True},
    )
    add("legacy_rmsprop_decay", "RMSprop", {"learning_rate": 0.1, "decay": 0.1})
    # Ftrl
    add("legacy_ftrl", "Ftrl", {"learning_rate": 0.1})
    add("legacy_ftrl_l1", "Ftrl", {"learning_rate": 0.1, "l1_regularization_strength": 0.01})
    add("legacy_ftrl_l2", "Ftrl", {"learning_rate": 0.1, "l2_regularization_strength": 0.02})
    add("legacy_ftrl_beta", "Ftrl", {"learning_rate": 0.1, "beta": 0.1})
    add(
        "legacy_ftrl_l2_shrinkage",
        "Ftrl",
        {"learning_rate": 0.1, "l2_shrinkage_regularization_strength": 0.05},
    )
    add("legacy_ftrl_lr_power", "Ftrl", {"learning_rate": 0.1, "learning_rate_power": -0.7})
    add(
        "legacy_ftrl_all_regularizers",
        "Ftrl",
        {
            "learning_rate": 0.1,
            "l1_regularization_strength": 0.01,
            "l2_regularization_strength": 0.02,
            "beta": 0.1,
            "l2_shrinkage_regularization_strength": 0.05,
        },
    )

    # Learning-rate schedules (schedule called with `iterations` before the
    # increment, i.e. step t (0-based) uses lr(t)).
    sched = [
        (
            "exponential",
            "SGD",
            {"momentum": 0.9},
            (
                "ExponentialDecay",
                {"initial_learning_rate": 0.1, "decay_steps": 3, "decay_rate": 0.5},
            ),
        ),
        (
            "exponential_staircase",
            "Adam",
            {},
            (
                "ExponentialDecay",
                {
                    "initial_learning_rate": 0.1,
                    "decay_steps": 3,
                    "decay_rate": 0.5,
                    "staircase": True,
                },
            ),
        ),
        (
            "piecewise",
            "SGD",
            {"momentum": 0.9},
            ("PiecewiseConstantDecay", {"boundaries": [2, 5, 8], "values": [0.2, 0.1, 0.05, 0.01]}),
        ),
        (
            "polynomial",
            "Adam",
            {},
            (
                "PolynomialDecay",
                {
                    "initial_learning_rate": 0.1,
                    "decay_steps": 8,
                    "end_learning_rate": 0.01,
                    "power": 2.0,
                },
            ),
        ),
        (
            "polynomial_cycle",
            "SGD",
            {"momentum": 0.9},
            (
                "PolynomialDecay",
                {
                    "initial_learning_rate": 0.1,
                    "decay_steps": 4,
                    "end_learning_rate": 0.01,
                    "power": 1.0,
                    "cycle": True,
                },
            ),
        ),
        (
            "inverse_time",
            "Adam",
            {},
            (
                "InverseTimeDecay",
                {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5},
            ),
        ),
        (
            "cosine_warmup",
            "SGD",
            {"momentum": 0.9},
            (
                "CosineDecay",
                {
                    "initial_learning_rate": 0.0,
                    "decay_steps": 8,
                    "alpha": 0.1,
                    "warmup_target": 0.1,
                    "warmup_steps": 3,
                },
            ),
        ),
        (
            "cosine",
            "Adam",
            {},
            ("CosineDecay", {"initial_learning_rate": 0.1, "decay_steps": 10, "alpha": 0.05}),
        ),
        (
            "cosine_restarts",
            "Adam",
            {},
            (
                "CosineDecayRestarts",
                {
                    "initial_learning_rate": 0.1,
                    "first_decay_steps": 3,
                    "t_mul": 2.0,
                    "m_mul": 0.7,
                    "alpha": 0.1,
                },
            ),
        ),
    ]
    for name, cls, kwargs, schedule in sched:
        add(f"legacy_{cls.lower()}_schedule_{name}", cls, kwargs, schedule)
    add(
        "legacy_adam_schedule_exponential_decay",
        "Adam",
        {"decay": 0.05},
        ("ExponentialDecay", {"initial_learning_rate": 0.1, "decay_steps": 3, "decay_rate": 0.5}),
    )

    # Gradient clipping.
    for cls in ("Adam", "SGD"):
        for clip, value in (("clipnorm", 0.5), ("clipvalue", 0.3), ("global_clipnorm", 0.7)):
            add(f"legacy_{cls.lower()}_{clip}", cls, {"learning_rate": 0.1, clip: value})

    # IndexedSlices (sparse) gradients.
    sparse = [
        ("sgd", "SGD", {"learning_rate": 0.1}),
        ("sgd_momentum", "SGD", {"learning_rate": 0.1, "momentum": 0.9}),
        ("adam", "Adam", {"learning_rate": 0.1}),
        ("adagrad", "Adagrad", {"learning_rate": 0.1}),
        ("adadelta", "Adadelta", {"learning_rate": 1.0}),
        ("adamax", "Adamax", {"learning_rate": 0.1}),
        ("nadam", "Nadam", {"learning_rate": 0.1}),
        ("rmsprop", "RMSprop", {"learning_rate": 0.1}),
        ("rmsprop_centered", "RMSprop", {"learning_rate": 0.1, "centered": True}),
        ("rmsprop_momentum", "RMSprop", {"learning_rate": 0.1, "momentum": 0.9}),
        ("ftrl", "Ftrl", {"learning_rate": 0.1}),
    ]
    for name, cls, kwargs in sparse:
        add(f"legacy_{name}_sparse", cls, kwargs, sparse=True)
    return cases


def keras3_cases():
    """(id, class_name, kwargs) for Keras 3 optimizers."""
    return [
        ("keras3_adamw", "AdamW", {"learning_rate": 0.1}),
        (
            "keras3_adamw_wd_amsgrad",
            "AdamW",
            {"learning_rate": 0.1, "weight_decay": 0.1, "amsgrad": True},
        ),
        ("keras3_lion", "Lion", {"learning_rate": 0.1}),
        ("keras3_lion_beta1", "Lion", {"learning_rate": 0.1, "beta_1": 0.95}),
        ("keras3_lamb", "Lamb", {"learning_rate": 0.1}),
        # lr=0.5 > 1/sqrt(t) for t >= 5, so the min(lr, 1/sqrt(t)) clamp is exercised.
        ("keras3_adafactor", "Adafactor", {"learning_rate": 0.5}),
        (
            "keras3_adafactor_no_relative_step",
            "Adafactor",
            {"learning_rate": 0.5, "relative_step": False},
        ),
    ]


# --------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------


def describe_inputs(shapes, initial, grads, sparse_steps, sparse_index):
    variables = [
        {"name": name, "shape": list(shape), "initial": to_json_array(init)}
        for (name, shape), init in zip(shapes, initial, strict=True)
    ]
    gradients = [[None if g is None else to_json_array(g) for g in row] for row in grads]
    sparse = None
    if sparse_index is not None:
        sparse = {
            "variable": sparse_index,
            "dense_shape": list(shapes[sparse_index][1]),
            "steps": [
                {"indices": idx.tolist(), "values": to_json_array(vals)}
                for idx, vals in sparse_steps
            ],
        }
    return variables, gradients, sparse


def run_legacy(case_id, cls_name, kwargs, schedule, sparse):
    shapes = SPARSE_SHAPES if sparse else DENSE_SHAPES
    sparse_index = SPARSE_VAR_INDEX if sparse else None
    initial, grads, sparse_steps = make_data(case_id, shapes, sparse_index)

    ctor_kwargs = dict(kwargs)
    schedule_json = None
    if schedule is not None:
        sched_cls, sched_kwargs = schedule
        sched_obj = getattr(SCHED, sched_cls)(**sched_kwargs)
        ctor_kwargs["learning_rate"] = sched_obj
        schedule_json = {"class_name": sched_cls, "config": json_safe(sched_obj.get_config())}
    opt = getattr(LEGACY, cls_name)(**ctor_kwargs)

    tf_vars = [
        tf.Variable(init, dtype=tf.float32, name=name)
        for (name, _), init in zip(shapes, initial, strict=True)
    ]
    after_step_1 = None
    for step in range(STEPS):
        tf_grads = []
        for i, g in enumerate(grads[step]):
            if i == sparse_index:
                idx, vals = sparse_steps[step]
                tf_grads.append(
                    tf.IndexedSlices(
                        tf.constant(vals, tf.float32),
                        tf.constant(idx, tf.int64),
                        tf.constant(shapes[i][1], tf.int64),
                    )
                )
            else:
                tf_grads.append(tf.constant(g, tf.float32))
        opt.apply_gradients(zip(tf_grads, tf_vars, strict=True))
        if step == 0:
            after_step_1 = {"variables": [to_json_array(v.numpy()) for v in tf_vars]}

    expected = {**legacy_expected(opt, tf_vars), "after_step_1": after_step_1}
    if cls_name == "Nadam":
        expected["momentum_cache"] = to_json_array(opt._m_cache.numpy())

    variables, gradients, sparse_json = describe_inputs(
        shapes, initial, grads, sparse_steps, sparse_index
    )
    return {
        "id": case_id,
        "source": "tf_keras_legacy",
        "class_name": cls_name,
        "kwargs": json_safe(kwargs),
        "learning_rate_schedule": schedule_json,
        "steps": STEPS,
        "variables": variables,
        "gradients": gradients,
        "sparse": sparse_json,
        "expected": expected,
    }


# Keras-3 per-parameter state lists -> kopt slot names.
KERAS3_SLOT_MAP = {
    "AdamW": [("_momentums", "m"), ("_velocities", "v"), ("_velocity_hats", "vhat")],
    "Lion": [("_momentums", "m")],
    "Lamb": [("_momentums", "m"), ("_velocities", "v")],
    "Adafactor": [("_r", "r"), ("_c", "c"), ("_v", "v")],
}


def run_keras3(case_id, cls_name, kwargs):
    shapes = ADAFACTOR_SHAPES if cls_name == "Adafactor" else DENSE_SHAPES
    initial, grads, _ = make_data(case_id, shapes)
    # Reset Keras' global name counters so the optimizer's auto name (and so
    # its variable paths and config "name") do not depend on case order.
    keras.backend.clear_session()
    opt = getattr(keras.optimizers, cls_name)(**kwargs)
    k_vars = [
        keras.Variable(init, dtype="float32", name=name)
        for (name, _), init in zip(shapes, initial, strict=True)
    ]
    after_step_1 = None
    for step in range(STEPS):
        opt.apply([keras.ops.convert_to_tensor(g) for g in grads[step]], k_vars)
        if step == 0:
            after_step_1 = {"variables": [to_json_array(np.asarray(v.value)) for v in k_vars]}

    slots = []
    for i, var in enumerate(k_vars):
        entry = {}
        for attr, kopt_name in KERAS3_SLOT_MAP[cls_name]:
            state = getattr(opt, attr, None)
            if state is None:  # e.g. _velocity_hats without amsgrad
                continue
            s = state[i]
            if s is None:
                continue
            if cls_name == "Adafactor" and kopt_name in ("r", "c") and len(var.shape) < 2:
                continue  # scalar dummy placeholder, not real state
            entry[kopt_name] = to_json_array(np.asarray(s.value))
        slots.append(entry)

    expected = {
        "variables": [to_json_array(np.asarray(v.value)) for v in k_vars],
        "slots": slots,
        "iterations": int(np.asarray(opt.iterations.value)),
        "keras3_variables": [[v.path, to_json_array(np.asarray(v.value))] for v in opt.variables],
        "config": json_safe(opt.get_config()),
        "after_step_1": after_step_1,
    }
    variables, gradients, _ = describe_inputs(shapes, initial, grads, [], None)
    return {
        "id": case_id,
        "source": "keras3",
        "class_name": cls_name,
        "kwargs": json_safe(kwargs),
        "learning_rate_schedule": None,
        "steps": STEPS,
        "variables": variables,
        "gradients": gradients,
        "sparse": None,
        "expected": expected,
    }


# --------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------


def schedule_cases():
    """(id, source, class_name, kwargs)."""
    legacy = [
        (
            "ExponentialDecay",
            "exponential",
            {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5},
        ),
        (
            "ExponentialDecay",
            "exponential_staircase",
            {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5, "staircase": True},
        ),
        (
            "ExponentialDecay",
            "exponential_growth_staircase",
            {"initial_learning_rate": 0.01, "decay_steps": 7, "decay_rate": 1.1, "staircase": True},
        ),
        (
            "PiecewiseConstantDecay",
            "piecewise",
            {"boundaries": [5, 10, 20], "values": [1.0, 0.5, 0.1, 0.01]},
        ),
        ("PiecewiseConstantDecay", "piecewise_single", {"boundaries": [0], "values": [0.3, 0.03]}),
        (
            "PolynomialDecay",
            "polynomial_linear",
            {"initial_learning_rate": 0.1, "decay_steps": 20, "end_learning_rate": 0.01},
        ),
        (
            "PolynomialDecay",
            "polynomial_power_cycle",
            {
                "initial_learning_rate": 0.1,
                "decay_steps": 20,
                "end_learning_rate": 0.01,
                "power": 2.0,
                "cycle": True,
            },
        ),
        (
            "PolynomialDecay",
            "polynomial_sqrt",
            {
                "initial_learning_rate": 1.0,
                "decay_steps": 50,
                "end_learning_rate": 0.0,
                "power": 0.5,
            },
        ),
        (
            "InverseTimeDecay",
            "inverse_time",
            {"initial_learning_rate": 0.1, "decay_steps": 5, "decay_rate": 0.5},
        ),
        (
            "InverseTimeDecay",
            "inverse_time_staircase",
            {"initial_learning_rate": 0.1, "decay_steps": 5, "decay_rate": 0.5, "staircase": True},
        ),
        ("CosineDecay", "cosine", {"initial_learning_rate": 0.1, "decay_steps": 50}),
        (
            "CosineDecay",
            "cosine_alpha",
            {"initial_learning_rate": 0.1, "decay_steps": 50, "alpha": 0.1},
        ),
        (
            "CosineDecay",
            "cosine_warmup",
            {
                "initial_learning_rate": 0.0,
                "decay_steps": 50,
                "alpha": 0.05,
                "warmup_target": 0.1,
                "warmup_steps": 10,
            },
        ),
        (
            "CosineDecayRestarts",
            "cosine_restarts",
            {"initial_learning_rate": 0.1, "first_decay_steps": 10},
        ),
        (
            "CosineDecayRestarts",
            "cosine_restarts_tmul1_mmul",
            {"initial_learning_rate": 0.1, "first_decay_steps": 10, "t_mul": 1.0, "m_mul": 0.5},
        ),
        (
            "CosineDecayRestarts",
            "cosine_restarts_tmul_mmul_alpha",
            {
                "initial_learning_rate": 0.1,
                "first_decay_steps": 7,
                "t_mul": 1.5,
                "m_mul": 0.8,
                "alpha": 0.1,
            },
        ),
    ]
    out = [(f"legacy_{name}", "tf_keras", cls, kw) for cls, name, kw in legacy]
    out += [
        (
            "keras3_cosine_warmup",
            "keras3",
            "CosineDecay",
            {
                "initial_learning_rate": 0.0,
                "decay_steps": 50,
                "alpha": 0.05,
                "warmup_target": 0.1,
                "warmup_steps": 10,
            },
        ),
        (
            "keras3_cosine_warmup_from_nonzero",
            "keras3",
            "CosineDecay",
            {
                "initial_learning_rate": 0.01,
                "decay_steps": 40,
                "warmup_target": 0.2,
                "warmup_steps": 5,
            },
        ),
    ]
    return out


def run_schedule(case_id, source, cls_name, kwargs):
    module = SCHED if source == "tf_keras" else keras.optimizers.schedules
    sched = getattr(module, cls_name)(**kwargs)
    values = [float(np.float32(np.asarray(sched(step)))) for step in SCHEDULE_STEPS]
    return {
        "id": case_id,
        "source": source,
        "class_name": cls_name,
        "kwargs": json_safe(kwargs),
        "config": json_safe(sched.get_config()),
        "steps": SCHEDULE_STEPS,
        "values": values,
    }


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Attributes assigned between steps (tf.keras legacy, eager)
# --------------------------------------------------------------------------


def change_cases():
    """(id, class_name, kwargs, {step: {attribute: value}}): before ``apply_gradients`` of
    ``step`` (from 0), the attributes are assigned as a user would, ``opt.amsgrad = True``.
    ``beta_2 = 0.5`` lets ``v`` fall between steps, so AMSGrad's ``vhat`` differs from it."""
    return [
        (
            "change_adam_amsgrad_on",
            "Adam",
            {"learning_rate": 0.1, "beta_2": 0.5},
            {4: {"amsgrad": True}},
        ),
        (
            "change_adam_amsgrad_off",
            "Adam",
            {"learning_rate": 0.1, "beta_2": 0.5, "amsgrad": True},
            {4: {"amsgrad": False}},
        ),
        (
            "change_adam_numbers",
            "Adam",
            {"learning_rate": 0.1},
            {3: {"learning_rate": 0.05, "beta_1": 0.5}, 6: {"beta_2": 0.9, "epsilon": 0.1}},
        ),
        (
            "change_sgd_nesterov",
            "SGD",
            {"learning_rate": 0.1, "momentum": 0.9},
            {4: {"nesterov": True}, 8: {"nesterov": False}},
        ),
        ("change_sgd_momentum_from_zero", "SGD", {"learning_rate": 0.1}, {4: {"momentum": 0.9}}),
        (
            "change_sgd_momentum_numbers",
            "SGD",
            {"learning_rate": 0.1, "momentum": 0.5},
            {4: {"momentum": 0.9, "learning_rate": 0.02}, 8: {"momentum": 0.0}},
        ),
        (
            "change_rmsprop_centered_on",
            "RMSprop",
            {"learning_rate": 0.1, "momentum": 0.5},
            {4: {"centered": True}},
        ),
        (
            "change_rmsprop_centered_off",
            "RMSprop",
            {"learning_rate": 0.1, "centered": True},
            {4: {"centered": False}},
        ),
        (
            "change_rmsprop_numbers",
            "RMSprop",
            {"learning_rate": 0.1, "momentum": 0.5},
            {4: {"rho": 0.5, "epsilon": 0.01}, 8: {"momentum": 0.0}},
        ),
        (
            "change_adagrad_epsilon",
            "Adagrad",
            {"learning_rate": 0.1},
            {4: {"epsilon": 0.5, "learning_rate": 0.3}},
        ),
        (
            "change_adadelta_numbers",
            "Adadelta",
            {"learning_rate": 1.0},
            {4: {"rho": 0.5, "epsilon": 1e-3}},
        ),
        (
            "change_adamax_numbers",
            "Adamax",
            {"learning_rate": 0.1},
            {4: {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 0.1}},
        ),
        (
            "change_nadam_numbers",
            "Nadam",
            {"learning_rate": 0.1},
            {4: {"beta_1": 0.5, "epsilon": 0.5}},
        ),
        (
            "change_ftrl_numbers",
            "Ftrl",
            {"learning_rate": 0.1},
            {
                4: {
                    "l1_regularization_strength": 0.1,
                    "l2_regularization_strength": 0.1,
                    "learning_rate_power": -0.7,
                    "beta": 0.2,
                }
            },
        ),
    ]


def run_change_case(case_id, cls_name, kwargs, changes):
    initial, grads, _ = make_data(case_id, DENSE_SHAPES)
    opt = getattr(LEGACY, cls_name)(**kwargs)
    tf_vars = [
        tf.Variable(init, dtype=tf.float32, name=name)
        for (name, _), init in zip(DENSE_SHAPES, initial, strict=True)
    ]
    trajectory = []
    for step in range(STEPS):
        for attr, value in changes.get(step, {}).items():
            setattr(opt, attr, value)
        tf_grads = [tf.constant(g, tf.float32) for g in grads[step]]
        opt.apply_gradients(zip(tf_grads, tf_vars, strict=True))
        trajectory.append([to_json_array(v.numpy()) for v in tf_vars])
    slot_names = list(opt.get_slot_names())
    variables, gradients, _ = describe_inputs(DENSE_SHAPES, initial, grads, [], None)
    return {
        "id": case_id,
        "source": "tf_keras_legacy",
        "class_name": cls_name,
        "kwargs": json_safe(kwargs),
        "changes": {str(step): json_safe(attrs) for step, attrs in changes.items()},
        "steps": STEPS,
        "variables": variables,
        "gradients": gradients,
        "sparse": None,
        "learning_rate_schedule": None,
        "expected": {
            "trajectory": trajectory,
            "slots": [
                {name: to_json_array(opt.get_slot(v, name).numpy()) for name in slot_names}
                for v in tf_vars
            ],
            "slot_names": slot_names,
            "weight_names": [w.name for w in opt.weights],
            "weights": [to_json_array(w) for w in opt.get_weights()],
            "config": json_safe(opt.get_config()),
        },
    }


def versions():
    import jax

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "jax": jax.__version__,
    }


def write_json(path: Path, payload: dict) -> None:
    """One case per line: compact but still diffable."""
    header = {k: v for k, v in payload.items() if k != "cases"}
    lines = ["{"]
    for k, v in header.items():
        lines.append(f"{json.dumps(k)}: {json.dumps(v, sort_keys=False)},")
    lines.append('"cases": [')
    cases = payload["cases"]
    for i, case in enumerate(cases):
        sep = "," if i + 1 < len(cases) else ""
        lines.append(json.dumps(case, separators=(",", ":"), allow_nan=False) + sep)
    lines.append("]")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    json.loads(text)  # sanity check: valid JSON
    path.write_text(text)


def main() -> int:
    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": 1,
        "generator": "tests/golden/generate.py",
        "versions": versions(),
        "dtype": "float32",
    }

    opt_cases = []
    for cid, cls, kwargs, schedule, sparse in legacy_cases():
        opt_cases.append(run_legacy(cid, cls, kwargs, schedule, sparse))
    for cid, cls, kwargs in keras3_cases():
        opt_cases.append(run_keras3(cid, cls, kwargs))
    ids = [c["id"] for c in opt_cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    for c in opt_cases:
        for v in c["expected"]["variables"]:
            assert np.all(np.isfinite(v)), c["id"]

    sched_cases = [run_schedule(*c) for c in schedule_cases()]
    change = [run_change_case(*c) for c in change_cases()]
    combo_cases = [
        *(combos.run_legacy_combo(c) for c in combos.legacy_combos(40)),
        *(combos.run_legacy_combo(c) for c in combos.lso_combos(12)),
        *(combos.run_keras3_combo(c) for c in combos.keras3_combos(24)),
    ]

    opt_meta = dict(meta, steps=STEPS, base_seed=BASE_SEED)
    write_json(FIXTURE_DIR / "optimizers.json", dict(opt_meta, cases=opt_cases))
    write_json(FIXTURE_DIR / "schedules.json", dict(meta, cases=sched_cases))
    write_json(FIXTURE_DIR / "attribute_changes.json", dict(opt_meta, cases=change))
    write_json(FIXTURE_DIR / "combos.json", dict(meta, base_seed=BASE_SEED, cases=combo_cases))

    for name in ("optimizers.json", "schedules.json", "attribute_changes.json", "combos.json"):
        p = FIXTURE_DIR / name
        print(f"wrote {p} ({p.stat().st_size / 1024:.1f} KiB)")
    print(
        f"{len(opt_cases)} optimizer cases, {len(sched_cases)} schedule cases, "
        f"{len(change)} attribute-change cases, {len(combo_cases)} combination cases"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
