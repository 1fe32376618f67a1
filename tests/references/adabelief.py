"""AdaBelief (Zhuang et al., 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
Observed Gradients", NeurIPS 2020, arXiv:2010.07468, Algorithm 2).

Written from the paper's Algorithm 2 and the authors' PyTorch code, juntang-zhuang/
Adabelief-Optimizer ``pypi_packages/adabelief_pytorch0.2.1/adabelief_pytorch/AdaBelief.py``
(the latest release, with ``rectify=False``, ``weight_decouple=True``, ``fixed_decay=False``,
``amsgrad=False``). The second moment is the EMA of the squared *prediction error*
``g - m_t`` (the "belief"), not of ``g^2``. The ``k``-th update (``k = 0, 1, ...``,
``t = k + 1``), with optax's names for the two epsilons::

    m_t = b1 m + (1 - b1) g
    s_t = b2 s + (1 - b2) |g - m_t|^2 + eps_root     (eps_root kept in the stored state)
    m_hat = m_t / (1 - b1^t)
            (nesterov, optax's: b1 m_t / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t))
    u_t = m_hat / (sqrt(s_t / (1 - b2^t)) + eps)
    p <- p - lr(k) (u_t + wd(k) p)                 (decayed leaves)

The authors' code has a single ``eps`` used in both places: ``exp_avg_var.add_(eps)`` adds it
*in place* to the stored state every step (so it accumulates in ``s`` like a geometric
series: ``s_t >= eps (1 - b2^t) / (1 - b2)``, hence ``s_hat >= eps / (1 - b2)``), then
``denom = sqrt(s) / sqrt(1 - b2^t) + eps``. That is the paper's Algorithm 2 (``+ eps`` in the
``s_t`` line, ``+ eps`` in the denominator) and this rule with ``eps_root = eps``; the
authors' default is ``eps = 1e-16`` since release 0.1.0 (1e-8 in 0.0.5; their change log
recommends 1e-8 where SGD beats Adam, e.g. CNNs on image classification). The decay is
``p *= 1 - lr wd`` before the moments, which do not depend on ``p``: the additive form above.

Where the implementations differ:

* optax 0.2.8 ``scale_by_belief`` / ``adabelief``: this rule exactly, with the two epsilons
  split (``eps_root`` added to the stored ``nu``, ``eps`` outside the square root, both
  defaulting to 1e-16), and optax's ``nesterov``; ``adabelief`` has no weight decay, mask or
  maximize (chain ``add_decayed_weights`` before ``scale_by_learning_rate``).
* pytorch-optimizer ``AdaBelief`` (4.1.0): the authors' arithmetic (one ``eps`` for both,
  added to the stored state in place) with ``rectify=False`` (its default),
  ``weight_decouple=True``, ``fixed_decay=False``, ``ams_bound=False`` and ``maximize``. Only
  ``eps_root == eps`` is expressible (``eps=1e-8`` against ``eps_root=1e-10``: 3e-6 to 7e-6
  apart over 300 steps), and no ``nesterov``. Complex params are viewed as pairs of reals (a
  separate ``s`` per part).
* timm ``AdaBelief`` (1.0.31): the authors' arithmetic, but ``rectify=True`` by default (the
  RAdam-style rectified step, 0.9 to 1.3 apart over 300 steps; the adapter passes
  ``rectify=False``); ``decoupled_decay=True``, ``fixed_decay=False``,
  ``amsgrad=False``. No ``maximize``, no ``nesterov``, ``eps_root == eps`` only. Complex params
  make a complex ``s`` (``addcmul_`` of complex residuals, ``(g - m)^2`` not ``|g - m|^2``)
  and a complex square root: it runs, but not this rule.

Complex params: the authors' code does not support them (complex ``s`` as timm's). The rule
is defined by ``g`` and ``|g - m|^2`` alone: here ``s`` is real, ``m`` complex.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from variant_spec import DECAY, SCHEDULED, Variant

from references.common import (
    Leaves,
    PerLeafReference,
    ScalarOrSchedule,
    _abs_sq,
    _real_zeros,
    _zeros,
    adapter_options,
    import_reference_package,
    param_groups,
    timm_optimizer_module,
)


@dataclass
class RefAdabelief(PerLeafReference):
    """Float64 reference for AdaBelief (``learning_rate=None``: the bare direction ``u_t``).

    Fields: ``b1``, ``b2`` (decays of the mean and of the squared prediction error), ``eps``
    (added to ``sqrt(s_hat)``), ``eps_root`` (added to the stored ``s`` every step; the authors'
    single ``eps`` is ``eps == eps_root``), ``nesterov`` (optax's Nesterov form of ``m_hat``),
    ``weight_decay`` (decoupled, times the learning rate), ``mask`` (per leaf, False: no decay),
    ``maximize`` (negate ``g`` first).
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-16
    eps_root: float = 1e-16
    nesterov: bool = False
    weight_decay: ScalarOrSchedule = 0.0
    m: Leaves = field(default_factory=list)
    s: Leaves = field(default_factory=list)

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero moments for ``params`` (a flat list of leaves)."""
        self.count = 0
        self.m, self.s = _zeros(params), _real_zeros(params)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k, t = self.count, self.count + 1
        b1, b2 = self.b1, self.b2
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            m = self.m[i]
            self.s[i] = b2 * self.s[i] + (1 - b2) * _abs_sq(g - m) + self.eps_root
            if self.nesterov:
                m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
            else:
                m_hat = m / (1 - b1**t)
            u = m_hat / (np.sqrt(self.s[i] / (1 - b2**t)) + self.eps)
            out.append(self.decay_and_step(u, p, k, decayed))
        self.count += 1
        return out


def _single_eps(opts: dict, package: str) -> None:
    """Refuses ``eps_root != eps`` (the packages' single ``eps`` is added in both places)."""
    if opts.pop("eps_root", 1e-16) != opts.get("eps", 1e-16):
        raise NotImplementedError(f"{package} has a single eps (eps_root == eps only)")


# What both adapters refuse, besides schedules (see reference.adapter_options).
_options = functools.partial(
    adapter_options,
    complex_params="has no complex AdaBelief with a real |g - m|^2",
    refuse=("nesterov", _single_eps),
)


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``AdaBelief`` for the options of :class:`RefAdabelief`
    (``rectify=False``, ``weight_decouple=True``, ``fixed_decay=False``, ``ams_bound=False``,
    ``foreach=False``).

    ``mask`` becomes two param groups. Not expressible: ``eps_root != eps``, ``nesterov``,
    complex params (pairs of reals), schedules (use ``run_torch``'s ``lr_lambda`` for the
    learning rate).
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = _options(params, options, "pytorch_optimizer")
    eps = float(opts.pop("eps", 1e-16))
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "weight_decay": wd,
        "weight_decouple": True,
        "fixed_decay": False,
        "rectify": False,
        "ams_bound": False,
        "foreach": False,
        "eps": eps,
        "maximize": opts.pop("maximize", False),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return pytorch_optimizer.AdaBelief(param_groups(params, mask, wd), **kwargs)


def timm_optimizer(params: list, **options):
    """timm's ``AdaBelief`` for the options of :class:`RefAdabelief` (``rectify=False``, not its
    default; ``decoupled_decay=True``, ``fixed_decay=False``, ``amsgrad=False``,
    ``foreach=False``).

    ``mask`` becomes two param groups. Not expressible: ``maximize``, ``eps_root != eps``,
    ``nesterov``, complex params, schedules (use ``run_torch``'s ``lr_lambda`` for the learning
    rate).
    """
    module = timm_optimizer_module("adabelief")
    opts, lr, wd = _options(params, options, "timm")
    eps = float(opts.pop("eps", 1e-16))
    if opts.pop("maximize", False):
        raise NotImplementedError("timm's AdaBelief has no maximize")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "eps": eps,
        "weight_decay": wd,
        "amsgrad": False,
        "decoupled_decay": True,
        "fixed_decay": False,
        "rectify": False,
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return module.AdaBelief(param_groups(params, mask, wd), **kwargs)


# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="adabelief",
        learning_rate=1e-2,
        zero1_layout=("explicit", "data8"),
        reference_class=RefAdabelief,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-8, "eps_root": 1e-10},
            "nesterov": {"nesterov": True},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        optax_cases=("default", "hyperparams", "nesterov"),
        packages={
            "pytorch-optimizer": pytorch_optimizer_optimizer,
            "timm": timm_optimizer,
        },
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-16},
        bad=(("eps_root", -1.0, ">= 0"), ("b2", 2.0, "[0, 1)")),
    ),
)
