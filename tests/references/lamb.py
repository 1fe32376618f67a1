"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", ICLR 2020, arXiv:1904.00962, Algorithm 2), as ``optax.lamb`` composes it.

Written from the paper's Algorithm 2 with the scaling function ``phi`` the identity (as
optax and timm; the paper's general ``phi(z) = min(max(z, gamma_l), gamma_u)`` is not
modelled) and the conventions of ``optax.lamb`` and timm's ``Lamb``: bias correction, ``eps``
outside the square root (``eps_root`` inside, optax's), the decay inside the trust ratio, and a
ratio of 1 where a norm is zero. The ``k``-th update (``k = 0, 1, ...``, ``t = k + 1``)::

    m_t = b1 m + (1 - b1) g
    v_t = b2 v + (1 - b2) |g|^2
    r_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t) + eps_root) + eps)
    r_t <- r_t + wd(k) p                          (decayed leaves only)
    ratio = ||p|| / ||r_t||                       (per leaf, Frobenius; 1 if either is 0)
    p <- p - lr(k) ratio r_t

The trust ratio is applied to every leaf, also to those the mask excludes from the decay (as
``optax.lamb``: ``add_decayed_weights(weight_decay, mask)`` then ``scale_by_trust_ratio()`` on
all leaves). The step of a leaf therefore has norm ``lr ||p||`` whatever the gradient scale;
a leaf at zero moves by the plain ``lr r_t``.

Where the implementations differ:

* optax 0.2.8 ``lamb``: this rule (``scale_by_adam(b1, b2, eps, eps_root)``,
  ``add_decayed_weights(weight_decay, mask)``, ``scale_by_trust_ratio()`` with
  ``min_norm=0``, ``trust_coefficient=1``, ``eps=0``, ``scale_by_learning_rate``). Its
  ``weight_decay`` may be a schedule (read at its own 0-based count, as here). No maximize.
