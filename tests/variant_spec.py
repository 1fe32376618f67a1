"""How a variant of the modern Adam family is tested: :class:`Variant`, and the options its
cases share.

Each reference module (``tests/references/<module>.py``) ends with ``TESTS``, one
:class:`Variant` per optimizer of its adam_jax module, named as in ``adam_jax.registry``:
its float64 reference class, the options its tests run (every option of the alias, one case
each), the cases its optax namesake shares and its reference packages. The alias and the optax
namesake come from the registry; ``tests/variants.py`` collects the rows.

Options are written as the alias's keyword arguments; :meth:`Variant.reference` turns them into
the reference's (a mask as a list of bools in the problem's leaf order, renamed options).
Schedules are plain arithmetic, so the same function serves JAX (traced step) and NumPy (int).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import optax

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


# The ZeRO-1 training test's (axis types, mesh) pairs (tests/test_zero1.py): each variant
# trains on one of them.
ZERO1_LAYOUTS = (
    ("explicit", "data8"),
    ("explicit", "data4_model2"),
    ("auto", "data8"),
    ("auto", "data4_model2"),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One optimizer of the modern Adam family and how to test it.

    Attributes:
      name: the optimizer's name in ``adam_jax.registry`` (its alias in ``adam_jax``).
      reference_class: the float64 reference's class.
      learning_rate: the learning rate of the tests, unless a case sets one.
      cases: named option sets; together they exercise every option of the alias.
      optax_cases: the cases optax's namesake (the registry's ``optax_name``) shares: same
        arithmetic, same state.
      packages: reference packages: name -> ``adapter(params, **options)`` building the
        PyTorch optimizer (it raises NotImplementedError for options it cannot express).
      float32_cases: the cases whose float32 error is compared with the packages'.
      steps: the steps of the comparisons with the float64 reference and the packages
        (``tests/test_variants_reference.py``): 300, or fewer for a rule whose every branch
        shows sooner and whose steps are slow (SOAP's eigendecompositions).
      complex_params: whether the rule is defined for complex params.
      flat_params: whether the rule runs on ``FlatParams`` buffers (False: it refuses them
        with a ValueError naming ``FlatParams``, as SOAP does, whose factors need each
        param's shape).
      per_tensor: whether the update depends on sums over each tensor (whose order of
        summation changes with the sharding of the state: equal to float32 rounding only).
      reference_options: renames of options between the alias and the reference.
      hyperparams: numeric hyperparameters that ``optax.inject_hyperparams`` can inject.
      storage_options: the alias's arguments that store its moments (``mu_dtype`` and
        ``nu_dtype``; schedule-free stores only its second moment, Adam-mini only its first).
      static_args: arguments ``optax.inject_hyperparams`` must not inject (callables that are
        not schedules of the step: it would evaluate them at the step count).
      bad: ``(argument, value, range text)`` triples that must raise ValueError.
      zero1_layout: the axis types and mesh of :data:`ZERO1_LAYOUTS` that the ZeRO-1 training
        test (``tests/test_zero1.py``) runs the variant on; ``None``: one chosen by the name
        alone (:attr:`zero1`), so that a new name moves no other variant to another mesh.
      zero1_float64_single_device: the ZeRO-1 run is compared with the single-device run in
        float64 (1e-10), not float32 (1e-5): a rule whose conditioning on that problem turns
        float32 rounding of the summed gradients into more than the tolerance (a sign, a
        threshold, a momentum of normalized gradients); ``tests/test_zero1.py`` says which
        element and by how much.
      zero1_float64_layouts: the ZeRO-1 and replicated states are compared to float32 rounding
        (and in float64 to 1e-13), not bit for bit: XLA:CPU fuses the rule's step differently in
        the two layouts.
      step_proportional_to_rate: twice this step's learning rate is exactly twice this step's
        update (``tests/test_inject_hyperparams.py``); False for a rule whose momentum weighs
        each direction by the rate it was taken with (LaProp, as its authors' code).
    """

    name: str
    reference_class: Callable[..., Any]
    learning_rate: float
    cases: Mapping[str, Mapping[str, Any]]
    optax_cases: tuple[str, ...] = ()
    packages: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    float32_cases: tuple[str, ...] = ("default", "decay_mask")
    steps: int = 300
    complex_params: bool = True
    flat_params: bool = True
    per_tensor: bool = False
    reference_options: Mapping[str, Callable[[Any], tuple[str, Any]]] = dataclasses.field(
        default_factory=dict
    )
    hyperparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
    storage_options: tuple[str, ...] = ("mu_dtype", "nu_dtype")
    static_args: tuple[str, ...] = ()
    bad: tuple[tuple[str, Any, str], ...] = ()
    zero1_layout: tuple[str, str] | None = None
    zero1_float64_single_device: bool = False
    zero1_float64_layouts: bool = False
    step_proportional_to_rate: bool = True

    @property
    def zero1(self) -> tuple[str, str]:
        """The axis types and mesh of the ZeRO-1 training test: :attr:`zero1_layout`, or one of
        :data:`ZERO1_LAYOUTS` by a checksum of the name."""
        if self.zero1_layout is not None:
            return self.zero1_layout
        return ZERO1_LAYOUTS[zlib.crc32(self.name.encode()) % len(ZERO1_LAYOUTS)]

    @property
    def alias(self) -> Callable[..., optax.GradientTransformation]:
        """The optimizer, from the registry."""
        return adam_jax.registry.get(self.name).alias

    @property
    def optax(self) -> Callable[..., optax.GradientTransformation] | None:
        """``optax(**options)`` builds optax's namesake at the tests' learning rate (None where
        optax has none)."""
        namesake = adam_jax.registry.get(self.name).optax_namesake()
        if namesake is None:
            return None
        return lambda **options: namesake(**self.options(**options))

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
