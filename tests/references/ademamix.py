"""AdEMAMix (Pagliardini et al., 2024, "The AdEMAMix Optimizer: Better, Faster, Older",
arXiv:2409.03137) and Simplified AdEMAMix (Morwani et al., 2025, "Connections between
Schedule-Free Optimizers, AdEMAMix, and Accelerated SGD Variants", arXiv:2502.02431).

AdEMAMix is written from the paper (Algorithm 1) and the authors' PyTorch code,
apple/ml-ademamix ``pytorch/ademamix.py`` (class ``AdEMAMix``, ``linear_warmup_scheduler``,
``linear_hl_warmup_scheduler``). At the ``t``-th call (``t = k + 1 = 1, 2, ...``)::

    m1 = b1 m1 + (1 - b1) g                       (fast EMA; b1 = 0: m1 = g)
    m2 = b3(t) m2 + (1 - b3(t)) g                 (slow EMA, not bias-corrected)
    v  = b2 v + (1 - b2) |g|^2
    u  = (m1 / (1 - b1^t) + alpha(t) m2) / (sqrt(v / (1 - b2^t) + eps_root) + eps)
    p <- p - lr(k) (u + wd(k) p)                  (decoupled decay, decayed leaves)

(the authors write the denominator ``sqrt(v) / sqrt(1 - b2^t) + eps``; ``eps_root`` is
optax's, inside the square root of the bias-corrected ``v``, absent from the authors' code).
The warm-ups are the authors' schedulers at the 1-based ``t``, as their PyTorch code calls
them (``state['step']`` after its increment), with ``beta_start = b1``::

    alpha(t) = (t / T_a) alpha                              for t < T_a, else alpha
    f(b) = ln(1/2) / ln(b + 1e-8) - 1,    f_inv(x) = (1/2)^(1 / (x + 1))
    b3(t) = f_inv((1 - a) f(b1) + a f(b3)), a = t / T_b3    for t < T_b3, else b3

(``f`` is the half-life of an EMA; the warm-up is linear in half-life, starting at ``b1``).
``alpha`` and ``b3`` may also be callables of the 0-based ``k = t - 1`` (optax's convention:
``optax.contrib.scale_by_ademamix`` evaluates them at ``count_m2`` before its increment).
The authors' optax version (``optax/ademamix.py``) also evaluates its ``alpha_scheduler`` /
``beta3_scheduler`` at that 0-based count, one step earlier than their PyTorch code (its
``alpha_scheduler(alpha, 0, T)`` gives ``k / T alpha`` where the PyTorch code gives
``(k + 1) / T alpha``; with ``T_a = 100``, ``T_b3 = 150`` the trajectories differ by 0.4 to
0.7 relative), its ``f`` has no ``1e-8``, and its schedules come out in float32 (``is_warmup``
is cast to float32), also under ``jax_enable_x64``. To reproduce the PyTorch schedule with a
callable, pass ``alpha=lambda k: pytorch_schedule(k + 1)``.

Where the ports differ from the authors' PyTorch code:

* ``optax.contrib.ademamix`` (optax 0.2.8): the same rule with the schedules evaluated at the
  0-based count (above); no warm-up helpers. Complex params: ``nu`` is ``|g|^2``, as here.
* pytorch-optimizer ``AdEMAMix`` (4.1.0): one warm-up length ``t_alpha_beta3`` for both
  ``alpha`` and ``b3``, at the same 1-based step as the authors'; its ``b3`` warm-up is the
  closed form ``exp(ln b1 ln b3 / ((1 - a) ln b3 + a ln b1))`` capped at ``b3``, which is the
  authors' ``f_inv(...)`` without the ``1e-8`` inside ``f`` (with ``b1 = 0.9``, ``b3 =
  0.9999``, ``T = 100``: ``b3(1)`` differs by 8e-7, the trajectory by 2e-5 relative; without
  the ``1e-8`` the two agree to 1e-15: the adapter refuses warm-ups). Its
  default ``weight_decouple=False`` is L2 decay added to the gradient; ``True`` (``p *= 1 - lr
  wd`` before the step) is the authors'. No complex params (``NoComplexParameterError``).

Simplified AdEMAMix is written from the paper and the authors' code,
DepenM/Simplified-AdEMAMix ``simplified_AdEMAMix.py`` (class ``SimAdEMAMix``, HEAD 3a6bf23;
the two earlier commits index ``betas[2]`` and fail with two betas)::

    m = b1 m + g                                  (an accumulator, "theory style", not an EMA)
    v = b2 v + (1 - b2) |g|^2
    u = (m + alpha(k) g) / (sqrt(v / (1 - b2^t) + eps_root) + eps)
    p <- p - lr(k) (u + wd(k) p)

The authors write it ``(alpha g + m) / (sqrt(v) + eps sqrt(s)) * sqrt(s)`` with
``s = b2 s + (1 - b2)`` (``= 1 - b2^t``). Their defaults ``bias_correction1=False``,
``bias_correction2=True`` are the rule above; their ``beta1_warmup`` / ``min_beta1`` (a
half-life warm-up of ``b1``) and ``bias_correction1=True`` (dividing by ``sum b1^i``) are not
modelled. ``alpha`` may be a callable of the 0-based ``k`` (optax's, evaluated at ``t`` before
its increment; the authors' is a constant).

* ``optax.contrib.simplified_ademamix`` (optax 0.2.8): the same rule, but its second moment is
  ``lerp(b2, g * g, n)``, i.e. ``g^2`` also for complex ``g`` (no complex support).
* pytorch-optimizer ``SimplifiedAdEMAMix`` (4.1.0) is not the authors' rule: its momentum is
  an EMA, ``m' = b1 m' + (1 - b1) g = (1 - b1) m``, and it DIVIDES by ``sqrt(1 - b2^t)`` where
  the authors multiply::

      u' = (m' + alpha' g) / (sqrt(v) + eps sqrt(1 - b2^t)) / sqrt(1 - b2^t)

  so ``u' = (1 - b1) / (1 - b2^t) * u`` for ``alpha' = (1 - b1) alpha`` (20x smaller at t = 1
  with the defaults 0.99 / 0.95, then 100x). The adapter expresses the authors' rule by
  rescaling its per-step ``lr`` (by ``(1 - b2^t) / (1 - b1)``), ``alpha`` and
  ``weight_decay`` through step hooks. No complex params.

Complex params: the authors' PyTorch codes form ``g * g`` (a complex "second moment" and a
complex square root: wrong, silently); the authors' optax AdEMAMix and optax's use ``|g|^2``.
Here both variants are defined for complex leaves with a real ``v = |g|^2`` (every other
operation is linear in ``g``), as ``RefAdam``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from variant_spec import DECAY, Variant

from references.common import (
    AdamMomentsReference,
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
)


def linear_warmup(step: int, end: float, start: float = 0.0, warmup: int = 1) -> float:
    """The authors' ``linear_warmup_scheduler`` (``step`` is 1-based)."""
    if step < warmup:
        a = step / float(warmup)
        return (1.0 - a) * start + a * end
    return end