* timm ``Lamb`` (1.0.31, NVIDIA's FusedLAMB form): this rule with ``bias_correction=True``,
  ``grad_averaging=True``, ``max_grad_norm=None`` (its default 1.0 divides all gradients by
  ``max(1, ||g||_global / 1.0)``, a global-norm clip before the moments), ``trust_clip=False``
  (``True`` caps the ratio at 1, LAMBC), ``always_adapt=True`` (its default ``False`` skips the
  trust ratio on leaves whose ``weight_decay`` is 0: with the default ``weight_decay=0.01`` and
  a mask, the masked-out leaves get plain Adam steps; with ``weight_decay=0`` everywhere, timm's
  default is plain Adam), ``decoupled_decay=False`` (``True`` decays ``p *= 1 - lr wd``
  outside the ratio), ``caution=False``. Its default ``weight_decay`` is 0.01, ``eps`` 1e-6 as
  here. No ``maximize``, no ``eps_root``. Its foreach path folds the bias corrections into
  scalars (``eps sqrt(1 - b2^t)`` on the uncorrected ``sqrt(v)``), equal to rounding.
* pytorch-optimizer ``Lamb`` (4.1.0): a different rule by default. (1) No second-moment bias
  correction, ``r = m_t / (sqrt(v_t) + eps)``; the first-moment correction ``1 / (1 - b1^t)``
  multiplies the step *outside* the trust ratio (its step is ``lr / (1 - b1^t) * ratio r``,
  10x the learning rate on the first step with ``b1 = 0.9``) unless ``adam_debias=True``;
  (2) the ratio is ``min(||p||, 10) / (||r|| + eps)`` (the weight norm capped by the class
  attribute ``Lamb.clamp = 10``, ``eps`` added to the update norm); (3) ``weight_decouple=True``
  (its default) decays ``p *= 1 - lr wd`` outside the ratio, and the ratio then uses the
  decayed ``||p||``; ``weight_decouple=False`` adds ``wd p`` inside, but to the uncorrected
  ``r``; (4) ``pre_norm=True`` scales the gradients by ``min(1, max_grad_norm / (||g|| +
  eps))`` (off by default, so its ``max_grad_norm=1.0`` does nothing). Because the ratio
  normalizes the step, the bias corrections cancel exactly when ``eps = eps_root = 0`` and no
  leaf is decayed (with ``adam_debias=True`` and the cap lifted); otherwise the directions
  differ by ``O(eps)`` and by the weight of ``wd p`` relative to ``r`` (scaled by
  ``sqrt(1 - b2^t) / (1 - b1^t)``). Its complex params are viewed as pairs of reals. It has
  ``maximize``.

Measured on ``make_problem`` (300 steps, ``lr=1e-2``, relative trajectory differences, coupled
and open loop): timm with the adapter's options and the foreach path both 1e-16 to 7e-16; timm's
own defaults (global clip at 1, ``always_adapt=False``) 7e-3 to 3e-2 with ``weight_decay=0.01``,
and 1.4 to 10 with ``weight_decay=0`` (plain Adam). pytorch-optimizer with its defaults 0.20 to
0.30; with ``adam_debias=True`` and the cap lifted, 1e-6 to 3e-6 at ``eps=1e-6``, 1e-3 to 3e-3
at ``eps=1e-3``, 5e-16 at ``eps=0``; ``eps=0`` with ``weight_decay=0.1`` inside the ratio 0.08
to 0.64.

Complex params: the rule is defined by ``g``, ``|g|^2`` and norms ``sqrt(sum |x|^2)`` alone
(``v`` real), as computed here and by ``optax.lamb``. timm's ``Lamb`` makes a complex ``v``
(``addcmul_(g, g)``) and a complex square root; pytorch-optimizer's uses pairs of reals.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from variant_spec import DECAY, SCHEDULED, Variant

from references.common import (
    AdamMomentsReference,
    Leaves,
    ScalarOrSchedule,
    _abs_sq,
    adapter_options,
    as_schedule,
    import_reference_package,
    param_groups,
    timm_optimizer_module,
)


def trust_ratio(p: np.ndarray, u: np.ndarray) -> float:
    """``||p|| / ||u||`` (Frobenius norms, also of complex arrays), 1 where either is 0."""
    p_norm = float(np.sqrt(np.sum(_abs_sq(p))))
    u_norm = float(np.sqrt(np.sum(_abs_sq(u))))
    if p_norm == 0.0 or u_norm == 0.0:
        return 1.0
    return p_norm / u_norm


@dataclass
class RefLamb(AdamMomentsReference):
    """Float64 reference for LAMB (``learning_rate=None``: the bare direction ``ratio r_t``).

    Fields: ``b1``, ``b2`` (moment decays, bias-corrected), ``eps`` (outside the square root),
    ``eps_root`` (inside it), ``weight_decay`` (``wd p`` added to the Adam direction *inside*
    the trust ratio, on the leaves ``mask`` keeps), ``mask`` (per leaf, False: no decay; the
    trust ratio still applies), ``maximize`` (negate ``g`` first).
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    eps_root: float = 0.0
    weight_decay: ScalarOrSchedule = 0.0

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k, t = self.count, self.count + 1
        b1, b2 = self.b1, self.b2
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        wd = as_schedule(self.weight_decay)(k)
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            r = (self.m[i] / bc1) / (np.sqrt(self.v[i] / bc2 + self.eps_root) + self.eps)
            if wd and decayed:
                r = r + wd * p
            r = trust_ratio(p, r) * r
            if self.learning_rate is None:
                out.append(r)
            else:
                out.append(-as_schedule(self.learning_rate)(k) * r)
        self.count += 1
        return out


# What both adapters refuse, besides schedules (see reference.adapter_options).
_options = functools.partial(adapter_options, refuse=("eps_root",))


def timm_optimizer(params: list, **options):
    """timm's ``Lamb`` for the options of :class:`RefLamb`: ``bias_correction=True``,
    ``grad_averaging=True``, ``max_grad_norm=None`` (no global clip), ``trust_clip=False``,
    ``always_adapt=True`` (the ratio also on undecayed leaves), ``decoupled_decay=False``
    (``wd p`` inside the ratio), ``caution=False``, ``foreach=False``.

    ``mask`` becomes two param groups (the masked-out leaves with ``weight_decay=0``, still
    adapted). Not expressible: ``maximize``, ``eps_root``, complex params, schedules (use
    ``run_torch``'s ``lr_lambda`` for the learning rate).
    """
    module = timm_optimizer_module("lamb")
    opts, lr, wd = _options(params, options, "timm")
    if opts.pop("maximize", False):
        raise NotImplementedError("timm's Lamb has no maximize")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "bias_correction": True,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "eps": opts.pop("eps", 1e-6),
        "weight_decay": wd,
        "grad_averaging": True,
        "max_grad_norm": None,
        "trust_clip": False,
        "always_adapt": True,
        "caution": False,
        "decoupled_decay": False,
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return module.Lamb(param_groups(params, mask, wd), **kwargs)


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``Lamb`` where it computes this rule: ``eps = eps_root = 0`` and no
    decayed leaf (``weight_decay=0``, or a mask excluding every leaf), with
    ``adam_debias=True`` (no ``1 / (1 - b1^t)`` outside the ratio), ``weight_decouple=False``,
    ``pre_norm=False``, ``rectify=False``, ``adam=False``, ``grad_averaging=True``,
    ``foreach=False``, and its class attribute ``clamp`` (the cap on ``||p||`` in the ratio,
    10) set to ``inf`` on the instance (with the cap, the open-loop and ``maximize`` problems,
    whose leaves grow past norm 10, end 0.37 and 0.59 apart relative; without it 5e-16).

    Not expressible: ``eps != 0`` (it adds ``eps`` to the uncorrected ``sqrt(v)`` and to the
    update norm of the ratio), ``eps_root``, weight decay on any leaf (added to the uncorrected
    direction), complex params (pairs of reals), schedules (use ``run_torch``'s ``lr_lambda``
    for the learning rate).
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = _options(params, options, "pytorch_optimizer")
    mask = opts.pop("mask", None)
    eps = opts.pop("eps", 1e-6)
    if eps:
        raise NotImplementedError(
            "pytorch_optimizer's Lamb adds eps to the uncorrected sqrt(v) and to the ratio's "
            "update norm (eps = 0 only)"
        )
    if wd and (mask is None or any(mask)):
        raise NotImplementedError(
            "pytorch_optimizer's Lamb adds the decay to the uncorrected direction"
        )
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "weight_decay": 0.0,
        "weight_decouple": False,
        "fixed_decay": False,
        "rectify": False,
        "grad_averaging": True,
        "adam": False,
        "pre_norm": False,
        "eps": 0.0,
        "foreach": False,
        "maximize": opts.pop("maximize", False),
        "adam_debias": True,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    optimizer = pytorch_optimizer.Lamb(list(params), **kwargs)
    optimizer.clamp = math.inf  # its class attribute clamps ||p|| at 10 in the ratio
    return optimizer


# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="lamb",
        per_tensor=True,
        learning_rate=1e-2,
        zero1_layout=("explicit", "data8"),
        reference_class=RefLamb,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "eps_root": 1e-6},
            # The one setting pytorch-optimizer's Lamb computes (it adds eps elsewhere).
            "no_eps": {"eps": 0.0},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        optax_cases=("default", "hyperparams", "decay_mask", "schedules"),
        packages={
            "timm": timm_optimizer,
            "pytorch-optimizer": pytorch_optimizer_optimizer,
        },
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0},
        bad=(("eps", -1.0, ">= 0"), ("b1", 1.0, "[0, 1)")),
    ),
)
