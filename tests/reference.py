"""Independent float64 NumPy implementations of the published Adam-family formulas.

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

Schedules are functions of the 0-based step count: the ``k``-th update (``k = 0, 1, ...``)
uses ``lr(k)`` and ``wd(k)`` (optax's ``scale_by_schedule`` and PyTorch's ``LambdaLR``
both apply ``lr(0)`` to the first update).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ScalarOrSchedule = float | Callable[[int], float]
Leaves = list[np.ndarray]


def as_schedule(value: ScalarOrSchedule) -> Callable[[int], float]:
    """Turns a constant into a schedule of the 0-based step count."""
    if callable(value):
        return lambda k: float(value(k))
    constant = float(value)
    return lambda k: constant


def _f64(x: np.ndarray) -> np.ndarray:
    """Float64 (or complex128) copy of ``x``."""
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _abs_sq(g: np.ndarray) -> np.ndarray:
    """``|g|^2`` as a real array, also for complex ``g``."""
    return (g * np.conj(g)).real


@dataclass
class RefAdam:
    """Float64 reference for the whole Adam family (one class, switched by flags).

    ``learning_rate=None`` returns the bare direction ``u_t`` (what ``scale_by_adam`` /
    ``scale_by_amsgrad`` output); otherwise :meth:`update` returns the additive parameter
    update ``-lr(t) * (u_t + wd(t) p)``.
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
    maximize: bool = False
    weight_decay: ScalarOrSchedule = 0.0  # decoupled (AdamW)
    l2_weight_decay: float = 0.0  # coupled (PyTorch Adam weight_decay)
    mask: Sequence[bool] | None = None  # per leaf, applies to either decay
    count: int = 0
    m: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)
    v_max: Leaves = field(default_factory=list)

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero moments for ``params`` (a flat list of leaves)."""
        self.count = 0
        self.m = [np.zeros_like(_f64(p)) for p in params]
        self.v = [np.zeros(np.shape(p), np.float64) for p in params]
        self.v_max = [np.zeros(np.shape(p), np.float64) for p in params]

    def _decays(self, n: int) -> list[bool]:
        return [True] * n if self.mask is None else list(self.mask)

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k = self.count  # 0-based index of this update, used by schedules
        t = k + 1  # 1-based count used by the bias corrections
        b1, b2, eps, eps_root = self.b1, self.b2, self.eps, self.eps_root
        decays = self._decays(len(params))
        out = []
        for i, (g, p) in enumerate(zip(grads, params, strict=True)):
            g, p = _f64(g), _f64(p)
            if self.maximize:
                g = -g
            if self.l2_weight_decay and decays[i]:
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
            out.append(_decay_and_step(u, p, k, decays[i], self.weight_decay, self.learning_rate))
        self.count += 1
        return out


def _decay_and_step(
    u: np.ndarray, p: np.ndarray, k: int, decayed: bool, weight_decay: Any, learning_rate: Any
) -> np.ndarray:
    """The tail shared by the references: decoupled decay ``u + wd(k) p`` where ``decayed``, then
    ``-lr(k) * u`` (``learning_rate=None``: the bare direction ``u``)."""
    if learning_rate is None:
        return u
    wd = as_schedule(weight_decay)(k)
    if wd and decayed:
        u = u + wd * p
    return -as_schedule(learning_rate)(k) * u


@dataclass
class RefAdamax:
    """Float64 reference for AdaMax / AdaMaxW (``learning_rate=None``: bare direction)."""

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: ScalarOrSchedule = 0.0
    mask: Sequence[bool] | None = None
    maximize: bool = False
    count: int = 0
    m: Leaves = field(default_factory=list)
    u_inf: Leaves = field(default_factory=list)

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero moments for ``params``."""
        self.count = 0
        self.m = [np.zeros(np.shape(p), np.float64) for p in params]
        self.u_inf = [np.zeros(np.shape(p), np.float64) for p in params]

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates."""
        k, t = self.count, self.count + 1
        decays = [True] * len(params) if self.mask is None else list(self.mask)
        out = []
        for i, (g, p) in enumerate(zip(grads, params, strict=True)):
            g, p = _f64(g), _f64(p)
            if self.maximize:
                g = -g
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.u_inf[i] = np.maximum(self.b2 * self.u_inf[i], np.abs(g) + self.eps)
            u = self.m[i] / (1 - self.b1**t) / self.u_inf[i]
            out.append(_decay_and_step(u, p, k, decays[i], self.weight_decay, self.learning_rate))
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


def warmup_stable_decay(
    step: int,
    peak_value: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
    decay_type: str = "linear",
) -> float:
    """Warmup-stable-decay ("WSD") learning rate at ``step``, in float64."""
    if step < warmup_steps:
        return init_value + (peak_value - init_value) * step / warmup_steps
    if step < warmup_steps + stable_steps:
        return peak_value
    frac = min(max((step - warmup_steps - stable_steps) / decay_steps, 0.0), 1.0)
    if decay_type == "linear":
        return peak_value - (peak_value - end_value) * frac
    if decay_type == "cosine":
        return end_value + (peak_value - end_value) * 0.5 * (1 + math.cos(math.pi * frac))
    if decay_type == "sqrt":
        return peak_value - (peak_value - end_value) * math.sqrt(frac)
    raise ValueError(decay_type)


def inverse_sqrt(step: int, peak_value: float, warmup_steps: int, init_value: float = 0.0) -> float:
    """Linear warmup to ``peak_value``, then ``peak_value * sqrt(warmup_steps / step)``."""
    if step < warmup_steps:
        return init_value + (peak_value - init_value) * step / warmup_steps
    return peak_value * math.sqrt(warmup_steps / step)


def linear_warmup(
    step: int, schedule: Callable[[int], float], warmup_steps: int, init_value: float = 0.0
) -> float:
    """Linear warmup from ``init_value`` to ``schedule(0)``, then ``schedule(step - warmup)``."""
    if step < warmup_steps:
        return init_value + (schedule(0) - init_value) * step / warmup_steps
    return schedule(step - warmup_steps)


# --------------------------------------------------------------------------------------------
# Test problems (NumPy data; the gradient formula is written once for NumPy and jax.numpy).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A small deterministic optimisation problem on a flat dict of parameter leaves.

    ``grad(p, k) = a * (p - c) + 0.3 * sin(2 p) + noise[k]`` (the ``sin`` term only for real
    leaves): a noisy, slightly non-quadratic bowl, so gradients change sign and the moments mix
    positive and negative values, while trajectories stay bounded (no chaotic amplification of
    rounding differences). With ``coupled=False`` the gradients are evaluated at the initial
    params, so two optimizers see exactly the same gradient sequence (an open loop): their
    per-step updates can then be compared tightly even in float32.
    """

    params: dict[str, np.ndarray]
    curvature: dict[str, np.ndarray]
    target: dict[str, np.ndarray]
    noise: dict[str, np.ndarray]  # leaf shape (steps, *param_shape)
    coupled: bool = True  # False: gradients at the *initial* params (an open-loop sequence)

    @property
    def keys(self) -> list[str]:
        """Leaf names in the order ``jax.tree`` flattens a dict (sorted)."""
        return sorted(self.params)

    def grad(self, params: dict, k, xp=np) -> dict:
        """Gradient at ``params`` for step ``k`` (``xp`` is ``numpy`` or ``jax.numpy``)."""
        out = {}
        for name in self.keys:
            p = params[name]
            if not self.coupled:
                p = xp.asarray(self.params[name], dtype=p.dtype)
            noise = xp.asarray(self.noise[name], dtype=p.dtype)[k]
            g = xp.asarray(self.curvature[name], dtype=p.dtype) * (
                p - xp.asarray(self.target[name], dtype=p.dtype)
            )
            if not xp.iscomplexobj(p):
                g = g + 0.3 * xp.sin(2 * p)
            out[name] = g + noise
        return out


