"""MARS (Yuan, Liu, Wu, Zhou and Gu, 2024, "MARS: Unleashing the Power of Variance Reduction
for Training Large Models", arXiv:2411.10438, Algorithm 2, MARS-AdamW).

Written from the paper and the authors' code, AGI-Arena/MARS ``MARS/optimizers/mars.py``
(``update_fn`` and ``MARS.step``, ``mars_type="mars-adamw"``). The ``k``-th update
(``k = 0, 1, ...``, ``t = k + 1``), ``lr = lr(k)``, ``wd = wd(k)``, for a param trained by
MARS (``optimize_1d`` or ``len(grad.shape) == 2``)::

    c = g + gamma * (b1 / (1 - b1)) * (g - last_grad)      (last_grad = 0 at t = 1)
    c = c / ||c||  if ||c|| > 1                               (the norm of the tensor)
    m = b1 m + (1 - b1) c;  v = b2 v + (1 - b2) c^2
    v_used = max(v_max, v) with amsgrad, else v
    denom = (sqrt(v_used) / sqrt(1 - b2^t) + eps) * (1 - b1^t)
    p <- p - lr (wd p + m / denom)

and for the others (``optimize_1d=False``) the same AdamW update of ``g`` itself with
``betas_1d``, rate ``lr * lr_1d / lr0`` and decay ``weight_decay_1d``. ``last_grad`` is the
previous step's gradient (``is_approx=True``, the default) or, with ``is_approx=False``, the
gradient of this step's batch at the previous params (their ``update_previous_grad`` and
``update_last_grad``, called by ``train_mars.py`` around each step). Their defaults:
``lr=3e-3``, ``betas=(0.95, 0.99)``, ``eps=1e-8``, ``weight_decay=0``, ``amsgrad=False``,
``gamma=0.025``, ``is_approx=True``, ``optimize_1d=False``, ``lr_1d=3e-3``,
``betas_1d=(0.9, 0.95)``, ``weight_decay_1d=0.1``. Here ``lr_1d`` is the 1-D rate itself
(``None``: the learning rate), equal under a constant rate.

Their approximate form keeps ``state['last_grad'] = grad``, a reference to ``p.grad``: the
previous gradient only where the training loop frees the gradients between steps
(``zero_grad(set_to_none=True)``, as ``train_mars.py``); here, as in the ports, a copy.

Options beyond the authors', for the ports: ``eps_placement="keras"`` (``denom = (sqrt(v) +
eps) / sqrt(1 - b2^t) * (1 - b1^t)``), ``correct_first_step=False`` (``c = g`` at ``t = 1``),
``only_2d=False`` (MARS for every param of 2 dimensions or more), ``maximize``.

Where the packages differ (both clip per tensor, as the authors' code):

* pytorch-optimizer 4.1.0 ``MARS`` (``mars_type="adamw"``): ``eps_placement="keras"`` with
  ``sqrt(v + 1e-15)``, ``only_2d=False`` (MARS for every param of 2 dimensions or more, where
  the authors' give 3-D and 4-D params AdamW), no ``is_approx`` (the approximate form), the
  decay ``p *= 1 - lr wd`` before the step (``weight_decouple=True``, ``fixed_decay=False``:
  the same product), ``lr_1d_factor = lr_1d / lr``, ``ams_bound`` for ``amsgrad``,
  ``maximize``, ``cautious`` and ``fixed_decay``. Complex params as pairs of reals (a complex
  vector becomes 2-D: MARS there).
* timm 1.0.31 ``Mars``: ``correct_first_step=False``, ``only_2d=False``, one
  ``weight_decay`` for both kinds of params, ``lr_1d_factor``, ``betas_1d`` (defaulting to
  ``betas``); no ``amsgrad``, ``is_approx`` or ``maximize``.
* optax 0.2.8 has no MARS.

Complex params: the authors' code does not take them; the rule is defined with ``|c|^2`` in
``v`` and the norm ``sqrt(sum |c|^2)`` (``v`` real, ``m`` complex).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from variant_spec import MASK, Variant, lr_schedule, wd_schedule

from references.common import (
    Leaves,
    PerLeafReference,
    ScalarOrSchedule,
    _abs_sq,
    _real_zeros,
    _zeros,
    adapter_options,
    as_schedule,
    import_reference_package,
    timm_optimizer_module,
)


@dataclass
class RefMars(PerLeafReference):
    """Float64 reference for MARS-AdamW, the authors' ``update_fn`` (``learning_rate=None``:
    the direction, decay included, with unit rates).

    Fields as :func:`adam_jax.mars`'s arguments; ``update`` takes ``last_grads`` (the
    gradients of this step's batch at the previous params) with ``is_approx=False``.
    """

    learning_rate: ScalarOrSchedule | None = 3e-3
    b1: float = 0.95
    b2: float = 0.99
    eps: float = 1e-8
    gamma: float = 0.025
    mars_type: str = "mars-adamw"
    is_approx: bool = True
    amsgrad: bool = False
    optimize_1d: bool = False
    lr_1d: ScalarOrSchedule | None = None
    b1_1d: float = 0.9
    b2_1d: float = 0.95
    weight_decay: ScalarOrSchedule = 0.0
    weight_decay_1d: ScalarOrSchedule = 0.1
    eps_placement: str = "standard"
    correct_first_step: bool = True
    only_2d: bool = True
    m: Leaves = field(default_factory=list)
    v: Leaves = field(default_factory=list)
    v_max: Leaves = field(default_factory=list)
    last_grad: Leaves = field(default_factory=list)

    def init(self, params: Sequence[np.ndarray]) -> None:
        """Zero state for ``params`` (a flat list of leaves)."""
        assert self.mars_type == "mars-adamw"
        self.count = 0
        self.m, self.last_grad = _zeros(params), _zeros(params)
        self.v, self.v_max = _real_zeros(params), _real_zeros(params)

    def _mars(self, p: np.ndarray) -> bool:
        ndim = np.ndim(p)
        return self.optimize_1d or (ndim == 2 if self.only_2d else ndim >= 2)

    def update(
        self,
        grads: Sequence[np.ndarray],
        params: Sequence[np.ndarray],
        last_grads: Sequence[np.ndarray] | None = None,
    ) -> Leaves:
        """One step; returns the updates (to be added to ``params``)."""
        k, t = self.count, self.count + 1
        unit = self.learning_rate is None
        lr = 1.0 if unit else as_schedule(self.learning_rate)(k)
        lr_1d = lr if self.lr_1d is None or unit else as_schedule(self.lr_1d)(k)
        wd = as_schedule(self.weight_decay)(k)
        wd_1d = as_schedule(self.weight_decay_1d)(k)
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            if self._mars(p):
                b1, b2, rate, decay = self.b1, self.b2, lr, wd
                if self.is_approx:
                    last = self.last_grad[i]
                elif t == 1:
                    last = np.zeros_like(g)
                else:
                    assert last_grads is not None, "is_approx=False needs last_grads"
                    last = np.asarray(last_grads[i], g.dtype) * (-1 if self.maximize else 1)
                c = (g - last) * (self.gamma * (b1 / (1.0 - b1))) + g
                if t == 1 and not self.correct_first_step:
                    c = g
                norm = np.sqrt(np.sum(_abs_sq(c)))
                if norm > 1.0:
                    c = c / norm
            else:
                b1, b2, rate, decay = self.b1_1d, self.b2_1d, lr_1d, wd_1d
                c = g
            self.m[i] = b1 * self.m[i] + (1 - b1) * c
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(c)
            v = self.v[i]
            if self.amsgrad:
                self.v_max[i] = np.maximum(self.v_max[i], v)
                v = self.v_max[i]
            bias_correction1 = 1.0 - b1**t
            bias_correction2 = 1.0 - b2**t
            if self.eps_placement == "standard":
                denom = (np.sqrt(v) / np.sqrt(bias_correction2) + self.eps) * bias_correction1
            else:
                denom = (np.sqrt(v) + self.eps) / np.sqrt(bias_correction2) * bias_correction1
            u = self.m[i] / denom
            if decayed and decay:
                u = u + decay * p
            out.append(u if unit else -rate * u)
            self.last_grad[i] = g
        self.count += 1
        return out


def _eps_placement(name: str):
    """Refuses the ``eps_placement`` the package has not, unless ``eps`` is too small for it
    to show in float64."""

    def check(opts: dict, package: str) -> None:
        placement = opts.pop("eps_placement", "standard")
        if placement != name and opts.get("eps", 1e-8) > 1e-12:
            raise NotImplementedError(f"{package} has eps_placement={name!r} alone")

    return check


def _first_step(expected: bool):
    def check(opts: dict, package: str) -> None:
        if opts.pop("correct_first_step", True) != expected:
            raise NotImplementedError(f"{package} has correct_first_step={expected} alone")

    return check


def _no_approx(opts: dict, package: str) -> None:
    if not opts.pop("is_approx", True):
        raise NotImplementedError(f"{package} has no is_approx=False")


def _mars_type(opts: dict, package: str) -> None:
    if opts.pop("mars_type", "mars-adamw") != "mars-adamw":
        raise NotImplementedError(f"{package}: MARS-AdamW alone here")


def _ndims(params: list, opts: dict, package: str) -> None:
    """Refuses ``only_2d=True`` (the authors') where a param has more than 2 dimensions."""
    only_2d = opts.pop("only_2d", True)
    if only_2d and not opts.get("optimize_1d") and any(p.ndim > 2 for p in params):
        raise NotImplementedError(f"{package} trains params of 3+ dimensions with MARS")


def _groups(params: list, mask: Sequence[bool] | None, decays: dict) -> list:
    """One group, or two where ``mask`` leaves some params out of both decays."""
    if mask is None or not any(decays.values()):
        return list(params)
    decayed = [p for p, m in zip(params, mask, strict=True) if m]
    kept = [p for p, m in zip(params, mask, strict=True) if not m]
    groups = [{"params": decayed}, {"params": kept, **{k: 0.0 for k in decays}}]
    return [group for group in groups if group["params"]]


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``MARS`` for the options of :class:`RefMars` (``mars_type="adamw"``,
    ``weight_decouple=True``, ``fixed_decay=False``, ``cautious=False``, ``foreach=False``).

    ``mask`` becomes two param groups. Not expressible: ``eps_placement="standard"`` with
    ``eps`` above 1e-12, ``correct_first_step=False``, ``is_approx=False``, ``only_2d=True``
    with params of 3+ dimensions, complex params, schedules.
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    refuse = (_eps_placement("keras"), _first_step(True), _no_approx, _mars_type)
    opts, lr, wd = adapter_options(params, options, "pytorch_optimizer", refuse=refuse,
                                   learning_rate=3e-3)  # fmt: skip
    _ndims(params, opts, "pytorch_optimizer")
    lr_1d = opts.pop("lr_1d", None)
    wd_1d = opts.pop("weight_decay_1d", 0.1)
    if callable(lr_1d) or callable(wd_1d):
        raise NotImplementedError("pytorch_optimizer has no schedule of the 1-D rate or decay")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.95), opts.pop("b2", 0.99)),
        "gamma": opts.pop("gamma", 0.025),
        "mars_type": "adamw",
        "optimize_1d": opts.pop("optimize_1d", False),
        "lr_1d": lr if lr_1d is None else float(lr_1d),
        "betas_1d": (opts.pop("b1_1d", 0.9), opts.pop("b2_1d", 0.95)),
        "weight_decay": wd,
        "weight_decay_1d": float(wd_1d),
        "weight_decouple": True,
        "fixed_decay": False,
        "ams_bound": opts.pop("amsgrad", False),
        "cautious": False,
        "eps": float(opts.pop("eps", 1e-8)),
        "maximize": opts.pop("maximize", False),
        "foreach": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    groups = _groups(params, mask, {"weight_decay": wd, "weight_decay_1d": float(wd_1d)})
    return pytorch_optimizer.MARS(groups, **kwargs)


