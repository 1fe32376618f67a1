"""Everything a rule author needs: the moment-rule core, its presets and helpers, and the
statement of hyperparameters (:func:`hyperparam` and its presets). The library's own rules are
reached through the registry (``adam_jax.registry.get("adopt").rule``).

A new member of the Adam family is a :class:`MomentRule` (most subclass :class:`AdamLikeRule`,
which brings Adam's state, moments and step scalars) whose hyperparameters are
:func:`hyperparam` fields; its transformation is a typed function that builds the rule and
returns :func:`scale_by_rule` of it, and its optimizer one that returns :func:`descend` of the
transformation (both written out, as optax writes its aliases); a thin alias of another
optimizer is a :func:`partial` of it. The helpers
are the ones the library's own variants use: the zero-started moving average and its bias
correction (:func:`moving_average`, :func:`step_scalars`), the step of a rule that holds its
learning rate (:func:`step_with_rate`), the checks of hyperparameter ranges, the compute-dtype
rules, moment storages, and the registry's row types (:class:`OptimizerInfo`, :class:`Paper`),
importable here without the registry. Every module of the library's variants imports adam_jax
through this module alone (SOAP's package besides its own modules and a few internals of its
own); ``docs/adding_a_variant.md`` walks through a complete variant written with nothing else.

Example:
  >>> import dataclasses, jax.numpy as jnp
  >>> from adam_jax import rules
  >>> @dataclasses.dataclass(frozen=True, kw_only=True)
  ... class SignAdamRule(rules.AdamLikeRule):  # Adam's state and scalars; its own step
  ...     b1: float = 0.9
  ...     b2: float = 0.999
  ...     mu_dtype: object = None
  ...     nu_dtype: object = None
  ...     def update(self, g, moments, scalars, leaf):
  ...         mu = rules.moving_average(moments["mu"], g, scalars.w1)
  ...         nu = rules.moving_average(moments["nu"], rules.abs_sq(g), scalars.w2)
  ...         return leaf.add_decay(jnp.sign(mu)), {"mu": mu, "nu": nu}
  >>> tx = rules.descend(0.1, rules.scale_by_rule(SignAdamRule()))
  >>> updates, _ = tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))
  >>> print(updates)
  [-0.1  0.1]
"""

from adam_jax._src.block_mean import block_means
from adam_jax._src.branching import branch, switch
from adam_jax._src.chains import ascent, descend
from adam_jax._src.flat import FlatParams
from adam_jax._src.hyperparams import (
    Hyperparam,
    at_least,
    b1,
    b2,
    check_fields,
    choice,
    eps,
    eps_root,
    fields_of,
    hyperparam,
    integer,
    learning_rate,
    mu_dtype,
    nesterov,
    nu_dtype,
    partial,
)
from adam_jax._src.leaf_schedule import LeafSchedule, LeafStep, WholeLeaves
from adam_jax._src.moments import AdamLikeRule, adam_moments, nesterov_mu_hat, scale_by_adam
from adam_jax._src.moving_average import (
    StepScalars,
    moving_average,
    moving_average_terms,
    step_scalars,
)
from adam_jax._src.numerics import abs_sq, compute_dtype, divide, real_dtype
from adam_jax._src.offload import on_device
from adam_jax._src.optimizer_info import OptimizerInfo, Paper
from adam_jax._src.orthonormalization import ORTHOGONALIZATIONS, orthonormal
from adam_jax._src.own_rate import step_with_rate
from adam_jax._src.rounding import raw_key
from adam_jax._src.rule import (
    Leaf,
    Moment,
    MomentRule,
    expand_mask,
    map_tensors,
    scale_by_rule,
    second_moment,
)
from adam_jax._src.segmented import SegmentedStorage
from adam_jax._src.storage import (
    CastStorage,
    MomentStorage,
    cast_storage,
    per_leaf,
    storages_for,
)
from adam_jax._src.typed_sharding import (
    replicated,
    replicated_placement,
    reshard,
    typed_sharding,
)
from adam_jax._src.validation import (
    check_choice,
    check_decay,
    check_integer,
    check_non_negative,
    check_positive,
    check_steps,
    static_float,
)
from adam_jax._src.weight_decay import Mask, add_decayed_weights, schedule_state_type

__all__ = [
    "AdamLikeRule",
    "CastStorage",
    "FlatParams",
    "Hyperparam",
    "Leaf",
    "LeafSchedule",
    "LeafStep",
    "Mask",
    "Moment",
    "MomentRule",
    "MomentStorage",
    "ORTHOGONALIZATIONS",
    "OptimizerInfo",
    "Paper",
    "SegmentedStorage",
    "StepScalars",
    "WholeLeaves",
    "abs_sq",
    "adam_moments",
    "add_decayed_weights",
    "ascent",
    "at_least",
    "b1",
    "b2",
    "block_means",
    "branch",
    "cast_storage",
    "check_choice",
    "check_decay",
    "check_fields",
    "check_integer",
    "check_non_negative",
    "check_positive",
    "check_steps",
    "choice",
    "compute_dtype",
    "descend",
    "divide",
    "eps",
    "eps_root",
    "expand_mask",
    "fields_of",
    "hyperparam",
    "integer",
    "learning_rate",
    "map_tensors",
    "moving_average",
    "moving_average_terms",
    "mu_dtype",
    "nesterov",
    "nesterov_mu_hat",
    "nu_dtype",
    "on_device",
    "orthonormal",
    "partial",
    "per_leaf",
    "raw_key",
    "real_dtype",
    "replicated",
    "replicated_placement",
    "reshard",
    "scale_by_adam",
    "scale_by_rule",
    "schedule_state_type",
    "second_moment",
    "static_float",
    "step_scalars",
    "step_with_rate",
    "storages_for",
    "switch",
    "typed_sharding",
]
