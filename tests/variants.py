"""The one table of the modern Adam family that the test modules iterate.

A row (:class:`Variant`) names a variant's alias, its float64 reference
(``tests/references/<module>.py``), the options its tests run (every option of the alias, one
case each), its optax namesake and its reference packages. Adding a variant to adam_jax is one
module in ``adam_jax/variants/``, one reference in ``tests/references/`` and one row here: the
test modules (``test_variants_*.py``, the sharding, ZeRO-1 and export tests) pick it up.

Options are written as the alias's keyword arguments; :meth:`Variant.reference` turns them into
the reference's (a mask as a list of bools in the problem's leaf order, renamed options).
Schedules are plain arithmetic, so the same function serves JAX (traced step) and NumPy (int).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optax
import optax.contrib
from references import (
    adabelief,
    adam_atan2,
    ademamix,
    adopt,
    cautious,
    lamb,
    radam,
    schedule_free,
    stable_adamw,
)

import adam_jax

# The leaves of reference.make_problem's default problem, in jax.tree order.
LEAF_NAMES = ("b", "s", "w")
MASK = {"b": False, "s": True, "w": True}


def lr_schedule(k: Any) -> Any:
    """A warm-up then an exponential decay, as arithmetic that traces and runs on ints."""
    return 0.01 * (1 - 0.5 ** (k + 1)) * 0.995**k


def wd_schedule(k: Any) -> Any:
    """A weight-decay schedule that changes every step."""
    return 0.05 / (1.0 + 0.01 * k)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One optimizer of the modern Adam family and how to test it.

    Attributes:
      name: the alias's name in ``adam_jax``.
      alias: the alias.
      reference_class: the float64 reference's class.
      learning_rate: the learning rate of the tests, unless a case sets one.
      cases: named option sets; together they exercise every option of the alias.
      optax: ``optax(**options)`` builds optax's namesake (None where optax has none); run with
        the ``optax_cases``, on which it computes the same updates.
      optax_cases: the cases optax's namesake shares (same arithmetic, same state).
      packages: reference packages: name -> ``adapter(params, **options)`` building the
        PyTorch optimizer (it raises NotImplementedError for options it cannot express).
      float32_cases: the cases whose float32 error is compared with the packages'.
      complex_params: whether the rule is defined for complex params.
      per_tensor: whether the update depends on sums over each tensor (whose order of
        summation changes with the sharding of the state: equal to float32 rounding only).
      reference_options: renames of options between the alias and the reference.
      hyperparams: numeric hyperparameters that ``optax.inject_hyperparams`` can inject.
      static_args: arguments ``optax.inject_hyperparams`` must not inject (callables that are
        not schedules of the step: it would evaluate them at the step count).
      bad: ``(argument, value, range text)`` triples that must raise ValueError.
    """

    name: str
    alias: Callable[..., optax.GradientTransformation]
    reference_class: Callable[..., Any]
    learning_rate: float
    cases: Mapping[str, Mapping[str, Any]]
    optax: Callable[..., optax.GradientTransformation] | None = None
    optax_cases: tuple[str, ...] = ()
    packages: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    float32_cases: tuple[str, ...] = ("default", "decay_mask")
    complex_params: bool = True
    per_tensor: bool = False
    reference_options: Mapping[str, Callable[[Any], tuple[str, Any]]] = dataclasses.field(
        default_factory=dict
    )
    hyperparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
    static_args: tuple[str, ...] = ()
    bad: tuple[tuple[str, Any, str], ...] = ()

    def options(self, **options: Any) -> dict[str, Any]:
        """``options`` with the tests' learning rate unless they set one."""
        return {"learning_rate": self.learning_rate, **options}

    def make(self, **options: Any) -> optax.GradientTransformation:
        """The optimizer with ``options`` (alias keywords)."""
        return self.alias(**self.options(**options))

    def make_decaying(self, mask: Any) -> optax.GradientTransformation:
        """The optimizer with its weight-decay case, the decay masked by ``mask`` (for params
        other than the default problem's)."""
        options = dict(self.cases.get("decay_mask", {}))
        if "mask" in options:
            options["mask"] = mask
        return self.make(**options)

    def package_options(self, **options: Any) -> dict[str, Any]:
        """``options`` for a package adapter: the reference's names, the mask as a list."""
        return self._translated(self.options(**options))

    def reference(self, **options: Any) -> Any:
        """The float64 reference for ``options`` (alias keywords)."""
        return self.reference_class(**self._translated(self.options(**options)))

    def _translated(self, options: Mapping[str, Any]) -> dict[str, Any]:
        translated = {}
        for key, value in options.items():
            if key == "mask" and isinstance(value, Mapping):
                value = [value[name] for name in LEAF_NAMES]
            if key in self.reference_options:
                key, value = self.reference_options[key](value)
            translated[key] = value
        return translated

    def __str__(self) -> str:
        return self.name


