"""The Adam family by name: one row per optimizer (its alias, moment estimate and rule, paper,
optax namesake and the settings of the MNIST example), as ``timm.optim`` lists its optimizers.

Example:
  >>> import adam_jax
  >>> print(adam_jax.registry.names("variant")[:3])
  ('adabelief', 'adam_atan2', 'adam_mini')
  >>> info = adam_jax.registry.get("adopt")
  >>> print(info.paper.venue, info.optax_name)
  NeurIPS 2024 optax.contrib.adopt
  >>> tx = info.create(1e-3)  # adam_jax.adopt(1e-3)
"""

from adam_jax._src.optimizer_info import OptimizerInfo, Paper
from adam_jax._src.registry import OPTIMIZERS, create, get, names

__all__ = ["OPTIMIZERS", "OptimizerInfo", "Paper", "create", "get", "names"]