def timm_optimizer(params: list, **options):
    """timm's ``Mars`` for the options of :class:`RefMars` (``mars_type="adamw"``,
    ``caution=False``; ``lr_1d_factor = lr_1d / lr``).

    ``mask`` becomes two param groups. Not expressible: ``correct_first_step=True``,
    ``eps_placement="keras"`` with ``eps`` above 1e-12, a ``weight_decay_1d`` other than
    ``weight_decay`` where params train with AdamW, ``amsgrad``, ``is_approx=False``,
    ``maximize``, ``only_2d=True`` with params of 3+ dimensions, complex params, schedules.
    """
    module = timm_optimizer_module("mars")
    refuse = (_eps_placement("standard"), _first_step(False), _no_approx, _mars_type,
              "amsgrad", "maximize")  # fmt: skip
    opts, lr, wd = adapter_options(params, options, "timm", refuse=refuse, learning_rate=3e-3)
    _ndims(params, opts, "timm")
    lr_1d = opts.pop("lr_1d", None)
    wd_1d = opts.pop("weight_decay_1d", 0.1)
    optimize_1d = opts.pop("optimize_1d", False)
    if callable(lr_1d) or callable(wd_1d):
        raise NotImplementedError("timm has no schedule of the 1-D rate or decay")
    if not optimize_1d and any(p.ndim < 2 for p in params) and wd_1d != wd:
        raise NotImplementedError("timm has one weight_decay for both kinds of params")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.95), opts.pop("b2", 0.99)),
        "eps": float(opts.pop("eps", 1e-8)),
        "weight_decay": wd,
        "gamma": opts.pop("gamma", 0.025),
        "mars_type": "adamw",
        "optimize_1d": optimize_1d,
        "lr_1d_factor": 1.0 if lr_1d is None else float(lr_1d) / lr,
        "betas_1d": (opts.pop("b1_1d", 0.9), opts.pop("b2_1d", 0.95)),
        "caution": False,
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return module.Mars(_groups(params, mask, {"weight_decay": wd}), **kwargs)


