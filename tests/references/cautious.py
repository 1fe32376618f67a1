"""Cautious AdamW (Liang et al., 2024, "Cautious Optimizers: Improving Training with One Line of
Code", arXiv:2411.16085).

Written from the paper and the authors' code, kyleliang919/C-Optim ``c_adamw.py`` (both paths
of ``AdamW.step``), and from timm's ``AdamWLegacy(caution=True)``
(``timm/optim/adamw.py``), the implementation the authors' README and code point to for the
mask scale. The ``k``-th update (``k = 0, 1, ...``, ``t = k + 1``)::

    m_t = b1 m + (1 - b1) g
    v_t = b2 v + (1 - b2) |g|^2
    u_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t) + eps_root) + eps)
    phi = 1[u_t g > 0]                         (elementwise; complex: 1[Re(u_t conj(g)) > 0])
    u_t <- u_t phi / max(mean(phi), 1e-3)      (mean over the whole leaf)
    p <- p - lr(k) (u_t + wd(k) p)             (decayed leaves; the decay is NOT masked)

The caution mask keeps the coordinates where the Adam direction agrees in sign with the current
gradient and rescales the survivors so that the mean of the scale over the leaf is 1 (the
``1e-3`` floor bounds the rescale at 1000 when almost nothing agrees; a leaf where nothing
agrees does not move, apart from its decay).

Where the implementations differ:

* The authors' ``c_adamw.py`` (C-Optim HEAD 2c0517c, class ``AdamW``, defaults ``eps=1e-6``,
  ``weight_decay=0``, ``foreach=True``) has two paths. The default ``foreach=True`` runs
  ``c_adamw_update_foreach_async`` (``torch.compile``'d): this rule exactly (PyTorch's eps
  placement ``sqrt(v) / sqrt(1 - b2^t) + eps``, step ``lr / (1 - b1^t)``, ``mask = (M * G >
  0)``, divided by ``mask.mean().clamp(min=1e-3)``, decay ``X *= 1 - lr wd`` first), but it
  wraps ``lr``, the betas, ``eps`` and ``wd`` in default-dtype (float32) ``torch.tensor``
  scalars, so a float64 run is 1e-7 to 3e-6 (relative, 300 steps) from this reference; with
  float64 scalars (``torch.set_default_dtype(torch.float64)``) it agrees to 1.5e-15. The
  ``foreach=False`` path is HuggingFace ``transformers``' AdamW with the mask: its ``eps`` is
  added to the *uncorrected* ``sqrt(v_t)`` and the bias corrections go into the step size,
  ``lr sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)`` (the "epsilon hat" form,
  ``eps / sqrt(1 - b2^t)`` in the form above): 2e-7 from this reference with ``eps=1e-8``,
  2e-2 with ``eps=1e-3``. Both paths compare ``m_t`` (same sign as ``u_t``) with the gradient
  and decay first (``p <- p (1 - lr wd)``, then the masked Adam step, which does not depend on
  ``p``: the additive form above). The authors' first release scaled the mask by
  ``numel / (sum(phi) + 1)`` (kept as a comment in ``c_adamw.py``: "original implementation,
  leaving it here for record"); the current code and timm use ``1 / max(mean(phi), 1e-3)``,
  which is what this reference computes. The authors have no ``maximize`` and no ``eps_root``.
* timm ``AdamWLegacy(caution=True)`` (1.0.31, also ``create_optimizer('cadamw')``): this
  rule exactly (``mask = (exp_avg * grad > 0)``, ``mask / mask.mean().clamp(min=1e-3)``),
  with PyTorch's ``maximize`` (the gradient negated before the moments and the mask) and no
  ``eps_root``. Complex params are viewed as pairs of reals: a mask per real and imaginary part
  and the mean over ``2 n`` entries (not the test ``Re(u conj(g)) > 0`` used here).
* pytorch-optimizer (4.1.0) has no AdamW with caution; its ``BaseOptimizer.apply_cautious``
  (used by ``AdEMAMix``, ``LaProp``, ``Lion``, ``ADOPT``, ``MARS``, ... with ``cautious=True``)
  scales by the authors' first form ``numel / (sum(phi) + 1)``: a scalar leaf whose direction
  agrees moves by half of its Adam step, and a leaf of ``n`` entries all agreeing by
  ``n / (n + 1)``. ``AdEMAMix(alpha=0, cautious=True)`` is this rule with that scale (checked
  to 1e-15), which no option changes, so there is no adapter to it (the two scales put the
  trajectories 0.45 to 0.61 apart, relative, on the test problems).
* optax 0.2.8 has no cautious optimizer.

Complex params: the authors' code does not support them (``g * g``, a complex "second
moment", and ``M * G > 0`` on complex tensors); timm views them as pairs of reals. Here the
agreement test is ``Re(u conj(g)) > 0`` (the sign of the real inner product of the two complex
numbers seen as 2-vectors: the direction moves against the gradient), one mask entry per
complex entry, with ``v = |g|^2`` real as in ``RefAdam``.
"""

