"""What the registry knows of an optimizer: one row, declared in the optimizer's own module."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import optax

from adam_jax._src.rule import MomentRule

GROUPS = ("adam", "variant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Paper:
    """Where an optimizer was published.

    Attributes:
      authors: the authors as the paper lists them ("Kingma and Ba").
      title: the title.
      url: a stable link (arXiv or OpenReview).
      venue: where and when ("ICLR 2015", or the year for a preprint).
    """

    authors: str
    title: str
    url: str
    venue: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerInfo:
    """One optimizer of the family, declared as ``REGISTRY_ROWS`` of the module that defines it.

    Attributes:
      name: its name in ``adam_jax`` (the alias).
      alias: the optimizer, ``alias(learning_rate, ...)``.
      group: ``"adam"`` (Adam, AdamW and their classic forms) or ``"variant"`` (the modern
        family, each with a float64 reference in the tests).
      summary: what it changes in Adam, in one line.
      paper: where it was published.
      transformation: its moment estimate (``scale_by_*``), or None for a chain of others.
      rule: the :class:`adam_jax.rules.MomentRule` of that moment estimate, or None.
      optax_name: the dotted name of its optax namesake ("optax.contrib.adopt"), or None.
      learning_rate: the peak learning rate of the MNIST example (warm-up + cosine, batch 128).
      example_options: options the example and the benchmarks pass besides the rate.
      schedule_free: replaces the learning-rate decay by averaging (evaluate at the average).
      companions: other public names its module adds to ``adam_jax`` (a wrapper, an evaluation
        helper, a state type).
    """

    name: str
    alias: Callable[..., optax.GradientTransformation]
    group: str
    summary: str
    paper: Paper
    transformation: Callable[..., optax.GradientTransformation] | None = None
    rule: type[MomentRule] | None = None
    optax_name: str | None = None
    learning_rate: float = 3e-3
    example_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    schedule_free: bool = False
    companions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {self.group!r}")

    def create(
        self, learning_rate: optax.ScalarOrSchedule | None = None, **options: Any
    ) -> optax.GradientTransformation:
        """The optimizer with ``learning_rate`` (default :attr:`learning_rate`) and the
        :attr:`example_options` updated by ``options``."""
        rate = self.learning_rate if learning_rate is None else learning_rate
        return self.alias(rate, **{**self.example_options, **options})

    def optax_namesake(self) -> Callable[..., optax.GradientTransformation] | None:
        """optax's optimizer of the same name (imported on demand), or None."""
        if self.optax_name is None:
            return None
        module, _, name = self.optax_name.rpartition(".")
        return getattr(importlib.import_module(module), name)
