"""Runnable examples of adam_jax (``python -m examples.mnist``)."""
