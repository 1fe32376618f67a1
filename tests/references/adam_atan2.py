"""Adam-atan2 (Everett et al., 2024, "Scaling Exponents Across Parameterizations and
Optimizers", arXiv:2407.05872, section on the epsilon parameter).

Written from the paper and lucidrains' adam-atan2-pytorch (``adam_atan2_pytorch/adam_atan2.py``,
class ``AdamAtan2``; the paper gives no code), which fixes the constants ``a = 1.27``,
``b = 1``. Adam's ``m_hat / (sqrt(v_hat) + eps)`` is replaced by an ``atan2``, which is
bounded, scale-invariant (``g -> c g`` leaves it unchanged for ``c > 0``) and needs no
``eps``. The ``k``-th update (``k = 0, 1, ...``, ``t = k + 1``)::

    m_t = b1 m + (1 - b1) g
    v_t = b2 v + (1 - b2) g^2
    u_t = a atan2(m_t / (1 - b1^t), b sqrt(v_t / (1 - b2^t)))
    p <- p - lr(k) (u_t + wd(k) p)                 (decayed leaves)

``atan2(y, x)`` with ``x >= 0`` lies in ``[-pi/2, pi/2]``; for ``|y| << x`` it is ``y / x``,
so ``a atan2(m_hat, b sqrt(v_hat)) ~ (a / b) m_hat / sqrt(v_hat)``; ``atan2(0, 0) = 0``
(numpy and torch agree), so an entry that never saw a gradient does not move.

Where the implementations differ:

* adam-atan2-pytorch ``AdamAtan2`` (0.4.1 on PyPI; the GitHub HEAD file is identical): this
  rule with ``decoupled_wd=False`` (its ``decoupled_wd=True`` divides ``weight_decay`` by the
  initial learning rate: a decay ``lr(k) / lr(0) * wd`` not scaled by the learning rate),
  ``cautious_factor=1`` (``< 1`` scales the disagreeing entries of ``u`` by it and rescales
  by ``1 / max(mean(scale), 1e-5)``), ``cautious_wd=False`` and ``regen_reg_rate=0``. It
  computes ``den = sqrt(v b^2 / (1 - b2^t))``, ``atan2(m / (1 - b1^t), den)``, then decays
  ``p *= 1 - lr wd`` and adds ``-lr a u``, the additive form above. No ``maximize``; it asserts
  ``lr > 0``.
* optax 0.2.8 has no Adam-atan2.

Complex params: not defined (``atan2`` of complex numbers has no meaning; the package's
``atan2_`` raises on complex tensors), so :meth:`RefAdamAtan2.update` raises ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from variant_spec import DECAY, SCHEDULED, Variant

from references.common import (
    Leaves,
    PerLeafReference,
    ScalarOrSchedule,
    _real_zeros,
    adapter_options,
    import_reference_package,
    param_groups,
)


@dataclass
class RefAdamAtan2(PerLeafReference):
    """Float64 reference for Adam-atan2 (``learning_rate=None``: the bare direction ``u_t``).

    Fields: ``b1``, ``b2`` (moment decays, bias-corrected), ``a`` (scale of the ``atan2``),
    ``b`` (scale of ``sqrt(v_hat)`` inside it), ``weight_decay`` (decoupled, times the learning
    rate), ``mask`` (per leaf, False: no decay), ``maximize`` (negate ``g`` first).
    """

    learning_rate: ScalarOrSchedule | None = 1e-4
    b1: float = 0.9
    b2: float = 0.99
    a: float = 1.27
    b: float = 1.0
    weight_decay: ScalarOrSchedule = 0.0
    m: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero moments for ``params`` (a flat list of real leaves)."""
        if any(np.iscomplexobj(p) for p in params):
            raise ValueError("Adam-atan2 is not defined for complex params")
        self.count = 0
        self.m, self.v = _real_zeros(params), _real_zeros(params)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        if any(np.iscomplexobj(x) for x in (*grads, *params)):
            raise ValueError("Adam-atan2 is not defined for complex params")
        k, t = self.count, self.count + 1
        b1, b2 = self.b1, self.b2
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat = self.m[i] / (1 - b1**t)
            v_hat = self.v[i] / (1 - b2**t)
            u = self.a * np.arctan2(m_hat, self.b * np.sqrt(v_hat))
            out.append(self.decay_and_step(u, p, k, decayed))
        self.count += 1
        return out


def torch_optimizer(params: list, **options):
    """adam-atan2-pytorch's ``AdamAtan2`` for the options of :class:`RefAdamAtan2`
    (``decoupled_wd=False``, ``cautious_factor=1``, ``cautious_wd=False``,
    ``regen_reg_rate=0``).

    ``mask`` becomes two param groups (the masked-out leaves with ``weight_decay=0``). Not
    expressible: ``maximize``, schedules (use ``run_torch``'s ``lr_lambda`` for the learning
    rate), ``learning_rate <= 0``; complex params are not defined.
    """
    torch = import_reference_package("torch")
    package = import_reference_package("adam-atan2-pytorch", "adam_atan2_pytorch")
    if any(torch.is_complex(p) for p in params):
        raise ValueError("Adam-atan2 is not defined for complex params")
    opts, lr, wd = adapter_options(
        params, options, "adam_atan2_pytorch", complex_params=None, learning_rate=1e-4
    )
    if not lr > 0:
        raise NotImplementedError("adam_atan2_pytorch asserts lr > 0")
    if opts.pop("maximize", False):
        raise NotImplementedError("adam_atan2_pytorch has no maximize")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.99)),
        "weight_decay": wd,
        "regen_reg_rate": 0.0,
        "decoupled_wd": False,
        "cautious_wd": False,
        "cautious_factor": 1.0,
        "a": opts.pop("a", 1.27),
        "b": opts.pop("b", 1.0),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return package.AdamAtan2(param_groups(params, mask, wd), **kwargs)


# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="adam_atan2",
        learning_rate=1e-2,
        zero1_layout=("explicit", "data4_model2"),
        reference_class=RefAdamAtan2,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.999, "a": 1.0, "b": 2.0},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        packages={"adam-atan2-pytorch": torch_optimizer},
        complex_params=False,
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.99, "a": 1.27, "b": 1.0},
        bad=(("a", 0.0, "> 0"), ("b", -1.0, "> 0")),
    ),
)
