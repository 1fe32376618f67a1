"""Stable-SPAM (Huang, Zhu, Jin, Liu, Wang and Liu, 2025, "Stable-SPAM: How to Train in 4-Bit
More Stably than 16-Bit Adam", arXiv:2502.17055, Algorithm 1).

Written from the paper and the authors' code, TianjinYellow/StableSPAM
``galore_torch/stablespam.py`` (class ``StableSPAM``). The optimizer counts ``total_steps``
(1 at the first update); each param keeps ``step`` (set to 1 at each reset), ``exp_avg``,
``exp_avg_sq`` and the scalars ``m_norm_t``, ``v_norm_t``, ``m_max_t``. Per update::

    total_steps += 1
    scale = CosineDecay(1.0, T, eta_min).get_dr(total_steps)  if total_T else 1
          = eta_min + (1 - eta_min) (1 + cos(pi total_steps / (T + 1))) / 2
    per param:
      p *= 1 - lr wd
      step += 1
      m_max = theta m_max + (1 - theta) max|g|;  m_max_hat = m_max / (1 - theta^step)
      g = g / max|g| * m_max_hat  where |g| > m_max_hat
      m_norm = gamma1 scale m_norm + (1 - gamma1 scale) |g|
      v_norm = gamma2 v_norm + (1 - gamma2) |g|^2
      c = (m_norm / (1 - (gamma1 scale)^step)) / (sqrt(v_norm / (1 - gamma2^step)) + eps)
      if |g| > 0:  g = g / |g| * c
      if update_proj_gap != 0 and total_steps % update_proj_gap == 0:
          exp_avg = exp_avg_sq = 0;  step = 1
      b1' = b1 scale
      exp_avg = b1' exp_avg + (1 - b1') g;  exp_avg_sq = b2 exp_avg_sq + (1 - b2) g^2
      (amsgrad: max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq), never reset, in its place)
      p -= lr / (1 - b1'^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - b2^step) + eps)

with ``theta`` their ``gamma3`` and ``|g|`` the Frobenius norm of the param's gradient.
``CosineDecay.get_dr(t)`` steps a ``CosineAnnealingLR(T_max = T + 1, eta_min)`` with the epoch
``t`` (its closed form, with no clamp: it rises again after ``T + 1``). ``gamma1 = -1`` means
``b1``. The authors' defaults: ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``,
``weight_decay=0``, ``amsgrad=False``, ``gamma1=0.7``, ``gamma2=0.9``, ``gamma3=0.999``,
``total_T=None``, ``eta_min=0.5``, ``update_proj_gap=1000``. ``learning_rate=None`` gives the
bare direction (unit rate; decay ``u + wd p``). Nothing of the authors' dense update is left
out (their GaLore ``rank`` groups are commented out of their ``StableSPAM``).

``restart_norm_count=False`` counts ``total_steps`` in the bias corrections of ``m_max``,
``m_norm`` and ``v_norm`` (pytorch-optimizer's port) instead of the param's ``step``.

Where the packages differ:

* pytorch-optimizer 4.1.0 ``StableSPAM``: its ``CosineDecay(1.0, t_max, eta_min)`` is stepped
  one epoch ahead from a scheduler that starts at 1 (``eta + (1 - eta)(1 + cos(pi (t + 1) /
  (T + 1))) / (1 + cos(pi / (T + 1)))``) and clamped to ``eta_min`` from ``t = T``: the
  adapter pins it to the authors'. Its bias corrections of ``m_max``, ``m_norm`` and
  ``v_norm`` count ``total_step`` (``restart_norm_count=False``; the adapter refuses the
  authors' count where a reset happens). A tensor whose clipped gradient has norm 0 is
  skipped, no moment update and no step (not in the tests' data), where the authors' code
  (and adam_jax) update the averages and step with the unscaled zero gradient. No
  ``amsgrad``, ``update_proj_gap >= 1``, no complex params.
* optax 0.2.8 and timm 1.0.31 have no Stable-SPAM.

Complex params: the authors' code does not take them; ``max|g|`` and the norm are of
``|g|``, the clipped entries ``g / max|g| * m_max_hat``, ``g^2`` is ``|g|^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from variant_spec import MASK, SCHEDULED, Variant

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
)

STEPS = 300  # the table's steps (Variant.steps)


def authors_cosine(t: int, total_t: int, eta_min: float) -> float:
    """The authors' ``CosineDecay(1.0, T, eta_min).get_dr(t)``: the closed form of
    ``CosineAnnealingLR(T_max=T + 1)`` at epoch ``t``, not clamped."""
    return eta_min + (1 - eta_min) * (1 + math.cos(math.pi * t / (total_t + 1))) / 2


@dataclass
class RefStableSpam(PerLeafReference):
    """Float64 reference for Stable-SPAM, the authors' ``StableSPAM.step``
    (``learning_rate=None``: the bare direction).

    Fields: ``b1``, ``b2``, ``eps``, ``gamma1``, ``gamma2``, ``gamma3`` (their ``theta``),
    ``total_t`` (``total_T``), ``eta_min``, ``update_proj_gap``, ``amsgrad`` as the authors';
    ``restart_norm_count`` (False: pytorch-optimizer's count); ``weight_decay`` (times the
    rate), ``mask`` (per leaf, False: no decay), ``maximize`` (negate ``g`` first).
    ``clipped`` counts the clipped entries, ``resets`` the resets.
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    gamma1: float = 0.7
    gamma2: float = 0.9
    gamma3: float = 0.999
    total_t: int | None = None
    eta_min: float = 0.5
    update_proj_gap: int = 1000
    amsgrad: bool = False
    restart_norm_count: bool = True
    weight_decay: ScalarOrSchedule = 0.0
    m: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)
    v_max: Leaves = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    m_norm: list[float] = field(default_factory=list)
    v_norm: list[float] = field(default_factory=list)
    m_max: list[float] = field(default_factory=list)
    total_steps: int = 0
    clipped: int = 0
    resets: int = 0

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero state for ``params`` (a flat list of leaves)."""
        self.count, self.total_steps, self.clipped, self.resets = 0, 0, 0, 0
        self.m, self.v, self.v_max = _zeros(params), _real_zeros(params), _real_zeros(params)
        n = len(params)
        self.steps, self.m_norm, self.v_norm, self.m_max = [0] * n, [0.0] * n, [0.0] * n, [0.0] * n

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k = self.count
        lr = 1.0 if self.learning_rate is None else as_schedule(self.learning_rate)(k)
        wd = as_schedule(self.weight_decay)(k)
        self.total_steps += 1
        total = self.total_steps
        scale = 1.0 if self.total_t is None else authors_cosine(total, self.total_t, self.eta_min)
        gamma1 = self.b1 if self.gamma1 == -1 else self.gamma1
        theta = self.gamma3
        reset = self.update_proj_gap != 0 and total % self.update_proj_gap == 0
        self.resets += reset
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            decay = wd if decayed else 0.0
            self.steps[i] += 1
            n = self.steps[i] if self.restart_norm_count else total
            size = np.abs(g)
            max_gradient = float(np.max(size))
            self.m_max[i] = theta * self.m_max[i] + (1 - theta) * max_gradient
            m_max_hat = self.m_max[i] / (1 - theta**n)
            spike = size > m_max_hat
            self.clipped += int(np.sum(spike))
            if np.any(spike):
                g = np.where(spike, g / max_gradient * m_max_hat, g)
            grad_norm = float(np.sqrt(np.sum(_abs_sq(g))))
            g1 = gamma1 * scale
            self.m_norm[i] = g1 * self.m_norm[i] + (1 - g1) * grad_norm
            self.v_norm[i] = self.gamma2 * self.v_norm[i] + (1 - self.gamma2) * grad_norm**2
            m_norm_hat = self.m_norm[i] / (1 - g1**n)
            v_norm_hat = self.v_norm[i] / (1 - self.gamma2**n)
            c_norm = m_norm_hat / (math.sqrt(v_norm_hat) + self.eps)
            if grad_norm > 0:
                g = g / grad_norm * c_norm
            if reset:
                self.m[i], self.v[i] = np.zeros_like(self.m[i]), np.zeros_like(self.v[i])
                self.steps[i] = 1
            step = self.steps[i]
            b1 = self.b1 * scale
            bias_correction1 = 1 - b1**step
            bias_correction2 = 1 - self.b2**step
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * _abs_sq(g)
            second = self.v[i]
            if self.amsgrad:
                self.v_max[i] = np.maximum(self.v_max[i], self.v[i])
                second = self.v_max[i]
            denom = np.sqrt(second) / math.sqrt(bias_correction2) + self.eps
            u = self.m[i] / denom / bias_correction1
            if self.learning_rate is None:
                out.append(u + decay * p)
                continue
            out.append(-lr * decay * p - lr * u)
        self.count += 1
        return out


def _package_limits(opts: dict, package: str) -> None:
    """Refuses what the package cannot express: ``amsgrad``, ``update_proj_gap=0``, and the
    authors' count of the bias corrections where a reset happens in the table's steps."""
    gap = opts.get("update_proj_gap", 1000)
    if opts.pop("amsgrad", False):
        raise NotImplementedError(f"{package} has no amsgrad")
    if gap == 0:
        raise NotImplementedError(f"{package} has no update_proj_gap=0 (no resets)")
    if opts.pop("restart_norm_count", True) and gap <= STEPS:
        raise NotImplementedError(
            f"{package} counts every step in the norm statistics' bias corrections "
            "(restart_norm_count=False)"
        )


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``StableSPAM`` for the options of :class:`RefStableSpam`, its
    cosine pinned to the authors' closed form (``foreach=False``).

    ``mask`` becomes two param groups. Not expressible: ``amsgrad``, ``update_proj_gap=0``,
    the authors' ``restart_norm_count`` with resets, complex params, schedules.
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = adapter_options(
        params, options, "pytorch_optimizer", complex_params="has no complex params",
        refuse=(_package_limits,),
    )  # fmt: skip
    mask = opts.pop("mask", None)
    total_t = opts.pop("total_t", None)
    eta_min = opts.pop("eta_min", 0.5)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "gamma1": opts.pop("gamma1", 0.7),
        "gamma2": opts.pop("gamma2", 0.9),
        "theta": opts.pop("gamma3", 0.999),
        "t_max": total_t,
        "eta_min": eta_min,
        "weight_decay": wd,
        "update_proj_gap": opts.pop("update_proj_gap", 1000),
        "eps": float(opts.pop("eps", 1e-8)),
        "maximize": opts.pop("maximize", False),
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    optimizer = pytorch_optimizer.StableSPAM(param_groups(params, mask, wd), **kwargs)
    if total_t is not None:

        class AuthorsCosine:
            """The authors' ``CosineDecay(1.0, T, eta_min)`` under the package's method name."""

            def get_death_rate(self, t: int) -> float:
                return authors_cosine(t, total_t, eta_min)

        optimizer.warmup = AuthorsCosine()
    return optimizer


# How the tests run this module's optimizer (tests/variants.py collects it by registry name).
# On the table's problem the running maximum clips the largest entries of many steps (fewer
# after resets, whose restarted count inflates the bias-corrected maximum; tests/
# test_stable_spam.py checks that every case clips); the reset cases reset every 7 to 60 steps.
TESTS = (
    Variant(
        name="stable_spam",
        reference_class=RefStableSpam,
        learning_rate=1e-2,
        zero1_layout=("explicit", "data8"),
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "gamma2": 0.99, "gamma3": 0.9},
            "gamma1_b1": {"gamma1": -1.0},
            "cosine": {"total_t": 200, "eta_min": 0.3},
            "reset": {"update_proj_gap": 60},
            "reset_often_cosine": {"update_proj_gap": 7, "total_t": 100},
            "reset_counting_every_step": {"update_proj_gap": 25, "restart_norm_count": False},
            "no_reset": {"update_proj_gap": 0},
            "amsgrad": {"amsgrad": True, "update_proj_gap": 40},
            "decay_mask": {"weight_decay": 0.1, "mask": MASK},
            "schedules": {**SCHEDULED, "update_proj_gap": 50},
            "maximize": {"maximize": True},
        },
        packages={"pytorch-optimizer": pytorch_optimizer_optimizer},
        per_tensor=True,
        hyperparams={
            "learning_rate": 1e-2,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "gamma1": 0.7,
            "gamma2": 0.9,
            "gamma3": 0.999,
            "total_t": 10,
            "eta_min": 0.5,
            "update_proj_gap": 3,
        },
        bad=(
            ("b1", 1.0, "[0, 1)"),
            ("eps", -1.0, ">= 0"),
            ("gamma1", 1.5, "[0, 1)"),
            ("gamma2", 1.0, "[0, 1)"),
            ("gamma3", -0.1, "[0, 1)"),
            ("total_t", 0, ">= 1"),
            ("eta_min", 1.5, "[0, 1]"),
            ("update_proj_gap", -1, ">= 0"),
            ("weight_decay", -0.1, ">= 0"),
        ),
    ),
)
