"""ADOPT (Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the
Optimal Rate", arXiv:2411.02853).

Written from the paper and the authors' code, iShohei220/adopt ``src/adopt/adopt.py`` (class
``ADOPT``, ``_single_tensor_adopt``). The ``n``-th call (``n = 0, 1, ...``, the authors'
``step`` before its increment, also the index of the learning-rate schedule)::

    n = 0:  v = |g|^2                                    (nothing else: no update, no decay)
    n > 0:  gn = g / max(sqrt(v), eps)                   (v of the PREVIOUS calls)
            gn = clip(gn, -c(n), c(n))                   (use_clipping; c(n) = n^0.25)
            m  = b1 m + (1 - b1) gn
            u  = m                                       (nesterov: b1 m + (1 - b1) gn)
            p <- p - lr(n) (u + wd(n) p)                 (decayed leaves: decouple=True)
            v  = b2 v + (1 - b2) |g|^2                   (after the update)

The gradient is normalized by the second moment of the previous gradients (not including the
current one), and the momentum is taken of the normalized gradient. ``m`` starts at 0 and is
not bias-corrected, so the first moving update is ``lr (1 - b1) gn``.

Where the ports differ from the authors:

* ``optax.contrib.scale_by_adopt`` / ``adopt`` (optax 0.2.8): the same rule. Its first call
  returns a zero update (``b1_ = 1``, ``b2_ = 0`` at ``count == 0``), its clip is
  ``clip_value_fn(count)`` at the count before the increment, as here. ``nesterov=True`` is
  optax's (the authors have none). No weight decay in ``adopt``: with
  ``add_decayed_weights`` chained after it, the first call would decay (the authors' does not).
  Complex params: ``nu`` is ``|g|^2`` as here and, without clipping, the same rule; with
  clipping ``jnp.clip`` raises ValueError on complex values (no modulus clip).
* timm ``Adopt`` (1.0.31): the authors' arithmetic with ``clip = (step - 1)^clip_exp`` at the
  post-increment ``step`` (the same count ``n``), but its default ``clip_exp=0.333`` is not
  the authors' 0.25; ``decoupled=True`` is the authors' ``decouple=True`` (its default
  ``False`` is L2 decay added to the gradient, also before the first ``v``). Only power laws
  ``c(n) = n^e`` are expressible.
* pytorch-optimizer ``ADOPT`` (4.1.0): ``clip_lambda(step)`` at the post-increment step
  ``n + 1``, so its default clips at ``(n + 1)^0.25`` (``clip_lambda(s) = c(s - 1)`` restores
  the authors'; adam_jax's ``clip_value_fn=lambda t: (t + 1) ** 0.25`` gives its clip); and
  its decoupled decay (``weight_decouple=True``) is applied on every call, also on the first
  one, which only initializes ``v`` in the authors' code (and here): the params shrink by
  ``1 - lr wd`` one extra time. Not expressible, so the adapter refuses weight decay.

Complex params: the authors, timm and pytorch-optimizer view them as pairs of reals (separate
second moments and clips of the real and imaginary parts). Here a complex leaf has a real
``v = |g|^2`` (as ``RefAdam``, optax and adam_jax's second moments) and the clip bounds the
real and imaginary parts apart, as the clamp of PyTorch's real view does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
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
    timm_optimizer_module,
)


def default_clip_value(count: float) -> float:
    """The authors' ``clip_lambda``: ``count ** 0.25`` at the number of previous calls."""
    return count**0.25


def _clip(x: np.ndarray, c: float) -> np.ndarray:
    """``clip(x, -c, c)``; for complex ``x`` the real and imaginary parts apart."""
    if not np.iscomplexobj(x):
        return np.clip(x, -c, c)
    return np.clip(x.real, -c, c) + 1j * np.clip(x.imag, -c, c)


@dataclass
class RefAdopt(AdamMomentsReference):
    """Float64 reference for ADOPT in the authors' arithmetic (``learning_rate=None``: the bare
    direction ``u``, zero on the first call).

    ``clip_value_fn(n)`` gets ``n``, the number of previous calls (``n >= 1`` whenever it is
    used; the authors' ``clip_lambda(step)``); ``learning_rate`` and ``weight_decay`` schedules
    get the same ``n`` (the first call, ``n = 0``, moves nothing). Weight decay is decoupled and
    scaled by the learning rate (the authors' ``decouple=True``: ``p <- p - lr wd p`` before the
    step, skipped on the first call); ``maximize`` negates ``g`` first.
    """

    learning_rate: ScalarOrSchedule | None = 1e-3
    b1: float = 0.9
    b2: float = 0.9999
    eps: float = 1e-6
    nesterov: bool = False  # optax's: u = b1 m_t + (1 - b1) gn_t
    use_clipping: bool = True
    clip_value_fn: Callable[[int], float] = default_clip_value
    weight_decay: ScalarOrSchedule = 0.0

    def update(self, grads: Sequence[np.ndarray], params: Sequence[np.ndarray]) -> Leaves:
        """One step; returns the updates (zeros on the first call)."""
        n = self.count
        b1, b2 = self.b1, self.b2
        clip = float(self.clip_value_fn(n)) if self.use_clipping and n > 0 else None
        out = []
        for i, g, p, decayed in self.leaves(grads, params):
            if n == 0:
                self.v[i] = _abs_sq(g)
                out.append(np.zeros_like(p))
                continue
            gn = g / np.maximum(np.sqrt(self.v[i]), self.eps)
            if clip is not None:
                gn = _clip(gn, clip)
            self.m[i] = b1 * self.m[i] + (1 - b1) * gn
            u = b1 * self.m[i] + (1 - b1) * gn if self.nesterov else self.m[i]
            out.append(self.decay_and_step(u, p, n, decayed))
            self.v[i] = b2 * self.v[i] + (1 - b2) * _abs_sq(g)
        self.count += 1
        return out


