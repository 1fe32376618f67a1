"""StableAdamW (Wortsman et al., 2023, "Stable and low-precision training for large-scale
vision-language models", arXiv:2304.13013, Algorithm 2).

Written from the paper's Algorithm 2 and the reference implementation torch-optimi
(warner-benjamin/optimi ``optimi/stableadamw.py``, ``_single_param_stableadamw``; the paper
gives no code of its own). AdamW with the debiased decay rates of Adafactor and AdamW's step
clipped per tensor by Adafactor's update RMS. The ``k``-th update (``k = 0, 1, ...``,
``t = k + 1``)::

    beta_hat(b) = (b^t - b) / (b^t - 1)            (= b (1 - b^(t-1)) / (1 - b^t); 0 at t = 1)
    m_t = beta_hat(b1) m + (1 - beta_hat(b1)) g    (the bias-corrected mean itself)
    v_t = beta_hat(b2) v + (1 - beta_hat(b2)) |g|^2
    rms = sqrt(mean(|g|^2 / max(v_t, eps^2)))     (per leaf, with the NEW v_t)
    lr_t = lr(k) / max(1, rms)
    p <- p - lr_t (m_t / (sqrt(v_t) + eps) + wd(k) p)       (decayed leaves)

The debiased decay rates make ``m_t`` and ``v_t`` equal to Adam's bias-corrected
``m_hat`` and ``v_hat`` (in exact arithmetic), so no separate bias correction appears. Both
the Adam step and the decay are scaled by the clipped ``lr_t``.

Where the implementations differ:

* torch-optimi ``StableAdamW`` (0.3.3; GitHub HEAD 17a3d54 has the same file): this rule
  (``decouple_lr=False``; ``decouple_lr=True`` is a "fully decoupled" decay
  ``1 - (lr_t / max_lr) wd``). Its defaults ``eps=1e-6`` and ``betas=(0.9, 0.99)`` are the
  reference's. No ``maximize``. It decays first (``p *= 1 - lr_t wd``), then adds
  ``-lr_t m / (sqrt(v) + eps)``, the additive form above. Its ``kahan_sum`` acts on
  float16/bfloat16 params only; ``foreach`` and the Triton kernel are the same arithmetic.
  Complex params: ``addcmul_(g, g)`` makes a complex ``v`` and ``maximum`` fails, unsupported.
* pytorch-optimizer ``StableAdamW`` (4.1.0): the same rule (``debias_beta``,
  ``get_stable_adamw_rms(g, v, eps=eps^2)`` = ``max(1, sqrt(mean(g^2 / max(v, eps^2))))``,
  ``p *= 1 - wd lr_t`` with ``weight_decouple=True``) with ``maximize``; but its defaults are
  ``eps=1e-8`` and ``kahan_sum=True`` (low precision only). Complex params are viewed as pairs
  of reals (a ``v`` per part, the mean over ``2 n`` entries), not ``|g|^2`` as here.
* timm ``AdamWLegacy(clipping_threshold=1.0)`` is a different "StableAdamW": the usual
  bias-corrected Adam (no debiased betas) with the Adam step (not the decay, which keeps
  ``lr wd``) scaled by ``1 / max(1, rms)`` where ``rms`` is the RMS of
  ``g / (sqrt(v_hat) + eps)``; not this rule, no adapter.
* optax 0.2.8 has no StableAdamW.

Complex params: the rule is defined by ``g`` and ``|g|^2`` alone: ``v`` and ``rms`` are real
(``|g|^2``), ``m`` complex, as computed here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from variant_spec import MASK, SCHEDULED, Variant

from references.common import (
    AdamMomentsReference,
    Leaves,
    ScalarOrSchedule,
    _abs_sq,
    adapter_options,
    as_schedule,
    import_reference_package,
    param_groups,
)


def debias_beta(beta: float, t: int) -> float:
    """``beta (1 - beta^(t-1)) / (1 - beta^t)`` as optimi writes it, ``(b^t - b) / (b^t - 1)``."""
    beta_t = beta**t
    return (beta_t - beta) / (beta_t - 1)


@dataclass
class RefStableAdamw(AdamMomentsReference):
    """Float64 reference for StableAdamW (``learning_rate=None``: the bare direction
    ``m_t / (sqrt(v_t) + eps) / max(1, rms)``, without decay).

    Fields: ``b1``, ``b2`` (decay rates, debiased at each step), ``eps`` (added to
    ``sqrt(v_t)``; ``eps^2`` floors ``v_t`` in the RMS), ``weight_decay`` (decoupled, times the
    clipped ``lr_t``), ``mask`` (per leaf, False: no decay), ``maximize`` (negate ``g`` first).
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-6
    weight_decay: ScalarOrSchedule = 1e-2

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k, t = self.count, self.count + 1
        beta1_hat, beta2_hat = debias_beta(self.b1, t), debias_beta(self.b2, t)
        eps = self.eps
        wd = as_schedule(self.weight_decay)(k)
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            g2 = _abs_sq(g)
            self.m[i] = beta1_hat * self.m[i] + (1 - beta1_hat) * g
            self.v[i] = beta2_hat * self.v[i] + (1 - beta2_hat) * g2
            rms = math.sqrt(float(np.mean(g2 / np.maximum(self.v[i], eps * eps)))) if g.size else 0
            clip = max(1.0, rms)
            u = self.m[i] / (np.sqrt(self.v[i]) + eps)
            if self.learning_rate is None:
                out.append(u / clip)
                continue
            lr_t = as_schedule(self.learning_rate)(k) / clip
            if wd and decayed:
                u = u + wd * p
            out.append(-lr_t * u)
        self.count += 1
        return out


