"""The modern Adam family, one module per variant (or a package of modules, ``soap``): its
:class:`adam_jax.rules.MomentRule` (or a wrapper), its ``scale_by_*`` transformation and its alias,
exported from :mod:`adam_jax`. Which optimizers there are, with their papers, is
:mod:`adam_jax.registry`."""
