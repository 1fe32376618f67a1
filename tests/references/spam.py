"""SPAM (Huang, Zhu, Jin, Liu, Wang and Liu, ICLR 2025, "SPAM: Spike-Aware Adam with Momentum
Reset for Stable LLM Training", arXiv:2501.06842, Algorithm 1).

Written from the paper and the authors' code, TianjinYellow/SPAM-Optimizer
``galore_torch/SPAM.py`` (class ``AdamW``, exported as ``SPAM``), for params outside their
``density`` groups (dense Adam moments). The optimizer keeps ``total_step`` (0 at the start)
and ``current_step`` (``warmup_steps + 1`` at the start, 0 after each reset) and, per param,
``step`` (never reset). The ``k``-th update (``total_step = k``), ``lr = lr(k)``,
``wd = wd(k)``::

    scale = 1 - CosineDecay(0.99, W).get_dr(current_step)
          = 1 - 0.99 (1 + cos(pi c / (W + 1))) / 2  if c = current_step < W, else 1
    if (k + 1) % DeltaT == 0:  m = v = 0                                   (momentum reset)
    step += 1
    if threshold != 0 and k + 1 >= A and (k + 1) % DeltaT >= A:          (spike clipping)
        g = sign(g) sqrt(threshold v)  where g^2 > threshold v
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p <- p - lr scale sqrt(1 - b2^step) / (1 - b1^step) m / (sqrt(v) + eps)
    p <- p - lr wd p                                                     (the stepped p)
    total_step += 1;  current_step += 1
    if (total_step + 1) % DeltaT == 0:  current_step = 0                  (warm-up restarts)

with ``W = warmup_steps``, ``A = grad_accu_steps``. ``CosineDecay.get_dr(c)`` steps a
``CosineAnnealingLR(T_max = W + 1, eta_min = 0)`` with the epoch ``c`` (its closed form) unless
``c >= W``. ``correct_bias=False`` drops the factor ``sqrt(1 - b2^step) / (1 - b1^step)``.
The authors' defaults: ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-6``, ``weight_decay=0``,
``warmup_steps=150``, ``threshold=5000``, ``DeltaT=500``, ``grad_accu_steps=20``.
``learning_rate=None`` gives the bare direction (unit rate, no decay).

Left out: the ``density`` groups (random masks of the entries that keep moments, redrawn at
each reset). At ``density=1.0`` their arithmetic is this one, but the decay of such a group
is lost (``p.data[mask].add_(...)`` shrinks a copy).

Where the packages differ:

* pytorch-optimizer 4.1.0 ``SPAM``: this arithmetic, with the warm-up one step ahead: its
  ``CosineDecay.get_death_rate(c)`` sets the scheduler's ``last_epoch = c`` and steps it once
  more (``0.99 (1 + cos(pi (c + 1) / (W + 1))) / 2``). The adapter pins its warm-up to the
  authors'. Its ``density`` masks every matrix (all entries at 1.0: the same arithmetic, the
  decay kept). No complex params.
* optax 0.2.8 and timm 1.0.31 have no SPAM.

Complex params: the authors' code does not take them; ``sign(g)`` becomes ``g / |g|`` and
``g^2`` is ``|g|^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from reference import (
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
from variant_spec import MASK, Variant, lr_schedule, wd_schedule


def authors_death_rate(current_step: int, warmup_steps: int, death_rate: float = 0.99) -> float:
    """The authors' ``CosineDecay(death_rate, W).get_dr(c)``: the closed form of
    ``CosineAnnealingLR(T_max=W + 1)`` at epoch ``c``, 0 (``eta_min``) once ``c >= W``."""
    if current_step >= warmup_steps:
        return 0.0
    return death_rate * (1 + math.cos(math.pi * current_step / (warmup_steps + 1))) / 2


@dataclass
class RefSpam(PerLeafReference):
    """Float64 reference for SPAM, the authors' ``step`` on dense params
    (``learning_rate=None``: the bare direction).

    Fields: ``b1``, ``b2``, ``eps``, ``threshold``, ``delta_t`` (``DeltaT``),
    ``warmup_steps``, ``grad_accu_steps``, ``correct_bias`` as the authors';
    ``weight_decay`` (times the rate, of the stepped params), ``mask`` (per leaf, False: no
    decay), ``maximize`` (negate ``g`` first). ``clipped`` counts the clipped entries.
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    threshold: float = 5000.0
    delta_t: int = 500
    warmup_steps: int = 150
    grad_accu_steps: int = 20
    correct_bias: bool = True
    weight_decay: ScalarOrSchedule = 0.0
    m: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)
    total_step: int = 0
    current_step: int = 0
    clipped: int = 0
    resets: int = 0

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero state for ``params`` (a flat list of leaves)."""
        self.count, self.total_step, self.clipped, self.resets = 0, 0, 0, 0
        self.current_step = self.warmup_steps + 1
        self.m, self.v = _zeros(params), _real_zeros(params)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k = self.total_step
        lr = 1.0 if self.learning_rate is None else as_schedule(self.learning_rate)(k)
        wd = 0.0 if self.learning_rate is None else as_schedule(self.weight_decay)(k)
        scale = 1 - authors_death_rate(self.current_step, self.warmup_steps)
        step = k + 1  # each param's state["step"]: all params step together
        reset = (k + 1) % self.delta_t == 0
        self.resets += reset
        clip = (
            self.threshold != 0
            and k + 1 >= self.grad_accu_steps
            and (k + 1) % self.delta_t >= self.grad_accu_steps
        )
        b1, b2 = self.b1, self.b2
        step_size = lr
        if self.correct_bias:
            step_size *= math.sqrt(1 - b2**step) / (1 - b1**step)
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            if reset:
                self.m[i], self.v[i] = np.zeros_like(self.m[i]), np.zeros_like(self.v[i])
            if clip:
                bound = self.threshold * self.v[i]
                spike = _abs_sq(g) > bound
                self.clipped += int(np.sum(spike))
                size = np.abs(g)
                g = np.where(spike, g / np.where(spike, size, 1.0) * np.sqrt(bound), g)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            stepped = p - step_size * scale * self.m[i] / (np.sqrt(self.v[i]) + self.eps)
            if decayed and wd:
                stepped = stepped - lr * wd * stepped
            out.append(stepped - p)
        self.total_step += 1
        self.current_step += 1
        if self.total_step != 0 and (self.total_step + 1) % self.delta_t == 0:
            self.current_step = 0
        self.count += 1
        return out


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``SPAM`` for the options of :class:`RefSpam`, its warm-up pinned to
    the authors' (``density=1.0``, ``foreach=False``).

    ``mask`` becomes two param groups. Not expressible: ``correct_bias=False``, complex
    params, schedules.
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = adapter_options(
        params, options, "pytorch_optimizer", complex_params="has no complex params",
        refuse=(_no_bias_correction_off,),
    )  # fmt: skip
    mask = opts.pop("mask", None)
    warmup_steps = opts.pop("warmup_steps", 150)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "density": 1.0,
        "weight_decay": wd,
        "warmup_epoch": warmup_steps,
        "threshold": opts.pop("threshold", 5000.0),
        "grad_accu_steps": opts.pop("grad_accu_steps", 20),
        "update_proj_gap": opts.pop("delta_t", 500),
        "eps": float(opts.pop("eps", 1e-6)),
        "maximize": opts.pop("maximize", False),
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")

    class AuthorsWarmup:
        """The authors' ``CosineDecay(0.99, W)`` under the package's method name."""

        def get_death_rate(self, current_step: int) -> float:
            return authors_death_rate(current_step, warmup_steps)

    class SPAM(pytorch_optimizer.SPAM):
        """pytorch-optimizer's ``SPAM`` whose warm-up (a new ``CosineDecay`` at each reset)
        is the authors' closed form, not one scheduler step ahead."""

        @property
        def warmup(self) -> AuthorsWarmup:
            return AuthorsWarmup()

        @warmup.setter
        def warmup(self, value: object) -> None:
            del value

    return SPAM(param_groups(params, mask, wd), **kwargs)


