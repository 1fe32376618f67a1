"""RAdam, Rectified Adam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and
Beyond", ICLR 2020, arXiv:1908.03265).

Written from the paper (Algorithm 2) and PyTorch's documented algorithm
(``torch/optim/radam.py``, ``torch.optim.RAdam``, torch 2.13). At the ``t``-th call
(``t = k + 1``)::

    m = b1 m + (1 - b1) g,    v = b2 v + (1 - b2) |g|^2
    rho_inf = 2 / (1 - b2) - 1,    rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
    r_t = sqrt((rho_t - 4) (rho_t - 2) rho_inf / ((rho_inf - 4) (rho_inf - 2) rho_t))
    m_hat = m / (1 - b1^t)        (nesterov: b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t))

    "standard" (optax.scale_by_radam):   rectified iff rho_t >= threshold
        u = r_t m_hat / (sqrt(v / (1 - b2^t) + eps_root) + eps)    if rectified, else m_hat
    "torch" (torch.optim.RAdam):         rectified iff rho_t > threshold
        u = r_t m_hat sqrt(1 - b2^t) / (sqrt(v + eps_root) + eps)  if rectified, else m_hat

    p <- p - lr(k) (u + wd(k) p)     (decoupled decay, decayed leaves, at every step)

The two placements differ in ``eps`` only: "torch" adds it to ``sqrt(v)`` before the bias
correction (``eps`` is effectively ``eps / sqrt(1 - b2^t)`` in the "standard" form). Under
"torch", ``eps_root`` (absent from torch) goes inside the square root of the raw ``v``, the
natural place in that form. Before rectification both use the bias-corrected momentum alone
(SGD with momentum), as torch, optax and the authors' ``degenerated_to_sgd=True`` do.

Thresholds: the paper rectifies for ``rho_t > 4`` (where ``r_t`` is real); torch for
``rho_t > 5``; optax and the authors' code (LiyuanLucasLiu/RAdam ``radam/radam.py``) for
``rho_t >= 5``. The comparison only matters where ``rho_t`` equals the threshold exactly,
which it never does at 5: torch's and optax's decisions agree.
``threshold`` below 4 makes ``r_t`` undefined (NaN) for some steps.

Where the implementations differ:

* The authors' ``RAdam`` (``degenerated_to_sgd=False``, their default since 2019) does not move
  the params (nor decay them) before rectification; with ``True`` it is the rule above. Their
  ``eps`` placement is torch's; their decoupled decay ``p -= lr wd p`` is torch's
  ``decoupled_weight_decay=True``, applied only on the steps that move.
* ``torch.optim.RAdam``: ``decoupled_weight_decay=True`` is ``p *= 1 - lr wd`` before the step,
  as here; the default ``False`` is L2 decay added to the gradient. No nesterov, no eps_root.
* ``optax.radam`` / ``scale_by_radam`` (0.2.8): the "standard" form; no weight decay.
* pytorch-optimizer ``RAdam`` (4.1.0): the authors' code (torch's ``eps`` placement,
  ``n_sma >= n_sma_threshold``, ``degenerated_to_sgd`` default False: no move and no decay
  before rectification), decoupled decay by default (``weight_decouple=True``).

Complex params: torch, the authors and pytorch-optimizer view them as pairs of reals (separate
second moments of the real and imaginary parts). Here a complex leaf has a real
``v = |g|^2`` (as ``RefAdam``); every other operation is linear in ``g``.
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
    import_reference_package,
    param_groups,
)


@dataclass
class RefRAdam(AdamMomentsReference):
    """Float64 reference for RAdam (``learning_rate=None``: the bare direction ``u``).

    ``eps_placement`` is ``"standard"`` (optax's formula, rectified where ``rho_t >=
    threshold``) or ``"torch"`` (``torch.optim.RAdam``'s, rectified where ``rho_t >
    threshold``). Weight decay is decoupled and scaled by the learning rate, applied at every
    step (torch's ``decoupled_weight_decay=True``); schedules get the 0-based step.
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    threshold: float = 5.0
    nesterov: bool = False
    eps_placement: str = "standard"  # "standard" or "torch"
    weight_decay: ScalarOrSchedule = 0.0

    def __post_init__(self) -> None:
        if self.eps_placement not in ("standard", "torch"):
            raise ValueError(f"eps_placement must be 'standard' or 'torch': {self.eps_placement}")

    def rho(self, t: int) -> tuple[float, float]:
        """``(rho_inf, rho_t)`` at the 1-based step ``t``."""
        b2 = self.b2
        rho_inf = 2 / (1 - b2) - 1
        return rho_inf, rho_inf - 2 * t * b2**t / (1 - b2**t)

    def rectified(self, t: int) -> bool:
        """Whether the ``t``-th step (1-based) is rectified."""
        _, rho_t = self.rho(t)
        if self.eps_placement == "torch":
            return rho_t > self.threshold
        return rho_t >= self.threshold

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates."""
        k, t = self.count, self.count + 1
        b1, b2 = self.b1, self.b2
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        rho_inf, rho_t = self.rho(t)
        rectified = self.rectified(t)
        r = 0.0
        if rectified:
            r = math.sqrt(
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            )
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            if self.nesterov:
                m_hat = b1 * self.m[i] / (1 - b1 ** (t + 1)) + (1 - b1) * g / bc1
            else:
                m_hat = self.m[i] / bc1
            if not rectified:
                u = m_hat
            elif self.eps_placement == "torch":
                u = r * m_hat * math.sqrt(bc2) / (np.sqrt(self.v[i] + self.eps_root) + self.eps)
            else:
                u = r * m_hat / (np.sqrt(self.v[i] / bc2 + self.eps_root) + self.eps)
            out.append(self.decay_and_step(u, p, k, decayed))
        self.count += 1
        return out


def _torch_eps_placement(opts: dict, package: str) -> None:
    """Refuses ``eps_placement="standard"`` (the reference's default): the packages add ``eps``
    to ``sqrt(v)`` before the bias correction."""
    if opts.pop("eps_placement", "standard") != "torch":
        raise NotImplementedError(f"{package} has only the torch eps placement")


# What both adapters refuse, in this order, besides schedules (see reference.adapter_options).
_options = functools.partial(adapter_options, refuse=(_torch_eps_placement, "nesterov", "eps_root"))


def torch_optimizer(params: list, **options):
    """``torch.optim.RAdam(decoupled_weight_decay=True)`` for the options of
    :class:`RefRAdam`.

    Not expressible: ``eps_placement="standard"`` (the reference's default), a ``threshold``
    other than 5, ``nesterov``, ``eps_root``, complex params (pairs of reals), schedules (use
    ``run_torch``'s ``lr_lambda`` for the learning rate; the decay is ``lr * wd`` with the
    scheduled ``lr``, as the reference's).
    """
    torch = import_reference_package("torch")
    opts, lr, wd = _options(params, options, "torch.optim.RAdam")
    if float(opts.pop("threshold", 5.0)) != 5.0:
        raise NotImplementedError("torch.optim.RAdam rectifies at rho_t > 5 only")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "eps": opts.pop("eps", 1e-8),
        "weight_decay": wd,
        "decoupled_weight_decay": True,
        "maximize": opts.pop("maximize", False),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return torch.optim.RAdam(param_groups(params, mask, wd), **kwargs)


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``RAdam`` for the options of :class:`RefRAdam`
    (``degenerated_to_sgd=True``: the momentum step before rectification, ``n_sma_threshold``
    = ``threshold``, ``weight_decouple=True``). It rectifies where ``rho_t >= threshold``
    (the reference's "torch" form: ``>``), the same except where ``rho_t`` equals the
    threshold exactly.

    Not expressible: ``eps_placement="standard"``, ``nesterov``, ``eps_root``, complex params
    (pairs of reals), schedules (use ``run_torch``'s ``lr_lambda`` for the learning rate).
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = _options(params, options, "pytorch_optimizer")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.999)),
        "weight_decay": wd,
        "weight_decouple": True,
        "fixed_decay": False,
        "n_sma_threshold": opts.pop("threshold", 5.0),
        "degenerated_to_sgd": True,
        "eps": opts.pop("eps", 1e-8),
        "maximize": opts.pop("maximize", False),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return pytorch_optimizer.RAdam(param_groups(params, mask, wd), **kwargs)


# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="radam",
        learning_rate=1e-2,
        zero1_layout=("auto", "data4_model2"),
        reference_class=RefRAdam,
        cases={
            "default": {},
            "torch": {"eps_placement": "torch", "eps": 1e-3},
            "torch_decay_mask": {"eps_placement": "torch", **DECAY},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "eps_root": 1e-6},
            "threshold": {"threshold": 50.0},
            "nesterov": {"nesterov": True},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        optax_cases=("default", "hyperparams", "threshold", "nesterov"),
        packages={
            "torch": torch_optimizer,
            "pytorch-optimizer": pytorch_optimizer_optimizer,
        },
        float32_cases=("torch", "torch_decay_mask"),
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
        bad=(("threshold", 3.0, ">= 4"), ("eps_placement", "keras", "standard")),
    ),
)