DECAY = {"weight_decay": 0.1, "mask": MASK}
SCHEDULED = {"learning_rate": lr_schedule, "weight_decay": wd_schedule}

VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="adopt",
        alias=adam_jax.adopt,
        learning_rate=1e-2,
        reference_class=adopt.RefAdopt,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-3},
            "nesterov": {"nesterov": True},
            "no_clipping": {"use_clipping": False},
            "clip_value_fn": {"clip_value_fn": lambda count: (count + 1) ** 0.25},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        optax=lambda **o: optax.contrib.adopt(**{"learning_rate": 1e-2, **o}),
        optax_cases=("default", "hyperparams", "nesterov", "no_clipping", "clip_value_fn"),
        packages={
            "timm": adopt.timm_optimizer,
            "pytorch-optimizer": adopt.pytorch_optimizer_optimizer,
        },
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.9999, "eps": 1e-6},
        static_args=("clip_value_fn",),
        bad=(("b2", 1.0, "[0, 1)"), ("eps", -1.0, ">= 0"), ("weight_decay", -0.1, ">= 0")),
    ),
    Variant(
        name="ademamix",
        alias=adam_jax.ademamix,
        learning_rate=1e-2,
        reference_class=ademamix.RefAdemamix,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "b3": 0.999, "alpha": 2.0, "eps": 1e-3},
            "warmups": {"alpha_warmup_steps": 100, "b3_warmup_steps": 150},
            "alpha_warmup": {"alpha_warmup_steps": 40},
            "b3_warmup": {"b3_warmup_steps": 70, "b3": 0.995},
            "schedules": {"alpha": lambda k: 5.0 * (1 - 0.99**k), "b3": lambda k: 0.99 + 0.0 * k},
            "b1_zero": {"b1": 0.0},
            "eps_root": {"eps_root": 1e-6},
            "decay_mask": DECAY,
            "maximize": {"maximize": True},
        },
        optax=lambda **o: optax.contrib.ademamix(**{"learning_rate": 1e-2, **o}),
        optax_cases=("default", "hyperparams", "schedules", "b1_zero", "eps_root", "decay_mask"),
        packages={"pytorch-optimizer": ademamix.pytorch_optimizer_optimizer},
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "b3": 0.9999, "alpha": 5.0},
        bad=(("b3", 1.5, "[0, 1)"), ("alpha", -1.0, ">= 0"), ("b3_warmup_steps", 0, ">= 1")),
    ),
    Variant(
        name="simplified_ademamix",
        alias=adam_jax.simplified_ademamix,
        learning_rate=1e-3,
        reference_class=ademamix.RefSimplifiedAdemamix,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.9, "b2": 0.99, "alpha": 2.0, "eps": 1e-3},
            "alpha_schedule": {"alpha": lambda k: 3.0 * (1 - 0.99**k)},
            "eps_root": {"eps_root": 1e-6},
            "decay_mask": DECAY,
            "maximize": {"maximize": True},
        },
        optax=lambda **o: optax.contrib.simplified_ademamix(**{"learning_rate": 1e-3, **o}),
        optax_cases=("default", "hyperparams", "alpha_schedule", "eps_root", "decay_mask"),
        packages={"pytorch-optimizer": ademamix.pytorch_optimizer_simplified_optimizer},
        hyperparams={"learning_rate": 1e-3, "b1": 0.99, "b2": 0.95, "alpha": 1.0},
        bad=(("b1", -0.1, "[0, 1)"), ("alpha", -2.0, ">= 0")),
    ),
    Variant(
        name="cautious_adamw",
        per_tensor=True,
        alias=adam_jax.cautious_adamw,
        learning_rate=1e-2,
        reference_class=cautious.RefCautiousAdamw,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "eps_root": 1e-6},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        packages={"timm": cautious.timm_optimizer},
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "weight_decay": 1e-4},
        bad=(("b1", 1.0, "[0, 1)"), ("weight_decay", -1.0, ">= 0")),
    ),
    Variant(
        name="stable_adamw",
        per_tensor=True,
        alias=adam_jax.stable_adamw,
        learning_rate=1e-2,
        reference_class=stable_adamw.RefStableAdamw,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.999, "eps": 1e-3},
            "decay_mask": {"weight_decay": 0.1, "mask": MASK},
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        packages={
            "torch-optimi": stable_adamw.torch_optimizer,
            "pytorch-optimizer": stable_adamw.pytorch_optimizer_optimizer,
        },
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.99, "weight_decay": 1e-2},
        bad=(("b2", 1.0, "[0, 1)"), ("eps", -1e-6, ">= 0")),
    ),
    Variant(
        name="adam_atan2",
        alias=adam_jax.adam_atan2,
        learning_rate=1e-2,
        reference_class=adam_atan2.RefAdamAtan2,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.999, "a": 1.0, "b": 2.0},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        packages={"adam-atan2-pytorch": adam_atan2.torch_optimizer},
        complex_params=False,
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.99, "a": 1.27, "b": 1.0},
        bad=(("a", 0.0, "> 0"), ("b", -1.0, "> 0")),
    ),
    Variant(
        name="schedule_free_adamw",
        alias=adam_jax.schedule_free_adamw,
        learning_rate=1e-2,
        reference_class=schedule_free.RefScheduleFreeAdamw,
        cases={
            "default": {},
            "warmup": {"warmup_steps": 30},
            "hyperparams": {"b1": 0.95, "b2": 0.99, "eps": 1e-6, "weight_lr_power": 1.0},
            "r": {"r": 2.0, "warmup_steps": 25},
            "decay_mask": {**DECAY, "warmup_steps": 10},
            "paper": {"form": "paper", "warmup_steps": 20, "weight_decay": 0.05},
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        optax=lambda **o: optax.contrib.schedule_free_adamw(**{"learning_rate": 1e-2, **o}),
        optax_cases=("default", "hyperparams"),
        packages={"schedulefree": schedule_free.torch_optimizer},
        reference_options={"form": lambda form: ("paper", form == "paper")},
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0},
        bad=(("b1", 0.0, "(0, 1)"), ("warmup_steps", -1, ">= 0"), ("form", "x", "recommended")),
    ),
    Variant(
        name="radam",
        alias=adam_jax.radam,
        learning_rate=1e-2,
        reference_class=radam.RefRAdam,
        cases={
            "default": {},
            "torch": {"eps_placement": "torch", "eps": 1e-3},
            "torch_decay_mask": {"eps_placement": "torch", **DECAY},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "eps_root": 1e-6},
            "threshold": {"threshold": 50.0},
            "nesterov": {"nesterov": True},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        optax=lambda **o: optax.radam(**{"learning_rate": 1e-2, **o}),
        optax_cases=("default", "hyperparams", "threshold", "nesterov"),
        packages={
            "torch": radam.torch_optimizer,
            "pytorch-optimizer": radam.pytorch_optimizer_optimizer,
        },
        float32_cases=("torch", "torch_decay_mask"),
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
        bad=(("threshold", 3.0, ">= 4"), ("eps_placement", "keras", "standard")),
    ),
    Variant(
        name="adabelief",
        alias=adam_jax.adabelief,
        learning_rate=1e-2,
        reference_class=adabelief.RefAdabelief,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-8, "eps_root": 1e-10},
            "nesterov": {"nesterov": True},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        optax=lambda **o: optax.adabelief(**{"learning_rate": 1e-2, **o}),
        optax_cases=("default", "hyperparams", "nesterov"),
        packages={
            "pytorch-optimizer": adabelief.pytorch_optimizer_optimizer,
            "timm": adabelief.timm_optimizer,
        },
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-16},
        bad=(("eps_root", -1.0, ">= 0"), ("b2", 2.0, "[0, 1)")),
    ),
    Variant(
        name="lamb",
        per_tensor=True,
        alias=adam_jax.lamb,
        learning_rate=1e-2,
        reference_class=lamb.RefLamb,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "eps_root": 1e-6},
            # The one setting pytorch-optimizer's Lamb computes (it adds eps elsewhere).
            "no_eps": {"eps": 0.0},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        optax=lambda **o: optax.lamb(**{"learning_rate": 1e-2, **o}),
        optax_cases=("default", "hyperparams", "decay_mask", "schedules"),
        packages={
            "timm": lamb.timm_optimizer,
            "pytorch-optimizer": lamb.pytorch_optimizer_optimizer,
        },
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0},
        bad=(("eps", -1.0, ">= 0"), ("b1", 1.0, "[0, 1)")),
    ),
)

BY_NAME = {variant.name: variant for variant in VARIANTS}
PER_TENSOR = {variant.name for variant in VARIANTS if variant.per_tensor}
CASES = [(variant, case) for variant in VARIANTS for case in variant.cases]
