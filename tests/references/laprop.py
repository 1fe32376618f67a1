"""LaProp (Ziyin, Wang and Ueda, 2020, "LaProp: Separating Momentum and Adaptivity in Adam",
arXiv:2002.04839, Algorithm 1).

Written from the paper and the authors' code, Z-T-WANG/LaProp-Optimizer ``laprop.py`` (class
``LaProp``; ``rainbow/laprop.py`` is the same file). The gradient is divided by the root of
the second moment *before* the momentum average, and the learning rate rides inside the
momentum, with a running average of the rate as the momentum's bias correction
(``exp_avg_lr_1``). The ``k``-th update (``k = 0, 1, ...``, ``t = k + 1``), ``lr = lr(k)``,
``wd = wd(k)``::

    v_t = b2 v + (1 - b2) |g|^2
    s_t = v_t                                         (the second moment the step uses)
      centered:  gbar_t = b2 gbar + (1 - b2) g;  s_t = v_t - |gbar_t|^2  once t > T
      amsgrad:   s_max = max(s_max, s_t);  s_t = s_max  (not while centered and t <= T)
    m_t = b1 m + (1 - b1) lr g / (sqrt(s_t / (1 - b2^t)) + eps)
    a_t = b1 a + (1 - b1) lr                          (exp_avg_lr_1)
    p <- (1 - wd) (p - (lr / a_t) m_t)                (decayed leaves: wd not times lr)

with ``T = steps_before_using_centered`` (an attribute, 10, in the authors' code) and
``1 - b2^t`` computed as their ``exp_avg_lr_2 = b2 exp_avg_lr_2 + (1 - b2)``. The authors'
defaults: ``lr=4e-4``, ``betas=(0.9, 0.999)``, ``eps=1e-15``, ``weight_decay=0``,
``amsgrad=False``, ``centered=False``. ``learning_rate=None`` gives the bare direction
``m_t / a_t`` with a unit rate (``a_t = 1 - b1^t``), the paper's Algorithm 1.

Departures from the authors' code: their ``step_size = lr / a_t if lr != 0 else 1`` moves
the params by the whole momentum ``m_t`` at a zero rate that follows non-zero ones (the guard
is meant for ``a_t = 0``); here, as in timm, ``lr / a_t`` is 0 where ``a_t`` is 0 and a zero
rate does not move. adam_jax also computes ``1 - b2^t`` directly, not by their recursion
(equal for a constant ``b2``), and clamps the centered second moment at 0 (rounding only).
Their ``transformer/laprop.py`` (fairseq) is an older variant: ``eps`` scaled by
``sqrt(1 - b2^t)``, decay ``p *= 1 - lr wd`` before the step, eps default 1e-8.

Where the packages differ:

* pytorch-optimizer 4.1.0 ``LaProp``: the authors' arithmetic and zero-rate guard, with
  ``denom = (sqrt(s_t + 1e-15) + eps) / sqrt(1 - b2^t)`` (``eps`` scaled by
  ``sqrt(1 - b2^t)``: equal in float64 for the default ``eps=1e-15``), AMSGrad's maximum
  (``ams_bound``) taken during the non-centered steps too, ``weight_decouple=True`` with
  ``fixed_decay=False`` by default (``p *= 1 - lr wd``; ``fixed_decay=True`` is the
  authors'), ``steps_before_using_centered`` and ``maximize``. Complex params as pairs of reals.
* timm 1.0.31 ``LaProp``: this arithmetic (and this zero-rate guard) without ``centered``,
  ``amsgrad`` or ``maximize``, the decay ``p *= 1 - lr wd`` (so ``weight_decay = wd / lr``
  gives the authors' decay under a constant rate), ``caution`` and
  ``corrected_weight_decay`` off. It keeps ``1 - b2^t`` in a tensor of the default dtype
  (float32: 3.6e-7 from this reference in a float64 run); the adapter steps it with the
  params' dtype as the default. Complex params as pairs of reals.
* optax 0.2.8 has no LaProp.

Complex params: the authors' code does not take them; the rule is defined by ``g``, ``|g|^2``
and ``|gbar|^2`` (``v`` real, ``m`` and ``gbar`` complex).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from variant_spec import MASK, Variant, lr_schedule

from references.common import (
    Leaves,
    PerLeafReference,
    ScalarOrSchedule,
    _abs_sq,
    _real_zeros,
    _zeros,
    adapter_options,
    as_schedule,
    import_reference_package,
    param_groups,
    timm_optimizer_module,
)


@dataclass
class RefLaprop(PerLeafReference):
    """Float64 reference for LaProp, the authors' ``LaProp.step`` (``learning_rate=None``: the
    bare direction ``m_t / a_t`` with a unit rate).

    Fields: ``b1``, ``b2``, ``eps``, ``centered``, ``amsgrad``, ``steps_before_using_centered``
    as the authors' ``betas``, ``eps``, ``centered``, ``amsgrad`` and attribute;
    ``weight_decay`` (the authors' decay of the stepped params, not times the rate), ``mask``
    (per leaf, False: no decay), ``maximize`` (negate ``g`` first).
    """

    learning_rate: ScalarOrSchedule | None = 4e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-15
    centered: bool = False
    amsgrad: bool = False
    steps_before_using_centered: int = 10
    weight_decay: ScalarOrSchedule = 0.0
    m: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)
    gbar: Leaves = field(default_factory=list)
    s_max: Leaves = field(default_factory=list)
    lr_avg: float = 0.0
    bias_correction2: float = 0.0

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero state for ``params`` (a flat list of leaves)."""
        self.count, self.lr_avg, self.bias_correction2 = 0, 0.0, 0.0
        self.m, self.gbar = _zeros(params), _zeros(params)
        self.v, self.s_max = _real_zeros(params), _real_zeros(params)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k, t = self.count, self.count + 1
        b1, b2 = self.b1, self.b2
        lr = 1.0 if self.learning_rate is None else as_schedule(self.learning_rate)(k)
        wd = as_schedule(self.weight_decay)(k)
        self.lr_avg = self.lr_avg * b1 + (1 - b1) * lr
        self.bias_correction2 = self.bias_correction2 * b2 + (1 - b2)
        step_size = lr / self.lr_avg if self.lr_avg != 0 else 0.0
        warming = self.centered and t <= self.steps_before_using_centered
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            s = self.v[i]
            if self.centered:
                self.gbar[i] = b2 * self.gbar[i] + (1 - b2) * g
                if not warming:
                    s = s - _abs_sq(self.gbar[i])
            if self.amsgrad and not warming:
                self.s_max[i] = np.maximum(self.s_max[i], s)
                s = self.s_max[i]
            denom = np.sqrt(s / self.bias_correction2) + self.eps
            self.m[i] = b1 * self.m[i] + (1 - b1) * lr * (g / denom)
            if self.learning_rate is None:
                out.append(self.m[i] / self.lr_avg)
                continue
            stepped = p - step_size * self.m[i]
            if decayed and wd:
                stepped = stepped - wd * stepped
            out.append(stepped - p)
        self.count += 1
        return out


def _default_eps_only(opts: dict, package: str) -> None:
    """Refuses an ``eps`` whose scaling by ``sqrt(1 - b2^t)`` shows in float64."""
    if opts.get("eps", 1e-15) > 1e-12:
        raise NotImplementedError(f"{package} scales eps by sqrt(1 - b2^t)")


def _no_warm_up_maximum(opts: dict, package: str) -> None:
    """Refuses AMSGrad during centered warm-up steps (the package takes the maximum there)."""
    if opts.get("centered") and opts.get("amsgrad") and opts.get("steps_before_using_centered"):
        raise NotImplementedError(f"{package} takes AMSGrad's maximum in the non-centered steps")


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``LaProp`` for the options of :class:`RefLaprop`
    (``weight_decouple=True``, ``fixed_decay=True``: the authors' decay; ``foreach=False``).

    ``mask`` becomes two param groups. Not expressible: ``eps`` above 1e-12 (scaled by
    ``sqrt(1 - b2^t)``), ``amsgrad`` with centered warm-up steps, complex params, schedules.
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = adapter_options(
        params, options, "pytorch_optimizer", refuse=(_default_eps_only, _no_warm_up_maximum)
    )
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "centered": opts.pop("centered", False),
        "steps_before_using_centered": opts.pop("steps_before_using_centered", 10),
        "weight_decay": wd,
        "weight_decouple": True,
        "fixed_decay": True,
        "ams_bound": opts.pop("amsgrad", False),
        "eps": float(opts.pop("eps", 1e-15)),
        "maximize": opts.pop("maximize", False),
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return pytorch_optimizer.LaProp(param_groups(params, mask, wd), **kwargs)


def timm_optimizer(params: list, **options):
    """timm's ``LaProp`` for the options of :class:`RefLaprop`: the authors' decay as
    ``weight_decay = wd / lr`` (timm scales it by the rate); ``caution=False``,
    ``corrected_weight_decay=False``, ``foreach=False``.

    ``mask`` becomes two param groups. Not expressible: ``centered``, ``amsgrad``,
    ``maximize``, complex params, schedules.
    """
    module = timm_optimizer_module("laprop")
    refuse = ("centered", "amsgrad", "maximize")
    opts, lr, wd = adapter_options(params, options, "timm", refuse=refuse)
    opts.pop("steps_before_using_centered", None)  # no effect without centered
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "eps": float(opts.pop("eps", 1e-15)),
        "weight_decay": wd / lr,
        "caution": False,
        "corrected_weight_decay": False,
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    torch = import_reference_package("torch")

    class LaProp(module.LaProp):
        """timm's ``LaProp`` whose scalar state (``1 - b2^t``) has the params' dtype: timm
        makes it in the default dtype, float32, 3.6e-7 from the reference in float64."""

        def step(self, closure=None):
            default = torch.get_default_dtype()
            torch.set_default_dtype(params[0].dtype)
            try:
                return super().step(closure)
            finally:
                torch.set_default_dtype(default)

    return LaProp(param_groups(params, mask, wd), **kwargs)


def _wd_schedule(k):
    """A decay of the stepped params that changes every step (the authors' decay is not
    scaled by the rate: ``variant_spec.wd_schedule``'s 5% a step would dominate the problem)."""
    return 1e-3 / (1.0 + 0.01 * k)


# How the tests run this module's optimizer (tests/variants.py collects it by registry name).
TESTS = (
    Variant(
        name="laprop",
        reference_class=RefLaprop,
        learning_rate=1e-2,
        zero1_layout=("explicit", "data4_model2"),
        zero1_float64_single_device=True,
        step_proportional_to_rate=False,
        cases={
            "default": {},
            # b2 < b1: LaProp's point (Adam diverges there).
            "hyperparams": {"b1": 0.95, "b2": 0.9, "eps": 1e-8},
            "centered": {"centered": True},
            "amsgrad": {"amsgrad": True},
            "centered_amsgrad": {
                "centered": True,
                "amsgrad": True,
                "steps_before_using_centered": 5,
            },  # fmt: skip
            "centered_amsgrad_at_once": {
                "centered": True,
                "amsgrad": True,
                "steps_before_using_centered": 0,
            },  # fmt: skip
            "decay_mask": {"weight_decay": 1e-3, "mask": MASK},
            "schedules": {"learning_rate": lr_schedule, "weight_decay": _wd_schedule},
            "maximize": {"maximize": True},
        },
        packages={
            "pytorch-optimizer": pytorch_optimizer_optimizer,
            "timm": timm_optimizer,
        },
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-15},
        bad=(
            ("b2", 1.0, "[0, 1)"),
            ("eps", -1.0, ">= 0"),
            ("weight_decay", -0.1, ">= 0"),
            ("steps_before_using_centered", -1, ">= 0"),
        ),
    ),
)
