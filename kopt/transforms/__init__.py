"""Building blocks: every optimizer in :mod:`kopt.alias` is a short chain of these."""

from kopt.transforms._adaptive import (
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_lamb,
    scale_by_lion,
    scale_by_nadam,
)
from kopt.transforms._aggregation import aggregate_gradients
from kopt.transforms._clipping import (
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    global_norm,
)
from kopt.transforms._flat import FlatLayout, FlattenedState, flatten
from kopt.transforms._learning_rate import add_decayed_weights, scale_by_learning_rate
from kopt.transforms._momentum import (
    scale_by_adafactor,
    scale_by_ftrl,
    scale_by_rmsprop,
    scale_by_sgd,
)
from kopt.transforms._wrappers import (
    AccumulateState,
    ApplyIfFiniteState,
    MaskedState,
    MultiTransformState,
    accumulate_gradients,
    all_finite,
    apply_if_finite,
    ema,
    masked,
    multi_transform,
)

__all__ = [
    "AccumulateState",
    "ApplyIfFiniteState",
    "FlatLayout",
    "FlattenedState",
    "MaskedState",
    "MultiTransformState",
    "accumulate_gradients",
    "add_decayed_weights",
    "aggregate_gradients",
    "all_finite",
    "apply_if_finite",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "ema",
    "flatten",
    "global_norm",
    "masked",
    "multi_transform",
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
]