def clip_exponent(clip_value_fn: Callable[[int], float], n_max: int = 4096) -> float | None:
    """The ``e`` with ``clip_value_fn(n) == n ** e`` (to 1e-13) for ``n = 1 .. n_max``, or None
    where ``clip_value_fn`` is not such a power law (what timm's ``clip_exp`` can express)."""
    try:
        value = float(clip_value_fn(2))
        if not value > 0:
            return None
        guess = math.log2(value)
        for e in (round(guess, 12), guess):
            if all(
                math.isclose(float(clip_value_fn(n)), float(n) ** e, rel_tol=1e-13)
                for n in range(1, n_max + 1)
            ):
                return e
    except (ArithmeticError, TypeError, ValueError):
        return None
    return None


# What both adapters refuse, besides schedules (see reference.adapter_options).
_options = functools.partial(
    adapter_options,
    complex_params="views complex params as pairs of reals (per-part v and clip)",
    refuse=("nesterov",),
)


def timm_optimizer(params: list, **options):
    """timm's ``Adopt`` for the options of :class:`RefAdopt`: ``decoupled=True`` (the authors'
    ``decouple=True``), ``clip_exp`` = the exponent of ``clip_value_fn`` (the reference's
    default gives 0.25, not timm's default 0.333; ``use_clipping=False`` gives ``None``).

    Not expressible: ``clip_value_fn`` other than a power law ``n ** e``, ``nesterov``,
    complex params (pairs of reals), schedules (use ``run_torch``'s ``lr_lambda`` for the
    learning rate; the decay is ``lr * wd`` with the scheduled ``lr``, as the reference's).
    """
    module = timm_optimizer_module("adopt")
    opts, lr, wd = _options(params, options, "timm")
    clip_exp = None
    clip_value_fn = opts.pop("clip_value_fn", default_clip_value)
    if opts.pop("use_clipping", True):
        clip_exp = clip_exponent(clip_value_fn)
        if clip_exp is None:
            raise NotImplementedError("timm clips at n ** clip_exp only")
    mask = opts.pop("mask", None)
    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.9999)),
        "eps": opts.pop("eps", 1e-6),
        "clip_exp": clip_exp,
        "weight_decay": wd,
        "decoupled": True,
        "maximize": opts.pop("maximize", False),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return module.Adopt(param_groups(params, mask, wd), **kwargs)


def pytorch_optimizer_optimizer(params: list, **options):
    """pytorch-optimizer's ``ADOPT`` for the options of :class:`RefAdopt`, with
    ``clip_lambda(step) = clip_value_fn(step - 1)`` (its ``step`` is 1-based: its own default
    ``step ** 0.25`` clips at ``(n + 1) ** 0.25``, one call later than the authors').

    Not expressible: weight decay on any leaf (it decays on the first call too, where the
    authors only initialize ``v``), ``nesterov``, complex params (pairs of reals), schedules
    (use ``run_torch``'s ``lr_lambda`` for the learning rate).
    """
    pytorch_optimizer = import_reference_package("pytorch-optimizer", "pytorch_optimizer")
    opts, lr, wd = _options(params, options, "pytorch_optimizer")
    mask = opts.pop("mask", None)
    if wd and (mask is None or any(mask)):
        raise NotImplementedError(
            "pytorch_optimizer's ADOPT decays on the first call (the authors' does not)"
        )
    clip_value_fn = opts.pop("clip_value_fn", default_clip_value)
    clip_lambda = None
    if opts.pop("use_clipping", True):

        def clip_lambda(step: float) -> float:
            return float(clip_value_fn(step - 1))

    kwargs = {
        "lr": lr,
        "betas": (opts.pop("b1", 0.9), opts.pop("b2", 0.9999)),
        "eps": opts.pop("eps", 1e-6),
        "clip_lambda": clip_lambda,
        "weight_decay": 0.0,
        "weight_decouple": True,
        "maximize": opts.pop("maximize", False),
    }
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    return pytorch_optimizer.ADOPT(list(params), **kwargs)


# How the tests run this module's optimizers (tests/variants.py collects them by registry name).
TESTS = (
    Variant(
        name="adopt",
        learning_rate=1e-2,
        zero1_layout=("explicit", "data4_model2"),
        reference_class=RefAdopt,
        cases={
            "default": {},
            "hyperparams": {"b1": 0.8, "b2": 0.99, "eps": 1e-3},
            "nesterov": {"nesterov": True},
            "no_clipping": {"use_clipping": False},
            "clip_value_fn": {"clip_value_fn": lambda count: (count + 1) ** 0.25},
            "decay_mask": DECAY,
            "schedules": SCHEDULED,
            "maximize": {"maximize": True},
        },
        optax_cases=("default", "hyperparams", "nesterov", "no_clipping", "clip_value_fn"),
        packages={
            "timm": timm_optimizer,
            "pytorch-optimizer": pytorch_optimizer_optimizer,
        },
        hyperparams={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.9999, "eps": 1e-6},
        bad=(("b2", 1.0, "[0, 1)"), ("eps", -1.0, ">= 0"), ("weight_decay", -0.1, ">= 0")),
    ),
)