def linear_half_life_warmup(step: int, end: float, start: float = 0.0, warmup: int = 1) -> float:
    """The authors' ``linear_hl_warmup_scheduler`` (``step`` is 1-based), with their
    ``eps=1e-8`` inside ``f``: linear in the half-life ``f(b) = ln(1/2) / ln(b + 1e-8) - 1``."""

    def f(beta: float, eps: float = 1e-8) -> float:
        return math.log(0.5) / math.log(beta + eps) - 1

    def f_inv(t: float) -> float:
        return math.pow(0.5, 1 / (t + 1))

    if step < warmup:
        a = step / float(warmup)
        return f_inv((1.0 - a) * f(start) + a * f(end))
    return end


@dataclass
class RefAdemamix(PerLeafReference):
    """Float64 reference for AdEMAMix in the authors' arithmetic (``learning_rate=None``: the
    bare direction ``u``).

    ``alpha_warmup_steps`` / ``b3_warmup_steps`` (``T_a``, ``T_b3`` >= 1, or None) are the
    authors' warm-ups at the 1-based step; ``alpha`` / ``b3`` given as callables are schedules
    of the 0-based step instead (not combined with a warm-up). ``learning_rate`` and
    ``weight_decay`` schedules get the 0-based step; decay is decoupled, scaled by the learning
    rate and applied at the params before the step (the authors' ``update.add_(p, alpha=wd)``).
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    b3: ScalarOrSchedule = 0.9999
    alpha: ScalarOrSchedule = 5.0
    eps: float = 1e-8
    eps_root: float = 0.0
    weight_decay: ScalarOrSchedule = 0.0
    alpha_warmup_steps: int | None = None
    b3_warmup_steps: int | None = None
    m1: Leaves = field(default_factory=list)
    m2: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)

    def __post_init__(self) -> None:
        if callable(self.alpha) and self.alpha_warmup_steps is not None:
            raise ValueError("alpha is either a schedule or warmed up, not both")
        if callable(self.b3) and self.b3_warmup_steps is not None:
            raise ValueError("b3 is either a schedule or warmed up, not both")

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero moments for ``params``."""
        self.count = 0
        self.m1, self.m2, self.v = _zeros(params), _zeros(params), _real_zeros(params)

    def alpha_at(self, k: int) -> float:
        """``alpha`` of the ``k``-th update (0-based)."""
        if callable(self.alpha):
            return float(self.alpha(k))
        if self.alpha_warmup_steps is None:
            return float(self.alpha)
        return linear_warmup(k + 1, float(self.alpha), 0.0, self.alpha_warmup_steps)

    def b3_at(self, k: int) -> float:
        """``b3`` of the ``k``-th update (0-based)."""
        if callable(self.b3):
            return float(self.b3(k))
        if self.b3_warmup_steps is None:
            return float(self.b3)
        return linear_half_life_warmup(k + 1, float(self.b3), self.b1, self.b3_warmup_steps)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates."""
        k, t = self.count, self.count + 1
        b1, b2 = self.b1, self.b2
        alpha, b3 = self.alpha_at(k), self.b3_at(k)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.m1[i] = b1 * self.m1[i] + (1 - b1) * g
            self.m2[i] = b3 * self.m2[i] + (1 - b3) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            denom = np.sqrt(self.v[i] / bc2 + self.eps_root) + self.eps
            u = (self.m1[i] / bc1 + alpha * self.m2[i]) / denom
            out.append(self.decay_and_step(u, p, k, decayed))
        self.count += 1
        return out


@dataclass
class RefSimplifiedAdemamix(AdamMomentsReference):
    """Float64 reference for Simplified AdEMAMix in the authors' arithmetic (their defaults
    ``bias_correction1=False``, ``bias_correction2=True``, no ``beta1_warmup``;
    ``learning_rate=None``: the bare direction ``u``). ``learning_rate`` defaults to the
    authors' 1e-4; schedules (and a callable ``alpha``) get the 0-based step.
    """

    learning_rate: ScalarOrSchedule | None = 1e-4
    b1: float = 0.99
    b2: float = 0.95
    alpha: ScalarOrSchedule = 0.0
    eps: float = 1e-8
    eps_root: float = 0.0
    weight_decay: ScalarOrSchedule = 0.0

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates."""
        k, t = self.count, self.count + 1
        b1, b2 = self.b1, self.b2
        alpha = as_schedule(self.alpha)(k)
        bc2 = 1 - b2**t
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.m[i] = b1 * self.m[i] + g
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            denom = np.sqrt(self.v[i] / bc2 + self.eps_root) + self.eps
            u = (self.m[i] + alpha * g) / denom
            out.append(self.decay_and_step(u, p, k, decayed))
        self.count += 1
        return out


