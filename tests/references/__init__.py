"""Float64 NumPy references of adam_jax's optimizers, the one place that holds them.

* ``adam.py``: the Adam family of adam_jax's core (Adam, AdamW, NAdam, AMSGrad, AdaMax, the
  Keras bias correction, PyTorch's float32 Adam);
* ``schedules.py``: the learning-rate schedules;
* one module per variant of the modern family, named after its adam_jax module, each ending in
  its ``TESTS`` rows (``tests/variants.py`` collects them);
* ``common.py``: what they share (base classes, test problems, the runners of a reference, of
  an optax transformation and of a PyTorch optimizer).

Nothing here imports ``adam_jax`` or ``optax``: every rule is written from its paper and its
authors' code. Each variant's module also builds the variant's optimizer from the reference
packages on PyPI (through ``common.run_torch``), mapping adam_jax's options to theirs, so the
tests can compare against the packages where they are installed.
"""