from __future__ import annotations

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
    param_groups,
    timm_optimizer_module,
)

MASK_SCALE_FLOOR = 1e-3  # timm's mask.mean().clamp_(min=1e-3)


def caution_mask(u: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``phi / max(mean(phi), 1e-3)`` with ``phi = 1[Re(u conj(g)) > 0]`` (float64)."""
    agree = (u * np.conj(g)).real > 0 if np.iscomplexobj(u) or np.iscomplexobj(g) else u * g > 0
    phi = np.asarray(agree, dtype=np.float64)
    if phi.size == 0:
        return phi
    return phi / max(float(np.mean(phi)), MASK_SCALE_FLOOR)


@dataclass
class RefCautiousAdamw(AdamMomentsReference):
    """Float64 reference for Cautious AdamW (``learning_rate=None``: the bare masked direction).

    Fields: ``b1``, ``b2`` (moment decays), ``eps`` (outside the square root, PyTorch's
    placement), ``eps_root`` (inside it, optax's), ``weight_decay`` (decoupled, times the
    learning rate, not masked by the caution), ``mask`` (per leaf, False: no decay),
    ``maximize`` (negate the gradient first: the caution then compares with ``-g``).
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    weight_decay: ScalarOrSchedule = 1e-4

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k, t = self.count, self.count + 1
        b1, b2 = self.b1, self.b2
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            u = (self.m[i] / bc1) / (np.sqrt(self.v[i] / bc2 + self.eps_root) + self.eps)
            u = u * caution_mask(u, g)
            out.append(self.decay_and_step(u, p, k, decayed))
        self.count += 1
        return out


def timm_optimizer(params: list, **options):
    """timm's ``AdamWLegacy(caution=True)`` for the options of :class:`RefCautiousAdamw`
    (single-tensor path, ``corrected_weight_decay=False``, no ``clipping_threshold``).

    ``mask`` becomes two param groups (the masked-out leaves with ``weight_decay=0``). Not
    expressible: ``eps_root``, complex params (pairs of reals), schedules (use ``run_torch``'s
    ``lr_lambda`` for the learning rate: the decay is ``lr * wd`` with the scheduled ``lr``, as
    in the reference).
    """
    module = timm_optimizer_module("adamw")
    opts, lr, wd = adapter_options(
        params,
        options,
        "timm",
        complex_params="views complex params as pairs of reals (a mask per real part)",
        refuse=("eps_root",),
        weight_decay=1e-4,
    )
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "eps": opts.pop("eps", 1e-8),
        "weight_decay": wd,
        "caution": True,
        "maximize": opts.pop("maximize", False),
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return module.AdamWLegacy(param_groups(params, mask, wd), **kwargs)


# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="cautious_adamw",
        per_tensor=True,
        learning_rate=1e-2,
        zero1_layout=("auto", "data8"),
        reference_class=RefCautiousAdamw,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "eps_root": 1e-6},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        packages={"timm": timm_optimizer},
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "weight_decay": 1e-4},
        bad=(("b1", 1.0, "[0, 1)"), ("weight_decay", -1.0, ">= 0")),
    ),
)
