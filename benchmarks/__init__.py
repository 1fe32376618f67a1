"""Benchmarks of adam_jax against optax.adam (see BENCHMARKS.md)."""
