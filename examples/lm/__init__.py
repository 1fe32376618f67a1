"""A GPT-style byte-level language model trained with adam_jax on any mesh of devices and
processes: ``python -m examples.lm --help`` (see ``docs/language_model.md``)."""
