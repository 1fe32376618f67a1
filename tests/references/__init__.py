"""Float64 NumPy references of the modern Adam family, one module per variant.

Like ``tests/reference.py`` (the Adam family of adam_jax's core), nothing here imports
``adam_jax`` or ``optax``: every rule is written from its paper and its authors' code. Each
module also builds the variant's optimizer from the reference packages on PyPI (through
``reference.run_torch``), mapping adam_jax's options to theirs, so the tests can compare
against the packages where they are installed.
"""
