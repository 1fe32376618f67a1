"""adam_jax: Adam as composable optax transformations.

The pieces (:func:`scale_by_adam`, :func:`scale_by_bias_correction`,
:func:`scale_by_learning_rate`, :func:`add_decayed_weights`) chain with ``optax.chain``; the
aliases (:func:`adam`, :func:`adamw`, ...) are such chains, with optax's state types.
"""

from adam_jax import flat, quantization, sharding
from adam_jax.aliases import (
    adam,
    adam_8bit,
    adam_l2,
    adamax,
    adamaxw,
    adamw,
    adamw_8bit,
    amsgrad,
    nadam,
    nadamw,
)
from adam_jax.bias_correction import ScaleByBiasCorrectionState, scale_by_bias_correction
from adam_jax.flat import FlatParams
from adam_jax.learning_rate import scale_by_learning_rate
from adam_jax.moments import (
    ScaleByAdamState,
    ScaleByAmsgradState,
    scale_by_adam,
    scale_by_adamax,
    scale_by_amsgrad,
)
from adam_jax.moving_average import moving_average_terms
from adam_jax.quantization import BlockwiseQuantized, QuantizedArray, eight_bit_moments
from adam_jax.schedules import (
    inverse_sqrt_schedule,
    linear_warmup,
    warmup_stable_decay_schedule,
)
from adam_jax.storage import CastStorage, MomentStorage, cast_storage
from adam_jax.weight_decay import add_decayed_weights, masked

__version__ = "0.2.0"

__all__ = [
    "BlockwiseQuantized",
    "CastStorage",
    "FlatParams",
    "MomentStorage",
    "QuantizedArray",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByBiasCorrectionState",
    "adam",
    "adam_8bit",
    "adam_l2",
    "adamax",
    "adamaxw",
    "adamw",
    "adamw_8bit",
    "add_decayed_weights",
    "amsgrad",
    "cast_storage",
    "eight_bit_moments",
    "flat",
    "inverse_sqrt_schedule",
    "linear_warmup",
    "masked",
    "moving_average_terms",
    "nadam",
    "nadamw",
    "quantization",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_bias_correction",
    "scale_by_learning_rate",
    "sharding",
    "warmup_stable_decay_schedule",
]