# What both adapters refuse, besides schedules (see reference.adapter_options).
_options = functools.partial(
    adapter_options,
    package="pytorch_optimizer",
    complex_params="has no complex params for AdEMAMix",
    refuse=("eps_root",),
)


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``AdEMAMix`` for the options of :class:`RefAdemamix`
    (``weight_decouple=True``, ``t_alpha_beta3=None``).

    Not expressible: warm-ups (its ``t_alpha_beta3`` warms ``alpha`` and ``b3`` up together,
    and its ``b3`` warm-up lacks the authors' ``1e-8`` inside ``f``: ``b3(1)`` differs by
    8e-7 with ``b1 = 0.9``, ``b3 = 0.9999``, ``T = 100``, the trajectory by 2e-5 relative),
    callable ``alpha`` / ``b3``, ``eps_root``, complex params, schedules (use ``run_torch``'s
    ``lr_lambda`` for the learning rate).
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = _options(params, options, learning_rate=1e-3)
    alpha, b3 = opts.pop("alpha", 5.0), opts.pop("b3", 0.9999)
    if callable(alpha) or callable(b3):
        raise NotImplementedError("pytorch_optimizer has no alpha / b3 schedules")
    warmups = opts.pop("alpha_warmup_steps", None), opts.pop("b3_warmup_steps", None)
    if warmups != (None, None):
        raise NotImplementedError(
            "pytorch_optimizer warms alpha and b3 up together, and its b3 warm-up omits the "
            "authors' 1e-8 inside f"
        )
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999), b3),
        "weight_decay": wd,
        "weight_decouple": True,
        "alpha": alpha,
        "t_alpha_beta3": None,
        "eps": opts.pop("eps", 1e-8),
        "maximize": opts.pop("maximize", False),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return pytorch_optimizer.AdEMAMix(param_groups(params, mask, wd), **kwargs)


