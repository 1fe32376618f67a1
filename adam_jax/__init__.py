"""adam_jax: Adam as composable optax transformations.

The pieces (:func:`scale_by_adam`, :func:`scale_by_bias_correction`,
:func:`scale_by_learning_rate`, :func:`add_decayed_weights`) chain with ``optax.chain``; the
aliases (:func:`adam`, :func:`adamw`, ...) are such chains, with optax's state types. This
module holds the optimizers, the wrappers and the storages; the toolkit for writing a rule of
one's own is :mod:`adam_jax.rules`.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from adam_jax import flat, quantization, registry, rules, sharding
from adam_jax._src.bias_correction import ScaleByBiasCorrectionState, scale_by_bias_correction
from adam_jax._src.block_mean import BlockMeanStorage, block_means
from adam_jax._src.cautious_weight_decay import cautious_weight_decay
from adam_jax._src.factored import FactoredMoment, FactoredStorage, factored_second_moment
from adam_jax._src.flat import FlatParams
from adam_jax._src.gradient_order import gradient_order
from adam_jax._src.kahan import KahanSummationState, kahan_summation
from adam_jax._src.learning_rate import scale_by_learning_rate
from adam_jax._src.loss_spikes import SkipLossSpikesState, skip_loss_spikes
from adam_jax._src.memory import device_state_bytes, state_bytes
from adam_jax._src.moments import ScaleByAdamState, ScaleByAmsgradState
from adam_jax._src.offload import offload_state
from adam_jax._src.rounding import (
    StochasticRoundingState,
    round_stochastically,
    stochastic_rounding,
)
from adam_jax._src.row_slices import step_in_slices
from adam_jax._src.schedules import (
    inverse_sqrt_schedule,
    linear_warmup,
    warmup_stable_decay_schedule,
)
from adam_jax._src.storage import CastStorage, MomentStorage, cast_storage, per_leaf
from adam_jax._src.update_clipping import clip_update_rms
from adam_jax._src.weight_decay import add_decayed_weights, masked
from adam_jax.quantization import (
    BlockwiseQuantized,
    FourBitBlockwise,
    FourBitRank1,
    QuantizedArray,
    eight_bit_moments,
    four_bit_moments,
)

# isort: split
# family: imports
from adam_jax._src.aliases import (
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
from adam_jax._src.moments import scale_by_adam, scale_by_adamax, scale_by_amsgrad
from adam_jax._src.variants.adabelief import adabelief, scale_by_belief
from adam_jax._src.variants.adam_atan2 import adam_atan2, scale_by_adam_atan2
from adam_jax._src.variants.adam_mini import (
    adam_mini,
    adam_mini_block_shape,
    adam_mini_partition,
    scale_by_adam_mini,
)
from adam_jax._src.variants.ademamix import (
    ademamix,
    scale_by_ademamix,
    scale_by_simplified_ademamix,
    simplified_ademamix,
)
from adam_jax._src.variants.adopt import adopt, scale_by_adopt
from adam_jax._src.variants.cautious import cautious, cautious_adamw
from adam_jax._src.variants.grams import grams, scale_by_grams
from adam_jax._src.variants.lamb import lamb, scale_by_trust_ratio
from adam_jax._src.variants.laprop import ScaleByLapropState, laprop, scale_by_laprop
from adam_jax._src.variants.mars import ScaleByMarsState, mars, scale_by_mars
from adam_jax._src.variants.radam import radam, scale_by_radam
from adam_jax._src.variants.schedule_free import schedule_free_adamw, schedule_free_eval_params
from adam_jax._src.variants.soap import relayout_soap_state, scale_by_soap, soap
from adam_jax._src.variants.spam import ScaleBySpamState, scale_by_spam, spam
from adam_jax._src.variants.stable_adamw import scale_by_stable_adam, stable_adamw
from adam_jax._src.variants.stable_spam import (
    ScaleByStableSpamState,
    scale_by_stable_spam,
    stable_spam,
)

# end of family: imports

__version__ = "0.4.0"

# The rule toolkit's names that this module exported until 0.4, now in adam_jax.rules alone.
_MOVED_TO_RULES = frozenset(
    ("Leaf", "Moment", "MomentRule", "map_tensors", "moving_average_terms", "scale_by_rule")
)

if not _TYPE_CHECKING:  # a type checker keeps flagging unknown names, these included

    def __getattr__(name: str) -> object:
        """The names of :data:`_MOVED_TO_RULES` still resolve here, with a warning that names
        where they live."""
        if name in _MOVED_TO_RULES:
            import warnings

            warnings.warn(
                f"adam_jax.{name} is adam_jax.rules.{name}: the rule toolkit left the top "
                "level in 0.4, and the old name goes in 0.5",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(rules, name)
        raise AttributeError(f"module 'adam_jax' has no attribute {name!r}")


# family: __all__
__all__ = [
    "BlockMeanStorage",
    "BlockwiseQuantized",
    "CastStorage",
    "FactoredMoment",
    "FactoredStorage",
    "FlatParams",
    "FourBitBlockwise",
    "FourBitRank1",
    "KahanSummationState",
    "MomentStorage",
    "QuantizedArray",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByBiasCorrectionState",
    "ScaleByLapropState",
    "ScaleByMarsState",
    "ScaleBySpamState",
    "ScaleByStableSpamState",
    "SkipLossSpikesState",
    "StochasticRoundingState",
    "adabelief",
    "adam",
    "adam_8bit",
    "adam_atan2",
    "adam_l2",
    "adam_mini",
    "adam_mini_block_shape",
    "adam_mini_partition",
    "adamax",
    "adamaxw",
    "adamw",
    "adamw_8bit",
    "add_decayed_weights",
    "ademamix",
    "adopt",
    "amsgrad",
    "block_means",
    "cast_storage",
    "cautious",
    "cautious_adamw",
    "cautious_weight_decay",
    "clip_update_rms",
    "device_state_bytes",
    "eight_bit_moments",
    "factored_second_moment",
    "flat",
    "four_bit_moments",
    "gradient_order",
    "grams",
    "inverse_sqrt_schedule",
    "kahan_summation",
    "lamb",
    "laprop",
    "linear_warmup",
    "mars",
    "masked",
    "nadam",
    "nadamw",
    "offload_state",
    "per_leaf",
    "quantization",
    "radam",
    "registry",
    "relayout_soap_state",
    "round_stochastically",
    "rules",
    "scale_by_adam",
    "scale_by_adam_atan2",
    "scale_by_adam_mini",
    "scale_by_adamax",
    "scale_by_ademamix",
    "scale_by_adopt",
    "scale_by_amsgrad",
    "scale_by_belief",
    "scale_by_bias_correction",
    "scale_by_grams",
    "scale_by_laprop",
    "scale_by_learning_rate",
    "scale_by_mars",
    "scale_by_radam",
    "scale_by_simplified_ademamix",
    "scale_by_soap",
    "scale_by_spam",
    "scale_by_stable_adam",
    "scale_by_stable_spam",
    "scale_by_trust_ratio",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "sharding",
    "simplified_ademamix",
    "skip_loss_spikes",
    "soap",
    "spam",
    "stable_adamw",
    "stable_spam",
    "state_bytes",
    "step_in_slices",
    "stochastic_rounding",
    "warmup_stable_decay_schedule",
]
# end of family: __all__
