"""kopt: JAX optimizers with Keras-exact maths.

The functional core (this namespace) follows the optax protocol: pure ``init``/``update``
transformations over pytrees, with hyperparameters and slots in the state. The Keras facade lives
in :mod:`kopt.optimizers` (stateful optimizers over :class:`kopt.Variable`).
"""

from kopt import schedules
from kopt._packed import Packed, pack
from kopt._version import __version__
from kopt.alias import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    ftrl,
    lamb,
    lion,
    nadam,
    rmsprop,
    sgd,
)
from kopt.base import (
    EmptyState,
    GradientTransformation,
    OptimizerState,
    apply_updates,
    chain,
    get_hyperparam,
    get_slot,
    identity,
    set_hyperparam,
    slot_names,
)
from kopt.sparse import IndexedSlices
from kopt.transforms import (
    AccumulateState,
    ApplyIfFiniteState,
    FlattenedState,
    MaskedState,
    MultiTransformState,
    accumulate_gradients,
    add_decayed_weights,
    aggregate_gradients,
    all_finite,
    apply_if_finite,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    ema,
    flatten,
    global_norm,
    masked,
    multi_transform,
    scale_by_adadelta,
    scale_by_adafactor,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_ftrl,
    scale_by_lamb,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_nadam,
    scale_by_rmsprop,
    scale_by_sgd,
)

__all__ = [
    "AccumulateState",
    "ApplyIfFiniteState",
    "EmptyState",
    "FlattenedState",
    "GradientTransformation",
    "IndexedSlices",
    "MaskedState",
    "MultiTransformState",
    "OptimizerState",
    "Packed",
    "__version__",
    "accumulate_gradients",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "aggregate_gradients",
    "all_finite",
    "apply_if_finite",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "ema",
    "flatten",
    "ftrl",
    "get_hyperparam",
    "get_slot",
    "global_norm",
    "identity",
    "lamb",
    "lion",
    "masked",
    "multi_transform",
    "nadam",
    "pack",
    "rmsprop",
    "scale_by_adadelta",
    "scale_by_adafactor",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_ftrl",
    "scale_by_lamb",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_nadam",
    "scale_by_rmsprop",
    "scale_by_sgd",
    "schedules",
    "set_hyperparam",
    "sgd",
    "slot_names",
]

from kopt import constraints, optimizers  # noqa: E402
from kopt.variables import Variable  # noqa: E402

__all__ += ["Variable", "constraints", "optimizers"]

from kopt.distributed import jit_update, shard_state, state_sharding  # noqa: E402

__all__ += ["jit_update", "shard_state", "state_sharding"]

from kopt.transforms._weight_decay import (  # noqa: E402
    DecoupledWeightDecayState,
    decoupled_weight_decay,
)

__all__ += ["DecoupledWeightDecayState", "decoupled_weight_decay"]
