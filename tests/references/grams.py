"""Grams (Cao, Li and Song, 2024, "Grams: Gradient Descent with Adaptive Momentum Scaling",
arXiv:2412.17107, Algorithm 1).

Written from the paper and the authors' code, Gunale0926/Grams ``grams/src/grams.py`` (class
``Grams``, the ``grams-pytorch`` package; written on transformers' ``AdamW``). Adam's moments,
Adam's step length, the current gradient's sign. The ``k``-th update (``k = 0, 1, ...``,
``t = k + 1``)::

    m_t = b1 m + (1 - b1) g
    v_t = b2 v + (1 - b2) |g|^2
    u_t = sgn(g) sqrt(1 - b2^t) / (1 - b1^t) |m_t| / (sqrt(v_t) + eps)   (authors' code)
    u_t = sgn(g) |m_t / (1 - b1^t)| / (sqrt(v_t / (1 - b2^t)) + eps)      (the paper)
    u_t = sgn(g) |m_t| / (sqrt(v_t) + eps)                   (correct_bias=False)
    p <- p - lr(k) (u_t + wd(k) p)                            (decayed leaves)

``sgn(0) = 0`` (torch's ``sign``: no step where the gradient is 0). The authors' code decays
``p += -lr wd p`` before the step, the additive form above; its defaults are ``lr=1e-3``,
``betas=(0.9, 0.999)``, ``eps=1e-6``, ``weight_decay=0``, ``correct_bias=True``, with ``eps``
added to the uncorrected ``sqrt(v_t)`` (the "epsilon hat" of Kingma and Ba, section 2), which
the paper's Algorithm 1 writes with the bias-corrected moments.

Where the packages differ:

* pytorch-optimizer 4.1.0 ``Grams``: the paper's placement of ``eps``
  (``sqrt(v_t) / sqrt(1 - b2^t) + eps``), no ``correct_bias``; the same decay
  (``weight_decouple=True``, ``p *= 1 - lr wd`` first) and ``maximize``. Complex params as
  pairs of reals.
* optax 0.2.8 has no Grams.

Complex params: the authors' code does not take them; here ``sgn(g) = g / |g|`` (numpy's and
JAX's complex sign), ``|m_t|`` the modulus and ``v`` real.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from variant_spec import DECAY, MASK, SCHEDULED, Variant

from references.common import (
    AdamMomentsReference,
    Leaves,
    ScalarOrSchedule,
    _abs_sq,
    adapter_options,
    import_reference_package,
    param_groups,
)


def _sgn(g: np.ndarray) -> np.ndarray:
    """``g / |g|`` (the sign for reals), 0 where ``g`` is 0."""
    modulus = np.abs(g)
    return np.where(modulus == 0, 0, g / np.where(modulus == 0, 1, modulus))


@dataclass
class RefGrams(AdamMomentsReference):
    """Float64 reference for Grams (``learning_rate=None``: the bare direction ``u_t``).

    Fields: ``b1``, ``b2``, ``eps``; ``bias_correction`` (the authors' ``correct_bias``);
    ``eps_placement`` (``"keras"``: the authors' code, ``"standard"``: the paper's);
    ``weight_decay`` (decoupled, times the learning rate), ``mask``, ``maximize``.
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    bias_correction: bool = True
    eps_placement: str = "keras"
    weight_decay: ScalarOrSchedule = 0.0

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k, t = self.count, self.count + 1
        b1, b2 = self.b1, self.b2
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            m, v = np.abs(self.m[i]), self.v[i]
            if not self.bias_correction:
                size = m / (np.sqrt(v) + self.eps)
            elif self.eps_placement == "keras":
                size = np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + self.eps)
            else:
                size = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + self.eps)
            out.append(self.decay_and_step(_sgn(g) * size, p, k, decayed))
        self.count += 1
        return out


def _paper_form_only(opts: dict, package: str) -> None:
    """Refuses the authors' eps placement and ``bias_correction=False``."""
    if opts.pop("eps_placement", "keras") != "standard":
        raise NotImplementedError(f"{package} adds eps to the bias-corrected sqrt(v)")
    if not opts.pop("bias_correction", True):
        raise NotImplementedError(f"{package} has no bias_correction=False")


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``Grams`` for the options of :class:`RefGrams`
    (``weight_decouple=True``, ``foreach=False``).

    ``mask`` becomes two param groups. Not expressible: ``eps_placement="keras"`` (the
    authors'), ``bias_correction=False``, complex params, schedules.
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = adapter_options(params, options, "pytorch_optimizer", refuse=(_paper_form_only,))
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "weight_decay": wd,
        "weight_decouple": True,
        "eps": float(opts.pop("eps", 1e-6)),
        "maximize": opts.pop("maximize", False),
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return pytorch_optimizer.Grams(param_groups(params, mask, wd), **kwargs)


PAPER = {"eps_placement": "standard"}

# How the tests run this module's optimizer (tests/variants.py collects it by registry name).
TESTS = (
    Variant(
        name="grams",
        reference_class=RefGrams,
        learning_rate=1e-2,
        zero1_layout=("auto", "data4_model2"),
        zero1_float64_single_device=True,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-8},
            "no_bias_correction": {"bias_correction": False},
            "paper_eps": PAPER,
            "paper_decay_mask": {**PAPER, "weight_decay": 0.1, "mask": MASK},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {**PAPER, "maximize": True},
        },
        packages={"pytorch-optimizer": pytorch_optimizer_optimizer},
        float32_cases=("paper_eps", "paper_decay_mask"),
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-6},
        bad=(("b1", -0.5, "[0, 1)"), ("eps", -1.0, ">= 0"), ("eps_placement", "hat", "keras")),
    ),
)