def make_problem(
    seed: int = 0,
    steps: int = 300,
    shapes: dict[str, tuple[int, ...]] | None = None,
    complex_params: bool = False,
    noise_scale: float = 0.5,
    coupled: bool = True,
) -> Problem:
    """Random problem with leaves of ``shapes`` (default: a matrix, a vector and a scalar)."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {"b": (5,), "s": (), "w": (3, 4)}

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        x = rng.standard_normal(shape)
        if complex_params:
            x = x + 1j * rng.standard_normal(shape)
        return x

    params = {k: draw(s) for k, s in shapes.items()}
    curvature = {k: rng.uniform(0.1, 3.0, s) for k, s in shapes.items()}
    target = {k: draw(s) for k, s in shapes.items()}
    noise = {k: noise_scale * draw((steps, *s)) for k, s in shapes.items()}
    return Problem(params, curvature, target, noise, coupled)


def run_reference(ref: RefAdam | RefAdamax, problem: Problem, steps: int):
    """Runs a float64 reference on ``problem``.

    Returns ``(params, updates)``: dicts of arrays stacked over steps, shapes
    ``(steps + 1, ...)`` and ``(steps, ...)``.
    """
    keys = problem.keys
    p = {k: _f64(problem.params[k]) for k in keys}
    ref.init([p[k] for k in keys])
    traj = {k: [p[k]] for k in keys}
    upd: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for step in range(steps):
        g = problem.grad(p, step)
        u = ref.update([g[k] for k in keys], [p[k] for k in keys])
        for k, uk in zip(keys, u, strict=True):
            p[k] = p[k] + uk
            traj[k].append(p[k])
            upd[k].append(uk)
    return (
        {k: np.stack(v) for k, v in traj.items()},
        {k: np.stack(v) for k, v in upd.items()},
    )


def run_jax(opt, problem: Problem, steps: int, dtype=np.float32, jit: bool = True):
    """Runs an optax-style ``GradientTransformation`` on ``problem`` with ``jax.lax.scan``.

    Params are cast to ``dtype``; gradients are computed in that dtype. Returns
    ``(params, updates, final_state)`` with the same stacking as :func:`run_reference`.
    """
    import jax
    import jax.numpy as jnp

    params = {k: jnp.asarray(v, dtype=dtype) for k, v in problem.params.items()}

    def step(carry, k):
        p, state = carry
        g = problem.grad(p, k, xp=jnp)
        u, state = opt.update(g, state, p)
        p = jax.tree.map(lambda a, b: (a + b).astype(a.dtype), p, u)
        return (p, state), (p, u)

    def run(p0):
        state = opt.init(p0)
        (_, state), (traj, upd) = jax.lax.scan(step, (p0, state), jnp.arange(steps))
        return traj, upd, state

    if jit:
        run = jax.jit(run)
    traj, upd, state = run(params)
    traj = {k: np.concatenate([np.asarray(params[k])[None], np.asarray(traj[k])]) for k in traj}
    return traj, {k: np.asarray(v) for k, v in upd.items()}, state
