"""Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled", arXiv:2405.15682).

Written from the authors' code, facebookresearch/schedule_free: ``AdamWScheduleFree``
(``schedulefree/adamw_schedulefree.py``, the recommended form), ``AdamWScheduleFreePaper``
(``adamw_schedulefree_paper.py``, the paper's Algorithm 1) and
``AdamWScheduleFreeReference`` (``adamw_schedulefree_reference.py``, the same rule as the
recommended form, written with explicit ``x``, ``y``, ``z``). Three sequences::

    y_t = (1 - b1) z_t + b1 x_t             gradient-evaluation point (the params in training)
    z_{t+1} = z_t - lr_t * (g_t / (sqrt(v_hat_t) + eps) + wd * y_t)     the base AdamW step
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}                        the evaluation point

with ``x_0 = y_0 = z_0`` = the initial params. Only ``y`` (the params) and ``z`` are stored;
the authors move ``y`` in place without forming ``x``::

    y <- lerp(y, z, c) + lr (b1 (1 - c) - 1) gn,     z <- z - lr gn

where ``gn`` is the normalized gradient plus the decay evaluated at the old ``y``. ``x`` is
recovered only by ``eval()`` as ``lerp(y, z, 1 - 1/b1)`` (= ``(y - (1 - b1) z) / b1``); the
optimizer's ``train()`` goes back with ``lerp(x, z, 1 - b1)``.

Not in the installed PyPI release ``schedulefree==1.4.1``: the GitHub HEAD (commit 70785b5)
adds ``inner_momentum`` (default 0, the 1.4.1 behaviour) to ``AdamWScheduleFree`` and
``AdamWScheduleFreeReference``: ``m <- mu m + (1 - mu) g`` and the numerator ``g`` replaced by
``m / (1 - mu^(k+1))``. It is not modelled here (the default 0 is the same rule as 1.4.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from variant_spec import DECAY, SCHEDULED, Variant

from references.common import (
    Leaves,
    PerLeafReference,
    ScalarOrSchedule,
    _abs_sq,
    _f64,
    _real_zeros,
    as_schedule,
    import_reference_package,
    param_groups,
)


@dataclass
class RefScheduleFreeAdamw(PerLeafReference):
    """Float64 reference for Schedule-Free AdamW, in the authors' arithmetic.

    The params held during training are ``y``; :meth:`update` returns the additive updates to
    ``y`` and :meth:`eval_params` returns ``x`` (what the authors' ``eval()`` writes into the
    params). At the ``k``-th update (``k = 0, 1, ...``; ``lr(k)`` is ``learning_rate``, a
    constant in the authors' code, here also a schedule as a ``LambdaLR`` on the package
    would set it)::

        sched = (k + 1) / warmup_steps if k < warmup_steps else 1
        lr    = lr(k) * sched                           (paper: * sqrt(1 - b2^(k+1)))
        lr_max = max(lr_max, lr)                        (lr_max starts at -1)
        weight = (k + 1)^r * lr_max^weight_lr_power
        weight_sum += weight
        c = weight / weight_sum                         (0 where weight_sum == 0)
        v  = b2 v + (1 - b2) |g|^2
        gn = g / (sqrt(v / (1 - b2^(k+1))) + eps)       (paper: g / (sqrt(v) + eps))
        gn = gn + wd(k) y                               (decayed leaves; decay at y)
        y  <- y + c (z - y) + lr (b1 (1 - c) - 1) gn    (lerp first, with the OLD z)
        z  <- z - lr gn

    ``maximize`` negates ``g`` first (the decay is unchanged; the authors have no maximize).

    ``paper=True`` is ``AdamWScheduleFreePaper`` (the paper's Algorithm 1 with
    ``gamma_t = lr * min(1, t/warmup) * sqrt(1 - b2^t)``). It differs from the default form in
    two places only: (1) the second moment is not bias-corrected, its missing
    ``sqrt(1 - b2^(k+1))`` goes into the learning rate instead, so the Adam direction is
    ``lr sqrt(bc2) g / (sqrt(v) + eps)`` versus the default's ``lr sqrt(bc2) g / (sqrt(v) +
    eps sqrt(bc2))`` (only the eps differs); (2) because that factor is part of ``lr``, it also
    scales the decay (``lr sqrt(bc2) wd y``), the ``y`` coefficient ``lr (b1 (1 - c) - 1)``, and
    ``lr_max``, hence the averaging weights ``c``: without warm-up the default weights are all
    equal (``c = 1/(k+1)``, uniform averaging), the paper's grow like ``1 - b2^(k+1)`` (an
    implicit ~1/(1-b2)-step warm-up of the averaging). The decay is evaluated at ``y`` in both
    (``AdamWScheduleFreeReference(decay_at_z=True)`` is the only form decaying at ``z``).

    Where ``optax.contrib.schedule_free_adamw`` (optax 0.2.8) differs:

    * Warm-up: its base AdamW (``scale_by_rms(b2, eps, eps_in_sqrt=False,
      bias_correction=True)``, ``add_decayed_weights``, ``scale_by_learning_rate``) reads the
      ``warmup_constant_schedule(0, lr, warmup_steps)`` at its own 0-based count, so the step
      of ``z`` (and ``y``, and the decay) uses ``k / warmup_steps`` (0 at the first update: the
      first update is ``c (z - y) = 0``, a no-op that still accumulates ``v``), one step behind
      the authors' ``(k + 1) / warmup_steps``; while the wrapper's ``max_lr`` and weights read the
      schedule at ``step_count = k + 1`` as the authors do. Without warm-up it matches the
      default form to rounding. Its ``warmup_steps=0`` is not "no warm-up": the schedule
      ``warmup_constant_schedule(0, lr, 0)`` is 0 at every count, so nothing moves (use
      ``warmup_steps=None``); the schedule is also evaluated at an int32 count, hence in
      float32 even under ``jax_enable_x64``.
    * No ``r``: ``weight = max_lr^weight_lr_power`` (the authors' ``(k + 1)^r`` is missing).
    * ``x`` is recovered as ``(y - (1 - b1) z) / b1`` (a division by ``b1``, both in the update
      and in ``schedule_free_eval_params``); the result is the same to rounding, not for
      ``b1 = 0``.
    * No ``mask`` argument, no ``paper`` form, no ``maximize``.

    Complex params: the authors' code does not handle them (``addcmul_(g, g)`` forms ``g^2``, a
    complex "second moment", and a complex square root); the rule above is well defined with
    ``|g|^2`` (a real ``v``, every other operation linear in ``g``, ``y`` and ``z``) and is what
    this reference computes for complex leaves.
    """

    learning_rate: ScalarOrSchedule = 0.0025
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: ScalarOrSchedule = 0.0  # added at y to the normalized gradient, times lr
    weight_lr_power: float = 2.0
    r: float = 0.0
    paper: bool = False  # True: AdamWScheduleFreePaper (the paper's Algorithm 1)
    lr_max: float = -1.0
    weight_sum: float = 0.0
    z: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)

    def init(self, params: Sequence[np.ndarray]) -> None:
        """``z`` = a copy of ``params`` (``x_0 = y_0 = z_0``), zero second moments."""
        self.count = 0
        self.lr_max = -1.0
        self.weight_sum = 0.0
        self.z = [_f64(p).copy() for p in params]
        self.v = _real_zeros(params)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step at ``y = params``; returns the updates to ``y``."""
        k = self.count
        b1, b2 = self.b1, self.b2
        sched = (k + 1) / self.warmup_steps if k < self.warmup_steps else 1.0
        bias_correction2 = 1 - b2 ** (k + 1)
        lr = as_schedule(self.learning_rate)(k) * sched
        if self.paper:
            lr = lr * math.sqrt(bias_correction2)
        self.lr_max = max(lr, self.lr_max)
        weight = ((k + 1) ** self.r) * (self.lr_max**self.weight_lr_power)
        self.weight_sum = self.weight_sum + weight
        ckp1 = weight / self.weight_sum if self.weight_sum != 0 else 0.0
        wd = as_schedule(self.weight_decay)(k)
        out = []
        for i, g, y, decayed in self.leaves(grads, params):
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            if self.paper:
                denom = np.sqrt(self.v[i]) + self.eps
            else:
                denom = np.sqrt(self.v[i] / bias_correction2) + self.eps
            gn = g / denom
            if wd and decayed:
                gn = gn + wd * y
            z = self.z[i]
            out.append(ckp1 * (z - y) + (lr * (b1 * (1 - ckp1) - 1)) * gn)
            self.z[i] = z - lr * gn
        self.count += 1
        return out

    def eval_params(self, params: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``x = lerp(y, z, 1 - 1/b1)`` for ``y = params`` (the authors' ``eval()``)."""
        if self.b1 == 0:
            raise ValueError("x cannot be recovered from y and z when b1 == 0 (then y == z)")
        w = 1 - 1 / self.b1
        return [_f64(y) + w * (z - _f64(y)) for y, z in zip(params, self.z, strict=True)]


def torch_optimizer(params: list, **options):
    """``schedulefree.AdamWScheduleFree`` (``paper=True``: ``AdamWScheduleFreePaper``) for
    the options of :class:`RefScheduleFreeAdamw`, already switched to train mode.

    ``mask`` becomes two param groups, the masked-out leaves with ``weight_decay=0`` (the
    package keeps ``k``, ``lr_max`` and ``weight_sum`` per group; every group is stepped at
    every ``step()``, so they stay equal). Not expressible: ``maximize`` and schedules of
    ``learning_rate`` / ``weight_decay`` (use ``run_torch``'s ``lr_lambda`` for the former).
    """
    schedulefree = import_reference_package("schedulefree")
    opts = dict(options)
    if opts.pop("maximize", False):
        raise NotImplementedError("schedulefree has no maximize")
    paper = opts.pop("paper", False)
    mask = opts.pop("mask", None)
    lr = opts.pop("learning_rate", 0.0025)
    wd = opts.pop("weight_decay", 0.0)
    if callable(lr):
        raise NotImplementedError("schedulefree has no learning-rate schedule (use lr_lambda)")
    if callable(wd):
        raise NotImplementedError("schedulefree has no weight-decay schedule")
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "eps": opts.pop("eps", 1e-8),
        "weight_decay": wd,
        "warmup_steps": opts.pop("warmup_steps", 0),
        "r": opts.pop("r", 0.0),
        "weight_lr_power": opts.pop("weight_lr_power", 2.0),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    cls = schedulefree.AdamWScheduleFreePaper if paper else schedulefree.AdamWScheduleFree
    optimizer = cls(param_groups(params, mask, wd), **kwargs)
    optimizer.train()
    return optimizer


# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="schedule_free_adamw",
        learning_rate=1e-2,
        zero1_layout=("explicit", "data8"),
        reference_class=RefScheduleFreeAdamw,
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
        optax_cases=("default", "hyperparams"),
        packages={"schedulefree": torch_optimizer},
        reference_options={"form": lambda form: ("paper", form == "paper")},
        storage_options=("nu_dtype",),  # z is the iterate, not a moment
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0},
        bad=(("b1", 0.0, "(0, 1)"), ("warmup_steps", -1, ">= 0"), ("form", "x", "recommended")),
    ),
)
