"""adam_jax: Adam as composable optax transformations.

The pieces (:func:`scale_by_adam`, :func:`scale_by_bias_correction`,
:func:`scale_by_learning_rate`, :func:`add_decayed_weights`) chain with ``optax.chain``; the
aliases (:func:`adam`, :func:`adamw`, ...) are such chains.
"""

from adam_jax.aliases import adam, adam_l2, adamax, adamaxw, adamw, amsgrad, nadam, nadamw
from adam_jax.bias_correction import (
    ScaleByBiasCorrectionState,
    moving_average_terms,
    scale_by_bias_correction,
)
from adam_jax.learning_rate import scale_by_learning_rate
from adam_jax.moments import (
    ScaleByAdamState,
    ScaleByAmsgradState,
    scale_by_adam,
    scale_by_adamax,
    scale_by_amsgrad,
)
from adam_jax.schedules import (
    inverse_sqrt_schedule,
    linear_warmup,
    warmup_stable_decay_schedule,
)
from adam_jax.storage import CastStorage, MomentStorage, cast_storage
from adam_jax.weight_decay import AddDecayedWeightsState, add_decayed_weights, masked

__version__ = "0.1.0"

__all__ = [
    "AddDecayedWeightsState",
    "CastStorage",
    "MomentStorage",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByBiasCorrectionState",
    "adam",
    "adam_l2",
    "adamax",
    "adamaxw",
    "adamw",
    "add_decayed_weights",
    "amsgrad",
    "cast_storage",
    "inverse_sqrt_schedule",
    "linear_warmup",
    "masked",
    "moving_average_terms",
    "nadam",
    "nadamw",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_bias_correction",
    "scale_by_learning_rate",
    "warmup_stable_decay_schedule",
]