def pytorch_optimizer_simplified_optimizer(params: list, **options):
    """pytorch-optimizer's ``SimplifiedAdEMAMix`` made to compute the authors' rule
    (:class:`RefSimplifiedAdemamix`) through its per-step group values: before the ``t``-th
    step a hook multiplies each group's ``lr`` by ``(1 - b2^t) / (1 - b1)`` and its
    ``weight_decay`` by ``(1 - b1) / (1 - b2^t)`` and sets its ``alpha`` to ``(1 - b1)
    alpha(t - 1)`` (its EMA momentum is ``(1 - b1)`` times the authors' accumulator, and it
    divides by ``sqrt(1 - b2^t)`` where they multiply); a hook after the step puts ``lr`` and
    ``weight_decay`` back, so ``LambdaLR`` (``run_torch``'s ``lr_lambda``) keeps working.
    ``foreach=False``: its foreach path (the default for real params) holds ``sqrt(1 - b2^t)``
    in a float32 tensor, which puts float64 runs 1e-9 (relative) off.

    Supported: every option of :class:`RefSimplifiedAdemamix` but ``eps_root``, complex params
    (``NoComplexParameterError``), ``learning_rate=None`` and schedules of the learning rate
    (use ``lr_lambda``) or of the weight decay; a callable ``alpha`` is supported.
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = _options(params, options, learning_rate=1e-4)
    b1, b2 = opts.pop("b1", 0.99), opts.pop("b2", 0.95)
    alpha = as_schedule(opts.pop("alpha", 0.0))
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (b1, b2),
        "weight_decay": wd,
        "weight_decouple": True,
        "fixed_decay": False,
        "alpha": 0.0,
        "beta1_warmup": None,
        "eps": opts.pop("eps", 1e-8),
        "maximize": opts.pop("maximize", False),
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    optimizer = pytorch_optimizer.SimplifiedAdEMAMix(param_groups(params, mask, wd), **kwargs)
    calls = [0]
    saved: list[tuple[float, float]] = []

    def before(opt, args, kwargs) -> None:
        del args, kwargs
        k = calls[0]
        bc2 = 1 - b2 ** (k + 1)
        saved[:] = [(group["lr"], group["weight_decay"]) for group in opt.param_groups]
        for group in opt.param_groups:
            group["lr"] = group["lr"] * bc2 / (1 - b1)
            group["weight_decay"] = group["weight_decay"] * (1 - b1) / bc2
            group["alpha"] = alpha(k) * (1 - b1)

    def after(opt, args, kwargs) -> None:
        del args, kwargs
        for group, (group_lr, group_wd) in zip(opt.param_groups, saved, strict=True):
            group["lr"], group["weight_decay"] = group_lr, group_wd
        calls[0] += 1

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="ademamix",
        learning_rate=1e-2,
        zero1_layout=("auto", "data4_model2"),
        reference_class=RefAdemamix,
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
        optax_cases=("default", "hyperparams", "schedules", "b1_zero", "eps_root", "decay_mask"),
        packages={"pytorch-optimizer": pytorch_optimizer_optimizer},
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "b3": 0.9999, "alpha": 5.0},
        bad=(("b3", 1.5, "[0, 1)"), ("alpha", -1.0, ">= 0"), ("b3_warmup_steps", 0, ">= 1")),
    ),
    Variant(
        name="simplified_ademamix",
        learning_rate=1e-3,
        zero1_layout=("explicit", "data8"),
        reference_class=RefSimplifiedAdemamix,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.9, "b2": 0.99, "alpha": 2.0, "eps": 1e-3},
            "alpha_schedule": {"alpha": lambda k: 3.0 * (1 - 0.99**k)},
            "eps_root": {"eps_root": 1e-6},
            "decay_mask": DECAY,
            "maximize": {"maximize": True},
        },
        optax_cases=("default", "hyperparams", "alpha_schedule", "eps_root", "decay_mask"),
        packages={"pytorch-optimizer": pytorch_optimizer_simplified_optimizer},
        hyperparams={"learning_rate": 1e-3, "b1": 0.99, "b2": 0.95, "alpha": 1.0},
        bad=(("b1", -0.1, "[0, 1)"), ("alpha", -2.0, ">= 0")),
    ),
)
