"""Benchmarks of adam_jax against optax.adam (BENCHMARKS.md lists the figures, by topic)."""
