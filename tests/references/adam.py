"""Float64 NumPy references of the Adam family of adam_jax's core.

Nothing here imports ``adam_jax`` or ``optax``: every formula is written from the papers and
from PyTorch's documented semantics, so the test suite can check the implementation against
something that was not derived from it.

* Adam (Kingma & Ba, 2015, Algorithm 1, with the PyTorch / optax ``eps`` placement)::

      m_t = b1 m + (1 - b1) g
      v_t = b2 v + (1 - b2) |g|^2
      u_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t) + eps_root) + eps)

* NAdam as in optax (Dozat 2016 without the extra ``b2`` factor)::

      m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)

* Keras / TensorFlow "epsilon hat" form (Kingma & Ba, end of section 2)::

      u_t = sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t + eps_root) + eps)

* AMSGrad with PyTorch semantics: ``v_max = max(v_max, v_t)`` on the raw second moment, then
  ``u_t = m_hat / (sqrt(v_max / (1 - b2^t) + eps_root) + eps)``.
* AdamW (Loshchilov & Hutter): ``p <- p - lr(t) (u_t + wd(t) p)`` on masked leaves.
* Adam with L2 (PyTorch ``Adam(weight_decay=wd)``): ``g <- g + wd p`` before the moments.
* ``maximize`` (PyTorch): the gradient is negated first, weight decay is unchanged.
* AdaMax (Kingma & Ba, section 7.1, PyTorch / optax ``eps`` placement)::

      u_t = (m_t / (1 - b1^t)) / max(b2 u_{t-1}, |g| + eps)

:func:`pytorch_adam_float32` is PyTorch's Adam in float32 NumPy arithmetic. The machinery the
references share (base classes, problems, runners) is in :mod:`references.common`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from references.common import (
    AdamMomentsReference,
    Leaves,
    PerLeafReference,
    ScalarOrSchedule,
    _abs_sq,
    _f64,
    _real_zeros,
)


@dataclass
class RefAdam(AdamMomentsReference):
    """Float64 reference for the whole Adam family (one class, switched by flags).

    ``learning_rate=None`` returns the bare direction ``u_t`` (what ``scale_by_adam`` /
    ``scale_by_amsgrad`` output); otherwise :meth:`update` returns the additive parameter
    update ``-lr(t) * (u_t + wd(t) p)``. ``mask`` (per leaf) applies to either decay.
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    nesterov: bool = False
    eps_placement: str = "standard"  # "standard" or "keras"
    bias_correction: bool = True
    amsgrad: bool = False
    weight_decay: ScalarOrSchedule = 0.0  # decoupled (AdamW)
    l2_weight_decay: float = 0.0  # coupled (PyTorch Adam weight_decay)
    v_max: Leaves = field(default_factory=list)

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero moments for ``params`` (a flat list of leaves)."""
        super().init(params)
        self.v_max = _real_zeros(params)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k = self.count  # 0-based index of this update, used by schedules
        t = k + 1  # 1-based count used by the bias corrections
        b1, b2, eps, eps_root = self.b1, self.b2, self.eps, self.eps_root
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            if self.l2_weight_decay and decayed:
                g = g + self.l2_weight_decay * p
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
            m, v = self.m[i], self.v[i]
            if self.amsgrad:
                self.v_max[i] = np.maximum(self.v_max[i], v)
                v = self.v_max[i]
            if self.eps_placement == "keras":
                scale = math.sqrt(1 - b2**t) / (1 - b1**t)
                u = scale * m / (np.sqrt(v + eps_root) + eps)
            elif self.eps_placement != "standard":
                raise ValueError(self.eps_placement)
            elif not self.bias_correction:
                m_used = b1 * m + (1 - b1) * g if self.nesterov else m
                u = m_used / (np.sqrt(v + eps_root) + eps)
            else:
                if self.nesterov:
                    m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
                else:
                    m_hat = m / (1 - b1**t)
                v_hat = v / (1 - b2**t)
                u = m_hat / (np.sqrt(v_hat + eps_root) + eps)
            out.append(self.decay_and_step(u, p, k, decayed))
        self.count += 1
        return out


@dataclass
class RefAdamax(PerLeafReference):
    """Float64 reference for AdaMax / AdaMaxW (``learning_rate=None``: bare direction)."""

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: ScalarOrSchedule = 0.0
    m: Leaves = field(default_factory=list)
    u_inf: Leaves = field(default_factory=list)

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero moments for ``params``."""
        self.count = 0
        self.m, self.u_inf = _real_zeros(params), _real_zeros(params)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates."""
        k, t = self.count, self.count + 1
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.u_inf[i] = np.maximum(self.b2 * self.u_inf[i], np.abs(g) + self.eps)
            u = self.m[i] / (1 - self.b1**t) / self.u_inf[i]
            out.append(self.decay_and_step(u, p, k, decayed))
        self.count += 1
        return out


@dataclass
class RefBiasCorrection:
    """``updates * sqrt(1 - b2^t) / (1 - b1^t)`` with ``t`` starting at 1."""

    b1: float = 0.9
    b2: float = 0.999
    count: int = 0

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Resets the step count."""
        del params
        self.count = 0

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the scaled inputs."""
        del params
        self.count += 1
        t = self.count
        scale = math.sqrt(1 - self.b2**t) / (1 - self.b1**t)
        return [scale * _f64(g) for g in grads]


def pytorch_adam_float32(
    params: np.ndarray,
    grad_fn: Callable[[np.ndarray, int], np.ndarray],
    steps: int,
    lr: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    amsgrad: bool = False,
) -> np.ndarray:
    """PyTorch's single-tensor Adam formula evaluated in float32 NumPy arithmetic.

    Mirrors ``torch/optim/adam.py::_single_tensor_adam`` (non-capturable path): ``exp_avg``
    is updated with ``lerp`` (``m + (1 - b1) (g - m)``), ``exp_avg_sq`` with
    ``v * b2 + (1 - b2) g g``, the bias corrections are Python (float64) scalars, and the
    parameter moves by ``-(lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)``, rounded to float32
    at every tensor operation. Returns the trajectory, shape ``(steps + 1, *params.shape)``.
    """
    f32 = np.float32
    p = params.astype(f32)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    v_max = np.zeros_like(p)
    traj = [p.copy()]
    for k in range(steps):
        g = grad_fn(p.astype(np.float64), k).astype(f32)
        m = (m + f32(1 - b1) * (g - m)).astype(f32)
        v = (v * f32(b2) + f32(1 - b2) * (g * g)).astype(f32)
        t = k + 1
        bc1 = 1 - b1**t
        bc2_sqrt = (1 - b2**t) ** 0.5
        step_size = lr / bc1
        if amsgrad:
            v_max = np.maximum(v_max, v)
            denom = (np.sqrt(v_max) / f32(bc2_sqrt) + f32(eps)).astype(f32)
        else:
            denom = (np.sqrt(v) / f32(bc2_sqrt) + f32(eps)).astype(f32)
        p = (p + f32(-step_size) * (m / denom)).astype(f32)
        traj.append(p.copy())
    return np.stack(traj)
