"""The one training and evaluation engine every method uses."""

from tsbd.train.engine import (
    FitResult,
    TrainConfig,
    cross_entropy_step,
    fit,
    iterate_batches,
    make_optimizer,
    predict,
    to_model_input,
)
from tsbd.train.runtime import Runtime, seed_everything

__all__ = [
    "FitResult",
    "Runtime",
    "TrainConfig",
    "cross_entropy_step",
    "fit",
    "iterate_batches",
    "make_optimizer",
    "predict",
    "seed_everything",
    "to_model_input",
]