def _lr_1d_schedule(k):
    """The authors' 1-D rate under a schedule: the schedule times ``lr_1d / lr0``."""
    return lr_schedule(k) * 0.5


KERAS = {"eps_placement": "keras"}
TIMM = {"correct_first_step": False, "weight_decay_1d": 0.0}

# How the tests run this module's optimizer (tests/variants.py collects it by registry name).
TESTS = (
    Variant(
        name="mars",
        reference_class=RefMars,
        learning_rate=1e-2,
        zero1_layout=("auto", "data8"),
        cases={
            "default": {"mars_type": "mars-adamw"},
            "hyperparams": {"b1": 0.9, "b2": 0.999, "eps": 1e-6, "gamma": 0.1},
            "no_correction": {"gamma": 0.0},
            "amsgrad": {"amsgrad": True},
            "optimize_1d": {"optimize_1d": True, "weight_decay": 0.05},
            "adamw_1d": {"lr_1d": 3e-3, "b1_1d": 0.8, "b2_1d": 0.9, "weight_decay_1d": 0.05},
            "decay_mask": {"weight_decay": 0.1, "weight_decay_1d": 0.05, "mask": MASK},
            "schedules": {
                "learning_rate": lr_schedule,
                "weight_decay": wd_schedule,
                "lr_1d": _lr_1d_schedule,
                "weight_decay_1d": wd_schedule,
            },
            "keras_eps": KERAS,
            "keras_decay_mask_amsgrad": {
                **KERAS,
                "amsgrad": True,
                "weight_decay": 0.1,
                "weight_decay_1d": 0.05,
                "mask": MASK,
            },
            "keras_optimize_1d": {**KERAS, "optimize_1d": True, "only_2d": False},
            "timm": TIMM,
            "timm_decay_mask": {
                **TIMM,
                "weight_decay": 0.1,
                "weight_decay_1d": 0.1,
                "mask": MASK,
                "lr_1d": 5e-3,
                "b1_1d": 0.85,
                "b2_1d": 0.98,
            },
            "timm_optimize_1d": {**TIMM, "optimize_1d": True, "eps": 1e-13},
            "maximize": {**KERAS, "maximize": True, "weight_decay": 0.1},
        },
        packages={
            "pytorch-optimizer": pytorch_optimizer_optimizer,
            "timm": timm_optimizer,
        },
        float32_cases=("keras_eps", "keras_decay_mask_amsgrad"),
        flat_params=False,
        per_tensor=True,
        hyperparams={
            "learning_rate": 1e-2,
            "b1": 0.95,
            "b2": 0.99,
            "eps": 1e-8,
            "gamma": 0.025,
            "b1_1d": 0.9,
            "b2_1d": 0.95,
            "weight_decay": 0.1,
            "weight_decay_1d": 0.05,
        },
        bad=(
            ("b1", 1.0, "[0, 1)"),
            ("eps", -1.0, ">= 0"),
            ("gamma", -0.5, ">= 0"),
            ("b2_1d", 1.5, "[0, 1)"),
            ("weight_decay_1d", -0.1, ">= 0"),
            ("lr_1d", -1.0, ">= 0"),
            ("mars_type", "mars-lion", "not built"),
            ("mars_type", "lion", "mars-adamw"),
            ("eps_placement", "hat", "standard"),
        ),
    ),
)