# What both adapters refuse, besides schedules (see reference.adapter_options), and the
# reference's default weight decay.
_options = functools.partial(
    adapter_options,
    complex_params="has no complex StableAdamW with a real |g|^2",
    weight_decay=1e-2,
)


def torch_optimizer(params: list, **options):
    """torch-optimi's ``StableAdamW`` for the options of :class:`RefStableAdamw`
    (``decouple_lr=False``, ``kahan_sum=False``, ``foreach=False``, ``triton=False``).

    ``mask`` becomes two param groups (the masked-out leaves with ``weight_decay=0``). Not
    expressible: ``maximize``, complex params, schedules (use ``run_torch``'s ``lr_lambda`` for
    the learning rate).
    """
    optimi = import_reference_package("torch-optimi", "optimi")
    opts, lr, wd = _options(params, options, "optimi")
    if opts.pop("maximize", False):
        raise NotImplementedError("optimi has no maximize")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.99)),
        "weight_decay": wd,
        "eps": opts.pop("eps", 1e-6),
        "decouple_lr": False,
        "kahan_sum": False,
        "foreach": False,
        "triton": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return optimi.StableAdamW(param_groups(params, mask, wd), **kwargs)


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``StableAdamW`` for the options of :class:`RefStableAdamw`
    (``weight_decouple=True``, ``kahan_sum=False``, ``foreach=False``; the reference's
    ``eps=1e-6`` default passed explicitly, pytorch-optimizer's own default is ``1e-8``).

    ``mask`` becomes two param groups. Not expressible: complex params (pairs of reals),
    schedules (use ``run_torch``'s ``lr_lambda`` for the learning rate).
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = _options(params, options, "pytorch_optimizer")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.99)),
        "kahan_sum": False,
        "weight_decay": wd,
        "weight_decouple": True,
        "eps": opts.pop("eps", 1e-6),
        "foreach": False,
        "maximize": opts.pop("maximize", False),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return pytorch_optimizer.StableAdamW(param_groups(params, mask, wd), **kwargs)


# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="stable_adamw",
        per_tensor=True,
        learning_rate=1e-2,
        zero1_layout=("auto", "data4_model2"),
        zero1_float64_single_device=True,
        reference_class=RefStableAdamw,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.999, "eps": 1e-3},
            "decay_mask": {"weight_decay": 0.1, "mask": MASK},
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        packages={
            "torch-optimi": torch_optimizer,
            "pytorch-optimizer": pytorch_optimizer_optimizer,
        },
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.99, "weight_decay": 1e-2},
        bad=(("b2", 1.0, "[0, 1)"), ("eps", -1e-6, ">= 0")),
    ),
)
