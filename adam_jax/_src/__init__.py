"""adam_jax's implementation. Nothing here is public: import from :mod:`adam_jax`,
:mod:`adam_jax.rules` and the public submodules, which re-export what users need."""