def _no_bias_correction_off(opts: dict, package: str) -> None:
    """Refuses ``correct_bias=False`` (the package always corrects)."""
    if not opts.pop("correct_bias", True):
        raise NotImplementedError(f"{package} always corrects the bias")


# How the tests run this module's optimizer (tests/variants.py collects it by registry name).
# The problem's gradients (noise of scale 0.5 around a bowl) spike against threshold x v (v not
# bias-corrected) only for thresholds far below the authors' 5000: the clipping cases use 50
# and 300, which clip about 14% and 50% of the entries they check (tests/test_spam.py checks
# that they clip); the reset cases reset every 1 to 60 steps of the 300.
TESTS = (
    Variant(
        name="spam",
        reference_class=RefSpam,
        learning_rate=1e-2,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-8},
            "clip": {"threshold": 50.0, "grad_accu_steps": 3},
            "no_clip": {"threshold": 0.0},
            "reset": {"delta_t": 60, "warmup_steps": 20},
            "reset_and_clip": {
                "delta_t": 5,
                "warmup_steps": 3,
                "grad_accu_steps": 2,
                "threshold": 300.0,
            },  # fmt: skip
            "reset_every_step": {"delta_t": 1, "warmup_steps": 2},
            "no_bias_correction": {"correct_bias": False, "delta_t": 50, "warmup_steps": 10},
            "decay_mask": {"weight_decay": 0.1, "mask": MASK},
            "schedules": {
                "learning_rate": lr_schedule,
                "weight_decay": wd_schedule,
                "delta_t": 40,
                "warmup_steps": 10,
            },  # fmt: skip
            "maximize": {"maximize": True},
        },
        packages={"pytorch-optimizer": pytorch_optimizer_optimizer},
        hyperparams={
            "learning_rate": 1e-2,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-6,
            "threshold": 2.0,
            "delta_t": 3,
            "warmup_steps": 2,
            "grad_accu_steps": 1,
        },
        bad=(
            ("b1", 1.0, "[0, 1)"),
            ("eps", -1.0, ">= 0"),
            ("threshold", -1.0, ">= 0"),
            ("delta_t", 0, ">= 1"),
            ("warmup_steps", -1, ">= 0"),
            ("grad_accu_steps", 2.5, ">= 0"),
            ("weight_decay", -0.1, ">= 0"),
        ),
    ),
)
